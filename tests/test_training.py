"""cxrkeras.training: compile settings, atomic checkpoints, history bookkeeping, resume after a kill, precision."""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest

from cxrkeras import callbacks, devices, files, rundir, training
from cxrkeras.config import RunConfig, TrainConfig, study_model_config, study_train_config
from cxrkeras.synth import write_synthetic_dataset


def tiny_model():
    inputs = keras.Input((4,))
    return keras.Model(inputs, keras.layers.Dense(1, activation="sigmoid", name="predictions")(inputs))


def small_run_config(data_dir, **train):
    """tiny_run_config with a two-block classifier on 48x48 images: a fit is mostly Keras' start-up."""
    config = tiny_run_config(data_dir, **train)
    config.model.blocks, config.model.filters, config.model.dense_units = 2, [4, 8], 8
    config.model.image_size = 48
    return config


def tiny_run_config(data_dir, task="infected", **train):
    train_cfg = study_train_config(task)
    train_cfg.epochs, train_cfg.batch_size = 1, 16
    for key, value in train.items():
        setattr(train_cfg, key, value)
    config = RunConfig(model=study_model_config(task), train=train_cfg)
    config.data.data_dir = data_dir
    return config


# ---------------------------------------------------------------- settings


@pytest.mark.parametrize(
    "key, value",
    [("epochs", 0), ("batch_size", -1), ("optimizer", "adagrad"), ("learning_rate", 0.0), ("weight_decay", -0.1),
     ("schedule", "step"), ("class_weight", "auto"), ("precision", "float16"), ("monitor", "val_auc"),
     ("distribute", "tpu")],
)
def test_check_train_config_names_the_bad_key_and_value(key, value):
    train = TrainConfig(**{key: value})
    with pytest.raises(ValueError, match=rf"`{key}`.*Received: {key}={value!r}"):
        train.validate()


def test_study_defaults_pass_the_check():
    for task in ("infected", "covid", "three-class"):
        study_train_config(task).validate()


@pytest.mark.parametrize("name, cls", [("adam", "Adam"), ("sgd", "SGD"), ("rmsprop", "RMSprop")])
def test_make_optimizer_uses_decoupled_weight_decay(name, cls):
    optimizer = training.make_optimizer(name, 1e-3, weight_decay=1e-4)
    assert type(optimizer).__name__ == cls
    assert optimizer.weight_decay == pytest.approx(1e-4)
    assert training.make_optimizer(name, 1e-3).weight_decay is None


def test_compile_model_cosine_schedule_spans_the_run():
    model = tiny_model()
    train = TrainConfig(epochs=5, schedule="cosine", learning_rate=0.1)
    training.compile_model(model, train, "infected", steps_per_epoch=4)
    optimizer = model.optimizer
    assert float(optimizer.learning_rate) == pytest.approx(0.1)
    optimizer.iterations.assign(10)
    assert float(optimizer.learning_rate) == pytest.approx(0.05)  # half way: cos(pi/2)
    optimizer.iterations.assign(20)
    assert float(optimizer.learning_rate) == pytest.approx(0.0, abs=1e-7)


def test_compile_model_loss_and_accuracy_follow_the_task():
    binary = training.compile_model(tiny_model(), TrainConfig(), "covid")
    assert isinstance(binary.loss, keras.losses.BinaryCrossentropy)
    inputs = keras.Input((4,))
    three = keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(inputs))
    training.compile_model(three, TrainConfig(), "three-class")
    assert isinstance(three.loss, keras.losses.SparseCategoricalCrossentropy)
    history = three.fit(np.zeros((6, 4)), np.array([0, 1, 2, 0, 1, 2]), epochs=1, verbose=0)
    assert set(history.history) == {"loss", "accuracy"}


def test_balanced_class_weight():
    weights = training.balanced_class_weight([0, 0, 0, 1], ("normal", "infected"))
    assert weights == pytest.approx({0: 4 / 6, 1: 2.0})  # n / (k * count)
    with pytest.raises(Exception, match=r"no training images of class \['covid'\]"):
        training.balanced_class_weight([0, 1, 1], ("normal", "non-covid", "covid"))


