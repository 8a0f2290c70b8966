"""Datasets: find images, check them, deduplicate, split, and feed them through tf.data.

Path of a batch: files -> `find_samples` (folder layout or CSV manifest) ->
`check_samples` (drops, and lists with the reason, every file that training's
own decoder would not read: `images.check_image`; DICOM files read through
`cxrkeras.dicom`) -> `carve_validation` (dedupe,
stratified, seeded; every class must be there) -> `task_arrays` (labels for
one task) -> `make_dataset` (decode with `cxrkeras.images`, cache, shuffle,
batch, augment, prefetch).
"""

import csv
import hashlib
import os
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from cxrkeras.config import CLASSES, IMAGE_SIZE, TASKS, VAL_FRACTION, check_task
from cxrkeras.images import (
    HEAD_BYTES,
    CheckCache,
    DatasetError,
    check_image,
    decode_image,
    max_pixels,
    read_image,
    sniff_format,
    training_decoder,
)

SPLITS = ("train", "val", "test")
CLASS_DIRS = {"normal": "normal", "non-covid": "infected/non-covid", "covid": "infected/covid"}
EXPECTED_LAYOUT = """expected layout:
  DIR/train/normal/*.jpg|png|bmp|gif|dcm
  DIR/train/infected/non-covid/*.jpg|png|bmp|gif|dcm
  DIR/train/infected/covid/*.jpg|png|bmp|gif|dcm
  (and the same under DIR/val/ and DIR/test/ where those splits exist)
or a CSV manifest with columns path,label[,split] (label: normal, non-covid or covid)"""


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
        where = printable(self.path)
        return self.reason if self.reason.startswith(where) else f"{where}: {self.reason}"  # named once


def printable(path):
    """`path` for messages and reports: bytes that are not UTF-8 shown as \\xNN escapes."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


# ---------------------------------------------------------------- finding files


def find_samples(source, splits=None):
    """Every entry under `source`: a folder in the study's layout or a CSV manifest.

    `splits` limits the folder splits that must exist (default: those present,
    `train` required). Each entry of a class folder becomes a Sample, whatever
    it is: `check_samples` then tells the images from the rest. Raises
    DatasetError naming the missing path.
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
            names = sorted(os.listdir(folder))
            if not names:
                raise DatasetError(f"{folder}: empty class folder (no images).\n{EXPECTED_LAYOUT}")
            samples += [Sample(os.path.join(folder, n), label, split) for n in names]
    return samples


def read_manifest(path):
    """Samples from a CSV with a header `path,label[,split]`; relative paths are relative to the CSV."""
    rows = _manifest_rows(path)
    if not rows or not {"path", "label"} <= set(rows[0]):
        raise DatasetError(f"{path}: a manifest needs a header with columns path,label[,split].")
    root = os.path.dirname(os.path.abspath(path))
    samples = []
    for line, row in enumerate(rows, start=2):
        for column in ("path", "label"):
            if not (row.get(column) or "").strip():
                raise DatasetError(f"{path}:{line}: missing {column!r} cell; expected path,label[,split].")
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


def _manifest_rows(path):
    with open(path, "rb") as f:
        kind = sniff_format(f.read(HEAD_BYTES))
    if kind is not None:
        raise DatasetError(f"{path}: a {kind} image; expected a dataset folder or a CSV manifest.\n{EXPECTED_LAYOUT}")
    try:
        with open(path, newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f))
    except (UnicodeDecodeError, csv.Error) as e:
        raise DatasetError(f"{path}: not a CSV manifest ({e}).\n{EXPECTED_LAYOUT}") from None


# ---------------------------------------------------------------- checking files


def check_samples(samples, limit=None):
    """(good samples, problems): each file training cannot read is a Problem naming it and why.

    Verdicts are remembered by path, size and modification time (see
    `CheckCache`), so checking a dataset again only reads what changed.
    """
    limit = limit or max_pixels()
    cache = CheckCache.for_samples(samples, limit)
    good, problems = [], []
    for s in samples:
        reason = cache.verdict(s.path, lambda path: check_image(path, limit))
        if reason:
            problems.append(Problem(s.path, reason))
        else:
            good.append(s)
    cache.save()
    return good, problems


def class_problems(good, source):
    """A Problem for each class with no readable train image (training needs every class)."""
    have = {s.label for s in good if s.split == "train"}
    return [
        Problem(os.fspath(source), f"no readable train images of class {label!r}")
        for label in CLASSES
        if label not in have
    ]


def check_dataset(source, limit=None):
    """(readable samples, problems): layout errors, files training cannot read, classes left empty."""
    try:
        samples = find_samples(source)
    except DatasetError as e:
        return [], [Problem(os.fspath(source), str(e))]
    good, problems = check_samples(samples, limit)
    return good, problems + class_problems(good, source)


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


