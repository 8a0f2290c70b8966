"""A training run's directory: starting, checking and resuming it, and its history.

A run lives in `saved_models/TASK/NAME/`:

    model.keras     the best epoch by the monitored validation metric (written atomically)
    config.json     the RunConfig, data fingerprint included: all that rebuilds and retrains it
    history.csv     one row per epoch (CSVLogger; appended on resume, never duplicated)
    curves.png      train and validation loss and accuracy per epoch
    state.json      best metric and epoch, whether the run completed (and a staged best, see
                    `cxrkeras.callbacks.BestModelCheckpoint`)
    backup/         the last finished epoch: weights, optimizer state, epoch count (kept, so a run can be extended)
    model.pending.keras  a best epoch not yet committed (only between an epoch's end and its backup)
    skipped_files.txt   files that did not decode (only when there are any)
    logs/           TensorBoard (only with `tensorboard=True`)

A run killed at any moment (Ctrl-C, kill -9, a full disk) continues after its
last finished epoch, and its model.keras, state.json and history.csv always
describe the same epochs.
"""

import csv
import os
import shutil
import time

from cxrkeras.config import RunConfig, check_task
from cxrkeras.files import HeldError, hold, read_json, remove_temp_files, write_json_atomic, write_text_atomic
from cxrkeras.runs import (
    BACKUP_DIR,
    BACKUP_METADATA,
    CONFIG_FILE,
    CURVES_FILE,
    HISTORY_FILE,
    MODEL_FILE,
    SKIPPED_FILE,
    STATE_FILE,
)


class RunDirError(Exception):
    """A run directory that cannot be used as asked: already there, nothing to resume, other settings or data."""


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
    check_process_count(state, processes, run_dir)
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


def check_process_count(state, processes, run_dir):
    """Raise RunDirError when the run in `run_dir` (its `state`) trained on another number of processes."""
    before = state.get("processes", 1)
    if before != processes:
        raise RunDirError(f"{run_dir}: the run trained on {before} process(es); resume it on {before}, "
                          f"not {processes} (the data each process reads would change).")


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


LOCK_FILE = ".fit.lock"  # held by the process training into the run dir


def hold_run_dir(run_dir):
    """This process's hold on `run_dir` (an open lock file); RunDirError naming the fit already training there.

    Two fits writing one run dir (a resume started while the run still trains)
    would interleave checkpoints and history. The kernel lets go of the lock
    when its holder exits, killed or not.
    """
    os.makedirs(run_dir, exist_ok=True)
    try:
        return hold(os.path.join(run_dir, LOCK_FILE))
    except HeldError as e:
        raise RunDirError(f"{run_dir}: another `cxrkeras fit` trains into this run dir ({e}); wait for it to "
                          "finish or stop it, then resume.") from None


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


def epochs_done(run_dir):
    """Epochs a run in `run_dir` has committed (its backup's epoch count); 0 when none."""
    return read_json(os.path.join(run_dir, BACKUP_DIR, BACKUP_METADATA), {}).get("epoch", 0)


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
