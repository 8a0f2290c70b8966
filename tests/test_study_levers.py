"""The resnet trunk and the training levers: each reachable from fit's config and doing what it says."""

import json

import keras
import numpy as np
import pytest
from click.testing import CliRunner

from cxrkeras import savedmodel, training
from cxrkeras.augment import AUGMENTATION_SETTINGS, BorderErase, augmentation
from cxrkeras.cli import main
from cxrkeras.config import AUGMENTATIONS, ModelConfig, RunConfig, TrainConfig, resnet_model_config
from cxrkeras.explain import grad_cam, gradcam_layer
from cxrkeras.export import export_model
from cxrkeras.models import build_model, task_info
from cxrkeras.models.classifiers import Equalize

# ---------------------------------------------------------------- the resnet trunk


def resnet_params(filters, outputs=1):
    """Parameters of resnet_model_config's shape (blocks=1, no hidden Dense), counted by hand."""
    conv = lambda k, cin, cout: k * k * cin * cout + cout  # noqa: E731
    bn = lambda c: 4 * c  # noqa: E731
    total = bn(1) + conv(5, 1, filters[0]) + bn(filters[0])
    for cin, cout in zip(filters[:-1], filters[1:]):
        total += conv(3, cin, cout) + bn(cout) + conv(3, cout, cout) + bn(cout)
        if cin != cout or cout != filters[1]:  # a stage that changes shape has a 1x1 shortcut
            total += conv(1, cin, cout) + bn(cout)
    return total + filters[-1] * outputs + outputs


def test_resnet_shapes_and_parameter_count():
    model = build_model(resnet_model_config("covid"))
    assert model.input_shape == (None, 150, 150, 1) and model.output_shape == (None, 1)
    assert model.count_params() == resnet_params([32, 32, 64, 128]) == 309_445
    assert model.get_layer("stage3_block1_out").output.shape == (None, 10, 10, 128)
    assert model.layers[-1].name == "predictions"
    assert task_info(model).task == "covid"


def test_resnet_three_class_and_grad_cam_reads_its_last_block():
    config = ModelConfig(task="three-class", arch="resnet", blocks=1, filters=[4, 8, 8], dense_units=0,
                         batchnorm=True, image_size=64)
    model = build_model(config)
    assert model.output_shape == (None, 3)
    assert gradcam_layer(model) == "stage2_block1_out"
    heat = grad_cam(model, np.random.default_rng(0).random((64, 64, 1), dtype=np.float32))
    assert heat.shape == (64, 64) and 0 <= heat.min() and heat.max() <= 1


def test_contrast_standardize_makes_the_input_exposure_blind():
    config = ModelConfig(task="infected", arch="resnet", blocks=1, filters=[4, 8], dense_units=0, image_size=32,
                         contrast="standardize")
    model = build_model(config)
    x = np.random.default_rng(0).random((2, 32, 32, 1), dtype=np.float32)
    out = keras.Model(model.inputs[0], model.get_layer("contrast").output)(x)
    assert np.allclose(np.mean(out, axis=(1, 2, 3)), 0, atol=1e-4)
    assert np.allclose(np.std(out, axis=(1, 2, 3)), 1, atol=1e-2)
    assert np.allclose(model.predict(x, verbose=0), model.predict(0.5 * x + 0.2, verbose=0), atol=1e-3)


def test_contrast_equalize_is_histogram_equalisation_blind_to_monotone_changes(tmp_path):
    levels = np.round(np.random.default_rng(0).random((2, 32, 32, 1)) ** 2 * 229)  # grey levels 0..229
    x = (levels / 255).astype("float32")
    out = np.asarray(Equalize()(x))
    for image, equalized in zip(levels.astype(int), out):  # the share of the image below each level, ties half
        counts = np.bincount(image.ravel(), minlength=256)
        expected = (np.cumsum(counts) - counts / 2)[image.ravel()] / image.size
        assert np.allclose(equalized.ravel(), expected, atol=1e-6)
    shifted = ((levels + 26) / 255).astype("float32")  # brighter by 26 levels: the same order of grey levels
    assert np.allclose(np.asarray(Equalize()(shifted)), out, atol=1e-6)
    config = ModelConfig(task="infected", arch="resnet", blocks=1, filters=[4, 8], dense_units=0, image_size=32,
                         contrast="equalize")
    model = build_model(config)
    assert np.allclose(model.predict(shifted, verbose=0), model.predict(x, verbose=0), atol=1e-6)
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    assert np.allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-6)
    version = export_model(model, tmp_path / "export", task="infected")  # its ops pass the SavedModel allow-list
    served = savedmodel.load(version).signatures["predict_images"](images=x)
    assert np.allclose(served["probabilities"].numpy()[:, 1:], model.predict(x, verbose=0), atol=1e-5)


@pytest.mark.parametrize("field, value", [("contrast", "gamma"), ("filters", [8]), ("dense_units", -1)])
def test_resnet_config_errors_name_the_field(field, value):
    config = resnet_model_config("infected")
    setattr(config, field, value)
    with pytest.raises(ValueError, match=field):
        config.validate()


# ---------------------------------------------------------------- the levers


def test_border_erase_zeroes_bands_at_the_edges_only():
    layer = BorderErase(0.2, probability=1.0, seed=0)
    images = np.ones((8, 20, 20, 1), "float32")
    params = {k: np.full((8,), 3.0, "float32") for k in ("top", "bottom", "left", "right")}
    out = np.asarray(layer.apply(images, params))
    assert out[:, :3].max() == 0 and out[:, -3:].max() == 0 and out[:, :, :3].max() == 0 and out[:, :, -3:].max() == 0
    assert out[:, 3:-3, 3:-3].min() == 1
    drawn = layer.sample(500, 20, 20)
    widths = np.concatenate([np.asarray(v) for v in drawn.values()])
    assert widths.min() == 0 and widths.max() <= 4 and widths.mean() > 1
    assert np.array_equal(np.asarray(layer(images, training=False)), images)


