"""Training: data, model and callbacks for a config, fit, and the run directory a fit leaves behind.

`fit` is made of small functions that `cxrkeras.tuning` (and anything else that
trains) calls too: `load_task_data` and `make_datasets` (data for a config),
`build_and_compile` (model, augmentation placement, precision), `run_callbacks`
(the callbacks of a run dir), and `check_run_dir` / `start_run` / `finish_run`
(the run-dir bookkeeping).

A run lives in `saved_models/TASK/NAME/`:

    model.keras     the best epoch by the monitored validation metric (written atomically)
    config.json     the RunConfig, data fingerprint included: all that rebuilds and retrains it
    history.csv     one row per epoch (CSVLogger; appended on resume, never duplicated)
    curves.png      train and validation loss and accuracy per epoch
    state.json      best metric and epoch, whether the run completed (and a staged best, see BestModelCheckpoint)
    backup/         the last finished epoch: weights, optimizer state, epoch count (kept, so a run can be extended)
    model.pending.keras  a best epoch not yet committed (only between an epoch's end and its backup)
    skipped_files.txt   files that did not decode (only when there are any)
    logs/           TensorBoard (only with `tensorboard=True`)

Model selection uses the validation split carved from train, never test.
A run killed at any moment (Ctrl-C, kill -9, a full disk) continues with
`fit(..., resume=True)` after its last finished epoch, and its model.keras,
state.json and history.csv always describe the same epochs.
"""

import contextlib
import copy
import csv
import importlib.util
import math
import os
import shutil
import signal
import time
from dataclasses import dataclass, field

import keras
import numpy as np

from cxrkeras import data as data_lib
from cxrkeras import distributed
from cxrkeras.config import (
    AUGMENTATIONS,
    CLASS_WEIGHTS,
    COVID_NEGATIVES,
    DISTRIBUTES,
    MONITORS,
    OPTIMIZERS,
    PRECISIONS,
    SCHEDULES,
    TASKS,
    RunConfig,
    check_task,
)
from cxrkeras.files import (
    read_json,
    remove_temp_files,
    save_model_atomic,
    write_atomic,
    write_json_atomic,
    write_text_atomic,
)
from cxrkeras.runs import (
    BACKUP_DIR,
    CONFIG_FILE,
    CURVES_FILE,
    HISTORY_FILE,
    LOGS_DIR,
    MODEL_FILE,
    SKIPPED_FILE,
    STATE_FILE,
    duration,
)
from cxrkeras.models import build_model  # also registers the classifiers' custom objects for loading

AUGMENT_ON = ("auto", "data", "model")


# Test hook, read by `fit`: SIGKILL this process at the end of epoch N (0-based), after
# history.csv and model.keras are written but before the epoch's backup, the worst moment
# for a kill. tests/test_training.py uses it to check that resume loses and repeats nothing.
KILL_ENV = "CXRKERAS_TEST_KILL_AFTER_EPOCH"
# Test hook: SIGKILL this process when it starts training step N (0-based, counted over the run), mid-epoch.
KILL_STEP_ENV = "CXRKERAS_TEST_KILL_AT_STEP"

BACKUP_METADATA = "training_metadata.json"  # BackupAndRestore's epoch count, in BACKUP_DIR

# Measured with benchmarks/train_speed.py on a 2-core CPU (see compile_model).
DEFAULT_JIT_COMPILE = False  # under TensorFlow; JAX and the other backends always compile (default_jit_compile)
DEFAULT_STEPS_PER_EXECUTION = 1


class RunDirError(Exception):
    """A run directory that cannot be used as asked: already there, nothing to resume, other settings or data."""


# ---------------------------------------------------------------- checking settings


