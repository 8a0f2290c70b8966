import os
import shutil
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from cxrkeras import data
from cxrkeras.config import CLASSES


def _copy(src, dst):
    shutil.copytree(src, dst)
    return str(dst)


def test_find_samples_reads_the_study_layout(synthetic_dataset):
    samples = data.find_samples(synthetic_dataset)
    counts = data.class_counts(samples)
    assert counts == {sp: {c: n for c in CLASSES} for sp, n in (("train", 10), ("val", 3), ("test", 3))}
    assert all(s.path.startswith(synthetic_dataset) for s in samples)


def test_missing_class_folder_names_the_path(synthetic_dataset, tmp_path):
    root = _copy(synthetic_dataset, tmp_path / "ds")
    shutil.rmtree(os.path.join(root, "train", "infected", "covid"))
    with pytest.raises(data.DatasetError, match=r"train/infected/covid: missing class folder(.|\n)*expected layout"):
        data.find_samples(root)


def test_empty_class_and_missing_train_are_errors(synthetic_dataset, tmp_path):
    root = _copy(synthetic_dataset, tmp_path / "ds")
    folder = os.path.join(root, "train", "normal")
    for name in os.listdir(folder):
        os.remove(os.path.join(folder, name))
    with pytest.raises(data.DatasetError, match="train/normal: empty class folder"):
        data.find_samples(root)
    with pytest.raises(data.DatasetError, match="missing split folder"):
        data.find_samples(tmp_path)


def test_manifest_with_relative_paths_and_bad_label(synthetic_dataset, tmp_path):
    samples = data.find_samples(synthetic_dataset)
    manifest = tmp_path / "list.csv"
    rows = ["path,label,split"] + [f"{s.path},{s.label},{s.split}" for s in samples]
    manifest.write_text("\n".join(rows) + "\n")
    assert data.find_samples(manifest) == samples
    img = tmp_path / "x.png"
    Image.new("L", (20, 20)).save(img)
    bad = tmp_path / "bad.csv"
    bad.write_text("path,label\nx.png,pneumonia\n")
    with pytest.raises(data.DatasetError, match=r"bad.csv:2: label 'pneumonia'"):
        data.find_samples(bad)


