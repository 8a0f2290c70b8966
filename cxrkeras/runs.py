"""A run directory and a saved model: file names, loading, and what a model is (its task and class names).

One place for the names of the files a run, a cascade or an evaluation leaves
behind, and for reading them back: `load_model` (a .keras file or a folder
holding model.keras), `run_config` (the config.json beside it), `model_task`
and `class_names`; `open` reads all of it once and hands the answers on.
"""

import dataclasses
import io
import json
import os

import keras

from cxrkeras.config import CLASSES, TASKS, DataConfig, check_task
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


BACKUP_METADATA = "training_metadata.json"  # BackupAndRestore's epoch count, in BACKUP_DIR


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
    """A saved classifier or cascade (uncompiled, computing in float32) from a `.keras` file or a folder holding
    model.keras."""
    filename = model_file(path)
    try:
        model = keras.saving.load_model(filename, compile=False)
    except Exception as e:  # a corrupt zip, an unknown layer: keras raises many types
        raise ModelError(f"{filename}: does not load as a Keras model ({type(e).__name__}: {e}).") from e
    # files saved before PointwiseConv2D; a model loaded for use answers in float32 whatever it trained in
    return blocks.compute_in_float32(blocks.avoid_strided_pointwise(model))


def model_folder(path):
    """The folder a model at `path` (a .keras file, or a run or cascade folder) lives in ("" for a bare file name)."""
    path = os.fspath(path)
    return path if os.path.isdir(path) else os.path.dirname(path)


@dataclasses.dataclass
class OpenModel:
    """A model and what is known of it, each read once: see `open`."""

    model: keras.Model
    path: str = None  # where it was loaded from (None: a model made in memory)
    kind: str = ""  # one of models.cascade.KINDS
    task: str = None  # `model_task`: None for a binary model whose task nothing tells
    config: dict = None  # the config.json beside it (None: none)
    cascade: dict = None  # the cascade.json beside it (`cascade_record`)

    @property
    def folder(self):
        """The absolute folder the model lives in (the current one for a model made in memory)."""
        return os.path.abspath(model_folder(self.path)) if self.path is not None else os.getcwd()

    @property
    def known_task(self):
        """`task`, or TaskUnknownError when a binary model's task can't be told."""
        if self.task is None:
            raise TaskUnknownError(_unknown_task_message(self.path))
        return self.task

    @property
    def class_names(self):
        """The class names in output order: the model's own (TaskInfo), else its task's."""
        if self.known_task == "cascade":
            return CLASSES
        info = task_info(self.model)
        return tuple(info.class_names) if info is not None else TASKS[self.known_task]

    @property
    def data_task(self):
        """The task whose labels the model is scored on: "three-class" for a cascade, else its own."""
        return "three-class" if self.known_task == "cascade" else self.known_task

    def carve(self, **given):
        """How train was carved for the model: `carve_from` its config.json, else its cascade.json."""
        return carve_from(_data_section(self.config, self.cascade), **given)


def open(path, task=None):  # noqa: A001  (runs.open: a model with what is known of it)
    """The model at `path` (`load_model`) as an OpenModel: its kind, task, config.json and cascade.json,
    each read once. `task` names a binary model that nothing else tells (and must agree with what does)."""
    return open_model(load_model(path), path, task)


def open_model(model, path=None, task=None):
    """An OpenModel of a model already loaded (`path`: where it came from, for the files beside it)."""
    path = os.fspath(path) if path is not None else None
    config = run_config(path) if path is not None else None
    found = _model_task(model, config, task, path)
    return OpenModel(model, path, model_kind(model), found, config, cascade_record(path) if path else None)


def cascade_record(path):
    """The cascade.json beside the model at `path` as a dict, or None (no file, not JSON, not an object)."""
    from cxrkeras.files import read_json

    try:
        record = read_json(os.path.join(model_folder(path), CASCADE_FILE))
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


CARVE_KEYS = ("val_fraction", "seed", "holdout_fraction", "holdout_seed")  # `data.load_splits`' settings


