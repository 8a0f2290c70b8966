"""Where the time of a whole `cxrkeras fit` goes: per stage, and the share outside the model's steps.

Runs fit's own parts (cxrkeras.training) one after another and times each:
data check (find, hash, decode-check, carve), dataset build, the epochs split
into training steps, waits for input between steps, validation and the rest
(callbacks: checkpoints, backup, history), and saving (state, curves). Prints
the whole fit's images/s beside the bare step rate (training images over the
time inside train steps).

    python benchmarks/full_schedule.py --data ../shared/cxr-dataset --task infected --fraction 0.1 --epochs 2
"""

import argparse
import json
import os
import tempfile
import time


def timed_fit(cfg, run_dir):
    """{stage: seconds} and counts for one fit of `cfg` into `run_dir`, made of training's parts."""
    from cxrkeras import callbacks, rundir, training

    stages, clock = {}, time.perf_counter()

    def lap(name):
        nonlocal clock
        now = time.perf_counter()
        stages[name] = stages.get(name, 0.0) + now - clock
        clock = now

    data = training.load_task_data(cfg)
    cfg.fingerprint = data.fingerprint
    lap("data check")
    augment_on = training.check_fit_options("auto", False)
    rundir.start_run(cfg, run_dir, data.problems, log=print)
    steps = training.steps_per_epoch(cfg, len(data.train_paths))
    model, trained = training.build_and_compile(cfg, steps, augment_on)
    lap("build and compile")
    sets = training.make_datasets(cfg, data, augment_on)
    lap("dataset build")
    steps_clock, meter = StepTimes(), callbacks.ThroughputMeter(sets.images_per_epoch)
    trained.fit(sets.train, validation_data=sets.val, epochs=cfg.train.epochs, class_weight=sets.class_weight,
                callbacks=[steps_clock] + callbacks.run_callbacks(cfg, run_dir, model, meter), verbose=0, shuffle=False)
    lap("epochs")
    training.finish_run(cfg, run_dir, data.problems, meter, sum(meter.epoch_seconds), 1)
    lap("saving (state, curves)")
    epochs = stages.pop("epochs")
    stages["train steps"] = steps_clock.steps
    stages["input waits"] = steps_clock.waits
    stages["validation"] = steps_clock.validation
    stages["callbacks (checkpoints, backup)"] = epochs - steps_clock.steps - steps_clock.waits - steps_clock.validation
    return stages, len(data.train_paths) * cfg.train.epochs, augment_on


class StepTimes:
    """Seconds inside train steps, between them (waiting for input) and in validation, as a Keras callback."""

    def __new__(cls):
        import keras

        class Clock(keras.callbacks.Callback):
            def __init__(self):
                super().__init__()
                self.steps = self.waits = self.validation = 0.0
                self._mark = None

            def on_epoch_begin(self, epoch, logs=None):
                self._mark = time.perf_counter()

            def on_train_batch_begin(self, batch, logs=None):
                now = time.perf_counter()
                self.waits += now - self._mark
                self._mark = now

            def on_train_batch_end(self, batch, logs=None):
                now = time.perf_counter()
                self.steps += now - self._mark
                self._mark = now

            def on_test_begin(self, logs=None):
                self._mark = time.perf_counter()

            def on_test_end(self, logs=None):
                self.validation += time.perf_counter() - self._mark

        return Clock()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="dataset folder (the study's layout)")
    parser.add_argument("--task", default="infected", choices=["infected", "covid", "three-class"])
    parser.add_argument("--fraction", type=float, default=0.1, help="share of each train class used (default 0.1)")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    from cxrkeras.config import RunConfig, study_model_config, study_train_config
    from cxrkeras.report import subset_manifest

    with tempfile.TemporaryDirectory() as tmp:
        cfg = RunConfig(model=study_model_config(args.task), train=study_train_config(args.task))
        cfg.data.manifest = subset_manifest(args.data, args.fraction, os.path.join(tmp, "subset.csv"))
        cfg.train.epochs = args.epochs
        from cxrkeras.devices import resolve_precision

        cfg.train.precision = resolve_precision(args.precision)
        start = time.perf_counter()
        stages, images, augment_on = timed_fit(cfg, os.path.join(tmp, "run"))
        total = time.perf_counter() - start
    row = {"task": args.task, "fraction": args.fraction, "epochs": args.epochs, "precision": cfg.train.precision,
           "augment_on": augment_on, "seconds": {k: round(v, 2) for k, v in stages.items()},
           "total_seconds": round(total, 2), "fit_images_per_second": round(images / total, 1),
           "step_images_per_second": round(images / stages["train steps"], 1),
           "share_outside_steps": round(1 - stages["train steps"] / total, 3)}
    if args.json:
        print(json.dumps(row, indent=2))
        return
    print(f"{args.task}, {args.fraction:.0%} of train, {args.epochs} epoch(s), {row['precision']}, "
          f"augmentation in {augment_on}")
    for name, seconds in stages.items():
        print(f"  {name:<34} {seconds:8.1f} s  {seconds / total:6.1%}")
    print(f"  {'total':<34} {total:8.1f} s")
    print(f"whole fit {row['fit_images_per_second']} images/s; bare steps {row['step_images_per_second']} images/s; "
          f"{row['share_outside_steps']:.1%} of the wall time outside the model's steps")


if __name__ == "__main__":
    main()
