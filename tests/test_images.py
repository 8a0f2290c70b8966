"""One judge of a file (`images.check_image`): what training's decoder reads, what it refuses and why.

Every file here is made by the test: PNGs that lie about their size or carry a
bad checksum, BMP, GIF, CMYK JPEG, 16-bit and 1x1 images, names that are not
UTF-8, folders named like images.
"""

import os
import shutil

import numpy as np
import pytest
from images import png_declaring, png_with_bad_crc
from PIL import Image

from cxrkeras import data
from cxrkeras import images as images_lib
from cxrkeras.predict import image_problem


def gradient(height=24, width=32):
    return np.tile(np.linspace(0, 255, width, dtype="float32"), (height, 1)).astype("uint8")


def save(path, array, mode=None, **options):
    image = Image.fromarray(array)
    if mode:
        image = image.convert(mode)
    image.save(path, **options)
    return str(path)


def test_bad_crc_png_passes_pillow_but_is_refused_by_the_check(tmp_path):
    path = tmp_path / "bad-crc.png"
    path.write_bytes(png_with_bad_crc())
    with Image.open(path) as image:
        image.load()  # the check of old: Pillow accepts it
    reason = images_lib.check_image(str(path))
    assert reason is not None and reason.startswith("does not decode as PNG")


def test_a_png_declaring_a_huge_size_is_refused_by_its_header(tmp_path, monkeypatch):
    path = tmp_path / "bomb.png"
    path.write_bytes(png_declaring(20000, 20000))
    monkeypatch.delenv(images_lib.MAX_PIXELS_ENV, raising=False)
    reason = images_lib.check_image(str(path))
    assert reason.startswith("PNG declares 20000x20000 = 400,000,000 pixels, over the limit of 50,000,000")
    assert image_problem(str(path)) == reason  # predict judges files by the same function
    # Under a higher limit the header passes, and the truncated stream is what fails.
    monkeypatch.setenv(images_lib.MAX_PIXELS_ENV, str(10**9))
    assert images_lib.check_image(str(path)).startswith("does not decode as PNG")
    monkeypatch.setenv(images_lib.MAX_PIXELS_ENV, "lots")
    with pytest.raises(data.DatasetError, match=r"\$CXRKERAS_MAX_PIXELS='lots'"):
        images_lib.max_pixels()


def test_every_format_the_decoder_reads_is_accepted(tmp_path):
    g = gradient()
    rgb = np.stack([g, g, g], axis=-1)
    rgba = np.concatenate([rgb, np.full_like(g, 255)[..., None]], axis=-1)
    files = {
        "gray.bmp": save(tmp_path / "gray.bmp", g),
        "rgb.bmp": save(tmp_path / "rgb.bmp", rgb),
        "first-frame.gif": str(tmp_path / "first-frame.gif"),
        "cmyk.jpg": save(tmp_path / "cmyk.jpg", rgb, "CMYK", quality=95),
        "rgba.png": save(tmp_path / "rgba.png", rgba),
        "gray16.png": save(tmp_path / "gray16.png", g.astype("uint16") * 257),
        "one-pixel.png": save(tmp_path / "one-pixel.png", np.full((1, 1), 200, "uint8")),
        "named.txt": save(tmp_path / "named.txt", g, format="PNG"),  # judged by content, not by name
    }
    frames = [Image.fromarray(g), Image.fromarray(255 - g)]
    frames[0].save(files["first-frame.gif"], save_all=True, append_images=frames[1:])
    assert {name: images_lib.check_image(path) for name, path in files.items()} == {name: None for name in files}

    images = data.load_images(list(files.values()), image_size=32)
    expected = g.astype("float32").mean() / 255
    by_name = dict(zip(files, images))
    for name in ("gray.bmp", "rgb.bmp", "first-frame.gif", "cmyk.jpg", "rgba.png", "gray16.png", "named.txt"):
        assert by_name[name].mean() == pytest.approx(expected, abs=0.03), name  # CMYK comes out right, not inverted
    assert by_name["one-pixel.png"].mean() == pytest.approx(200 / 255, abs=0.01)


def test_what_the_decoder_refuses_is_named_with_its_reason(tmp_path):
    g = gradient()
    one_bit = save(tmp_path / "one-bit.bmp", g, "1")  # Pillow reads it; TensorFlow's BMP decoder does not
    tiff = save(tmp_path / "scan.tif", g)
    webp = save(tmp_path / "photo.jpg", g, format="WEBP")  # a WebP named .jpg
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "folder.jpg").mkdir()
    reasons = {os.path.basename(p): images_lib.check_image(str(p)) for p in [one_bit, tiff, webp]}
    assert reasons["one-bit.bmp"].startswith("does not decode as BMP (Number of channels")
    assert reasons["scan.tif"].startswith("not an image") and reasons["photo.jpg"].startswith("not an image")
    assert images_lib.check_image(str(tmp_path / "empty.png")) == "empty file (0 bytes)"
    assert images_lib.check_image(str(tmp_path / "folder.jpg")) == "a folder, not an image file"
    assert images_lib.check_image(str(tmp_path / "missing.png")) == "no such file"


