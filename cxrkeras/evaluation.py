"""Evaluate a classifier: the study's table, curves, calibration, the 25-image grid, feature maps, Grad-CAM.

Path of an evaluation (`evaluate_run`): open the model once (`runs.open`: a
binary classifier, the three-class classifier or the cascade, with its task,
class names and how its runs carved train), read one split, predict each
image once, compute the metrics from arrays alone (`cxrkeras.metrics`: the
study's per-class recall / precision / F1 and accuracy, confusion, AUC, ECE;
for the cascade its stage accuracies) and the shortcut audit, write `metrics.json`, then draw every figure through `cxrkeras.plots`
(Grad-CAM and feature maps from `cxrkeras.explain`). `compare` reads several
`metrics.json` files back into the study's side-by-side table.
"""

import hashlib
import json
import os

import numpy as np

from cxrkeras import calibration
from cxrkeras import data as data_lib
from cxrkeras import explain, images, runs
from cxrkeras.audit import shortcut_audit
from cxrkeras.config import AUDIT_BAND, IMAGE_SIZE
from cxrkeras.files import write_json_atomic
from cxrkeras.metrics import metrics_from_predictions, one_vs_rest_curves, reliability_bins, stage_accuracies
from cxrkeras.models import cascade as cascade_lib

SPLIT_NAMES = ("validation", "holdout", "val", "test")
GRID_SIZE = 25  # the study's Figure 2.8.2
FEATURE_CHANNELS = 16  # channels drawn per layer in feature_maps.png
GRADCAM_DEFAULT_IMAGES = 4


class EvaluationError(Exception):
    """An evaluation that cannot run as asked: the message names the thing and what was expected."""


# ---------------------------------------------------------------- models


def predict(model, images, batch_size=64):
    """(probabilities [N, K], predicted class indices [N]); the cascade's thresholds are honoured."""
    probabilities, predictions = cascade_lib.predict(model, images, batch_size=batch_size)
    return np.asarray(probabilities), np.asarray(predictions).astype("int64").reshape(-1)


def evaluate(model, images, labels, task=None, class_names=None, batch_size=64):
    """Predict `images` and return every metric against `labels` (class indices), as a dict.

    `task` names a binary model's task (infected or covid) when the model
    does not say; `class_names` overrides the names of its outputs. For the
    cascade the result also holds its thresholds and the study's stage
    accuracies, the covid stage measured by its covid classifier alone on the
    truly infected images.
    """
    kind = cascade_lib.model_kind(model)
    class_names = list(class_names or runs.class_names(model, task=task))
    images = np.asarray(images, dtype="float32")
    probabilities, predictions = predict(model, images, batch_size)
    return _metrics(model, kind, images, np.asarray(labels), probabilities, predictions, class_names, batch_size)


def _metrics(model, kind, images, labels, probabilities, predictions, class_names, batch_size):
    if probabilities.shape[1] != len(class_names):
        raise EvaluationError(
            f"The model gives {probabilities.shape[1]} probabilities per image but there are "
            f"{len(class_names)} classes. Received: class_names={class_names}"
        )
    metrics = {"kind": kind, **metrics_from_predictions(probabilities, predictions, labels, class_names)}
    if kind == "cascade":
        metrics["thresholds"] = cascade_lib.cascade_thresholds(model)
        covid_decisions = None
        infected = labels != 0
        if infected.any():
            _, covid = explain.cascade_stages(model)
            p_covid = np.asarray(cascade_lib.predict_probabilities(covid, images[infected], batch_size))[:, 1]
            covid_decisions = np.zeros(len(labels), dtype=bool)
            covid_decisions[infected] = p_covid > metrics["thresholds"]["covid"]
        metrics["stage_accuracy"] = stage_accuracies(labels, predictions, covid_decisions)
    return metrics


class Predictions:
    """Each image's pixels, probabilities and decision by `model`, predicted once however often it is shown."""

    def __init__(self, model, batch_size=64):
        self.model, self.batch_size = model, batch_size
        self.size = int(model.input_shape[1])
        self.seen = {}  # path -> (image, probabilities, decision)

    def remember(self, paths, images, probabilities, predictions):
        self.seen.update(zip(paths, zip(images, probabilities, predictions)))

    def __call__(self, paths):
        """(images [N, size, size, 1], probabilities [N, K], decisions [N]) of `paths`, predicting only new ones."""
        new = [p for p in dict.fromkeys(paths) if p not in self.seen]
        if new:
            images = data_lib.load_images(new, self.size)
            self.remember(new, images, *predict(self.model, images, self.batch_size))
        rows = [self.seen[p] for p in paths]
        return tuple(np.stack([row[i] for row in rows]) for i in range(3))


