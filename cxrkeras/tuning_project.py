"""A tuning project's folder: keras-tuner's state files kept readable, the project held, its trials summarised.

A project folder `OUT/TASK/NAME` holds keras-tuner's files (oracle.json,
trial_*/trial.json, trial_*/checkpoint.weights.h5) and these:

    tune.json               the settings the search started with; a rerun must match them (it resumes)
    trial_*/config.json     the RunConfig the trial trained: `cxrkeras fit --config` takes it
    trial_*/execution0.csv  the trial's history, one row per epoch (one file per execution)
    trial_*/run.json        which tuner ran it and how long it took (over every run, when it was cut short),
                            and the trial it reused, for one copied from an identical finished trial
    trial_*/execution0.backup/, legs.json   while it runs: the last epoch's weights and optimizer, its time so far
    best_config.json        the best trial's config.json
    results.json, results.md   every trial: values, score, best validation accuracy and loss
    study.png               train and validation loss and accuracy per epoch, one line per trial

keras-tuner writes its state files in place; here they go through a temporary
name and a rename, with a copy beside each, and a state file that a kill or a
full disk cut short is restored from its copy before the reload (keras-tuner
issue 987).
"""

import glob
import json
import math
import os

import numpy as np

from cxrkeras.config import MONITORS
from cxrkeras.files import HeldError, hold, read_json, write_json_atomic, write_text_atomic
from cxrkeras.runs import duration

METRICS = ("loss", "accuracy", "val_loss", "val_accuracy")

SETTINGS_FILE = "tune.json"
BEST_CONFIG_FILE = "best_config.json"
RESULTS_FILE = "results.json"
TABLE_FILE = "results.md"
FIGURE_FILE = "study.png"
TRIAL_FILE = "trial.json"  # keras-tuner's
CHECKPOINT_FILE = "checkpoint.weights.h5"  # keras-tuner's: a trial's best epoch's weights
ORACLE_FILE = "oracle.json"  # keras-tuner's
TRIAL_CONFIG_FILE = "config.json"
TRIAL_RUN_FILE = "run.json"
TRIAL_LEGS_FILE = "legs.json"  # a running trial's seconds so far, over the runs it was cut short in


class TuneError(Exception):
    """A search that can't run as asked (a project started with other settings, an unreadable state file)."""


# ---------------------------------------------------------------- project folder


def project_dir_for(out, task, name):
    return os.path.join(out, task, name)


def identical_trial(projects, config, executions):
    """A finished trial in one of `projects` (project folders) that trained `config` (a RunConfig dict, execution
    0's) with `executions` executions, as its folder; None when there is none. Its results are this trial's."""
    config = json.loads(json.dumps(config))  # as config.json holds it: lists, not tuples
    for project in projects:
        for trial_dir in sorted(glob.glob(os.path.join(project, "trial_*"))):
            run = read_json(os.path.join(trial_dir, TRIAL_RUN_FILE), None) or {}
            histories = glob.glob(os.path.join(trial_dir, "execution*.csv"))
            if (run.get("status") == "COMPLETED" and len(histories) == executions
                    and os.path.exists(os.path.join(trial_dir, CHECKPOINT_FILE))
                    and read_json(os.path.join(trial_dir, TRIAL_CONFIG_FILE), None) == config
                    and not glob.glob(os.path.join(trial_dir, "execution*.backup"))):
                return trial_dir
    return None


def trial_epochs(project_dir, state_file, keep):
    """Epochs in the histories of the project's trials whose `state_file` (TRIAL_FILE or TRIAL_RUN_FILE) `keep`
    accepts (a function of its dict)."""
    from cxrkeras.rundir import read_history

    return sum(len(read_history(p).get("epoch", []))
               for trial_dir in glob.glob(os.path.join(project_dir, "trial_*"))
               if keep(read_json(os.path.join(trial_dir, state_file), None) or {})
               for p in glob.glob(os.path.join(trial_dir, "execution*.csv")))


def reused_epochs(project_dir):
    """Epochs the project's trials copied from identical finished trials instead of training them."""
    return trial_epochs(project_dir, TRIAL_RUN_FILE, lambda run: run.get("reused"))


def trial_label(trial_dir):
    """"study-depth/project, trial 1": where a trial lives, for a reader."""
    project = os.path.dirname(os.path.abspath(trial_dir))
    name = os.path.join(*[os.path.basename(p) for p in (os.path.dirname(project), project)])
    return f"{name}, trial {int(os.path.basename(trial_dir)[len('trial_'):]) + 1}"


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
    import keras_tuner  # (Keras with it) only for a project to repair

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


# ---------------------------------------------------------------- results


def read_trials(project_dir):
    """Every trial of a project as a dict (id, status, values, score, best epoch, histories, seconds)."""
    from cxrkeras.rundir import read_history

    trials = []
    for path in sorted(glob.glob(os.path.join(project_dir, "trial_*", TRIAL_FILE))):
        trial_dir = os.path.dirname(path)
        try:
            state = read_json(path)
        except (OSError, ValueError):
            state = {"trial_id": os.path.basename(trial_dir)[len("trial_"):], "status": "UNREADABLE"}
        histories = [read_history(p) for p in sorted(glob.glob(os.path.join(trial_dir, "execution*.csv")))]
        run = read_json(os.path.join(trial_dir, TRIAL_RUN_FILE), {}) or {}
        trials.append({
            "trial_id": state.get("trial_id"),
            "status": state.get("status"),
            "values": {k: v for k, v in ((state.get("hyperparameters") or {}).get("values") or {}).items()
                       if not k.startswith("tuner/")},
            "score": state.get("score") if _finite(state.get("score")) else None,  # JSON has no NaN
            "history": mean_history(histories),
            "seconds": run.get("seconds"),
            "reused": run.get("reused", ""),
            "config": os.path.join(trial_dir, TRIAL_CONFIG_FILE),
            "message": last_line(state.get("message")) if state.get("message") else "",
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
        rows.append([str(int(t["trial_id"]) + 1)] + [format_value(t["values"].get(f)) for f in factors] + [
            _number(t["score"]), _number(t["best_val_accuracy"]), _number(t["best_val_loss"]), str(t["epochs"]),
            duration(t["seconds"]) if t["seconds"] is not None else "",
            str(t["status"]).lower() + (f" (reused: {t['reused']})" if t.get("reused") else ""),
        ])
    widths = [max(len(r[i]) for r in [head] + rows) for i in range(len(head))]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in rows])


def format_value(value):
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
        order = [format_value(v) for v in study.space[factors[0]]]
        label = lambda t: f"{factors[0]}={format_value(t['values'].get(factors[0]))}"  # noqa: E731
        trials = sorted(trials, key=lambda t: order.index(format_value(t["values"].get(factors[0])))
                        if format_value(t["values"].get(factors[0])) in order else len(order))
    else:
        label = lambda t: f"trial {int(t['trial_id']) + 1}"  # noqa: E731
        trials = trials[:limit]
    return [(label(t), histories[t["trial_id"]]) for t in trials]


def best_epoch_metrics(history, monitor):
    """{metric: value} at the best epoch of `history` by `monitor` (NaN values when no epoch has one)."""
    values = np.asarray(history.get(monitor, []), dtype=float)
    if not np.isfinite(values).any():
        return {monitor: float("nan")}
    pick = np.nanargmin if MONITORS[monitor] == "min" else np.nanargmax
    best = int(pick(np.where(np.isfinite(values), values, np.nan)))
    return {m: float(history[m][best]) for m in METRICS if m in history}


def last_line(message):
    lines = [line for line in (message or "").strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else "no message"
