"""`cxrkeras report`: the study's whole plan (data, trainings, cascade, studies) run or reused, and one README.

A report folder holds one subfolder per stage and README.md. Each stage keeps
its settings in `stage.json`, marked finished at its end: a later report with
the same settings reuses a finished stage, continues a started one (fits and
tune studies resume after their last epoch or trial) and starts over a stage
made with other settings. So an interrupted report resumes where it stopped.
"""

import csv
import dataclasses
import glob
import json
import os
import platform
import shutil
import time
from dataclasses import dataclass, field

from cxrkeras import data as data_lib
from cxrkeras import study_figures
from cxrkeras.config import CLASSES
from cxrkeras.files import read_json, write_json_atomic, write_text_atomic
from cxrkeras.report_progress import LEGS_FILE, Progress
from cxrkeras.runs import duration
from cxrkeras.search_spaces import grid_size, load_study
from cxrkeras.tuning_project import reused_epochs


def subset_manifest(source, fraction, path, seed=0):
    """Write a CSV manifest at `path` with a seeded `fraction` of each train class (all of val/); return `path`.

    Raises ValueError for a fraction outside (0, 1].
    """
    import numpy as np

    if not 0 < fraction <= 1:
        raise ValueError(f"Invalid `fraction`; expected a number in (0, 1]. Received: fraction={fraction!r}")
    samples = data_lib.find_samples(source)
    rng = np.random.default_rng(seed)
    kept = [s for s in samples if s.split == "val"]  # test, where there is one, stays out
    for label in CLASSES:
        group = sorted((s for s in samples if s.split == "train" and s.label == label), key=lambda s: s.path)
        n = max(2, round(len(group) * fraction))
        kept += [group[i] for i in sorted(rng.choice(len(group), min(n, len(group)), replace=False))]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label", "split"])
        writer.writerows([os.path.abspath(s.path), s.label, s.split] for s in kept)
    return path


# ---------------------------------------------------------------- the plan

QUICK_EPOCHS = 1
QUICK_VALUES = 2  # values per one-factor study in --quick
QUICK_NOTE = ("**--quick**: one epoch per training and the first two values of each study: this shows the plan "
              "and its figures, not the study's results.")
ONE_FACTOR_STUDIES = ("augmentation", "learning-rate", "optimizer", "batch-size", "weight-decay", "depth")
STAGE_FILE = "stage.json"  # a finished stage's settings: the same settings reuse the stage
TIMINGS_FILE = "timings.json"  # {stage: seconds} of the run that made each stage
COVID_TARGETS = (0.8, 0.9, 0.95)  # covid recalls of the operating-point table


def epochs_note(epochs):
    from cxrkeras.config import STUDY_EPOCHS

    schedules = ", ".join(f"{task} {n}" for task, n in STUDY_EPOCHS.items())
    return (f"**--epochs {epochs}**: every training stops after {epochs} epoch(s) (the study's schedules: "
            f"{schedules}): this shows the plan on this data, not the study's results.")


@dataclass
class Stage:
    name: str  # its folder in the report
    title: str
    run: object  # callable(folder, callbacks, log) -> None; callbacks join every training's fit
    settings: dict  # what makes its output; a different value reruns it
    task: str = ""  # the task it trains, for a training stage
    epochs: int = 0  # epochs it trains in all (a study: trials x epochs)
    full_epochs: int = 0  # the same at the study's schedules


@dataclass
class Plan:
    source: str  # the dataset (folder or manifest) every stage reads
    stages: list = field(default_factory=list)
    quick: bool = False
    epochs: int = 0  # the cap on every training's epochs (0: the study's schedules)


