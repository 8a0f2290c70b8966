"""Every CPU, the same pixels: no strided 1x1 convolution kernel, one "auto" precision, one JPEG decoder."""

import io
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from cxrkeras import data as data_lib
from cxrkeras import images as images_lib
from cxrkeras import runs
from cxrkeras.config import ModelConfig, resnet_model_config, study_model_config
from cxrkeras.models import blocks, build_model

# ---------------------------------------------------------------- strided 1x1 convolutions


@pytest.mark.parametrize("size, padding", [(16, "same"), (15, "same"), (9, "valid"), (38, "same")])
def test_pointwise_conv_computes_what_a_strided_conv2d_computes(size, padding):
    x = np.random.default_rng(0).normal(size=(3, size, size, 5)).astype("float32")
    plain = keras.layers.Conv2D(7, 1, strides=2, padding=padding)
    ours = blocks.PointwiseConv2D(7, 1, strides=2, padding=padding)
    plain.build(x.shape)
    ours.build(x.shape)
    ours.set_weights(plain.get_weights())
    np.testing.assert_allclose(ours(x), plain(x), atol=1e-6)
    assert ours.compute_output_shape(x.shape) == plain.compute_output_shape(x.shape)


def strided_pointwise_ops(model, batch=1):
    """The convolution ops of one training step's gradients and of a Grad-CAM-like input gradient, with a 1x1
    kernel and a stride over 1, in `model`'s TensorFlow graph (traced, not run)."""
    spec = tf.TensorSpec((batch, *model.input_shape[1:]), tf.float32)

    @tf.function(input_signature=[spec])
    def step(images):
        with tf.GradientTape(persistent=True) as tape:
            tape.watch(images)
            loss = tf.reduce_sum(tf.cast(model(images, training=True), tf.float32))
        return tape.gradient(loss, model.trainable_weights), tape.gradient(loss, images)

    graph = step.get_concrete_function().graph
    found = []
    for op in graph.get_operations():
        if not op.type.startswith("Conv2D"):
            continue
        strides = list(op.get_attr("strides"))
        kernel = op.inputs[1].shape if op.type != "Conv2DBackpropFilter" else op.outputs[0].shape
        if kernel.rank == 4 and tuple(kernel[:2]) == (1, 1) and max(strides) > 1:
            found.append((op.type, strides))
    return found


@pytest.mark.parametrize("task", ["infected", "covid", "three-class"])
def test_no_model_of_ours_reaches_a_strided_1x1_convolution(task):
    """The study's classifiers and the resnet trunk (the shipped recipe, its deep lever) at 150 px."""
    deep = resnet_model_config(task)
    deep.blocks = 2
    for config in (study_model_config(task), resnet_model_config(task), deep):
        model = build_model(config)
        assert strided_pointwise_ops(model) == [], config.arch


def test_the_check_sees_a_strided_1x1_convolution():
    """The graph check above would fail on a plain Keras Conv2D (so its silence means something)."""
    images = keras.Input((16, 16, 4))
    model = keras.Model(images, keras.layers.Conv2D(8, 1, strides=2)(images))
    assert ("Conv2D", [1, 2, 2, 1]) in strided_pointwise_ops(model)
    assert any(kind == "Conv2DBackpropFilter" for kind, _ in strided_pointwise_ops(model))


def test_a_file_saved_before_the_change_loads_and_predicts_the_same(tmp_path):
    config = ModelConfig(task="covid", arch="resnet", blocks=1, filters=[4, 4, 8, 8], dense_units=0,
                         conv_dropout=0.0, dropout=0.0, batchnorm=True, initializer="keras", image_size=40)
    model = build_model(config)
    pointwise = [layer for layer in model.layers if isinstance(layer, blocks.PointwiseConv2D)]
    assert [layer.name for layer in pointwise] == ["stage2_block1_short_conv", "stage3_block1_short_conv"]
    for layer in pointwise:  # as the builders made them before: Keras' own strided Conv2D
        layer.__class__ = keras.layers.Conv2D
    model.save(tmp_path / "old.keras")
    with open(tmp_path / "old.keras", "rb") as f:
        assert b"PointwiseConv2D" not in f.read()
    images = np.random.default_rng(1).uniform(0, 1, (4, 40, 40, 1)).astype("float32")
    before = model.predict(images, verbose=0)  # forward only: the faulty kernel is the filter gradient

    loaded = runs.load_model(tmp_path / "old.keras")
    np.testing.assert_allclose(loaded.predict(images, verbose=0), before, atol=1e-6)
    assert sum(isinstance(layer, blocks.PointwiseConv2D) for layer in loaded.layers) == 2
    assert strided_pointwise_ops(loaded) == []
    assert loaded.count_params() == model.count_params()


