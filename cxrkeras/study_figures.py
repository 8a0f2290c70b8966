"""The published study's figures and findings beside ours, for the README of `cxrkeras report`.

The study (../shared/seed-report.md) judged on its test split, which it also
used to pick its models; ours are on validation carved from train. Each
function reads a report folder's files and returns README lines ([] when the
stage has not run).
"""

import os

from cxrkeras.config import CLASSES, DECISION_THRESHOLD
from cxrkeras.files import read_json
from cxrkeras.search_spaces import load_study

# The study's own figures (test split, 615 images; ../shared/reference.md), shown beside ours.
STUDY_TABLES = {
    "cascade": {"accuracy": 0.9008, "f1": {"normal": 0.9241, "non-covid": 0.9274, "covid": 0.8182}},
    "three-class": {"accuracy": 0.8943, "f1": {"normal": 0.923, "non-covid": 0.917, "covid": 0.804}},
}
STUDY_GRID_CORRECT = 18  # of the release's 25 val/ images, the study's Figure 2.8.2 (its cascade)
NOT_COMPARABLE = (
    "The study's figures are on its test split, which it also used to pick its models (it passed its test set "
    "as the validation set while training). Ours are on a validation split carved from train; the test split is "
    "held back. The two are not comparable number for number."
)


def grid_line(out_dir):
    """Our cascade's count on the 25-image grid beside the study's."""
    grid = (read_json(os.path.join(out_dir, "cascade", "eval-cascade", "metrics.json"), None) or {}).get("grid")
    if not grid:
        return []
    return ["", f"The grid's images are the release's val/ folder. Our cascade gets {grid['correct']} of "
                f"{grid['n']} right; the study's got {STUDY_GRID_CORRECT} of the 25 of its validation set "
                "(its Figure 2.8.2).", ""]


def study_table(out_dir, stage_name):
    """The study's results.md (trials best first), or nothing when the stage has none."""
    table = os.path.join(out_dir, stage_name, "project", "results.md")
    if not os.path.exists(table):
        return []
    with open(table, encoding="utf-8") as f:
        return ["", f.read().rstrip(), ""] + _beside_published(out_dir, stage_name)


def _beside_published(out_dir, stage_name):
    """The published study's choice and its words for this factor, beside the best value here and the rank the
    study's choice got here (nothing for a study without [published] or with no finished trial)."""
    from cxrkeras.tuning_project import RESULTS_FILE, format_value

    study = load_study(stage_name[len("study-"):])
    summary = read_json(os.path.join(out_dir, stage_name, "project", RESULTS_FILE), None)
    trials = [t for t in (summary or {}).get("trials", []) if t["status"] == "COMPLETED" and t["score"] is not None]
    if not study.published or not trials:
        return []
    factor, choice = study.factors[0], study.published["choice"]
    ranks = [i for i, t in enumerate(trials, 1) if t["values"].get(factor) == choice]
    objective, best = summary["objective"], trials[0]
    here = "the study's choice is not in this plan"
    if ranks:
        rank, against = ranks[0], ""
        if len(trials) > 1:  # the best, or when the study's choice is the best, the next
            other, note = (trials[1], ", the next") if rank == 1 else (best, "")
            against = f" against {other['score']:.4f} for {format_value(other['values'].get(factor))}{note}"
        here = (f"the study's choice ranks {rank} of {len(trials)} ({objective} {trials[rank - 1]['score']:.4f}"
                f"{against})")
    return [f"**Beside the study.** The study (judged on its test split) chose "
            f"**{factor} = {format_value(choice)}**: \"{study.published['finding']}\". Here (the infected "
            f"classifier, one seed, judged on validation carved from train) the best is "
            f"**{format_value(best['values'].get(factor))}** by {objective}; {here}.", ""]


def cascade_tables(out_dir):
    """Accuracy and per-class F1 of our cascade and three-class classifier beside the study's."""
    lines = ["| | ours: accuracy | study: accuracy | " + " | ".join(f"ours / study: F1 {c}" for c in CLASSES) + " |",
             "|---" * (3 + len(CLASSES)) + "|"]
    for name, study in STUDY_TABLES.items():
        metrics = read_json(os.path.join(out_dir, "cascade", f"eval-{name}", "metrics.json"), None)
        if not metrics:
            continue
        f1 = [f"{metrics['per_class'][c]['f1']:.4f} / {study['f1'][c]:.4f}" for c in CLASSES]
        lines.append(f"| {name} (n={metrics['n']}) | {metrics['accuracy']:.4f} | {study['accuracy']:.4f} | "
                     + " | ".join(f1) + " |")
    return lines + ["", NOT_COMPARABLE, ""]


def operating_points_table(out_dir):
    """The operating-point table: thresholds reaching each covid recall target, beside the study's pair."""
    from cxrkeras.models.cascade import thresholds_in

    points = read_json(os.path.join(out_dir, "cascade", "operating_points.json"), None)
    if not points:
        return []
    intro = (f"Operating points of the cascade on the {points['split']} split ({points['images']} images): for "
             "each covid recall, the most accurate thresholds that reach it (the cascade above keeps the study's "
             f"{DECISION_THRESHOLD:g} / {DECISION_THRESHOLD:g}; `cxrkeras cascade --target-recall covid=R` builds "
             "one at another point). The same split picked the epochs, so these figures are optimistic.")
    lines = [intro, "", "| covid recall wanted | infected threshold | covid threshold | covid recall | covid missed "
             "| called covid wrongly | accuracy |", "|---" * 7 + "|"]
    for name, row in [(f"study's {DECISION_THRESHOLD:g} / {DECISION_THRESHOLD:g}", points["default"])] + [
            (f"{r['target']:.2f}" + ("" if r["reached"] else " (not reached)"), r) for r in points["rows"]]:
        t = thresholds_in(row)
        lines.append(f"| {name} | {t['infected']:.2f} | {t['covid']:.2f} | {row['recall']:.4f} | "
                     f"{row['fn']} | {row['fp']} | {row['accuracy']:.4f} |")
    return lines + ["", "![tradeoff](cascade/tradeoff.png)"]