def make_plan(data_dir, out_dir, quick=False, fraction=1.0, studies=ONE_FACTOR_STUDIES, configure=None, epochs=None):
    """The study's stages for `data_dir` (a `fraction` of each train class), writing under `out_dir`.

    `epochs` caps every training (default: the study's schedules, or 1 with
    `quick`); `configure(run_config)` may change every training's settings
    (tests shrink the model with it).
    """
    from cxrkeras.config import STUDY_EPOCHS

    if epochs is not None and epochs < 1:
        raise ValueError(f"Invalid `epochs`; expected a whole number >= 1. Received: epochs={epochs!r}")
    epochs = epochs or (QUICK_EPOCHS if quick else None)
    source = os.path.abspath(data_dir)
    if fraction < 1:
        source = subset_manifest(data_dir, fraction, os.path.join(out_dir, "subset.csv"))
    common = {"data": os.path.abspath(data_dir), "fraction": fraction, "quick": quick}
    configs = {task: _run_config(task, source, epochs, configure) for task in ("infected", "covid", "three-class")}
    folder = lambda name: os.path.join(out_dir, name)  # noqa: E731
    stages = [
        Stage("data", "Data: class distributions", lambda d, *_: data_summary(source, d), common),
        Stage("augmentation", "Augmentation preview", lambda d, *_: augmentation_preview(source, d), common),
    ]
    for task, cfg in configs.items():
        stages.append(Stage(f"fit-{task}", f"Training: {task} classifier",
                            lambda d, callbacks, _, cfg=cfg: fit_stage(cfg, d, callbacks),
                            {**common, "config": cfg.to_dict()}, task, cfg.train.epochs, STUDY_EPOCHS[task]))
    stages.append(Stage("cascade", "Cascade and three-class classifier on the validation split",
                        lambda d, *_: cascade_stage(folder("fit-infected"), folder("fit-covid"),
                                                   folder("fit-three-class"), source, d),
                        {**common, "runs": [configs[t].to_dict() for t in configs]}))
    for name in studies:
        full_study = load_study(name)
        study = _quick_study(full_study) if quick else full_study
        stages.append(Stage(f"study-{name}", f"One-factor study: {study.description or name}",
                            lambda d, callbacks, log, study=study: study_stage(
                                study, configs["infected"], d, callbacks, log),
                            {**common, "study": study.space, "config": configs["infected"].to_dict()},
                            "infected", _trials(study) * configs["infected"].train.epochs,
                            _trials(full_study) * STUDY_EPOCHS["infected"]))
    return Plan(source, stages, quick, epochs or 0)


def _run_config(task, source, epochs, configure):
    from cxrkeras.config import RunConfig, study_model_config, study_train_config
    from cxrkeras.devices import resolve_precision

    cfg = RunConfig(model=study_model_config(task), train=study_train_config(task))
    cfg.data.data_dir, cfg.data.manifest = ("", source) if os.path.isfile(source) else (source, "")
    cfg.train.precision = resolve_precision("auto")
    if epochs:
        cfg.train.epochs = epochs
    if configure:
        configure(cfg)
    return cfg


def _trials(study):
    return grid_size(study) if study.tuner == "grid" else study.max_trials


def _quick_study(study):
    """`study` with its first QUICK_VALUES values of each listed factor."""
    space = {k: v[:QUICK_VALUES] if isinstance(v, list) else v for k, v in study.space.items()}
    return dataclasses.replace(study, space=space)


# ---------------------------------------------------------------- running it


def stage_record(stage, folder):
    """`folder`'s STAGE_FILE record ({"settings", "finished", "epoch_seconds"}) when it holds `stage` with the
    same settings, else None."""
    record = read_json(os.path.join(folder, STAGE_FILE), None) or {}
    return record if record.get("settings") == _jsonable(stage.settings) else None


def _jsonable(value):
    return json.loads(json.dumps(value))