def check_train_config(train):
    """Raise ValueError naming the first bad training setting and its value."""
    _require(_positive_int(train.epochs), "epochs", train.epochs, "expected a positive integer")
    _require(_positive_int(train.batch_size), "batch_size", train.batch_size, "expected a positive integer")
    _require(train.optimizer in OPTIMIZERS, "optimizer", train.optimizer, f"expected one of {list(OPTIMIZERS)}")
    _require(_number(train.learning_rate) and train.learning_rate > 0, "learning_rate", train.learning_rate,
             "expected a positive number")
    _require(_number(train.weight_decay) and train.weight_decay >= 0, "weight_decay", train.weight_decay,
             "expected a number >= 0")
    _require(train.schedule in SCHEDULES, "schedule", train.schedule, f"expected one of {list(SCHEDULES)}")
    _require(isinstance(train.warmup_epochs, int) and not isinstance(train.warmup_epochs, bool)
             and train.warmup_epochs >= 0, "warmup_epochs", train.warmup_epochs, "expected an integer >= 0")
    _require(_number(train.label_smoothing) and 0 <= train.label_smoothing < 1, "label_smoothing",
             train.label_smoothing, "expected a number in [0, 1)")
    _require(isinstance(train.ema, bool), "ema", train.ema, "expected true or false")
    _require(train.class_weight in CLASS_WEIGHTS, "class_weight", train.class_weight,
             f"expected one of {list(CLASS_WEIGHTS)}")
    _require(isinstance(train.seed, int) and not isinstance(train.seed, bool), "seed", train.seed,
             "expected an integer")
    _require(train.precision in PRECISION_CHOICES, "precision", train.precision,
             f"expected one of {list(PRECISION_CHOICES)}")
    _require(train.monitor in MONITORS, "monitor", train.monitor, f"expected one of {list(MONITORS)}")
    _require(train.distribute != "multiworker" or keras.backend.backend() == "jax", "distribute", train.distribute,
             distributed.MULTIWORKER_UNDER_TENSORFLOW)
    _require(train.distribute in DISTRIBUTES, "distribute", train.distribute, f"expected one of {list(DISTRIBUTES)}")


def check_run_config(run_config):
    """Raise ValueError naming the first bad setting of a RunConfig (data, model or train)."""
    from cxrkeras.models import check_config

    data = run_config.data
    _require(bool(data.data_dir or data.manifest), "data_dir", data.data_dir, "expected a folder or a manifest")
    _require(_number(data.val_fraction) and 0 < data.val_fraction < 1, "val_fraction", data.val_fraction,
             "expected a fraction in (0, 1)")
    _require(_number(data.holdout_fraction) and 0 <= data.holdout_fraction < 1, "holdout_fraction",
             data.holdout_fraction, "expected a fraction in [0, 1)")
    _require(isinstance(data.holdout_seed, int) and not isinstance(data.holdout_seed, bool), "holdout_seed",
             data.holdout_seed, "expected an integer")
    _require(data.augmentation in AUGMENTATIONS, "augmentation", data.augmentation,
             f"expected one of {list(AUGMENTATIONS)}")
    _require(data.covid_negatives in COVID_NEGATIVES, "covid_negatives", data.covid_negatives,
             f"expected one of {list(COVID_NEGATIVES)}")
    _require(_number(data.border_erase) and 0 <= data.border_erase < 0.5, "border_erase", data.border_erase,
             "expected a fraction of the side in [0, 0.5)")
    check_config(run_config.model)
    check_train_config(run_config.train)


def _require(ok, name, value, expected):
    if not ok:
        raise ValueError(f"Invalid `{name}`; {expected}. Received: {name}={value!r}")


def _positive_int(v):
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


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
        augmenter=augmenter, cache=cfg.data.cache, image_size=cfg.data.image_size,
    )
    if replicas > 1:
        import tensorflow as tf

        train = train.filter(lambda x, y: tf.shape(x)[0] == batch)
    val = data_lib.make_dataset(
        data.val_paths, data.val_labels, task, val_batch or batch, cache=cfg.data.cache,
        image_size=cfg.data.image_size,
    )
    return Datasets(train, val, images, class_weight)


