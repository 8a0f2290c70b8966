"""Evaluate a classifier: the study's table, curves, calibration, the 25-image grid, feature maps, Grad-CAM.

Path of an evaluation: `evaluate_run` loads a model (a binary classifier, the
three-class classifier or the cascade) and one split, predicts
(`predict`), computes the metrics from arrays alone
(`metrics_from_predictions`: the study's per-class recall / precision / F1 and
accuracy, confusion, one-vs-rest AUC, ECE, and for the cascade its stage
accuracies), then draws every figure through `cxrkeras.plots` and writes
`metrics.json`. `compare` reads several `metrics.json` files back into the
study's side-by-side table.

Backend-agnostic: Grad-CAM takes its gradients from the backend itself
(TensorFlow's GradientTape or jax.grad), images come through `data.load_images`.
"""

import hashlib
import json
import os

import keras
import numpy as np

from cxrkeras import calibration
from cxrkeras import data as data_lib
from cxrkeras import runs
from cxrkeras.audit import DEFAULT_BAND, shortcut_audit
from cxrkeras.files import read_json, write_json_atomic
from cxrkeras.models import cascade as cascade_lib
from cxrkeras.models import conv_layer_names, explained_classifier
from cxrkeras.models.temperature import Temperature

SPLIT_NAMES = ("validation", "holdout", "val", "test")
GRID_SIZE = 25  # the study's Figure 2.8.2
FEATURE_CHANNELS = 16  # channels drawn per layer in feature_maps.png
GRADCAM_DEFAULT_IMAGES = 4


class EvaluationError(Exception):
    """An evaluation that cannot run as asked: the message names the thing and what was expected."""


# ---------------------------------------------------------------- metrics from arrays


def classification_table(labels, predictions, class_names):
    """The study's table: per-class recall, precision, F1 and support; overall accuracy; the confusion.

    scikit-learn's metrics, with 0 where a ratio is undefined: a class never
    predicted has precision 0, a class absent from `labels` recall 0.
    """
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    classes = list(range(len(class_names)))
    labels, predictions = np.asarray(labels, "int64"), np.asarray(predictions, "int64")
    cm = confusion_matrix(labels, predictions, labels=classes)
    precision, recall, f1, support = precision_recall_fscore_support(
        labels, predictions, labels=classes, zero_division=0.0
    )
    per_class = {
        name: {"recall": float(recall[i]), "precision": float(precision[i]), "f1": float(f1[i]),
               "support": int(support[i])}
        for i, name in enumerate(class_names)
    }
    n, correct = int(cm.sum()), int(np.trace(cm))
    return {
        "classes": list(class_names),
        "per_class": per_class,
        "accuracy": correct / n if n else 0.0,
        "correct": correct,
        "n": n,
        "confusion": cm.tolist(),
    }


