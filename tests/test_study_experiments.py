"""recipes/ and experiments/: the recipes are valid fit configs, each lever is one change to "long",
experiments/ drives the `cxrkeras` commands only, and seeds.py's table summarises the evaluations it finds."""

import ast
import glob
import json
import os

import pytest
from scripts import ROOT, load_script

from cxrkeras.config import TASKS, RunConfig

RECIPES = sorted(glob.glob(os.path.join(ROOT, "recipes", "*.json")))
# Training's machinery, which only the package touches: experiments/ trains through `cxrkeras` commands.
TRAINING = {"cxrkeras.training", "cxrkeras.callbacks", "cxrkeras.devices", "cxrkeras.arrays", "cxrkeras.augment",
            "cxrkeras.tuning", "cxrkeras.models.classifiers", "cxrkeras.models.blocks"}
BUILDERS = {"build_model", "build_ensemble", "build_cascade", "classifiers", "blocks"}  # of cxrkeras.models
BACKENDS = {"keras", "tensorflow", "jax", "torch"}


@pytest.fixture(scope="module")
def seeds():
    return load_script("experiments/seeds.py")


def recipe(name, task):
    with open(os.path.join(ROOT, "recipes", f"{name}-{task}.json")) as f:
        return json.load(f)


def flat(config):
    return {f"{section}.{key}": value for section, values in config.items() if isinstance(values, dict)
            for key, value in values.items()}


@pytest.mark.parametrize("path", RECIPES, ids=os.path.basename)
def test_every_recipe_is_a_valid_run_config_for_its_task_on_the_shipped_carve(path):
    with open(path) as f:
        cfg = RunConfig.from_dict(json.load(f))
    cfg.data.data_dir = "x"
    cfg.validate()
    task = next(t for t in TASKS if os.path.basename(path).endswith(f"-{t}.json"))
    assert cfg.model.task == task
    assert (cfg.data.holdout_fraction, cfg.data.val_fraction, cfg.data.seed) == (0.1, 0.15, 0)


@pytest.mark.parametrize("task", ["infected", "covid"])
def test_long_is_resnet_three_times_longer_and_each_lever_one_change_to_long(seeds, task):
    long, resnet = flat(recipe("long", task)), flat(recipe("resnet", task))
    assert {k for k in long if long[k] != resnet[k]} == {"train.epochs"}
    assert long["train.epochs"] == 3 * resnet["train.epochs"]
    levers = [name for name in seeds.recipe_names() if name.startswith("long-")]
    assert len(levers) >= 13
    for name in levers:
        changed = {k.split(".")[1] for k, v in flat(recipe(name, task)).items() if v != long[k]}
        assert len(changed) == 1 or changed <= {"blocks", "epochs"} or changed == {"image_size"}, (name, changed)


def test_experiments_drive_the_commands_and_import_no_training_internals():
    for path in glob.glob(os.path.join(ROOT, "experiments", "*.py")):
        with open(path) as f:
            tree = ast.parse(f.read())
        script = os.path.basename(path)
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                imported = [(a.name, None) for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                imported = [(node.module, a.name) for a in node.names]
            else:
                continue
            for module, name in imported:
                assert module.split(".")[0] not in BACKENDS, f"{script} imports {module}"
                assert module not in TRAINING and f"{module}.{name}" not in TRAINING, f"{script} imports {module}"
                assert not (module == "cxrkeras.models" and name in BUILDERS), f"{script} imports {module}.{name}"
                assert not (module == "cxrkeras" and name in {m.split(".")[1] for m in TRAINING}), \
                    f"{script} imports cxrkeras.{name}"


def test_seeds_prints_the_commands_of_a_recipe_over_seeds(seeds, capsys, tmp_path):
    seeds.main(["--data", "DATA", "--out", str(tmp_path), "--recipes", "long", "--seeds", "0", "1", "--dry-run"])
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("+")]
    fits = [line for line in lines if " fit " in line]
    assert len(fits) == 4 and all("recipes/long-" in line for line in fits)
    assert sum(" cascade " in line for line in lines) == 3  # two seeds and their ensemble
    assert sum(" evaluate " in line and "--split validation" in line for line in lines) == 3


def test_seeds_resumes_a_run_cut_short_with_its_own_config(seeds, capsys, tmp_path):
    (tmp_path / "infected" / "long-s0").mkdir(parents=True)  # a run that started: fit --resume, no --config
    seeds.main(["--data", "DATA", "--out", str(tmp_path), "--recipes", "long", "--seeds", "0", "--dry-run"])
    fits = [line for line in capsys.readouterr().out.splitlines() if line.startswith("+") and " fit " in line]
    resumed, fresh = fits
    assert "--resume" in resumed and "--config" not in resumed and "--seed 0" in resumed
    assert "--resume" not in fresh and "recipes/long-covid.json" in fresh


def test_the_table_gives_mean_and_spread_over_seeds(seeds, tmp_path):
    for name, accuracy, f1 in (("study-s0", 0.8, 0.7), ("study-s1", 0.9, 0.8), ("study-ensemble", 0.95, 0.9)):
        folder = tmp_path / "cascades" / name / "eval-validation"
        folder.mkdir(parents=True)
        metrics = {"accuracy": accuracy, "per_class": {"covid": {"f1": f1}},
                   "audit": {"border_only": 0.5, "centre_only": accuracy - 0.1}}
        (folder / "metrics.json").write_text(json.dumps(metrics))
    rows = {row["recipe"]: row for row in seeds.table(str(tmp_path))}
    assert rows["study"]["n"] == 2 and rows["study"]["accuracy"] == pytest.approx(0.85)
    assert rows["study"]["accuracy_spread"] == pytest.approx(0.1) and rows["study"]["covid_f1"] == pytest.approx(0.75)
    assert rows["study-ensemble"]["n"] == 1 and rows["study-ensemble"]["border_only_spread"] == 0


