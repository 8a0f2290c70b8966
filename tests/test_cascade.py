"""The cascade model: formula, decision rule, thresholds through save/load, operating point, `cascade` command."""

import errno
import json
import math
import os
import shutil

import keras
import numpy as np
import pytest
from click.testing import CliRunner
from tiny_models import write_runs

from cxrkeras.cli import main
from cxrkeras.config import CLASSES, ModelConfig, RunConfig
from cxrkeras.data import load_splits
from cxrkeras.models import build_model
from cxrkeras.models.cascade import (
    CascadeDecision,
    ModelError,
    build_cascade,
    cascade_thresholds,
    model_kind,
    predict,
    predict_classes,
    predict_probabilities,
)
from cxrkeras.runs import TaskUnknownError, class_names, load_model, model_task, run_config
from cxrkeras.thresholds import choose_thresholds

TINY = {
    "infected": ModelConfig(task="infected", blocks=2, filters=[4, 8], dense_units=8),
    "covid": ModelConfig(task="covid", arch="residual", blocks=1, filters=[4, 8], dense_units=8),
    "three-class": ModelConfig(task="three-class", arch="residual", blocks=1, filters=[4, 8], dense_units=8),
}


def tiny(task):
    return build_model(TINY[task])


def force(model, p):
    """Make a binary model answer `p` for every image (zero kernel, bias logit(p))."""
    layer = model.get_layer("predictions")
    kernel, bias = layer.get_weights()
    layer.set_weights([np.zeros_like(kernel), np.full_like(bias, math.log(p / (1 - p)))])
    return model


def images(n=4):
    return np.random.default_rng(1).random((n, 150, 150, 1), dtype=np.float32)


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


# ---------------------------------------------------------------- the model


def test_cascade_probabilities_follow_the_formula():
    infected, covid = tiny("infected"), tiny("covid")
    # Spread the untrained outputs so the formula is tested away from 0.5.
    for model in (infected, covid):
        layer = model.get_layer("predictions")
        kernel, bias = layer.get_weights()
        layer.set_weights([kernel * 40, bias])
    model = build_cascade(infected, covid)
    x = images(6)
    out = model.predict(x, verbose=0)
    p_i = infected.predict(x, verbose=0)[:, 0]
    p_c = covid.predict(x, verbose=0)[:, 0]
    expected = np.stack([1 - p_i, p_i * (1 - p_c), p_i * p_c], axis=-1)
    assert model.name == "cascade" and set(out) == {"probabilities", "class_id"}
    assert out["probabilities"].shape == (6, 3) and out["probabilities"].dtype == np.float32
    np.testing.assert_allclose(out["probabilities"], expected, atol=1e-6)
    np.testing.assert_allclose(out["probabilities"].sum(axis=1), 1.0, atol=1e-6)
    assert out["class_id"].dtype == np.int32
    np.testing.assert_array_equal(out["class_id"], np.where(p_i <= 0.5, 0, np.where(p_c > 0.5, 2, 1)))
    assert model.get_layer("covid_classifier") is covid
    assert model.get_layer("infected_classifier") is infected


def test_decision_rule_honours_thresholds_and_boundaries():
    layer = CascadeDecision(0.3, 0.7)
    p_i = np.array([[0.1], [0.29], [0.31], [0.9], [0.9], [0.5]], dtype="float32")
    p_c = np.array([[0.99], [0.9], [0.69], [0.71], [0.5], [0.95]], dtype="float32")
    _, class_id = layer([p_i, p_c])
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(class_id), [0, 0, 1, 2, 1, 2])
    # exactly at the thresholds: p_i <= t_i is normal, p_c == t_c is not covid
    layer = CascadeDecision(0.25, 0.75)
    _, class_id = layer([np.array([[0.25], [0.5]], "float32"), np.array([[0.9], [0.75]], "float32")])
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(class_id), [0, 1])


