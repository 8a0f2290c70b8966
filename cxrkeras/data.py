"""Datasets: find images, check them, deduplicate, split, and feed them through tf.data.

Path of a batch: files -> `find_samples` (folder layout or CSV manifest) ->
`check_samples` (drops files that do not decode) -> `carve_validation` (dedupe,
stratified, seeded) -> `task_arrays` (labels for one task) -> `make_dataset`
(decode, cache, shuffle, batch, augment, prefetch).
"""

import csv
import hashlib
import os
from collections import Counter
from dataclasses import dataclass

import numpy as np
from PIL import Image

from cxrkeras.config import CLASSES, IMAGE_SIZE, TASKS, check_task

SPLITS = ("train", "val", "test")
CLASS_DIRS = {"normal": "normal", "non-covid": "infected/non-covid", "covid": "infected/covid"}
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
EXPECTED_LAYOUT = """expected layout:
  DIR/train/normal/*.jpg|png
  DIR/train/infected/non-covid/*.jpg|png
  DIR/train/infected/covid/*.jpg|png
  (and the same under DIR/val/ and DIR/test/ where those splits exist)
or a CSV manifest with columns path,label[,split] (label: normal, non-covid or covid)"""


class DatasetError(Exception):
    """A dataset that cannot be used as given: the message names the path and what was expected."""


@dataclass(frozen=True)
class Sample:
    path: str
    label: str  # one of CLASSES
    split: str  # train, val or test


@dataclass(frozen=True)
class Problem:
    path: str
    reason: str

    def __str__(self):
        return f"{self.path}: {self.reason}"


# ---------------------------------------------------------------- finding files


def find_samples(source, splits=None):
    """All images under `source`: a folder in the study's layout or a CSV manifest.

    `splits` limits the folder splits that must exist (default: those present,
    `train` required). Raises DatasetError naming the missing path.
    """
    source = os.fspath(source)
    if os.path.isfile(source):
        return read_manifest(source)
    if not os.path.isdir(source):
        raise DatasetError(f"{source}: no such folder or manifest.\n{EXPECTED_LAYOUT}")
    if splits is None:
        splits = [s for s in SPLITS if os.path.isdir(os.path.join(source, s))]
        if "train" not in splits:
            raise DatasetError(f"{os.path.join(source, 'train')}: missing split folder.\n{EXPECTED_LAYOUT}")
    samples = []
    for split in splits:
        for label, sub in CLASS_DIRS.items():
            folder = os.path.join(source, split, sub)
            if not os.path.isdir(folder):
                raise DatasetError(f"{folder}: missing class folder.\n{EXPECTED_LAYOUT}")
            names = sorted(n for n in os.listdir(folder) if os.path.isfile(os.path.join(folder, n)))
            if not names:
                raise DatasetError(f"{folder}: empty class folder (no images).\n{EXPECTED_LAYOUT}")
            samples += [Sample(os.path.join(folder, n), label, split) for n in names]
    return samples


def read_manifest(path):
    """Samples from a CSV with a header `path,label[,split]`; relative paths are relative to the CSV."""
    root = os.path.dirname(os.path.abspath(path))
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or not {"path", "label"} <= set(rows[0]):
        raise DatasetError(f"{path}: a manifest needs a header with columns path,label[,split].")
    samples = []
    for line, row in enumerate(rows, start=2):
        label, split = row["label"].strip(), (row.get("split") or "train").strip()
        if label not in CLASSES:
            raise DatasetError(f"{path}:{line}: label {label!r}; expected one of {list(CLASSES)}.")
        if split not in SPLITS:
            raise DatasetError(f"{path}:{line}: split {split!r}; expected one of {list(SPLITS)}.")
        samples.append(Sample(os.path.join(root, row["path"].strip()), label, split))
    missing = [lab for lab in CLASSES if not any(s.label == lab and s.split == "train" for s in samples)]
    if missing:
        raise DatasetError(f"{path}: no train images of class {missing}.")
    return samples


# ---------------------------------------------------------------- checking files


def check_image(path):
    """None when `path` decodes as a JPEG or PNG image, else the reason it does not."""
    if not path.lower().endswith(IMAGE_EXTENSIONS):
        return "not a .jpg, .jpeg or .png file"
    try:
        if os.path.getsize(path) == 0:
            return "empty file (0 bytes)"
        with Image.open(path) as im:
            if im.format not in ("JPEG", "PNG"):
                return f"{im.format} image; expected JPEG or PNG"
            im.load()
    except OSError as e:  # PIL raises UnidentifiedImageError / OSError for bad data
        return f"does not decode as an image ({e})"
    return None


def check_samples(samples):
    """(good samples, problems): every file that does not decode is a Problem naming it and why."""
    good, problems = [], []
    for s in samples:
        reason = check_image(s.path)
        if reason:
            problems.append(Problem(s.path, reason))
        else:
            good.append(s)
    return good, problems


def check_dataset(source):
    """Every problem of a dataset: layout errors and files that do not decode."""
    try:
        samples = find_samples(source)
    except DatasetError as e:
        return [], [Problem(os.fspath(source), str(e))]
    return check_samples(samples)


# ---------------------------------------------------------------- splitting