def test_bad_files_are_reported_with_path_and_reason(synthetic_dataset, tmp_path):
    root = _copy(synthetic_dataset, tmp_path / "ds")
    folder = os.path.join(root, "train", "normal")
    good = os.path.join(folder, sorted(os.listdir(folder))[0])
    blob = open(good, "rb").read()
    (tmp_path / "ds/train/normal/zero.jpg").write_bytes(b"")
    (tmp_path / "ds/train/normal/truncated.jpg").write_bytes(blob[: len(blob) // 3])
    (tmp_path / "ds/train/normal/text.jpg").write_text("not an image")
    (tmp_path / "ds/train/normal/notes.txt").write_text("hello")
    good_samples, problems = data.check_samples(data.find_samples(root))
    reasons = {os.path.basename(p.path): p.reason for p in problems}
    assert set(reasons) == {"zero.jpg", "truncated.jpg", "text.jpg", "notes.txt"}
    assert "0 bytes" in reasons["zero.jpg"]
    assert reasons["truncated.jpg"].startswith("does not decode as JPEG")
    assert reasons["text.jpg"].startswith("not an image") and reasons["notes.txt"].startswith("not an image")
    assert len(good_samples) == 16 * 3  # the bad files are skipped, every good one kept
    splits = data.load_splits(root, val_fraction=0.2)
    assert len(splits.problems) == 4
    assert all(os.path.basename(s.path) not in reasons for s in splits.train + splits.validation)


def test_png_16_bit_rgba_and_odd_sizes_become_150_gray(tmp_path):
    rgba = np.zeros((40, 60, 4), "uint8")
    rgba[..., 0] = 255  # pure red: gray = 0.299
    rgba[..., 3] = 255
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    Image.fromarray((np.ones((300, 200)) * 65535 * 0.25).astype("uint16")).save(tmp_path / "g16.png")
    Image.fromarray(np.full((151, 149, 3), 255, "uint8")).save(tmp_path / "rgb.jpg")
    images = data.load_images([str(tmp_path / n) for n in ("rgba.png", "g16.png", "rgb.jpg")])
    assert images.shape == (3, 150, 150, 1) and images.dtype == np.float32
    np.testing.assert_allclose(images[0].mean(), 0.299, atol=0.01)
    np.testing.assert_allclose(images[1].mean(), 0.25, atol=0.01)
    np.testing.assert_allclose(images[2].mean(), 1.0, atol=0.01)
    assert images.min() >= 0 and images.max() <= 1


def test_validation_split_is_deduplicated_stratified_and_seeded(synthetic_dataset, tmp_path):
    root = _copy(synthetic_dataset, tmp_path / "ds")
    folder = tmp_path / "ds/train/infected/covid"
    first = sorted(os.listdir(folder))[0]
    for i in range(3):  # a group of byte-identical files, like the real train split's
        shutil.copy(folder / first, folder / f"copy{i}.jpg")
    train = [s for s in data.find_samples(root) if s.split == "train"]
    assert len(data.deduplicate(train)) == 30
    kept, held = data.carve_validation(train, fraction=0.3, seed=1)
    assert len(kept) + len(held) == 30
    assert Counter(s.label for s in held) == {c: 3 for c in CLASSES}
    digests = {data.file_digest(s.path) for s in held}
    assert not digests & {data.file_digest(s.path) for s in kept}
    assert data.carve_validation(train, 0.3, seed=1) == (kept, held)
    assert data.carve_validation(train, 0.3, seed=2)[1] != held
    with pytest.raises(ValueError, match="val_fraction=1.5"):
        data.carve_validation(train, 1.5)


def test_task_labels(synthetic_dataset):
    samples = [s for s in data.find_samples(synthetic_dataset) if s.split == "train"]
    paths, y = data.task_arrays(samples, "infected")
    assert len(paths) == 30 and y.tolist().count(0) == 10 and y.tolist().count(1) == 20
    paths, y = data.task_arrays(samples, "covid")
    assert len(paths) == 20 and all("normal" not in p for p in paths)
    assert [int("/covid/" in p) for p in paths] == y.tolist()
    paths, y = data.task_arrays(samples, "covid", covid_negatives="all")  # normal X-rays count as not covid
    assert len(paths) == 30 and [int("/covid/" in p) for p in paths] == y.tolist() and y.tolist().count(1) == 10
    paths, y = data.task_arrays(samples, "three-class")
    assert sorted(Counter(y.tolist()).items()) == [(0, 10), (1, 10), (2, 10)]
    with pytest.raises(ValueError, match="'pneumonia'"):
        data.task_arrays(samples, "pneumonia")


def test_pipeline_shapes_labels_and_determinism(synthetic_dataset):
    from cxrkeras.augment import study_augmentation

    samples = [s for s in data.find_samples(synthetic_dataset) if s.split == "train"]
    paths, y = data.task_arrays(samples, "covid")

    def batches(seed):
        ds = data.make_dataset(paths, y, "covid", 8, shuffle=True, seed=seed, augmenter=study_augmentation(seed))
        return [(x.numpy(), t.numpy()) for x, t in ds]

    a, b, c = batches(3), batches(3), batches(4)
    assert [x.shape for x, _ in a] == [(8, 150, 150, 1), (8, 150, 150, 1), (4, 150, 150, 1)]
    assert a[0][1].shape == (8, 1) and a[0][1].dtype == np.float32
    assert all(np.array_equal(x1, x2) and np.array_equal(t1, t2) for (x1, t1), (x2, t2) in zip(a, b))
    assert not np.array_equal(a[0][0], c[0][0])
    assert sorted(np.concatenate([t for _, t in a]).ravel().tolist()) == sorted(y.tolist())
    ds3 = data.make_dataset(*data.task_arrays(samples, "three-class"), "three-class", 4)
    _, t = next(iter(ds3))
    assert t.dtype.name == "int32" and t.shape == (4,)


def test_real_dataset_counts(real_dataset):
    samples = [s for s in data.find_samples(real_dataset) if s.split == "train"]
    counts = data.class_counts(samples)["train"]
    assert counts == {"normal": 1341, "non-covid": 2530, "covid": 1345}
    assert data.class_counts(data.deduplicate(samples))["train"] == {"normal": 1340, "non-covid": 2512, "covid": 1338}
