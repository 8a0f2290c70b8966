"""`cxrkeras fit`: the run dir it writes, its errors, Ctrl-C, and mirrored training on two logical CPUs."""

import errno
import json
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
from click.testing import CliRunner

from cxrkeras import callbacks, training
from cxrkeras.cli import main
from cxrkeras.config import RunConfig
from cxrkeras.data import fingerprint, load_splits
from cxrkeras.synth import write_synthetic_dataset


@pytest.fixture(scope="module")
def dataset_with_a_broken_file(tmp_path_factory):
    root = tmp_path_factory.mktemp("fitdata")
    write_synthetic_dataset(root, {"train": 8, "val": 2, "test": 2}, seed=1)
    (root / "train" / "normal" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    return str(root)


@pytest.fixture(scope="module")
def finished_run(dataset_with_a_broken_file, tmp_path_factory):
    """A 2-epoch run through the CLI: (CliRunner result, out dir, run dir)."""
    out = str(tmp_path_factory.mktemp("runs"))
    args = ["fit", "infected", "--data", dataset_with_a_broken_file, "--epochs", "2", "--batch-size", "16",
            "--out", out, "--name", "first", "--json"]
    result = CliRunner().invoke(main, args)
    return result, out, os.path.join(out, "infected", "first")


def test_fit_writes_the_run_dir(finished_run, dataset_with_a_broken_file):
    result, _, run_dir = finished_run
    assert result.exit_code == 0, result.output
    for name in ("model.keras", "config.json", "history.csv", "curves.png", "skipped_files.txt"):
        assert os.path.getsize(os.path.join(run_dir, name)) > 0, name

    summary = json.loads(result.stdout)
    assert summary["run_dir"] == run_dir and summary["epochs_run"] == 2
    assert 1 <= summary["best_epoch"] <= 2
    assert summary["best_metric"] == pytest.approx(min(summary["history"]["val_loss"]))
    assert summary["skipped"] == 1 and "skipped 1 file(s)" in result.stderr

    config = RunConfig.load(os.path.join(run_dir, "config.json"))
    assert (config.model.task, config.train.epochs, config.train.batch_size) == ("infected", 2, 16)
    assert config.train.learning_rate == 1e-3 and config.data.augment is True  # the study's defaults
    splits = load_splits(dataset_with_a_broken_file)
    assert config.fingerprint == fingerprint(splits.train + splits.validation)
    assert RunConfig.from_dict(config.to_dict()) == config

    with open(os.path.join(run_dir, "history.csv")) as f:
        rows = f.read().splitlines()
    assert rows[0].split(",")[0] == "epoch" and [r.split(",")[0] for r in rows[1:]] == ["0", "1"]
    assert "broken.jpg" in open(os.path.join(run_dir, "skipped_files.txt")).read()

    model = keras.saving.load_model(os.path.join(run_dir, "model.keras"))
    assert model.predict(np.zeros((3, 150, 150, 1), "float32"), verbose=0).shape == (3, 1)


def test_resuming_a_finished_run_trains_nothing(finished_run, dataset_with_a_broken_file):
    _, out, run_dir = finished_run
    before = os.path.getmtime(os.path.join(run_dir, "model.keras"))
    result = CliRunner().invoke(main, ["fit", "infected", "--out", out, "--name", "first", "--resume"])
    assert result.exit_code == 0, result.output
    assert "already completed 2 epochs" in result.output and "best epoch" in result.output
    assert os.path.getmtime(os.path.join(run_dir, "model.keras")) == before


def test_a_second_fit_into_the_same_run_dir_is_refused(finished_run, dataset_with_a_broken_file):
    _, out, run_dir = finished_run
    result = CliRunner().invoke(main, ["fit", "infected", "--data", dataset_with_a_broken_file, "--out", out,
                                       "--name", "first", "--epochs", "1"])
    assert result.exit_code == 1
    assert f"Error: {run_dir}: a run is already there" in result.output


def _config_file(tmp_path, name, obj):
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(obj))
    return str(path)


