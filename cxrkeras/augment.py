"""The study's augmentation as Keras layers on `keras.ops`, applied to whole batches.

torchvision's order and semantics (see shared/reference.md): ColorJitter(0.1, 0.1)
-> RandomRotation(5, bilinear, fill 0) -> RandomResizedCrop(150, scale=(0.7, 1.0),
ratio=(3/4, 4/3)). Every image of a batch draws its own parameters; with
`training=False` each layer returns its input unchanged. Backend-agnostic: the
layers run in tf.data on a CPU, or inside the model on a GPU (JAX or TF).

Each layer splits its work like Keras' own preprocessing layers:
`sample(batch_size)` draws the parameters, `apply(images, params)` uses them,
so tests can check the distribution of the parameters directly.
"""

import math

import keras
from keras import ops

from cxrkeras.config import IMAGE_SIZE


class _RandomLayer(keras.layers.Layer):
    def __init__(self, seed=None, **kwargs):
        super().__init__(**kwargs)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def call(self, images, training=True):
        if not training:
            return images
        return self.apply(images, self.sample(ops.shape(images)[0]))

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "seed": self.seed}

    def _uniform(self, shape, low, high):
        return keras.random.uniform(shape, low, high, seed=self.seed_generator)


@keras.saving.register_keras_serializable(package="cxrkeras")
class ColorJitter(_RandomLayer):
    """torchvision ColorJitter(brightness, contrast) on gray images.

    Brightness multiplies by b ~ U(1-brightness, 1+brightness); contrast blends
    with the image's mean gray level by c ~ U(1-contrast, 1+contrast); both clip
    to [0, 1]. As in torchvision, each image applies the two in a random order.
    """

    def __init__(self, brightness=0.1, contrast=0.1, **kwargs):
        super().__init__(**kwargs)
        self.brightness, self.contrast = brightness, contrast

    def sample(self, n):
        b, c = self.brightness, self.contrast
        return {
            "brightness": self._uniform((n,), 1 - b, 1 + b),
            "contrast": self._uniform((n,), 1 - c, 1 + c),
            "contrast_first": self._uniform((n,), 0.0, 1.0) < 0.5,
        }

    def apply(self, images, params):
        b = ops.cast(ops.reshape(params["brightness"], (-1, 1, 1, 1)), images.dtype)
        c = ops.cast(ops.reshape(params["contrast"], (-1, 1, 1, 1)), images.dtype)

        def bright(x):
            return ops.clip(x * b, 0.0, 1.0)

        def contrast(x):
            mean = ops.mean(x, axis=(1, 2, 3), keepdims=True)
            return ops.clip(c * x + (1 - c) * mean, 0.0, 1.0)

        first = ops.reshape(params["contrast_first"], (-1, 1, 1, 1))
        return ops.where(first, bright(contrast(images)), contrast(bright(images)))

    def get_config(self):
        return {**super().get_config(), "brightness": self.brightness, "contrast": self.contrast}


@keras.saving.register_keras_serializable(package="cxrkeras")
class RandomRotation(_RandomLayer):
    """torchvision RandomRotation(degrees): angle ~ U(-degrees, degrees), about the centre, bilinear, fill 0."""

    def __init__(self, degrees=5.0, **kwargs):
        super().__init__(**kwargs)
        self.degrees = degrees

    def sample(self, n):
        return {"angle": self._uniform((n,), -self.degrees, self.degrees)}

    def apply(self, images, params):
        h, w = images.shape[1], images.shape[2]
        theta = params["angle"] * (math.pi / 180.0)
        cos, sin = ops.cos(theta), ops.sin(theta)
        cx, cy = (w - 1) / 2.0, (h - 1) / 2.0
        # Output pixel -> input pixel (counter-clockwise content rotation, y pointing down).
        zero = ops.zeros_like(cos)
        transform = ops.stack(
            [cos, -sin, cx - cos * cx + sin * cy, sin, cos, cy - sin * cx - cos * cy, zero, zero], axis=1
        )
        return _warp(images, transform)

    def get_config(self):
        return {**super().get_config(), "degrees": self.degrees}


