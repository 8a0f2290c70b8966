"""Training: data and model for a config, compile, and fit into a run directory.

`fit` is made of small functions that `cxrkeras.tuning` (and anything else that
trains) calls too: `load_task_data` and `make_datasets` (data for a config),
`build_and_compile` (model, augmentation placement, precision),
`callbacks.run_callbacks` (the callbacks of a run dir), and `rundir.check_run_dir` /
`rundir.start_run` / `finish_run` (the run-dir bookkeeping; `cxrkeras.runs` describes a run dir).
Devices, precision and strategy are `cxrkeras.devices`'; the settings' checks
are the config's own (`RunConfig.validate`).

Model selection uses the validation split carved from train, never test.
A run killed at any moment continues with `fit(..., resume=True)` after its
last finished epoch.
"""

import contextlib
import copy
import importlib.util
import math
import os
import time
from dataclasses import dataclass, field

import keras
import numpy as np

from cxrkeras import data as data_lib
from cxrkeras import distributed
from cxrkeras.callbacks import ThroughputMeter, run_callbacks
from cxrkeras.config import AUGMENT_ON, OPTIMIZERS, TASKS, check_task
from cxrkeras.devices import default_augment_on, make_strategy, replica_batch_sizes, resolve_precision
from cxrkeras.files import read_json, write_json_atomic
from cxrkeras.models import build_model  # also registers the classifiers' custom objects for loading
from cxrkeras.rundir import (RunDirError, check_run_dir, epochs_done, hold_run_dir, read_history, run_completed,
                             start_run)
from cxrkeras.runs import CURVES_FILE, HISTORY_FILE, SKIPPED_FILE, STATE_FILE, duration


# Measured with benchmarks/train_speed.py on a 2-core CPU (see compile_model).
DEFAULT_JIT_COMPILE = False  # under TensorFlow; JAX and the other backends always compile (default_jit_compile)
DEFAULT_STEPS_PER_EXECUTION = 1


# ---------------------------------------------------------------- compile


def make_optimizer(name="adam", learning_rate=1e-3, weight_decay=0.0, ema_every=None):
    """A Keras optimizer; `learning_rate` may be a schedule; `weight_decay` is decoupled (AdamW-style).

    "adamw" is Keras' AdamW (its default decay 0.004 unless `weight_decay`).
    `ema_every`: keep an exponential moving average of the weights and write
    it into the model every `ema_every` steps (None: no EMA).
    """
    classes = {"adam": keras.optimizers.Adam, "adamw": keras.optimizers.AdamW, "sgd": keras.optimizers.SGD,
               "rmsprop": keras.optimizers.RMSprop}
    if name not in classes:
        raise ValueError(f"Unknown `optimizer`; expected one of {list(OPTIMIZERS)}. Received: optimizer={name!r}")
    kwargs = {"learning_rate": learning_rate}
    if weight_decay or name != "adamw":
        kwargs["weight_decay"] = weight_decay or None
    if ema_every:
        kwargs.update(use_ema=True, ema_momentum=EMA_MOMENTUM, ema_overwrite_frequency=ema_every)
    return classes[name](**kwargs)


EMA_MOMENTUM = 0.99  # Keras' default; about the last 100 steps


def learning_rate_for(train, steps_per_epoch):
    """The constant rate, or a CosineDecay over the whole run for schedule="cosine" (after `warmup_epochs`)."""
    if train.schedule != "cosine":
        return train.learning_rate
    warmup = min(train.warmup_epochs, train.epochs - 1) * steps_per_epoch
    if not warmup:
        return keras.optimizers.schedules.CosineDecay(train.learning_rate, decay_steps=train.epochs * steps_per_epoch)
    return keras.optimizers.schedules.CosineDecay(  # linear from 0 to the rate over the warm-up, then the cosine
        0.0, decay_steps=train.epochs * steps_per_epoch - warmup, warmup_target=train.learning_rate,
        warmup_steps=warmup,
    )


