"""The classifier builders: exact layers, initializers, config and file round trips."""

import dataclasses
import json
import math
import re

import keras
import numpy as np
import pytest

from cxrkeras.config import TASKS, ModelConfig, RunConfig, study_model_config
from cxrkeras.models import (
    TorchUniform,
    build_model,
    build_study_model,
    conv_layer_names,
    last_conv_layer_name,
    task_info,
)


@pytest.fixture(autouse=True)
def seed():
    keras.utils.set_random_seed(0)


def images(n=2, size=150):
    return np.random.default_rng(0).random((n, size, size, 1), dtype=np.float32)


def structure(model):
    return [(layer.name, tuple(layer.output.shape)) for layer in model.layers]


def predict(model, x):
    return keras.ops.convert_to_numpy(model(x, training=False))


@pytest.mark.parametrize(
    "task, params, flat, outputs",
    [("infected", 202_261, 512, 1), ("covid", 378_917, 576, 1), ("three-class", 379_159, 576, 3)],
)
def test_study_models_match_the_study(task, params, flat, outputs):
    model = build_study_model(task)
    assert model.count_params() == params
    assert model.get_layer("flatten").output.shape == (None, flat)
    assert model.input.shape == (None, 150, 150, 1)
    assert model.output.shape == (None, outputs)
    assert model.name == task.replace("-", "_") + "_classifier"


def test_binary_output_is_a_probability():
    p = predict(build_study_model("infected"), images(3))
    assert p.shape == (3, 1)
    assert np.all((p > 0) & (p < 1))


def test_three_class_rows_sum_to_one():
    p = predict(build_study_model("three-class"), images(2))
    assert p.shape == (2, 3)
    np.testing.assert_allclose(p.sum(axis=1), 1.0, rtol=1e-5)


def test_layer_names():
    plain = build_study_model("infected")
    assert conv_layer_names(plain) == [f"block{i}_conv" for i in range(1, 6)]
    assert last_conv_layer_name(plain) == "block5_conv"
    for name in ["input_norm", "block1_relu", "block1_pool", "conv_dropout", "fc", "fc_dropout"]:
        plain.get_layer(name)
    residual = build_study_model("covid")
    res = [f"res{i}_conv{j}" for i in range(1, 5) for j in (1, 2)]
    assert conv_layer_names(residual) == ["stem_conv1", "stem_conv2", *res]
    assert last_conv_layer_name(residual) == "res4_conv2"
    for name in ["stem_pool", "res1_add", "res1_out", "res4_pool", "flatten_dropout", "fc"]:
        residual.get_layer(name)
    assert residual.get_layer("stem_pool").output.shape == (None, 50, 50, 64)
    assert residual.get_layer("res4_pool").output.shape == (None, 3, 3, 64)


# 202,261 less the dropped convs (36,928 for 64->64, 73,856 for 64->128), plus fc's wider input.
@pytest.mark.parametrize(
    "blocks, flat, params",
    [(3, 17 * 17 * 64, 202_261 - 36_928 - 73_856 + 128 * (18_496 - 512)),
     (4, 7 * 7 * 64, 202_261 - 73_856 + 128 * (3_136 - 512))],
)
def test_fewer_plain_blocks_give_a_bigger_flatten(blocks, flat, params):
    model = build_model(ModelConfig(blocks=blocks))
    assert conv_layer_names(model) == [f"block{i}_conv" for i in range(1, blocks + 1)]
    assert model.get_layer("flatten").output.shape == (None, flat)
    assert model.count_params() == params
    assert predict(model, images(1)).shape == (1, 1)


def test_more_blocks_than_filters_repeat_the_last():
    model = build_model(ModelConfig(blocks=4, filters=[8, 16], image_size=64))
    widths = [model.get_layer(name).filters for name in conv_layer_names(model)]
    assert widths == [8, 16, 16, 16]


def test_batchnorm_after_every_conv():
    model = build_model(ModelConfig(batchnorm=True))
    assert model.get_layer("block1_bn").output.shape == (None, 148, 148, 24)
    assert model.count_params() == 202_261 + 4 * (24 + 32 + 64 + 64 + 128)


def test_residual_off_drops_the_skip_connections():
    config = dataclasses.replace(study_model_config("covid"), residual=False)
    model = build_model(config)
    names = [layer.name for layer in model.layers]
    assert not [name for name in names if name.endswith("_add")]
    assert "res1_out" in names
    assert model.count_params() == 378_917


def test_mixed_precision_keeps_predictions_in_float32():
    keras.mixed_precision.set_dtype_policy("mixed_bfloat16")
    try:
        model = build_study_model("infected")
    finally:
        keras.mixed_precision.set_dtype_policy("float32")
    assert model.get_layer("fc").compute_dtype == "bfloat16"
    assert model.get_layer("predictions").compute_dtype == "float32"
    assert predict(model, images(1)).dtype == np.float32


