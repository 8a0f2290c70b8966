"""Images per second the tf.data pipeline delivers, with and without the study's augmentation,
as a ratio to the covid classifier's training throughput measured in the same run.

    python benchmarks/pipeline.py                      # ../shared/cxr-dataset when present, else synthetic
    python benchmarks/pipeline.py --data DIR --epochs 3 --json

The pipeline must never be the bottleneck: the target is >= 5x the covid classifier's
training images/s on the same machine.
"""

import argparse
import json
import os
import platform
import tempfile
import time

import numpy as np

from cxrkeras import data
from cxrkeras.augment import study_augmentation
from cxrkeras.config import study_model_config, study_train_config
from cxrkeras.models import build_model
from cxrkeras.training import compile_model

DEFAULT_DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "cxr-dataset")


def pipeline_rate(paths, labels, augment, epochs, batch_size=64):
    """(first pass images/s incl. decoding, steady images/s over later passes from the cache)."""
    ds = data.make_dataset(
        paths, labels, "covid", batch_size, shuffle=True, seed=0, augmenter=study_augmentation(0) if augment else None
    )
    rates = []
    for _ in range(epochs):
        start, n = time.perf_counter(), 0
        for x, _ in ds:
            n += int(x.shape[0])
        rates.append(n / (time.perf_counter() - start))
    return rates[0], float(np.median(rates[1:]))


def training_rate(steps, batch_size=64):
    """Training images/s of the study's covid classifier on in-memory batches (fp32)."""
    model = build_model(study_model_config("covid"))
    compile_model(model, study_train_config("covid"), "covid", steps_per_epoch=steps)
    x = np.random.default_rng(0).random((batch_size, 150, 150, 1), dtype="float32")
    y = np.ones((batch_size, 1), "float32")
    model.train_on_batch(x, y)
    model.train_on_batch(x, y)
    start = time.perf_counter()
    for _ in range(steps):
        model.train_on_batch(x, y)
    return steps * batch_size / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=DEFAULT_DATA)
    parser.add_argument("--epochs", type=int, default=3, help="passes over the data (the first decodes)")
    parser.add_argument("--train-steps", type=int, default=10)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    source = args.data
    if not os.path.isdir(os.path.join(source, "train")):
        from cxrkeras.synth import write_synthetic_dataset

        source = tempfile.mkdtemp()
        write_synthetic_dataset(source, {"train": 400}, seed=0)
    splits = data.load_splits(source)
    paths, labels = data.task_arrays(splits.train, "covid")

    plain = pipeline_rate(paths, labels, False, args.epochs)
    augmented = pipeline_rate(paths, labels, True, args.epochs)
    train = training_rate(args.train_steps)
    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores",
        "images": len(paths),
        "pipeline_first_pass": plain[0],
        "pipeline": plain[1],
        "pipeline_augmented_first_pass": augmented[0],
        "pipeline_augmented": augmented[1],
        "covid_training": train,
        "ratio": plain[1] / train,
        "ratio_augmented": augmented[1] / train,
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"machine: {result['machine']}; {len(paths)} covid-task train images from {source}")
    print(f"{'':32}{'images/s':>10}{'x covid training':>18}")
    print(f"{'covid classifier training (fp32)':32}{train:>10.0f}{1.0:>18.1f}")
    for name, rate in (("pipeline, no augmentation", plain[1]), ("pipeline, augmentation", augmented[1])):
        print(f"{name:32}{rate:>10.0f}{rate / train:>18.1f}")
    print(f"first pass (decoding, filling the cache): {plain[0]:.0f} / {augmented[0]:.0f} images/s")


if __name__ == "__main__":
    main()