@pytest.mark.parametrize(
    "infected, covid, expected",
    [(0.5, 0.5, 2), (0.5, 0.7, 2), (0.65, 0.5, 0), (0.5, 0.9, 1)],
)
def test_cascade_decides_with_its_thresholds(infected, covid, expected):
    model = build_cascade(force(tiny("infected"), 0.6), force(tiny("covid"), 0.8), {"infected": infected, "covid": covid})
    probabilities, class_id = predict(model, images(2))
    np.testing.assert_allclose(probabilities[0], [0.4, 0.6 * 0.2, 0.6 * 0.8], atol=1e-6)
    np.testing.assert_array_equal(class_id, [expected, expected])
    np.testing.assert_array_equal(predict_classes(model, probabilities), [expected, expected])
    assert cascade_thresholds(model) == {"infected": infected, "covid": covid}


def test_thresholds_survive_keras_save_and_load(tmp_path):
    model = build_cascade(force(tiny("infected"), 0.6), force(tiny("covid"), 0.8), {"infected": 0.3, "covid": 0.9})
    (tmp_path / "run").mkdir()
    model.save(tmp_path / "run" / "model.keras")
    for path in (tmp_path / "run" / "model.keras", tmp_path / "run"):
        loaded = load_model(path)
        assert model_kind(loaded) == "cascade"
        assert cascade_thresholds(loaded) == {"infected": 0.3, "covid": 0.9}
        assert loaded.get_layer("covid_classifier").name == "covid_classifier"
        np.testing.assert_array_equal(predict(loaded, images(2))[1], [1, 1])  # 0.8 <= 0.9: non-covid


def test_build_cascade_rejects_wrong_models():
    with pytest.raises(ModelError, match="binary classifier"):
        build_cascade(tiny("three-class"), tiny("covid"))
    with pytest.raises(ValueError, match=r"The `covid` threshold must be a number in \[0, 1\]. Received: covid=1.5"):
        build_cascade(tiny("infected"), tiny("covid"), {"infected": 0.5, "covid": 1.5})
    with pytest.raises(ValueError, match=r"Unknown threshold names \['normal'\]"):
        build_cascade(tiny("infected"), tiny("covid"), {"normal": 0.5})


def test_a_cascade_saved_with_the_old_threshold_names_loads():
    config = {**CascadeDecision(0.3, 0.9).get_config(), "t_infected": 0.2, "t_covid": 0.8}
    del config["infected"], config["covid"]
    layer = CascadeDecision.from_config(config)
    assert (layer.infected, layer.covid) == (0.2, 0.8)
    assert set(CascadeDecision(0.3, 0.9).get_config()) >= {"infected", "covid"}


def test_load_model_names_the_path_and_what_was_expected(tmp_path):
    with pytest.raises(ModelError, match=r"nowhere: no such file or folder; expected a \.keras file"):
        load_model(tmp_path / "nowhere")
    with pytest.raises(ModelError, match="folder without model.keras"):
        load_model(tmp_path)
    (tmp_path / "weights.h5").write_bytes(b"x")
    with pytest.raises(ModelError, match=r"weights.h5: not a \.keras file"):
        load_model(tmp_path / "weights.h5")
    (tmp_path / "broken.keras").write_bytes(b"not a zip")
    with pytest.raises(ModelError, match="broken.keras: does not load as a Keras model"):
        load_model(tmp_path / "broken.keras")


def test_predict_probabilities_per_kind():
    x = images(3)
    binary = force(tiny("infected"), 0.7)
    probabilities = predict_probabilities(binary, x)
    assert model_kind(binary) == "binary"
    np.testing.assert_allclose(probabilities, [[0.3, 0.7]] * 3, atol=1e-6)
    np.testing.assert_array_equal(predict_classes(binary, probabilities), [1, 1, 1])
    np.testing.assert_array_equal(predict_classes(binary, [[0.5, 0.5], [0.6, 0.4]]), [0, 0])  # p > 0.5 only
    three = tiny("three-class")
    probabilities = predict_probabilities(three, x)
    assert model_kind(three) == "three-class" and probabilities.shape == (3, 3)
    np.testing.assert_array_equal(predict_classes(three, probabilities), probabilities.argmax(axis=1))


def older_binary_model(name):
    """A binary classifier without a TaskInfo layer, as models saved before it (or made elsewhere) are."""
    inputs = keras.Input((150, 150, 1))
    outputs = keras.layers.Dense(1, activation="sigmoid", name="predictions")(keras.layers.Flatten()(inputs))
    return keras.Model(inputs, outputs, name=name)