@pytest.mark.parametrize(
    "args, code, message",
    [
        (["fit", "infected", "--data", "{data}", "--epochs", "0"], 2, "Invalid value for '--epochs': 0"),
        (["fit", "pneumonia", "--data", "{data}"], 2, "Invalid value for 'TASK': 'pneumonia'"),
        (["fit", "covid", "--data", "{tmp}/nowhere"], 2, "{tmp}/nowhere: no such folder or manifest"),
        (["fit", "covid"], 2, "Missing option '--data'"),
        (["fit", "covid", "--data", "{data}", "--learning-rate", "-1"], 2, "Invalid value for '--learning-rate'"),
        (["fit", "covid", "--data", "{data}", "--optimizer", "adagrad"], 2, "Invalid value for '--optimizer'"),
        (["fit", "covid", "--data", "{data}", "--config", "{unknown_key}"], 2, "Unknown TrainConfig keys ['epoch']"),
        (["fit", "covid", "--data", "{data}", "--config", "{bad_value}"], 2, "Received: batch_size=0"),
        (["fit", "covid", "--data", "{data}", "--config", "{other_task}"], 2, "is for task 'infected', not 'covid'"),
        (["fit", "covid", "--out", "{tmp}", "--name", "never", "--resume"], 2, "--resume: no run to resume in"),
    ],
)
def test_bad_options_give_clear_errors(args, code, message, tmp_path, dataset_with_a_broken_file):
    names = {
        "data": dataset_with_a_broken_file,
        "tmp": str(tmp_path),
        "unknown_key": _config_file(tmp_path, "unknown_key", {"train": {"epoch": 3}}),
        "bad_value": _config_file(tmp_path, "bad_value", {"train": {"batch_size": 0}}),
        "other_task": _config_file(tmp_path, "other_task", {"model": {"task": "infected"}}),
    }
    result = CliRunner().invoke(main, [a.format(**names) for a in args])
    assert result.exit_code == code, result.output
    assert message.format(**names) in result.output


def test_config_file_is_overridden_by_options(tmp_path, dataset_with_a_broken_file, monkeypatch):
    seen = {}

    def fake_fit(run_config, run_dir, **kwargs):
        seen["config"], seen["run_dir"] = run_config, run_dir
        raise KeyboardInterrupt  # also: Ctrl-C says how to resume and exits 130

    monkeypatch.setattr(training, "fit", fake_fit)
    config = _config_file(tmp_path, "run", {"train": {"epochs": 7, "optimizer": "sgd", "learning_rate": 0.05}})
    result = CliRunner().invoke(main, ["fit", "covid", "--data", dataset_with_a_broken_file, "--config", config,
                                       "--learning-rate", "0.01", "--out", str(tmp_path), "--name", "n"])
    train = seen["config"].train
    assert (train.epochs, train.optimizer, train.learning_rate) == (7, "sgd", 0.01)
    assert seen["config"].model.arch == "residual"  # the study's covid model under the partial --config
    assert seen["run_dir"] == os.path.join(str(tmp_path), "covid", "n")
    assert result.exit_code == 130
    assert f"--out {tmp_path} --name n --resume" in result.output


def test_fit_has_help():
    result = CliRunner().invoke(main, ["fit", "--help"])
    assert result.exit_code == 0
    for option in ("--epochs", "--schedule", "--precision", "--resume", "--distribute", "--config", "--json"):
        assert option in result.output


MIRRORED = textwrap.dedent(
    """
    import sys
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    from cxrkeras.cli import main

    main(sys.argv[1:])
    """
)


def test_mirrored_training_on_two_logical_cpus(dataset_with_a_broken_file, tmp_path):
    args = ["fit", "infected", "--data", dataset_with_a_broken_file, "--epochs", "1", "--batch-size", "4",
            "--val-fraction", "0.3", "--distribute", "mirrored", "--out", str(tmp_path), "--name", "m", "--json"]
    done = subprocess.run([sys.executable, "-c", MIRRORED, *args], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout)
    assert summary["replicas"] == 2 and summary["epochs_run"] == 1
    model = keras.saving.load_model(os.path.join(summary["run_dir"], "model.keras"))
    assert model.predict(np.zeros((2, 150, 150, 1), "float32"), verbose=0).shape == (2, 1)


