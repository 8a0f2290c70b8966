"""Assemble a cascade from trained classifiers, optionally at an operating point picked apart from test.

Each stage is one classifier or an ensemble of several (their probabilities
averaged). The operating point (thresholds reaching a target recall for one
class) is picked on the holdout carved from train when the runs carved one
(`Splits.holdout`: no epoch was picked on it), else on the validation split
(`Splits.validation`), never on test. The cascade folder holds model.keras, cascade.json (thresholds,
source runs, the choice and its trade-off table) and threshold_tradeoff.png.
"""

import os
import sys

import numpy as np

from cxrkeras import data as data_lib
from cxrkeras import runs
from cxrkeras.config import CLASSES, DECISION_THRESHOLD
from cxrkeras.files import save_model_atomic, write_json_atomic
from cxrkeras.models import cascade as cascade_lib


def load_classifier(path, task):
    """The binary classifier for `task` ("infected" or "covid") at `path`; ModelError if it is another."""
    model = runs.load_model(path)
    kind = cascade_lib.model_kind(model)
    if kind != "binary":
        raise runs.ModelError(
            f"{path}: a {kind} model; expected the binary {task} classifier (one sigmoid output)."
        )
    found = runs.model_task(model, path)
    if found is not None and found != task:
        raise runs.ModelError(
            f"{path}: the {found} classifier given where the {task} classifier was expected "
            f"(are the two runs swapped? the order is RUN_INFECTED RUN_COVID)."
        )
    return model


def validation_settings(paths, data=None, val_fraction=None, seed=None):
    """(source, carve) for the split thresholds are picked on: given values, else the runs' config.json, else defaults.

    `carve` holds load_splits' val_fraction, seed, holdout_fraction and
    holdout_seed. Warns on stderr when the runs were split differently (one
    run's validation images were then another's training images).
    """
    return _carve([runs.run_config(p) for p in paths], data, val_fraction, seed)


def _carve(configs, data, val_fraction, seed):
    """`validation_settings` from the runs' config.json dicts (None: a run without one)."""
    configs = [c.get("data", {}) for c in configs if c]
    keys = runs.CARVE_KEYS
    splits = {tuple(c.get(k) for k in keys) for c in configs}
    if len(splits) > 1:
        settings = sorted(splits, key=str)
        print(f"warning: the runs carved train differently {settings} ({', '.join(keys)}); using the first.",
              file=sys.stderr)
    first = configs[0] if configs else {}
    if data is None:
        data = runs.dataset_of(first)
    return data, runs.carve_from(first, val_fraction=val_fraction, seed=seed)


def selection_split(carve):
    """Where thresholds are picked: "holdout" when the runs carved one (no epoch picked there), else "validation"."""
    return "holdout" if carve["holdout_fraction"] else "validation"


def selection_probabilities(infected_model, covid_model, source, carve, batch_size=64):
    """(p_infected [N], p_covid [N], labels3 [N]) on `selection_split(carve)` of `source`, never test.

    Images are read at the classifiers' input size.
    """
    split = selection_split(carve)
    samples = data_lib.load_splits(source, **carve).get(split)
    if not samples:
        raise data_lib.DatasetError(f"{source}: the {split} split is empty ({carve}).")
    images = data_lib.load_images([s.path for s in samples], int(infected_model.input_shape[1]))
    labels = np.asarray([CLASSES.index(s.label) for s in samples], dtype="int64")
    p_i = infected_model.predict(images, batch_size=batch_size, verbose=0)[:, 0]
    p_c = covid_model.predict(images, batch_size=batch_size, verbose=0)[:, 0]
    return p_i, p_c, labels


def load_stage(paths, task):
    """The classifier for `task` at `paths` (one path or several): one model, or an ensemble averaging them."""
    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    if not paths:
        raise ValueError(f"No {task} classifier given.")
    members = [load_classifier(path, task) for path in paths]
    return members[0] if len(members) == 1 else cascade_lib.build_ensemble(members, task)


