"""In-memory arrays: how images reach a model where tf.data does not (Keras on JAX or torch).

Path of a batch: files -> `images.pillow_pixels` (Pillow, in Python; a DICOM
first becomes the 16-bit PNG `images.encoded_image` makes of it) -> `model_input`
(grayscale and an antialiased resize in numpy, the same arithmetic as
`images.decode_image`'s TensorFlow ops) -> `load_arrays` (one [N, size, size, 1]
float32 array, decoded once and cached on disk by the files' fingerprint) ->
`ArrayBatches` (a keras.utils.PyDataset: shuffled and batched, seeded) ->
augmentation inside the model, on the device.

The pixels equal tf.data's within float rounding (tests/test_backend.py):
the same decoded values, the same grayscale weights and the same triangle
kernel as TensorFlow's `scale_and_translate`. Nothing here imports TensorFlow.
"""

import hashlib
import math
import os

import keras
import numpy as np

from cxrkeras.config import IMAGE_SIZE
from cxrkeras.images import cache_dir, encoded_image, pillow_pixels

ARRAYS_VERSION = 1  # bump when the decoded pixels change: cached arrays are then decoded again
GRAY_WEIGHTS = np.array([0.2989, 0.5870, 0.1140], "float32")  # tf.image.rgb_to_grayscale's
MEMORY_SHARE = 0.5  # the arrays path is taken while the images take at most this share of free memory


# ---------------------------------------------------------------- one file


def model_input(pixels, image_size=IMAGE_SIZE):
    """[H, W, C] pixels in [0, 1] -> [size, size, 1] float32: grayscale, antialiased bilinear resize, clip."""
    pixels = np.asarray(pixels, "float32")
    gray = pixels[..., :3] @ GRAY_WEIGHTS if pixels.shape[-1] >= 3 else pixels[..., 0]
    rows = _resize_weights(gray.shape[0], image_size)
    cols = _resize_weights(gray.shape[1], image_size)
    resized = rows.T @ gray @ cols
    return np.clip(resized, 0.0, 1.0)[..., None].astype("float32")


def _resize_weights(input_size, output_size):
    """[input, output] weights of TensorFlow's antialiased "triangle" `scale_and_translate` along one axis.

    Each output pixel's centre maps back into the input; the triangle kernel is
    widened by the scale when shrinking (the antialiasing) and its weights are
    normalised to sum to 1 (jax.image's `compute_weight_mat`, in numpy).
    """
    scale = np.float32(output_size) / np.float32(input_size)
    inv_scale = 1.0 / scale
    kernel_scale = max(inv_scale, 1.0)
    sample = (np.arange(output_size, dtype="float32") + 0.5) * inv_scale - 0.5
    distance = np.abs(sample[None, :] - np.arange(input_size, dtype="float32")[:, None]) / kernel_scale
    weights = np.maximum(0.0, 1.0 - distance)
    total = weights.sum(axis=0, keepdims=True)
    weights = np.where(np.abs(total) > 1000.0 * np.finfo("float32").eps, weights / np.where(total != 0, total, 1), 0)
    inside = (sample >= -0.5) & (sample <= input_size - 0.5)
    return np.where(inside[None, :], weights, 0).astype("float32")


def read_file(path):
    """The file at `path` as bytes `pillow_pixels` reads (a DICOM converted, as `images.read_image` does)."""
    with open(path, "rb") as f:
        return encoded_image(f.read(), name=os.fspath(path))


def decode_image(path, image_size=IMAGE_SIZE):
    """The file at `path` as the [size, size, 1] float32 image a model takes."""
    return model_input(pillow_pixels(read_file(path)), image_size)


# ---------------------------------------------------------------- many files, cached


def load_arrays(paths, image_size=IMAGE_SIZE, cache=True):
    """[N, size, size, 1] float32 images of `paths`, decoded once; with `cache`, kept on disk for next time.

    The cache file (in `images.cache_dir()`) is named after the files' paths,
    sizes and modification times, the image size and ARRAYS_VERSION, so a
    changed file or setting decodes again. A cache that cannot be written is
    skipped: it only saves time.
    """
    if not cache:
        return _decode_all(paths, image_size)
    from cxrkeras.files import write_atomic

    path = os.path.join(cache_dir(), f"arrays-{arrays_key(paths, image_size)}.npy")
    try:
        return np.load(path)
    except (OSError, ValueError):
        pass
    images = _decode_all(paths, image_size)
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        write_atomic(path, lambda tmp: _save(tmp, images))
    except OSError:
        pass
    return images


def _save(path, images):
    with open(path, "wb") as f:
        np.save(f, images)


def _decode_all(paths, image_size):
    images = np.empty((len(paths), image_size, image_size, 1), "float32")
    for i, p in enumerate(paths):
        images[i] = decode_image(p, image_size)
    return images


def arrays_key(paths, image_size):
    """A short hash of which files (path, size, modification time), in order, at which size."""
    h = hashlib.sha256(f"arrays {ARRAYS_VERSION}; size {image_size}\n".encode())
    for p in paths:
        st = os.stat(p)
        h.update(f"{os.path.abspath(p)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def fits_in_memory(n_images, image_size, meminfo="/proc/meminfo"):
    """Whether `n_images` float32 images take at most MEMORY_SHARE of the available memory (True where unknown)."""
    try:
        with open(meminfo) as f:
            available = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError, IndexError):
        return True
    return n_images * image_size * image_size * 4 <= MEMORY_SHARE * available


# ---------------------------------------------------------------- batches


class ArrayBatches(keras.utils.PyDataset):
    """(images, labels) batches of in-memory arrays for `model.fit`; reshuffled every epoch when `shuffle`.

    The order of epoch e is a permutation drawn from `seed` and e, so a run
    repeats exactly; every epoch covers every image once.
    """

    def __init__(self, images, labels, batch_size, shuffle=False, seed=0):
        super().__init__()
        self.images, self.labels, self.batch_size = images, labels, batch_size
        self.shuffle, self.seed, self.epoch = shuffle, seed, 0
        self.order = self._order()

    def _order(self):
        if not self.shuffle:
            return np.arange(len(self.images))
        return np.random.default_rng([self.seed, self.epoch]).permutation(len(self.images))

    def __len__(self):
        return math.ceil(len(self.images) / self.batch_size)

    def __getitem__(self, index):
        picked = self.order[index * self.batch_size:(index + 1) * self.batch_size]
        return self.images[picked], self.labels[picked]

    def on_epoch_end(self):
        self.epoch += 1
        self.order = self._order()
