"""The callbacks of a run: the history row, the kept best epoch, the schedule, the backup that commits each epoch.

`run_callbacks` orders them so a kill at any moment leaves a consistent run
directory (`cxrkeras.runs` describes it): the best model is staged when its
epoch ends and committed with the epoch's backup.
"""

import math
import os
import signal
import time

import keras

from cxrkeras.config import MONITORS
from cxrkeras.files import read_json, save_model_atomic, write_atomic, write_json_atomic
from cxrkeras.rundir import pending_model_path, settle_pending
from cxrkeras.runs import BACKUP_DIR, HISTORY_FILE, LOGS_DIR, MODEL_FILE, STATE_FILE

# Test hook, read by `testing_callbacks`: SIGKILL this process at the end of epoch N (0-based), after
# history.csv and model.keras are written but before the epoch's backup, the worst moment
# for a kill. tests/test_training.py uses it to check that resume loses and repeats nothing.
KILL_ENV = "CXRKERAS_TEST_KILL_AFTER_EPOCH"
# Test hook: SIGKILL this process when it starts training step N (0-based, counted over the run), mid-epoch.
KILL_STEP_ENV = "CXRKERAS_TEST_KILL_AT_STEP"


class BestModelCheckpoint(keras.callbacks.Callback):
    """Keep the best epoch by `monitor`: staged when it happens, committed with its epoch.

    An improving epoch's model is written (atomically) to `model.pending.keras`
    beside `filepath`, and its value and epoch to the state file's "pending"
    entry. `commit(epochs_done)` (called by AtomicBackupAndRestore once the
    epoch's backup is written) moves it onto `filepath` and records it as the
    best. So after a kill the kept model and the state file always describe an
    epoch that history.csv keeps too: an epoch that is trained again after a
    resume never leaves its first attempt behind (`settle_pending`).
    `model` lets a training wrapper (augmentation in the model) save the plain classifier.
    """

    def __init__(self, filepath, state_path, monitor="val_loss", model=None):
        super().__init__()
        if monitor not in MONITORS:
            raise ValueError(f"Unknown `monitor`; expected one of {list(MONITORS)}. Received: monitor={monitor!r}")
        self.filepath, self.state_path, self.monitor = filepath, state_path, monitor
        self.pending_path = pending_model_path(filepath)
        self.target = model
        self.best, self.best_epoch = None, None

    def on_train_begin(self, logs=None):
        state = read_json(self.state_path, {})
        if state.get("monitor") == self.monitor and state.get("best") is not None:
            self.best, self.best_epoch = state["best"], state["best_epoch"]

    def on_epoch_end(self, epoch, logs=None):
        value = (logs or {}).get(self.monitor)
        if value is None or not math.isfinite(float(value)) or not improves(self.monitor, float(value), self.best):
            return
        save_model_atomic(self.target or self.model, self.pending_path)
        self.best, self.best_epoch = float(value), epoch
        state = read_json(self.state_path, {})
        state.update(pending={"monitor": self.monitor, "best": self.best, "best_epoch": epoch})
        write_json_atomic(self.state_path, state)

    def commit(self, epochs_done):
        settle_pending(self.filepath, self.state_path, epochs_done)


def improves(monitor, value, best):
    """Whether `value` of `monitor` beats `best` (None: nothing yet), in the monitor's direction (MONITORS)."""
    return best is None or (value < best if MONITORS[monitor] == "min" else value > best)


class AtomicBackupAndRestore(keras.callbacks.BackupAndRestore):
    """Keras' BackupAndRestore with each file replaced atomically, kept after the run, and a commit hook.

    Stock BackupAndRestore writes its weights and its metadata JSON in place, so a
    kill during a write can leave a file that does not load. Here each is written
    to a temp file and moved into place; a kill leaves the previous or the new
    backup. (A kill between the two moves leaves the new weights with the old epoch
    count: that epoch is trained once more, and history.csv is trimmed to match.)
    The metadata's epoch count is the run's commit point: `on_commit(epochs_done)`
    runs right after it. The backup (weights and optimizer state of the last
    epoch) stays when the run completes, so a finished run can be extended.
    """

    def __init__(self, backup_dir, on_commit=None):
        super().__init__(backup_dir, delete_checkpoint=False)
        self.on_commit = on_commit

    def _save_model(self):
        os.makedirs(self.backup_dir, exist_ok=True)
        # Keras wants the .weights.h5 suffix
        write_atomic(self._weights_path, lambda tmp: self.model.save_weights(tmp, overwrite=True), ".weights.h5")
        write_json_atomic(self._training_metadata_path, {"epoch": self._current_epoch, "batch": self._last_batch_seen})
        if self.on_commit is not None:
            self.on_commit(self._current_epoch)


