"""fit --distribute multiworker: one run across processes on JAX (two processes on localhost, CPU, Gloo)."""

import json
import os
import socket
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
from click.testing import CliRunner

from cxrkeras import callbacks, distributed, rundir
from cxrkeras.cli import main
from test_training import assert_history_agrees_with_the_model

# A tiny classifier on 48-pixel images: 24 train images (3 global batches of 8) and 6 validation ones.
TINY = {"model": {"blocks": 2, "filters": [4, 8], "dense_units": 8, "image_size": 48},
        "data": {"augment": False},
        "train": {"batch_size": 8, "epochs": 2, "precision": "float32"}}
KILL_STEP = 4  # the second step of epoch 2 of 2


# ---------------------------------------------------------------- settings and sharding


def test_cluster_flags_win_over_the_keras_variables():
    environ = {distributed.JOB_ADDRESSES_ENV: "10.0.0.1:1234,10.0.0.2:1234", distributed.NUM_PROCESSES_ENV: "2",
               distributed.PROCESS_ID_ENV: "1"}
    assert distributed.cluster_from(environ=environ) == distributed.Cluster("10.0.0.1:1234", 2, 1)
    assert distributed.cluster_from("h:9", 4, 3, environ=environ) == distributed.Cluster("h:9", 4, 3)


@pytest.mark.parametrize("args, message", [
    ((None, None, None), "needs `coordinator` HOST:PORT (or KERAS_DISTRIBUTION_JOB_ADDRESSES), `num_processes`"),
    (("h:9", 2, None), "needs `process_id` (or KERAS_DISTRIBUTION_PROCESS_ID)"),
    (("h", 2, 0), "expected HOST:PORT. Received: coordinator='h'"),
    (("h:9", 2, 2), "expected 0 to 1. Received: process_id=2"),
])
def test_a_missing_or_bad_cluster_setting_is_named(args, message):
    with pytest.raises(ValueError) as error:
        distributed.cluster_from(*args, environ={})
    assert message in str(error.value)


def test_each_process_feeds_its_slice_of_every_global_batch():
    dataset = tf.data.Dataset.from_tensor_slices((np.arange(20), np.arange(20) * 10)).batch(8)
    dataset = dataset.filter(lambda x, y: tf.shape(x)[0] == 8)  # whole batches, as training.make_datasets keeps
    slices = [list(distributed.shard_batches(dataset, 2, i).as_numpy_iterator()) for i in range(2)]
    assert [[list(x) for x, _ in batches] for batches in slices] == [[[0, 1, 2, 3], [8, 9, 10, 11]],
                                                                   [[4, 5, 6, 7], [12, 13, 14, 15]]]
    assert [list(y) for _, y in slices[1]] == [[40, 50, 60, 70], [120, 130, 140, 150]]  # labels go with images
    assert distributed.batch_slice(8, 4, 3) == slice(6, 8)


class Batches(keras.utils.PyDataset):
    """In-memory batches of 8 over 20 rows (the last one short), counting the epochs it was told of."""

    def __init__(self):
        super().__init__()
        self.epochs = 0

    def __len__(self):
        return 3

    def __getitem__(self, i):
        rows = np.arange(20)[i * 8:(i + 1) * 8]
        return rows, rows * 10


def test_an_in_memory_dataset_is_sliced_the_same_way():
    batches = Batches()
    train = distributed.shard_batches(batches, 2, 1, drop_short=True)
    assert len(train) == 2  # the short batch of 4 dropped, as training drops it
    assert [list(train[i][0]) for i in range(2)] == [[4, 5, 6, 7], [12, 13, 14, 15]]
    assert list(train[1][1]) == [120, 130, 140, 150]
    val = distributed.shard_batches(batches, 2, 1)
    assert len(val) == 3 and list(val[2][0]) == [18, 19]  # validation keeps every image
    batches.on_epoch_end = lambda: setattr(batches, "epochs", batches.epochs + 1)
    train.on_epoch_end()
    assert batches.epochs == 1  # the reshuffle of the arrays it wraps


def test_a_global_batch_that_does_not_split_over_the_processes_is_refused():
    with pytest.raises(ValueError, match="expected a multiple of 3 .*Received: batch_size=8"):
        distributed.check_global_batch(8, 100, 3)


def test_a_run_resumed_on_another_number_of_processes_is_refused():
    with pytest.raises(rundir.RunDirError, match="trained on 2 process\\(es\\); resume it on 2, not 1"):
        rundir.check_process_count({"processes": 2}, 1, "runs/x")
    rundir.check_process_count({}, 1, "runs/x")  # runs from before the count was kept: one process


def test_cluster_flags_without_multiworker_are_misuse(synthetic_dataset):
    result = CliRunner().invoke(main, ["fit", "infected", "--data", synthetic_dataset, "--process-id", "1"])
    assert result.exit_code == 2 and "go with --distribute multiworker" in result.output


