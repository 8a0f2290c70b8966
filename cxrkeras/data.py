"""Datasets: find images, check them, deduplicate, split, and feed them through tf.data.

Path of a batch: files -> `find_samples` (folder layout or CSV manifest) ->
`check_samples` (drops, and lists with the reason, every file that training's
own decoder would not read: `check_image`; DICOM files read through
`cxrkeras.dicom`) -> `carve_validation` (dedupe,
stratified, seeded; every class must be there) -> `task_arrays` (labels for
one task) -> `make_dataset` (decode, cache, shuffle, batch, augment, prefetch).
"""

import csv
import hashlib
import io
import json
import os
import re
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from cxrkeras import dicom
from cxrkeras.config import CLASSES, DEFAULT_MAX_PIXELS, IMAGE_SIZE, MAX_PIXELS_ENV, TASKS, check_task

SPLITS = ("train", "val", "test")
CLASS_DIRS = {"normal": "normal", "non-covid": "infected/non-covid", "covid": "infected/covid"}
EXPECTED_LAYOUT = """expected layout:
  DIR/train/normal/*.jpg|png|bmp|gif|dcm
  DIR/train/infected/non-covid/*.jpg|png|bmp|gif|dcm
  DIR/train/infected/covid/*.jpg|png|bmp|gif|dcm
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
        where = printable(self.path)
        return self.reason if self.reason.startswith(where) else f"{where}: {self.reason}"  # named once


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
#
# One judge of image bytes, for files and the server's requests alike:
# `image_problem` decides the format by content (leading bytes), reads the
# declared size from the header (Pillow's readers, or pydicom's for DICOM;
# nothing decoded) against a pixel limit, then decodes with `decode_pixels`,
# the very function training and export use (a DICOM first becomes a 16-bit
# PNG, `cxrkeras.dicom.to_png`). `check_image` adds what only a file has
# (its name, its kind, its length). A new format is one more entry in
# IMAGE_FORMATS and in `declared_size`'s readers (and, if TensorFlow cannot
# decode it, a conversion in `encoded_image`, as DICOM has).

IMAGE_FORMATS = {  # leading bytes -> format; those tf.io.decode_image reads with a float dtype
    b"\xff\xd8\xff": "JPEG",
    b"\x89PNG\r\n\x1a\n": "PNG",
    b"GIF87a": "GIF",
    b"GIF89a": "GIF",
    b"BM": "BMP",
}
DICOM = "DICOM"  # read in Python (cxrkeras.dicom), then decoded as the 16-bit PNG it becomes
FORMAT_NAMES = "JPEG, PNG, BMP, GIF or DICOM"
HEAD_BYTES = dicom.PREAMBLE + len(dicom.PREFIX)  # enough to tell every format apart
PIXELS_OPTION = f"--max-pixels or ${MAX_PIXELS_ENV}"  # how a command raises the limit
CACHE_ENV = "CXRKERAS_CACHE_DIR"
CHECK_VERSION = 2  # bump when `check_image` changes what it accepts: cached verdicts are then redone


def sniff_format(head, name=""):
    """The image format of data whose first HEAD_BYTES bytes are `head`, or None.

    Judged by content; `name` counts only for DICOM, whose files may lack the
    preamble and its "DICM" prefix: a `.dcm` file that is no other format.
    """
    for magic, kind in IMAGE_FORMATS.items():
        if head.startswith(magic):
            return kind
    return DICOM if dicom.is_dicom(head, name) else None


def max_pixels():
    """The pixel limit: $CXRKERAS_MAX_PIXELS (`cxrkeras --max-pixels`), else DEFAULT_MAX_PIXELS."""
    value = os.environ.get(MAX_PIXELS_ENV, "").strip()
    if not value:
        return DEFAULT_MAX_PIXELS
    if not value.isdigit() or int(value) < 1:
        raise DatasetError(f"${MAX_PIXELS_ENV}={value!r}: expected a positive whole number of pixels.")
    return int(value)


def printable(path):
    """`path` for messages and reports: bytes that are not UTF-8 shown as \\xNN escapes."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def declared_size(file, kind):
    """(width, height) from the header of a `kind` image in an open binary `file`, nothing decoded.

    The format's Pillow reader is called directly: `Image.open` would first
    apply Pillow's own decompression-bomb limit, and ours is the one that
    applies here. A DICOM's Rows and Columns come from pydicom, read up to its
    pixel data; it raises DicomError for a DICOM cxrkeras does not read.
    """
    from PIL import BmpImagePlugin, GifImagePlugin, JpegImagePlugin, PngImagePlugin

    if kind == DICOM:
        return dicom.declared_size(file)
    readers = {
        "JPEG": JpegImagePlugin.JpegImageFile,
        "PNG": PngImagePlugin.PngImageFile,
        "GIF": GifImagePlugin.GifImageFile,
        "BMP": BmpImagePlugin.BmpImageFile,
    }
    file.seek(0)
    return readers[kind](file).size


