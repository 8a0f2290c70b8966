"""Calibrated probabilities: a temperature per stage, fitted on the holdout, stored in the model.

Each binary stage (a classifier or an ensemble; a cascade has two) gets one
temperature T, fitted by minimising the negative log-likelihood of its labels
on the holdout carved from train (`fit --holdout-fraction`): no epoch was
picked there (validation picks epochs) and test is for scoring only. T lives
in the model as a `Temperature` layer after the stage (`models.temperature`),
so `predict`, the SavedModel and `serve` all apply it. A cascade's
thresholds move with it (t becomes sigmoid(logit(t) / T)), so every decision
stays where the operating point put it. `calibrate` writes the calibrated model
beside calibration.json (temperatures, the holdout's size and fingerprint,
ECE and NLL before and after).
"""

import os

import numpy as np

from cxrkeras import data as data_lib
from cxrkeras import runs
from cxrkeras.config import CLASSES
from cxrkeras.metrics import expected_calibration_error
from cxrkeras.models import cascade as cascade_lib
from cxrkeras.models.temperature import EPSILON, calibrated, scaled_probability, temperature, uncalibrated

TEMPERATURE_RANGE = (0.05, 20.0)  # searched on a log scale


class CalibrationError(ValueError):
    """A model or dataset that can't be calibrated as asked; the message names it and what was expected."""


# ---------------------------------------------------------------- the stages of a model


def stage_models(model, path=None, task=None):
    """{stage: binary model}: a cascade's "infected" and "covid" stages, or {task: model} for one classifier."""
    if cascade_lib.model_kind(model) == "cascade":
        return {stage: model.get_layer(name) for stage, name in cascade_lib.SUBMODELS.items()}
    return {runs.known_task(model, path, task): model}


def temperatures(model):
    """{stage: T} of the model's calibrated stages ({} when none is calibrated)."""
    kind = cascade_lib.model_kind(model)
    if kind == "cascade":
        found = {stage: temperature(model.get_layer(name)) for stage, name in cascade_lib.SUBMODELS.items()}
    else:
        found = {runs.model_task(model) or "classifier": temperature(model) if kind == "binary" else None}
    return {stage: t for stage, t in found.items() if t is not None}


def with_temperatures(model, stage_temperatures):
    """`model` (binary classifier, ensemble or cascade) with each stage at its temperature (None: none).

    Stages not named keep theirs. A cascade is rebuilt around the same
    layers and its thresholds are moved, so its decisions stay the same.
    """
    if cascade_lib.model_kind(model) != "cascade":
        (t,) = stage_temperatures.values()
        return uncalibrated(model) if t is None else calibrated(model, t)
    stages = stage_models(model)
    old = {stage: temperature(m) or 1.0 for stage, m in stages.items()}
    new = {stage: stage_temperatures.get(stage, temperature(m)) for stage, m in stages.items()}
    rebuilt = {
        stage: (uncalibrated(m) if new[stage] is None else calibrated(m, new[stage])) for stage, m in stages.items()
    }
    thresholds = cascade_lib.cascade_thresholds(model)
    moved = {stage: scaled_probability(t, old[stage], new[stage] or 1.0) for stage, t in thresholds.items()}
    return cascade_lib.build_cascade(rebuilt["infected"], rebuilt["covid"], moved)


def uncalibrated_model(model):
    """`model` with every temperature taken off (thresholds moved back), or `model` when it has none."""
    found = temperatures(model)
    if not found:
        return model
    if cascade_lib.model_kind(model) != "cascade":
        return uncalibrated(model)
    return with_temperatures(model, {stage: None for stage in found})


# ---------------------------------------------------------------- fitting


def _logits(p):
    p = np.clip(np.asarray(p, dtype="float64").reshape(-1), EPSILON, 1.0 - EPSILON)
    return np.log(p) - np.log1p(-p)


def binary_nll(p, y):
    """Mean negative log-likelihood of binary labels `y` under probabilities `p`."""
    return float(_nll(_logits(p), np.asarray(y, dtype="float64").reshape(-1)))


def _nll(z, y):
    """Mean negative log-likelihood of 0 / 1 labels `y` under logits `z`."""
    return np.mean(np.logaddexp(0.0, z) - y * z)


def fit_temperature(p, y):
    """The T minimising the NLL of labels `y` (0 / 1) under sigmoid(logit(p) / T), T in TEMPERATURE_RANGE."""
    from scipy.optimize import minimize_scalar

    z, y = _logits(p), np.asarray(y, dtype="float64").reshape(-1)
    if len(z) == 0 or len(z) != len(y):
        raise CalibrationError(f"A temperature needs probabilities and labels of one length. Received: {len(z)}, {len(y)}")
    if y.min() == y.max():
        raise CalibrationError(f"A temperature needs both classes among the labels; all {len(y)} are {int(y[0])}.")

    bounds = tuple(np.log(TEMPERATURE_RANGE))
    fitted = minimize_scalar(lambda log_t: _nll(z / np.exp(log_t), y), bounds=bounds, method="bounded",
                             options={"xatol": 1e-6})
    return float(np.exp(fitted.x))


def scale(p, t):
    """sigmoid(logit(p) / t) in numpy (what the Temperature layer computes)."""
    return 1.0 / (1.0 + np.exp(-_logits(p) / t))


def _binary_ece(p, y):
    p = np.asarray(p, dtype="float64").reshape(-1)
    return expected_calibration_error(np.stack([1.0 - p, p], axis=-1), np.asarray(y).reshape(-1))