def carve_validation(train, fraction=VAL_FRACTION, seed=0, name="validation"):
    """(train, validation) from the train samples: duplicates removed, stratified by class, seeded.

    `name` is the carved split's name in errors ("validation" or "holdout").
    """
    option = {"validation": "val_fraction"}.get(name, f"{name}_fraction")
    if not 0 < fraction < 1:
        raise ValueError(f"`{option}` must be in (0, 1). Received: {option}={fraction}")
    rng = np.random.default_rng(seed)
    unique = deduplicate(train)
    keep, held = [], []
    for label in CLASSES:
        group = [s for s in unique if s.label == label]
        order = rng.permutation(len(group))
        n_val = int(round(fraction * len(group)))
        if not group:
            raise DatasetError(f"no readable train images of class {label!r}.")
        if n_val == 0 or n_val == len(group):
            raise DatasetError(
                f"class {label!r} has {len(group)} readable, distinct train image(s): too few to carve a "
                f"{name} split of {fraction} (at least {_fewest_to_split(fraction)} needed)."
            )
        held += [group[i] for i in sorted(order[:n_val])]
        keep += [group[i] for i in sorted(order[n_val:])]
    return keep, held


def carve_holdout(train, fraction=0.0, seed=0):
    """(rest, holdout) from the train samples, carved like validation; ([deduplicated train], []) for fraction 0.

    The holdout is carved first and validation from the rest, so no run trains
    on it or picks epochs on it; its own `seed` (DataConfig.holdout_seed) keeps
    it the same for runs of different seeds, so an ensemble of them can be
    tuned on it.
    """
    if fraction == 0:
        return train, []
    return carve_validation(train, fraction, seed, name="holdout")


def _fewest_to_split(fraction):
    n = 2
    while not 0 < round(fraction * n) < n:
        n += 1
    return n


def task_arrays(samples, task, covid_negatives="non-covid"):
    """(paths, labels) for `task`, labels as class indices; covid keeps infected images only unless
    `covid_negatives` is "all" (normal images then count as not covid)."""
    check_task(task)
    if task == "covid" and covid_negatives != "all":
        samples = [s for s in samples if s.label != "normal"]
    if task == "infected":
        labels = [int(s.label != "normal") for s in samples]
    elif task == "covid":
        labels = [int(s.label == "covid") for s in samples]
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
    holdout: list = field(default_factory=list)  # carved from train before validation (empty: none asked)

    def get(self, name):
        if name not in SPLIT_NAMES:
            raise ValueError(f"Unknown split {name!r}; expected one of {list(SPLIT_NAMES)}.")
        return getattr(self, name)


SPLIT_NAMES = ("train", "validation", "holdout", "val", "test")


def load_splits(source, val_fraction=VAL_FRACTION, seed=0, holdout_fraction=0.0, holdout_seed=0):
    """Find, check and split a dataset. Files that do not decode are left out and listed in `problems`.

    The release's train/ becomes holdout (`holdout_fraction` of it, seeded by
    `holdout_seed`; none for 0), then validation (`val_fraction` of the rest)
    and train; all three carved by `carve_validation`, so they are disjoint.
    """
    good, problems = check_samples(find_samples(source))
    try:
        rest, holdout = carve_holdout([s for s in good if s.split == "train"], holdout_fraction, holdout_seed)
        train, validation = carve_validation(rest, val_fraction, seed)
    except DatasetError as e:
        skipped = f" {len(problems)} file(s) were skipped as unreadable: see `cxrkeras data check`." if problems else ""
        raise DatasetError(f"{os.fspath(source)}: {e}{skipped}") from None
    by_split = {sp: [s for s in good if s.split == sp] for sp in ("val", "test")}
    return Splits(train, validation, by_split["val"], by_split["test"], problems, holdout)


# ---------------------------------------------------------------- tf.data


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
    labels = label_array(labels, task)
    ds = tf.data.Dataset.from_tensor_slices((list(paths), labels))
    ds = ds.map(lambda p, y: (decode_image(read_image(p), image_size), y), num_parallel_calls=tf.data.AUTOTUNE)
    if cache:
        ds = ds.cache()
    if shuffle:
        ds = ds.shuffle(len(paths), seed=seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size)
    if augmenter is not None:
        # One call at a time: the augmenter's seed state advances in order, so runs repeat exactly.
        ds = ds.map(lambda x, y: (augmenter(x, training=True), y), num_parallel_calls=1)
    return ds.prefetch(tf.data.AUTOTUNE)


def label_array(labels, task):
    """Labels as a model is fitted on them: float32 [N, 1] for the binary tasks, int32 [N] for three-class."""
    labels = np.asarray(labels)
    return labels.astype("float32")[:, None] if task != "three-class" else labels.astype("int32")


def load_images(paths, image_size=IMAGE_SIZE):
    """Decode files (images or DICOM) into one [N, size, size, 1] float32 array (evaluation, plots, prediction).

    With `training_decoder`: TensorFlow's ops (`read_image`, `decode_image`), or
    `cxrkeras.arrays` (Pillow and numpy, no TensorFlow).
    """
    if training_decoder() == "pillow":
        from cxrkeras import arrays

        return arrays.load_arrays(list(paths), image_size, cache=False)
    return np.stack([decode_image(read_image(p), image_size).numpy() for p in paths])