def test_model_task_from_config_name_or_argument(tmp_path):
    model = older_binary_model("infected_classifier")
    assert model_task(model) == "infected"  # the builder's name
    model.name = "renamed"
    assert model_task(model) is None
    with pytest.raises(TaskUnknownError, match="pass its task"):
        class_names(model)
    assert class_names(model, task="covid") == ("non-covid", "covid")
    RunConfig(model=ModelConfig(task="covid")).save(tmp_path / "config.json")
    assert model_task(model, tmp_path / "model.keras") == "covid"
    with pytest.raises(ModelError, match="does not match"):
        model_task(model, tmp_path, task="infected")
    assert class_names(tiny("three-class")) == CLASSES


def test_a_model_says_what_it_is_wherever_its_file_goes(tmp_path):
    """A covid classifier saved into an infected run's folder is still the covid classifier."""
    RunConfig(model=ModelConfig(task="infected")).save(tmp_path / "config.json")
    model = tiny("covid")
    model.name = "renamed"  # neither the folder nor the name tells
    model.save(tmp_path / "model.keras")
    loaded = load_model(tmp_path)
    assert model_task(loaded, tmp_path) == "covid"
    assert class_names(loaded, tmp_path) == ("non-covid", "covid")
    with pytest.raises(ModelError, match="`task` 'infected' does not match the model"):
        class_names(loaded, tmp_path, task="infected")
    assert loaded.count_params() == model.count_params()  # the TaskInfo layer has no weights


# ---------------------------------------------------------------- operating point


