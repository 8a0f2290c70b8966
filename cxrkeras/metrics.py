"""Metrics from arrays alone: the study's table, calibration error, one-vs-rest curves, stage accuracies.

Every function takes labels, predictions or probabilities as arrays (no model,
no file), so evaluation, calibration and the tests share one definition of each.
"""

import numpy as np


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
