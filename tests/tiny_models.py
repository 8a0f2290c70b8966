"""Tiny classifiers and a tiny exported cascade for the export, predict and serving tests."""

import math

import keras
import numpy as np

from cxrkeras import export as export_lib
from cxrkeras.config import ModelConfig, RunConfig
from cxrkeras.models import build_model
from cxrkeras.models.cascade import build_cascade

TINY = {
    "infected": ModelConfig(task="infected", blocks=2, filters=[4, 8], dense_units=8),
    "covid": ModelConfig(task="covid", arch="residual", blocks=1, filters=[4, 8], dense_units=8),
    "three-class": ModelConfig(task="three-class", arch="residual", blocks=1, filters=[4, 8], dense_units=8),
}


def tiny(task, scale=40.0):
    """A tiny classifier whose untrained outputs spread over (0, 1) instead of sitting near 0.5."""
    model = build_model(TINY[task])
    layer = model.get_layer("predictions")
    kernel, bias = layer.get_weights()
    layer.set_weights([kernel * scale, bias])
    return model


def force(model, p):
    """`model` made to answer `p` for every image."""
    layer = model.get_layer("predictions")
    kernel, bias = layer.get_weights()
    layer.set_weights([np.zeros_like(kernel), np.full_like(bias, math.log(p / (1 - p)))])
    return model


def export_tiny_cascade(root):
    """ROOT/cascade/model.keras (thresholds 0.5 / 0.5) and its export ROOT/serving/1; returns both paths."""
    keras.utils.set_random_seed(0)  # session fixtures start before the tests' seeding
    cascade_dir = root / "cascade"
    cascade_dir.mkdir(parents=True)
    build_cascade(tiny("infected"), tiny("covid")).save(cascade_dir / "model.keras")
    version_dir = export_lib.export(cascade_dir, root / "serving")
    return {"cascade": cascade_dir, "base": root / "serving", "version": version_dir}


def write_crafted_savedmodel(folder, marker):
    """A SavedModel at `folder` shaped like our exports whose `serving_default` writes `marker` and says covid 1.0.

    What a hostile SavedModel can do: any op, here WriteFile (tf.io.write_file).
    """
    import tensorflow as tf

    module = tf.Module()
    module.class_names = tf.Variable(["normal", "non-covid", "covid"], dtype=tf.string)

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="images")])
    def serve(images):
        tf.io.write_file(str(marker), "written by a SavedModel")
        n = tf.shape(images)[0]
        return {
            "probabilities": tf.tile([[0.0, 0.0, 1.0]], [n, 1]),
            "class_id": tf.fill([n], tf.constant(2, tf.int64)),
            "class_name": tf.fill([n], "covid"),
        }

    tf.saved_model.save(module, str(folder), signatures={"serving_default": serve})
    return folder


def write_runs(root, dataset, holdout_fraction=0.0):
    """Infected and covid run folders under `root` as `fit` writes them (model.keras + config.json).

    Their config carves validation 0.3 with seed 1 (and a holdout of `holdout_fraction`) from `dataset`.
    """
    folders = {}
    for task in ("infected", "covid"):
        folder = root / task
        folder.mkdir()
        build_model(TINY[task]).save(folder / "model.keras")
        config = RunConfig(model=TINY[task])
        config.data.data_dir, config.data.val_fraction, config.data.seed = dataset, 0.3, 1
        config.data.holdout_fraction = holdout_fraction
        config.save(folder / "config.json")
        folders[task] = folder
    return folders