class ThroughputMeter(keras.callbacks.Callback):
    """Training images per second: the train part of each epoch (not validation).

    The first epoch of a call also traces, compiles and decodes the images into
    the cache, so it is left out when later epochs ran.
    """

    def __init__(self, images_per_epoch):
        super().__init__()
        self.images_per_epoch = images_per_epoch
        self.epoch_seconds, self._start = [], None

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()

    def on_test_begin(self, logs=None):
        self._stop()

    def on_epoch_end(self, epoch, logs=None):
        self._stop()

    def _stop(self):
        if self._start is not None:
            self._wait_for_steps()
            self.epoch_seconds.append(time.perf_counter() - self._start)
            self._start = None

    def _wait_for_steps(self):
        """Block until the epoch's steps have run: JAX dispatches them asynchronously, so reading the
        step counter waits for the last (without this the rate under JAX counted dispatch, not work)."""
        optimizer = getattr(self.model, "optimizer", None)
        if optimizer is not None and optimizer.built:
            keras.ops.convert_to_numpy(optimizer.iterations)

    @property
    def epochs(self):
        return len(self.epoch_seconds)

    @property
    def images_per_second(self):
        timed = self.epoch_seconds[1:] or self.epoch_seconds
        return len(timed) * self.images_per_epoch / sum(timed) if timed else 0.0


class KillAfterEpoch(keras.callbacks.Callback):
    """See KILL_ENV."""

    def __init__(self, epoch):
        super().__init__()
        self.epoch = epoch

    def on_epoch_end(self, epoch, logs=None):
        if epoch == self.epoch:
            os.kill(os.getpid(), signal.SIGKILL)


class KillAtStep(keras.callbacks.Callback):
    """See KILL_STEP_ENV."""

    def __init__(self, step):
        super().__init__()
        self.step, self.seen = step, 0

    def on_train_batch_begin(self, batch, logs=None):
        if self.seen == self.step:
            os.kill(os.getpid(), signal.SIGKILL)
        self.seen += 1


def testing_callbacks():
    """The callbacks that tests ask for through the environment (KILL_ENV, KILL_STEP_ENV); none otherwise."""
    callbacks = [KillAfterEpoch(int(os.environ[KILL_ENV]))] if os.environ.get(KILL_ENV) else []
    return callbacks + ([KillAtStep(int(os.environ[KILL_STEP_ENV]))] if os.environ.get(KILL_STEP_ENV) else [])


def schedule_callbacks(cfg):
    """The callbacks a learning-rate schedule needs: ReduceLROnPlateau for "plateau" (cosine is in the optimizer)."""
    if cfg.train.schedule != "plateau":
        return []
    monitor = cfg.train.monitor
    return [keras.callbacks.ReduceLROnPlateau(monitor=monitor, mode=MONITORS[monitor], factor=0.5, patience=3,
                                              min_lr=1e-6)]


def run_callbacks(cfg, run_dir, model, meter=None, extra=(), tensorboard=False):
    """The callbacks of a run in `run_dir`, ordered so a kill at any moment leaves a consistent run.

    Per epoch: the history row, the staged best model, the schedule, `extra`,
    then the backup, which commits the epoch (and the staged best with it).
    """
    best = BestModelCheckpoint(os.path.join(run_dir, MODEL_FILE), os.path.join(run_dir, STATE_FILE),
                               cfg.train.monitor, model=model)
    callbacks = [meter] if meter is not None else []
    callbacks += [keras.callbacks.CSVLogger(os.path.join(run_dir, HISTORY_FILE), append=True), best]
    callbacks += schedule_callbacks(cfg) + list(extra) + testing_callbacks()
    callbacks.append(AtomicBackupAndRestore(os.path.join(run_dir, BACKUP_DIR), on_commit=best.commit))
    if tensorboard:
        callbacks.append(keras.callbacks.TensorBoard(os.path.join(run_dir, LOGS_DIR)))
    return callbacks