def file_digest(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def deduplicate(samples):
    """Samples with byte-identical files dropped (the first of each group kept)."""
    seen, kept = set(), []
    for s in samples:
        digest = file_digest(s.path)
        if digest not in seen:
            seen.add(digest)
            kept.append(s)
    return kept


def carve_validation(train, fraction=0.15, seed=0):
    """(train, validation) from the train samples: duplicates removed, stratified by class, seeded."""
    if not 0 < fraction < 1:
        raise ValueError(f"`val_fraction` must be in (0, 1). Received: val_fraction={fraction}")
    rng = np.random.default_rng(seed)
    unique = deduplicate(train)
    keep, held = [], []
    for label in CLASSES:
        group = [s for s in unique if s.label == label]
        order = rng.permutation(len(group))
        n_val = int(round(fraction * len(group)))
        held += [group[i] for i in sorted(order[:n_val])]
        keep += [group[i] for i in sorted(order[n_val:])]
    return keep, held


def task_arrays(samples, task):
    """(paths, labels) for `task`: covid keeps infected images only; labels are class indices."""
    check_task(task)
    if task == "covid":
        samples = [s for s in samples if s.label != "normal"]
    if task == "infected":
        labels = [int(s.label != "normal") for s in samples]
    else:
        labels = [TASKS[task].index(s.label) for s in samples]
    return [s.path for s in samples], np.asarray(labels, dtype="int32")


def fingerprint(samples):
    """A short hash of which files, with which labels and sizes, a run used."""
    h = hashlib.sha256()
    for s in sorted(samples, key=lambda s: s.path):
        h.update(f"{os.path.basename(s.path)}|{s.label}|{s.split}|{os.path.getsize(s.path)}\n".encode())
    return h.hexdigest()[:16]


def class_counts(samples):
    """{split: {class: n}} in CLASSES order."""
    counts = Counter((s.split, s.label) for s in samples)
    splits = [sp for sp in SPLITS if any(s.split == sp for s in samples)]
    return {sp: {c: counts[(sp, c)] for c in CLASSES} for sp in splits}


@dataclass
class Splits:
    """Everything a training or evaluation run reads, for one task."""

    train: list
    validation: list  # carved from train
    val: list  # the release's own small val/ folder (the study's 25-image grid)
    test: list
    problems: list  # files skipped because they do not decode

    def get(self, name):
        if name not in ("train", "validation", "val", "test"):
            raise ValueError(f"Unknown split {name!r}; expected train, validation, val or test.")
        return getattr(self, name)


def load_splits(source, val_fraction=0.15, seed=0):
    """Find, check and split a dataset. Files that do not decode are left out and listed in `problems`."""
    good, problems = check_samples(find_samples(source))
    train, validation = carve_validation([s for s in good if s.split == "train"], val_fraction, seed)
    by_split = {sp: [s for s in good if s.split == sp] for sp in ("val", "test")}
    return Splits(train, validation, by_split["val"], by_split["test"], problems)


# ---------------------------------------------------------------- tf.data


def decode_image(contents, image_size=IMAGE_SIZE):
    """Encoded JPEG/PNG bytes (8- or 16-bit; gray, RGB or RGBA; any size) -> [size, size, 1] float32 in [0, 1].

    Plain TensorFlow ops, so the same function runs in tf.data and inside an exported SavedModel.
    """
    import tensorflow as tf

    image = tf.io.decode_image(contents, channels=0, dtype=tf.float32, expand_animations=False)
    channels = tf.shape(image)[-1]
    image = tf.cond(channels >= 3, lambda: tf.image.rgb_to_grayscale(image[..., :3]), lambda: image[..., :1])
    image = tf.image.resize(image, (image_size, image_size), antialias=True)
    image.set_shape((image_size, image_size, 1))
    return tf.clip_by_value(image, 0.0, 1.0)


def make_dataset(
    paths, labels, task, batch_size=64, shuffle=False, seed=0, augmenter=None, cache=True, image_size=IMAGE_SIZE
):
    """A tf.data pipeline of (images [B, size, size, 1] float32, labels).

    Labels are float32 [B, 1] for the binary tasks and int32 [B] for three-class.
    Decoded images are cached in memory; `augmenter` (a Keras layer) runs on
    whole batches after batching, with its own seeded state, so the stream is
    deterministic for a seed.
    """
    import tensorflow as tf

    if len(paths) == 0:
        raise DatasetError(f"no images for task {task!r} in this split.")
    labels = np.asarray(labels)
    labels = labels.astype("float32")[:, None] if task != "three-class" else labels.astype("int32")
    ds = tf.data.Dataset.from_tensor_slices((list(paths), labels))
    ds = ds.map(lambda p, y: (decode_image(tf.io.read_file(p), image_size), y), num_parallel_calls=tf.data.AUTOTUNE)
    if cache:
        ds = ds.cache()
    if shuffle:
        ds = ds.shuffle(len(paths), seed=seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size)
    if augmenter is not None:
        # One call at a time: the augmenter's seed state advances in order, so runs repeat exactly.
        ds = ds.map(lambda x, y: (augmenter(x, training=True), y), num_parallel_calls=1)
    return ds.prefetch(tf.data.AUTOTUNE)


def load_images(paths, image_size=IMAGE_SIZE):
    """Decode files into one [N, size, size, 1] float32 array (for plots and prediction)."""
    import tensorflow as tf

    return np.stack([decode_image(tf.io.read_file(p), image_size).numpy() for p in paths])
