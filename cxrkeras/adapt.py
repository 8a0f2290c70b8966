"""A new site's X-rays: re-estimate every BatchNormalization layer's statistics from its unlabeled images (AdaBN).

The BatchNormalization layers normalise with the moving mean and variance of
the training site's images. `adapt_batchnorm` replaces them, layer by layer in
order, by the exact mean and (population) variance of each layer's input over
the new site's images, earlier layers already adapted (Li et al., "Revisiting
batch normalization for practical domain adaptation", 2016). No label is
read: any folder of images (any layout, DICOM included) or a CSV manifest's
`path` column. `adapt` writes a model of the same kind (a classifier, an
ensemble or a cascade folder) beside adapt.json: how many images, their
fingerprint, the files skipped, and each changed layer with how far its
statistics moved.
"""

import os

import keras
import numpy as np

from cxrkeras import data as data_lib
from cxrkeras import runs
from cxrkeras.calibration import stage_models, temperatures
from cxrkeras.config import TrainConfig
from cxrkeras.models import cascade as cascade_lib

# The fewest images adapt accepts: one training batch. The BatchNormalization layers learned to normalise
# by the statistics of a batch of this many images at a time; statistics from fewer are noisier than any
# the model met in training, and one odd X-ray would move them.
MIN_IMAGES = TrainConfig().batch_size
MIN_IMAGES_NOTE = (
    f"at least {MIN_IMAGES} images (one training batch: BatchNormalization learned to normalise by "
    f"the statistics of {MIN_IMAGES} images at a time, and fewer give noisier ones than any it met)"
)


class AdaptError(ValueError):
    """Images or a model that can't be adapted as asked; the message names them and what was expected."""


# ---------------------------------------------------------------- the images, labels unread


def image_paths(source):
    """Every file under the folder `source` (any layout, sorted), or the `path` column of a CSV manifest."""
    source = os.fspath(source)
    if os.path.isfile(source):
        rows = data_lib._manifest_rows(source)
        if not rows or "path" not in rows[0]:
            raise AdaptError(f"{source}: a manifest needs a header with a `path` column (other columns are ignored).")
        root = os.path.dirname(os.path.abspath(source))
        return [os.path.join(root, row["path"].strip()) for row in rows if (row.get("path") or "").strip()]
    if not os.path.isdir(source):
        raise AdaptError(f"{source}: no such folder or manifest; expected a folder of images or a CSV with a path column.")
    paths = []
    for folder, dirs, files in os.walk(source):
        dirs.sort()
        paths += [os.path.join(folder, name) for name in sorted(files)]
    return paths


def readable_images(source, min_images=None):
    """(samples that decode, problems) under `source`; AdaptError when fewer than `min_images` decode.

    `min_images` defaults to MIN_IMAGES. The samples carry no label: labels are never read.
    """
    min_images = MIN_IMAGES if min_images is None else min_images
    samples = [data_lib.Sample(path, "", "") for path in image_paths(source)]
    good, problems = data_lib.check_samples(samples)
    if len(good) < min_images:
        raise AdaptError(
            f"{source}: {len(good)} readable image(s) ({len(problems)} skipped); adapt needs {MIN_IMAGES_NOTE}."
            if min_images == MIN_IMAGES
            else f"{source}: {len(good)} readable image(s); at least {min_images} needed."
        )
    return good, problems


# ---------------------------------------------------------------- AdaBN


def batchnorm_layers(classifier):
    """The classifier's BatchNormalization layers, input to output."""
    return [layer for layer in classifier.layers if isinstance(layer, keras.layers.BatchNormalization)]


