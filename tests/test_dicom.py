"""DICOM input: known pixels from files pydicom writes, pydicom's own files, refusals, training, predict."""

import io
import json
import os
import shutil

import numpy as np
import pytest
from click.testing import CliRunner
from images import PATIENT, dicom_of, write_dicom
from PIL import Image

from cxrkeras import data, dicom, training
from cxrkeras import images as images_lib
from cxrkeras.cli import main
from cxrkeras.config import RunConfig, study_model_config, study_train_config
from cxrkeras.synth import synth_image, write_synthetic_dataset


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def shown(path):
    """The [0, 1] pixels cxrkeras shows for the DICOM file at `path`."""
    with open(path, "rb") as f:
        return dicom.pixels(dicom.read(f))


def assert_no_patient(text):
    for value in PATIENT.values():
        assert value not in text and value.split("^")[0] not in text


# ---------------------------------------------------------------- pixels whose values are known

S = np.array([[0, 250, 500, 750], [1000, 1250, 1500, 4095]])  # stored values
WINDOW = {"WindowCenter": "1000.5", "WindowWidth": "1001"}  # linear: 500 -> 0, 1000 -> 0.5, 1500 -> 1
RESCALE = {"RescaleSlope": "2", "RescaleIntercept": "-1000", "RescaleType": "US"}


def windowed(v):
    return np.clip((v - 1000) / 1000 + 0.5, 0, 1)


@pytest.mark.parametrize(
    "photometric, bits, stored, tags, expected",
    [
        ("MONOCHROME2", 12, S, {}, S / 4095),  # no window: the full stored range
        ("MONOCHROME1", 12, S, {}, 1 - S / 4095),  # bone bright
        ("MONOCHROME2", 16, S, {}, S / 65535),
        ("MONOCHROME2", 12, S - 2048, {}, S / 4095),  # signed: -2048 .. 2047
        ("MONOCHROME2", 16, S, WINDOW, windowed(S)),
        ("MONOCHROME1", 12, S, WINDOW, 1 - windowed(S)),
        ("MONOCHROME2", 12, S, RESCALE, S / 4095),  # the full range, rescaled: the same picture
        ("MONOCHROME2", 16, S, {**RESCALE, **WINDOW}, windowed(2 * S - 1000)),  # the window is on rescaled values
    ],
    ids=["m2-12", "m1-12", "m2-16", "signed", "window-16", "m1-window", "rescale", "rescale-window"],
)
def test_pixels_follow_the_viewer_pipeline(tmp_path, photometric, bits, stored, tags, expected):
    dtype = "int16" if stored.min() < 0 else "uint16"
    path = write_dicom(tmp_path / "x.dcm", stored.astype(dtype), photometric, bits, **tags)
    np.testing.assert_allclose(shown(path), expected, atol=1e-9)


def test_a_voi_lut_maps_through_its_table(tmp_path):
    from pydicom.dataset import Dataset

    item = Dataset()
    item.LUTDescriptor = [3, 1000, 8]  # 3 entries for stored values 1000, 1001, 1002; 8-bit output
    item.add_new("LUTData", "US", [10, 128, 250])
    path = write_dicom(tmp_path / "x.dcm", np.array([[0, 1000, 1001, 1002, 4095]], "uint16"), VOILUTSequence=[item])
    np.testing.assert_allclose(shown(path), [[10 / 255, 10 / 255, 128 / 255, 250 / 255, 250 / 255]], atol=1e-9)


def test_recognised_by_preamble_or_by_name_alone(tmp_path):
    stored = S.astype("uint16")
    no_name = write_dicom(tmp_path / "image", stored)  # Part 10, no extension
    bare = write_dicom(tmp_path / "bare.dcm", stored, preamble=False)  # no preamble: only its name says DICOM
    for path in (no_name, bare):
        with open(path, "rb") as f:
            assert images_lib.sniff_format(f.read(images_lib.HEAD_BYTES), path) == images_lib.DICOM
        assert images_lib.check_image(path) is None
        np.testing.assert_allclose(shown(path), S / 4095, atol=1e-9)
    shutil.copy(bare, tmp_path / "bare")
    assert images_lib.check_image(str(tmp_path / "bare")).startswith("not an image")