def input_path(cfg, data):
    """"arrays" (`cxrkeras.arrays`: decoded once, in memory) under JAX or torch while the images fit in
    memory; else "tf.data" (TensorFlow's pipeline: the TensorFlow backend, and datasets larger than memory)."""
    from cxrkeras import arrays

    n = len(data.train_paths) + len(data.val_paths)
    if keras.backend.backend() == "tensorflow" or not arrays.fits_in_memory(n, cfg.data.image_size):
        return "tf.data"
    return "arrays"


def _array_datasets(cfg, data, val_batch, class_weight, images):
    from cxrkeras import arrays

    task, size, batch = cfg.model.task, cfg.data.image_size, cfg.train.batch_size
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


# ---------------------------------------------------------------- precision

# "auto" resolves (at the start of a fit) to the fastest precision that keeps accuracy on the device at hand.
PRECISION_CHOICES = ("auto",) + PRECISIONS
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo flags of CPUs with bfloat16 arithmetic


def resolve_precision(precision):
    """`precision`, with "auto" made "mixed_bfloat16" where the device computes bfloat16 natively, else "float32".

    Natively: a GPU of compute capability 8 or more (Ampere on), or, with no GPU,
    a CPU with AVX-512 BF16 or AMX. Elsewhere mixed_bfloat16 is emulated and
    slower than float32 (4-5x on a 2-core AVX2 EPYC, benchmarks/train_speed.py).
    """
    if precision != "auto":
        return precision
    capabilities = gpu_compute_capabilities()
    if capabilities:
        native = min(capabilities) >= (8, 0)
    else:
        native = any(flag in cpu_flags() for flag in BF16_CPU_FLAGS)
    return "mixed_bfloat16" if native else "float32"


