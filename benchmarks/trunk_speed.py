"""Training images/s of the study's two classifiers beside the resnet trunk, measured in one run.

Synthetic in-memory input, batch 64, float32, compiled as `cxrkeras fit`
compiles (`training.compile_model`), timed by batch-end callbacks after
warm-up steps; the models alternate for `--rounds` rounds and the median
per model is reported, so all see the same machine load.

    python benchmarks/trunk_speed.py                # study infected, study covid, resnet
    python benchmarks/trunk_speed.py --steps 8 --rounds 3 --json
"""

import argparse
import json
import statistics
import time

import numpy as np


def model_configs():
    from cxrkeras.config import resnet_model_config, study_model_config

    return {
        "study infected": study_model_config("infected"),
        "study covid": study_model_config("covid"),
        "resnet": resnet_model_config("covid"),
    }


def measure(model_config, steps, warmup, batch_size=64):
    """Steady-state training images/s of `model_config` (the time from the end of warm-up to the last step)."""
    import keras
    import tensorflow as tf

    from cxrkeras.config import TrainConfig
    from cxrkeras.models import build_model
    from cxrkeras.training import compile_model

    keras.backend.clear_session()
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, (batch_size, 150, 150, 1)).astype("float32")
    y = rng.integers(0, 2, (batch_size, 1)).astype("float32")
    model = build_model(model_config)
    compile_model(model, TrainConfig(), model_config.task, steps_per_epoch=steps)
    times = []
    clock = keras.callbacks.LambdaCallback(on_train_batch_end=lambda batch, logs: times.append(time.perf_counter()))
    model.fit(tf.data.Dataset.from_tensors((x, y)).repeat(), steps_per_epoch=warmup + steps, epochs=1, verbose=0,
              callbacks=[clock])
    return steps * batch_size / (times[-1] - times[warmup - 1])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per measurement")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--rounds", type=int, default=3, help="measurements per model, interleaved")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    from cxrkeras.models import build_model

    configs = model_configs()
    rates = {name: [] for name in configs}
    for _ in range(args.rounds):
        for name, config in configs.items():
            rates[name].append(measure(config, args.steps, args.warmup))
    covid = statistics.median(rates["study covid"])
    rows = [
        {"model": name, "params": build_model(config).count_params(),
         "images_per_second": round(statistics.median(rates[name]), 1),
         "vs_study_covid": round(statistics.median(rates[name]) / covid, 2)}
        for name, config in configs.items()
    ]
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"{'model':<16}{'params':>9}{'images/s':>10}{'x covid':>9}")
    for r in rows:
        print(f"{r['model']:<16}{r['params']:>9,}{r['images_per_second']:>10.1f}{r['vs_study_covid']:>9.2f}")


if __name__ == "__main__":
    main()
