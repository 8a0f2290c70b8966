"""A run directory and a saved model: file names, loading, and what a model is (its task and class names).

One place for the names of the files a run, a cascade or an evaluation leaves
behind, and for reading them back: `load_model` (a .keras file or a folder
holding model.keras), `run_config` (the config.json beside it), `model_task`
and `class_names`.
"""

import json
import os

import keras

from cxrkeras.config import CLASSES, TASKS, check_task
from cxrkeras.models import blocks, task_info
from cxrkeras.models.cascade import SUBMODELS, ModelError, model_kind

# A training run: saved_models/TASK/NAME/
MODEL_FILE = "model.keras"  # the best epoch (a run), or the cascade (a cascade folder)
CONFIG_FILE = "config.json"  # the RunConfig that made the run
HISTORY_FILE = "history.csv"
CURVES_FILE = "curves.png"
STATE_FILE = "state.json"
SKIPPED_FILE = "skipped_files.txt"
BACKUP_DIR = "backup"
LOGS_DIR = "logs"
# A cascade folder
CASCADE_FILE = "cascade.json"
TRADEOFF_PLOT = "threshold_tradeoff.png"
# An evaluation folder
METRICS_FILE = "metrics.json"
# A model derived from another (`cxrkeras adapt`, `cxrkeras calibrate`): the record of what was done
ADAPT_FILE = "adapt.json"
CALIBRATION_FILE = "calibration.json"
BESIDE_FILES = (CONFIG_FILE, CASCADE_FILE, ADAPT_FILE, CALIBRATION_FILE)  # carried to a derived model's folder


class TaskUnknownError(ModelError):
    """A binary model whose task (infected or covid) can't be told: the caller must name it."""


def model_file(path):
    """The `.keras` file for `path`: the file itself, or DIR/model.keras of a run or cascade dir."""
    path = os.fspath(path)
    if os.path.isfile(path) and path.endswith(".keras"):
        return path
    candidate = os.path.join(path, MODEL_FILE)
    if os.path.isdir(path) and os.path.isfile(candidate):
        return candidate
    if not os.path.exists(path):
        problem = "no such file or folder"
    elif os.path.isdir(path):
        problem = "folder without model.keras"
    else:
        problem = "not a .keras file"
    raise ModelError(
        f"{path}: {problem}; expected a .keras file, or a run or cascade folder holding model.keras."
    )


def load_model(path):
    """A saved classifier or cascade (uncompiled) from a `.keras` file or a folder holding model.keras."""
    filename = model_file(path)
    try:
        model = keras.saving.load_model(filename, compile=False)
    except Exception as e:  # a corrupt zip, an unknown layer: keras raises many types
        raise ModelError(f"{filename}: does not load as a Keras model ({type(e).__name__}: {e}).") from e
    return blocks.avoid_strided_pointwise(model)  # files saved before PointwiseConv2D


def model_folder(path):
    """The folder a model at `path` (a .keras file, or a run or cascade folder) lives in ("" for a bare file name)."""
    path = os.fspath(path)
    return path if os.path.isdir(path) else os.path.dirname(path)


def run_config(path):
    """The run's config.json as a dict (beside a .keras file or in a run folder), or None.

    Raises ModelError naming the file when it is there but not a JSON object.
    """
    candidate = os.path.join(model_folder(path), CONFIG_FILE)
    if not os.path.isfile(candidate):
        return None
    try:
        with open(candidate, encoding="utf-8") as f:
            config = json.load(f)
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise ModelError(f"{candidate}: not a run's config.json (not valid JSON: {e}).") from None
    if not isinstance(config, dict):
        raise ModelError(f"{candidate}: not a run's config.json (expected a JSON object).")
    return config


def model_task(model, path=None, task=None):
    """The task a model was trained for: "infected", "covid", "three-class" or "cascade".

    From, in order: the model's outputs (cascade, three-class), what the
    model says of itself (its `TaskInfo` layer), the run's config.json beside
    `path` (models saved before TaskInfo), and the name the builders give
    binary models ("infected_classifier", "covid_classifier"). `task`, given
    by the user, must agree with what was found, and names a binary model
    that nothing else tells. None when a binary model's task can't be told.
    """
    kind = model_kind(model)
    if task is not None:
        check_task(task)
    info = task_info(model)
    if kind == "cascade":
        found = "cascade"
    elif info is not None:
        found = info.task
    elif kind == "three-class":
        found = "three-class"
    else:
        found = _config_task(path) or {v: k for k, v in SUBMODELS.items()}.get(model.name)
    if task is not None and found not in (None, task):
        raise ModelError(f"`task` {task!r} does not match the model{_at(path)}, a {found!r} model.")
    return task or found


def _config_task(path):
    config = run_config(path) if path is not None else None
    model_section = (config or {}).get("model")
    return model_section.get("task") if isinstance(model_section, dict) else None


def known_task(model, path=None, task=None):
    """`model_task`, or TaskUnknownError when a binary model's task can't be told."""
    found = model_task(model, path, task)
    if found is None:
        raise TaskUnknownError(
            f"Can't tell whether the binary model{_at(path)} is the infected or the covid classifier "
            f"(it does not say, and no config.json lies beside it): pass its task ('infected' or 'covid')."
        )
    return found


def class_names(model, path=None, task=None):
    """The model's class names in output order: its own (TaskInfo), else its task's."""
    found = known_task(model, path, task)
    if found == "cascade":
        return CLASSES
    info = task_info(model)
    return tuple(info.class_names) if info is not None else TASKS[found]


def data_task(model, path=None, task=None):
    """The task whose labels a model is scored on: "three-class" for a cascade, else its own task."""
    found = known_task(model, path, task)
    return "three-class" if found == "cascade" else found


def _at(path):
    return f" at {os.fspath(path)}" if path is not None else ""


def duration(seconds):
    """`seconds` as people read it: 12.3s, 4m05s, 2h10m."""
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{seconds:.1f}s"


def save_derived(model, source, out_dir, record_file, record, overwrite=False):
    """Write `model`, made from the model at `source`, as OUT_DIR/model.keras with `record` as OUT_DIR/`record_file`.

    The files beside the source (config.json, cascade.json, an earlier
    adapt.json or calibration.json) come along, so OUT_DIR is a run or
    cascade folder like the source's; a cascade.json gets the model's own
    thresholds. The source's folder is never written to, and a folder that
    already holds a model only with `overwrite`. Returns OUT_DIR/model.keras.
    """
    from cxrkeras.files import read_json, save_model_atomic, write_json_atomic
    from cxrkeras.models.cascade import cascade_thresholds
    from cxrkeras.thresholds import check_out_dir

    folder = model_folder(source)
    if os.path.realpath(out_dir) == os.path.realpath(folder):
        raise ModelError(f"{out_dir}: the folder of the input model {source}; pick another --out (the input is kept).")
    check_out_dir(out_dir, overwrite)
    os.makedirs(out_dir, exist_ok=True)
    for name in BESIDE_FILES:
        carried = read_json(os.path.join(folder, name)) if name != record_file else None
        if name == CASCADE_FILE and isinstance(carried, dict):
            t_infected, t_covid = cascade_thresholds(model)
            carried = {**carried, "thresholds": {"infected": t_infected, "covid": t_covid}, "derived_from": os.fspath(source)}
        if carried is not None:
            write_json_atomic(os.path.join(out_dir, name), carried)
    path = save_model_atomic(model, os.path.join(out_dir, MODEL_FILE))
    write_json_atomic(os.path.join(out_dir, record_file), record)
    return path
