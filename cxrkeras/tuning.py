"""Hyperparameter search with keras-tuner: the study's one-factor experiments and joint searches.

A study is a TOML file in `tuning/` (installed as `cxrkeras.studies`): which
settings vary, over which values, and the tuner it suits. A setting it does not
name stays at the base config's value (the study's defaults, or what the
command line set). The HyperModel builds and trains through the same functions
as `cxrkeras fit` (`training.build_and_compile`, `training.make_datasets`), and
a trial's objective is the base config's `monitor` on the validation split
carved from train: test is never looked at.

A project folder `OUT/TASK/NAME` holds keras-tuner's files (oracle.json,
trial_*/trial.json, trial_*/checkpoint.weights.h5) and these:

    tune.json               the settings the search started with; a rerun must match them (it resumes)
    trial_*/config.json     the RunConfig the trial trained: `cxrkeras fit --config` takes it
    trial_*/execution0.csv  the trial's history, one row per epoch (one file per execution)
    trial_*/run.json        which tuner ran it and how long it took
    best_config.json        the best trial's config.json
    results.json, results.md   every trial: values, score, best validation accuracy and loss
    study.png               train and validation loss and accuracy per epoch, one line per trial

keras-tuner writes its state files in place; here they go through a temporary
name and a rename, with a copy beside each, and a state file that a kill or a
full disk cut short is restored from its copy before the reload (keras-tuner
issue 987). A killed trial runs again from its start; finished trials are kept.
"""

import contextlib
import functools
import glob
import io
import math
import os
import signal
import time
import tomllib
from dataclasses import dataclass

import keras
import keras_tuner
import numpy as np
from keras_tuner.src.engine import (
    tuner_utils,  # SaveBestEpoch, TunerCallback: what Tuner.run_trial uses
)
from keras_tuner.src.tuners import gridsearch  # its LinkedList, for GridOracle

from cxrkeras import training
from cxrkeras.callbacks import KillAfterEpoch, schedule_callbacks
from cxrkeras.config import MONITORS, RunConfig
from cxrkeras.files import HeldError, hold, read_json, write_json_atomic, write_text_atomic
from cxrkeras.runs import duration, read_history

STUDIES_PACKAGE = "cxrkeras.studies"  # the repository's tuning/ folder (setup.cfg maps it)
TUNERS = ("grid", "random", "hyperband", "bayesian")
# A study's hyperparameter names and the RunConfig field each one sets.
# The settings a study may search (where each lives: config.SETTING_FIELDS).
TUNABLE = (
    "depth", "batch_size", "optimizer", "learning_rate", "weight_decay", "schedule", "warmup_epochs",
    "label_smoothing", "ema", "class_weight", "augment", "augmentation", "border_erase", "dropout", "dense_units",
    "batchnorm",
)
METRICS = ("loss", "accuracy", "val_loss", "val_accuracy")

SETTINGS_FILE = "tune.json"
BEST_CONFIG_FILE = "best_config.json"
RESULTS_FILE = "results.json"
TABLE_FILE = "results.md"
FIGURE_FILE = "study.png"
TRIAL_FILE = "trial.json"  # keras-tuner's
ORACLE_FILE = "oracle.json"  # keras-tuner's
TRIAL_CONFIG_FILE = "config.json"
TRIAL_RUN_FILE = "run.json"

# Test hook: "after-trial:N" SIGKILLs this process once trial N has ended and been saved,
# "in-trial:N" at the end of trial N's first epoch. tests/test_tuning.py uses it.
KILL_ENV = "CXRKERAS_TEST_KILL_TUNE"


class StudyError(ValueError):
    """A study file that can't be used: names the file, the key and the value."""


class TuneError(Exception):
    """A search that can't run as asked (a project started with other settings, an unreadable state file)."""


# ---------------------------------------------------------------- studies


@dataclass
class Study:
    """A search space from a study file: {hyperparameter: [values] | {min, max[, step, sampling]} | value}."""

    name: str
    space: dict
    description: str = ""
    tuner: str = "grid"
    max_trials: int = None
    source: str = ""

    @property
    def factors(self):
        """The hyperparameters that vary (a fixed value is not a factor)."""
        return [name for name, spec in self.space.items() if isinstance(spec, (list, dict))]


def studies_dir():
    import importlib.resources

    return str(importlib.resources.files(STUDIES_PACKAGE))