def loss_and_accuracy(task, label_smoothing=0.0):
    """The study's loss for `task` (with `label_smoothing`) and the matching accuracy metric (named "accuracy").

    Sparse labels can't be smoothed by Keras' sparse loss: the three-class
    task then uses CategoricalCrossentropy on one-hot labels inside the loss.
    """
    if len(TASKS[check_task(task)]) == 2:
        return (keras.losses.BinaryCrossentropy(label_smoothing=label_smoothing),
                keras.metrics.BinaryAccuracy(name="accuracy"))
    if label_smoothing:
        return SmoothedSparseCrossentropy(label_smoothing), keras.metrics.SparseCategoricalAccuracy(name="accuracy")
    return keras.losses.SparseCategoricalCrossentropy(), keras.metrics.SparseCategoricalAccuracy(name="accuracy")


@keras.saving.register_keras_serializable(package="cxrkeras")
class SmoothedSparseCrossentropy(keras.losses.Loss):
    """CategoricalCrossentropy with `label_smoothing` on integer labels (one-hot encoded here)."""

    def __init__(self, label_smoothing=0.0, name="smoothed_sparse_crossentropy", **kwargs):
        super().__init__(name=name, **kwargs)
        self.label_smoothing = label_smoothing
        self._loss = keras.losses.CategoricalCrossentropy(label_smoothing=label_smoothing, reduction=None)

    def call(self, y_true, y_pred):
        y_true = keras.ops.one_hot(keras.ops.reshape(keras.ops.cast(y_true, "int32"), (-1,)), y_pred.shape[-1])
        return self._loss(y_true, y_pred)

    def get_config(self):
        return {**super().get_config(), "label_smoothing": self.label_smoothing}


def compile_model(model, train, task, steps_per_epoch=1, jit_compile=None, steps_per_execution=None):
    """Compile `model` with the training settings `train` (a TrainConfig) for `task`.

    `steps_per_epoch` sizes the cosine schedule and, with `train.ema`, how
    often the moving average is written into the model: at every epoch's end,
    so the EMA weights are what is validated, checkpointed and saved.
    `jit_compile` and
    `steps_per_execution` default to `default_jit_compile()` and
    DEFAULT_STEPS_PER_EXECUTION (1), the fastest measured on a 2-core CPU
    (benchmarks/train_speed.py): under TensorFlow XLA trained 3-7x slower than
    its oneDNN kernels there and recompiles for every new batch shape; more
    steps per execution did not help beyond noise.
    """
    loss, accuracy = loss_and_accuracy(task, train.label_smoothing)
    optimizer = make_optimizer(train.optimizer, learning_rate_for(train, steps_per_epoch), train.weight_decay,
                               ema_every=steps_per_epoch if train.ema else None)
    model.compile(
        optimizer=optimizer,
        loss=loss,
        metrics=[accuracy],
        jit_compile=default_jit_compile() if jit_compile is None else jit_compile,
        steps_per_execution=steps_per_execution or DEFAULT_STEPS_PER_EXECUTION,
    )
    return model


def default_jit_compile():
    """DEFAULT_JIT_COMPILE under TensorFlow; on under JAX, whose steps run op by op (about 100x slower) without it."""
    return DEFAULT_JIT_COMPILE if keras.backend.backend() == "tensorflow" else True


def balanced_class_weight(labels, class_names):
    """{class index: n / (k * count)} from integer training labels: scikit-learn's "balanced" weights.

    Raises DatasetError naming a class with no training images (no weight balances it).
    """
    from sklearn.utils.class_weight import compute_class_weight

    labels = np.asarray(labels)
    counts = np.bincount(labels, minlength=len(class_names))
    missing = [class_names[c] for c in np.flatnonzero(counts == 0)]
    if missing:
        raise data_lib.DatasetError(f"no training images of class {missing}: cannot balance class weights.")
    weights = compute_class_weight("balanced", classes=np.arange(len(class_names)), y=labels)
    return {c: float(w) for c, w in enumerate(weights)}


