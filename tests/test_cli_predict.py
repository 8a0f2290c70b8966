"""`cxrkeras predict`: Keras models and SavedModels, good and broken images, text and JSON output."""

import json

import keras
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from tiny_models import TINY, tiny, write_crafted_savedmodel

from cxrkeras.cli import main
from cxrkeras.config import CLASSES, RunConfig
from cxrkeras.data import load_images
from cxrkeras.models.cascade import predict
from cxrkeras.runs import load_model
from cxrkeras.synth import synth_image


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="session")
def setup(tmp_path_factory, exported_cascade):
    """A cascade folder, its SavedModel export, a binary run folder, good and broken image files."""
    root = tmp_path_factory.mktemp("predict")
    cascade_dir, serving = exported_cascade["cascade"], exported_cascade["base"]
    run_dir = root / "run"
    run_dir.mkdir()
    tiny("covid").save(run_dir / "model.keras")
    RunConfig(model=TINY["covid"]).save(run_dir / "config.json")

    rng = np.random.default_rng(0)
    images = root / "images"
    images.mkdir()
    good = []
    for i, label in enumerate(("normal", "covid", "non-covid")):
        path = images / f"{label}.{'jpg' if i == 2 else 'png'}"
        Image.fromarray(synth_image(label, rng), "L").save(path)
        good.append(str(path))
    corrupt = images / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(200)))
    text = images / "notes.txt"
    text.write_text("not an image")
    bad = {
        str(corrupt): "does not decode",
        str(text): "not an image",
        str(images / "missing.png"): "no such file",
    }
    return {"cascade": cascade_dir, "serving": serving, "run": run_dir, "good": good, "bad": bad}


def test_predict_names_each_image_and_each_failure(setup):
    good, bad = setup["good"], list(setup["bad"])
    order = [good[0], bad[0], good[1], bad[1], bad[2], good[2]]
    result = run("predict", setup["cascade"], *order)
    assert result.exit_code == 1
    lines = result.output.splitlines()
    assert len(lines) == len(order)
    model = load_model(setup["cascade"])
    probabilities, class_ids = predict(model, load_images(good))
    expected = dict(zip(good, zip(probabilities, class_ids)))
    for path, line in zip(order, lines):
        fields = line.split("\t")
        assert fields[0] == path
        if path in setup["bad"]:
            assert fields[1].startswith("error: " + setup["bad"][path])
        else:
            p, k = expected[path]
            assert fields[1] == CLASSES[k]
            assert fields[2] == " ".join(f"{n}={v:.4f}" for n, v in zip(CLASSES, p))


def test_predict_json_parses(setup):
    result = run("predict", setup["cascade"], setup["good"][0], *setup["bad"], "--json")
    assert result.exit_code == 1
    results = json.loads(result.output)
    assert [r["path"] for r in results] == [setup["good"][0], *setup["bad"]]
    first = results[0]
    assert set(first) == {"path", "class", "class_id", "probabilities", "adapted", "calibrated"}
    assert first["adapted"] is None and first["calibrated"] is None  # a plain cascade folder
    assert list(first["probabilities"]) == list(CLASSES)
    assert sum(first["probabilities"].values()) == pytest.approx(1, abs=1e-5)
    assert first["class"] == CLASSES[first["class_id"]]
    for r, reason in zip(results[1:], setup["bad"].values()):
        assert set(r) == {"path", "error"} and r["error"].startswith(reason)


def test_savedmodel_and_keras_agree(setup):
    keras_out = json.loads(run("predict", setup["cascade"], *setup["good"], "--json").output)
    # the base folder (highest version) and the version folder itself
    for model in (setup["serving"], setup["serving"] / "1"):
        result = run("predict", model, *setup["good"], "--json", "--batch-size", "2")
        assert result.exit_code == 0, result.output
        served = json.loads(result.output)
        assert [r["class"] for r in served] == [r["class"] for r in keras_out]
        for a, b in zip(served, keras_out):
            np.testing.assert_allclose(list(a["probabilities"].values()), list(b["probabilities"].values()), atol=1e-5)


def test_binary_run_uses_its_task(setup):
    result = run("predict", setup["run"], setup["good"][1])
    assert result.exit_code == 0, result.output
    path, name, probabilities = result.output.strip().split("\t")
    assert name in ("non-covid", "covid") and probabilities.startswith("non-covid=")


def test_predict_model_errors(setup, tmp_path):
    result = run("predict", tmp_path / "none", setup["good"][0])
    assert result.exit_code == 1
    assert f"Error: {tmp_path / 'none'}: no such file or folder" in result.output
    inputs = keras.Input((150, 150, 1))  # a binary model that does not say its task (made elsewhere)
    outputs = keras.layers.Dense(1, activation="sigmoid")(keras.layers.Flatten()(inputs))
    keras.Model(inputs, outputs, name="anonymous").save(tmp_path / "m.keras")
    result = run("predict", tmp_path / "m.keras", setup["good"][0])
    assert result.exit_code == 2 and "--task" in result.output
    result = run("predict", tmp_path / "m.keras", setup["good"][0], "--task", "infected")
    assert result.exit_code == 0 and "\tnormal=" in result.output


@pytest.mark.parametrize("command", ["cascade", "export", "predict", "serve"])
def test_commands_have_help(command):
    result = run(command, "--help")
    assert result.exit_code == 0 and "Usage:" in result.output and len(result.output.splitlines()) > 5


def test_a_crafted_savedmodel_is_refused_unless_trusted(setup, tmp_path):
    marker = tmp_path / "written"
    crafted = write_crafted_savedmodel(tmp_path / "crafted" / "1", marker)
    result = run("predict", crafted.parent, setup["good"][0])
    assert result.exit_code == 1
    assert f"Error: {crafted}: the SavedModel's graph runs ops that cxrkeras does not allow: WriteFile" in result.output
    assert "--trust-model" in result.output and not marker.exists()
    result = run("predict", crafted.parent, setup["good"][0], "--trust-model")
    assert result.exit_code == 0 and result.output.split("\t")[1] == "covid" and marker.exists()
