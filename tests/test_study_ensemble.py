"""An ensemble cascade: each stage averages several classifiers; built, saved, exported and explained like one."""

import json

import numpy as np
import pytest
from click.testing import CliRunner
from tiny_models import tiny

from cxrkeras import explain
from cxrkeras import export as export_lib
from cxrkeras.cli import main
from cxrkeras.explain import explained_model
from cxrkeras.models import build_cascade, build_ensemble, ensemble_members, explained_classifier, model_kind
from cxrkeras.models.cascade import ModelError
from cxrkeras.runs import load_model, model_task


def images(n=6):
    return np.random.default_rng(3).random((n, 150, 150, 1), dtype=np.float32)


def members_mean(members, x):
    return np.mean([m.predict(x, verbose=0)[:, 0] for m in members], axis=0)


@pytest.fixture(scope="module")
def ensemble_runs(tmp_path_factory):
    """Three infected and two covid .keras files, each of its own random weights."""
    root = tmp_path_factory.mktemp("ensemble-runs")
    files = {"infected": [], "covid": []}
    for task, n in (("infected", 3), ("covid", 2)):
        for i in range(n):
            path = root / f"{task}{i}.keras"
            tiny(task, scale=20.0 + 10 * i).save(path)
            files[task].append(str(path))
    return files


def test_an_ensemble_is_the_mean_of_its_members():
    members = [tiny("covid", scale=s) for s in (20.0, 40.0, 60.0)]
    ensemble = build_ensemble(members, "covid")
    x = images()
    assert model_kind(ensemble) == "binary" and model_task(ensemble) == "covid"
    assert np.abs(ensemble.predict(x, verbose=0)[:, 0] - members_mean(members, x)).max() < 1e-6
    assert ensemble_members(ensemble) == members and explained_classifier(ensemble) is members[0]


def test_an_ensemble_refuses_one_member_or_other_kinds():
    with pytest.raises(ModelError, match="two or more binary classifiers"):
        build_ensemble([tiny("covid")], "covid")
    with pytest.raises(ModelError, match="three-class"):
        build_ensemble([tiny("covid"), tiny("three-class")], "covid")


def test_the_cascade_command_averages_runs_given_with_commas(ensemble_runs, tmp_path):
    out = tmp_path / "cascade"
    result = CliRunner().invoke(main, ["cascade", ",".join(ensemble_runs["infected"]),
                                       ",".join(ensemble_runs["covid"]), "--out", str(out), "--threshold", "covid=0.4"])
    assert result.exit_code == 0, result.output
    record = json.loads((out / "cascade.json").read_text())
    assert record["sources"] == ensemble_runs
    cascade = load_model(out)  # through .keras save and load
    x = images()
    p_i = members_mean([load_model(p) for p in ensemble_runs["infected"]], x)
    p_c = members_mean([load_model(p) for p in ensemble_runs["covid"]], x)
    expected = np.stack([1 - p_i, p_i * (1 - p_c), p_i * p_c], axis=-1)
    assert np.abs(cascade.predict(x, verbose=0)["probabilities"] - expected).max() < 1e-6

    version = export_lib.export(out, tmp_path / "serving")  # and through the SavedModel
    import tensorflow as tf

    served = tf.saved_model.load(str(version)).signatures["predict_images"](images=tf.constant(x))
    assert np.abs(served["probabilities"].numpy() - expected).max() < 1e-6
    assert np.array_equal(served["class_id"].numpy(), cascade.predict(x, verbose=0)["class_id"])


def test_an_ensemble_cascade_is_explained_by_each_stage_s_first_member(ensemble_runs):
    infected = build_ensemble([load_model(p) for p in ensemble_runs["infected"]], "infected")
    covid = build_ensemble([load_model(p) for p in ensemble_runs["covid"]], "covid")
    cascade = build_cascade(infected, covid)
    assert explained_model(cascade, "cascade", 0) == (ensemble_members(infected)[0], 0)
    assert explained_model(cascade, "cascade", 2) == (ensemble_members(covid)[0], 1)
    explainers = explain.stage_explainers(cascade, "cascade")
    assert [name for name, _, _ in explainers] == ["infected_member1", "covid_member1"]