def input_moments(extractor, images, axis, batch_size=64):
    """(mean, population variance) per channel of `extractor`'s output over all `images`, in float64.

    Batches are merged exactly (Chan et al.'s pairwise update), so the result
    is the whole set's, whatever the batch size.
    """
    count, mean, m2 = 0, 0.0, 0.0
    for start in range(0, len(images), batch_size):
        x = keras.ops.convert_to_numpy(extractor(images[start : start + batch_size], training=False))
        x = np.moveaxis(x.astype("float64"), axis, -1).reshape(-1, x.shape[axis])
        n, batch_mean = len(x), x.mean(axis=0)
        batch_m2 = ((x - batch_mean) ** 2).sum(axis=0)
        total = count + n
        delta = batch_mean - mean
        mean = mean + delta * n / total
        m2 = m2 + batch_m2 + delta**2 * count * n / total
        count = total
    return mean, m2 / count


def adapt_classifier(classifier, images, batch_size=64):
    """Re-estimate `classifier`'s BatchNormalization statistics in place; one change record per layer."""
    changes = []
    for layer in batchnorm_layers(classifier):
        axis = layer.axis if isinstance(layer.axis, int) else layer.axis[0]
        extractor = keras.Model(classifier.inputs[0], layer.input)
        mean, variance = input_moments(extractor, images, axis, batch_size)
        old_mean = keras.ops.convert_to_numpy(layer.moving_mean).astype("float64")
        old_variance = keras.ops.convert_to_numpy(layer.moving_variance).astype("float64")
        layer.moving_mean.assign(mean.astype(layer.moving_mean.dtype))
        layer.moving_variance.assign(variance.astype(layer.moving_variance.dtype))
        old_std = np.sqrt(old_variance + layer.epsilon)
        changes.append({
            "classifier": classifier.name,
            "layer": layer.name,
            "channels": int(mean.size),
            # how far the statistics moved: the mean in units of the old standard deviation, the variance as a ratio
            "mean_shift": float(np.mean(np.abs(mean - old_mean) / old_std)),
            "variance_ratio": float(np.mean((variance + layer.epsilon) / (old_variance + layer.epsilon))),
        })
    return changes


def adapt_batchnorm(model, images, stages=None, path=None, batch_size=64):
    """Adapt the stages named in `stages` (default: all) of `model` to `images` in place; the change records.

    A stage is a classifier or an ensemble (each member adapted on its own);
    a cascade has two, "infected" and "covid".
    """
    found = stage_models(model, path)
    stages = list(found) if stages is None else list(stages)
    unknown = [s for s in stages if s not in found]
    if unknown:
        raise AdaptError(f"Unknown stage(s) {unknown} for this model; it has {list(found)}.")
    images = np.asarray(images, dtype="float32")
    changes = []
    for stage in stages:
        for classifier in cascade_lib.ensemble_members(found[stage]):
            changes += [{"stage": stage, **c} for c in adapt_classifier(classifier, images, batch_size)]
    if not changes:
        raise AdaptError(f"The model has no BatchNormalization layer in stage(s) {stages}: nothing to adapt.")
    return changes


# ---------------------------------------------------------------- the command


def adapt(model_path, images_source, out_dir, stages=None, overwrite=False, batch_size=64,
          min_images=None, log=print):
    """Adapt the model at `model_path` to the images at `images_source`; write OUT_DIR; return the record."""
    model_path = os.fspath(model_path)
    model = runs.load_model(model_path)
    good, problems = readable_images(images_source, min_images)
    for problem in problems:
        log(f"skipped {problem}")
    log(f"adapting to {len(good)} images of {images_source}")
    images = data_lib.load_images([s.path for s in good], int(model.input_shape[1]))
    changes = adapt_batchnorm(model, images, stages, model_path, batch_size)
    record = {
        "source": model_path,
        "images_source": os.fspath(images_source),
        "images": len(good),
        "fingerprint": data_lib.fingerprint(good),
        "skipped": [{"path": data_lib.printable(p.path), "reason": p.reason} for p in problems],
        "stages": sorted({c["stage"] for c in changes}),
        "layers": changes,
        "calibrated_before": bool(temperatures(model)),  # a temperature fitted before adaptation: refit it
    }
    record["model"] = runs.save_derived(model, model_path, out_dir, runs.ADAPT_FILE, record, overwrite)
    return record