# ---------------------------------------------------------------- a run on a dataset


def _split_samples(data_dir, split, carve, task=None):
    """(Splits, the evaluated split's samples, those of `task` when given); DatasetError naming a missing split
    folder, or a split without images of the task.

    `carve`: the load_splits settings (val_fraction, seed, holdout_fraction, holdout_seed).
    """
    data_dir = os.fspath(data_dir)
    folder = os.path.join(data_dir, "train" if split in ("validation", "holdout") else split)
    if split == "holdout" and not carve["holdout_fraction"]:
        raise EvaluationError("No holdout: the run carved none (holdout_fraction 0); pass a holdout fraction.")
    if os.path.isdir(data_dir) and not os.path.isdir(folder):  # fail before checking every image
        raise data_lib.DatasetError(f"{folder}: missing split folder; cannot evaluate split {split!r}.")
    splits = data_lib.load_splits(data_dir, **carve)
    samples = splits.get(split)
    if not samples:
        where = folder if os.path.isdir(data_dir) else f"{data_dir}: the manifest's {split!r} split"
        raise data_lib.DatasetError(f"{where}: no readable images; cannot evaluate split {split!r}.")
    if task is not None:
        samples = _task_samples(samples, task)
        if not samples:
            raise data_lib.DatasetError(f"{data_dir}: split {split!r} has no infected images for the covid task.")
    return splits, samples




def _task_samples(samples, task):
    return [s for s in samples if s.label != "normal"] if task == "covid" else list(samples)


def _default_gradcam_picks(labels, n=GRADCAM_DEFAULT_IMAGES):
    """Indices of the first image of each class in turn, then the next ones, up to `n`."""
    by_class = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    order = []
    for rank in range(max((len(w) for w in by_class), default=0)):
        order += [int(w[rank]) for w in by_class if rank < len(w)]
    return order[:n]


def _checked_images(paths):
    """`paths` (the user's --image files), or DatasetError naming the first that training could not read."""
    for path in paths:
        reason = images.check_image(os.fspath(path))
        if reason:
            raise data_lib.DatasetError(f"{data_lib.printable(os.fspath(path))}: {reason}.")
    return [os.fspath(p) for p in paths]


def output_name(prefix, stem, suffix=".png", limit=120):
    """`prefix + stem + suffix`, always at most `limit` bytes (file systems allow 255).

    A longer stem (from a user's file name) is cut and tagged with a short hash of the whole stem.
    """
    name = f"{prefix}{stem}{suffix}"
    if len(name.encode()) <= limit:
        return name
    tag = hashlib.sha256(stem.encode()).hexdigest()[:8]
    room = limit - len(f"{prefix}-{tag}{suffix}".encode())
    cut = stem.encode()[:room].decode("utf-8", "ignore")
    return f"{prefix}{cut}-{tag}{suffix}"