def test_a_manifest_lists_dicom_files(tmp_path):
    stored = S.astype("uint16")
    write_dicom(tmp_path / "a.dcm", stored)
    write_dicom(tmp_path / "b", stored, "MONOCHROME1")
    write_dicom(tmp_path / "c.dcm", stored, preamble=False)
    (tmp_path / "m.csv").write_text("path,label\na.dcm,normal\nb,non-covid\nc.dcm,covid\n")
    result = run("data", "check", tmp_path / "m.csv")
    assert result.exit_code == 0 and "3 images decode; 0 problem(s)." in result.output


# ---------------------------------------------------------------- pydicom's shipped files


def shipped(name):
    """A test file inside pydicom's wheel (never downloaded), or skip."""
    from pydicom.data import get_testdata_file

    path = get_testdata_file(name, download=False)
    if not path or not os.path.isfile(path):
        pytest.skip(f"{name} is not in the installed pydicom")
    return path


def test_shipped_files_read_the_same_in_every_encoding():
    encodings = ["MR_small.dcm", "MR_small_implicit.dcm", "MR_small_bigendian.dcm", "MR_small_RLE.dcm"]
    first = shown(shipped(encodings[0]))
    assert first.shape == (64, 64) and 0 <= first.min() < first.max() <= 1
    for name in encodings[1:]:
        assert images_lib.check_image(shipped(name)) is None
        np.testing.assert_allclose(shown(shipped(name)), first, atol=1e-9)
    ct = shipped("CT_small.dcm")  # signed, rescaled
    assert images_lib.check_image(ct) is None and shown(ct).shape == (128, 128)


def unreadable(folder):
    """{file: reason} of DICOM files cxrkeras skips, written into `folder`."""
    from pydicom.pixels import get_decoder
    from pydicom.uid import JPEGLSLossless

    folder.mkdir(exist_ok=True)
    no_pixels = io.BytesIO()
    write_dicom(no_pixels, S.astype("uint16"))
    from pydicom import dcmread

    ds = dcmread(io.BytesIO(no_pixels.getvalue()))
    del ds.PixelData
    ds.save_as(folder / "no-pixels.dcm")
    files = {
        "no-pixels.dcm": "DICOM without pixel data",
        "frames": "multi-frame DICOM (15 frames)",  # named without .dcm: known by its preamble
        "colour.dcm": "colour DICOM (Samples per Pixel 3)",
        "plan.dcm": "DICOM without an image",
        "truncated.dcm": "DICOM pixel data (Explicit VR Little Endian) does not decode",
    }
    shutil.copy(shipped("rtdose.dcm"), folder / "frames")
    shutil.copy(shipped("SC_rgb_rle.dcm"), folder / "colour.dcm")
    shutil.copy(shipped("rtplan.dcm"), folder / "plan.dcm")
    shutil.copy(shipped("MR_truncated.dcm"), folder / "truncated.dcm")
    if not get_decoder(JPEGLSLossless).is_available:
        shutil.copy(shipped("MR_small_jpeg_ls_lossless.dcm"), folder / "jpeg-ls.dcm")
        files["jpeg-ls.dcm"] = "DICOM compressed as JPEG-LS Lossless"
    return {str(folder / name): reason for name, reason in files.items()}


def test_data_check_skips_unreadable_dicom_naming_file_and_reason(synthetic_dataset, tmp_path):
    root = tmp_path / "ds"
    shutil.copytree(synthetic_dataset, root)
    bad = unreadable(root / "train" / "normal")
    result = run("data", "check", root)
    assert result.exit_code == 1
    for path, reason in bad.items():
        assert f"{path}: {reason}" in result.output
    assert f"48 images decode; {len(bad)} problem(s)." in result.output
    assert_no_patient(result.output)


