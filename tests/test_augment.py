import math

import keras
import numpy as np
import pytest

from cxrkeras.augment import ColorJitter, RandomResizedCrop, RandomRotation, study_augmentation

N = 2000


def _np(params):
    return {k: np.asarray(v) for k, v in params.items()}


def test_crop_area_and_ratio_follow_torchvision():
    p = _np(RandomResizedCrop(seed=1).sample(N, 150, 150))
    area = p["height"] * p["width"] / 150**2
    # torchvision rounds w and h to whole pixels, so the area can dip a hair under 0.7
    assert area.min() >= 0.69 and area.max() <= 1.0
    # spread across the range exactly as torchvision's retry loop spreads it (large areas with
    # a non-square ratio do not fit, so they are rarer than a plain U(0.7, 1) would make them)
    ours = np.histogram(area, bins=3, range=(0.69, 1.0))[0] / N
    reference = np.histogram(_torchvision_areas(N), bins=3, range=(0.69, 1.0))[0] / N
    np.testing.assert_allclose(ours, reference, atol=0.04)
    assert ours.min() > 0.08
    assert (p["top"] >= 0).all() and (p["top"] + p["height"] <= 150).all()
    assert (p["left"] >= 0).all() and (p["left"] + p["width"] <= 150).all()
    ratio = p["width"] / p["height"]
    assert ratio.min() >= 0.74 and ratio.max() <= 1.35 and ratio.std() > 0.05


def _torchvision_areas(n, size=150, rng=np.random.default_rng(0)):
    """torchvision.transforms.RandomResizedCrop.get_params, transcribed to numpy."""
    areas = []
    for _ in range(n):
        w = h = size
        for _ in range(10):
            target = size * size * rng.uniform(0.7, 1.0)
            ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
            cw, ch = round(math.sqrt(target * ratio)), round(math.sqrt(target / ratio))
            if 0 < cw <= size and 0 < ch <= size:
                w, h = cw, ch
                break
        areas.append(w * h / size**2)
    return np.array(areas)


def test_crop_falls_back_to_the_whole_image_when_nothing_fits():
    p = _np(RandomResizedCrop(scale=(1.5, 2.0), seed=0).sample(50, 150, 150))
    assert (p["height"] == 150).all() and (p["width"] == 150).all() and (p["top"] == 0).all()


def test_crop_resizes_the_chosen_box():
    layer = RandomResizedCrop(seed=0)
    ramp = np.tile(np.arange(150, dtype="float32"), (150, 1))[None, :, :, None] / 149
    params = {"top": np.array([10.0]), "left": np.array([30.0]), "height": np.array([100.0]), "width": np.array([100.0])}
    out = np.asarray(layer.apply(ramp, params))[0, :, :, 0]
    # left edge samples near column 30, right edge near column 129: a stretched ramp
    assert abs(out[75, 0] * 149 - 30) < 1 and abs(out[75, -1] * 149 - 129) < 1
    assert np.all(np.diff(out[75]) > 0)


def test_rotation_is_bounded_by_5_degrees_and_rotates_about_the_centre():
    angles = np.asarray(RandomRotation(5, seed=2).sample(N)["angle"])
    assert np.abs(angles).max() <= 5 and angles.min() < -4.5 and angles.max() > 4.5
    image = np.zeros((1, 151, 151, 1), "float32")
    image[0, 75, 135, 0] = 1.0  # a dot 60 px right of the centre
    out = np.asarray(RandomRotation(5).apply(image, {"angle": np.array([5.0])}))[0, :, :, 0]
    y, x = np.unravel_index(out.argmax(), out.shape)
    moved = math.degrees(math.atan2(75 - y, x - 75))  # counter-clockwise, y axis pointing down
    assert 3.5 < moved < 6.5 and out[75, 75] == 0


def test_jitter_factors_and_clipping():
    p = _np(ColorJitter(0.1, 0.1, seed=3).sample(N))
    for k in ("brightness", "contrast"):
        assert p[k].min() >= 0.9 and p[k].max() <= 1.1 and p[k].std() > 0.05
    assert 0.4 < p["contrast_first"].mean() < 0.6  # random order, as torchvision
    flat = np.full((4, 8, 8, 1), 0.5, "float32")
    params = {"brightness": np.array([0.9, 1.1, 1.0, 1.0]), "contrast": np.ones(4), "contrast_first": np.zeros(4, bool)}
    out = np.asarray(ColorJitter().apply(flat, params))
    np.testing.assert_allclose(out[:, 0, 0, 0], [0.45, 0.55, 0.5, 0.5], atol=1e-6)
    bright = np.full((1, 8, 8, 1), 0.95, "float32")
    one = {"brightness": np.array([1.1]), "contrast": np.array([1.0]), "contrast_first": np.array([False])}
    assert np.asarray(ColorJitter().apply(bright, one)).max() == 1.0  # clipped


def test_contrast_blends_with_the_mean():
    image = np.zeros((1, 2, 2, 1), "float32")
    image[0, 0, 0, 0] = 0.8  # mean 0.2
    params = {"brightness": np.ones(1), "contrast": np.array([0.9]), "contrast_first": np.ones(1, bool)}
    out = np.asarray(ColorJitter().apply(image, params))[0, :, :, 0]
    np.testing.assert_allclose(out, [[0.9 * 0.8 + 0.1 * 0.2, 0.02], [0.02, 0.02]], atol=1e-6)


def test_each_image_of_a_batch_gets_its_own_parameters():
    batch = np.repeat(np.random.default_rng(0).random((1, 150, 150, 1), dtype="float32"), 8, axis=0)
    out = np.asarray(study_augmentation(seed=0)(batch, training=True))
    assert out.shape == batch.shape and out.dtype == np.float32
    assert len({out[i].tobytes() for i in range(8)}) == 8
    assert out.min() >= 0 and out.max() <= 1


@pytest.mark.parametrize("layer", [ColorJitter(), RandomRotation(), RandomResizedCrop(), study_augmentation()])
def test_identity_at_inference(layer):
    batch = np.random.default_rng(1).random((3, 150, 150, 1), dtype="float32")
    assert np.array_equal(np.asarray(layer(batch, training=False)), batch)


def test_same_seed_same_output_and_config_round_trip():
    batch = np.random.default_rng(2).random((4, 150, 150, 1), dtype="float32")
    a = np.asarray(study_augmentation(seed=5)(batch, training=True))
    b = np.asarray(study_augmentation(seed=5)(batch, training=True))
    c = np.asarray(study_augmentation(seed=6)(batch, training=True))
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    layer = RandomResizedCrop(scale=(0.8, 0.9), seed=3)
    clone = RandomResizedCrop.from_config(layer.get_config())
    assert clone.scale == (0.8, 0.9) and clone.ratio == layer.ratio and clone.seed == 3


def test_augmentation_inside_a_model_trains():
    inputs = keras.Input((150, 150, 1))
    x = study_augmentation(seed=0)(inputs)
    outputs = keras.layers.Dense(1, activation="sigmoid")(keras.layers.GlobalAveragePooling2D()(x))
    model = keras.Model(inputs, outputs)
    model.compile("adam", "binary_crossentropy")
    x = np.random.default_rng(3).random((8, 150, 150, 1), dtype="float32")
    history = model.fit(x, np.ones((8, 1)), epochs=2, batch_size=4, verbose=0)
    assert len(history.history["loss"]) == 2 and np.isfinite(history.history["loss"]).all()