def evaluate_run(model_path, data_dir, split="test", out_dir=None, images=None, task=None, val_fraction=None,
                 seed=None, batch_size=64, log=print, holdout_fraction=None, audit_band=None):
    """Evaluate a saved model on one split; write metrics.json and every figure into `out_dir`.

    `model_path` is a .keras file or a run dir (binary, three-class or
    cascade); images are read at the model's own input size. `split`:
    "validation" (carved from train with `val_fraction` / `seed`, else the
    run's, else the defaults of `runs.carve_from`), "holdout" (carved from train before validation:
    `holdout_fraction`, else the run's), "val" (the release's val/) or
    "test". `images`: image paths for the feature maps (the first) and
    Grad-CAM (all); default: the split's first image for the feature maps and
    the first image of each class in turn (4 in all) for Grad-CAM. metrics.json
    is written before any figure, so a figure that fails loses no numbers.
    It holds the shortcut audit (`audit.shortcut_audit`, band `audit_band`
    pixels of an IMAGE_SIZE image, default AUDIT_BAND). Returns the metrics dict (also saved), with "files"
    listing what was written.
    """
    if split not in SPLIT_NAMES:
        raise EvaluationError(f"Unknown split {split!r}; expected one of {list(SPLIT_NAMES)}.")
    opened = runs.open(model_path, task)
    carve = opened.carve(val_fraction=val_fraction, seed=seed, holdout_fraction=holdout_fraction)
    splits, samples = _split_samples(data_dir, split, carve, opened.data_task)
    chosen = _checked_images(images) if images else None
    paths, labels = data_lib.task_arrays(samples, opened.data_task)
    out_dir = out_dir or os.path.join(opened.folder, f"eval-{split}")
    os.makedirs(out_dir, exist_ok=True)
    if splits.problems:
        log(f"skipped {len(splits.problems)} file(s) that do not decode (see `cxrkeras data check`)")

    predictions = Predictions(opened.model, batch_size)
    x = data_lib.load_images(paths, predictions.size)
    predictions.remember(paths, x, *predict(opened.model, x, batch_size))
    scores, uncalibrated = _scores(opened, predictions, paths, labels, audit_band)
    metrics = {
        "model": os.path.abspath(os.fspath(model_path)),
        "data": os.path.abspath(os.fspath(data_dir)),
        "split": split,
        "task": opened.data_task,
        "fingerprint": data_lib.fingerprint(samples),
        "skipped_files": len(splits.problems),
        **scores,
    }
    if split == "validation":
        metrics["validation"] = {"val_fraction": carve["val_fraction"], "seed": carve["seed"]}
    if split in ("validation", "holdout"):
        metrics["carve"] = carve
    metrics_path = os.path.join(out_dir, runs.METRICS_FILE)
    write_json_atomic(metrics_path, {**metrics, "files": [runs.METRICS_FILE]})  # the numbers first

    title = f"{os.path.basename(opened.folder)} on {split} (n={len(labels)})"
    files = _metric_figures(metrics, predictions(paths)[1], labels, opened.class_names, out_dir, title, uncalibrated)
    files += _explained_figures(opened, predictions, splits.val, paths, labels, chosen, metrics, out_dir, log)
    metrics["files"] = [os.path.basename(f) for f in files] + [runs.METRICS_FILE]
    write_json_atomic(metrics_path, metrics)
    metrics["out_dir"] = out_dir
    return metrics


def _scores(opened, predictions, paths, labels, audit_band):
    """(the metrics of the model's predictions on `paths`, the shortcut audit and (a calibrated model) the
    calibration section; the probabilities without temperatures, None when the model has none)."""
    x, probabilities, decisions = predictions(paths)
    model, batch_size = opened.model, predictions.batch_size
    scores = {
        **_metrics(model, opened.kind, x, labels, probabilities, decisions, list(opened.class_names), batch_size),
        "audit": shortcut_audit(model, x, labels, audit_band or AUDIT_BAND, batch_size, whole=decisions),
    }
    calibrated, uncalibrated = calibration.evaluation_section(model, x, labels, scores["ece"], batch_size)
    if calibrated:
        scores["calibration"] = calibrated  # temperatures, ECE before and after
    return scores, uncalibrated


def _metric_figures(metrics, probabilities, labels, class_names, out_dir, title, uncalibrated=None):
    """confusion_matrix.png, roc.png, pr.png and calibration.png (and calibration_before.png: `uncalibrated`)."""
    from cxrkeras import plots

    out = lambda name: os.path.join(out_dir, name)  # noqa: E731
    curves = one_vs_rest_curves(probabilities, labels, class_names)
    bins = reliability_bins(probabilities, labels)
    files = [
        plots.confusion_matrix_figure(np.asarray(metrics["confusion"]), class_names, out("confusion_matrix.png"), title),
        plots.roc_figure(curves["roc"], out("roc.png"), f"ROC, one-vs-rest: {title}"),
        plots.pr_figure(curves["pr"], out("pr.png"), f"Precision-recall, one-vs-rest: {title}"),
        plots.reliability_figure(bins, metrics["ece"], out("calibration.png"), title),
    ]
    if uncalibrated is not None:  # the reliability diagram without the temperatures (calibration.png: with)
        files.append(plots.reliability_figure(
            reliability_bins(uncalibrated, labels), metrics["calibration"]["ece_before"],
            out("calibration_before.png"), f"{title}, before temperature scaling",
        ))
    return files


def _explained_figures(opened, predictions, val, paths, labels, chosen, metrics, out_dir, log):
    """grid.png (the release's `val` samples), feature_maps.png and the Grad-CAM figures; metrics gains
    "grid" and "gradcam"."""
    task, class_names = opened.data_task, opened.class_names
    grid = _task_samples(val, task)[:GRID_SIZE]
    metrics["grid"], files = _grid_figure(predictions, grid, task, class_names, out_dir)
    if not grid:
        log(f"no grid.png: {metrics['data']} has no val/ images for task {task!r}")
    feature_path = chosen[0] if chosen else paths[0]
    gradcam_paths = chosen or [paths[i] for i in _default_gradcam_picks(labels)]
    files.append(_feature_map_figure(opened, predictions, feature_path, out_dir))
    truth = {p: class_names[k] for p, k in zip(paths, labels)}
    metrics["gradcam"], gradcam_files = _gradcam_figures(opened, predictions, gradcam_paths, truth, out_dir)
    return files + gradcam_files


