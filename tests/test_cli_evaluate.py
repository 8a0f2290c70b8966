import errno
import json
import os
import shutil

import keras
import numpy as np
import pytest
from click.testing import CliRunner
from images import png_declaring

from cxrkeras.cli import main
from cxrkeras.config import CLASSES, DataConfig, ModelConfig, RunConfig
from cxrkeras.models import build_model
from cxrkeras.models.cascade import build_cascade

FIGURES = ("confusion_matrix.png", "roc.png", "pr.png", "calibration.png", "grid.png", "feature_maps.png")


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def tiny(task):
    if task == "infected":
        return build_model(ModelConfig(task=task, blocks=2, filters=[4, 8], dense_units=8))
    config = ModelConfig(task=task, arch="residual", blocks=2, filters=[4, 8], dense_units=8, conv_dropout=0.0)
    return build_model(config)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Untrained tiny models, saved as `cxrkeras fit` and the cascade command leave them."""
    root = tmp_path_factory.mktemp("runs")
    covid_run = root / "covid-run"  # a run dir with config.json: task covid, its own validation carve
    covid_run.mkdir()
    tiny("covid").save(covid_run / "model.keras")
    config = RunConfig(data=DataConfig(val_fraction=0.3, seed=3), model=ModelConfig(task="covid"))
    config.save(covid_run / "config.json")
    three = root / "three.keras"  # a bare .keras file
    tiny("three-class").save(three)
    cascade_dir = root / "cascade"
    cascade_dir.mkdir()
    build_cascade(tiny("infected"), tiny("covid"), {"infected": 0.4}).save(cascade_dir / "model.keras")
    return {"covid": covid_run, "three-class": three, "cascade": cascade_dir}


def table_rows(output):
    rows = {}
    for line in output.splitlines():
        parts = line.split()
        if len(parts) == 5 and parts[0] in ("normal", "infected", "non-covid", "covid"):
            rows[parts[0]] = parts[1:]
    return rows


@pytest.mark.parametrize(
    "kind, classes, n",
    [("covid", ["non-covid", "covid"], 6), ("three-class", ["normal", "non-covid", "covid"], 9),
     ("cascade", ["normal", "non-covid", "covid"], 9)],
)
def test_evaluate_writes_the_table_metrics_and_figures(models, synthetic_dataset, tmp_path, kind, classes, n):
    out = tmp_path / "eval"
    result = run("evaluate", models[kind], "--data", synthetic_dataset, "--split", "test", "--out", out)
    assert result.exit_code == 0, result.output
    assert sorted(table_rows(result.output)) == sorted(classes)
    assert "overall" in result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["classes"] == classes and metrics["n"] == n and metrics["split"] == "test"
    assert sum(metrics["per_class"][c]["support"] for c in classes) == n
    assert len(metrics["confusion"]) == len(classes) and set(metrics["auc"]) == set(classes)
    assert 0 <= metrics["ece"] <= 1 and len(metrics["fingerprint"]) == 16
    for name in FIGURES:
        assert (out / name).stat().st_size > 5000, name
    gradcams = sorted(p for p in os.listdir(out) if p.startswith("gradcam_"))
    assert len(gradcams) == 4 and all((out / p).stat().st_size > 5000 for p in gradcams)
    assert metrics["grid"]["n"] == (6 if kind == "covid" else 9)  # val/: 3 per class, infected only for covid
    if kind == "cascade":
        assert metrics["thresholds"] == {"infected": 0.4, "covid": 0.5}
        assert set(metrics["stage_accuracy"]) >= {"normal_vs_infected", "covid_vs_non_covid"}
        assert "stages: normal vs infected" in result.output
        assert {g["model"] for g in metrics["gradcam"]} <= {"infected_classifier", "covid_classifier"}


def test_validation_split_uses_the_runs_carve_and_image_option(models, synthetic_dataset):
    image = os.path.join(synthetic_dataset, "val", "infected", "covid", "covid-0001.jpg")
    result = run("evaluate", models["covid"], "--data", synthetic_dataset, "--split", "validation",
                 "--image", image, "--json")
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.output)
    assert metrics["validation"] == {"val_fraction": 0.3, "seed": 3}
    assert metrics["n"] == 6  # 3 of 10 per class carved from train, infected classes only
    assert metrics["out_dir"] == os.path.join(str(models["covid"]), "eval-validation")
    assert [g["image"] for g in metrics["gradcam"]] == [image]
    assert len([p for p in os.listdir(metrics["out_dir"]) if p.startswith("gradcam_")]) == 1


def older_binary_model(name):
    """A binary CNN without the TaskInfo layer (saved before it existed, or made elsewhere)."""
    inputs = keras.Input((150, 150, 1))
    x = keras.layers.Conv2D(4, 3, activation="relu", name="conv")(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(1, activation="sigmoid", name="predictions")(x), name=name)


def test_binary_model_without_config_needs_task(synthetic_dataset, tmp_path):
    older_binary_model("my_model").save(tmp_path / "m.keras")  # nothing tells its task
    result = run("evaluate", tmp_path / "m.keras", "--data", synthetic_dataset, "--split", "val")
    assert result.exit_code == 2  # as from `export` and `predict`: a usage error
    assert "--task infected or --task covid" in result.output
    result = run("evaluate", tmp_path / "m.keras", "--data", synthetic_dataset, "--split", "val",
                 "--task", "infected", "--out", tmp_path / "e")
    assert result.exit_code == 0, result.output
    assert sorted(table_rows(result.output)) == ["infected", "normal"]


def test_missing_test_split_names_the_path(models, synthetic_dataset, tmp_path):
    data = tmp_path / "no-test"
    for split in ("train", "val"):
        shutil.copytree(os.path.join(synthetic_dataset, split), data / split)
    result = run("evaluate", models["three-class"], "--data", data, "--split", "test", "--out", tmp_path / "e")
    assert result.exit_code == 1
    assert f"Error: {data / 'test'}: missing split folder" in result.output


def test_compare_prints_a_row_per_evaluation(tmp_path):
    """Two evaluations' metrics.json (the keys `evaluate` writes; its figures are tested above) side by side."""
    outs, rng = [], np.random.default_rng(0)
    for kind in ("three-class", "cascade"):
        out = tmp_path / kind
        out.mkdir()
        per_class = {c: {"f1": float(rng.uniform()), "recall": 0.5, "precision": 0.5} for c in CLASSES}
        metrics = {"model": f"saved_models/{kind}", "kind": kind, "classes": list(CLASSES), "per_class": per_class,
                   "accuracy": float(rng.uniform()), "n": 9, "split": "val"}
        (out / "metrics.json").write_text(json.dumps(metrics))
        outs.append(out)
    result = run("compare", outs[0] / "metrics.json", outs[1], "--chart", tmp_path / "compare.png")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].split() == ["model", "f1-normal", "f1-non-covid", "f1-covid", "accuracy", "n"]
    for kind, out in zip(("three-class", "cascade"), outs):
        metrics = json.loads((out / "metrics.json").read_text())
        row = next(line for line in lines if line.startswith(("three", "cascade")[kind == "cascade"]))
        f1 = [f"{metrics['per_class'][c]['f1']:.4f}" for c in CLASSES]
        assert row.split()[-5:] == [*f1, f"{metrics['accuracy']:.4f}", "9"]
    assert (tmp_path / "compare.png").stat().st_size > 5000


