"""Recipes over seeds on one carve of train, by `cxrkeras` commands alone.

A recipe is a pair of fit configs, recipes/NAME-infected.json and
recipes/NAME-covid.json (see recipes/README.md: the study's recipe, the
resnet recipe, "long" and each lever on it). For each recipe and seed:
`cxrkeras fit infected` and `fit covid` (holdout carved first, validation
from the rest, both shared by every run: only the training seed changes),
`cxrkeras cascade` with thresholds for covid recall picked on the holdout,
then `cxrkeras evaluate --split validation` of the cascade (the honest
comparison; the shortcut audit comes with it). Per recipe, an ensemble
cascade of all its seeds is built and evaluated the same way. Last, a table:
mean and spread over seeds of accuracy, covid F1 and the border-only score,
one row per recipe (and its ensemble). Test is never read. The fits run on
whatever Keras backend is set (KERAS_BACKEND=jax on a GPU machine without
TensorFlow: `cxrkeras fit` feeds it from memory).

    python experiments/seeds.py --data ../shared/cxr-dataset --out exp-seeds --recipes study long
    python experiments/seeds.py --data DATA --out exp-seeds --epochs 1 --dry-run      # print the commands
    python experiments/seeds.py --out exp-seeds --table-only                          # the table of what ran

A run that finished is skipped and one cut short resumed (`fit --resume`), so the script can be stopped and
started again.
"""

import argparse
import glob
import json
import math
import os
import statistics
import subprocess
import sys
import time

TASKS = ("infected", "covid")
RECIPES_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "recipes")


def recipe_names():
    """The recipes with a config for both stages in recipes/, sorted."""
    names = {os.path.basename(p)[:-len("-infected.json")] for p in glob.glob(os.path.join(RECIPES_DIR, "*-infected.json"))}
    return sorted(n for n in names if os.path.exists(recipe_path(n, "covid")))


def recipe_path(recipe, task):
    return os.path.join(RECIPES_DIR, f"{recipe}-{task}.json")


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
    import fcntl

    path = os.path.join(out, "timing.json")
    with open(path + ".lock", "a") as lock:  # one seeds.py per recipe may share OUT: one writer at a time
        fcntl.flock(lock, fcntl.LOCK_EX)
        timing = {}
        if os.path.exists(path):
            with open(path) as f:
                timing = json.load(f)
        timing[name] = round(timing.get(name, 0.0) + seconds, 1)
        with open(path + ".tmp", "w") as f:
            json.dump(timing, f, indent=2)
        os.replace(path + ".tmp", path)


def train_and_evaluate(args):
    base = cxrkeras()
    for recipe in args.recipes:
        names = []
        for seed in args.seeds:
            name = f"{recipe}-s{seed}"
            names.append(name)
            for task in TASKS:
                run_dir = os.path.join(args.out, task, name)
                extra = ["--epochs", str(args.epochs)] if args.epochs else []
                # A run cut short resumes with its own config.json (a finished one: fit says so and stops).
                extra += ["--resume"] if os.path.isdir(run_dir) else ["--config", recipe_path(recipe, task)]
                seconds = run(base + ["fit", task, "--data", args.data, "--seed", str(seed), "--name", name,
                                      "--out", args.out, *extra], args.dry_run)
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
            "border_only": [m["audit"]["border_only"] for m in runs],  # the band's inside filled with zeros
            "centre_only": [m["audit"]["centre_only"] for m in runs],
            # the same with each image's mean grey (evaluations made before the second fill have none)
            "border_only_mean": [m["audit"].get("mean_fill", {}).get("border_only") for m in runs],
        }
        # the split's majority-class rate and size: what a blind guess scores, and its sampling error
        row = {"recipe": recipe, "n": len(runs), "majority_rate": runs[0]["audit"].get("majority_rate"),
               "images": runs[0].get("n")}
        for key, v in values.items():
            if None in v:
                continue
            row[key] = round(statistics.mean(v), 4)
            row[f"{key}_spread"] = round(max(v) - min(v), 4)
            row[f"{key}_range"] = [round(min(v), 4), round(max(v), 4)]
        rows.append(row)
    return rows


MIN_SEEDS = 3  # the rule reads a spread: fewer seeds than this decide nothing


def reads_border(row, fill):
    """Whether every seed of `row` scores above the majority-class rate on border-only images under `fill`, by
    more than that rate's sampling error on the split: the border then carries what a blind guess cannot.
    At or below the majority rate a score says which class a model defaults to on a blank centre, not how
    much of the border it reads, so a lower score there is no evidence of anything."""
    m, n = row["majority_rate"], row["images"]
    return row[f"{fill}_range"][0] > m + math.sqrt(m * (1 - m) / n)


