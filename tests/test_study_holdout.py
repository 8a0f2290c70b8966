"""The holdout carved from train before validation: disjoint, stable, evaluated and used for thresholds."""

import json

import pytest
from click.testing import CliRunner
from tiny_models import TINY, write_runs

from cxrkeras import data
from cxrkeras.cli import main
from cxrkeras.runs import carve_settings
from cxrkeras.models import build_model


def paths(samples):
    return {s.path for s in samples}


def test_train_validation_and_holdout_are_disjoint_and_cover_train(synthetic_dataset):
    splits = data.load_splits(synthetic_dataset, 0.3, seed=1, holdout_fraction=0.2, holdout_seed=0)
    train, validation, holdout = paths(splits.train), paths(splits.validation), paths(splits.holdout)
    assert not train & validation and not train & holdout and not validation & holdout
    release_train = paths(data.deduplicate([s for s in data.find_samples(synthetic_dataset) if s.split == "train"]))
    assert train | validation | holdout == release_train
    assert len(holdout) == 3 * round(0.2 * 10)  # stratified: 2 of each class's 10
    assert {s.label for s in splits.holdout} == {"normal", "non-covid", "covid"}


def test_the_holdout_is_stable_and_apart_from_the_run_seed(synthetic_dataset):
    first = data.load_splits(synthetic_dataset, 0.3, seed=1, holdout_fraction=0.2)
    again = data.load_splits(synthetic_dataset, 0.3, seed=1, holdout_fraction=0.2)
    other_seed = data.load_splits(synthetic_dataset, 0.3, seed=2, holdout_fraction=0.2)
    assert [s.path for s in first.holdout] == [s.path for s in again.holdout] == [s.path for s in other_seed.holdout]
    assert [s.path for s in first.validation] == [s.path for s in again.validation]
    assert paths(first.validation) != paths(other_seed.validation)
    assert paths(data.load_splits(synthetic_dataset, 0.3, 1, 0.2, holdout_seed=5).holdout) != paths(first.holdout)


def test_no_holdout_leaves_the_validation_split_as_it_was(synthetic_dataset):
    train = [s for s in data.check_samples(data.find_samples(synthetic_dataset))[0] if s.split == "train"]
    splits = data.load_splits(synthetic_dataset, 0.3, seed=1)
    assert splits.holdout == []
    assert splits.validation == data.carve_validation(train, 0.3, 1)[1]


def test_too_few_images_for_a_holdout_names_it():
    samples = [data.Sample(f"/x/{label}{i}.png", label, "train") for label in ("normal", "non-covid", "covid")
               for i in range(3)]
    with pytest.raises(ValueError, match="holdout_fraction"):
        data.carve_holdout(samples, 1.5)


@pytest.fixture(scope="module")
def holdout_runs(tmp_path_factory, synthetic_dataset):
    """Two run folders whose config carved a holdout of 0.2 (and validation 0.3, seed 1)."""
    return write_runs(tmp_path_factory.mktemp("holdout-runs"), synthetic_dataset, holdout_fraction=0.2)


def test_evaluate_split_holdout_reads_exactly_the_holdout(holdout_runs, synthetic_dataset, tmp_path):
    result = CliRunner().invoke(main, ["evaluate", str(holdout_runs["infected"]), "--data", synthetic_dataset,
                                       "--split", "holdout", "--out", str(tmp_path), "--json"])
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    holdout = data.load_splits(synthetic_dataset, 0.3, 1, 0.2).holdout
    assert metrics["fingerprint"] == data.fingerprint(holdout)
    assert metrics["n"] == len(holdout) and metrics["carve"]["holdout_fraction"] == 0.2


def test_evaluate_split_holdout_without_one_is_refused(tmp_path, synthetic_dataset):
    build_model(TINY["infected"]).save(tmp_path / "model.keras")
    result = CliRunner().invoke(main, ["evaluate", str(tmp_path), "--data", synthetic_dataset, "--split", "holdout"])
    assert result.exit_code == 1
    assert "No holdout" in result.output


def test_cascade_picks_thresholds_on_the_holdout(holdout_runs, synthetic_dataset, tmp_path):
    out = tmp_path / "cascade"
    result = CliRunner().invoke(main, ["cascade", str(holdout_runs["infected"]), str(holdout_runs["covid"]),
                                       "--out", str(out), "--target-recall", "covid=0.9"])
    assert result.exit_code == 0, result.output
    assert "covid recall on holdout" in result.output
    record = json.loads((out / "cascade.json").read_text())
    holdout = data.load_splits(synthetic_dataset, 0.3, 1, 0.2).holdout
    assert record["selection"]["split"] == "holdout" and "validation" not in record
    assert record["holdout"] == {"data": synthetic_dataset, "holdout_fraction": 0.2, "holdout_seed": 0,
                                 "images": len(holdout)}
    assert record["data"]["holdout_fraction"] == 0.2  # so `evaluate --split holdout` finds it for the cascade
    assert carve_settings(str(out)) == {"val_fraction": 0.3, "seed": 1, "holdout_fraction": 0.2, "holdout_seed": 0}
