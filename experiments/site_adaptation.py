"""The shipped cascade adapted (AdaBN) and calibrated, scored on the validation carve; test is never read.

Adaptation: the validation carve of the shipped cascade's dataset (holdout
10%, then validation 15%, seed 0) is cut in two halves (seeded); `adapt`
re-estimates the BatchNormalization statistics from half A's images (a CSV
of paths only: no label is read) and both models are scored on half B. This
dataset has one site, so it measures what adaptation costs or gains when the
new images look like the training ones; the issue's site shift is the held-out test's.
Calibration: `calibrate` fits a temperature per stage on the holdout; the ECE
(15 bins) before and after is reported on the holdout (where T was fitted)
and on the whole validation carve (not used to fit), with the decisions
changed (none expected).

    python experiments/site_adaptation.py --cascade saved_models/cascade --out /tmp/site-adaptation
"""

import argparse
import csv
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402

from cxrkeras import adapt, calibration, runs  # noqa: E402
from cxrkeras import data as data_lib  # noqa: E402
from cxrkeras.config import CLASSES  # noqa: E402
from cxrkeras.metrics import expected_calibration_error  # noqa: E402
from cxrkeras.runs import carve_settings  # noqa: E402
from cxrkeras.models import cascade as cascade_lib  # noqa: E402


def scores(model, images, labels, decisions=None):
    """Accuracy, stage 1 accuracy, recall per class and ECE; with `decisions` (a list), the decisions appended."""
    p, decided = cascade_lib.predict(model, images)
    if decisions is not None:
        decisions.append(decided)
    return {
        "accuracy": float(np.mean(decided == labels)),
        "stage1_accuracy": float(np.mean((decided != 0) == (labels != 0))),
        **{f"recall-{name}": float(np.mean(decided[labels == k] == k)) for k, name in enumerate(CLASSES)},
        "ece": expected_calibration_error(p, labels),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cascade", default="saved_models/cascade")
    parser.add_argument("--data", default=None, help="[the cascade's dataset]")
    parser.add_argument("--out", required=True)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)

    source, carve, _ = calibration.holdout_samples(args.cascade, args.data)
    validation = data_lib.load_splits(source, **carve_settings(args.cascade)).validation
    order = np.random.default_rng(args.seed).permutation(len(validation))
    half_a = [validation[i] for i in order[: len(order) // 2]]
    half_b = [validation[i] for i in order[len(order) // 2 :]]
    manifest = os.path.join(args.out, "half-a.csv")
    with open(manifest, "w", newline="") as f:  # paths only: adapt never sees a label
        csv.writer(f).writerows([["path"]] + [[os.path.abspath(s.path)] for s in half_a])

    model = runs.load_model(args.cascade)
    size = int(model.input_shape[1])
    images_b = data_lib.load_images([s.path for s in half_b], size)
    labels_b = np.asarray([CLASSES.index(s.label) for s in half_b])
    results = {"data": source, "carve": carve, "half_a": len(half_a), "half_b": len(half_b)}
    results["without"] = scores(model, images_b, labels_b)
    record = adapt.adapt(args.cascade, manifest, os.path.join(args.out, "adapted"), overwrite=True)
    results["adapted"] = scores(runs.load_model(record["model"]), images_b, labels_b)
    results["adapt_layers"] = len(record["layers"])
    print(json.dumps({k: results[k] for k in ("without", "adapted")}, indent=2))

    calibrated = calibration.calibrate(args.cascade, os.path.join(args.out, "calibrated"), args.data, overwrite=True)
    results["calibration"] = {k: calibrated[k] for k in ("temperatures", "images", "ece", "decisions_changed", "thresholds")}
    images_v = np.concatenate([data_lib.load_images([s.path for s in half_a], size), images_b])
    labels_v = np.concatenate([[CLASSES.index(s.label) for s in half_a], labels_b])
    decided = []
    before = scores(model, images_v, labels_v, decided)
    after = scores(runs.load_model(calibrated["model"]), images_v, labels_v, decided)
    results["calibration"]["validation"] = {
        "images": len(labels_v), "before": before, "after": after, "decisions_changed": int(np.sum(decided[0] != decided[1])),
    }
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    print(json.dumps(results["calibration"], indent=2))


if __name__ == "__main__":
    main()