def test_a_shipped_cascade_member_loads_without_the_kernel():
    members = os.path.join(os.path.dirname(__file__), "..", "saved_models", "cascade", "members")
    if not os.path.isdir(members):
        pytest.skip("saved_models/cascade is not here")
    name = sorted(f for f in os.listdir(members) if f.endswith(".keras"))[0]
    assert strided_pointwise_ops(runs.load_model(os.path.join(members, name))) == []


# ---------------------------------------------------------------- precision "auto" under every backend

RESOLVE = """
import sys
from cxrkeras import devices
devices.gpu_compute_capabilities = lambda: []
for flags in sys.argv[1:]:
    devices.cpu_flags = lambda flags=flags: set(flags.split(","))
    print(devices.resolve_precision("auto"))
"""
CPUS = {"native": "avx2,avx512f,avx512_bf16", "amx": "avx2,amx_bf16,amx_tile", "emulated": "avx2,fma"}


@pytest.mark.parametrize("backend", ["tensorflow", "jax"])
def test_auto_precision_means_the_same_under_every_backend(backend):
    pytest.importorskip(backend)
    env = dict(os.environ, KERAS_BACKEND=backend, JAX_PLATFORMS="cpu", CUDA_VISIBLE_DEVICES="")
    done = subprocess.run([sys.executable, "-c", RESOLVE, *CPUS.values()], env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["mixed_bfloat16", "mixed_bfloat16", "float32"]


# ---------------------------------------------------------------- one JPEG decoder


def jpegs():
    """Real-looking JPEGs: gray baseline, gray progressive, colour 4:2:0 (baseline and progressive), 4:4:4, CMYK."""
    rng = np.random.default_rng(0)
    ramp = (np.add.outer(np.arange(150), np.arange(150)) % 200).astype("uint8")
    gray = Image.fromarray(ramp + rng.integers(0, 55, ramp.shape).astype("uint8"))
    colour = Image.fromarray(np.stack([ramp, ramp[::-1], rng.integers(0, 255, ramp.shape).astype("uint8")], -1))
    made = {}
    for name, image, options in [
        ("gray", gray, {}),
        ("gray-progressive", gray, {"progressive": True}),
        ("colour-420", colour, {"subsampling": 2}),
        ("colour-420-progressive", colour, {"subsampling": 2, "progressive": True}),
        ("colour-444", colour.resize((173, 131)), {"subsampling": 0}),
        ("cmyk", colour.convert("CMYK"), {}),
    ]:
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=87, **options)
        made[name] = buffer.getvalue()
    return made


def pillow_pixels(contents):
    image = Image.open(io.BytesIO(contents))
    pixels = np.asarray(image.convert("L" if image.mode == "L" else "RGB"))
    return pixels[..., None] if pixels.ndim == 2 else pixels


@pytest.mark.parametrize("name", sorted(jpegs()))
def test_jpeg_pixels_are_pillows_byte_for_byte(name):
    contents = jpegs()[name]
    ours = np.round(images_lib.decode_pixels(tf.constant(contents)).numpy() * 255).astype("uint8")
    np.testing.assert_array_equal(ours, pillow_pixels(contents))


def test_every_path_sees_the_same_jpeg_pixels(tmp_path, exported_cascade):
    """tf.data, `load_images` (plots, prediction), `predict`, the SavedModel's bytes input (what `serve` runs),
    and its float input fed Pillow's pixels."""
    from cxrkeras.predict import KerasPredictor

    made = jpegs()
    paths = []
    for name, contents in made.items():
        paths.append(str(tmp_path / f"{name}.jpg"))
        with open(paths[-1], "wb") as f:
            f.write(contents)
    scaled = [tf.image.convert_image_dtype(pillow_pixels(c), tf.float32) for c in made.values()]  # as decoded
    from_pillow = np.stack([images_lib.gray_resized(pixels).numpy() for pixels in scaled])
    dataset = data_lib.make_dataset(paths, [0] * len(paths), "infected", batch_size=len(paths))
    np.testing.assert_array_equal(next(iter(dataset))[0].numpy(), from_pillow)
    np.testing.assert_array_equal(data_lib.load_images(paths), from_pillow)

    loaded = tf.saved_model.load(str(exported_cascade["version"]))
    by_bytes = loaded.signatures["serving_default"](images=tf.constant(list(made.values())))["probabilities"]
    by_floats = loaded.signatures["predict_images"](images=tf.constant(from_pillow))["probabilities"]
    np.testing.assert_allclose(by_bytes.numpy(), by_floats.numpy(), atol=1e-6)
    predicted, _ = KerasPredictor(exported_cascade["cascade"]).predict_bytes(list(made.values()))
    np.testing.assert_allclose(predicted, by_floats.numpy(), atol=1e-6)