def model_status(model, path=None):
    """{"adapted": {"images", "fingerprint", "stages"} or None, "calibrated": {stage: T} or None}.

    Adapted: an adapt.json lies beside the model; calibrated: the model holds temperatures.
    """
    from cxrkeras.files import read_json

    adapted = None
    if path is not None:
        try:
            record = read_json(os.path.join(runs.model_folder(path), runs.ADAPT_FILE))
        except ValueError:
            record = None
        if isinstance(record, dict):
            adapted = {k: record.get(k) for k in ("images", "fingerprint", "stages", "images_source")}
    return {"adapted": adapted, "calibrated": temperatures(model) or None}


# ---------------------------------------------------------------- scored with and without


def evaluate_adapted(model_path, images_source, data_dir, split="test", out_dir=None, stages=None, batch_size=64,
                     log=print, **options):
    """`evaluation.evaluate_run` of the model as it is and adapted to `images_source`, side by side.

    The adapted model goes to OUT/adapted-model, its evaluation to
    OUT/adapted; OUT/metrics.json (the model as it is) gains an "adaptation"
    section: what it adapted on (and how many of those images are the
    evaluated split's: labels are never read), and both scores.
    """
    from cxrkeras import evaluation
    from cxrkeras.files import write_json_atomic

    without = evaluation.evaluate_run(model_path, data_dir, split, out_dir, batch_size=batch_size, log=log, **options)
    out_dir = without.pop("out_dir")
    adapted_dir = os.path.join(out_dir, "adapted-model")
    record = adapt(model_path, images_source, adapted_dir, stages, overwrite=True, batch_size=batch_size, log=log)
    adapted = evaluation.evaluate_run(adapted_dir, data_dir, split, os.path.join(out_dir, "adapted"),
                                      batch_size=batch_size, log=log, **options)
    carve = runs.carve_settings(model_path, **{k: options.get(k) for k in ("val_fraction", "seed", "holdout_fraction")})
    evaluated = {os.path.realpath(s.path) for s in evaluation._split_samples(data_dir, split, carve)[1]}
    adapted_on = {os.path.realpath(p) for p in image_paths(images_source)}
    overlap = len(evaluated & adapted_on)
    if overlap == len(evaluated) == record["images"]:
        what = f"the evaluated {split} split itself ({overlap} images, labels unread)"
    elif overlap:
        what = f"{record['images']} images of {images_source}, {overlap} of them in the evaluated {split} split"
    else:
        what = f"{record['images']} images of {images_source}, none of them in the evaluated {split} split"
    without["adaptation"] = {
        "adapted_on": what,
        **{k: record[k] for k in ("images_source", "images", "fingerprint", "stages")},
        "in_evaluated_split": overlap,
        "model": adapted_dir,
        "evaluation": adapted["out_dir"],
        "scores": {name: _scores(m) for name, m in (("without", without), ("with", adapted))},
    }
    write_json_atomic(os.path.join(out_dir, runs.METRICS_FILE), without)
    without["out_dir"] = out_dir
    return without


def _scores(metrics):
    scores = {"accuracy": metrics["accuracy"], "ece": metrics["ece"]}
    scores.update({f"recall-{name}": c["recall"] for name, c in metrics["per_class"].items()})
    scores.update({f"f1-{name}": c["f1"] for name, c in metrics["per_class"].items()})
    scores.update(metrics.get("stage_accuracy") or {})
    return {k: v for k, v in scores.items() if isinstance(v, float)}


def format_side_by_side(section):
    """The "adaptation" section as printed: one line per score, without and with adaptation."""
    without, adapted = section["scores"]["without"], section["scores"]["with"]
    lines = [f"adapted on {section['adapted_on']}; stages {', '.join(section['stages'])}",
             f"{'':<28}{'without':>10}{'adapted':>10}"]
    lines += [f"{name:<28}{without[name]:>10.4f}{adapted[name]:>10.4f}" for name in without if name in adapted]
    return "\n".join(lines)
