"""Image admission: one judge of image bytes and files, and the decoders every command reads pixels with.

Training's files, `predict`'s and the server's requests all pass here (the
server imports this module, never `cxrkeras.data`). `image_problem` decides
the format by content (leading bytes), reads the declared size from the
header (Pillow's readers, or pydicom's for DICOM; nothing decoded) against a
pixel limit, then decodes with `decode_pixels`, the very function training
and export use (a DICOM first becomes a 16-bit PNG, `cxrkeras.dicom.to_png`).
`check_image` adds what only a file has (its name, its kind, its length);
`CheckCache` remembers its verdicts. A new format is one more entry in
IMAGE_FORMATS and in `declared_size`'s readers (and, if TensorFlow cannot
decode it, a conversion in `encoded_image`, as DICOM has).

Decoding: `read_image` (a file as bytes TensorFlow decodes) -> `decode_pixels`
-> `gray_resized` (the model's square gray input), all TensorFlow ops, so they
run in tf.data and inside an exported graph; `pillow_pixels` is the same
decode in Python for Keras' other backends (`cxrkeras.arrays`). Importing this
module imports neither TensorFlow nor Keras.
"""

import hashlib
import io
import json
import os
import re

import numpy as np

from cxrkeras import dicom
from cxrkeras.config import DEFAULT_MAX_PIXELS, IMAGE_SIZE, MAX_PIXELS_ENV


class DatasetError(Exception):
    """Images or a dataset that cannot be used as given: the message names the path and what was expected."""


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
        try:
            shape = pillow_pixels(contents).shape
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


# ---------------------------------------------------------------- decoding


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


# How every path decodes a JPEG, for model cards: tf.data and the SavedModel here, Pillow in arrays.py.
JPEG_DECODING = ("libjpeg's accurate integer IDCT: TensorFlow's decode_jpeg with dct_method INTEGER_ACCURATE "
                 "(tf.data, the SavedModel, serve) and Pillow (the in-memory arrays under JAX) give the same pixels")


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


def pillow_pixels(contents):
    """Encoded image bytes -> [height, width, channels] float32 in [0, 1], as `decode_pixels` reads them, in Python.

    8-bit images are divided by 255, 16-bit ones by 65535; a palette becomes
    RGB; GIF gives its first frame. Raises ValueError for bytes Pillow cannot
    decode (the message says why).
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(contents)) as image:
            image.seek(0)
            image.load()
            return _pixels(image)
    except (UnidentifiedImageError, OSError, SyntaxError, EOFError) as e:
        raise ValueError(str(e) or type(e).__name__) from None


def _pixels(image):
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        return (np.asarray(image, "float64") / 65535.0).astype("float32")[..., None]
    if image.mode not in ("L", "LA", "RGB", "RGBA"):
        image = image.convert("RGBA" if "transparency" in image.info or image.mode == "PA" else
                              "L" if image.mode == "1" else "RGB")
    pixels = np.asarray(image, "float32") / 255.0
    return pixels if pixels.ndim == 3 else pixels[..., None]


# ---------------------------------------------------------------- remembered verdicts


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

