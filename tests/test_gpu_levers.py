"""experiments/gpu_levers.py: the recipes it trains, their order, the scores it tables, what it brings back."""

import json
import os
import tarfile

import keras
import numpy as np
import pytest

from cxrkeras.thresholds import choose_thresholds
from tests.scripts import load_script

levers = load_script("experiments/gpu_levers.py")


def flat(config):
    return {f"{section}.{key}": value for section, values in config.items() if isinstance(values, dict)
            for key, value in values.items()}


@pytest.mark.parametrize("task", ["infected", "covid"])
def test_each_lever_changes_only_its_setting_of_long(task):
    long = flat(levers.recipe_config("long", task))
    resnet = flat(levers.recipe_config("resnet", task))
    assert {k for k in long if long[k] != resnet[k]} == {"train.epochs"}
    assert long["train.epochs"] == 3 * resnet["train.epochs"] == levers.LONG_EPOCHS[task]
    for name, change in levers.LEVERS.items():
        config = flat(levers.recipe_config(name, task))
        assert {k for k in config if config[k] != long[k]} == set(change), name
        assert all(config[k] == (v[task] if isinstance(v, dict) else v) for k, v in change.items())


def test_the_later_rounds_name_known_recipes_both_stages_and_three_seeds():
    for round_jobs in (levers.THIRD_JOBS, levers.FOURTH_JOBS, levers.FIFTH_JOBS):
        jobs = [j.split(":") for j in round_jobs]
        assert all(r in levers.LEVERS and t in levers.TASKS and s in "012" for r, t, s in jobs)
        assert all([r, other, s] in jobs for r, _, s in jobs for other in levers.TASKS)
    assert levers.recipe_config("long-x2", "covid")["train"]["epochs"] == 2 * levers.LONG_EPOCHS["covid"]


def test_as_float_resizes_as_the_pipeline_decodes():
    x = np.random.default_rng(0).integers(0, 256, (3, 150, 150, 1)).astype("uint8")
    assert np.array_equal(levers.as_float(x), x / np.float32(255))
    big = levers.as_float(x, 224)
    assert big.shape == (3, 224, 224, 1) and big.dtype == np.float32
    assert abs(big.mean() - x.mean() / 255) < 2e-3  # an upsampling keeps the mean grey level


def test_jobs_run_groups_in_priority_order_with_both_stages_of_each_seed():
    jobs = levers.jobs()
    group_of = {r: i for i, (recipes, _) in enumerate(levers.PRIORITY) for r in recipes}
    groups = [group_of[r] for r, _, _ in jobs]
    assert groups == sorted(groups)
    assert ("study", "infected", 0) not in jobs and ("study", "covid", 0) not in jobs  # the timing runs are those
    pairs = {(r, s) for r, _, s in jobs}
    assert all((r, t, s) in jobs for r, s in pairs for t in levers.TASKS)
    assert len(jobs) == len(set(jobs)) == 2 * sum(len(r) * len(s) for r, s in levers.PRIORITY) - 2


def test_task_arrays_follow_the_cascade_stages():
    x = np.arange(5)[:, None, None, None].astype("uint8")
    labels3 = np.array([0, 1, 2, 2, 1])
    xi, yi = levers.task_xy(x, labels3, "infected")
    assert yi.reshape(-1).tolist() == [0, 1, 1, 1, 1] and yi.dtype == np.float32 and len(xi) == 5
    xc, yc = levers.task_xy(x, labels3, "covid")
    assert xc.reshape(-1).tolist() == [1, 2, 3, 4] and yc.reshape(-1).tolist() == [0, 1, 1, 0]
    xa, ya = levers.task_xy(x, labels3, "covid", "all")
    assert xa.reshape(-1).tolist() == [0, 1, 2, 3, 4] and ya.reshape(-1).tolist() == [0, 0, 1, 1, 0]


def test_cascade_scores_pick_thresholds_on_the_holdout_and_score_validation():
    rng = np.random.default_rng(0)
    labels = {sp: rng.integers(0, 3, 60) for sp in ("holdout", "validation")}
    p_i = {sp: np.clip((labels[sp] > 0) * 0.6 + rng.random(60) * 0.5, 0, 1) for sp in labels}
    p_c = {sp: np.clip((labels[sp] == 2) * 0.5 + rng.random(60) * 0.6, 0, 1) for sp in labels}
    scores = levers.cascade_scores(p_i, p_c, labels)
    pick = choose_thresholds(p_i["holdout"], p_c["holdout"], labels["holdout"], {"covid": 0.5})
    assert (scores["t_infected"], scores["t_covid"]) == (pick["t_infected"], pick["t_covid"])
    pred = np.where(p_i["validation"] <= pick["t_infected"], 0, np.where(p_c["validation"] > pick["t_covid"], 2, 1))
    assert scores["accuracy"] == pytest.approx(np.mean(pred == labels["validation"]))
    assert scores["n"] == 60 and len(scores["f1"]) == 3
    normals = labels["validation"] == 0  # the covid stage alone on the normal X-rays
    assert scores["normals_called_covid"] == pytest.approx(np.mean(p_c["validation"][normals] > pick["t_covid"]),
                                                            abs=1e-4)