# ---------------------------------------------------------------- data and model for a config


@dataclass
class TaskData:
    """The files a config trains on: train and validation (carved from train) paths and labels."""

    train_paths: list
    train_labels: list
    val_paths: list
    val_labels: list
    fingerprint: str  # of the files used (`data.fingerprint`); a resumed run checks it
    problems: list  # data.Problem for files skipped because they do not decode


def load_task_data(cfg):
    """Find, check and split `cfg.data` for `cfg.model.task`; raises DatasetError for unusable data."""
    task = cfg.model.task
    splits = data_lib.load_splits(cfg.data.manifest or cfg.data.data_dir, cfg.data.val_fraction, cfg.data.seed,
                                  cfg.data.holdout_fraction, cfg.data.holdout_seed)
    negatives = cfg.data.covid_negatives
    train_paths, train_labels = data_lib.task_arrays(splits.train, task, negatives)
    val_paths, val_labels = data_lib.task_arrays(splits.validation, task, negatives)
    used = [s for s in splits.train + splits.validation
            if task != "covid" or negatives == "all" or s.label != "normal"]
    return TaskData(train_paths, train_labels, val_paths, val_labels, data_lib.fingerprint(used), splits.problems)


@dataclass
class Datasets:
    """Training and validation batches for one fit (tf.data, or `arrays.ArrayBatches`), and what sizes the
    schedule and the throughput."""

    train: object
    val: object
    images_per_epoch: int
    class_weight: dict = None


def steps_per_epoch(cfg, n_train, replicas=1):
    """Training steps per epoch; whole batches only under distribution (see replica_batch_sizes)."""
    batch = cfg.train.batch_size
    return n_train // batch if replicas > 1 else math.ceil(n_train / batch)


def make_datasets(cfg, data, augment_on="data", replicas=1, val_batch=None):
    """Train (shuffled, seeded, augmented when `augment_on` is "data") and validation batches for `cfg`.

    tf.data pipelines, or in-memory arrays where `input_path` says so.
    """
    task, batch = cfg.model.task, cfg.train.batch_size
    class_weight = None
    if cfg.train.class_weight == "balanced":
        class_weight = balanced_class_weight(data.train_labels, TASKS[task])
    # whole batches only under distribution: every replica gets the same share (see replica_batch_sizes)
    images = steps_per_epoch(cfg, len(data.train_paths), replicas) * batch if replicas > 1 else len(data.train_paths)
    if input_path(cfg, data) == "arrays":
        return _array_datasets(cfg, data, val_batch, class_weight, images)
    augmenter = augmenter_for(cfg) if augment_on == "data" else None
    train = data_lib.make_dataset(
        data.train_paths, data.train_labels, task, batch, shuffle=True, seed=cfg.train.seed,
        augmenter=augmenter, cache=cfg.data.cache, image_size=cfg.model.image_size,
    )
    if replicas > 1:
        import tensorflow as tf

        train = train.filter(lambda x, y: tf.shape(x)[0] == batch)
    val = data_lib.make_dataset(
        data.val_paths, data.val_labels, task, val_batch or batch, cache=cfg.data.cache,
        image_size=cfg.model.image_size,
    )
    return Datasets(train, val, images, class_weight)


def input_path(cfg, data):
    """"arrays" (`cxrkeras.arrays`: decoded once, in memory) under JAX or torch while the images fit in
    memory; else "tf.data" (TensorFlow's pipeline: the TensorFlow backend, and datasets larger than memory)."""
    from cxrkeras import arrays

    n = len(data.train_paths) + len(data.val_paths)
    if keras.backend.backend() == "tensorflow" or not arrays.fits_in_memory(n, cfg.model.image_size):
        return "tf.data"
    return "arrays"