@keras.saving.register_keras_serializable(package="cxrkeras")
class RandomResizedCrop(_RandomLayer):
    """torchvision RandomResizedCrop(scale, ratio) back to the input's size, one crop per image, bilinear.

    Area fraction s ~ U(scale), aspect ratio log-uniform in `ratio`; of 10 tries
    the first that fits is used, else the centre crop (the whole image when the
    image's own ratio is within `ratio`). The study resizes 150x150 crops back to 150x150.
    """

    def __init__(self, scale=(0.7, 1.0), ratio=(3 / 4, 4 / 3), tries=10, **kwargs):
        super().__init__(**kwargs)
        self.scale, self.ratio, self.tries = tuple(scale), tuple(ratio), tries

    def call(self, images, training=True):
        if not training:
            return images
        params = self.sample(ops.shape(images)[0], images.shape[1], images.shape[2])
        return self.apply(images, params)

    def sample(self, n, height=IMAGE_SIZE, width=IMAGE_SIZE):
        shape = (n, self.tries)
        area = self._uniform(shape, *self.scale) * (height * width)
        ratio = ops.exp(self._uniform(shape, math.log(self.ratio[0]), math.log(self.ratio[1])))
        w = ops.round(ops.sqrt(area * ratio))
        h = ops.round(ops.sqrt(area / ratio))
        fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
        first = ops.argmax(ops.cast(fits, "int32"), axis=1)  # the first try that fits
        any_fit = ops.any(fits, axis=1)
        cw, ch = self._centre_crop(height, width)
        w = ops.where(any_fit, _pick(w, first), cw)
        h = ops.where(any_fit, _pick(h, first), ch)
        # Top-left corner uniform over the integer positions that keep the crop inside.
        top = ops.floor(self._uniform((n,), 0.0, 1.0) * (height - h + 1))
        left = ops.floor(self._uniform((n,), 0.0, 1.0) * (width - w + 1))
        return {"top": top, "left": left, "height": h, "width": w}

    def _centre_crop(self, height, width):
        in_ratio = width / height
        if in_ratio < self.ratio[0]:
            return float(width), float(round(width / self.ratio[0]))
        if in_ratio > self.ratio[1]:
            return float(round(height * self.ratio[1])), float(height)
        return float(width), float(height)

    def apply(self, images, params):
        # Output pixel (x, y) samples the crop at half-pixel centres, as a bilinear resize does.
        sx = params["width"] / images.shape[2]
        sy = params["height"] / images.shape[1]
        zero = ops.zeros_like(sx)
        transform = ops.stack(
            [sx, zero, params["left"] + 0.5 * sx - 0.5, zero, sy, params["top"] + 0.5 * sy - 0.5, zero, zero],
            axis=1,
        )
        return _warp(images, transform)

    def get_config(self):
        return {**super().get_config(), "scale": list(self.scale), "ratio": list(self.ratio), "tries": self.tries}