def seed_rows(seeds, tmp_path, runs, majority=0.48, images=700):
    """`seeds.table` over cascades NAME -> (accuracy, border only with zeros, border only with the mean)."""
    for name, (accuracy, zeros, mean) in runs.items():
        folder = tmp_path / "cascades" / name / "eval-validation"
        folder.mkdir(parents=True)
        metrics = {"accuracy": accuracy, "n": images, "per_class": {"covid": {"f1": 0.5}},
                   "audit": {"border_only": zeros, "centre_only": 0.5, "mean_fill": {"border_only": mean},
                             "majority_rate": majority}}
        (folder / "metrics.json").write_text(json.dumps(metrics))
    return seeds.table(str(tmp_path))


# The study's seeds: border-only scores at the majority rate (0.48) under zeros, a little above it with the mean.
STUDY = {"study-s0": (0.82, 0.48, 0.50), "study-s1": (0.84, 0.50, 0.55), "study-s2": (0.83, 0.49, 0.51)}


@pytest.mark.parametrize("study, long, expected", [
    # a tie; long scores lower on the border, but below the majority rate: no evidence either way, the study stands
    (STUDY, {"long-s0": (0.80, 0.26, 0.37), "long-s1": (0.86, 0.32, 0.46)}, ("study", "no recipe beats it")),
    # long's worst seed above the study's best: long
    (STUDY, {"long-s0": (0.86, 0.50, 0.50), "long-s1": (0.88, 0.50, 0.50)}, ("long", "beats study beyond the spread")),
    # a tie, the study reads the border under both fills (every seed well above 0.48) and long under neither: long
    ({**STUDY, "study-s0": (0.82, 0.60, 0.62), "study-s1": (0.84, 0.62, 0.66), "study-s2": (0.83, 0.61, 0.64)},
     {"long-s0": (0.81, 0.30, 0.35), "long-s1": (0.83, 0.31, 0.36)}, ("long", "study reads the border under both")),
    # the same under zeros only (with the mean fill the study's worst seed is within the sampling error): study
    ({**STUDY, "study-s0": (0.82, 0.60, 0.49), "study-s1": (0.84, 0.62, 0.66), "study-s2": (0.83, 0.61, 0.64)},
     {"long-s0": (0.81, 0.30, 0.35), "long-s1": (0.83, 0.31, 0.36)}, ("study", "does not separate them")),
])
def test_the_rule_keeps_the_study_unless_beaten_beyond_the_spread(seeds, tmp_path, study, long, expected):
    long = {**long, "long-s2": tuple((a + b) / 2 for a, b in zip(*long.values()))}  # a third seed inside the two
    rows = seed_rows(seeds, tmp_path, {**study, **long, "study-ensemble": (0.99, 0.1, 0.1)})
    recipe, reason = seeds.decide(rows)
    assert (recipe, expected[1] in reason) == (expected[0], True), reason


def test_reading_the_border_means_above_the_majority_rate_beyond_its_sampling_error(seeds):
    """0.48 of 700 images: a blind guess's sampling error is 0.019; a worst seed must clear 0.499."""
    row = {"majority_rate": 0.48, "images": 700, "border_only_range": [0.495, 0.60]}
    assert not seeds.reads_border(row, "border_only")
    assert seeds.reads_border({**row, "border_only_range": [0.505, 0.60]}, "border_only")
    assert not seeds.reads_border({**row, "images": 100, "border_only_range": [0.505, 0.60]}, "border_only")


def test_the_rule_decides_nothing_on_fewer_than_three_seeds(seeds, tmp_path):
    """One seed each has no spread: any difference would look decisive."""
    rows = seed_rows(seeds, tmp_path, {"study-s0": (0.7960, 0.50, 0.55), "long-s0": (0.7989, 0.26, 0.46),
                                       "long-s1": (0.80, 0.26, 0.46), "long-s2": (0.81, 0.26, 0.46)})
    recipe, reason = seeds.decide(rows)
    assert recipe is None and "needs 3 seeds per recipe (study has 1)" in reason


def test_ship_refuses_a_recipe_the_rule_did_not_choose():
    ship = load_script("experiments/ship.py")
    ship.check_verdict({"recipe": "study", "reason": "no recipe beats it"}, "study")  # the rule's choice ships
    for verdict, recipe, message in (
            ({"recipe": "study", "reason": "no recipe beats it"}, "long", "by the rule it chooses study: no recipe"),
            ({"recipe": None, "reason": "no verdict yet"}, "study", "Not shipping study: by the rule no verdict yet"),
            (None, "long", "no study recipe to decide against")):
        with pytest.raises(SystemExit, match=message):
            ship.check_verdict(verdict, recipe)


def test_fit_times_add_up_from_processes_side_by_side(seeds, tmp_path):
    """Two seeds.py (one per recipe) share OUT/timing.json: no process's time is lost to the other's write."""
    import threading

    def add(name):
        for _ in range(50):
            seeds.add_seconds(str(tmp_path), name, 1.0)

    threads = [threading.Thread(target=add, args=(name,)) for name in ("infected/study-s0", "infected/long-s0")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert json.loads((tmp_path / "timing.json").read_text()) == {"infected/study-s0": 50.0, "infected/long-s0": 50.0}