@pytest.fixture
def odd_dataset(synthetic_dataset, tmp_path):
    """The synthetic dataset plus one of each odd thing in train/normal."""
    root = tmp_path / "ds"
    shutil.copytree(synthetic_dataset, root)
    folder = root / "train" / "normal"
    (folder / "bomb.png").write_bytes(png_declaring(20000, 20000))
    (folder / "bad-crc.png").write_bytes(png_with_bad_crc())
    (folder / "x.jpg").mkdir()
    (folder / "zero.jpg").write_bytes(b"")
    (folder / "notes.txt").write_text("not an image")
    shutil.copy(folder / "normal-0000.jpg", os.path.join(os.fsencode(folder), b"caf\xe9-latin1.jpg"))
    save(folder / "scan.bmp", gradient())  # readable: BMP is accepted
    return root


def test_odd_files_are_listed_skipped_and_the_rest_is_used(odd_dataset):
    splits = data.load_splits(odd_dataset, val_fraction=0.2)
    reasons = {data.printable(os.path.basename(p.path)): p.reason for p in splits.problems}
    assert set(reasons) == {"bomb.png", "bad-crc.png", "x.jpg", "zero.jpg", "notes.txt", "caf\\xe9-latin1.jpg"}
    assert reasons["caf\\xe9-latin1.jpg"].startswith("file name is not valid UTF-8")
    assert "caf\\xe9-latin1.jpg: file name" in "\n".join(str(p) for p in splits.problems)  # printable
    used = splits.train + splits.validation
    assert sum(s.label == "normal" for s in used) == 11  # the 10 synthetic images and scan.bmp
    data.fingerprint(used)
    # The files that passed all decode in training's pipeline, to the last batch.
    paths, labels = data.task_arrays(used, "infected")
    assert sum(len(y) for _, y in data.make_dataset(paths, labels, "infected", batch_size=16, cache=False)) == len(used)


def test_a_class_left_without_train_images_is_an_error_naming_it(synthetic_dataset, tmp_path):
    root = tmp_path / "ds"
    shutil.copytree(synthetic_dataset, root)
    folder = root / "train" / "infected" / "covid"
    for name in os.listdir(folder):
        (folder / name).write_bytes(png_with_bad_crc())
    with pytest.raises(data.DatasetError, match=r"no readable train images of class 'covid'(.|\n)*"
                       r"10 file\(s\) were skipped as unreadable"):
        data.load_splits(root)
    problems = data.check_dataset(root)[1]
    assert f"{root}: no readable train images of class 'covid'" in [str(p) for p in problems]


def test_a_class_too_small_to_split_is_an_error_naming_it(synthetic_dataset, tmp_path):
    root = tmp_path / "ds"
    shutil.copytree(synthetic_dataset, root)
    folder = root / "train" / "normal"
    for name in sorted(os.listdir(folder))[3:]:
        os.remove(folder / name)
    with pytest.raises(data.DatasetError, match=r"class 'normal' has 3 readable, distinct train image\(s\): too few "
                       r"to carve a validation split of 0.15 \(at least 4 needed\)"):
        data.load_splits(root, val_fraction=0.15)
    assert len(data.load_splits(root, val_fraction=0.34).validation) == 1 + 3 + 3


def test_manifest_problems_are_one_line_errors(tmp_path):
    save(tmp_path / "a.png", gradient())
    missing_cell = tmp_path / "missing.csv"
    missing_cell.write_text("path,label,split\na.png,normal,train\na.png\n")
    with pytest.raises(data.DatasetError, match=r"missing.csv:3: missing 'label' cell"):
        data.find_samples(missing_cell)
    with pytest.raises(data.DatasetError, match=r"a.png: a PNG image; expected a dataset folder or a CSV manifest"):
        data.find_samples(tmp_path / "a.png")
    latin1 = tmp_path / "latin1.csv"
    latin1.write_bytes("path,label\ncafé.png,normal\n".encode("latin-1"))
    with pytest.raises(data.DatasetError, match=r"latin1.csv: not a CSV manifest \('utf-8' codec"):
        data.find_samples(latin1)
    for source in (missing_cell, tmp_path / "a.png"):  # `data check` names the file once
        (problem,) = data.check_dataset(source)[1]
        assert str(problem).count(str(source)) == 1, str(problem)


def test_verdicts_are_cached_by_path_size_and_mtime(synthetic_dataset, tmp_path, monkeypatch):
    root = tmp_path / "ds"
    shutil.copytree(synthetic_dataset, root)
    samples = data.find_samples(root)
    good, problems = data.check_samples(samples)
    assert len(good) == len(samples) and not problems

    decoded = []
    real = images_lib.decode_problem
    monkeypatch.setattr(images_lib, "decode_problem", lambda *a: decoded.append(a) or real(*a))
    assert data.check_samples(samples) == (good, [])
    assert decoded == []  # nothing read again
    changed = root / "val" / "normal" / "normal-0001.jpg"
    changed.write_bytes(png_with_bad_crc())  # a new size and time: checked again
    good, problems = data.check_samples(samples)
    assert len(decoded) == 1 and [p.path for p in problems] == [str(changed)]
    monkeypatch.setenv(images_lib.MAX_PIXELS_ENV, "100")  # another limit: every verdict is redone
    assert len(data.check_samples(samples)[1]) == len(samples)