def stage_labels(stage, labels3):
    """(mask of the images the stage is scored on, its 0 / 1 labels there) from class ids in CLASSES order."""
    labels3 = np.asarray(labels3)
    if stage == "covid":  # the covid stage sees infected X-rays only, as in training
        mask = labels3 != CLASSES.index("normal")
        return mask, (labels3[mask] == CLASSES.index("covid")).astype("int64")
    return np.ones(len(labels3), bool), (labels3 != CLASSES.index("normal")).astype("int64")


def fit_stages(model, images, labels3, path=None, batch_size=64):
    """{stage: {"temperature", "images", "nll_before", "nll_after", "ece_before", "ece_after"}} on `images`."""
    fitted = {}
    for stage, stage_model in stage_models(model, path).items():
        if stage == "three-class":
            raise CalibrationError("Temperature scaling here takes binary stages; a three-class model is not one.")
        mask, y = stage_labels(stage, labels3)
        if not mask.any():
            raise CalibrationError(f"No images for the {stage} stage among the {len(labels3)} given.")
        p = uncalibrated(stage_model).predict(images[mask], batch_size=batch_size, verbose=0)[:, 0]
        t = fit_temperature(p, y)
        fitted[stage] = {
            "temperature": t,
            "images": int(mask.sum()),
            "nll_before": binary_nll(p, y),
            "nll_after": binary_nll(scale(p, t), y),
            "ece_before": _binary_ece(p, y),
            "ece_after": _binary_ece(scale(p, t), y),
        }
    return fitted


# ---------------------------------------------------------------- the holdout and the command


def holdout_samples(model_path, data=None):
    """(source, carve, the holdout's samples) of the model's runs; CalibrationError when they carved none."""
    section = runs.data_section(model_path)
    carve = runs.carve_from(section)
    if not carve["holdout_fraction"]:
        raise CalibrationError(
            f"{model_path}: its runs carved no holdout from train (`fit --holdout-fraction`; the config says "
            f"holdout_fraction 0). A temperature is fitted only on images that neither trained the model nor "
            f"picked its epochs: validation picked the epochs, and test is for scoring."
        )
    source = data or runs.dataset_of(section)
    if not source:
        raise CalibrationError(f"{model_path}: its config names no dataset; pass the dataset the runs used (--data).")
    samples = data_lib.load_splits(source, **carve).holdout
    if not samples:
        raise data_lib.DatasetError(f"{source}: the holdout split is empty ({carve}).")
    return source, carve, samples


def decisions(model, images, batch_size=64):
    """The model's class ids (a cascade's by its thresholds)."""
    return cascade_lib.predict(model, images, batch_size)[1]


def calibrate(model_path, out_dir, data=None, overwrite=False, batch_size=64, log=print):
    """Fit a temperature per stage on the holdout; write the calibrated model to OUT_DIR; return the record."""
    model_path = os.fspath(model_path)
    model = runs.load_model(model_path)
    if cascade_lib.model_kind(model) == "three-class":
        raise CalibrationError(f"{model_path}: a three-class model; calibrate takes a binary classifier, an "
                               f"ensemble or a cascade (a temperature per binary stage).")
    source, carve, samples = holdout_samples(model_path, data)
    log(f"fitting temperatures on the holdout: {len(samples)} images of {source}")
    images = data_lib.load_images([s.path for s in samples], int(model.input_shape[1]))
    labels3 = np.asarray([CLASSES.index(s.label) for s in samples])
    fitted = fit_stages(model, images, labels3, model_path, batch_size)
    for stage, f in fitted.items():
        if min(abs(np.log(f["temperature"] / bound)) for bound in TEMPERATURE_RANGE) < 1e-3:
            log(f"warning: the {stage} stage's temperature {f['temperature']:.3g} is at the end of the range searched "
                f"{TEMPERATURE_RANGE}: its probabilities barely follow the labels on the holdout.")
    new = with_temperatures(model, {stage: f["temperature"] for stage, f in fitted.items()})

    before, after = uncalibrated_model(model), new
    if cascade_lib.model_kind(model) == "cascade":
        mask, labels = np.ones(len(labels3), bool), labels3
    else:
        mask, labels = stage_labels(next(iter(fitted)), labels3)
    p_before, d_before = cascade_lib.predict(before, images[mask], batch_size)
    p_after, d_after = cascade_lib.predict(after, images[mask], batch_size)
    record = {
        "source": model_path,
        "split": "holdout",
        "data": os.fspath(source),
        "carve": carve,
        "images": len(samples),
        "fingerprint": data_lib.fingerprint(samples),
        "temperatures": {stage: f["temperature"] for stage, f in fitted.items()},
        "stages": fitted,
        "ece": {
            "before": expected_calibration_error(p_before, labels),
            "after": expected_calibration_error(p_after, labels),
        },
        "decisions_changed": int(np.sum(d_before != d_after)),
    }
    if cascade_lib.model_kind(model) == "cascade":
        record["thresholds"] = {
            "before": cascade_lib.cascade_thresholds(before),
            "after": cascade_lib.cascade_thresholds(after),
        }
    record["model"] = runs.save_derived(new, model_path, out_dir, runs.CALIBRATION_FILE, record, overwrite)
    return record


# ---------------------------------------------------------------- in an evaluation


def evaluation_section(model, images, labels, ece_after, batch_size=64):
    """(metrics["calibration"], the uncalibrated probabilities) for a calibrated model, else (None, None)."""
    found = temperatures(model)
    if not found:
        return None, None
    p_before = cascade_lib.predict_probabilities(uncalibrated_model(model), images, batch_size)
    section = {
        "temperatures": found,
        "ece_before": expected_calibration_error(p_before, labels),
        "ece_after": ece_after,
    }
    return section, p_before