def reliability_bins(probabilities, labels, bins=15):
    """Equal-width bins of max-probability: edges, mean confidence, accuracy and count per bin.

    The prediction is the argmax of `probabilities` (the standard definition of ECE).
    Empty bins have NaN confidence and accuracy.
    """
    probabilities = np.asarray(probabilities, dtype="float64")
    labels = np.asarray(labels)
    confidence = probabilities.max(axis=1)
    correct = (probabilities.argmax(axis=1) == labels).astype("float64")
    edges = np.linspace(0.0, 1.0, bins + 1)
    index = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)  # bins (lo, hi]
    count = np.bincount(index, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.bincount(index, weights=confidence, minlength=bins) / count
        accuracy = np.bincount(index, weights=correct, minlength=bins) / count
    return {"edges": edges, "confidence": mean_conf, "accuracy": accuracy, "count": count}


def expected_calibration_error(probabilities, labels, bins=15):
    """ECE: sum over equal-width max-probability bins of (bin size / n) * |accuracy - confidence|."""
    stats = reliability_bins(probabilities, labels, bins)
    n = stats["count"].sum()
    if n == 0:
        return 0.0
    used = stats["count"] > 0
    gaps = np.abs(stats["accuracy"][used] - stats["confidence"][used])
    return float((stats["count"][used] / n * gaps).sum())


def one_vs_rest_curves(probabilities, labels, class_names):
    """{"roc": {class: (fpr, tpr, auc)}, "pr": {class: (recall, precision, average precision)}}.

    A class with no positive or no negative example has no curve (left out).
    """
    from sklearn.metrics import auc, average_precision_score, precision_recall_curve, roc_curve

    probabilities, labels = np.asarray(probabilities), np.asarray(labels)
    roc, pr = {}, {}
    for i, name in enumerate(class_names):
        positive = labels == i
        if positive.all() or not positive.any():
            continue
        fpr, tpr, _ = roc_curve(positive, probabilities[:, i])
        roc[name] = (fpr, tpr, float(auc(fpr, tpr)))
        precision, recall, _ = precision_recall_curve(positive, probabilities[:, i])
        pr[name] = (recall, precision, float(average_precision_score(positive, probabilities[:, i])))
    return {"roc": roc, "pr": pr}


def stage_accuracies(labels, predictions, covid_predictions=None):
    """The study's stage accuracies of a three-class decision.

    normal_vs_infected: accuracy of "normal or not" over all images.
    covid_vs_non_covid: on the truly infected images, accuracy of the covid
    stage's own decision (`covid_predictions`: 1 = covid, one per image, as the
    study measured it: its covid classifier alone on the infected images);
    without it, of the three-class prediction (an image called normal counts
    as wrong).
    """
    labels, predictions = np.asarray(labels), np.asarray(predictions)
    result = {"normal_vs_infected": float(np.mean((labels != 0) == (predictions != 0))) if len(labels) else 0.0}
    infected = labels != 0
    if infected.any():
        if covid_predictions is not None:
            decided = np.asarray(covid_predictions)[infected] == (labels[infected] == 2)
        else:
            decided = predictions[infected] == labels[infected]
        result["covid_vs_non_covid"] = float(np.mean(decided))
        result["infected_images"] = int(infected.sum())
    return result


def metrics_from_predictions(probabilities, predictions, labels, class_names):
    """Every metric from arrays: the study's table, confusion, per-class AUC and AP, ECE."""
    table = classification_table(labels, predictions, class_names)
    curves = one_vs_rest_curves(probabilities, labels, class_names)
    table["auc"] = {name: curves["roc"][name][2] if name in curves["roc"] else None for name in class_names}
    table["average_precision"] = {name: curves["pr"][name][2] if name in curves["pr"] else None for name in class_names}
    table["ece"] = expected_calibration_error(probabilities, labels)
    return table


# ---------------------------------------------------------------- models


def cascade_stages(model):
    """(infected sub-model, covid sub-model) of a cascade (either may be an ensemble)."""
    return model.get_layer("infected_classifier"), model.get_layer("covid_classifier")


def thresholds_dict(model):
    """A cascade's thresholds as {"t_infected": ..., "t_covid": ...}."""
    t_infected, t_covid = cascade_lib.cascade_thresholds(model)
    return {"t_infected": float(t_infected), "t_covid": float(t_covid)}


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
        metrics["thresholds"] = thresholds_dict(model)
        covid_decisions = None
        infected = labels != 0
        if infected.any():
            _, covid = cascade_stages(model)
            p_covid = np.asarray(cascade_lib.predict_probabilities(covid, images[infected], batch_size))[:, 1]
            covid_decisions = np.zeros(len(labels), dtype=bool)
            covid_decisions[infected] = p_covid > metrics["thresholds"].get("t_covid", 0.5)
        metrics["stage_accuracy"] = stage_accuracies(labels, predictions, covid_decisions)
    return metrics


# ---------------------------------------------------------------- feature maps and Grad-CAM


def _single_input(model):
    """The model's one input tensor (so the extractor is called with a plain array)."""
    inputs = model.inputs
    return inputs[0] if len(inputs) == 1 else inputs


def every_second_conv(model):
    """The 2nd, 4th, ... Conv2D layers of `model` (the study's Figures 3.4.x)."""
    names = conv_layer_names(model)
    return names[1::2] or names


def feature_maps(model, image, layers=None):
    """{layer name: [H, W, C] activations} of `image` ([H, W, 1]) at `layers` (default: every second conv)."""
    layers = list(layers or every_second_conv(model))
    extractor = keras.Model(inputs=_single_input(model), outputs=[model.get_layer(n).output for n in layers])
    outputs = extractor(np.asarray(image, "float32")[None], training=False)
    if not isinstance(outputs, (list, tuple)):
        outputs = [outputs]
    return {name: keras.ops.convert_to_numpy(out)[0].astype("float32") for name, out in zip(layers, outputs)}


_PASS_THROUGH = (keras.layers.ReLU, keras.layers.Activation, keras.layers.BatchNormalization, keras.layers.Add)


def gradcam_layer(model):
    """The layer Grad-CAM reads: the last Conv2D, followed through its BatchNorm / Add / ReLU.

    For the covid classifier that is `res4_out` (after the skip and the ReLU);
    for the infected classifier `block5_relu`.
    """
    layers = model.layers
    conv_names = conv_layer_names(model)
    if not conv_names:
        raise EvaluationError(f"Model {model.name!r} has no Conv2D layer for Grad-CAM.")
    index = [layer.name for layer in layers].index(conv_names[-1])
    while index + 1 < len(layers) and isinstance(layers[index + 1], _PASS_THROUGH):
        index += 1
    return layers[index].name


def logit_head(model):
    """The final Dense layer when its activation is sigmoid or softmax (Grad-CAM then uses the logits).

    A calibrated classifier's Temperature layer after it is looked through (it rescales the logit only).
    """
    layers = model.layers
    head = layers[-2] if isinstance(layers[-1], Temperature) and len(layers) > 1 else layers[-1]
    if isinstance(head, keras.layers.Dense) and getattr(head.activation, "__name__", "") in ("sigmoid", "softmax"):
        return head
    return None


def grad_cam(model, image, layer_name=None, class_index=None):
    """Grad-CAM heatmap [H, W] in [0, 1] of `image` ([H, W, 1]) for `class_index` (default: the argmax).

    `grad_cam_batch` on one image, with `layer_name` (default
    `gradcam_layer(model)`) as the feature layer.
    """
    layer_name = layer_name or gradcam_layer(model)
    head = logit_head(model)
    scored = head.input if head is not None else model.outputs[0]
    grad_model = keras.Model(_single_input(model), [model.get_layer(layer_name).output, scored])
    x = np.asarray(image, "float32")[None]
    if class_index is None:
        p = keras.ops.convert_to_numpy(model(x, training=False)).astype("float32")[0]
        class_index = int(p[0] > 0.5) if p.shape[-1] == 1 else int(np.argmax(p))
    try:
        heat = grad_cam_batch(grad_model, head, keras.ops.convert_to_tensor(x),
                              keras.ops.convert_to_tensor(np.array([class_index], "int64")))
    except ValueError as e:
        raise EvaluationError(f"Layer {layer_name!r} of {model.name!r}: {e}") from e
    return keras.ops.convert_to_numpy(heat)[0].astype("float32")


def grad_cam_batch(grad_model, head, images, class_index):
    """Grad-CAM [N, H, W] in [0, 1] of each image for its `class_index` [N] (what `export`'s explain runs).

    `grad_model` maps images to (feature layer output, the head's input; or
    the output itself when `head` is None). The score is the class logit
    (pre-sigmoid / pre-softmax; for one sigmoid unit class 0 scores minus the
    logit); the gradients with respect to the features, averaged over space,
    weight its channels; the ReLU of the weighted sum is resized to the image
    and divided by its maximum. Images are independent in inference mode, so
    the gradient of the summed scores gives each image its own gradients.
    The gradients are the backend's own: TensorFlow's GradientTape (also in
    the exported graph) or jax.grad.
    """
    backend = keras.backend.backend()
    if backend == "tensorflow":
        features, grads = _tensorflow_feature_gradients(grad_model, head, images, class_index)
    elif backend == "jax":
        features, grads = _jax_feature_gradients(grad_model, head, images, class_index)
    else:
        raise EvaluationError(f"Grad-CAM runs under the TensorFlow or JAX backend, not {backend!r}.")
    if grads is None:
        raise ValueError("the feature layer does not affect the output")
    ops = keras.ops
    weights = ops.mean(ops.cast(grads, "float32"), axis=(1, 2))
    cam = ops.relu(ops.sum(ops.cast(features, "float32") * weights[:, None, None, :], axis=-1))
    cam = ops.image.resize(cam[..., None], tuple(images.shape[1:3]), interpolation="bilinear", antialias=False)[..., 0]
    peak = ops.max(cam, axis=(1, 2), keepdims=True)
    return ops.where(peak > 0, cam / ops.where(peak > 0, peak, 1.0), 0.0)


def explain_heatmaps(explainers, images, class_id):
    """Grad-CAM [N, H, W] of decisions `class_id` [N], from `export.stage_explainers`' explainers.

    For the cascade (two explainers), the stage that decided: the infected
    classifier's class "normal" for a normal decision, else the covid
    classifier's covid (2) or non-covid (1) class. keras.ops on any backend,
    so the exported graph and `audit` under JAX compute the same.
    """
    ops = keras.ops
    if len(explainers) == 1:
        _, grad_model, head = explainers[0]
        return grad_cam_batch(grad_model, head, images, class_id)
    (_, infected, infected_head), (_, covid, covid_head) = explainers
    heat_infected = grad_cam_batch(infected, infected_head, images, ops.zeros_like(class_id))
    heat_covid = grad_cam_batch(covid, covid_head, images, ops.cast(ops.equal(class_id, 2), class_id.dtype))
    return ops.where(ops.equal(class_id, 0)[:, None, None], heat_infected, heat_covid)


def _class_score(logits, head, class_index):
    """The summed score of each row's `class_index`: its logit (from the head's input when `head`)."""
    ops = keras.ops
    logits = ops.cast(logits, "float32")
    if head is not None:
        logits = ops.matmul(logits, ops.cast(head.kernel, "float32")) + ops.cast(head.bias, "float32")
    if logits.shape[-1] == 1:
        score = ops.where(class_index == 1, logits[:, 0], -logits[:, 0])
    else:
        score = ops.take_along_axis(logits, ops.cast(class_index, "int32")[:, None], axis=1)[:, 0]
    return ops.sum(score)


def _tensorflow_feature_gradients(grad_model, head, images, class_index):
    import tensorflow as tf

    with tf.GradientTape() as tape:
        features, logits = grad_model(images, training=False)
        total = _class_score(logits, head, class_index)
    return features, tape.gradient(total, features)


def _jax_feature_gradients(grad_model, head, images, class_index):
    """(features, d score / d features) by jax.grad through the part of `grad_model` after its feature layer."""
    import jax

    features_out, scored_out = grad_model.outputs
    features = keras.Model(grad_model.inputs, features_out)(images, training=False)
    try:
        tail = keras.Model(features_out, scored_out)
    except ValueError:  # the score also reads an earlier layer: no gradient through the feature layer alone
        return features, None
    grads = jax.grad(lambda f: _class_score(tail(f, training=False), head, class_index))(features)
    return features, grads


def explained_model(model, kind, prediction):
    """(sub-model, class index in it) whose Grad-CAM explains a decision.

    For the cascade, the stage that decided: the infected classifier for a
    "normal" prediction (class normal), the covid classifier for an infected
    one (class covid or non-covid). Other models explain themselves; an
    ensemble stage is explained by its first member.
    """
    if kind != "cascade":
        return model, int(prediction)
    infected, covid = (explained_classifier(stage) for stage in cascade_stages(model))
    if prediction == 0:
        return infected, 0
    return covid, int(prediction == 2)


def feature_model(model, kind):
    """The model whose feature maps are drawn: a cascade's covid classifier (the study's choice), else the model."""
    if kind == "cascade":
        return explained_classifier(cascade_stages(model)[1])
    return model


# ---------------------------------------------------------------- a run on a dataset


def _split_samples(data_dir, split, carve):
    """(Splits, the evaluated split's samples); DatasetError naming a missing split folder.

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
    return splits, samples


def carve_settings(model_path, **given):
    """How train is carved for the model at `model_path`: the `given` values that are not None, else its
    run's config.json (a cascade's: cascade.json's "data"), else 0.15, seed 0, no holdout, holdout seed 0."""
    data_config = (runs.run_config(model_path) or {}).get("data") or _cascade_record(model_path).get("data") or {}
    defaults = {"val_fraction": 0.15, "seed": 0, "holdout_fraction": 0.0, "holdout_seed": 0}
    return {k: given[k] if given.get(k) is not None else data_config.get(k, v) for k, v in defaults.items()}


def _cascade_record(model_path):
    """The cascade.json beside `model_path` as a dict ({} when there is none, or it is not an object)."""
    folder = model_path if os.path.isdir(model_path) else os.path.dirname(os.path.abspath(model_path))
    try:
        record = read_json(os.path.join(folder, runs.CASCADE_FILE), {})
    except ValueError:
        return {}
    return record if isinstance(record, dict) else {}


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
        reason = data_lib.check_image(os.fspath(path))
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


def evaluate_run(
    model_path,
    data_dir,
    split="test",
    out_dir=None,
    images=None,
    task=None,
    val_fraction=None,
    seed=None,
    batch_size=64,
    log=print,
    holdout_fraction=None,
    audit_band=None,
):
    """Evaluate a saved model on one split; write metrics.json and every figure into `out_dir`.

    `model_path` is a .keras file or a run dir (binary, three-class or
    cascade); images are read at the model's own input size. `split`:
    "validation" (carved from train with `val_fraction` / `seed`, else the
    run's, else 0.15 / 0), "holdout" (carved from train before validation:
    `holdout_fraction`, else the run's), "val" (the release's val/) or
    "test". `images`: image paths for the feature maps (the first) and
    Grad-CAM (all); default: the split's first image for the feature maps and
    the first image of each class in turn (4 in all) for Grad-CAM. metrics.json
    is written before any figure, so a figure that fails loses no numbers.
    It holds the shortcut audit (`audit.shortcut_audit`, band `audit_band`
    pixels of 150, default 22). Returns the metrics dict (also saved), with "files" listing what was written.
    """
    if split not in SPLIT_NAMES:
        raise EvaluationError(f"Unknown split {split!r}; expected one of {list(SPLIT_NAMES)}.")
    model_path = os.fspath(model_path)
    run_dir = model_path if os.path.isdir(model_path) else os.path.dirname(os.path.abspath(model_path))
    model = runs.load_model(model_path)
    kind = cascade_lib.model_kind(model)
    class_names = list(runs.class_names(model, model_path, task))
    task = runs.data_task(model, model_path, task)
    carve = carve_settings(model_path, val_fraction=val_fraction, seed=seed, holdout_fraction=holdout_fraction)

    splits, samples = _split_samples(data_dir, split, carve)
    samples = _task_samples(samples, task)
    if not samples:
        raise data_lib.DatasetError(f"{data_dir}: split {split!r} has no infected images for the covid task.")
    chosen = _checked_images(images) if images else None
    paths, labels = data_lib.task_arrays(samples, task)
    out_dir = out_dir or os.path.join(run_dir, f"eval-{split}")
    os.makedirs(out_dir, exist_ok=True)
    if splits.problems:
        log(f"skipped {len(splits.problems)} file(s) that do not decode (see `cxrkeras data check`)")

    size = int(model.input_shape[1])
    x = data_lib.load_images(paths, size)
    probabilities, predictions = predict(model, x, batch_size)
    metrics = {
        "model": os.path.abspath(model_path),
        "data": os.path.abspath(os.fspath(data_dir)),
        "split": split,
        "task": task,
        "fingerprint": data_lib.fingerprint(samples),
        "skipped_files": len(splits.problems),
        **_metrics(model, kind, x, labels, probabilities, predictions, class_names, batch_size),
        "audit": shortcut_audit(model, x, labels, audit_band or DEFAULT_BAND, batch_size),
    }
    calibrated, uncalibrated = calibration.evaluation_section(model, x, labels, metrics["ece"], batch_size)
    if calibrated:
        metrics["calibration"] = calibrated  # temperatures, ECE before and after
    if split == "validation":
        metrics["validation"] = {"val_fraction": carve["val_fraction"], "seed": carve["seed"]}
    if split in ("validation", "holdout"):
        metrics["carve"] = carve
    metrics_path = os.path.join(out_dir, runs.METRICS_FILE)
    write_json_atomic(metrics_path, {**metrics, "files": [runs.METRICS_FILE]})  # the numbers first

    title = f"{os.path.basename(run_dir)} on {split} (n={len(labels)})"
    files = _metric_figures(metrics, probabilities, labels, class_names, out_dir, title)
    if uncalibrated is not None:  # the reliability diagram without the temperatures (calibration.png: with)
        from cxrkeras import plots

        files.append(plots.reliability_figure(
            reliability_bins(uncalibrated, labels), metrics["calibration"]["ece_before"],
            os.path.join(out_dir, "calibration_before.png"), f"{title}, before temperature scaling",
        ))
    grid = _task_samples(splits.val, task)[:GRID_SIZE]
    metrics["grid"], grid_files = _grid_figure(model, grid, task, class_names, size, batch_size, out_dir)
    if not grid:
        log(f"no grid.png: {data_dir} has no val/ images for task {task!r}")
    files += grid_files
    feature_path = chosen[0] if chosen else paths[0]
    gradcam_paths = chosen or [paths[i] for i in _default_gradcam_picks(labels)]
    files.append(_feature_map_figure(model, kind, feature_path, size, out_dir))
    truth = {p: class_names[k] for p, k in zip(paths, labels)}
    metrics["gradcam"], gradcam_files = _gradcam_figures(
        model, kind, gradcam_paths, truth, class_names, size, batch_size, out_dir
    )
    files += gradcam_files

    metrics["files"] = [os.path.basename(f) for f in files] + [runs.METRICS_FILE]
    write_json_atomic(metrics_path, metrics)
    metrics["out_dir"] = out_dir
    return metrics


def _metric_figures(metrics, probabilities, labels, class_names, out_dir, title):
    """confusion_matrix.png, roc.png, pr.png and calibration.png."""
    from cxrkeras import plots

    out = lambda name: os.path.join(out_dir, name)  # noqa: E731
    curves = one_vs_rest_curves(probabilities, labels, class_names)
    bins = reliability_bins(probabilities, labels)
    return [
        plots.confusion_matrix_figure(np.asarray(metrics["confusion"]), class_names, out("confusion_matrix.png"), title),
        plots.roc_figure(curves["roc"], out("roc.png"), f"ROC, one-vs-rest: {title}"),
        plots.pr_figure(curves["pr"], out("pr.png"), f"Precision-recall, one-vs-rest: {title}"),
        plots.reliability_figure(bins, metrics["ece"], out("calibration.png"), title),
    ]


def _grid_figure(model, grid, task, class_names, size, batch_size, out_dir):
    """The study's Figure 2.8.2 (the release's val/ images, true and predicted labels): (summary, files)."""
    from cxrkeras import plots

    if not grid:
        return None, []
    paths, labels = data_lib.task_arrays(grid, task)
    images = data_lib.load_images(paths, size)
    probabilities, predictions = predict(model, images, batch_size)
    k = int((predictions == labels).sum())
    path = plots.prediction_grid(
        images,
        [class_names[i] for i in labels],
        [class_names[i] for i in predictions],
        probabilities[np.arange(len(predictions)), predictions],
        os.path.join(out_dir, "grid.png"),
        f"val/: {k}/{len(labels)} correct ({100 * k / len(labels):.1f}%)",
    )
    return {"correct": k, "n": len(labels)}, [path]


def _feature_map_figure(model, kind, path, size, out_dir):
    """The study's Figures 3.4.x: every second conv layer of the covid classifier, for one image."""
    from cxrkeras import plots

    sub = feature_model(model, kind)
    image = data_lib.load_images([path], size)[0]
    caption = f"{sub.name}: every second conv layer, {os.path.basename(path)}"
    out = os.path.join(out_dir, "feature_maps.png")
    return plots.feature_map_figure(image, feature_maps(sub, image), out, caption, FEATURE_CHANNELS)


def _gradcam_figures(model, kind, paths, truth, class_names, size, batch_size, out_dir):
    """Grad-CAM of the predicted class (the deciding stage of a cascade) for each image: (records, files)."""
    from cxrkeras import plots

    images = data_lib.load_images(paths, size)
    probabilities, predictions = predict(model, images, batch_size)
    records, files = [], []
    for i, (path, image, prediction) in enumerate(zip(paths, images, predictions)):
        explained, class_index = explained_model(model, kind, int(prediction))
        layer = gradcam_layer(explained)
        heat = grad_cam(explained, image, layer, class_index)
        true = truth.get(path, "?")
        stem = os.path.splitext(os.path.basename(path))[0]
        name = output_name(f"gradcam_{i:02d}_", stem if true == "?" or stem.startswith(true) else f"{true}-{stem}")
        caption = (
            f"{os.path.basename(path)}: true {true}, predicted {class_names[prediction]} "
            f"({probabilities[i, prediction]:.2f})\nGrad-CAM of {explained.name}/{layer}"
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
            f"shortcut audit (band {a['band']} px of 150): whole {a['whole']:.4f}, centre only "
            f"{a['centre_only']:.4f}, border only {a['border_only']:.4f}, majority class {a['majority_rate']:.4f}; "
            f"Grad-CAM heat in the band {mass}"
        )
    if metrics.get("grid"):
        lines.append(f"val/ grid: {metrics['grid']['correct']}/{metrics['grid']['n']} correct")
    return "\n".join(lines)


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