def constructed_validation(n=200, seed=0):
    """Probabilities that separate the classes imperfectly, as trained classifiers would."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, n)
    p_i = np.clip(np.where(labels == 0, 0.3, 0.7) + rng.normal(0, 0.2, n), 0, 1)
    p_c = np.clip(np.where(labels == 2, 0.65, 0.35) + rng.normal(0, 0.2, n), 0, 1)
    return p_i, p_c, labels


def test_choose_thresholds_reaches_the_target_with_best_accuracy():
    p_i, p_c, labels = constructed_validation()
    result = choose_thresholds(p_i, p_c, labels, {"covid": 0.95})
    chosen = result["chosen"]
    assert result["reached"] and chosen["recall"] >= 0.95
    assert result["thresholds"] == {"infected": chosen["infected"], "covid": chosen["covid"]}
    reaching = [r for r in result["table"] if r["recall"] >= 0.95]
    assert chosen["accuracy"] == max(r["accuracy"] for r in reaching)
    # the study's 0.5 / 0.5 misses this target on this data: the choice moved
    assert result["default"]["recall"] < 0.95 and result["thresholds"]["covid"] < 0.5
    # the row's numbers are what the rule gives at those thresholds
    pred = np.where(p_i <= chosen["infected"], 0, np.where(p_c > chosen["covid"], 2, 1))
    assert chosen["fn"] == np.sum((labels == 2) & (pred != 2))
    assert chosen["fp"] == np.sum((labels != 2) & (pred == 2))
    assert chosen["accuracy"] == pytest.approx(np.mean(pred == labels))


def test_tradeoff_is_monotone_in_the_covid_threshold():
    p_i, p_c, labels = constructed_validation()
    table = choose_thresholds(p_i, p_c, labels, {"covid": 0.9})["table"]
    line = sorted((r for r in table if r["infected"] == 0.5), key=lambda r: r["covid"])
    assert len(line) >= 19
    recalls, fns, fps = ([r[k] for r in line] for k in ("recall", "fn", "fp"))
    assert all(a >= b for a, b in zip(recalls, recalls[1:]))
    assert all(a <= b for a, b in zip(fns, fns[1:]))
    assert all(a >= b for a, b in zip(fps, fps[1:]))
    assert fns[0] < fns[-1] and fps[0] > fps[-1]


def test_choose_thresholds_for_normal_and_unreachable_targets():
    p_i, p_c, labels = constructed_validation()
    normal = choose_thresholds(p_i, p_c, labels, {"normal": 0.9})
    assert normal["chosen"]["recall"] >= 0.9 and normal["class"] == "normal"
    # all covid images look non-covid: no threshold pair in the grid finds them all
    p_c = np.where(labels == 2, 0.02, p_c)
    result = choose_thresholds(p_i, p_c, labels, {"covid": 0.99})
    assert not result["reached"]
    assert result["chosen"]["recall"] == max(r["recall"] for r in result["table"])


@pytest.mark.parametrize("target", [{"flu": 0.9}, {"covid": 1.5}, {"covid": 0.9, "normal": 0.9}, "covid=0.9"])
def test_choose_thresholds_rejects_bad_targets(target):
    with pytest.raises(ValueError, match="target"):
        choose_thresholds([0.5], [0.5], [2], target)


# ---------------------------------------------------------------- the `cascade` command


@pytest.fixture(scope="session")
def runs(tmp_path_factory, synthetic_dataset):
    """Two run folders as `fit` writes them (model.keras + config.json), split with val_fraction 0.3."""
    return write_runs(tmp_path_factory.mktemp("runs"), synthetic_dataset)


def test_cascade_command_rejects_swapped_runs(runs, tmp_path):
    result = run("cascade", runs["covid"], runs["infected"], "--out", tmp_path / "c")
    assert result.exit_code == 1
    expected = f"Error: {runs['covid']}: the covid classifier given where the infected classifier was expected"
    assert expected in result.output
    assert "swapped" in result.output
    assert not (tmp_path / "c" / "model.keras").exists()


def test_cascade_command_picks_thresholds_on_validation(runs, tmp_path, synthetic_dataset):
    out = tmp_path / "cascade"
    result = run("cascade", runs["infected"], runs["covid"], "--out", out, "--target-recall", "covid=0.9", "--json")
    assert result.exit_code == 0, result.output
    record = json.loads((out / "cascade.json").read_text())
    summary = json.loads(result.output)
    # the runs' own split settings are used: the validation images are those the runs held out
    expected = load_splits(synthetic_dataset, 0.3, 1).validation
    assert record["validation"] == {"data": synthetic_dataset, "val_fraction": 0.3, "seed": 1, "images": len(expected)}
    assert record["sources"] == {"infected": str(runs["infected"]), "covid": str(runs["covid"])}
    assert summary["thresholds"] == record["thresholds"]
    assert record["selection"]["class"] == "covid" and len(record["table"]) == 19 * 19
    assert os.path.getsize(out / "threshold_tradeoff.png") > 1000
    model = load_model(out)
    assert cascade_thresholds(model) == record["thresholds"]


def test_cascade_command_with_fixed_thresholds(runs, tmp_path):
    result = run("cascade", runs["infected"], runs["covid"], "--out", tmp_path, "--threshold", "covid=0.8")
    assert result.exit_code == 0, result.output
    assert "infected=0.50, covid=0.80" in result.output
    assert cascade_thresholds(load_model(tmp_path)) == {"infected": 0.5, "covid": 0.8}
    assert "table" not in json.loads((tmp_path / "cascade.json").read_text())


@pytest.mark.parametrize("value", ["covid:0.9", "flu=0.9", "covid=high", "covid=1.2"])
def test_cascade_command_rejects_bad_target_recall(runs, tmp_path, value):
    result = run("cascade", runs["infected"], runs["covid"], "--out", tmp_path, "--target-recall", value)
    assert result.exit_code == 2
    assert "Invalid value for '--target-recall'" in result.output and repr(value) in result.output


def test_cascade_command_takes_both_thresholds_by_name(runs, tmp_path):
    result = run("cascade", runs["infected"], runs["covid"], "--out", tmp_path, "--threshold", "infected=0.3",
                 "--threshold", "covid=0.6", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["thresholds"] == {"infected": 0.3, "covid": 0.6}
    assert cascade_thresholds(load_model(tmp_path)) == pytest.approx({"infected": 0.3, "covid": 0.6})


@pytest.mark.parametrize("value", ["covid:0.7", "normal=0.5", "covid=high", "covid=1.2"])
def test_cascade_command_rejects_bad_threshold(runs, tmp_path, value):
    result = run("cascade", runs["infected"], runs["covid"], "--out", tmp_path, "--threshold", value)
    assert result.exit_code == 2
    assert "Invalid value for '--threshold'" in result.output and repr(value) in result.output
    assert "infected, covid" in result.output


def test_cascade_command_refuses_a_folder_holding_a_model(runs, tmp_path):
    result = run("cascade", runs["infected"], runs["covid"], "--out", runs["infected"])
    assert result.exit_code == 1
    assert f"Error: {runs['infected'] / 'model.keras'}: a model is already there" in result.output
    assert model_kind(load_model(runs["infected"])) == "binary"  # the classifier's run is untouched
    out = tmp_path / "cascade"
    assert run("cascade", runs["infected"], runs["covid"], "--out", out).exit_code == 0
    result = run("cascade", runs["infected"], runs["covid"], "--out", out, "--threshold", "covid=0.7")
    assert result.exit_code == 1 and "--overwrite" in result.output
    result = run("cascade", runs["infected"], runs["covid"], "--out", out, "--threshold", "covid=0.7", "--overwrite")
    assert result.exit_code == 0, result.output
    assert cascade_thresholds(load_model(out)) == {"infected": 0.5, "covid": 0.7}
    assert sorted(os.listdir(out)) == ["cascade.json", "model.keras"]  # no temporary file left behind


def test_cascade_command_on_a_full_disk_is_one_line_and_leaves_no_half_model(runs, tmp_path, monkeypatch):
    """Simulated: keras' save writes part of the file, then raises ENOSPC, as a disk filling mid-write does."""

    def full_disk(model, path, **kwargs):
        with open(path, "wb") as f:
            f.write(b"PK half a zip")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(keras.saving, "save_model", full_disk)
    out = tmp_path / "cascade"
    result = run("cascade", runs["infected"], runs["covid"], "--out", out)
    assert result.exit_code == 1
    assert result.output == f"Error: {out / 'model.keras'}: No space left on device\n"
    assert os.listdir(out) == []