def study_names():
    """The studies that ship with cxrkeras (tuning/*.toml), by name."""
    return sorted(f[: -len(".toml")] for f in os.listdir(studies_dir()) if f.endswith(".toml"))


def load_study(name_or_path):
    """A Study from a shipped study's name (e.g. "learning-rate") or a TOML file's path."""
    path = name_or_path
    if not os.path.isfile(path):
        path = os.path.join(studies_dir(), f"{name_or_path}.toml")
        if not os.path.isfile(path):
            raise StudyError(
                f"Unknown study {name_or_path!r}; expected one of {study_names()} or a .toml file."
            )
    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise StudyError(f"{path}: not a readable TOML file ({e}).") from e
    unknown = sorted(set(doc) - {"description", "tuner", "max_trials", "hyperparameters"})
    if unknown:
        raise StudyError(f"{path}: unknown keys {unknown}; expected description, tuner, max_trials, hyperparameters.")
    study = Study(
        name=os.path.splitext(os.path.basename(path))[0],
        space=doc.get("hyperparameters", {}),
        description=doc.get("description", ""),
        tuner=doc.get("tuner", "grid"),
        max_trials=doc.get("max_trials"),
        source=path,
    )
    check_study(study)
    return study


def check_study(study):
    """Raise StudyError naming the file, the key and the value of the first thing wrong in `study`."""
    where = study.source or study.name
    if study.tuner not in TUNERS:
        raise StudyError(f"{where}: unknown `tuner`; expected one of {list(TUNERS)}. Received: tuner={study.tuner!r}")
    if study.max_trials is not None and not (isinstance(study.max_trials, int) and study.max_trials > 0):
        raise StudyError(f"{where}: `max_trials` must be a positive integer. Received: max_trials={study.max_trials!r}")
    if not isinstance(study.space, dict) or not study.space:
        raise StudyError(f"{where}: no [hyperparameters]; expected some of {sorted(TUNABLE)}.")
    for name, spec in study.space.items():
        if name not in TUNABLE:
            raise StudyError(f"{where}: unknown hyperparameter {name!r}; expected one of {sorted(TUNABLE)}.")
        _check_spec(where, name, spec)


def _check_spec(where, name, spec):
    if isinstance(spec, list):
        if not spec or len({type(v) for v in spec}) > 1 and not all(_is_number(v) for v in spec):
            raise StudyError(f"{where}: `{name}` needs a non-empty list of values of one type. Received: {spec!r}")
    elif isinstance(spec, dict):
        unknown = sorted(set(spec) - {"min", "max", "step", "sampling"})
        if unknown or not (_is_number(spec.get("min")) and _is_number(spec.get("max")) and spec["min"] < spec["max"]):
            raise StudyError(
                f"{where}: `{name}` as a range needs numbers min < max (and optionally step, sampling). "
                f"Received: {spec!r}"
            )


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def grid_size(study):
    """How many value combinations the study's space holds (None when a range has no step)."""
    size = 1
    for spec in study.space.values():
        if isinstance(spec, list):
            size *= len(spec)
        elif isinstance(spec, dict):
            if "step" not in spec or spec.get("sampling", "linear") != "linear":
                return None
            size *= int(math.floor((spec["max"] - spec["min"]) / spec["step"] + 1e-9)) + 1
    return size


# ---------------------------------------------------------------- hyperparameters <-> config


def declare(hp, study, base):
    """Register the study's hyperparameters in `hp` and return `base` (a RunConfig) with their values.

    Each hyperparameter's default is the base config's value where the space
    holds it (so a grid starts at the study's settings); a value already fixed
    in `hp` (`hp.Fixed`) wins. Raises ValueError (from the config check) for a
    value the config refuses.
    """
    cfg = base.with_settings(**{name: _register(hp, name, spec, base.setting(name))
                                for name, spec in study.space.items()})
    cfg.model.validate()
    cfg.train.validate()
    return cfg


def check_values(study, base):
    """Raise StudyError if a value of the study (a listed one, a range's ends) makes a config fit refuses."""
    for name, spec in study.space.items():
        ends = [spec["min"], spec["max"]] if isinstance(spec, dict) else spec if isinstance(spec, list) else [spec]
        for value in ends:
            try:
                declare(keras_tuner.HyperParameters(), Study(study.name, {name: [value]}), base)
            except (ValueError, TypeError) as e:
                raise StudyError(f"{study.source or study.name}: {name}={value!r} does not work here: {e}") from e