def cpu_flags(path="/proc/cpuinfo"):
    """The first CPU's feature flags from /proc/cpuinfo (an empty set where there is none, as on macOS)."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def gpu_compute_capabilities():
    """[(major, minor)] of the GPUs the Keras backend sees (empty without GPUs)."""
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        details = [tf.config.experimental.get_device_details(g) for g in tf.config.list_physical_devices("GPU")]
        return [tuple(d.get("compute_capability", (0, 0))) for d in details]
    if keras.backend.backend() == "jax":
        import jax

        gpus = [d for d in jax.devices() if d.platform == "gpu"]
        return [tuple(int(x) for x in str(getattr(d, "compute_capability", "0.0")).split(".")[:2]) for d in gpus]
    return []


# ---------------------------------------------------------------- distribution


def make_strategy(name):
    """None, or a MirroredStrategy over the local GPUs (else the logical CPUs).

    None for "multiworker" too: Keras' distribution, set by `distributed.initialize`, spreads that run.
    """
    if name in ("none", "multiworker"):
        return None
    if keras.backend.backend() != "tensorflow":
        raise ValueError(
            f"Invalid `distribute` under the {keras.backend.backend()} backend: TensorFlow's distribution "
            f"strategies need KERAS_BACKEND=tensorflow. Received: distribute={name!r}"
        )
    import tensorflow as tf

    if name == "mirrored":
        devices = tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("CPU")
        return tf.distribute.MirroredStrategy([d.name for d in devices])
    raise ValueError(f"Unknown `distribute`; expected one of {list(DISTRIBUTES)}. Received: distribute={name!r}")


def replica_batch_sizes(n_train, n_val, batch_size, replicas):
    """The validation batch size under `replicas` replicas; raises ValueError/DatasetError when none works.

    Keras and TensorFlow 2.21 fail on batches that split badly across replicas:
    a replica left with no images, or a first batch that does not split evenly.
    So under distribution the batch size must be a multiple of the replicas,
    training keeps whole batches only (the few left-over images differ every
    epoch, as the data is shuffled), and validation, which must see every image,
    gets the largest batch size <= `batch_size` whose batches all split.
    """
    if replicas == 1:
        return batch_size
    if batch_size % replicas:
        raise ValueError(
            f"Invalid `batch_size` for {replicas} replicas; expected a multiple of {replicas}. "
            f"Received: batch_size={batch_size}"
        )
    if n_train < batch_size:
        raise data_lib.DatasetError(
            f"{n_train} training images: fewer than one batch of {batch_size}, which distributed training needs."
        )
    for b in range(batch_size, 0, -replicas):
        first, rest = min(b, n_val), (n_val % b if n_val > b else 0)
        if first % replicas == 0 and (rest == 0 or rest >= replicas):
            return b
    raise data_lib.DatasetError(
        f"{n_val} validation images cannot be split evenly over {replicas} replicas; "
        f"use more data or a larger `val_fraction`."
    )


def default_augment_on():
    """"data" (in tf.data, on the CPU) under TensorFlow without a GPU; else "model" (on the device).

    Under JAX (or torch) the augmentation layers compute with that backend's
    ops, which cannot run inside tf.data's graph: they go in the model.
    """
    if keras.backend.backend() != "tensorflow":
        return "model"
    return "model" if gpu_visible() else "data"


def gpu_visible():
    """Whether the Keras backend sees a GPU (under TensorFlow, without starting its runtime)."""
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        return bool(tf.config.list_physical_devices("GPU"))
    return any(d.lower().startswith("gpu") for d in keras.distribution.list_devices())


# ---------------------------------------------------------------- callbacks


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


def pending_model_path(filepath):
    root, ext = os.path.splitext(filepath)
    return f"{root}.pending{ext}"


def settle_pending(model_path, state_path, epochs_done):
    """Commit the staged best model if its epoch is among the `epochs_done` first, else drop it."""
    state = read_json(state_path, {})
    pending, pending_path = state.pop("pending", None), pending_model_path(model_path)
    if pending is not None and pending["best_epoch"] < epochs_done and os.path.exists(pending_path):
        os.replace(pending_path, model_path)
        state.update(pending)
    elif os.path.exists(pending_path):
        os.remove(pending_path)
    if pending is not None:
        write_json_atomic(state_path, state)


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


def epochs_done(run_dir):
    """Epochs a run in `run_dir` has committed (its backup's epoch count); 0 when none."""
    return read_json(os.path.join(run_dir, BACKUP_DIR, BACKUP_METADATA), {}).get("epoch", 0)


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


class _KillAfterEpoch(keras.callbacks.Callback):
    """See KILL_ENV."""

    def __init__(self, epoch):
        super().__init__()
        self.epoch = epoch

    def on_epoch_end(self, epoch, logs=None):
        if epoch == self.epoch:
            os.kill(os.getpid(), signal.SIGKILL)


class _KillAtStep(keras.callbacks.Callback):
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
    callbacks = [_KillAfterEpoch(int(os.environ[KILL_ENV]))] if os.environ.get(KILL_ENV) else []
    return callbacks + ([_KillAtStep(int(os.environ[KILL_STEP_ENV]))] if os.environ.get(KILL_STEP_ENV) else [])


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


# ---------------------------------------------------------------- history


def read_history(path):
    """{column: [values]} from history.csv, one entry per epoch (the last row of an epoch wins)."""
    if not os.path.exists(path):
        return {}
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    by_epoch = {}
    for row in rows:
        try:
            by_epoch[int(row["epoch"])] = row
        except (KeyError, TypeError, ValueError):
            continue  # a row cut short by a kill
    epochs = sorted(by_epoch)
    columns = [c for c in (rows[0].keys() if rows else []) if c is not None]
    history = {c: [] for c in columns}
    for e in epochs:
        for c in columns:
            value = by_epoch[e].get(c)
            history[c].append(int(value) if c == "epoch" else _float(value))
    return history


def _float(value):
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def truncate_history(path, epochs):
    """Keep the header and the rows of epochs 0..epochs-1 (once each) in history.csv; returns rows kept."""
    if not os.path.exists(path):
        return 0
    with open(path, newline="") as f:
        lines = f.read().splitlines(keepends=True)
    if not lines:
        return 0
    header, kept, seen = lines[0], [], set()
    for line in lines[1:]:
        first = line.split(",", 1)[0].strip()
        if first.isdigit() and int(first) < epochs and int(first) not in seen and line.endswith("\n"):
            seen.add(int(first))
            kept.append(line)
    write_text_atomic(path, "".join([header] + kept))
    return len(kept)


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


# ---------------------------------------------------------------- run directory


def run_dir_for(out, task, name=None):
    """`out/TASK/NAME`; NAME defaults to a timestamp."""
    return os.path.join(out, check_task(task), name or time.strftime("%Y%m%d-%H%M%S"))


def latest_unfinished_run(out, task):
    """The most recently touched run dir under `out/TASK` that has not completed, or None."""
    root = os.path.join(out, task)
    if not os.path.isdir(root):
        return None
    runs = []
    for name in os.listdir(root):
        run = os.path.join(root, name)
        if os.path.exists(os.path.join(run, CONFIG_FILE)) and not read_json(os.path.join(run, STATE_FILE), {}).get(
            "completed"
        ):
            runs.append((os.path.getmtime(run), run))
    return max(runs)[1] if runs else None


def config_differences(a, b, ignore=("train.epochs", "train.distribute")):
    """Dotted keys whose values differ between two RunConfigs (minus `ignore`)."""
    da, db = a.to_dict(), b.to_dict()
    keys = []
    for section in ("data", "model", "train"):
        for k in sorted(set(da[section]) | set(db[section])):
            key = f"{section}.{k}"
            if key not in ignore and da[section].get(k) != db[section].get(k):
                keys.append(key)
    return keys


def check_run_dir(cfg, run_dir, resume, processes=1):
    """Raise RunDirError unless `cfg` may train into `run_dir` (resumed or not) on `processes` processes.

    A run dir whose run never finished an epoch holds nothing to keep: a new fit
    or a resume starts it over with the settings and data given now. A resume
    must otherwise match the run's settings (except epochs) and data; a finished
    run extends to more epochs from its last epoch's backup.
    """
    config_path = os.path.join(run_dir, CONFIG_FILE)
    state = read_json(os.path.join(run_dir, STATE_FILE), {})
    started = state.get("completed") or epochs_done(run_dir) > 0
    if not resume:
        if os.path.exists(config_path) and started:
            raise RunDirError(f"{run_dir}: a run is already there; resume it or pick another name.")
        return
    if not os.path.exists(config_path):
        raise RunDirError(f"{run_dir}: no run to resume (no {CONFIG_FILE}).")
    if not started:
        return
    saved = RunConfig.load(config_path)
    different = config_differences(saved, cfg)
    if different:
        raise RunDirError(f"{config_path}: the run was started with other settings: {', '.join(different)}.")
    distributed.check_process_count(state, processes, run_dir)
    if saved.fingerprint and saved.fingerprint != cfg.fingerprint:
        raise RunDirError(
            f"{run_dir}: the training data changed since the run started "
            f"(fingerprint {saved.fingerprint} -> {cfg.fingerprint})."
        )
    if state.get("completed") and cfg.train.epochs > state.get("epochs", 0) and epochs_done(run_dir) == 0:
        raise RunDirError(
            f"{run_dir}: the run completed {state.get('epochs')} epochs without keeping its last epoch "
            f"({BACKUP_DIR}/, written by newer versions), so it cannot be extended; start a new run."
        )


def start_run(cfg, run_dir, problems, log, processes=1):
    """Write the run's config and state (with the number of `processes`), tidy what a kill left; return the epochs
    already done.

    A run with finished epochs continues after the last one: its history is cut
    to them and a best model staged by an epoch that is trained again is dropped.
    Anything else (a first start, a start that failed before its first epoch)
    starts from a clean run dir.
    """
    os.makedirs(run_dir, exist_ok=True)
    skipped_file = _write_skipped(run_dir, problems)
    if problems:
        log(f"skipped {len(problems)} file(s) that do not decode; list in {skipped_file}")
    _remove_temp_files(run_dir)
    done = epochs_done(run_dir)
    if done:
        settle_pending(os.path.join(run_dir, MODEL_FILE), os.path.join(run_dir, STATE_FILE), done)
        truncate_history(os.path.join(run_dir, HISTORY_FILE), done)
        log(f"resuming {run_dir} after epoch {done} of {cfg.train.epochs}")
    else:
        _clear_run_files(run_dir)
    write_json_atomic(os.path.join(run_dir, CONFIG_FILE), cfg.to_dict())
    state = read_json(os.path.join(run_dir, STATE_FILE), {})
    state.update(completed=False, epochs=cfg.train.epochs, precision=cfg.train.precision, processes=processes)
    write_json_atomic(os.path.join(run_dir, STATE_FILE), state)
    return done


def run_completed(run_dir, epochs):
    """Whether the run in `run_dir` completed at least `epochs` epochs."""
    state = read_json(os.path.join(run_dir, STATE_FILE), {})
    return bool(state.get("completed")) and state.get("epochs", 0) >= epochs


def _clear_run_files(run_dir):
    model = os.path.join(run_dir, MODEL_FILE)
    for path in (model, pending_model_path(model), os.path.join(run_dir, HISTORY_FILE),
                 os.path.join(run_dir, STATE_FILE), os.path.join(run_dir, CURVES_FILE)):
        if os.path.exists(path):
            os.remove(path)
    shutil.rmtree(os.path.join(run_dir, BACKUP_DIR), ignore_errors=True)


def _write_skipped(run_dir, problems):
    path = os.path.join(run_dir, SKIPPED_FILE)
    if not problems:
        if os.path.exists(path):
            os.remove(path)
        return ""
    write_text_atomic(path, "".join(f"{p}\n" for p in problems))
    return path


def _remove_temp_files(run_dir):
    for folder in (run_dir, os.path.join(run_dir, BACKUP_DIR)):
        remove_temp_files(folder)


# ---------------------------------------------------------------- fit


def fit(
    run_config,
    run_dir,
    resume=False,
    verbose=1,
    augment_on="auto",
    tensorboard=False,
    callbacks=(),
    log=None,
    jit_compile=None,
):
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
    cfg = copy.deepcopy(run_config)
    check_run_config(cfg)
    if cfg.train.distribute == "multiworker" and not distributed.joined():
        distributed.initialize(distributed.cluster_from())  # from Keras' variables; `cxrkeras fit` joins first
    processes = distributed.process_count()
    cfg.train.precision = resolve_precision(cfg.train.precision)  # config.json records what ran
    if processes > 1:  # process 0's device decides: every process computes alike, on mixed hardware too
        cfg.train.precision = distributed.broadcast_json(cfg.train.precision)
    augment_on = check_fit_options(augment_on, tensorboard)
    data = load_task_data(cfg)  # data first: a bad dataset fails before anything is written
    cfg.fingerprint = data.fingerprint
    run_dir = distributed.process_run_dir(run_dir)  # only process 0 writes the run dir
    check_run_dir(cfg, run_dir, resume, processes)
    if resume and run_completed(run_dir, cfg.train.epochs):
        log(f"{run_dir}: the run already completed {cfg.train.epochs} epochs; nothing to resume.")
        return _result(cfg, run_dir, data.problems, epochs_run=0, seconds=0.0, ips=0.0, replicas=1)

    strategy = make_strategy(cfg.train.distribute)
    replicas = strategy.num_replicas_in_sync if strategy is not None else processes
    if processes > 1:
        distributed.check_global_batch(cfg.train.batch_size, len(data.train_paths), processes)
        val_batch = cfg.train.batch_size
    else:
        val_batch = replica_batch_sizes(len(data.train_paths), len(data.val_paths), cfg.train.batch_size, replicas)
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