@keras.saving.register_keras_serializable(package="cxrkeras")
class BorderErase(_RandomLayer):
    """Sets bands at random image edges to 0: a source mark near an edge stops being a reliable cue.

    Each of the four edges, with probability `probability`, gets a band of
    width ~ U(0, fraction * side) pixels (floored); the rest is untouched.
    Not in the study: a lever against border shortcuts (see `cxrkeras.audit`).
    """

    def __init__(self, fraction, probability=0.5, **kwargs):
        super().__init__(**kwargs)
        self.fraction, self.probability = fraction, probability

    def call(self, images, training=True):
        if not training:
            return images
        return self.apply(images, self.sample(ops.shape(images)[0], images.shape[1], images.shape[2]))

    def sample(self, n, height=IMAGE_SIZE, width=IMAGE_SIZE):
        """{"top", "bottom", "left", "right"}: band widths [N] in pixels (0 where the edge is kept)."""
        sides = {"top": height, "bottom": height, "left": width, "right": width}
        return {
            edge: ops.floor(self._uniform((n,), 0.0, self.fraction * side))
            * ops.cast(self._uniform((n,), 0.0, 1.0) < self.probability, "float32")
            for edge, side in sides.items()
        }

    def apply(self, images, params):
        h, w = images.shape[1], images.shape[2]
        rows = ops.reshape(ops.arange(h, dtype="float32"), (1, h, 1))
        cols = ops.reshape(ops.arange(w, dtype="float32"), (1, 1, w))
        band = {k: ops.reshape(v, (-1, 1, 1)) for k, v in params.items()}
        erased = (rows < band["top"]) | (rows >= h - band["bottom"])
        erased = erased | (cols < band["left"]) | (cols >= w - band["right"])
        keep = ops.cast(ops.logical_not(erased), images.dtype)[..., None]
        return images * keep

    def get_config(self):
        return {**super().get_config(), "fraction": self.fraction, "probability": self.probability}


def _pick(values, index):
    """values[i, index[i]] for each row i."""
    return ops.sum(values * ops.one_hot(index, values.shape[1], dtype=values.dtype), axis=1)


def _warp(images, transform):
    dtype = images.dtype
    out = ops.image.affine_transform(
        ops.cast(images, "float32"), ops.cast(transform, "float32"), interpolation="bilinear", fill_mode="constant"
    )
    return ops.cast(out, dtype)


# DataConfig.augmentation -> (jitter, rotation degrees, crop scale); none flips (anatomy has a side).
AUGMENTATION_SETTINGS = {
    "study": (0.1, 5.0, (0.7, 1.0)),
    "strong": (0.2, 10.0, (0.5, 1.0)),
}


def study_augmentation(seed=None):
    """The study's augmentation stack as one Keras layer (identity at inference)."""
    return augmentation("study", seed=seed)


def augmentation(kind="study", border_erase=0.0, seed=None):
    """The augmentation stack `kind` (AUGMENTATION_SETTINGS), then BorderErase(border_erase) when > 0."""
    if kind not in AUGMENTATION_SETTINGS:
        raise ValueError(f"Unknown `augmentation`; expected one of {list(AUGMENTATION_SETTINGS)}. Received: {kind!r}")
    jitter, degrees, scale = AUGMENTATION_SETTINGS[kind]
    seeds = [None] * 4 if seed is None else [seed, seed + 1, seed + 2, seed + 3]
    layers = [
        ColorJitter(jitter, jitter, seed=seeds[0], name="color_jitter"),
        RandomRotation(degrees, seed=seeds[1], name="random_rotation"),
        RandomResizedCrop(scale, (3 / 4, 4 / 3), seed=seeds[2], name="random_resized_crop"),
    ]
    if border_erase:
        layers.append(BorderErase(border_erase, seed=seeds[3], name="border_erase"))
    return keras.Sequential(layers, name="augmentation")


def preview_figure(train_samples, path, n_images=4, draws=4, seed=0, kind="study", border_erase=0.0):
    """Draw `n_images` seeded picks of `train_samples` beside `draws` augmented versions of each (a PNG at `path`)."""
    import numpy as np

    from cxrkeras import data as data_lib
    from cxrkeras import plots

    picks = np.random.default_rng(seed).choice(len(train_samples), size=min(n_images, len(train_samples)),
                                               replace=False)
    chosen = [train_samples[i] for i in sorted(picks)]
    originals = data_lib.load_images([s.path for s in chosen])
    augmenter = augmentation(kind, border_erase, seed=seed)
    augmented = np.stack([np.asarray(augmenter(originals, training=True)) for _ in range(draws)], axis=1)
    return plots.augmentation_grid(originals, augmented, [s.label for s in chosen], path)