def test_strong_augmentation_and_border_erase_come_from_the_data_config():
    cfg = RunConfig()
    cfg.data.augmentation, cfg.data.border_erase = "strong", 0.1
    layers = {layer.name: layer for layer in training.augmenter_for(cfg).layers}
    assert layers["random_rotation"].degrees == 10.0 and layers["random_resized_crop"].scale == (0.5, 1.0)
    assert layers["border_erase"].fraction == 0.1
    assert "border_erase" not in [layer.name for layer in augmentation("study").layers]
    assert set(AUGMENTATION_SETTINGS) == set(AUGMENTATIONS)  # the names config checks are the ones augment builds


def test_preview_draws_the_strong_stack_with_border_erasing(synthetic_dataset, tmp_path):
    out = tmp_path / "preview.png"
    result = CliRunner().invoke(main, ["data", "preview", synthetic_dataset, "--out", str(out), "--images", "1",
                                       "--draws", "1", "--augmentation", "strong", "--border-erase", "0.2"])
    assert result.exit_code == 0, result.output
    assert out.stat().st_size > 1000


def test_label_smoothing_ema_adamw_and_warmup_reach_the_compiled_model():
    model = build_model(ModelConfig(task="infected", blocks=2, filters=[4, 8], dense_units=8))
    train = TrainConfig(epochs=4, optimizer="adamw", weight_decay=1e-3, schedule="cosine", warmup_epochs=1,
                        label_smoothing=0.1, ema=True, learning_rate=0.01)
    training.compile_model(model, train, "infected", steps_per_epoch=5)
    optimizer = model.optimizer
    assert type(optimizer).__name__ == "AdamW" and optimizer.weight_decay == pytest.approx(1e-3)
    assert optimizer.use_ema and optimizer.ema_overwrite_frequency == 5  # the EMA is written in at each epoch's end
    assert model.loss.label_smoothing == pytest.approx(0.1)
    schedule = optimizer._learning_rate
    assert float(schedule(0)) == pytest.approx(0.0)
    assert float(schedule(5)) == pytest.approx(0.01)  # the end of the one warm-up epoch
    assert float(schedule(20)) < 0.001


def test_ema_weights_are_in_the_model_at_each_epoch_s_end():
    model = build_model(ModelConfig(task="infected", blocks=1, filters=[4], dense_units=4, image_size=16))
    training.compile_model(model, TrainConfig(epochs=2, ema=True), "infected", steps_per_epoch=3)
    rng = np.random.default_rng(0)
    x, y = rng.random((12, 16, 16, 1), dtype=np.float32), rng.integers(0, 2, (12, 1)).astype("float32")
    same = []

    def compare(epoch, logs):  # as validation saw them, and before fit's own swap at its very end
        averages = model.optimizer._model_variables_moving_average
        same.append(all(np.allclose(np.asarray(v), np.asarray(a)) for v, a in zip(model.trainable_variables, averages)))

    model.fit(x, y, batch_size=4, epochs=2, verbose=0, callbacks=[keras.callbacks.LambdaCallback(on_epoch_end=compare)])
    assert same == [True, True]


def test_three_class_label_smoothing_on_integer_labels():
    loss, _ = training.loss_and_accuracy("three-class", 0.3)
    y_pred = np.array([[0.8, 0.1, 0.1]], "float32")
    smoothed = keras.losses.CategoricalCrossentropy(label_smoothing=0.3)(np.array([[1.0, 0, 0]]), y_pred)
    assert float(loss(np.array([0]), y_pred)) == pytest.approx(float(smoothed), rel=1e-5)


@pytest.mark.parametrize("section, field, value", [
    ("train", "label_smoothing", 1.0), ("train", "warmup_epochs", -1), ("train", "ema", "yes"),
    ("data", "holdout_fraction", 1.0), ("data", "augmentation", "flips"), ("data", "border_erase", 0.5),
    ("data", "covid_negatives", "normal"),
])
def test_lever_settings_are_checked(section, field, value):
    cfg = RunConfig()
    cfg.data.data_dir = "x"
    setattr(getattr(cfg, section), field, value)
    with pytest.raises(ValueError, match=field):
        cfg.validate()


def test_fit_one_epoch_with_the_resnet_trunk_and_every_lever(tmp_path, synthetic_dataset):
    config = RunConfig(model=resnet_model_config("infected"))
    config.model.filters, config.model.contrast = [4, 4, 8], "standardize"
    config.data.holdout_fraction, config.data.augmentation, config.data.border_erase = 0.2, "strong", 0.1
    config.train = TrainConfig(epochs=1, batch_size=8, optimizer="adamw", schedule="cosine", warmup_epochs=1,
                               label_smoothing=0.1, ema=True)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config.to_dict()))
    result = CliRunner().invoke(main, ["fit", "infected", "--data", synthetic_dataset, "--config", str(path),
                                       "--out", str(tmp_path / "runs"), "--name", "r", "--json"])
    assert result.exit_code == 0, result.output
    run_dir = tmp_path / "runs" / "infected" / "r"
    saved = json.loads((run_dir / "config.json").read_text())
    assert saved["data"]["holdout_fraction"] == 0.2 and saved["train"]["ema"] is True
    model = keras.saving.load_model(run_dir / "model.keras")
    assert model.get_layer("contrast") is not None and model.count_params() == build_model(config.model).count_params()