def test_compare_rejects_a_file_that_is_not_metrics(tmp_path):
    (tmp_path / "x.json").write_text('{"a": 1}')
    result = run("compare", tmp_path / "x.json")
    assert result.exit_code == 1 and "not a cxrkeras metrics file" in result.output


def test_models_of_another_input_size_are_evaluated_at_their_size(synthetic_dataset, tmp_path):
    small = {task: build_model(ModelConfig(task=task, blocks=2, filters=[4, 8], dense_units=8, image_size=64))
             for task in ("infected", "covid")}
    for task, model in small.items():
        (tmp_path / task).mkdir()
        model.save(tmp_path / task / "model.keras")
        config = RunConfig(data=DataConfig(data_dir=synthetic_dataset, val_fraction=0.3), model=ModelConfig(task=task))
        config.save(tmp_path / task / "config.json")
    result = run("cascade", tmp_path / "infected", tmp_path / "covid", "--out", tmp_path / "c",
                 "--target-recall", "covid=0.9")
    assert result.exit_code == 0, result.output
    result = run("evaluate", tmp_path / "c", "--data", synthetic_dataset, "--split", "val", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["n"] == 9


def test_long_image_names_give_output_names_that_fit(models, synthetic_dataset, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(synthetic_dataset, data)
    long_name = "covid-" + "x" * 240 + ".jpg"  # 250 bytes: legal, but gradcam_00_...png would not be
    shutil.move(data / "test/infected/covid/covid-0000.jpg", data / "test/infected/covid" / long_name)
    out = tmp_path / "eval"
    image = data / "test/infected/covid" / long_name
    result = run("evaluate", models["covid"], "--data", data, "--split", "test", "--out", out, "--image", image)
    assert result.exit_code == 0, result.output
    (gradcam,) = [name for name in os.listdir(out) if name.startswith("gradcam_")]
    assert len(gradcam.encode()) <= 120 and gradcam.startswith("gradcam_00_covid-xxx") and gradcam.endswith(".png")
    assert json.loads((out / "metrics.json").read_text())["gradcam"][0]["file"] == gradcam


def test_metrics_are_written_before_the_figures(models, synthetic_dataset, tmp_path, monkeypatch):
    from cxrkeras import plots

    def no_room(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "eval" / "roc.png"))

    monkeypatch.setattr(plots, "roc_figure", no_room)  # simulated: the disk fills at the second figure
    out = tmp_path / "eval"
    result = run("evaluate", models["three-class"], "--data", synthetic_dataset, "--split", "test", "--out", out)
    assert result.exit_code == 1
    assert result.output.splitlines()[-1] == f"Error: {out / 'roc.png'}: No space left on device"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n"] == 9 and set(metrics["per_class"]) == {"normal", "non-covid", "covid"}


def test_an_image_the_decoder_refuses_is_named(models, synthetic_dataset, tmp_path):
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_declaring(20000, 20000))
    result = run("evaluate", models["covid"], "--data", synthetic_dataset, "--split", "val", "--image", bomb,
                 "--out", tmp_path / "e")
    assert result.exit_code == 1
    assert f"Error: {bomb}: PNG declares 20000x20000 = 400,000,000 pixels, over the limit" in result.output


def test_each_image_is_predicted_once(models, synthetic_dataset, tmp_path, monkeypatch):
    """On val/ the scores, the audit, the grid and Grad-CAM all show the same images: one prediction each
    (the audit adds its centre-only and border-only copies, filled with zeros and with the image's mean)."""
    from cxrkeras import evaluation

    calls = []  # (model, images) of every prediction
    real_predict = evaluation.cascade_lib.predict

    def counting(model, images, batch_size=64):
        calls.append((model, len(images)))
        return real_predict(model, images, batch_size)

    monkeypatch.setattr(evaluation.cascade_lib, "predict", counting)
    metrics = evaluation.evaluate_run(models["cascade"], synthetic_dataset, split="val", out_dir=tmp_path / "eval",
                                      log=lambda message: None)
    evaluated = calls[0][0]
    # whole, then centre only and border only under each fill
    assert [n for model, n in calls if model is evaluated] == [metrics["n"]] * 5
    assert metrics["grid"]["n"] == metrics["n"] and len(metrics["gradcam"]) == evaluation.GRADCAM_DEFAULT_IMAGES