def test_corrupt_config_beside_a_model_is_a_one_line_error(runs, tmp_path):
    folder = tmp_path / "run"
    shutil.copytree(runs["covid"], folder)
    (folder / "config.json").write_text('{"model": {"task": "covid"')
    with pytest.raises(ModelError, match=r"config.json: not a run's config.json \(not valid JSON"):
        run_config(folder)
    result = run("cascade", runs["infected"], folder, "--out", tmp_path / "c", "--target-recall", "covid=0.9")
    assert result.exit_code == 1
    assert result.output.startswith(f"Error: {folder / 'config.json'}: not a run's config.json")
    assert len(result.output.splitlines()) == 1


def test_cascade_command_usage_errors(runs, tmp_path):
    result = run("cascade", runs["infected"], runs["covid"], "--out", tmp_path, "--seed", "3")
    assert result.exit_code == 2 and "only apply with --target-recall" in result.output
    result = run("cascade", runs["infected"], runs["covid"], "--out", tmp_path, "--threshold", "covid=0.7",
                 "--target-recall", "covid=0.9")
    assert result.exit_code == 2 and "--threshold and --target-recall exclude each other" in result.output
    result = run("cascade", runs["infected"], tmp_path / "missing", "--out", tmp_path)
    assert result.exit_code == 1 and f"Error: {tmp_path / 'missing'}: no such file or folder" in result.output
    for task in ("infected", "covid"):  # bare .keras files: no config.json names the dataset
        shutil.copy(runs[task] / "model.keras", tmp_path / f"{task}.keras")
    result = run("cascade", tmp_path / "infected.keras", tmp_path / "covid.keras", "--out", tmp_path / "c",
                 "--target-recall", "covid=0.9")
    assert result.exit_code == 2 and "--data on the command line" in result.output


def test_a_cascade_of_bf16_trained_runs_computes_in_float32(tmp_path):
    """Runs trained in mixed bfloat16 make a cascade (and so an export) that answers as float32 anywhere."""
    from cxrkeras.thresholds import make_cascade

    paths = {}
    for task in ("infected", "covid"):
        model = build_model(TINY[task], dtype="mixed_bfloat16")
        assert model.get_layer("block1_conv" if task == "infected" else "stem_conv1").compute_dtype == "bfloat16"
        paths[task] = tmp_path / f"{task}.keras"
        model.save(paths[task])
    make_cascade(paths["infected"], paths["covid"], tmp_path / "cascade")
    cascade = load_model(tmp_path / "cascade")
    layers = [layer for member in cascade.layers if isinstance(member, keras.Model) for layer in member.layers]
    assert len(layers) > 10 and {layer.compute_dtype for layer in layers} == {"float32"}