def _register(hp, name, spec, current):
    if isinstance(spec, dict):
        low, high = spec["min"], spec["max"]
        default = current if low <= current <= high else low
        if isinstance(current, int) and not isinstance(current, bool):
            return hp.Int(name, int(low), int(high), step=spec.get("step", 1), default=int(default))
        return hp.Float(name, float(low), float(high), step=spec.get("step"), sampling=spec.get("sampling", "linear"),
                        default=float(default))
    if not isinstance(spec, list):
        return hp.Fixed(name, spec)
    values = [float(v) for v in spec] if isinstance(current, float) else list(spec)
    if len(values) == 1:
        return hp.Fixed(name, values[0])
    if isinstance(current, bool):  # keras-tuner's Choice turns booleans into 0 and 1
        return hp.Boolean(name, default=current if current in values else values[0])
    return hp.Choice(name, values, default=current if current in values else None)


# ---------------------------------------------------------------- the HyperModel


class StudyHyperModel(keras_tuner.HyperModel):
    """build(hp): the compiled model of a trial; fit(hp, model): its training. Both from `declare`'s config.

    `data` is loaded once (training.load_task_data) and shared by every trial;
    `execution` (set by StudyTuner) adds to the seed, so the executions of a
    trial start from different initialisations. fit returns the metrics of the
    best epoch by the objective, a plain dict of floats.
    """

    def __init__(self, study, base, data, augment_on="data", verbose=0):
        super().__init__(name=study.name)
        self.study, self.base, self.data = study, base, data
        self.augment_on, self.verbose = augment_on, verbose
        self.execution = 0

    def config(self, hp):
        cfg = declare(hp, self.study, self.base)
        cfg.train.seed += self.execution
        return cfg

    def build(self, hp):
        cfg = self.config(hp)
        steps = training.steps_per_epoch(cfg, len(self.data.train_paths))
        return training.build_and_compile(cfg, steps, self.augment_on)[1]

    def fit(self, hp, model, callbacks=(), epochs=None, initial_epoch=0, history_path=None, **kwargs):
        cfg = self.config(hp)
        sets = training.make_datasets(cfg, self.data, self.augment_on)
        extra = schedule_callbacks(cfg)
        if history_path:
            extra.append(keras.callbacks.CSVLogger(history_path))
        history = model.fit(
            sets.train,
            validation_data=sets.val,
            epochs=epochs or cfg.train.epochs,
            initial_epoch=initial_epoch,
            class_weight=sets.class_weight,
            callbacks=list(callbacks) + extra,
            verbose=self.verbose,
            shuffle=False,  # the dataset shuffles itself
        )
        return best_epoch_metrics(history.history, cfg.train.monitor)


def best_epoch_metrics(history, monitor):
    """{metric: value} at the best epoch of `history` by `monitor` (NaN values when no epoch has one)."""
    values = np.asarray(history.get(monitor, []), dtype=float)
    if not np.isfinite(values).any():
        return {monitor: float("nan")}
    pick = np.nanargmin if MONITORS[monitor] == "min" else np.nanargmax
    best = int(pick(np.where(np.isfinite(values), values, np.nan)))
    return {m: float(history[m][best]) for m in METRICS if m in history}


# ---------------------------------------------------------------- oracles and the tuner


class _AtomicStateFiles:
    """keras-tuner's oracle with oracle.json and trial.json written through a temp name, a rename and a copy."""

    def save(self):
        write_state(self._get_oracle_fname(), self.get_state())

    def _save_trial(self, trial):
        write_state(os.path.join(self._get_trial_dir(trial.trial_id), TRIAL_FILE), trial.get_state())


class GridOracle(_AtomicStateFiles, keras_tuner.oracles.GridSearchOracle):
    """keras-tuner's grid search, resumable.

    keras-tuner 1.4.8 keeps the grid's bookkeeping (tried combinations in grid
    order, trials whose next combination is still to make) out of oracle.json,
    so a reloaded grid stops after the trials it has, or fails with a KeyError
    (keras-tuner issue 1055). Both are rebuilt here from the reloaded trials.
    """

    def set_state(self, state):
        super().set_state(state)
        known = [t for t in state["start_order"] if self.trials[t].hyperparameters.values]
        values = lambda trial_id: self.trials[trial_id].hyperparameters.values  # noqa: E731
        ordered = sorted(known, key=functools.cmp_to_key(lambda a, b: self._compare(values(a), values(b))))
        self._ordered_ids = gridsearch.LinkedList()
        for trial_id in ordered:
            self._ordered_ids.insert(trial_id)
        self._populate_next = list(ordered)  # keras-tuner skips combinations already tried