def run_plan(plan, out_dir, log=print):
    """Run every stage of `plan` not already finished in `out_dir`; return {stage name: "ran" | "reused"}.

    One line per stage, and one per training epoch with the time the plan has left (Progress). README.md is
    rewritten before each stage runs and at the end, so a report cut short shows its finished stages and names
    the rest.
    """
    done, start, progress = {}, time.perf_counter(), Progress(plan, log)
    os.makedirs(out_dir, exist_ok=True)
    for i, stage in enumerate(plan.stages, 1):
        folder = os.path.join(out_dir, stage.name)
        record = stage_record(stage, folder)
        if record and record.get("finished"):
            done[stage.name] = "reused"
            progress.finish(stage, record.get("epoch_seconds"))
            log(f"[{i}/{len(plan.stages)}] {stage.title}: reused ({folder})")
            continue
        write_readme(plan, out_dir, read_json(os.path.join(out_dir, TIMINGS_FILE), {}))  # the stages before this
        left = progress.seconds_left()
        eta = f", about {duration(left)} left" if left is not None else ""
        log(f"[{i}/{len(plan.stages)}] {stage.title} (elapsed {duration(time.perf_counter() - start)}{eta})")
        if record is None and os.path.isdir(folder):
            shutil.rmtree(folder)  # made with other settings (or by hand): start it over
        os.makedirs(folder, exist_ok=True)
        progress.start(stage, folder, read_json(os.path.join(folder, LEGS_FILE), {}) if record else {})
        write_json_atomic(os.path.join(folder, STAGE_FILE), {"settings": stage.settings, "finished": False})
        # a started stage continues after its last epoch or trial
        stage.run(folder, progress.callbacks(stage), lambda line, name=stage.name: log(f"    {name}: {line}"))
        seconds = progress.legs(stage)["seconds"]  # a stage cut short counts its earlier runs' finished epochs
        progress.finish(stage)
        timings_path = os.path.join(out_dir, TIMINGS_FILE)
        write_json_atomic(timings_path, {**read_json(timings_path, {}), stage.name: round(seconds, 1)})
        write_json_atomic(os.path.join(folder, STAGE_FILE), {"settings": stage.settings, "finished": True,
                                                             "epoch_seconds": progress.epoch_seconds(stage)})
        done[stage.name] = "ran"
    write_readme(plan, out_dir, read_json(os.path.join(out_dir, TIMINGS_FILE), {}))
    log(f"report done in {duration(time.perf_counter() - start)}")
    return done


def data_summary(source, folder):
    """counts.json and the study's three distribution charts, from the files that decode."""
    from cxrkeras import plots

    good, problems = data_lib.check_dataset(source)
    counts = data_lib.class_counts(good)
    write_json_atomic(os.path.join(folder, "counts.json"), {"counts": counts, "not_images": len(problems)})
    plots.distribution_charts(counts, folder)


def augmentation_preview(source, folder):
    from cxrkeras.augment import preview_figure

    good, _ = data_lib.check_dataset(source)
    preview_figure([s for s in good if s.split == "train"], os.path.join(folder, "augmentation_preview.png"))


def fit_stage(cfg, folder, callbacks=()):
    from cxrkeras import training
    from cxrkeras.runs import CONFIG_FILE

    training.fit(cfg, folder, verbose=0, resume=os.path.exists(os.path.join(folder, CONFIG_FILE)),
                 callbacks=callbacks)


def cascade_stage(infected_run, covid_run, three_class_run, source, folder):
    """The cascade at the 0.5 thresholds and the three-class classifier, evaluated on the validation split,
    and the cascade's operating points there."""
    from cxrkeras import evaluation, thresholds

    cascade_dir = os.path.join(folder, "cascade")
    thresholds.make_cascade(infected_run, covid_run, cascade_dir, data=source, overwrite=True)
    for name, model in (("cascade", cascade_dir), ("three-class", three_class_run)):
        evaluation.evaluate_run(model, source, split="validation", out_dir=os.path.join(folder, f"eval-{name}"),
                                log=lambda message: None)
    operating_points(infected_run, covid_run, source, folder)


def operating_points(infected_run, covid_run, source, folder):
    """operating_points.json and tradeoff.png: for each covid recall of COVID_TARGETS, the most accurate
    thresholds that reach it on the runs' selection split (validation here, which also picked the epochs)."""
    from cxrkeras import plots, thresholds

    infected, covid = thresholds.load_stage(infected_run, "infected"), thresholds.load_stage(covid_run, "covid")
    _, carve = thresholds.validation_settings([infected_run, covid_run], source)
    p_i, p_c, labels = thresholds.selection_probabilities(infected, covid, source, carve)
    rows = []
    for target in COVID_TARGETS:
        selection = thresholds.choose_thresholds(p_i, p_c, labels, {"covid": target})
        rows.append({"target": target, "reached": selection["reached"], **selection["chosen"]})
        if target == 0.9:
            plots.threshold_tradeoff(selection, os.path.join(folder, "tradeoff.png"))
    write_json_atomic(os.path.join(folder, "operating_points.json"), {
        "split": thresholds.selection_split(carve), "images": len(labels), "default": selection["default"],
        "rows": rows})