def test_collect_merges_results_and_packs_members_by_priority_within_the_limit(tmp_path, monkeypatch):
    work, out = tmp_path / "work", tmp_path / "out"
    work.mkdir(), out.mkdir()
    monkeypatch.setattr(levers, "MEMBER_TAR_BYTES", 2500)
    names = [levers.job_name(*job) for job in levers.jobs()[:12]]
    for name in reversed(names):  # written in another order than the priority
        (work / f"{name}.keras").write_bytes(b"x" * 1000)
        (work / f"{name}.json").write_text(json.dumps({"name": name}))
    levers.collect(str(work), str(out))
    assert sorted(r["name"] for r in json.loads((out / "results.json").read_text())) == sorted(names)
    tars = sorted(os.listdir(out))
    assert tars == ["members-1.tar", "members-2.tar", "members-3.tar", "members-4.tar", "results.json"]
    packed = []
    for name in tars[:-1]:
        with tarfile.open(out / name) as tar:
            packed += tar.getnames()
    assert packed == [f"{n}.keras" for n in names[:8]]  # two per tar, four tars; the last four stay behind


def test_best_weights_keeps_the_epoch_with_the_best_monitored_value():
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    best = levers.BestWeights(model, "val_loss")
    for epoch, loss in enumerate([0.5, 0.3, 0.4]):
        model.set_weights([np.full((2, 1), epoch, "float32"), np.zeros(1, "float32")])
        best.on_epoch_end(epoch, {"val_loss": loss})
    assert best.epoch == 1 and np.all(best.weights[0] == 1)
    best = levers.BestWeights(model, "val_accuracy")
    for epoch, accuracy in enumerate([0.5, 0.7, 0.6]):
        best.on_epoch_end(epoch, {"val_accuracy": accuracy})
    assert best.epoch == 1


def test_three_class_recipes_and_their_scores():
    study = levers.recipe_config("study", "three-class")
    assert study["model"]["task"] == "three-class" and study["model"]["arch"] == "residual"
    assert study["train"]["epochs"] == 35 and study["data"]["holdout_fraction"] == levers.HOLDOUT
    long, covid = flat(levers.recipe_config("long", "three-class")), flat(levers.recipe_config("long", "covid"))
    assert {k for k in long if long[k] != covid[k]} == {"model.task"}
    assert all(levers.recipe_config(*job.split(":")[:2]) for job in levers.EXTRA_JOBS)

    labels = {"validation": np.array([0, 1, 2, 2])}
    p0 = [[0.9, 0.1, 0.0], [0.2, 0.7, 0.1], [0.1, 0.2, 0.7], [0.1, 0.6, 0.3]]  # 3 of 4 right
    p1 = [[0.2, 0.7, 0.1], [0.2, 0.7, 0.1], [0.1, 0.2, 0.7], [0.1, 0.2, 0.7]]  # 3 of 4 right
    results = {("study", "three-class", s): {"probabilities": {"validation": p}} for s, p in enumerate([p0, p1])}
    results[("study", "infected", 0)] = {"probabilities": {}}  # other tasks are not three-class rows
    rows = levers.three_class_rows(results, labels)
    assert list(rows) == ["study"] and rows["study"]["seeds"] == {0: 0.75, 1: 0.75}
    assert rows["study"]["ensemble"] == 1.0  # the mean of the two gets all four right


def test_table_rows_score_each_seed_the_ensemble_and_the_val_grid():
    rng = np.random.default_rng(1)
    labels = {sp: rng.integers(0, 3, n) for sp, n in (("holdout", 60), ("validation", 60), ("val", 9))}
    results = {}
    for seed in (0, 1):
        p_i = {sp: np.clip((y > 0) * 0.6 + rng.random(len(y)) * 0.5, 0, 1) for sp, y in labels.items()}
        p_c = {sp: np.clip((y == 2) * 0.5 + rng.random(len(y)) * 0.6, 0, 1) for sp, y in labels.items()}
        for task, p in (("infected", p_i), ("covid", p_c)):
            results[("long", task, seed)] = {"probabilities": {sp: v[:, None].tolist() for sp, v in p.items()},
                                             "best_epoch": 3, "fit_seconds": 1.0}
    [row] = levers.lever_rows(levers.table(results, labels))
    assert row["recipe"] == "long" and row["seeds"] == 2
    prob = {t: {sp: np.mean([np.asarray(results[("long", t, s)]["probabilities"][sp]).reshape(-1) for s in (0, 1)],
                            axis=0) for sp in labels} for t in levers.TASKS}
    ensemble = levers.cascade_scores(prob["infected"], prob["covid"], labels)
    assert row["ensemble_accuracy"] == round(ensemble["accuracy"], 4)
    pred = np.where(prob["infected"]["val"] <= ensemble["t_infected"], 0,
                    np.where(prob["covid"]["val"] > ensemble["t_covid"], 2, 1))
    y = labels["val"]
    assert row["val_grid"] == {"right": int(np.sum(pred == y)), "n": 9, "normals": int(np.sum(y == 0)),
                               "normals_called_covid": int(np.sum((y == 0) & (pred == 2)))}
