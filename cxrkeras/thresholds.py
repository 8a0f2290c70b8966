"""Assemble a cascade from two trained classifiers, optionally at an operating point picked on validation.

The operating point (thresholds reaching a target recall for one class) is
picked on the validation split carved from train (`Splits.validation`), never
on test. The cascade folder holds model.keras, cascade.json (thresholds,
source runs, the choice and its trade-off table) and threshold_tradeoff.png.
"""

import json
import os
import sys

import numpy as np

from cxrkeras import data as data_lib
from cxrkeras.config import CLASSES
from cxrkeras.models import cascade as cascade_lib
from cxrkeras.models.cascade import choose_thresholds, parse_target  # noqa: F401  (re-exported)

CASCADE_FILE = "cascade.json"
PLOT_FILE = "threshold_tradeoff.png"


def load_classifier(path, task):
    """The binary classifier for `task` ("infected" or "covid") at `path`; ModelError if it is another."""
    model = cascade_lib.load_model(path)
    kind = cascade_lib.model_kind(model)
    if kind != "binary":
        raise cascade_lib.ModelError(
            f"{path}: a {kind} model; expected the binary {task} classifier (one sigmoid output)."
        )
    found = cascade_lib.model_task(model, path)
    if found is not None and found != task:
        raise cascade_lib.ModelError(
            f"{path}: the {found} classifier given where the {task} classifier was expected "
            f"(are the two runs swapped? the order is RUN_INFECTED RUN_COVID)."
        )
    return model


def validation_settings(paths, data=None, val_fraction=None, seed=None):
    """(source, val_fraction, seed) for the validation split: given values, else the runs' config.json, else defaults.

    Warns on stderr when the two runs were split differently (one run's
    validation images were then another's training images).
    """
    configs = [c.get("data", {}) for c in (cascade_lib.run_config(p) for p in paths) if c]
    splits = {(c.get("val_fraction"), c.get("seed")) for c in configs}
    if len(splits) > 1:
        settings = sorted(splits, key=str)
        print(f"warning: the runs carved validation differently {settings}; using the first.", file=sys.stderr)
    first = configs[0] if configs else {}
    if data is None:
        data = first.get("manifest") or first.get("data_dir") or None
    if val_fraction is None:
        val_fraction = first.get("val_fraction", 0.15)
    if seed is None:
        seed = first.get("seed", 0)
    return data, val_fraction, seed


def validation_probabilities(infected_model, covid_model, source, val_fraction=0.15, seed=0, batch_size=64):
    """(p_infected [N], p_covid [N], labels3 [N]) on the validation split carved from train of `source`."""
    splits = data_lib.load_splits(source, val_fraction, seed)
    if not splits.validation:
        raise data_lib.DatasetError(f"{source}: the validation split is empty (val_fraction={val_fraction}).")
    images = data_lib.load_images([s.path for s in splits.validation])
    labels = np.asarray([CLASSES.index(s.label) for s in splits.validation], dtype="int64")
    p_i = infected_model.predict(images, batch_size=batch_size, verbose=0)[:, 0]
    p_c = covid_model.predict(images, batch_size=batch_size, verbose=0)[:, 0]
    return p_i, p_c, labels


def make_cascade(
    infected_path,
    covid_path,
    out_dir,
    target=None,
    data=None,
    val_fraction=None,
    seed=None,
    t_infected=0.5,
    t_covid=0.5,
):
    """Build and save a cascade folder; returns the record written to cascade.json.

    With `target` (e.g. {"covid": 0.95}) the thresholds are chosen on the
    validation split of `data` (default: the runs' dataset, split with their
    val_fraction and seed); otherwise `t_infected` / `t_covid` are used.
    """
    infected = load_classifier(infected_path, "infected")
    covid = load_classifier(covid_path, "covid")
    record = {
        "thresholds": {"infected": float(t_infected), "covid": float(t_covid)},
        "sources": {"infected": os.fspath(infected_path), "covid": os.fspath(covid_path)},
    }
    selection = None
    if target is not None:
        parse_target(target)
        source, val_fraction, seed = validation_settings([infected_path, covid_path], data, val_fraction, seed)
        if source is None:
            raise ValueError(
                "Choosing thresholds needs the runs' dataset (`data`; --data on the command line): "
                "their config.json names none."
            )
        p_i, p_c, labels = validation_probabilities(infected, covid, source, val_fraction, seed)
        selection = choose_thresholds(p_i, p_c, labels, target)
        record["thresholds"] = {"infected": selection["t_infected"], "covid": selection["t_covid"]}
        record["validation"] = {
            "data": os.fspath(source),
            "val_fraction": val_fraction,
            "seed": seed,
            "images": len(labels),
        }
        record["selection"] = {k: v for k, v in selection.items() if k != "table"}
    model = cascade_lib.build_cascade(infected, covid, record["thresholds"]["infected"], record["thresholds"]["covid"])
    os.makedirs(out_dir, exist_ok=True)
    model.save(os.path.join(out_dir, "model.keras"))
    if selection is not None:
        from cxrkeras import plots

        record["plot"] = plots.threshold_tradeoff(selection, os.path.join(out_dir, PLOT_FILE))
        record["table"] = selection["table"]
    with open(os.path.join(out_dir, CASCADE_FILE), "w") as f:
        json.dump(record, f, indent=2)
    return record