def make_cascade(
    infected_path, covid_path, out_dir, target=None, data=None, val_fraction=None, seed=None, thresholds=None,
    overwrite=False,
):
    """Build and save a cascade folder; returns the record written to cascade.json.

    `infected_path` and `covid_path` are a run (or .keras file) each, or lists
    of runs: a stage of several averages their probabilities (an ensemble).
    With `target` (e.g. {"covid": 0.95}) the thresholds are chosen on the
    runs' holdout when they carved one, else on their validation split (of
    `data`, default the runs' dataset, split with the runs' settings);
    otherwise `thresholds` ({"infected": t, "covid": t}, a name left out at
    DECISION_THRESHOLD) are used. A folder that already holds a
    model is refused (ModelError) unless `overwrite`; every file is written
    through a temporary name and a rename.
    """
    runs.check_out_dir(out_dir, overwrite)
    thresholds = cascade_lib.check_thresholds(thresholds)
    infected = load_stage(infected_path, "infected")
    covid = load_stage(covid_path, "covid")
    configs = [runs.run_config(p) for p in _as_list(infected_path) + _as_list(covid_path)]
    record = {"thresholds": thresholds, "sources": {"infected": _source(infected_path), "covid": _source(covid_path)}}
    first_config = next((c for c in configs if c), None)
    if first_config and isinstance(first_config.get("data"), dict):
        record["data"] = first_config["data"]  # how train was carved: `evaluate --split holdout` reads it
    selection = None
    if target is not None:
        selection = _select(infected, covid, configs, target, data, val_fraction, seed, record)
    model = cascade_lib.build_cascade(infected, covid, record["thresholds"])
    os.makedirs(out_dir, exist_ok=True)
    save_model_atomic(model, os.path.join(out_dir, runs.MODEL_FILE))
    if selection is not None:
        from cxrkeras import plots

        record["plot"] = plots.threshold_tradeoff(selection, os.path.join(out_dir, runs.TRADEOFF_PLOT))
        record["table"] = selection["table"]
    write_json_atomic(os.path.join(out_dir, runs.CASCADE_FILE), record)
    return record


def _select(infected, covid, configs, target, data, val_fraction, seed, record):
    """`choose_thresholds` on the runs' selection split; `record` gains the thresholds, the split and the choice."""
    parse_target(target)
    source, carve = _carve(configs, data, val_fraction, seed)
    if source is None:
        raise ValueError(
            "Choosing thresholds needs the runs' dataset (`data`; --data on the command line): "
            "their config.json names none."
        )
    p_i, p_c, labels = selection_probabilities(infected, covid, source, carve)
    selection = choose_thresholds(p_i, p_c, labels, target)
    record["thresholds"] = selection["thresholds"]
    split = selection_split(carve)
    settings = ("val_fraction", "seed") if split == "validation" else ("holdout_fraction", "holdout_seed")
    record[split] = {"data": os.fspath(source), **{k: carve[k] for k in settings}, "images": len(labels)}
    record["selection"] = {k: v for k, v in selection.items() if k != "table"}
    record["selection"]["split"] = split
    return selection


def _as_list(paths):
    return [os.fspath(paths)] if isinstance(paths, (str, os.PathLike)) else [os.fspath(p) for p in paths]


def _source(paths):
    """One run's path as given, or the list of an ensemble's."""
    listed = _as_list(paths)
    return listed[0] if len(listed) == 1 else listed


# ---------------------------------------------------------------- operating point


