"""Hyperparameter search with keras-tuner: the study's one-factor experiments and joint searches.

A study (`cxrkeras.search_spaces`) names the settings that vary; a setting it
does not name stays at the base config's value (the study's defaults, or what
the command line set). The HyperModel builds and trains through the same
functions as `cxrkeras fit` (`training.build_and_compile`,
`training.make_datasets`), and a trial's objective is the base config's
`monitor` on the validation split carved from train: test is never looked at.
The project folder and its results: `cxrkeras.tuning_project`. A killed trial
continues after its last finished epoch; finished trials are kept.
"""

import contextlib
import functools
import glob
import io
import math
import os
import shutil
import signal
import time

import keras
import keras_tuner
from keras_tuner.src.engine import (
    tuner_utils,  # SaveBestEpoch, TunerCallback: what Tuner.run_trial uses
)
from keras_tuner.src.tuners import gridsearch  # its LinkedList, for GridOracle

from cxrkeras import training
from cxrkeras.callbacks import AtomicBackupAndRestore, schedule_callbacks
from cxrkeras.config import MONITORS, RunConfig
from cxrkeras.files import read_json, write_json_atomic
from cxrkeras.rundir import read_history, truncate_history
from cxrkeras.runs import duration
from cxrkeras.search_spaces import TUNERS, Study, StudyError, grid_size
from cxrkeras.tuning_project import (
    CHECKPOINT_FILE,
    TRIAL_CONFIG_FILE,
    TRIAL_FILE,
    TRIAL_LEGS_FILE,
    TRIAL_RUN_FILE,
    TuneError,
    last_line,
    format_value,
    best_epoch_metrics,
    check_project,
    identical_trial,
    repair_project,
    trial_label,
    write_results,
    write_state,
)