def image_problem(file, limit, name="", limit_option=PIXELS_OPTION, decode=True):
    """(format, None) when the image in the open binary `file` reads, else (format or None, why not).

    By content (`sniff_format`; `name` only for a `.dcm` DICOM), then the size
    its header declares against `limit` pixels (`limit_option` says how to
    raise it), then, if `decode`, the decoder training uses. The server
    passes decode=False: its graph decodes with the same `decode_pixels` and
    its error names the image.
    """
    file.seek(0)
    head = file.read(HEAD_BYTES)
    if not head:
        return None, "empty (0 bytes)"
    kind = sniff_format(head, name)
    if kind is None:
        return None, f"not an image: {FORMAT_NAMES} expected (judged by content, not by name)"
    try:
        width, height = declared_size(file, kind)
    except dicom.DicomError as e:
        return kind, str(e)
    except (SyntaxError, ValueError, OSError) as e:  # Pillow's readers raise SyntaxError for a bad header
        return kind, f"does not decode as {kind} (its header: {e})"
    if width * height > limit:
        return kind, (
            f"{kind} declares {width}x{height} = {width * height:,} pixels, over the limit of {limit:,} "
            f"(raise it with {limit_option})"
        )
    if not decode:
        return kind, None
    file.seek(0)
    return kind, decode_problem(file.read(), kind)


def check_image(path, limit=None):
    """None when training can read the image file at `path`, else the reason it cannot.

    Accepts what `decode_pixels` decodes (JPEG, PNG, BMP, GIF's first frame;
    8 or 16 bits; gray, RGB, RGBA or CMYK) and the DICOM files
    `cxrkeras.dicom` reads (single-frame grayscale), from 1x1 up to `limit`
    pixels (default: `max_pixels()`), judged by content, not by the file's name.
    """
    limit = limit or max_pixels()
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return "file name is not valid UTF-8 (TensorFlow cannot open it): rename the file"
    if not os.path.isfile(path):
        if os.path.isdir(path):
            return "a folder, not an image file"
        return "not a regular file" if os.path.exists(path) else "no such file"
    try:
        with open(path, "rb") as f:
            if not f.read(1):
                return "empty file (0 bytes)"
            return image_problem(f, limit, name=path)[1]
    except OSError as e:
        return f"cannot be read ({e.strerror or e})"


def decode_problem(contents, kind):
    """None when training's decoder (`training_decoder`) reads `contents` (a DICOM: once made a PNG), else the reason."""
    try:
        contents = encoded_image(contents, kind)
    except dicom.DicomError as e:
        return str(e)
    if training_decoder() == "pillow":
        from cxrkeras import arrays

        try:
            shape = arrays.decode_pixels(contents).shape
        except ValueError as e:
            return f"does not decode as {kind} ({e})"
        return None if shape[0] >= 1 and shape[1] >= 1 else f"{kind} decodes to an empty {shape[0]}x{shape[1]} image"
    import tensorflow as tf

    try:
        shape = decode_pixels(tf.constant(contents)).shape
    except tf.errors.OpError as e:
        return f"does not decode as {kind} ({_op_message(e)})"
    if shape[0] < 1 or shape[1] < 1:
        return f"{kind} decodes to an empty {shape[0]}x{shape[1]} image"
    return None


def training_decoder():
    """"tensorflow" under Keras' TensorFlow backend (tf.data reads the files), else "pillow" (`cxrkeras.arrays`)."""
    import keras

    return "tensorflow" if keras.backend.backend() == "tensorflow" else "pillow"


def encoded_image(contents, kind=None, name=""):
    """`contents` as bytes that `decode_image` reads: an image as it is, a DICOM as a 16-bit PNG.

    `kind` is the format if known (else sniffed, `name` telling a `.dcm`
    DICOM). Raises DicomError for a DICOM that does not read.
    """
    kind = kind or sniff_format(contents[:HEAD_BYTES], name)
    return dicom.to_png(io.BytesIO(contents)) if kind == DICOM else contents


def _op_message(error):
    """TensorFlow's error message without its op and device decorations."""
    text = error.message.splitlines()[0] if error.message else type(error).__name__
    text = re.sub(r"^\{\{[^}]*\}\}\s*", "", text)
    return re.sub(r"\s*\[Op:\w+\].*$", "", text)


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