def _array_datasets(cfg, data, val_batch, class_weight, images):
    from cxrkeras import arrays

    task, size, batch = cfg.model.task, cfg.model.image_size, cfg.train.batch_size
    train = arrays.ArrayBatches(arrays.load_arrays(data.train_paths, size, cfg.data.cache),
                                data_lib.label_array(data.train_labels, task), batch, shuffle=True,
                                seed=cfg.train.seed)
    val = arrays.ArrayBatches(arrays.load_arrays(data.val_paths, size, cfg.data.cache),
                              data_lib.label_array(data.val_labels, task), val_batch or batch)
    return Datasets(train, val, images, class_weight)  # multiworker drops the short batch (shard_datasets)


def augmenter_for(cfg):
    """The config's augmentation (kind, border erasing) seeded from it, or None when `cfg.data.augment` is off."""
    from cxrkeras.augment import augmentation

    return augmentation(cfg.data.augmentation, cfg.data.border_erase, seed=cfg.train.seed) if cfg.data.augment else None


def build_and_compile(cfg, steps=1, augment_on="data", strategy=None, jit_compile=None):
    """(classifier, trained model) for `cfg`, seeded with `cfg.train.seed`, compiled for `steps` per epoch.

    The classifier's layers compute in `cfg.train.precision` (a per-layer dtype
    policy: no process-wide state, so models built one after another in one
    process each get their own). With `augment_on="model"` the trained model is
    a wrapper that augments in front of the classifier (for accelerators); else
    it is the classifier itself. Either way the classifier is what a run saves.
    """
    keras.utils.set_random_seed(cfg.train.seed)
    with strategy.scope() if strategy is not None else contextlib.nullcontext():
        model = build_model(cfg.model, dtype=resolve_precision(cfg.train.precision))
        trained = model
        augmenter = augmenter_for(cfg) if augment_on == "model" else None
        if augmenter is not None:
            trained = keras.Sequential([keras.Input(model.input_shape[1:]), augmenter, model], name="training")
        compile_model(trained, cfg.train, cfg.model.task, steps, jit_compile=jit_compile)
    return model, trained


# ---------------------------------------------------------------- a fit's result


@dataclass
class FitResult:
    """What a fit produced. Epochs count from 1 here; history.csv's `epoch` column counts from 0."""

    run_dir: str
    task: str
    monitor: str
    best_epoch: int  # 1-based; 0 when no epoch had a finite monitored value
    best_metric: float
    epochs: int  # the run's total epochs
    epochs_run: int  # epochs trained by this call (fewer after a resume)
    seconds: float  # wall time of this call's training
    images_per_second: float  # training images per second (train steps only)
    replicas: int
    precision: str = "float32"  # the precision that ran ("auto" resolved)
    history: dict = field(default_factory=dict)  # {column: [per-epoch values]}, the whole run
    skipped: list = field(default_factory=list)  # data.Problem for files that did not decode
    skipped_file: str = ""  # where the list of skipped files is ("" when none)
    completed: bool = True

    def summary(self):
        metric = f"{self.monitor} {self.best_metric:.4f}" if self.best_epoch else f"{self.monitor} n/a"
        return (
            f"best epoch {self.best_epoch}/{self.epochs} ({metric}); {self.epochs_run} epoch(s) in "
            f"{duration(self.seconds)}, {self.images_per_second:.0f} images/s"
            f"{f' on {self.replicas} replicas' if self.replicas > 1 else ''} in {self.precision}; run dir {self.run_dir}"
        )

    def to_dict(self):
        return {
            "run_dir": self.run_dir,
            "task": self.task,
            "monitor": self.monitor,
            "best_epoch": self.best_epoch,
            "best_metric": self.best_metric,
            "epochs": self.epochs,
            "epochs_run": self.epochs_run,
            "seconds": round(self.seconds, 3),
            "images_per_second": round(self.images_per_second, 2),
            "replicas": self.replicas,
            "precision": self.precision,
            "completed": self.completed,
            "skipped": len(self.skipped),
            "skipped_file": self.skipped_file,
            "history": self.history,
        }


