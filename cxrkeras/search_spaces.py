"""Search spaces of `cxrkeras tune`: the study files, their checks and the tuners (no TensorFlow, no Keras).

A study is a TOML file in `tuning/` (installed as `cxrkeras.studies`): which
settings vary, over which values, and the tuner it suits. `cxrkeras tune
--help` and argument errors read this module alone; `cxrkeras.tuning` runs
the search.
"""

import math
import os
import tomllib
from dataclasses import dataclass

STUDIES_PACKAGE = "cxrkeras.studies"  # the repository's tuning/ folder (setup.cfg maps it)
TUNERS = ("grid", "random", "hyperband", "bayesian")
# The settings a study may search (where each lives: config.SETTING_FIELDS).
TUNABLE = (
    "depth", "batch_size", "optimizer", "learning_rate", "weight_decay", "schedule", "warmup_epochs",
    "label_smoothing", "ema", "class_weight", "augment", "augmentation", "border_erase", "dropout", "dense_units",
    "batchnorm",
)


class StudyError(ValueError):
    """A study file that can't be used: names the file, the key and the value."""


@dataclass
class Study:
    """A search space from a study file: {hyperparameter: [values] | {min, max[, step, sampling]} | value}."""

    name: str
    space: dict
    description: str = ""
    tuner: str = "grid"
    max_trials: int = None
    source: str = ""
    published: dict = None  # the published study's own outcome: {"choice": value, "finding": its words}

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
    unknown = sorted(set(doc) - {"description", "tuner", "max_trials", "hyperparameters", "published"})
    if unknown:
        raise StudyError(f"{path}: unknown keys {unknown}; expected description, tuner, max_trials, hyperparameters, "
                         "published.")
    study = Study(
        name=os.path.splitext(os.path.basename(path))[0],
        space=doc.get("hyperparameters", {}),
        description=doc.get("description", ""),
        tuner=doc.get("tuner", "grid"),
        max_trials=doc.get("max_trials"),
        source=path,
        published=doc.get("published"),
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
    _check_published(where, study)


def _check_published(where, study):
    """[published]: the published study's choice among the one factor's listed values, and its words."""
    published = study.published
    if published is None:
        return
    values = study.space.get(study.factors[0]) if len(study.factors) == 1 else None
    if not (isinstance(published, dict) and set(published) == {"choice", "finding"} and isinstance(values, list)
            and published["choice"] in values and isinstance(published["finding"], str)):
        raise StudyError(f"{where}: [published] needs `choice`, one of the listed values of the study's one factor, "
                         f"and `finding`, the study's words. Received: {published!r} for {study.space!r}")


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