# Test hook: "after-trial:N" SIGKILLs this process once trial N has ended and been saved,
# "in-trial:N" once trial N's first epoch is backed up. tests/test_tuning.py uses it.
KILL_ENV = "CXRKERAS_TEST_KILL_TUNE"


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
    best epoch by the objective, a plain dict of floats (over the whole history
    file, when it has one: a resumed fit's earlier epochs count).
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

    def fit(self, hp, model, callbacks=(), epochs=None, initial_epoch=0, history_path=None, backup=None, **kwargs):
        """Train `model`; `history_path`: a CSV the epochs are appended to; `backup` (AtomicBackupAndRestore):
        backs up each epoch after its row is written, and continues after the last backed-up one."""
        cfg = self.config(hp)
        sets = training.make_datasets(cfg, self.data, self.augment_on)
        extra = schedule_callbacks(cfg)
        if history_path:
            extra.append(keras.callbacks.CSVLogger(history_path, append=True))
        extra += [backup] if backup is not None else []
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
        return best_epoch_metrics(read_history(history_path) if history_path else history.history, cfg.train.monitor)


def resume_execution(history_path, backup, checkpoint):
    """Epochs a killed execution finished and backed up (0: none, it starts over, its history removed).

    What it finished stays: its history cut to the backed-up epochs (a row
    written after the last backup goes), and `checkpoint` (keras-tuner's
    SaveBestEpoch) knows their best value, so a worse epoch after the resume
    does not replace the best one's weights.
    """
    done = (read_json(backup._training_metadata_path, None) or {}).get("epoch", 0)
    if not done:
        shutil.rmtree(backup.backup_dir, ignore_errors=True)
        if os.path.exists(history_path):
            os.remove(history_path)
        return 0
    truncate_history(history_path, done)
    objective = checkpoint.objective
    for value in read_history(history_path).get(objective.name, []):
        if math.isfinite(value) and objective.better_than(value, checkpoint.best_value):
            checkpoint.best_value = value
    return done


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

    def __init__(self, oracle, hypermodel, project_dir, planned=None, executions_per_trial=1, log=print, callbacks=(),
                 reuse=()):
        self.planned, self.log, self._seconds, self._started, self._earlier = planned, log, [], None, 0.0
        self.reuse, self._reused = list(reuse), {}  # projects whose identical finished trials stand in for ours
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
        config, epochs = self.hypermodel.config(hp), {}
        if "tuner/epochs" in hp.values:  # Hyperband: this round's epochs, after the last round's
            epochs = dict(epochs=hp.values["tuner/epochs"], initial_epoch=hp.values["tuner/initial_epoch"])
            config.train.epochs = epochs["epochs"]
        settings = config.to_dict()
        write_json_atomic(os.path.join(trial_dir, TRIAL_CONFIG_FILE), settings)
        donor = None if epochs else identical_trial(self.reuse, settings, self.executions_per_trial)
        if donor:
            return self._reuse_trial(trial, donor, config.train.monitor)
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
            history = os.path.join(trial_dir, f"execution{execution}.csv")
            backup = AtomicBackupAndRestore(os.path.join(trial_dir, f"execution{execution}.backup"),
                                            on_commit=self._committer(trial))
            resume_execution(history, backup, checkpoint)  # a killed execution continues after its last epoch
            results.append(self.hypermodel.fit(hp, model, callbacks=callbacks, history_path=history, backup=backup,
                                               **epochs))
        self.hypermodel.execution = 0
        return results

    def _reuse_trial(self, trial, donor, monitor):
        """`donor` (a finished trial that trained the same config) stands in for `trial`: its histories and best
        weights are copied, its best epochs' metrics are the results."""
        trial_dir = self.get_trial_dir(trial.trial_id)
        for name in [os.path.basename(p) for p in glob.glob(os.path.join(donor, "execution*.csv"))]:
            shutil.copyfile(os.path.join(donor, name), os.path.join(trial_dir, name))
        shutil.copyfile(os.path.join(donor, CHECKPOINT_FILE), self._get_checkpoint_fname(trial.trial_id))
        earlier = read_json(os.path.join(donor, TRIAL_RUN_FILE), {}).get("reused")
        self._reused[trial.trial_id] = earlier or trial_label(donor)
        return [best_epoch_metrics(read_history(p), monitor)
                for p in sorted(glob.glob(os.path.join(trial_dir, "execution*.csv")))]

    def on_trial_begin(self, trial):
        super().on_trial_begin(trial)
        self._started = time.perf_counter()
        self._earlier = (read_json(self._legs_path(trial), None) or {}).get("seconds", 0.0)  # runs cut short

    def _legs_path(self, trial):
        return os.path.join(self.get_trial_dir(trial.trial_id), TRIAL_LEGS_FILE)

    def _seconds_so_far(self):
        return self._earlier + time.perf_counter() - self._started

    def _committer(self, trial):
        """The backups' on_commit: the trial's time so far to its legs file, so a trial cut short counts all its
        runs; the test hook "in-trial:N" SIGKILLs once trial N's first epoch is backed up."""
        kill = os.environ.get(KILL_ENV) == f"in-trial:{int(trial.trial_id)}"

        def commit(epochs_done):
            write_json_atomic(self._legs_path(trial), {"seconds": round(self._seconds_so_far(), 2)})
            if kill and epochs_done == 1:
                os.kill(os.getpid(), signal.SIGKILL)
        return commit

    def on_trial_end(self, trial):
        super().on_trial_end(trial)  # the oracle records the result and saves it
        seconds = self._seconds_so_far()
        trial_dir = self.get_trial_dir(trial.trial_id)
        for backup in glob.glob(os.path.join(trial_dir, "execution*.backup")):
            shutil.rmtree(backup, ignore_errors=True)  # needed only while the trial could be cut short
        if trial.trial_id not in self._reused:  # a copied trial says nothing of the time a trial takes
            self._seconds.append(seconds)
        reused = {"reused": self._reused[trial.trial_id]} if trial.trial_id in self._reused else {}
        write_json_atomic(os.path.join(trial_dir, TRIAL_RUN_FILE),
                          {"tuner_id": self.tuner_id, "seconds": round(seconds, 2), "status": trial.status, **reused})
        with contextlib.suppress(FileNotFoundError):
            os.remove(self._legs_path(trial))
        self.log(self._progress_line(self.oracle.get_trial(trial.trial_id), seconds))
        if os.environ.get(KILL_ENV) == f"after-trial:{int(trial.trial_id)}":
            os.kill(os.getpid(), signal.SIGKILL)

    def _progress_line(self, trial, seconds):
        number = int(trial.trial_id) + 1
        of = f"/{self.planned}" if self.planned else ""
        values = ", ".join(f"{k}={format_value(v)}" for k, v in trial.hyperparameters.values.items()
                           if not k.startswith("tuner/"))
        objective = self.oracle.objective.name
        if trial.score is not None and math.isfinite(trial.score):
            outcome = f"{objective} {trial.score:.4f}"
        else:
            outcome = f"{str(trial.status).lower()}: {last_line(trial.message)}"
        best = self.oracle.get_best_trials(1)
        if best and best[0].score is not None:
            outcome += f" (best {best[0].score:.4f}, trial {int(best[0].trial_id) + 1})"
        left = ""
        if self.planned:
            remaining = max(0, self.planned - number)
            if self._seconds:
                left = f"; about {duration(remaining * sum(self._seconds) / len(self._seconds))} left"
        took = f"in {duration(seconds)}"
        if trial.trial_id in self._reused:
            took = f"copied from {self._reused[trial.trial_id]}"
        return f"trial {number}{of} [{values}]: {outcome} {took}{left}"

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


# ---------------------------------------------------------------- search


def tune(study, base, project_dir, tuner=None, max_trials=None, executions_per_trial=1, augment_on="auto",
         verbose=0, log=print, callbacks=(), reuse=()):
    """Search `study` around `base` (a RunConfig) in `project_dir`; return `summarize(project_dir)`.

    Reruns resume: finished trials are kept, a trial a kill interrupted
    continues after its last finished epoch. Under keras-tuner's distributed mode (KERASTUNER_TUNER_ID,
    KERASTUNER_ORACLE_IP, KERASTUNER_ORACLE_PORT) the chief serves the oracle
    and writes the results, and each worker runs trials; all share `project_dir`.
    `callbacks` (Keras callbacks) join every trial's fit. A trial whose config a finished trial of a project in
    `reuse` (project folders) already trained, with as many executions, is copied from it, not trained again.
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
                              executions_per_trial, log, callbacks,
                              [p for p in reuse if os.path.abspath(p) != os.path.abspath(project_dir)])
    try:
        searcher.search()
    except RuntimeError as e:  # keras-tuner: "Number of consecutive failures exceeded the limit of 3."
        raise TuneError(f"{project_dir}: {str(e).strip().splitlines()[0]} Last error: {last_line(str(e))}") from e
    if _is_worker():
        log(f"{os.environ.get('KERASTUNER_TUNER_ID')}: no trials left; the chief writes the results.")
        return None
    return write_results(project_dir, study)
