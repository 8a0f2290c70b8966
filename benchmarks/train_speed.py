"""Training throughput (images/s) of the study's classifiers, ours beside plain Keras in the same run.

Synthetic in-memory input, batch 64. "ours" is compiled exactly as `cxrkeras fit`
compiles (`cxrkeras.training.compile_model`); "plain" is the same layers in a
stock `keras.Model` (our TaskInfo marker made a stock Identity) with a stock
`compile(optimizer="adam", loss=..., metrics=["accuracy"])`. The two are
measured alternately (--repeats times each) so that load on a shared machine
falls on both; the ratio is ours / plain of the medians. Timed with
`model.fit` after warm-up steps.

    python benchmarks/train_speed.py                 # infected and covid, float32 and mixed_bfloat16
    python benchmarks/train_speed.py --jit both      # also compare XLA on and off (ours)
    python benchmarks/train_speed.py --steps 10 --json
"""

import argparse
import json
import time

import numpy as np

# shared/reference.md, 2-core CPU, batch 64 (images/s).
REFERENCE = {
    ("infected", "float32"): {"keras": 210, "pytorch": 61},
    ("covid", "float32"): {"keras": 46, "pytorch": 15},
    ("infected", "mixed_bfloat16"): {"keras": 336, "pytorch": 197},
    ("covid", "mixed_bfloat16"): {"keras": 74, "pytorch": 60},
}
TARGET = {"float32": 1.0, "mixed_bfloat16": 1.5}  # times the Keras figure


def measure(task, precision, steps, warmup, batch_size=64, jit_compile=None, steps_per_execution=None, plain=False):
    """Steady-state training images/s of the study's model for `task` under `precision` (ours, or `plain` Keras).

    One `model.fit` of warmup + steps steps; the time between the end of the
    warm-up steps (tracing, oneDNN kernel selection) and the end of the last step
    is what counts, taken from batch-end callbacks (every `steps_per_execution` steps).
    """
    import keras
    import tensorflow as tf

    from cxrkeras.config import study_model_config, study_train_config
    from cxrkeras.models import build_model
    from cxrkeras.training import compile_model

    keras.backend.clear_session()
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_dtype_policy(precision)
    try:
        keras.utils.set_random_seed(0)
        rng = np.random.default_rng(0)
        x = rng.uniform(0, 1, (batch_size, 150, 150, 1)).astype("float32")
        y = rng.integers(0, 2, (batch_size, 1)).astype("float32")
        ds = tf.data.Dataset.from_tensors((x, y)).repeat()
        model = build_model(study_model_config(task))
        if plain:
            model = plain_keras(model)
        else:
            compile_model(model, study_train_config(task), task, steps_per_epoch=steps,
                          jit_compile=jit_compile, steps_per_execution=steps_per_execution)
        clock = _StepClock()
        model.fit(ds, steps_per_epoch=warmup + steps, epochs=1, verbose=0, shuffle=False, callbacks=[clock])
    finally:
        keras.mixed_precision.set_dtype_policy(previous)
    return clock.images_per_second(warmup, batch_size)


def plain_keras(model):
    """The same layers in a stock functional model, stock-compiled as a Keras user would (jit_compile="auto": off under TensorFlow without a GPU)."""
    import keras

    from cxrkeras.models import TaskInfo

    def stock(layer):
        if isinstance(layer, TaskInfo):
            return keras.layers.Identity(name=layer.name)
        return layer.__class__.from_config(layer.get_config())

    plain = keras.models.clone_model(model, clone_function=stock)
    plain.compile(optimizer="adam", loss="binary_crossentropy", metrics=["accuracy"])
    return plain


class _StepClock:
    """Batch-end times, as a Keras callback (duck-typed to keep keras out of the module import)."""

    def __new__(cls):
        import keras

        class StepClock(keras.callbacks.Callback):
            def __init__(self):
                super().__init__()
                self.times = []  # (steps done, time)

            def on_train_batch_end(self, batch, logs=None):
                self.times.append((batch + 1, time.perf_counter()))

            def images_per_second(self, warmup, batch_size):
                start = next((t for t in self.times if t[0] >= warmup), self.times[0])
                end = self.times[-1]
                return (end[0] - start[0]) * batch_size / (end[1] - start[1])

        return StepClock()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=12, help="timed steps per measurement (default 12)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3)")
    parser.add_argument("--tasks", default="infected,covid")
    parser.add_argument("--precisions", default="float32,mixed_bfloat16")
    parser.add_argument("--jit", choices=["default", "on", "off", "both"], default="default",
                        help="XLA: compile_model's default, on, off, or both to compare")
    parser.add_argument("--steps-per-execution", type=int, default=None,
                        help="default: compile_model's default")
    parser.add_argument("--repeats", type=int, default=2, help="alternating measurements of ours and plain (default 2)")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = parser.parse_args(argv)

    from cxrkeras import training

    jits = {"default": [None], "on": [True], "off": [False], "both": [False, True]}[args.jit]
    rows = []
    for task in args.tasks.split(","):
        for precision in args.precisions.split(","):
            for jit in jits:
                ours, plain = [], []
                for _ in range(args.repeats):  # alternate, so that a busy spell hits both
                    ours.append(measure(task, precision, args.steps, args.warmup, jit_compile=jit,
                                        steps_per_execution=args.steps_per_execution))
                    plain.append(measure(task, precision, args.steps, args.warmup, plain=True))
                ips, plain_ips = float(np.median(ours)), float(np.median(plain))
                ref = REFERENCE[(task, precision)]
                rows.append({
                    "task": task,
                    "precision": precision,
                    "jit_compile": training.DEFAULT_JIT_COMPILE if jit is None else jit,
                    "steps_per_execution": args.steps_per_execution or training.DEFAULT_STEPS_PER_EXECUTION,
                    "images_per_second": round(ips, 1),
                    "plain_keras": round(plain_ips, 1),
                    "vs_plain": round(ips / plain_ips, 2),
                    "all_ours": [round(v, 1) for v in ours],
                    "all_plain": [round(v, 1) for v in plain],
                    "study_keras": ref["keras"],
                    "study_pytorch_fp32": REFERENCE[(task, "float32")]["pytorch"],
                    "vs_keras": round(ips / ref["keras"], 2),
                    "vs_pytorch_fp32": round(ips / REFERENCE[(task, "float32")]["pytorch"], 2),
                    "target": round(TARGET[precision] * ref["keras"]),
                    "meets_target": ips >= TARGET[precision] * ref["keras"],
                })
                if not args.json:
                    print(_line(rows[-1]) if len(rows) > 1 else _header() + "\n" + _line(rows[-1]), flush=True)
    if args.json:
        print(json.dumps(rows, indent=2))


def _header():
    return (f"{'task':<9} {'precision':<15} {'xla':<5} {'images/s':>9} {'plain':>7} {'ours/plain':>10} "
            f"{'study keras':>12} {'ratio':>6} "
            f"{'pytorch fp32':>13} {'ratio':>6} {'target':>7}  ok")


def _line(r):
    return (f"{r['task']:<9} {r['precision']:<15} {str(r['jit_compile']):<5} {r['images_per_second']:>9.1f} "
            f"{r['plain_keras']:>7.1f} {r['vs_plain']:>10.2f} "
            f"{r['study_keras']:>12} {r['vs_keras']:>6.2f} {r['study_pytorch_fp32']:>13} {r['vs_pytorch_fp32']:>6.2f} "
            f"{r['target']:>7}  {'yes' if r['meets_target'] else 'NO'}")


if __name__ == "__main__":
    main()
