"""The study's recipe against the resnet trunk with the levers, over seeds, on one carve of train.

For each recipe and seed: `cxrkeras fit infected` and `fit covid` (holdout
carved first, validation from the rest, both shared by every run: only the
training seed changes), `cxrkeras cascade` with thresholds for covid recall
picked on the holdout, then `cxrkeras evaluate --split validation` of the
cascade (the honest comparison; the shortcut audit comes with it). Per
recipe, an ensemble cascade of all its seeds is built and evaluated the same
way. Last, a table: mean and spread over seeds of accuracy, covid F1 and the
border-only score, one row per recipe (and its ensemble). Test is never read.

    python experiments/seeds.py --data ../shared/cxr-dataset --out exp-seeds          # hours on a 2-core CPU
    python experiments/seeds.py --data DATA --out exp-seeds --epochs 1 --dry-run      # print the commands
    python experiments/seeds.py --out exp-seeds --table-only                          # the table of what ran

A run that finished is skipped and one cut short resumed, so the script can be stopped and started again.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

TASKS = ("infected", "covid")


# The resnet recipe's schedules: short enough for three seeds of both stages in about 1.5 hours on 2 CPU cores.
RESNET_EPOCHS = {"infected": 8, "covid": 14}


def recipes(holdout_fraction):
    """{name: {task: RunConfig dict}}: the study's recipe, and the resnet trunk with the levers on.

    EMA is left off: Keras writes the average into the model every epoch
    (`ema_overwrite_frequency`), so training restarts from the average; in a
    14-epoch schedule that held the covid stage at the majority class for its
    first epochs.
    """
    from cxrkeras.config import RunConfig, resnet_model_config, study_model_config, study_train_config

    out = {}
    for name in ("study", "resnet"):
        out[name] = {}
        for task in TASKS:
            if name == "study":
                config = RunConfig(model=study_model_config(task), train=study_train_config(task))
            else:
                config = RunConfig(model=resnet_model_config(task), train=study_train_config(task))
                config.train.epochs = RESNET_EPOCHS[task]
                config.model.contrast = "standardize"
                config.data.augmentation, config.data.border_erase = "strong", 0.1
                config.train.optimizer, config.train.weight_decay = "adamw", 1e-4
                config.train.schedule, config.train.warmup_epochs = "cosine", 2
                config.train.label_smoothing = 0.1
            config.data.holdout_fraction = holdout_fraction
            out[name][task] = config.to_dict()
    return out


def cxrkeras():
    script = os.path.join(os.path.dirname(sys.executable), "cxrkeras")
    return [script] if os.path.exists(script) else [sys.executable, "-c", "from cxrkeras.cli import main; main()"]


def run(args, dry_run):
    """Run `args`; the wall seconds it took (0 for a dry run)."""
    print("+", " ".join(args), flush=True)
    if dry_run:
        return 0.0
    start = time.perf_counter()
    subprocess.run(args, check=True)
    return time.perf_counter() - start


def add_seconds(out, name, seconds):
    """Add `seconds` to OUT/timing.json[name]: the wall time of each fit, summed over its resumed legs."""
    path = os.path.join(out, "timing.json")
    timing = {}
    if os.path.exists(path):
        with open(path) as f:
            timing = json.load(f)
    timing[name] = round(timing.get(name, 0.0) + seconds, 1)
    with open(path, "w") as f:
        json.dump(timing, f, indent=2)


def train_and_evaluate(args):
    from cxrkeras.training import run_completed

    base = cxrkeras()
    config_dir = os.path.join(args.out, "configs")
    os.makedirs(config_dir, exist_ok=True)
    for recipe, by_task in recipes(args.holdout_fraction).items():
        if args.recipes and recipe not in args.recipes:
            continue
        names = []
        for seed in args.seeds:
            name = f"{recipe}-s{seed}"
            names.append(name)
            for task, config in by_task.items():
                config_path = os.path.join(config_dir, f"{recipe}-{task}.json")
                with open(config_path, "w") as f:
                    json.dump(config, f, indent=2)
                run_dir = os.path.join(args.out, task, name)
                if run_completed(run_dir, args.epochs or config["train"]["epochs"]):
                    continue  # finished before
                extra = ["--epochs", str(args.epochs)] if args.epochs else []
                extra += ["--resume"] if os.path.isdir(run_dir) else []
                seconds = run(base + ["fit", task, "--data", args.data, "--config", config_path, "--seed", str(seed),
                                      "--name", name, "--out", args.out, *extra], args.dry_run)
                add_seconds(args.out, f"{task}/{name}", seconds)
            cascade_and_evaluate(base, args, name, [name])
        cascade_and_evaluate(base, args, f"{recipe}-ensemble", names)


def cascade_and_evaluate(base, args, name, members):
    """`cascade` of the runs `members` (an ensemble when several), then `evaluate --split validation`."""
    folder = os.path.join(args.out, "cascades", name)
    if os.path.exists(os.path.join(folder, "eval-validation", "metrics.json")):
        return
    stage = {task: ",".join(os.path.join(args.out, task, m) for m in members) for task in TASKS}
    run(base + ["cascade", stage["infected"], stage["covid"], "--out", folder, "--overwrite",
                "--target-recall", args.target_recall], args.dry_run)
    run(base + ["evaluate", folder, "--data", args.data, "--split", "validation"], args.dry_run)


def table(out):
    """Rows {recipe, n, accuracy, covid_f1, border_only, ...}: mean and spread (max - min) over the seeds."""
    folder = os.path.join(out, "cascades")
    groups = {}
    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        path = os.path.join(folder, name, "eval-validation", "metrics.json")
        if os.path.exists(path):
            with open(path) as f:
                metrics = json.load(f)
            groups.setdefault(name.rsplit("-s", 1)[0], []).append(metrics)
    rows = []
    for recipe, runs in groups.items():
        values = {
            "accuracy": [m["accuracy"] for m in runs],
            "covid_f1": [m["per_class"]["covid"]["f1"] for m in runs],
            "border_only": [m["audit"]["border_only"] for m in runs],
            "centre_only": [m["audit"]["centre_only"] for m in runs],
        }
        row = {"recipe": recipe, "n": len(runs)}
        for key, v in values.items():
            row[key] = round(statistics.mean(v), 4)
            row[f"{key}_spread"] = round(max(v) - min(v), 4)
        rows.append(row)
    return rows


def print_table(rows):
    print(f"{'recipe':<18}{'n':>3}{'accuracy':>17}{'covid F1':>17}{'border only':>17}{'centre only':>17}")
    for r in rows:
        cells = "".join(f"{r[k]:>10.4f} ±{r[k + '_spread'] / 2:.3f}" for k in
                        ("accuracy", "covid_f1", "border_only", "centre_only"))
        print(f"{r['recipe']:<18}{r['n']:>3}{cells}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", help="Dataset folder or CSV manifest (not needed with --table-only).")
    parser.add_argument("--out", default="exp-seeds", help="Where runs, cascades and evaluations go.")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--recipes", nargs="+", choices=["study", "resnet"], help="[both]")
    parser.add_argument("--holdout-fraction", type=float, default=0.1)
    parser.add_argument("--target-recall", default="covid=0.5", help="The cascade's operating point, on the holdout.")
    parser.add_argument("--epochs", type=int, help="Override every schedule's epochs (short tries).")
    parser.add_argument("--dry-run", action="store_true", help="Print the commands only.")
    parser.add_argument("--table-only", action="store_true", help="Only print the table of what has run.")
    parser.add_argument("--json", action="store_true", help="Print the table as JSON.")
    args = parser.parse_args(argv)
    if not args.table_only:
        if not args.data:
            parser.error("--data is needed unless --table-only")
        train_and_evaluate(args)
    rows = table(args.out)
    print(json.dumps(rows, indent=2)) if args.json else print_table(rows)


if __name__ == "__main__":
    main()