class RandomOracle(_AtomicStateFiles, keras_tuner.oracles.RandomSearchOracle):
    pass


class HyperbandOracle(_AtomicStateFiles, keras_tuner.oracles.HyperbandOracle):
    pass


class BayesianOracle(_AtomicStateFiles, keras_tuner.oracles.BayesianOptimizationOracle):
    pass


def make_oracle(tuner, objective, max_trials, epochs, seed):
    """The oracle for `tuner`; `objective` is "val_loss" or "val_accuracy"; `epochs` bounds Hyperband's rounds."""
    goal = keras_tuner.Objective(objective, direction=MONITORS[objective])
    seed += 1  # keras-tuner takes a seed of 0 for "no seed"
    classes = {"grid": GridOracle, "random": RandomOracle, "bayesian": BayesianOracle}
    if tuner == "hyperband":
        oracle = HyperbandOracle(goal, max_epochs=epochs, factor=3, seed=seed)
    elif tuner in classes:
        oracle = classes[tuner](goal, max_trials=max_trials, seed=seed)
    else:
        raise ValueError(f"Unknown `tuner`; expected one of {list(TUNERS)}. Received: tuner={tuner!r}")
    oracle.verbose = 0  # StudyTuner prints one line per trial instead of keras-tuner's tables
    return oracle


def planned_trials(oracle, study, max_trials):
    """How many trials the search will run, for the progress line."""
    if isinstance(oracle, keras_tuner.oracles.HyperbandOracle):
        per_iteration = sum(oracle._get_size(b, r) for b in range(oracle._get_num_brackets())
                            for r in range(oracle._get_num_rounds(b)))
        return per_iteration * oracle.hyperband_iterations
    size = grid_size(study) if isinstance(oracle, keras_tuner.oracles.GridSearchOracle) else None
    return min(n for n in (size, max_trials) if n) if (size or max_trials) else None