# ---------------------------------------------------------------- fit


def fit(run_config, run_dir, resume=False, verbose=1, augment_on="auto", tensorboard=False, callbacks=(), log=None,
        jit_compile=None):
    """Train `run_config` into `run_dir` and return a FitResult.

    resume: continue the run in `run_dir` after its last finished epoch (its
        config.json must match `run_config`, except epochs and distribute); with
        more epochs than a finished run had, extend it.
    augment_on: "data" (tf.data, on the CPU), "model" (a training-only wrapper
        model, for accelerators) or "auto" (model when a GPU is visible).
    log: called with one-line messages (skipped files, resume point).
    Raises ValueError for bad settings, DatasetError for unusable data,
    RunDirError for a run dir that is already there, or has nothing to resume,
    or was started with other settings or data, and RunWriteError (a RunDirError)
    when a file can't be written (a full disk): the run then resumes from its last finished epoch.
    """
    log = log or (lambda message: None)
    cfg = settled_config(run_config)
    processes = distributed.process_count()
    augment_on = check_fit_options(augment_on, tensorboard)
    data = load_task_data(cfg)  # data first: a bad dataset fails before anything is written
    cfg.fingerprint = data.fingerprint
    run_dir = distributed.process_run_dir(run_dir)  # only process 0 writes the run dir
    check_run_dir(cfg, run_dir, resume, processes)
    try:
        held = hold_run_dir(run_dir)
    except OSError as e:  # a folder that can't be made: a name too long, a read-only parent
        raise RunWriteError(_write_failure(e, run_dir)) from e
    with held:
        if resume and run_completed(run_dir, cfg.train.epochs):
            log(f"{run_dir}: the run already completed {cfg.train.epochs} epochs; nothing to resume.")
            return _result(cfg, run_dir, data.problems, epochs_run=0, seconds=0.0, ips=0.0, replicas=1)
        return _train(cfg, run_dir, data, processes, augment_on, callbacks, tensorboard, log, verbose, jit_compile)


def _train(cfg, run_dir, data, processes, augment_on, callbacks, tensorboard, log, verbose, jit_compile):
    strategy = make_strategy(cfg.train.distribute)
    replicas = strategy.num_replicas_in_sync if strategy is not None else processes
    val_batch = validation_batch(cfg, data, replicas, processes)
    try:
        start_run(cfg, run_dir, data.problems, log, processes)
        steps = steps_per_epoch(cfg, len(data.train_paths), replicas)
        model, trained = build_and_compile(cfg, steps, augment_on, strategy, jit_compile)
        sets = distributed.shard_datasets(make_datasets(cfg, data, augment_on, replicas, val_batch), len(data.val_paths))
        meter = ThroughputMeter(sets.images_per_epoch)
        start = time.perf_counter()
        with distributed.peer_failures():
            trained.fit(
                sets.train,
                validation_data=sets.val,
                epochs=cfg.train.epochs,
                class_weight=sets.class_weight,
                callbacks=run_callbacks(cfg, run_dir, model, meter, callbacks, tensorboard),
                verbose=verbose,
                shuffle=False,  # the dataset shuffles itself
            )
        seconds = time.perf_counter() - start
        return finish_run(cfg, run_dir, data.problems, meter, seconds, replicas)
    except OSError as e:
        raise RunWriteError(_write_failure(e, run_dir)) from e