class CheckCache:
    """Verdicts of `check_image`, by path, size and modification time, in a JSON file per dataset.

    The file lives in $CXRKERAS_CACHE_DIR (default ~/.cache/cxrkeras) and is
    named after the folder holding the samples; it is kept only for the same
    pixel limit, check version, TensorFlow version and DICOM decoders. A
    cache that cannot be read or written is ignored: it only saves time.
    """

    def __init__(self, path, stamp):
        self.path, self.stamp = path, stamp
        self.entries, self.used, self.changed = {}, {}, False
        try:
            with open(path, encoding="utf-8") as f:
                stored = json.load(f)
            if stored.get("stamp") == stamp:
                self.entries = stored["files"]
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            pass

    @classmethod
    def for_samples(cls, samples, limit):
        folders = [os.path.dirname(os.path.abspath(s.path)) for s in samples]
        root = os.path.commonpath(folders) if folders else ""
        name = hashlib.sha256(os.fsencode(root)).hexdigest()[:16]
        decoder = training_decoder()
        version = _tensorflow_version() if decoder == "tensorflow" else _pillow_version()
        stamp = f"check {CHECK_VERSION}; max_pixels {limit}; {decoder} {version}; {dicom.decoders_stamp()}"
        return cls(os.path.join(cache_dir(), f"checked-{name}.json"), stamp)

    def verdict(self, path, check):
        """The cached reason (or None) for `path` if it is unchanged, else `check(path)` remembered."""
        try:
            st = os.stat(path)
        except OSError:
            return check(path)
        key, stat = os.path.abspath(path), [st.st_size, st.st_mtime_ns]
        entry = self.entries.get(key)
        if isinstance(entry, list) and len(entry) == 3 and entry[:2] == stat:
            self.used[key] = entry
            return entry[2]
        reason = check(path)
        self.used[key] = stat + [reason]
        self.changed = True
        return reason

    def save(self):
        if not self.changed and len(self.used) == len(self.entries):
            return
        from cxrkeras.files import write_json_atomic

        try:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            write_json_atomic(self.path, {"stamp": self.stamp, "files": self.used})
        except OSError:
            pass


def cache_dir():
    """Where cxrkeras keeps what only saves time (checked files, decoded arrays): $CXRKERAS_CACHE_DIR or ~/.cache/cxrkeras."""
    return os.environ.get(CACHE_ENV) or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "cxrkeras"
    )


def _pillow_version():
    import PIL

    return PIL.__version__


def _tensorflow_version():
    import importlib.metadata

    for name in ("tensorflow-cpu", "tensorflow"):
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return "unknown"


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


def carve_validation(train, fraction=0.15, seed=0, name="validation"):
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


def load_splits(source, val_fraction=0.15, seed=0, holdout_fraction=0.0, holdout_seed=0):
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


def read_image(path):
    """The file at `path` (a string tensor) as bytes `decode_image` reads: TensorFlow ops, for tf.data and eager code.

    JPEG, PNG, BMP and GIF stay in TensorFlow (`tf.io.read_file`); a file
    with DICOM's prefix or a `.dcm` name goes through `encoded_image` in
    Python (a `tf.numpy_function`) and comes back as the 16-bit PNG of its
    pixels, so every command sees a DICOM the same way.
    """
    import tensorflow as tf

    path = tf.convert_to_tensor(path, tf.string)
    contents = tf.io.read_file(path)
    prefix_at = tf.minimum(dicom.PREAMBLE, tf.strings.length(contents))
    maybe_dicom = tf.logical_or(
        tf.strings.substr(contents, prefix_at, len(dicom.PREFIX)) == dicom.PREFIX,
        tf.strings.regex_full_match(tf.strings.lower(path), r".*\.dcm"),
    )

    def convert(contents, path):  # numpy scalars (or bytes, in a graph) in, bytes out
        return encoded_image(np.asarray(contents).item(), name=np.asarray(path).item().decode())

    def in_python():
        return tf.reshape(tf.numpy_function(convert, [contents, path], tf.string, stateful=False), [])

    return tf.cond(maybe_dicom, in_python, lambda: contents)


def decode_pixels(contents):
    """Encoded image bytes -> [height, width, channels] float32 in [0, 1]: how training reads a file.

    JPEG (also CMYK, which TensorFlow's libjpeg turns into RGB), PNG (8 or 16
    bits), BMP and GIF (its first frame). Every command decodes here, so a
    file gives the same pixels in tf.data, the SavedModel, `predict` and
    `serve`; a JPEG's are Pillow's too. `check_image` runs this on every
    file before training, so a file that fails here is skipped, never met
    mid-epoch.
    """
    import tensorflow as tf

    def jpeg():  # libjpeg's accurate integer IDCT, Pillow's: the same bytes (TensorFlow's default: up to 3 levels off)
        return tf.image.convert_image_dtype(tf.io.decode_jpeg(contents, dct_method="INTEGER_ACCURATE"), tf.float32)

    def other():
        return tf.io.decode_image(contents, channels=0, dtype=tf.float32, expand_animations=False)

    return tf.cond(tf.io.is_jpeg(contents), jpeg, other)


def decode_image(contents, image_size=IMAGE_SIZE):
    """Encoded image bytes (any size; gray, gray+alpha, RGB or RGBA) -> [size, size, 1] float32 in [0, 1].

    Plain TensorFlow ops, so the same function runs in tf.data and inside an exported SavedModel.
    """
    return gray_resized(decode_pixels(contents), image_size)


def gray_resized(image, image_size=IMAGE_SIZE):
    """Decoded pixels [height, width, channels] float32 in [0, 1] -> the model's [size, size, 1] gray image."""
    import tensorflow as tf

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