def study_stage(study, base, folder, callbacks=(), log=None):
    from cxrkeras import tuning

    others = glob.glob(os.path.join(os.path.dirname(os.path.abspath(folder)), "study-*", "project"))  # same trials
    tuning.tune(study, base, os.path.join(folder, "project"), log=log or (lambda message: None), callbacks=callbacks,
                reuse=others)


# ---------------------------------------------------------------- README.md

SECTIONS = (  # (heading, stage, figure files in the stage folder) in the study's order
    ("1. Data: class distributions", "data",
     ["distribution_three_class.png", "distribution_infected.png", "distribution_covid.png"]),
    ("2. Augmentation preview", "augmentation", ["augmentation_preview.png"]),
    ("3. With and without augmentation", "study-augmentation", ["project/study.png"]),
    ("4. One-factor hyperparameter studies", None, []),
    ("5. Training curves", None, []),
    ("6. Cascade and three-class classifier", "cascade", []),
    ("7. Confusion matrices, ROC, PR and calibration", "cascade",
     ["eval-cascade/confusion_matrix.png", "eval-three-class/confusion_matrix.png", "eval-cascade/roc.png",
      "eval-cascade/pr.png", "eval-cascade/calibration.png"]),
    ("8. The 25-image grid, feature maps and Grad-CAM", "cascade",
     ["eval-cascade/grid.png", "eval-cascade/feature_maps.png"]),
    ("9. Timing", None, []),
)


def write_readme(plan, out_dir, timings):
    """reports/NAME/README.md: every section in the study's order, our figures and tables beside the study's."""
    lines = ["# The study, reproduced by `cxrkeras report`", "",
             f"Data: `{plan.source}`. {study_figures.NOT_COMPARABLE}", ""]
    if plan.quick:
        lines += [QUICK_NOTE, ""]
    elif plan.epochs:
        lines += [epochs_note(plan.epochs), ""]
    pending = [s.name for s in plan.stages if not finished(s, out_dir)]
    if pending:
        lines += [f"**Partial**: {len(plan.stages) - len(pending)} of {len(plan.stages)} stages finished; not run "
                  f"yet: {', '.join(pending)}. {RESUME}", ""]
    stage_names = [s.name for s in plan.stages]
    for heading, stage, figures in SECTIONS:
        lines += [f"## {heading}", ""]
        if stage and stage not in stage_names:
            lines += ["Not in this plan.", ""]
            continue
        if stage in pending:
            lines += [NOT_YET, ""]
            continue
        lines += [f"![{name}]({stage}/{name})" for name in figures if os.path.exists(os.path.join(out_dir, stage, name))]
        lines += _section_body(heading, plan, out_dir, timings) + [""]
    write_text_atomic(os.path.join(out_dir, "README.md"), "\n".join(lines) + "\n")
    return os.path.join(out_dir, "README.md")


RESUME = "The same `cxrkeras report` command resumes the report."
NOT_YET = "Not run yet: the same `cxrkeras report` command runs it."


def finished(stage, out_dir):
    return (stage_record(stage, os.path.join(out_dir, stage.name)) or {}).get("finished", False)


def _section_body(heading, plan, out_dir, timings):
    if heading.startswith("1."):
        counts = read_json(os.path.join(out_dir, "data", "counts.json"), {}).get("counts", {})
        return ["", "| split | " + " | ".join(CLASSES) + " |", "|---" * (len(CLASSES) + 1) + "|"] + [
            f"| {split} | " + " | ".join(str(c[k]) for k in CLASSES) + " |" for split, c in counts.items()]
    if heading.startswith("3."):
        return study_figures.study_table(out_dir, "study-augmentation")
    if heading.startswith("4."):
        return _studies(plan, out_dir)
    if heading.startswith("5."):
        return [f"![{s.name}]({s.name}/curves.png)" if finished(s, out_dir) else f"{s.name}: {NOT_YET}"
                for s in plan.stages if s.name.startswith("fit-")]
    if heading.startswith("6."):
        return study_figures.cascade_tables(out_dir) + study_figures.operating_points_table(out_dir)
    if heading.startswith("8."):
        gradcams = sorted(glob.glob(os.path.join(out_dir, "cascade", "eval-cascade", "gradcam*.png")))
        return study_figures.grid_line(out_dir) + [
            f"![{os.path.basename(p)}]({os.path.relpath(p, out_dir)})" for p in gradcams]
    if heading.startswith("9."):
        return _timing(plan, out_dir, timings)
    return []