def settled_config(run_config):
    """A checked copy of `run_config` with its precision resolved (what config.json records), its processes joined.

    Under multiworker this process joins the others (from Keras' variables, unless `cxrkeras fit` joined
    first), and process 0's precision is every process's: all compute alike, on mixed hardware too.
    """
    cfg = copy.deepcopy(run_config).validate()
    if cfg.train.distribute == "multiworker":
        distributed.check_backend()
        if not distributed.joined():
            distributed.initialize(distributed.cluster_from())
    cfg.train.precision = resolve_precision(cfg.train.precision)
    if distributed.process_count() > 1:
        cfg.train.precision = distributed.broadcast_json(cfg.train.precision)
    return cfg


def validation_batch(cfg, data, replicas, processes):
    """The validation batch size for `replicas` replicas on `processes` processes; raises ValueError/DatasetError
    for a batch size that does not split."""
    if processes > 1:
        distributed.check_global_batch(cfg.train.batch_size, len(data.train_paths), processes)
        return cfg.train.batch_size
    return replica_batch_sizes(len(data.train_paths), len(data.val_paths), cfg.train.batch_size, replicas)


class RunWriteError(RunDirError):
    """A run's file could not be written (a full disk, a read-only folder); the run resumes after its last epoch."""


def _write_failure(error, run_dir):
    path = error.filename or run_dir
    reason = error.strerror or str(error)
    done = epochs_done(run_dir) if os.path.isdir(run_dir) else 0
    if not done:
        return f"{path}: {reason}. No epoch was trained yet; rerun the same command once the file can be written."
    return (f"{path}: {reason}. The run keeps every finished epoch "
            f"({done} so far); continue it with --resume once the file can be written.")


def check_fit_options(augment_on, tensorboard):
    """Raise ValueError for a bad `augment_on` or TensorBoard without its package; return the placement to use."""
    if augment_on not in AUGMENT_ON:
        raise ValueError(f"Unknown `augment_on`; expected one of {list(AUGMENT_ON)}. Received: augment_on={augment_on!r}")
    if augment_on == "data" and keras.backend.backend() != "tensorflow":
        raise ValueError(
            f"Invalid `augment_on` under the {keras.backend.backend()} backend: augmentation in tf.data runs "
            f"TensorFlow ops; use \"model\" or \"auto\". Received: augment_on='data'"
        )
    if tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise ValueError(
            "`tensorboard=True` needs the tensorboard package (pip install tensorboard). Received: tensorboard=True"
        )
    return default_augment_on() if augment_on == "auto" else augment_on


def finish_run(cfg, run_dir, problems, meter, seconds, replicas):
    """Mark the run completed, draw its curves, and return its FitResult."""
    state_path = os.path.join(run_dir, STATE_FILE)
    state = read_json(state_path, {})
    state.update(completed=True, epochs=cfg.train.epochs)
    write_json_atomic(state_path, state)
    result = _result(cfg, run_dir, problems, meter.epochs, seconds, meter.images_per_second, replicas)
    if result.history:
        from cxrkeras import plots

        plots.training_curves(result.history, os.path.join(run_dir, CURVES_FILE), best_epoch=result.best_epoch,
                              title=f"{cfg.model.task} ({os.path.basename(os.path.normpath(run_dir))})")
    return result


def _result(cfg, run_dir, problems, epochs_run, seconds, ips, replicas):
    state = read_json(os.path.join(run_dir, STATE_FILE), {})
    best_epoch = state.get("best_epoch")
    skipped_file = os.path.join(run_dir, SKIPPED_FILE)
    return FitResult(
        run_dir=run_dir,
        task=cfg.model.task,
        monitor=cfg.train.monitor,
        best_epoch=0 if best_epoch is None else best_epoch + 1,
        best_metric=float(state.get("best", float("nan"))),
        epochs=cfg.train.epochs,
        epochs_run=epochs_run,
        seconds=seconds,
        images_per_second=ips,
        replicas=replicas,
        precision=cfg.train.precision,
        history=read_history(os.path.join(run_dir, HISTORY_FILE)),
        skipped=list(problems),
        skipped_file=skipped_file if os.path.exists(skipped_file) else "",
        completed=bool(state.get("completed")),
    )