@pytest.mark.parametrize("task", ["infected", "covid"])  # both trunks (three-class is covid's)
def test_a_bf16_trained_classifier_computes_in_float32_once_made_so(task, tmp_path):
    """The same weights as a float32 build: the same answers, and saved and loaded it stays float32."""
    from cxrkeras.models.blocks import compute_in_float32

    config = dataclasses.replace(study_model_config(task), image_size=96, batchnorm=True)
    mixed, plain = build_model(config, dtype="mixed_bfloat16"), build_model(config)
    plain.set_weights(mixed.get_weights())  # mixed precision keeps float32 variables
    x = images(3, 96)
    assert np.abs(predict(mixed, x) - predict(plain, x)).max() > 1e-6  # bf16 rounds
    compute_in_float32(mixed)
    assert {layer.compute_dtype for layer in mixed.layers} == {"float32"}
    np.testing.assert_allclose(predict(mixed, x), predict(plain, x), atol=1e-6)
    mixed.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    assert {layer.compute_dtype for layer in loaded.layers} == {"float32"}
    np.testing.assert_allclose(predict(loaded, x), predict(plain, x), atol=1e-6)


def test_torch_init_draws_within_the_pytorch_bounds():
    model = build_study_model("infected")
    for name, fan_in in [("block1_conv", 9 * 1), ("block2_conv", 9 * 24), ("fc", 512)]:
        kernel, bias = model.get_layer(name).get_weights()
        bound = 1 / math.sqrt(fan_in)
        assert np.abs(kernel).max() <= bound
        assert np.abs(kernel).max() > 0.9 * bound  # spread over the range, not glorot's
        assert np.abs(bias).max() <= bound
        assert np.all(bias != 0)
    assert np.abs(model.get_layer("fc").get_weights()[1]).max() > 0.9 / math.sqrt(512)


def test_keras_init_gives_zero_biases():
    model = build_model(ModelConfig(initializer="keras"))
    for name in ["block2_conv", "fc", "predictions"]:
        assert not np.any(model.get_layer(name).get_weights()[1])
    kernel = model.get_layer("block2_conv").get_weights()[0]
    assert np.abs(kernel).max() > 1 / math.sqrt(9 * 24)  # glorot's bound is wider here


def test_torch_uniform_needs_fan_in_for_a_bias_and_serializes():
    with pytest.raises(ValueError, match="fan_in"):
        TorchUniform()((8,))
    init = keras.saving.deserialize_keras_object(
        keras.saving.serialize_keras_object(TorchUniform(fan_in=27, seed=3))
    )
    assert isinstance(init, TorchUniform)
    assert init.fan_in == 27
    values = keras.ops.convert_to_numpy(init((1000,)))
    assert np.abs(values).max() <= 1 / math.sqrt(27)
    assert np.abs(values).max() > 0.9 / math.sqrt(27)


def test_model_config_round_trip_builds_the_same_model():
    config = ModelConfig(blocks=4, filters=[16, 32], batchnorm=True, dense_units=64)
    saved = json.loads(json.dumps(RunConfig(model=config).to_dict()))
    again = RunConfig.from_dict(saved).model
    assert again == config
    assert dataclasses.asdict(again) == dataclasses.asdict(config)
    first, second = build_model(config), build_model(again)
    assert structure(first) == structure(second)
    assert first.count_params() == second.count_params()


def test_model_rebuilt_from_its_keras_config_has_the_same_structure():
    model = build_study_model("covid")
    rebuilt = keras.Model.from_config(model.get_config())
    assert structure(rebuilt) == structure(model)
    assert rebuilt.count_params() == 378_917
    assert isinstance(rebuilt.get_layer("res1_conv1").kernel_initializer, TorchUniform)


@pytest.mark.parametrize("task", ["infected", "covid", "three-class"])
def test_saved_model_reloads_with_identical_predictions(task, tmp_path):
    model = build_study_model(task)
    path = tmp_path / "model.keras"
    model.save(path)
    reloaded = keras.saving.load_model(path)
    assert structure(reloaded) == structure(model)
    x = images(2)
    np.testing.assert_allclose(predict(reloaded, x), predict(model, x), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    "changes, shown",
    [
        ({"arch": "foo"}, "arch='foo'"),
        ({"initializer": "xavier"}, "initializer='xavier'"),
        ({"task": "pneumonia"}, "'pneumonia'"),
        ({"blocks": 0}, "blocks=0"),
        ({"blocks": 6}, "blocks=6"),
        ({"arch": "residual", "blocks": 6, "filters": [64]}, "blocks=6"),
        ({"filters": []}, "filters=[]"),
        ({"filters": [24, -1]}, "filters=[24, -1]"),
        ({"arch": "residual", "filters": [8, 16, 32]}, "filters=[8, 16, 32]"),
        ({"dense_units": -1}, "dense_units=-1"),
        ({"dropout": 1.0}, "dropout=1.0"),
        ({"conv_dropout": -0.1}, "conv_dropout=-0.1"),
        ({"image_size": "150"}, "image_size='150'"),
    ],
)
def test_bad_config_values_are_named(changes, shown):
    with pytest.raises(ValueError, match=re.escape(shown)):
        build_model(ModelConfig(**changes))


@pytest.mark.parametrize("task", ["infected", "covid", "three-class"])
def test_a_saved_classifier_carries_its_task_and_class_names(task, tmp_path):
    config = dataclasses.replace(study_model_config(task), blocks=2, filters=[4, 8], dense_units=8)
    model = build_model(config)
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    info = task_info(loaded)
    assert (info.task, info.class_names) == (task, TASKS[task])
    assert not info.weights
    np.testing.assert_allclose(predict(loaded, images(1, 150)), predict(model, images(1, 150)), atol=1e-6)