def test_multiworker_under_tensorflow_is_refused_before_anything_is_written(dataset_with_a_broken_file, tmp_path):
    """Two TensorFlow workers crash in Keras 3's fit (keras-team/keras#20585): refused up front, saying to use JAX."""
    result = CliRunner().invoke(main, ["fit", "infected", "--data", dataset_with_a_broken_file, "--epochs", "1",
                                       "--distribute", "multiworker", "--out", str(tmp_path), "--name", "mw"])
    assert result.exit_code == 2, result.output
    assert "keras-team/keras#20585" in result.output and "mirrored" in result.output
    assert "KERAS_BACKEND=jax" in result.output
    assert not os.path.exists(tmp_path / "infected" / "mw")


def test_tensorboard_without_the_package_is_a_clear_error(dataset_with_a_broken_file, tmp_path):
    import importlib.util

    if importlib.util.find_spec("tensorboard") is not None:
        pytest.skip("tensorboard is installed")
    result = CliRunner().invoke(main, ["fit", "infected", "--data", dataset_with_a_broken_file, "--tensorboard",
                                       "--out", str(tmp_path)])
    assert result.exit_code == 2
    assert "needs the tensorboard package" in result.output
    assert not os.listdir(tmp_path)  # nothing written


@pytest.mark.slow
def test_real_dataset_short_fit_learns(real_dataset, tmp_path):
    """Three epochs of the infected classifier on the study's train split (about a minute on 2 cores)."""
    args = ["fit", "infected", "--data", real_dataset, "--epochs", "3", "--precision", "mixed_bfloat16",
            "--out", str(tmp_path), "--name", "real", "--json"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output[result.output.index("{"):])
    assert summary["skipped"] == 0
    assert max(summary["history"]["val_accuracy"]) > 0.8  # well above the 0.73 of always answering "infected"


def test_a_run_folder_that_cannot_be_made_says_nothing_was_trained(tmp_path, synthetic_dataset):
    name = "n" * 300  # longer than any file name may be
    args = ["fit", "infected", "--data", synthetic_dataset, "--epochs", "1", "--out", str(tmp_path), "--name", name]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1, result.output
    (message,) = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert message.endswith("File name too long. No epoch was trained yet; rerun the same command once the file "
                            "can be written."), message


def test_a_full_disk_during_fit_is_one_line_and_the_run_resumes(tmp_path, dataset_with_a_broken_file, monkeypatch):
    out, real_write_atomic = str(tmp_path / "runs"), callbacks.write_atomic
    writes = []

    def disk_full_at_the_second_backup(path, write, suffix=""):
        writes.append(path)
        if len(writes) == 2:
            raise OSError(errno.ENOSPC, "No space left on device", path)
        return real_write_atomic(path, write, suffix)

    monkeypatch.setattr(callbacks, "write_atomic", disk_full_at_the_second_backup)
    small = _config_file(tmp_path, "small", {"model": {
        "blocks": 2, "filters": [4, 8], "dense_units": 8, "image_size": 48}})
    args = ["fit", "infected", "--data", dataset_with_a_broken_file, "--epochs", "3", "--batch-size", "16",
            "--config", small, "--out", out, "--name", "full"]
    result = CliRunner().invoke(main, args)
    run_dir = os.path.join(out, "infected", "full")
    assert result.exit_code == 1, result.output
    message = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert message == [f"Error: {writes[1]}: No space left on device. The run keeps every finished epoch "
                       f"(1 so far); continue it with --resume once the file can be written."]
    monkeypatch.undo()
    resumed = CliRunner().invoke(main, ["fit", "infected", "--out", out, "--name", "full", "--resume", "--json"])
    assert resumed.exit_code == 0, resumed.output
    summary = json.loads(resumed.stdout)
    assert summary["history"]["epoch"] == [0, 1, 2] and summary["epochs_run"] == 2
    state = json.load(open(os.path.join(run_dir, "state.json")))
    assert state["best"] == pytest.approx(summary["history"]["val_loss"][state["best_epoch"]], abs=1e-6)