def carve_from(section, **given):
    """{CARVE_KEYS: value}: the `given` values that are not None, else the run's data `section` (a dict
    like config.json's "data"), else DataConfig's defaults."""
    defaults = DataConfig()
    return {k: given[k] if given.get(k) is not None else section.get(k, getattr(defaults, k)) for k in CARVE_KEYS}


def carve_settings(path, **given):
    """`carve_from` for the model at `path`, without loading it: its config.json, else its cascade.json."""
    return carve_from(data_section(path), **given)


def data_section(path):
    """The data settings of the model at `path`, without loading it: config.json's "data", else cascade.json's."""
    return _data_section(run_config(path), cascade_record(path))


def dataset_of(section):
    """The dataset a run's data `section` names (its manifest, else its data folder), or None."""
    return section.get("manifest") or section.get("data_dir") or None


def _data_section(config, cascade):
    """How a run's data was set: config.json's "data", else a cascade.json's (copied from its runs), else {}."""
    return (config or {}).get("data") or (cascade or {}).get("data") or {}


def run_config(path):
    """The run's config.json as a dict (beside a .keras file or in a run folder), or None.

    Raises ModelError naming the file when it is there but not a JSON object.
    """
    candidate = os.path.join(model_folder(path), CONFIG_FILE)
    if not os.path.isfile(candidate):
        return None
    try:
        with io.open(candidate, encoding="utf-8") as f:  # io.open: this module's `open` opens a model
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
    return _model_task(model, lambda: run_config(path) if path is not None else None, task, path)


def _model_task(model, config, task, path):
    """`model_task`, `config` being the run's config.json (a dict or None), or a function reading it if needed."""
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
        model_section = ((config() if callable(config) else config) or {}).get("model")
        found = (model_section.get("task") if isinstance(model_section, dict) else None) or (
            {v: k for k, v in SUBMODELS.items()}.get(model.name))
    if task is not None and found not in (None, task):
        raise ModelError(f"`task` {task!r} does not match the model{_at(path)}, a {found!r} model.")
    return task or found


def known_task(model, path=None, task=None):
    """`model_task`, or TaskUnknownError when a binary model's task can't be told."""
    return _opened(model, path, task).known_task


def _unknown_task_message(path):
    return (
        f"Can't tell whether the binary model{_at(path)} is the infected or the covid classifier "
        f"(it does not say, and no config.json lies beside it): pass its task ('infected' or 'covid')."
    )


def class_names(model, path=None, task=None):
    """The model's class names in output order: its own (TaskInfo), else its task's."""
    return _opened(model, path, task).class_names


def data_task(model, path=None, task=None):
    """The task whose labels a model is scored on: "three-class" for a cascade, else its own task."""
    return _opened(model, path, task).data_task


def _opened(model, path, task):
    """An OpenModel with its task only (config.json read if needed): the one-answer functions above."""
    return OpenModel(model, path, model_kind(model), model_task(model, path, task))


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

    folder = model_folder(source)
    if os.path.realpath(out_dir) == os.path.realpath(folder):
        raise ModelError(f"{out_dir}: the folder of the input model {source}; pick another --out (the input is kept).")
    check_out_dir(out_dir, overwrite)
    os.makedirs(out_dir, exist_ok=True)
    for name in BESIDE_FILES:
        carried = read_json(os.path.join(folder, name)) if name != record_file else None
        if name == CASCADE_FILE and isinstance(carried, dict):
            carried = {**carried, "thresholds": cascade_thresholds(model), "derived_from": os.fspath(source)}
        if carried is not None:
            write_json_atomic(os.path.join(out_dir, name), carried)
    path = save_model_atomic(model, os.path.join(out_dir, MODEL_FILE))
    write_json_atomic(os.path.join(out_dir, record_file), record)
    return path


def check_out_dir(out_dir, overwrite=False):
    """Refuse (ModelError) a folder for a model that is a file, or that holds a model, unless `overwrite`."""
    out_dir = os.fspath(out_dir)
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ModelError(f"{out_dir}: a file; expected a folder for the cascade.")
    existing = os.path.join(out_dir, MODEL_FILE)
    if os.path.exists(existing) and not overwrite:
        raise ModelError(
            f"{existing}: a model is already there (a classifier's run or an older cascade?); "
            f"pick another --out, or pass --overwrite to replace it."
        )