def choose_thresholds(infected_probs, covid_probs, labels3, target, grid=None):
    """Thresholds {"infected", "covid"} that reach a target recall for one class, on validation data.

    `infected_probs`, `covid_probs`: each classifier's p on the same images
    (the covid classifier on all of them, as the cascade runs it); `labels3`:
    class ids in CLASSES order; `target`: {class: recall}, e.g. {"covid": 0.95}.
    Every pair of `grid` thresholds (default 0.05, 0.10, ..., 0.95) is scored;
    among those whose recall reaches the target the most accurate wins (ties:
    closest to the study's DECISION_THRESHOLD pair). If none reaches it, the highest recall
    wins. Returns the choice, the study's pair's row ("default"), and the whole table
    (recall of the class, its false negatives and false positives, accuracy).
    """
    name, recall_target = parse_target(target)
    p_i, p_c, labels = _checked_probabilities(infected_probs, covid_probs, labels3, name)
    table = _score_grid(p_i, p_c, labels, CLASSES.index(name), grid)
    recall, accuracy = (np.array([row[k] for row in table]) for k in ("recall", "accuracy"))
    distance = np.array([abs(row["infected"] - DECISION_THRESHOLD) + abs(row["covid"] - DECISION_THRESHOLD)
                         for row in table])
    reached = recall >= recall_target - 1e-12
    if reached.any():
        order = np.lexsort((distance, -accuracy, ~reached))
    else:
        order = np.lexsort((distance, -accuracy, -recall))
    best = table[int(order[0])]
    return {
        "class": name,
        "target_recall": recall_target,
        "reached": bool(reached.any()),
        "thresholds": {"infected": best["infected"], "covid": best["covid"]},
        "chosen": best,
        "default": table[int(np.argmin(distance))],
        "images": int(len(labels)),
        "positives": int(np.sum(labels == CLASSES.index(name))),
        "table": table,
    }


def _checked_probabilities(infected_probs, covid_probs, labels3, name):
    """(p_infected, p_covid, labels) as flat arrays; ValueError on lengths, labels or a class without images."""
    p_i = np.asarray(infected_probs, dtype="float64").reshape(-1)
    p_c = np.asarray(covid_probs, dtype="float64").reshape(-1)
    labels = np.asarray(labels3).reshape(-1).astype("int64")
    if not len(p_i) == len(p_c) == len(labels) or len(labels) == 0:
        raise ValueError(
            f"`infected_probs`, `covid_probs` and `labels3` must have the same non-zero length. "
            f"Received lengths: {len(p_i)}, {len(p_c)}, {len(labels)}"
        )
    if labels.min() < 0 or labels.max() > 2:
        raise ValueError(f"`labels3` must be class ids 0, 1 or 2. Received values: {sorted(set(labels.tolist()))}")
    if not np.any(labels == CLASSES.index(name)):
        raise ValueError(f"No {name!r} images among the labels: its recall is undefined.")
    return p_i, p_c, labels


def _score_grid(p_i, p_c, labels, k, grid=None):
    """[{"infected", "covid", "recall", "fn", "fp", "accuracy"}] of class `k` for every pair of `grid` thresholds
    (default 0.05, ..., 0.95; DECISION_THRESHOLD always among them)."""
    grid = np.round(np.arange(0.05, 0.951, 0.05), 4) if grid is None else np.asarray(grid, dtype="float64")
    grid = np.unique(np.append(grid, DECISION_THRESHOLD))
    ti, tc = (t.reshape(-1) for t in np.meshgrid(grid, grid, indexing="ij"))
    # decisions [pairs, N] by the study's rule
    pred = cascade_lib.cascade_decisions(p_i[None], p_c[None], {"infected": ti[:, None], "covid": tc[:, None]})
    is_k, said_k = labels[None] == k, pred == k
    fn = np.sum(is_k & ~said_k, axis=1)
    fp = np.sum(~is_k & said_k, axis=1)
    positives = int(np.sum(labels == k))
    recall = (positives - fn) / positives
    accuracy = np.mean(pred == labels[None], axis=1)
    return [
        {"infected": float(a), "covid": float(b), "recall": float(r), "fn": int(n), "fp": int(p), "accuracy": float(c)}
        for a, b, r, n, p, c in zip(ti, tc, recall, fn, fp, accuracy)
    ]


def parse_target(target):
    """("covid", 0.95) from {"covid": 0.95}; ValueError naming the bad part."""
    if not isinstance(target, dict) or len(target) != 1:
        raise ValueError(
            f"`target` must be one {{class: recall}} pair, e.g. {{'covid': 0.95}}. Received: target={target!r}"
        )
    ((name, value),) = target.items()
    if name not in CLASSES:
        raise ValueError(
            f"Unknown class {name!r} in `target`; expected one of {list(CLASSES)}. Received: target={target!r}"
        )
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating)) or not 0 < value <= 1:
        raise ValueError(f"The target recall must be in (0, 1]. Received: target={target!r}")
    return name, float(value)