def _grid_figure(predictions, grid, task, class_names, out_dir):
    """The study's Figure 2.8.2 (the release's val/ images, true and predicted labels): (summary, files)."""
    from cxrkeras import plots

    if not grid:
        return None, []
    paths, labels = data_lib.task_arrays(grid, task)
    images, probabilities, decisions = predictions(paths)
    k = int((decisions == labels).sum())
    path = plots.prediction_grid(
        images,
        [class_names[i] for i in labels],
        [class_names[i] for i in decisions],
        probabilities[np.arange(len(decisions)), decisions],
        os.path.join(out_dir, "grid.png"),
        f"val/: {k}/{len(labels)} correct ({100 * k / len(labels):.1f}%)",
    )
    return {"correct": k, "n": len(labels)}, [path]


def _feature_map_figure(opened, predictions, path, out_dir):
    """The study's Figures 3.4.x: every second conv layer of the covid classifier, for one image."""
    from cxrkeras import plots

    sub = explain.feature_model(opened.model, opened.kind)
    image = predictions([path])[0][0]
    caption = f"{sub.name}: every second conv layer, {os.path.basename(path)}"
    out = os.path.join(out_dir, "feature_maps.png")
    return plots.feature_map_figure(image, explain.feature_maps(sub, image), out, caption, FEATURE_CHANNELS)


def _gradcam_figures(opened, predictions, paths, truth, out_dir):
    """Grad-CAM of the predicted class (the deciding stage of a cascade) for each image: (records, files)."""
    from cxrkeras import plots

    images, probabilities, decisions = predictions(paths)
    records, files = [], []
    for i, (path, image, decision) in enumerate(zip(paths, images, decisions)):
        explained, class_index = explain.explained_model(opened.model, opened.kind, int(decision))
        layer = explain.gradcam_layer(explained)
        heat = explain.grad_cam(explained, image, layer, class_index)
        true = truth.get(path, "?")
        stem = os.path.splitext(os.path.basename(path))[0]
        name = output_name(f"gradcam_{i:02d}_", stem if true == "?" or stem.startswith(true) else f"{true}-{stem}")
        caption = (
            f"{os.path.basename(path)}: true {true}, predicted {opened.class_names[decision]} "
            f"({probabilities[i, decision]:.2f})\nGrad-CAM of {explained.name}/{layer}"
        )
        files.append(plots.gradcam_figure(image, heat, os.path.join(out_dir, name), caption))
        records.append({"image": path, "file": name, "model": explained.name, "layer": layer})
    return records, files


# ---------------------------------------------------------------- printing and comparing


def format_table(metrics):
    """The study's table: one row per class (recall, precision, F1, support), then overall accuracy."""
    lines = [f"{'':<12}{'recall':>10}{'precision':>11}{'f1 score':>10}{'support':>9}{'accuracy':>10}"]
    for name in metrics["classes"]:
        c = metrics["per_class"][name]
        lines.append(f"{name:<12}{c['recall']:>10.4f}{c['precision']:>11.4f}{c['f1']:>10.4f}{c['support']:>9d}")
    lines.append(f"{'overall':<12}{'':>31}{metrics['n']:>9d}{metrics['accuracy']:>10.4f}")
    return "\n".join(lines)