# ---------------------------------------------------------------- training and predicting


def test_a_folder_mixing_jpeg_and_dicom_trains(tmp_path):
    root = tmp_path / "mixed"
    write_synthetic_dataset(root, {"train": 6, "val": 2}, size=48)
    jpegs = sorted(root.rglob("*.jpg"))
    for i, path in enumerate(jpegs[::2]):  # half of each class folder becomes DICOM, MONOCHROME1 or 2
        image = np.asarray(Image.open(path))
        dicom_of(image, path.with_suffix("" if i % 5 == 0 else ".dcm"), ("MONOCHROME1", "MONOCHROME2")[i % 2])
        path.unlink()
    dicoms = [p for p in root.rglob("*") if p.is_file() and p.suffix != ".jpg"]
    assert len(dicoms) == 3 * 3 + 3 * 1 and any(p.suffix == "" for p in dicoms)
    assert "24 images decode; 0 problem(s)." in run("data", "check", root).output

    config = RunConfig(model=study_model_config("infected"), train=study_train_config("infected"))
    config.model.blocks, config.model.filters, config.model.dense_units = 2, [4, 8], 8
    config.model.image_size = 32
    config.train.epochs, config.train.batch_size = 1, 8
    config.data.data_dir = str(root)
    result = training.fit(config, str(tmp_path / "run"), verbose=0)
    assert result.completed and np.isfinite(result.history["loss"][0])


def test_the_data_pipeline_reads_dicom_as_the_picture_it_shows(tmp_path):
    image = synth_image("covid", np.random.default_rng(0), 40)
    png = tmp_path / "x.png"
    Image.fromarray(image).save(png)
    m2 = dicom_of(image, tmp_path / "m2.dcm", "MONOCHROME2", 12)
    m1 = dicom_of(image, tmp_path / "m1", "MONOCHROME1", 16)
    batch = next(iter(data.make_dataset([str(png), m2, m1], [0, 0, 0], "infected", batch_size=3, image_size=32)))[0]
    np.testing.assert_allclose(batch[1], batch[0], atol=1e-3)  # 12 bits: a step of 1/4095
    np.testing.assert_allclose(batch[2], batch[0], atol=1e-4)
    np.testing.assert_allclose(data.load_images([m1], 32)[0], batch[2], atol=1e-6)


def test_monochrome1_and_its_inverse_predict_alike_and_no_patient_is_named(exported_cascade, tmp_path):
    image = synth_image("non-covid", np.random.default_rng(2))
    png = tmp_path / "x.png"
    Image.fromarray(image).save(png)
    m2, m1 = dicom_of(image, tmp_path / "m2.dcm", "MONOCHROME2"), dicom_of(image, tmp_path / "m1", "MONOCHROME1")
    files = [str(png), m2, m1]
    bad = unreadable(tmp_path / "bad")
    for model in (exported_cascade["cascade"], exported_cascade["base"]):
        result = run("predict", model, *files, *bad, "--json")
        assert result.exit_code == 1
        answers = json.loads(result.output)
        probabilities = [list(a["probabilities"].values()) for a in answers[:3]]
        np.testing.assert_allclose(probabilities[1], probabilities[0], atol=1e-4)
        np.testing.assert_allclose(probabilities[2], probabilities[0], atol=1e-4)
        assert [a["path"] for a in answers[3:]] == list(bad)
        assert all(a["error"].startswith(reason) for a, reason in zip(answers[3:], bad.values()))
        assert_no_patient(result.output)
    text = run("predict", exported_cascade["cascade"], *files, *bad).output
    assert text.splitlines()[2].startswith(files[2] + "\t")
    assert_no_patient(text)