class StudyTuner(keras_tuner.Tuner):
    """A keras-tuner Tuner that trains through StudyHyperModel and says what each trial did.

    run_trial replaces keras-tuner's own: each execution gets its own seed, the
    trial's config and history are written to its folder, Hyperband's rounds
    start from the previous round's checkpoint, and keras-tuner's TensorBoard
    hook (which needs the tensorboard package) is not used. After each trial
    one progress line goes to `log`: trial n of N, its values, its score, the
    best so far, and an estimate of the time left.
    """

    def __init__(self, oracle, hypermodel, project_dir, planned=None, executions_per_trial=1, log=print, callbacks=()):
        self.planned, self.log, self._seconds, self._started = planned, log, [], None
        self.extra_callbacks = list(callbacks)  # added to every execution's fit (the report's progress)
        super().__init__(
            oracle=oracle,
            hypermodel=hypermodel,
            directory=os.path.dirname(os.path.abspath(project_dir)),
            project_name=os.path.basename(os.path.abspath(project_dir)),
            executions_per_trial=executions_per_trial,
            overwrite=False,
        )

    def run_trial(self, trial, *args, **kwargs):
        hp, trial_dir = trial.hyperparameters, self.get_trial_dir(trial.trial_id)
        for old in glob.glob(os.path.join(trial_dir, "execution*.csv")):
            os.remove(old)  # a trial that runs again (after a kill) starts its history over
        config, epochs = self.hypermodel.config(hp), {}
        if "tuner/epochs" in hp.values:  # Hyperband: this round's epochs, after the last round's
            epochs = dict(epochs=hp.values["tuner/epochs"], initial_epoch=hp.values["tuner/initial_epoch"])
            config.train.epochs = epochs["epochs"]
        write_json_atomic(os.path.join(trial_dir, TRIAL_CONFIG_FILE), config.to_dict())
        checkpoint = tuner_utils.SaveBestEpoch(
            self.oracle.objective, self._get_checkpoint_fname(trial.trial_id))
        results = []
        for execution in range(self.executions_per_trial):
            self.hypermodel.execution = execution
            model = self._try_build(hp)  # clears the Keras session first: memory stays flat across trials
            if "tuner/trial_id" in hp.values:  # optimizer built first, so its state loads too
                model.optimizer.build(model.trainable_variables)
                model.load_weights(self._get_checkpoint_fname(hp.values["tuner/trial_id"]))
            callbacks = [tuner_utils.TunerCallback(self, trial), checkpoint, *self.extra_callbacks]
            callbacks += self._kill_hook(trial)
            history = os.path.join(trial_dir, f"execution{execution}.csv")
            results.append(self.hypermodel.fit(hp, model, callbacks=callbacks, history_path=history, **epochs))
        self.hypermodel.execution = 0
        return results

    def on_trial_begin(self, trial):
        super().on_trial_begin(trial)
        self._started = time.perf_counter()

    def on_trial_end(self, trial):
        super().on_trial_end(trial)  # the oracle records the result and saves it
        seconds = time.perf_counter() - self._started
        self._seconds.append(seconds)
        write_json_atomic(os.path.join(self.get_trial_dir(trial.trial_id), TRIAL_RUN_FILE),
                          {"tuner_id": self.tuner_id, "seconds": round(seconds, 2), "status": trial.status})
        self.log(self._progress_line(self.oracle.get_trial(trial.trial_id), seconds))
        if os.environ.get(KILL_ENV) == f"after-trial:{int(trial.trial_id)}":
            os.kill(os.getpid(), signal.SIGKILL)

    def _progress_line(self, trial, seconds):
        number = int(trial.trial_id) + 1
        of = f"/{self.planned}" if self.planned else ""
        values = ", ".join(f"{k}={_value(v)}" for k, v in trial.hyperparameters.values.items()
                           if not k.startswith("tuner/"))
        objective = self.oracle.objective.name
        if trial.score is not None and math.isfinite(trial.score):
            outcome = f"{objective} {trial.score:.4f}"
        else:
            outcome = f"{str(trial.status).lower()}: {_last_line(trial.message)}"
        best = self.oracle.get_best_trials(1)
        if best and best[0].score is not None:
            outcome += f" (best {best[0].score:.4f}, trial {int(best[0].trial_id) + 1})"
        left = ""
        if self.planned:
            remaining = max(0, self.planned - number)
            left = f"; about {duration(remaining * sum(self._seconds) / len(self._seconds))} left"
        return f"trial {number}{of} [{values}]: {outcome} in {duration(seconds)}{left}"

    def _kill_hook(self, trial):
        if os.environ.get(KILL_ENV) == f"in-trial:{int(trial.trial_id)}":
            return [KillAfterEpoch(0)]
        return []

    def search(self, *args, **kwargs):
        if _is_chief():
            self.save()
            serve_oracle(self.oracle)
            return
        super().search(*args, **kwargs)

    def save(self):
        if not _is_worker():
            self.oracle.save()
        write_json_atomic(self._get_tuner_fname(), self.get_state())


