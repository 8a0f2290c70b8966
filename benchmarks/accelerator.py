"""Training throughput on an accelerator, with the study's augmentation inside the model.

Backend-agnostic (run it with KERAS_BACKEND=jax on a GPU machine without TensorFlow):

    KERAS_BACKEND=jax python benchmarks/accelerator.py --json out.json

For each classifier (infected, covid) and precision (float32, mixed_bfloat16) it
times `model.fit` on in-memory images, once without augmentation and once with
cxrkeras' augmentation layers placed in front of the model (where fit puts them
when a GPU is present), and times the augmentation alone. All figures of one
run come from the same machine, so the ratios between them are what to read.
"""

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import keras  # noqa: E402
import numpy as np  # noqa: E402

from cxrkeras.augment import RandomResizedCrop, study_augmentation  # noqa: E402
from cxrkeras.config import study_model_config  # noqa: E402
from cxrkeras.models import build_model  # noqa: E402


class EpochTimer(keras.callbacks.Callback):
    def on_epoch_begin(self, epoch, logs=None):
        self.start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.times.append(time.perf_counter() - self.start)

    def on_train_begin(self, logs=None):
        self.times = []


def train_rate(task, precision, augment, x, y, epochs, batch_size, image_size=150):
    keras.mixed_precision.set_dtype_policy(precision)
    try:
        config = study_model_config(task)
        config.image_size = image_size
        model = build_model(config)
        if augment:
            inputs = keras.Input((image_size, image_size, 1))
            model = keras.Model(inputs, model(study_augmentation(seed=0)(inputs)))
        model.compile(keras.optimizers.Adam(1e-3), "binary_crossentropy", metrics=["accuracy"])
        timer = EpochTimer()
        history = model.fit(x, y, batch_size=batch_size, epochs=epochs, verbose=0, callbacks=[timer], shuffle=False)
        assert np.isfinite(history.history["loss"]).all()
        return len(x) / float(np.median(timer.times[1:])), timer.times[0]
    finally:
        keras.mixed_precision.set_dtype_policy("float32")


def augment_rate(x, batch_size, repeats=50):
    layer = study_augmentation(seed=0)
    layer.build((batch_size, 150, 150, 1))
    batch = keras.ops.convert_to_tensor(x[:batch_size])
    if keras.backend.backend() == "jax":
        import jax

        @jax.jit
        def step(variables, images):
            out, variables = layer.stateless_call([], variables, images, training=True)
            return out, variables

        variables = [v.value for v in layer.non_trainable_variables]
        out, variables = step(variables, batch)
        out.block_until_ready()
        start = time.perf_counter()
        for _ in range(repeats):
            out, variables = step(variables, batch)
        out.block_until_ready()
    else:
        layer(batch, training=True)
        start = time.perf_counter()
        for _ in range(repeats):
            out = layer(batch, training=True)
        np.asarray(out)
    return repeats * batch_size / (time.perf_counter() - start)


def checks():
    """Backend-agnostic behaviour the CPU tests also check, re-checked on this backend."""
    p = RandomResizedCrop(seed=1).sample(2000, 150, 150)
    area = np.asarray(p["height"]) * np.asarray(p["width"]) / 150**2
    x = np.random.default_rng(0).random((4, 150, 150, 1), dtype="float32")
    aug = study_augmentation(seed=0)
    return {
        "crop_area_min": float(area.min()),
        "crop_area_max": float(area.max()),
        "identity_at_inference": bool(np.array_equal(np.asarray(aug(x, training=False)), x)),
        "params_infected": build_model(study_model_config("infected")).count_params(),
        "params_covid": build_model(study_model_config("covid")).count_params(),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=64 * 80)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    x = rng.random((args.images, 150, 150, 1), dtype="float32")
    y = (rng.random((args.images, 1)) > 0.5).astype("float32")
    result = {"backend": keras.backend.backend(), "devices": _devices(), "checks": checks()}
    print(json.dumps(result), flush=True)
    result["augmentation_only"] = augment_rate(x, args.batch_size)
    print(f"augmentation alone: {result['augmentation_only']:.0f} images/s", flush=True)
    rows = []
    for task in ("infected", "covid"):
        for precision in ("float32", "mixed_bfloat16"):
            for augment in (False, True):
                rate, first = train_rate(task, precision, augment, x, y, args.epochs, args.batch_size)
                rows.append({"task": task, "precision": precision, "augment": augment, "images_per_s": rate})
                print(f"{task:9} {precision:15} augment={augment!s:5} {rate:9.0f} images/s (first epoch {first:.1f} s)", flush=True)
    result["training"] = rows
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


def _devices():
    if keras.backend.backend() == "jax":
        import jax

        return [str(d) for d in jax.devices()]
    return []


if __name__ == "__main__":
    main()
