"""`cxrkeras fit` itself against the bare model's train step, beside the reference's PyTorch fp32 figures.

For each task, the real command in its own process (`cxrkeras fit TASK --data DATA --epochs E --json`:
the data check, the in-memory arrays or tf.data, augmentation where fit places it, validation, checkpoints
and backups every epoch), then the same classifier's bare `model.fit` on in-memory random images (no
augmentation, no validation, no callbacks: benchmarks/accelerator.py's `train_rate`) in the precision fit
resolved. Three rates per task, images per second:

    fit epochs   fit's own ThroughputMeter: the training part of whole epochs (augmentation included;
                 the first epoch, which compiles and decodes, left out when later ones ran)
    fit call     every training image of every epoch over the whole command's wall time (start-up,
                 data check, decoding, compiling, validation and checkpoints included)
    bare step    the model's train step alone

and the goal of issue 20: fit epochs at least 2.5x the study's PyTorch fp32 (shared/reference.md, H200).

    KERAS_BACKEND=jax python benchmarks/fit_speed.py --data ../shared/cxr-dataset --epochs 5 --json out.json
    KERAS_BACKEND=jax python benchmarks/fit_speed.py --data DATA --epochs 2 --image-size 96 --batch-size 8   # a CPU smoke run
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REFERENCE = os.path.join(HERE, "..", "..", "shared", "reference.md")  # ../shared/reference.md beside the clone
GOAL = 2.5  # times the reference's PyTorch fp32


def reference_pytorch_fp32(path=REFERENCE):
    """{task: images/s} of the study's PyTorch fp32 stack on the H200, from the reference's table ({} if absent)."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return {}
    table = text[text.find("| H200 GPU"):]
    rows = re.findall(r"^\| (infected|covid) \| ([\d,]+) \|", table, flags=re.MULTILINE)
    return {task: int(value.replace(",", "")) for task, value in rows}


def time_fit(task, data, epochs, out, image_size=None, batch_size=None):
    """(fit's JSON record, wall seconds of the whole command) for `cxrkeras fit TASK` in a fresh process."""
    args = ["fit", task, "--data", data, "--epochs", str(epochs), "--out", out, "--name", "speed", "--json"]
    if batch_size:
        args += ["--batch-size", str(batch_size)]
    if image_size:  # a smaller input (CPU smoke runs): a config with the study's model at that size
        args += ["--config", _sized_config(task, image_size, out)]
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", "from cxrkeras.cli import main; main()", *args],
                          capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode:
        sys.exit(f"cxrkeras {' '.join(args)} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout[done.stdout.index("{"):]), wall


def _sized_config(task, image_size, out):
    from cxrkeras.config import RunConfig, study_model_config, study_train_config

    config = RunConfig(model=study_model_config(task), train=study_train_config(task))
    config.model.image_size = image_size
    config.train.precision = "auto"
    path = os.path.join(out, f"{task}-{image_size}.json")
    os.makedirs(out, exist_ok=True)
    with open(path, "w") as f:
        json.dump(config.to_dict(), f)
    return path


def bare_step_rate(task, precision, image_size, batch_size, images, epochs):
    """Images/s of the classifier's bare train step (accelerator.py's `train_rate`, no augmentation)."""
    import numpy as np

    sys.path.insert(0, HERE)
    from accelerator import train_rate

    rng = np.random.default_rng(0)
    x = rng.random((images, image_size, image_size, 1), dtype="float32")
    y = (rng.random((images, 1)) > 0.5).astype("float32")
    return train_rate(task, precision, False, x, y, max(epochs, 2), batch_size, image_size)[0]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="Dataset folder or CSV manifest (the study's: ../shared/cxr-dataset).")
    parser.add_argument("--tasks", nargs="+", default=["infected", "covid"])
    parser.add_argument("--epochs", type=int, default=5, help="fit's epochs (the first is left out of its rate).")
    parser.add_argument("--image-size", type=int, help="A smaller input than the study's 150 (CPU smoke runs).")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--bare-images", type=int, default=64 * 40, help="Random images per bare-step epoch.")
    parser.add_argument("--reference", default=REFERENCE, help="The study's reference.md [../shared/reference.md].")
    parser.add_argument("--json", help="Also write the results to this file.")
    args = parser.parse_args(argv)

    import keras

    reference = reference_pytorch_fp32(args.reference)
    rows = []
    with tempfile.TemporaryDirectory() as out:
        for task in args.tasks:
            record, wall = time_fit(task, args.data, args.epochs, out, args.image_size, args.batch_size)
            images = record["images_per_second"]
            n_train = _train_images(record)
            bare = bare_step_rate(task, record["precision"], args.image_size or 150, args.batch_size,
                                  args.bare_images, 3)
            row = {"task": task, "precision": record["precision"], "epochs": record["epochs_run"],
                   "fit_epochs_images_per_s": round(images, 1),
                   "fit_call_images_per_s": round(n_train * record["epochs_run"] / wall, 1),
                   "fit_call_seconds": round(wall, 1), "bare_step_images_per_s": round(bare, 1),
                   "pytorch_fp32_h200_images_per_s": reference.get(task)}
            row["fit_vs_bare"] = round(images / bare, 3) if bare else None
            row["fit_vs_pytorch_fp32"] = round(images / reference[task], 3) if reference.get(task) else None
            rows.append(row)
    sys.path.insert(0, HERE)
    from accelerator import _devices

    result = {"backend": keras.backend.backend(), "devices": _devices(), "goal_vs_pytorch_fp32": GOAL, "rows": rows}
    print(format_table(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


def _train_images(record):
    """Training images per epoch, from the run's config (fit's record gives rates, not counts)."""
    state = os.path.join(record["run_dir"], "config.json")
    with open(state) as f:
        config = json.load(f)
    from cxrkeras.config import RunConfig
    from cxrkeras.training import load_task_data

    return len(load_task_data(RunConfig.from_dict(config)).train_paths)


def format_table(result):
    lines = [f"backend {result['backend']} on {', '.join(result['devices']) or 'CPU'}",
             f"{'task':9} {'precision':15} {'fit epochs':>11} {'fit call':>9} {'bare step':>10} {'fit/bare':>9} "
             f"{'PyTorch fp32 (H200)':>20} {'fit/PyTorch':>12}"]
    for r in result["rows"]:
        ref = r["pytorch_fp32_h200_images_per_s"]
        lines.append(f"{r['task']:9} {r['precision']:15} {r['fit_epochs_images_per_s']:11.0f} "
                     f"{r['fit_call_images_per_s']:9.0f} {r['bare_step_images_per_s']:10.0f} {r['fit_vs_bare']:9.2f} "
                     f"{ref if ref else 'n/a':>20} {r['fit_vs_pytorch_fp32'] if ref else 'n/a':>12}")
    lines.append(f"images/s; goal: fit epochs >= {result['goal_vs_pytorch_fp32']}x PyTorch fp32 on the H200 "
                 f"(compare on that machine only)")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
