"""experiments/seeds.py: its recipes are valid fit configs, and its table summarises the evaluations it finds."""

import json

import pytest
from scripts import load_script

from cxrkeras import training
from cxrkeras.config import RunConfig


@pytest.fixture(scope="module")
def seeds():
    return load_script("experiments/seeds.py")


def test_every_recipe_is_a_valid_run_config_with_the_holdout(seeds):
    for recipe, by_task in seeds.recipes(0.15).items():
        for task, config in by_task.items():
            cfg = RunConfig.from_dict(config)
            cfg.data.data_dir = "x"
            training.check_run_config(cfg)
            assert cfg.model.task == task and cfg.data.holdout_fraction == 0.15
    for task, config in seeds.recipes(0.15)["resnet"].items():
        assert config["train"]["epochs"] == seeds.RESNET_EPOCHS[task] and config["model"]["arch"] == "resnet"


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