# ---------------------------------------------------------------- two processes on localhost


def _h5_arrays(path):
    import h5py

    arrays = []
    with h5py.File(path, "r") as f:
        f.visititems(lambda name, item: arrays.append(np.asarray(item)) if isinstance(item, h5py.Dataset) else None)
    return arrays


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(args, env, log_path, **extra_env):
    log = open(log_path, "w")
    return subprocess.Popen([sys.executable, "-m", "cxrkeras.cli", *args], env={**env, **extra_env},
                            stdout=log, stderr=subprocess.STDOUT), log_path


def _finish(started, timeout=300):
    process, log_path = started
    process.wait(timeout=timeout)
    with open(log_path) as f:
        return process.returncode, f.read()


@pytest.fixture(scope="module")
def killed_and_resumed(synthetic_dataset, tmp_path_factory):
    """Two processes killed mid-epoch (process 1) and resumed, beside one process killed and resumed at the same step.

    Process 1 gets an --out and a TMPDIR of its own, to show it writes nothing there.
    """
    pytest.importorskip("jax")
    root = tmp_path_factory.mktemp("multiworker")
    config = root / "tiny.json"
    config.write_text(json.dumps(TINY))
    env = {**os.environ, "KERAS_BACKEND": "jax", "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1",
           # the resumed processes reuse the first ones' compiled steps
           "JAX_COMPILATION_CACHE_DIR": str(root / "jax-cache"), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    env.pop(callbacks.KILL_STEP_ENV, None)
    fit = ["fit", "infected", "--data", synthetic_dataset]
    results = {}
    for phase in ("killed", "resumed"):
        port = _free_port()
        extra = ["--config", str(config)] if phase == "killed" else ["--resume"]
        kill = {callbacks.KILL_STEP_ENV: str(KILL_STEP)} if phase == "killed" else {}
        cluster = ["--distribute", "multiworker", "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2"]
        (root / f"tmp1-{phase}").mkdir()
        chief = _start(fit + extra + ["--out", str(root / "runs"), "--name", "two", *cluster, "--process-id", "0"],
                       env, root / f"chief-{phase}.log")
        other = _start(fit + extra + ["--out", str(root / "other"), "--name", "two", *cluster, "--process-id", "1"],
                       env, root / f"other-{phase}.log", TMPDIR=str(root / f"tmp1-{phase}"), **kill)
        alone = _start(fit + extra + ["--out", str(root / "runs"), "--name", "one"], env, root / f"one-{phase}.log",
                       **kill)
        results[f"other-{phase}"] = _finish(other)
        # Within 60 s of process 1's end, process 0 has ended too (a hang would time out here).
        results[f"chief-{phase}"] = _finish(chief, timeout=60 if phase == "killed" else 300)
        results[f"one-{phase}"] = _finish(alone)
        results[f"epochs-{phase}"] = rundir.epochs_done(root / "runs" / "infected" / "two")
    return root, results


# two phases of three JAX processes (one fixture for the three tests): 39 s on the quiet 2-core host
def test_killing_one_process_mid_epoch_ends_the_run_in_the_other_with_a_message(killed_and_resumed):
    root, results = killed_and_resumed
    assert results["other-killed"][0] == -9, results["other-killed"][1][-3000:]
    code, output = results["chief-killed"]
    assert code == 1, output[-3000:]
    assert "process 0 of 2: the run stopped: another process stopped or cannot be reached" in output
    assert "start all 2 processes again with --resume" in output
    assert results["epochs-killed"] == 1  # epoch 2 was cut short


def test_resume_finishes_the_run_with_the_weights_of_one_process(killed_and_resumed, synthetic_dataset):
    root, results = killed_and_resumed
    for name in ("chief-resumed", "other-resumed", "one-resumed"):
        assert results[name][0] == 0, results[name][1][-3000:]
    assert "after epoch 1 of 2" in results["chief-resumed"][1]
    two, one = root / "runs" / "infected" / "two", root / "runs" / "infected" / "one"
    assert rundir.read_history(two / "history.csv")["epoch"] == [0, 1]
    assert json.loads((two / "state.json").read_text())["processes"] == 2
    weights = [_h5_arrays(run / "backup" / "latest.weights.h5") for run in (two, one)]  # model and optimizer
    assert len(weights[0]) == len(weights[1]) > 0
    for a, b in zip(*weights):
        np.testing.assert_allclose(a, b, atol=1e-5)
    assert_history_agrees_with_the_model(str(two), synthetic_dataset)  # validation saw all 6 images once


def test_only_process_0_writes_files(killed_and_resumed):
    root, results = killed_and_resumed
    assert not (root / "other").exists()
    assert list((root / "tmp1-resumed").iterdir()) == []  # its scratch copy of the run dir is gone
    assert results["other-resumed"][1].rstrip().endswith(str(root / "runs" / "infected" / "two"))