def _timing(plan, out_dir, timings):
    """Wall time per stage, time per training epoch, and (for a capped plan) the same at the study's
    schedules: each training stage's epoch time times its full epochs."""
    head = "| stage | epochs | wall time | per epoch |" + (" at the study's schedules |" if plan.epochs else "")
    precisions = sorted({s.settings["config"]["train"]["precision"] for s in plan.stages if "config" in s.settings})
    intro = (f"Machine: {machine_name()}; training precision {', '.join(precisions) or 'none'}. Stages reused from an "
             "earlier run keep that run's time; an epoch's time includes its validation.")
    rows, wall, full, any_copied = [], 0.0, 0.0, False
    for stage in (s for s in plan.stages if s.name in timings):
        seconds = timings[stage.name]
        per_epoch = (read_json(os.path.join(out_dir, stage.name, STAGE_FILE), {}) or {}).get("epoch_seconds")
        estimate = per_epoch * stage.full_epochs if per_epoch and stage.full_epochs else seconds
        wall, full = wall + seconds, full + estimate
        copied = reused_epochs(os.path.join(out_dir, stage.name, "project"))
        any_copied = any_copied or bool(copied)
        epochs = f"{stage.epochs} ({copied} copied)" if copied else stage.epochs or ""
        rows.append([stage.name, epochs, duration(seconds), duration(per_epoch) if per_epoch else "",
                     f"about {duration(estimate)} ({stage.full_epochs} epochs)" if stage.full_epochs else ""])
    pending = [s for s in plan.stages if s.name not in timings]
    rows += [[s.name, s.epochs or "", "not run yet", "", ""] for s in pending]
    rows.append(["all" if not pending else "finished stages", sum(s.epochs for s in plan.stages if s not in pending),
                 duration(wall), "", f"about {duration(full)} ({sum(s.full_epochs for s in plan.stages)} epochs)"])
    if any_copied:
        intro += " A study's trial that an earlier study trained already (the same config) is copied from it" + (
            "; the estimates at the study's schedules count every trial as trained." if plan.epochs else ".")
    columns = 5 if plan.epochs else 4
    return [intro, "", head, "|---" * columns + "|"] + [
        "| " + " | ".join(str(cell) for cell in row[:columns]) + " |" for row in rows]


def _studies(plan, out_dir):
    lines = []
    for stage in plan.stages:
        if stage.name.startswith("study-") and stage.name != "study-augmentation":
            lines += [f"### {stage.title}", ""]
            if not finished(stage, out_dir):
                lines += [NOT_YET, ""]
                continue
            if os.path.exists(os.path.join(out_dir, stage.name, "project", "study.png")):
                lines.append(f"![{stage.name}]({stage.name}/project/study.png)")
            lines += study_figures.study_table(out_dir, stage.name)
    return lines


def machine_name():
    """The CPU's model name and core count (and the GPUs Keras sees), for the timing table."""
    from cxrkeras.devices import gpu_compute_capabilities

    names = [line.split(":", 1)[1].strip() for line in _cpuinfo_lines() if line.startswith("model name")]
    gpus = gpu_compute_capabilities()
    return f"{names[0] if names else platform.processor() or 'CPU'}, {os.cpu_count()} cores" + (
        f", {len(gpus)} GPU(s)" if gpus else ", no GPU")


def _cpuinfo_lines():
    try:
        with open("/proc/cpuinfo") as f:
            return f.readlines()
    except OSError:
        return []


def report(data_dir, out_dir, quick=False, fraction=1.0, studies=ONE_FACTOR_STUDIES, configure=None, log=print,
           epochs=None):
    """Run or reuse every stage of the study's plan into `out_dir`, then write its README.md; return
    {stage: "ran" | "reused"}. `epochs` caps every training (see make_plan)."""
    plan = make_plan(data_dir, out_dir, quick, fraction, studies, configure, epochs)

    return run_plan(plan, out_dir, log=log)