def decide(rows, base="study"):
    """(recipe, reason) by the rule the model card states, from `table` rows of single seeds (ensembles left out);
    (None, what is missing) while a recipe has fewer than MIN_SEEDS seeds.

    The `base` recipe stands unless another beats its validation accuracy beyond
    the seeds' spread: the other's worst seed above the base's best. Among the
    recipes that tie with the best, the border audit decides only when it
    separates them under both fills (zeros and the image's mean): the best
    reads the border under each fill (`reads_border`) and a tied recipe under
    neither; that one is preferred. Else the best stands: the base, or the
    recipe that beat it (the best mean accuracy among those that did).
    """
    seeds = {r["recipe"]: r for r in rows if not r["recipe"].endswith("-ensemble")}
    if base not in seeds:
        raise ValueError(f"No {base!r} rows to decide against; recipes: {sorted(seeds)}")
    few = [f"{name} has {r['n']}" for name, r in sorted(seeds.items()) if r["n"] < MIN_SEEDS]
    if few:
        return None, f"no verdict yet: the rule needs {MIN_SEEDS} seeds per recipe ({', '.join(few)})"
    lo, hi = lambda r, k: r[f"{k}_range"][0], lambda r, k: r[f"{k}_range"][1]  # noqa: E731
    beats = lambda a, b: lo(a, "accuracy") > hi(b, "accuracy")  # noqa: E731
    winners = [r for r in seeds.values() if r["recipe"] != base and beats(r, seeds[base])]
    best = max(winners, key=lambda r: r["accuracy"]) if winners else seeds[base]
    tied = [r for r in seeds.values() if r is not best and not beats(best, r) and not beats(r, best)]
    fills = ("border_only", "border_only_mean")
    both = all(f"{f}_range" in r for f in fills for r in seeds.values())  # older evaluations have zeros only
    span = lambda r, f: f"{lo(r, f):.4f}-{hi(r, f):.4f}"  # noqa: E731
    audit = ("border only, zeros / mean fill: " + "; ".join(f"{r['recipe']} {span(r, fills[0])} / {span(r, fills[1])}"
                                                            for r in seeds.values())
             + f"; majority rate {best['majority_rate']:.4f}") if both else ""
    cleaner = [r for r in tied if both and all(reads_border(best, f) and not reads_border(r, f) for f in fills)]
    if cleaner:
        pick = max(cleaner, key=lambda r: r["accuracy"])
        return pick["recipe"], (f"ties with {best['recipe']} on accuracy, and {best['recipe']} reads the border "
                                f"under both fills while {pick['recipe']} does not ({audit})")
    if best["recipe"] != base:
        return best["recipe"], (f"beats {base} beyond the spread: worst seed {lo(best, 'accuracy'):.4f} above "
                                f"{base}'s best {hi(seeds[base], 'accuracy'):.4f}")
    others = ", ".join(f"{r['recipe']} {r['accuracy']:.4f} ({lo(r, 'accuracy'):.4f}-{hi(r, 'accuracy'):.4f})"
                       for r in seeds.values() if r is not best)
    return base, (f"no recipe beats it beyond the spread ({base} {best['accuracy']:.4f} "
                  f"({lo(best, 'accuracy'):.4f}-{hi(best, 'accuracy'):.4f}); {others}), and the border audit "
                  f"does not separate them under both fills ({audit or 'one fill only'})")


def print_table(rows):
    keys = ("accuracy", "covid_f1", "border_only", "border_only_mean", "centre_only")
    print(f"{'recipe':<18}{'n':>3}{'accuracy':>17}{'covid F1':>17}{'border (zeros)':>17}{'border (mean)':>17}"
          f"{'centre only':>17}")
    for r in rows:
        cells = "".join(f"{r[k]:>10.4f} ±{r[k + '_spread'] / 2:.3f}" if k in r else f"{'-':>17}" for k in keys)
        print(f"{r['recipe']:<18}{r['n']:>3}{cells}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", help="Dataset folder or CSV manifest (not needed with --table-only).")
    parser.add_argument("--out", default="exp-seeds", help="Where runs, cascades and evaluations go.")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--recipes", nargs="+", choices=recipe_names(), default=["study", "resnet"],
                        help="Recipes of recipes/ [study resnet].")
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
    verdict = None
    if any(r["recipe"] == "study" for r in rows):
        recipe, reason = decide(rows)
        verdict = {"recipe": recipe, "reason": reason}
    if args.json:
        print(json.dumps({"rows": rows, "decision": verdict}, indent=2))
        return
    print_table(rows)
    if verdict:
        print(f"\nBy the rule: ship {verdict['recipe']}: {verdict['reason']}." if verdict["recipe"]
              else f"\nBy the rule: {verdict['reason']}.")


if __name__ == "__main__":
    main()