def _last_line(message):
    lines = [line for line in (message or "").strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else "no message"


# ---------------------------------------------------------------- distributed mode


def _is_chief():
    return "KERASTUNER_ORACLE_IP" in os.environ and "chief" in os.environ.get("KERASTUNER_TUNER_ID", "")


def _is_worker():
    return "KERASTUNER_ORACLE_IP" in os.environ and not _is_chief()


def serve_oracle(oracle, poll_seconds=1.0):
    """Serve `oracle` to the workers (gRPC on KERASTUNER_ORACLE_IP:KERASTUNER_ORACLE_PORT) until all are done.

    keras-tuner's own loop (`distribute.oracle_chief.start_server`) checks every
    20 s once the search is over; this is the same loop checking every second.
    """
    from concurrent import futures

    import grpc
    from keras_tuner.src import protos
    from keras_tuner.src.distribute import oracle_chief

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    servicer = oracle_chief.OracleServicer(oracle)
    protos.get_service_grpc().add_OracleServicer_to_server(servicer, server)
    server.add_insecure_port(f"{os.environ['KERASTUNER_ORACLE_IP']}:{os.environ['KERASTUNER_ORACLE_PORT']}")
    server.start()
    try:
        while not (servicer.stop_triggered and oracle_chief.exit_chief(oracle)):
            time.sleep(poll_seconds)
    finally:
        server.stop(grace=1)


# ---------------------------------------------------------------- project folder


def project_dir_for(out, task, name):
    return os.path.join(out, task, name)


def write_state(path, state):
    """Write a keras-tuner state file atomically, and a copy beside it for `repair_project`."""
    write_json_atomic(path, state)
    write_json_atomic(_copy_path(path), state)


def _copy_path(path):
    root, ext = os.path.splitext(path)
    return f"{root}.copy{ext}"


def _readable(path):
    try:
        return isinstance(read_json(path), dict)
    except (OSError, ValueError):
        return False


def repair_project(project_dir, log=print):
    """Make a project's state files readable again before keras-tuner reloads them.

    A trial.json or oracle.json cut short (by a kill or a full disk, in a
    project written by keras-tuner itself, or damaged since) is restored from
    its copy. A trial.json without a readable copy becomes a failed trial that
    says so, and leaves the queue, so the search goes on without it.
    """
    oracle_path = os.path.join(project_dir, ORACLE_FILE)
    paths = [oracle_path] + sorted(glob.glob(os.path.join(project_dir, "trial_*", TRIAL_FILE)))
    for path in paths:
        if not os.path.exists(path) or _readable(path):
            continue  # a missing oracle.json: a new project
        if _readable(_copy_path(path)):
            write_json_atomic(path, read_json(_copy_path(path)))
            log(f"{path}: unreadable (cut short); restored from {os.path.basename(_copy_path(path))}")
        elif path == oracle_path:
            raise TuneError(f"{path}: unreadable and no readable copy; the search can't resume (use another --name).")
        else:
            _replace_with_failed_trial(path, oracle_path)
            log(f"{path}: unreadable and no readable copy; that trial counts as failed")


def _replace_with_failed_trial(path, oracle_path):
    oracle = read_json(oracle_path, {})
    trial_id = os.path.basename(os.path.dirname(path))[len("trial_"):]
    hp = keras_tuner.HyperParameters.from_config(oracle["hyperparameters"]) if "hyperparameters" in oracle else None
    trial = keras_tuner.engine.trial.Trial(hp or keras_tuner.HyperParameters(), trial_id=trial_id, status="FAILED")
    trial.message = f"{path} was unreadable (cut short) and had no readable copy; the trial's result is lost."
    write_state(path, trial.get_state())
    ongoing = {k: v for k, v in oracle.get("ongoing_trials", {}).items() if v != trial_id}
    if oracle and ongoing != oracle.get("ongoing_trials", {}):
        write_state(oracle_path, {**oracle, "ongoing_trials": ongoing})


def check_project(project_dir, settings):
    """Record `settings` in a new project, or raise TuneError if the project was started with others.

    `max_trials` may change between runs (to search further); nothing else.
    """
    path = os.path.join(project_dir, SETTINGS_FILE)
    saved = read_json(path)
    if saved is None:
        os.makedirs(project_dir, exist_ok=True)
        write_json_atomic(path, settings)
        return
    different = _differences(saved, settings, ignore=("max_trials",))
    if different:
        raise TuneError(
            f"{project_dir}: the search was started with other settings ({', '.join(different)}); "
            f"rerun it as it was to resume, or pick another --name."
        )
    if saved.get("max_trials") != settings.get("max_trials"):
        write_json_atomic(path, settings)


def _differences(a, b, ignore=(), prefix=""):
    keys = []
    for key in sorted(set(a) | set(b)):
        if key in ignore:
            continue
        x, y = a.get(key), b.get(key)
        if isinstance(x, dict) and isinstance(y, dict):
            keys += _differences(x, y, prefix=f"{prefix}{key}.")
        elif x != y:
            keys.append(f"{prefix}{key}")
    return keys


# ---------------------------------------------------------------- search


def hold_project(project_dir):
    """This process's hold on `project_dir` (an open lock file); TuneError naming the tune already running there.

    A second `tune` on a project in use would train the same trials (keras-tuner
    does not lock its files). In keras-tuner's distributed mode the chief and
    each worker hold their own lock, KERASTUNER_TUNER_ID's.
    """
    os.makedirs(project_dir, exist_ok=True)
    name = f".{os.environ.get('KERASTUNER_TUNER_ID', 'tune')}.lock"
    try:
        return hold(os.path.join(project_dir, name))
    except HeldError as e:
        raise TuneError(
            f"{project_dir}: another `cxrkeras tune` runs on this project ({e}); wait for it to finish or stop it."
        ) from None


def tune(study, base, project_dir, tuner=None, max_trials=None, executions_per_trial=1, augment_on="auto",
         verbose=0, log=print, callbacks=()):
    """Search `study` around `base` (a RunConfig) in `project_dir`; return `summarize(project_dir)`.

    Reruns resume: finished trials are kept, a trial a kill interrupted runs
    again. Under keras-tuner's distributed mode (KERASTUNER_TUNER_ID,
    KERASTUNER_ORACLE_IP, KERASTUNER_ORACLE_PORT) the chief serves the oracle
    and writes the results, and each worker runs trials; all share `project_dir`.
    `callbacks` (Keras callbacks) join every trial's fit.
    Raises StudyError, TuneError, ValueError (bad settings) or DatasetError.
    """
    tuner = tuner or study.tuner
    if tuner == "grid" and grid_size(study) is None:
        raise StudyError(f"{study.source or study.name}: grid search needs a list or a linear `step` for every range.")
    max_trials = max_trials or study.max_trials
    if tuner in ("random", "bayesian") and not max_trials:
        raise ValueError(f"`max_trials` is needed for {tuner} search. Received: max_trials=None")
    augment_on = training.check_fit_options(augment_on, tensorboard=False)
    if base.train.distribute != "none":
        raise ValueError("Invalid `distribute` for tune: a trial trains on one device; keras-tuner's distributed "
                         f"mode spreads trials over machines instead. Received: distribute={base.train.distribute!r}")
    check_values(study, base)
    data = training.load_task_data(base)
    base = RunConfig.from_dict({**base.to_dict(), "fingerprint": data.fingerprint})
    check_project(project_dir, {
        "task": base.model.task, "study": {"name": study.name, "hyperparameters": study.space},
        "tuner": tuner, "objective": base.train.monitor, "executions_per_trial": executions_per_trial,
        "max_trials": max_trials, "base": base.to_dict(),
    })
    if not _is_worker():  # the chief (or a lone tuner) owns the oracle's files
        repair_project(project_dir, log)
    oracle = make_oracle(tuner, base.train.monitor, max_trials, base.train.epochs, base.train.seed)
    hypermodel = StudyHyperModel(study, base, data, augment_on, verbose)
    finished = len(glob.glob(os.path.join(project_dir, "trial_*", TRIAL_RUN_FILE)))
    if finished:
        log(f"resuming {project_dir}: {finished} trial(s) already ran")
    with contextlib.redirect_stdout(io.StringIO()):  # keras-tuner prints "Reloading Tuner from ..."
        searcher = StudyTuner(oracle, hypermodel, project_dir, planned_trials(oracle, study, max_trials),
                              executions_per_trial, log, callbacks)
    try:
        searcher.search()
    except RuntimeError as e:  # keras-tuner: "Number of consecutive failures exceeded the limit of 3."
        raise TuneError(f"{project_dir}: {str(e).strip().splitlines()[0]} Last error: {_last_line(str(e))}") from e
    if _is_worker():
        log(f"{os.environ.get('KERASTUNER_TUNER_ID')}: no trials left; the chief writes the results.")
        return None
    return write_results(project_dir, study)


# ---------------------------------------------------------------- results


def read_trials(project_dir):
    """Every trial of a project as a dict (id, status, values, score, best epoch, histories, seconds)."""
    trials = []
    for path in sorted(glob.glob(os.path.join(project_dir, "trial_*", TRIAL_FILE))):
        trial_dir = os.path.dirname(path)
        try:
            state = read_json(path)
        except (OSError, ValueError):
            state = {"trial_id": os.path.basename(trial_dir)[len("trial_"):], "status": "UNREADABLE"}
        histories = [read_history(p) for p in sorted(glob.glob(os.path.join(trial_dir, "execution*.csv")))]
        trials.append({
            "trial_id": state.get("trial_id"),
            "status": state.get("status"),
            "values": {k: v for k, v in ((state.get("hyperparameters") or {}).get("values") or {}).items()
                       if not k.startswith("tuner/")},
            "score": state.get("score") if _finite(state.get("score")) else None,  # JSON has no NaN
            "history": mean_history(histories),
            "seconds": (read_json(os.path.join(trial_dir, TRIAL_RUN_FILE), {}) or {}).get("seconds"),
            "config": os.path.join(trial_dir, TRIAL_CONFIG_FILE),
            "message": _last_line(state.get("message")) if state.get("message") else "",
        })
    return trials


def mean_history(histories):
    """{column: per-epoch mean over executions} of the columns all of them have."""
    histories = [h for h in histories if h.get("epoch")]
    if not histories:
        return {}
    epochs = min(len(h["epoch"]) for h in histories)
    columns = [c for c in histories[0] if all(c in h for h in histories)]
    return {c: [float(np.mean([h[c][i] for h in histories])) for i in range(epochs)] for c in columns}


def summarize(project_dir):
    """The project's trials, best first by the objective, and the files its results live in."""
    settings = read_json(os.path.join(project_dir, SETTINGS_FILE))
    if settings is None:
        raise TuneError(f"{project_dir}: no search there (no {SETTINGS_FILE}).")
    objective = settings["objective"]
    trials = read_trials(project_dir)
    for trial in trials:
        history = trial.pop("history")
        for metric in ("val_accuracy", "val_loss"):
            values = history.get(metric) or []
            best = best_epoch_metrics({metric: values}, metric).get(metric) if values else None
            trial[f"best_{metric}"] = best if best is None or math.isfinite(best) else None
        trial["epochs"] = len(history.get("loss", []))
    sign = -1 if MONITORS[objective] == "max" else 1
    done = sorted((t for t in trials if _finite(t["score"]) and t["status"] == "COMPLETED"),
                  key=lambda t: sign * t["score"])
    rest = [t for t in trials if t not in done]
    best = os.path.join(project_dir, BEST_CONFIG_FILE)
    return {
        "project": project_dir,
        "task": settings["task"],
        "study": settings["study"]["name"],
        "tuner": settings["tuner"],
        "objective": objective,
        "factors": [k for k, v in settings["study"]["hyperparameters"].items() if isinstance(v, (list, dict))],
        "trials": done + rest,
        "best_config": best if os.path.exists(best) else "",
    }


def _finite(value):
    return isinstance(value, (int, float)) and math.isfinite(value)


def format_table(summary, limit=None):
    """A markdown table of the trials in `summary` (best first), one column per factor."""
    factors = summary["factors"]
    head = ["trial"] + factors + [summary["objective"], "best val_accuracy", "best val_loss", "epochs", "time",
                                  "status"]
    rows = []
    for t in summary["trials"][:limit]:
        rows.append([str(int(t["trial_id"]) + 1)] + [_value(t["values"].get(f)) for f in factors] + [
            _number(t["score"]), _number(t["best_val_accuracy"]), _number(t["best_val_loss"]), str(t["epochs"]),
            duration(t["seconds"]) if t["seconds"] is not None else "", str(t["status"]).lower(),
        ])
    widths = [max(len(r[i]) for r in [head] + rows) for i in range(len(head))]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in rows])