# ---------------------------------------------------------------- files written atomically


def test_save_model_atomic_leaves_the_old_model_when_a_write_fails(tmp_path, monkeypatch):
    path = str(tmp_path / "model.keras")
    old = tiny_model()
    files.save_model_atomic(old, path)
    expected = old.predict(np.ones((2, 4)), verbose=0)

    def half_write_then_die(model, filepath, **kwargs):
        with open(filepath, "wb") as f:
            f.write(b"PK\x03\x04 half a zip")
        raise OSError("disk full")

    monkeypatch.setattr(keras.saving, "save_model", half_write_then_die)
    with pytest.raises(OSError, match="disk full"):
        files.save_model_atomic(tiny_model(), path)
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["model.keras"]  # no temp file left behind
    reloaded = keras.saving.load_model(path)
    np.testing.assert_allclose(reloaded.predict(np.ones((2, 4)), verbose=0), expected)


def test_best_checkpoint_keeps_the_best_across_resume(tmp_path):
    path, state = str(tmp_path / "model.keras"), str(tmp_path / "state.json")
    files.write_json_atomic(state, {"monitor": "val_loss", "best": 0.1, "best_epoch": 3})
    callback = callbacks.BestModelCheckpoint(path, state, "val_loss")
    callback.set_model(tiny_model())
    callback.on_train_begin()
    callback.on_epoch_end(4, {"val_loss": 0.5})  # worse than the run's best before the resume
    assert not os.path.exists(callback.pending_path)
    callback.on_epoch_end(5, {"val_loss": 0.05})
    assert os.path.exists(callback.pending_path) and not os.path.exists(path)  # staged until epoch 5 commits
    callback.commit(6)
    assert os.path.exists(path) and not os.path.exists(callback.pending_path)
    saved = json.load(open(state))
    assert (saved["best"], saved["best_epoch"]) == (pytest.approx(0.05), 5) and "pending" not in saved


def test_a_staged_best_of_an_epoch_that_did_not_commit_is_dropped(tmp_path):
    path, state = str(tmp_path / "model.keras"), str(tmp_path / "state.json")
    callback = callbacks.BestModelCheckpoint(path, state, "val_loss")
    callback.set_model(tiny_model())
    callback.on_train_begin()
    callback.on_epoch_end(0, {"val_loss": 0.5})
    callback.commit(1)
    committed = open(path, "rb").read()
    callback.on_epoch_end(1, {"val_loss": 0.2})  # then killed before epoch 1's backup
    rundir.settle_pending(path, state, epochs_done=1)  # what a resume does first
    assert open(path, "rb").read() == committed and not os.path.exists(callback.pending_path)
    saved = json.load(open(state))
    assert (saved["best"], saved["best_epoch"]) == (pytest.approx(0.5), 0) and "pending" not in saved


def test_best_checkpoint_on_accuracy_keeps_the_highest(tmp_path):
    path, state = str(tmp_path / "model.keras"), str(tmp_path / "state.json")
    callback = callbacks.BestModelCheckpoint(path, state, "val_accuracy")
    callback.set_model(tiny_model())
    callback.on_train_begin()
    for epoch, acc in enumerate([0.5, 0.8, 0.7]):
        callback.on_epoch_end(epoch, {"val_accuracy": acc, "val_loss": 1.0})
    assert (callback.best, callback.best_epoch) == (pytest.approx(0.8), 1)


def test_history_is_trimmed_to_the_restored_epoch_and_deduplicated(tmp_path):
    path = tmp_path / "history.csv"
    path.write_text("epoch,loss\n0,0.9\n1,0.8\n1,0.7\n2,0.6\n3,0.")  # last row cut by a kill
    assert rundir.read_history(str(path))["epoch"] == [0, 1, 2, 3]
    assert rundir.read_history(str(path))["loss"][1] == pytest.approx(0.7)  # the re-run epoch wins
    assert rundir.truncate_history(str(path), 2) == 2
    assert path.read_text() == "epoch,loss\n0,0.9\n1,0.8\n"


# ---------------------------------------------------------------- fit