def format_report(metrics):
    """The table plus the confusion, AUC, ECE and (cascade) stage accuracies, as printed by `evaluate`."""
    names = metrics["classes"]
    lines = [format_table(metrics), "", "confusion (rows true, columns predicted):"]
    lines.append(f"{'':<12}" + "".join(f"{n:>11}" for n in names))
    for name, row in zip(names, metrics["confusion"]):
        lines.append(f"{name:<12}" + "".join(f"{v:>11d}" for v in row))
    aucs = ", ".join(f"{n} {v:.4f}" if v is not None else f"{n} -" for n, v in metrics["auc"].items())
    lines += ["", f"AUC (one-vs-rest): {aucs}", f"ECE (15 bins): {metrics['ece']:.4f}"]
    if metrics.get("calibration"):
        c = metrics["calibration"]
        temps = ", ".join(f"{k} {v:.3f}" for k, v in c["temperatures"].items())
        lines[-1] += f" (before temperature scaling {c['ece_before']:.4f}; temperatures {temps})"
    if "stage_accuracy" in metrics:
        s = metrics["stage_accuracy"]
        line = f"stages: normal vs infected {s['normal_vs_infected']:.4f}"
        if "covid_vs_non_covid" in s:
            line += f"; covid vs non-covid {s['covid_vs_non_covid']:.4f} on {s['infected_images']} infected images"
        thresholds = ", ".join(f"{k}={v:g}" for k, v in metrics["thresholds"].items())
        lines.append(f"{line} (thresholds {thresholds})")
    if metrics.get("audit"):
        a = metrics["audit"]
        mass = "-" if a["gradcam_border_mass"] is None else f"{a['gradcam_border_mass']:.3f}"
        lines.append(
            f"shortcut audit (band {a['band']} px of {IMAGE_SIZE}): whole {a['whole']:.4f}, centre only "
            f"{a['centre_only']:.4f}, border only {a['border_only']:.4f} (filled with zeros{_mean_fill(a)}), "
            f"majority class {a['majority_rate']:.4f}; Grad-CAM heat in the band {mass}"
        )
    if metrics.get("grid"):
        lines.append(f"val/ grid: {metrics['grid']['correct']}/{metrics['grid']['n']} correct")
    return "\n".join(lines)


def _mean_fill(audit):
    m = audit.get("mean_fill")  # absent from metrics.json written before the second fill
    return f"; with the image's mean: {m['centre_only']:.4f} / {m['border_only']:.4f}" if m else ""


def load_metrics(path):
    """A metrics.json file, or the one inside an eval dir."""
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, runs.METRICS_FILE)
    if not os.path.isfile(path):
        raise EvaluationError(f"{path}: no such metrics file (run `cxrkeras evaluate` first).")
    try:
        with open(path) as f:
            metrics = json.load(f)
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError (a .keras zip, an image)
        raise EvaluationError(f"{path}: not a metrics.json file (not valid JSON: {e}).")
    if not isinstance(metrics, dict) or not {"per_class", "accuracy", "classes"} <= set(metrics):
        raise EvaluationError(f"{path}: not a cxrkeras metrics file (needs per_class, accuracy, classes).")
    metrics["path"] = path
    return metrics


def compare(paths):
    """The study's side-by-side table as data: {"columns": [...], "rows": [{"name", "values", ...}]}.

    Columns are F1 per class (f1-normal, f1-non-covid, f1-covid for
    three-class results; binary results add their own classes) and accuracy.
    """
    all_metrics = [load_metrics(p) for p in paths]
    classes = []
    for m in all_metrics:
        classes += [c for c in m["classes"] if c not in classes]
    ordered = [c for c in ("normal", "infected", "non-covid", "covid") if c in classes]
    columns = [f"f1-{c}" for c in ordered] + ["accuracy"]
    rows = []
    for m in all_metrics:
        values = {f"f1-{c}": m["per_class"][c]["f1"] for c in m["classes"]}
        values["accuracy"] = m["accuracy"]
        rows.append(
            {
                "name": _row_name(m),
                "path": m["path"],
                "split": m.get("split"),
                "n": m.get("n"),
                "fingerprint": m.get("fingerprint"),
                "values": values,
            }
        )
    return {"columns": columns, "rows": rows}


def _row_name(metrics):
    model = (metrics.get("model") or metrics["path"]).rstrip(os.sep)
    base = os.path.basename(model)
    if base == runs.MODEL_FILE:  # name a run dir's model after the run
        base = os.path.basename(os.path.dirname(model))
    return f"{base.removesuffix('.keras')} [{metrics.get('split', '?')}]"


def format_comparison(table):
    """Rows = models, columns = F1 per class and accuracy; a note when the rows saw different data."""
    columns, rows = table["columns"], table["rows"]
    width = max([len("model")] + [len(r["name"]) for r in rows]) + 2
    lines = [f"{'model':<{width}}" + "".join(f"{c:>14}" for c in columns) + f"{'n':>7}"]
    for r in rows:
        cells = "".join(f"{r['values'][c]:>14.4f}" if c in r["values"] else f"{'-':>14}" for c in columns)
        lines.append(f"{r['name']:<{width}}" + cells + f"{r['n'] if r['n'] is not None else '-':>7}")
    fingerprints = {r["fingerprint"] for r in rows}
    if len(fingerprints) > 1:
        lines.append("note: the rows were evaluated on different images (data fingerprints differ); compare with care.")
    return "\n".join(lines)