def _value(value):
    return "" if value is None else (f"{value:g}" if isinstance(value, float) else str(value))


def _number(value):
    return f"{value:.4f}" if _finite(value) else ""


def write_results(project_dir, study):
    """Write best_config.json, results.json, results.md and study.png; return the summary."""
    summary = summarize(project_dir)
    completed = [t for t in summary["trials"] if t["status"] == "COMPLETED" and _finite(t["score"])]
    if completed:
        write_json_atomic(os.path.join(project_dir, BEST_CONFIG_FILE), read_json(completed[0]["config"]))
        summary["best_config"] = os.path.join(project_dir, BEST_CONFIG_FILE)
    write_json_atomic(os.path.join(project_dir, RESULTS_FILE), summary)
    write_text_atomic(os.path.join(project_dir, TABLE_FILE), format_table(summary) + "\n")
    curves = _study_curves(project_dir, summary, study)
    if curves:
        from cxrkeras import plots

        title = f"{summary['task']}: {study.description or study.name}"
        plots.study_curves(curves, os.path.join(project_dir, FIGURE_FILE), title=title)
        summary["figure"] = os.path.join(project_dir, FIGURE_FILE)
    return summary


def _study_curves(project_dir, summary, study, limit=8):
    """[(label, history)] for the figure: one-factor studies in the study's value order, else the best trials."""
    histories = {t["trial_id"]: t["history"] for t in read_trials(project_dir) if t["history"]}
    trials = [t for t in summary["trials"] if t["trial_id"] in histories]
    factors = summary["factors"]
    if len(factors) == 1 and isinstance(study.space[factors[0]], list):
        order = [_value(v) for v in study.space[factors[0]]]
        label = lambda t: f"{factors[0]}={_value(t['values'].get(factors[0]))}"  # noqa: E731
        trials = sorted(trials, key=lambda t: order.index(_value(t["values"].get(factors[0])))
                        if _value(t["values"].get(factors[0])) in order else len(order))
    else:
        label = lambda t: f"trial {int(t['trial_id']) + 1}"  # noqa: E731
        trials = trials[:limit]
    return [(label(t), histories[t["trial_id"]]) for t in trials]