def test_resume_after_kill_continues_and_keeps_one_row_per_epoch(synthetic_dataset, tmp_path):
    out = str(tmp_path / "runs")
    command = [sys.executable, "-m", "cxrkeras.cli", "fit", "infected", "--data", synthetic_dataset,
               "--epochs", "3", "--batch-size", "16", "--out", out, "--name", "r"]
    env = {**os.environ, callbacks.KILL_ENV: "1"}
    killed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr[-2000:]
    run_dir = os.path.join(out, "infected", "r")
    assert rundir.read_history(os.path.join(run_dir, "history.csv"))["epoch"] == [0, 1]
    backup = json.load(open(os.path.join(run_dir, "backup", "training_metadata.json")))
    assert backup["epoch"] == 1  # killed after epoch 1's row and checkpoint, before its backup
    killed_state = json.load(open(os.path.join(run_dir, "state.json")))
    assert killed_state["best_epoch"] < 1 and killed_state["pending"]["best_epoch"] == 1  # epoch 1's best: staged only

    env.pop(callbacks.KILL_ENV)
    resumed = subprocess.run(command + ["--resume"], env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming" in resumed.stdout and "after epoch 1 of 3" in resumed.stdout
    with open(os.path.join(run_dir, "history.csv")) as f:
        epochs = [line.split(",")[0] for line in f.read().splitlines()[1:]]
    assert epochs == ["0", "1", "2"]
    state = json.load(open(os.path.join(run_dir, "state.json")))
    assert state["completed"] is True and 0 <= state["best_epoch"] <= 2
    assert rundir.epochs_done(run_dir) == 3  # the last epoch's backup stays, so the run can be extended
    assert_history_agrees_with_the_model(run_dir, synthetic_dataset)


def assert_history_agrees_with_the_model(run_dir, data_dir):
    """state.json's best is history.csv's value at the best epoch, and model.keras scores it on validation."""
    state = json.load(open(os.path.join(run_dir, "state.json")))
    history = rundir.read_history(os.path.join(run_dir, "history.csv"))
    assert state["best"] == pytest.approx(history["val_loss"][state["best_epoch"]], abs=1e-6)
    assert state["best"] == pytest.approx(min(history["val_loss"]), abs=1e-6)
    config = RunConfig.load(os.path.join(run_dir, "config.json"))
    config.data.data_dir = data_dir
    data = training.load_task_data(config)
    model = keras.saving.load_model(os.path.join(run_dir, "model.keras"), compile=False)
    training.compile_model(model, config.train, config.model.task)
    val = training.make_datasets(config, data, augment_on="data").val
    assert model.evaluate(val, verbose=0)[0] == pytest.approx(state["best"], abs=1e-4)
    assert not os.path.exists(os.path.join(run_dir, "model.pending.keras"))


def test_covid_negatives_all_adds_the_normal_images_to_the_covid_stage(synthetic_dataset):
    study = training.load_task_data(tiny_run_config(synthetic_dataset, task="covid"))
    config = tiny_run_config(synthetic_dataset, task="covid")
    config.data.covid_negatives = "all"
    every = training.load_task_data(config)
    assert not any("/normal/" in p for p in study.train_paths + study.val_paths)
    for paths, labels in ((every.train_paths, every.train_labels), (every.val_paths, every.val_labels)):
        assert any("/normal/" in p for p in paths) and [int("/covid/" in p) for p in paths] == labels.tolist()
    assert len(every.train_paths) > len(study.train_paths) and every.fingerprint != study.fingerprint


def test_a_finished_run_extends_with_more_epochs(synthetic_dataset, tmp_path):
    run_dir = str(tmp_path / "run")
    first = training.fit(small_run_config(synthetic_dataset), run_dir, verbose=0)
    assert first.completed and rundir.epochs_done(run_dir) == 1
    state_path = os.path.join(run_dir, "state.json")
    files.write_json_atomic(state_path, {**json.load(open(state_path)), "completed": False})  # killed before
    again = training.fit(small_run_config(synthetic_dataset), run_dir, resume=True, verbose=0)  # the final state
    assert again.completed and again.epochs_run == 0 and again.history == first.history
    messages = []
    extended = training.fit(small_run_config(synthetic_dataset, epochs=3), run_dir, resume=True, verbose=0,
                            log=messages.append)
    assert f"resuming {run_dir} after epoch 1 of 3" in messages
    assert extended.epochs_run == 2 and extended.history["epoch"] == [0, 1, 2]
    assert extended.history["val_loss"][0] == first.history["val_loss"][0]  # epoch 0 kept, not retrained
    assert extended.completed and RunConfig.load(os.path.join(run_dir, "config.json")).train.epochs == 3
    assert_history_agrees_with_the_model(run_dir, synthetic_dataset)


def test_a_fit_that_failed_before_its_first_epoch_is_retried_in_place(synthetic_dataset, tmp_path, monkeypatch):
    run_dir = str(tmp_path / "run")
    config = small_run_config(synthetic_dataset)

    def out_of_memory(*args, **kwargs):
        raise MemoryError("no room for the model")

    monkeypatch.setattr(training, "build_and_compile", out_of_memory)
    with pytest.raises(MemoryError):
        training.fit(config, run_dir, verbose=0)
    assert os.path.exists(os.path.join(run_dir, "config.json"))
    monkeypatch.undo()
    assert training.fit(config, run_dir, verbose=0).completed  # the same command again just works

    failed_resume = str(tmp_path / "resumed")
    monkeypatch.setattr(training, "build_and_compile", out_of_memory)
    with pytest.raises(MemoryError):
        training.fit(config, failed_resume, verbose=0)
    monkeypatch.undo()
    other_data = small_run_config(str(tmp_path / "other"))
    write_synthetic_dataset(tmp_path / "other", {"train": 8, "val": 2, "test": 2}, seed=3)
    result = training.fit(other_data, failed_resume, resume=True, verbose=0)  # nothing trained yet: data may change
    assert result.completed and result.history["epoch"] == [0]
    assert RunConfig.load(os.path.join(failed_resume, "config.json")).data.data_dir == str(tmp_path / "other")


def test_mixed_bfloat16_fit_saves_float32_predictions_and_leaves_the_global_policy(synthetic_dataset, tmp_path):
    assert keras.mixed_precision.global_policy().name == "float32"
    config = tiny_run_config(synthetic_dataset, precision="mixed_bfloat16")
    result = training.fit(config, str(tmp_path / "run"), verbose=0)
    assert keras.mixed_precision.global_policy().name == "float32"
    model = keras.saving.load_model(os.path.join(result.run_dir, "model.keras"))
    assert model.get_layer("block1_conv").compute_dtype == "bfloat16"  # really trained in bf16
    predictions = model.predict(np.zeros((2, 150, 150, 1), "float32"), verbose=0)
    assert predictions.dtype == np.float32 and predictions.shape == (2, 1)
    assert result.epochs_run == 1 and len(result.history["epoch"]) == 1


def test_augmentation_inside_the_model_saves_the_plain_classifier(synthetic_dataset, tmp_path):
    config = tiny_run_config(synthetic_dataset, task="three-class", class_weight="balanced", schedule="cosine",
                             monitor="val_accuracy")
    result = training.fit(config, str(tmp_path / "run"), verbose=0, augment_on="model")
    model = keras.saving.load_model(os.path.join(result.run_dir, "model.keras"))
    assert model.name == "three_class_classifier"
    assert not any("augment" in layer.name or "random" in layer.name for layer in model.layers)
    assert model.predict(np.zeros((2, 150, 150, 1), "float32"), verbose=0).shape == (2, 3)
    assert result.monitor == "val_accuracy" and 0 <= result.best_metric <= 1


def test_fit_refuses_a_run_dir_that_is_there_and_a_resume_with_other_settings(synthetic_dataset, tmp_path):
    run_dir = str(tmp_path / "run")
    os.makedirs(os.path.join(run_dir, "backup"))
    config = tiny_run_config(synthetic_dataset)
    config.save(os.path.join(run_dir, "config.json"))
    files.write_json_atomic(os.path.join(run_dir, "backup", "training_metadata.json"), {"epoch": 1, "batch": 0})
    with pytest.raises(rundir.RunDirError, match="already there"):
        training.fit(config, run_dir, verbose=0)
    other = tiny_run_config(synthetic_dataset, learning_rate=0.01)
    with pytest.raises(rundir.RunDirError, match="train.learning_rate"):
        training.fit(other, run_dir, resume=True, verbose=0)


@pytest.mark.parametrize(
    "n_val, batch, replicas, expected",
    [(100, 64, 1, 64), (128, 64, 2, 64), (65, 64, 2, 62), (6, 4, 2, 4), (7, 8, 2, 4)],
)
def test_validation_batches_split_over_the_replicas(n_val, batch, replicas, expected):
    b = devices.replica_batch_sizes(100, n_val, batch, replicas)
    assert b == expected
    sizes = [b] * (n_val // b) + ([n_val % b] if n_val % b else [])
    assert sizes[0] % replicas == 0 and all(s >= replicas for s in sizes)


def test_batches_that_cannot_split_over_the_replicas_are_refused():
    with pytest.raises(ValueError, match="expected a multiple of 2. Received: batch_size=5"):
        devices.replica_batch_sizes(100, 10, 5, 2)
    with pytest.raises(Exception, match="3 validation images cannot be split evenly over 2 replicas"):
        devices.replica_batch_sizes(100, 3, 8, 2)
    with pytest.raises(Exception, match="fewer than one batch"):
        devices.replica_batch_sizes(6, 10, 8, 2)


def test_latest_unfinished_run_is_found_for_resume(tmp_path):
    for name, completed in (("old", False), ("done", True), ("new", False)):
        run = tmp_path / "covid" / name
        run.mkdir(parents=True)
        (run / "config.json").write_text("{}")
        files.write_json_atomic(str(run / "state.json"), {"completed": completed})
        os.utime(run, (0, {"old": 1, "done": 3, "new": 2}[name]))
    assert rundir.latest_unfinished_run(str(tmp_path), "covid") == str(tmp_path / "covid" / "new")
    assert rundir.latest_unfinished_run(str(tmp_path), "infected") is None


def test_precision_is_per_model_not_process_wide(synthetic_dataset):
    """A tuner builds many models in one process: each gets its own precision, whatever the order."""
    bf16 = tiny_run_config(synthetic_dataset, precision="mixed_bfloat16")
    fp32 = tiny_run_config(synthetic_dataset)
    first, _ = training.build_and_compile(bf16)
    second, _ = training.build_and_compile(fp32)
    third, _ = training.build_and_compile(bf16)
    for model, compute in ((first, "bfloat16"), (second, "float32"), (third, "bfloat16")):
        hidden = [layer for layer in model.layers[1:] if layer.name not in ("predictions", "task_info")]
        assert {layer.compute_dtype for layer in hidden} == {compute}, model.name
        assert model.get_layer("predictions").compute_dtype == "float32"
        assert {w.dtype for w in model.weights} == {"float32"}  # variables stay float32 under mixed precision
    assert keras.mixed_precision.global_policy().name == "float32"
    assert first.count_params() == second.count_params() == 202_261


def test_a_second_fit_into_a_run_dir_in_use_is_refused_naming_the_first(synthetic_dataset, tmp_path):
    """A resume started while the run still trains would interleave checkpoints: the run dir is held."""
    from cxrkeras.rundir import LOCK_FILE

    config = tiny_run_config(synthetic_dataset)
    run_dir = training.fit(config, str(tmp_path / "run"), verbose=0).run_dir
    holder = files.hold(os.path.join(run_dir, LOCK_FILE))  # as the fit still training there holds it
    try:
        in_use = rf"another `cxrkeras fit` trains into this run dir \(pid {os.getpid()}"
        with pytest.raises(rundir.RunDirError, match=in_use):
            training.fit(config, run_dir, resume=True, verbose=0)
    finally:
        holder.close()
    assert training.fit(config, run_dir, resume=True, verbose=0).epochs_run == 0  # let go: the resume runs
