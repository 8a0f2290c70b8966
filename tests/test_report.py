"""`cxrkeras report`: the study's plan on tiny synthetic data, every section and figure, and a rerun that reuses."""

import json
import os
import re
import shutil

import pytest

from cxrkeras import report, study_figures


def shrink(cfg):
    """A two-block classifier on 48x48 images: each training is mostly Keras' start-up."""
    cfg.model.blocks, cfg.model.filters, cfg.model.dense_units = 2, [4, 8], 8
    if cfg.model.arch == "residual":
        cfg.model.blocks = 1
    cfg.model.image_size = 48
    cfg.train.batch_size = 8


@pytest.fixture(scope="module")
def quick_report_run(synthetic_dataset, tmp_path_factory):
    out, lines = str(tmp_path_factory.mktemp("report") / "quick"), []
    done = report.report(synthetic_dataset, out, quick=True, studies=("augmentation", "learning-rate"),
                         configure=shrink, log=lines.append)
    return out, done, lines


@pytest.fixture(scope="module")
def quick_report(quick_report_run):
    return quick_report_run[:2]


def test_quick_report_writes_every_section_and_figure(quick_report):
    out, done = quick_report
    assert set(done.values()) == {"ran"} and len(done) == 8
    text = open(os.path.join(out, "README.md"), encoding="utf-8").read()
    for heading, _, _ in report.SECTIONS:
        assert f"## {heading}" in text
    figures = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert len(figures) >= 15, figures
    for figure in figures:
        assert os.path.getsize(os.path.join(out, figure)) > 0, figure
    assert "| cascade (n=" in text and "| three-class (n=" in text and study_figures.NOT_COMPARABLE in text
    assert report.QUICK_NOTE in text  # a quick report says it shows the plan, not results
    precision = json.loads(open(os.path.join(out, "fit-infected", report.STAGE_FILE)).read())[
        "settings"]["config"]["train"]["precision"]
    assert f"; training precision {precision}. " in text and "| all | 7 |" in text
    # the learning-rate study's 1e-3 trial is the augmentation study's augment=True trial: copied, not trained
    assert "| study-learning-rate | 2 (1 copied) |" in text and "is copied from it; the estimates" in text
    assert "completed (reused: study-augmentation/project, trial 1)" in text
    points = json.loads(open(os.path.join(out, "cascade", "operating_points.json")).read())
    assert [r["target"] for r in points["rows"]] == list(report.COVID_TARGETS)
    assert points["split"] == "validation" and all(r["recall"] >= r["target"] for r in points["rows"] if r["reached"])
    assert "| study's 0.5 / 0.5 | 0.50 | 0.50 |" in text and "(cascade/tradeoff.png)" in text
    # the published study's outcome beside ours: its choice and words, our best, and where its choice ranks here
    beside = re.search(r"chose \*\*augment = True\*\*: \"with the help of data augmentation.*the best is "
                       r"\*\*(True|False)\*\* by val_loss; the study's choice ranks ([12]) of 2 "
                       r"\(val_loss [0-9.]+ against [0-9.]+ for (\w+)(, the next)?\)", text)
    assert beside and (beside.group(1) == "True") == (beside.group(2) == "1"), text
    assert beside.group(3) == "False" and bool(beside.group(4)) == (beside.group(2) == "1")  # the other value, named
    grid = json.loads(open(os.path.join(out, "cascade", "eval-cascade", "metrics.json")).read())["grid"]
    assert f"Our cascade gets {grid['correct']} of {grid['n']} right; the study's got 18 of the 25" in text


def test_the_report_says_each_epoch_and_the_time_left(quick_report_run):
    _, _, lines = quick_report_run
    epochs = [line for line in lines if re.search(r"^    \S+: epoch \d+/\d+ in ", line)]
    # 3 fits of 1 epoch, the augmentation study's 2 trials of 1 epoch, then the learning-rate study's: its first
    # trial copied (its epoch counts as done), its second trained: 7 epochs in all, 6 trained
    assert [re.search(r"plan (\d+)/(\d+) epochs", line).groups() for line in epochs] == [
        (str(n), "7") for n in (1, 2, 3, 4, 5, 7)]
    assert all(re.search(r"about \S+ left$", line) for line in epochs)
    assert any(line.startswith("    study-augmentation: trial 2/2 [augment=False]") for line in lines)
    # a copied trial times nothing: no time left is guessed from it
    assert any(line.startswith("    study-learning-rate: trial 1/2 [learning_rate=0.001]") and
               line.endswith(") copied from study-augmentation/project, trial 1") for line in lines), lines


def test_a_resumed_study_counts_its_finished_trials_epochs(quick_report, synthetic_dataset, tmp_path):
    out, _ = quick_report
    folder = str(tmp_path / "study-augmentation")
    shutil.copytree(os.path.join(out, "study-augmentation"), folder)
    trial_file = os.path.join(folder, "project", "trial_0001", "trial.json")
    with open(trial_file) as f:
        trial = json.load(f)
    with open(trial_file, "w") as f:  # trial 2 cut short: trial 1 (1 epoch) is all that is finished
        json.dump({**trial, "status": "RUNNING"}, f)
    plan = report.make_plan(synthetic_dataset, str(tmp_path), quick=True, studies=("augmentation",), configure=shrink)
    stage, lines = plan.stages[-1], []
    progress = report.Progress(plan, lines.append)
    progress.start(stage, folder, {})
    (callback,) = progress.callbacks(stage)
    callback.on_train_begin()
    callback.on_epoch_begin(0)
    callback.on_epoch_end(0)
    assert progress.done[stage.name] == 2 == stage.epochs and "epoch 2/2" in lines[0]


def test_time_left_counts_each_task_at_its_own_epoch_time():
    fit_a = report.Stage("a", "A", None, {}, task="infected", epochs=2)
    fit_b = report.Stage("b", "B", None, {}, task="covid", epochs=3)
    plan = report.Plan("data", [report.Stage("data", "D", None, {}), fit_a, fit_b])
    progress = report.Progress(plan, log=lambda line: None)
    assert progress.seconds_left() is None  # nothing timed yet
    progress.by_stage, progress.done["a"] = {"a": [10.0, 1]}, 1
    assert progress.seconds_left() == pytest.approx(1 * 10 + 3 * 10)  # covid not seen: the mean of all so far
    progress.by_stage["b"], progress.done["b"] = [40.0, 1], 1
    assert progress.seconds_left() == pytest.approx(1 * 10 + 2 * 40)


def test_time_left_counts_the_epoch_times_earlier_runs_recorded():
    """A resumed report knows its time left before its first epoch: from the stages it reuses and earlier legs."""
    fit_a = report.Stage("a", "A", None, {}, task="infected", epochs=4)
    fit_b = report.Stage("b", "B", None, {}, task="covid", epochs=3)
    study = report.Stage("s", "S", None, {}, task="infected", epochs=10)
    progress = report.Progress(report.Plan("data", [fit_a, fit_b, study]), log=lambda line: None)
    progress.finish(fit_a, epoch_seconds=5.0)  # reused: its stage.json says 5 s an epoch
    progress.start(fit_b, "folder", {"seconds": 130.0, "epoch_seconds": 120.0, "epochs": 2})  # cut short after 2
    progress.done["b"] = 2
    assert progress.seconds_left() == pytest.approx(1 * 60 + 10 * 5)
    progress.finish(fit_b)
    assert progress.seconds_left() == pytest.approx(10 * 5)


def test_epochs_caps_every_training_and_remembers_the_study_schedules(synthetic_dataset, tmp_path):
    plan = report.make_plan(synthetic_dataset, str(tmp_path), epochs=2, studies=("learning-rate",))
    trainings = {s.name: (s.task, s.epochs, s.full_epochs) for s in plan.stages if s.task}
    assert trainings == {"fit-infected": ("infected", 2, 35), "fit-covid": ("covid", 2, 25),
                         "fit-three-class": ("three-class", 2, 35), "study-learning-rate": ("infected", 8, 140)}
    assert {s.settings["config"]["train"]["epochs"] for s in plan.stages if s.task} == {2}
    with pytest.raises(ValueError, match="Received: epochs=0"):
        report.make_plan(synthetic_dataset, str(tmp_path), epochs=0)


def test_a_second_report_reuses_every_stage(quick_report, synthetic_dataset):
    out, _ = quick_report
    model = os.path.join(out, "fit-infected", "model.keras")
    before = os.stat(model).st_mtime_ns
    lines = []
    done = report.report(synthetic_dataset, out, quick=True, studies=("augmentation",), configure=shrink,
                         log=lines.append)
    assert set(done.values()) == {"reused"}
    assert os.stat(model).st_mtime_ns == before
    assert lines[0].startswith("[1/7] Data: class distributions: reused")


def test_a_started_stage_continues_and_the_finished_are_kept(quick_report, synthetic_dataset):
    out, _ = quick_report
    record_path = os.path.join(out, "fit-infected", report.STAGE_FILE)
    record = json.loads(open(record_path).read())
    with open(record_path, "w") as f:  # as after a kill at the end of the stage's fit
        json.dump({**record, "finished": False}, f)
    legs = os.path.join(out, "fit-infected", report.LEGS_FILE)
    assert json.loads(open(legs).read())["epochs"] == 1  # the first run's epoch, written as it ended
    with open(legs, "w") as f:  # as if the earlier runs had spent longer on it
        json.dump({"seconds": 1000.0, "epoch_seconds": 900.0, "epochs": 1}, f)
    model = os.path.join(out, "fit-infected", "model.keras")
    before = os.stat(model).st_mtime_ns
    done = report.report(synthetic_dataset, out, quick=True, studies=("augmentation",), configure=shrink,
                         log=lambda message: None)
    assert [k for k, v in done.items() if v == "ran"] == ["fit-infected"]
    assert os.stat(model).st_mtime_ns == before  # its finished epoch was resumed, not trained again
    assert json.loads(open(record_path).read())["finished"] is True
    # its time counts the earlier runs: the timing table is the stage's whole cost, not its last leg's
    assert json.loads(open(record_path).read())["epoch_seconds"] == 900.0
    assert 1000 <= json.loads(open(os.path.join(out, report.TIMINGS_FILE)).read())["fit-infected"] < 1100


def test_a_report_cut_short_shows_its_finished_stages_and_names_the_rest(synthetic_dataset, tmp_path):
    out, source = str(tmp_path / "partial"), os.path.abspath(synthetic_dataset)

    def cut(folder, *_):
        raise KeyboardInterrupt

    plan = report.Plan(source, [report.Stage("data", "Data", lambda d, *_: report.data_summary(source, d), {}),
                                report.Stage("augmentation", "Augmentation preview", cut, {}),
                                report.Stage("study-depth", "One-factor study: depth", cut, {}, "infected", 4, 140)])
    with pytest.raises(KeyboardInterrupt):
        report.run_plan(plan, out, log=lambda line: None)
    text = open(os.path.join(out, "README.md"), encoding="utf-8").read()
    assert "**Partial**: 1 of 3 stages finished; not run yet: augmentation, study-depth." in text
    data_section, preview_section = text.split("## 1. ")[1].split("## 2. ")
    assert "| train |" in data_section and "(data/distribution_infected.png)" in data_section
    assert preview_section.split("## 3.")[0].split("\n", 1)[1].strip() == report.NOT_YET
    assert f"### One-factor study: depth\n\n{report.NOT_YET}" in text
    assert "| augmentation |  | not run yet |" in text and "| study-depth | 4 | not run yet |" in text
    assert "training precision none." in text  # this plan trains nothing
    assert "| finished stages | 0 |" in text  # data trains nothing; the unfinished epochs are not counted as run


def test_subset_manifest_keeps_a_fraction_of_each_train_class(synthetic_dataset, tmp_path):
    path = report.subset_manifest(synthetic_dataset, 0.5, str(tmp_path / "subset.csv"))
    rows = open(path).read().splitlines()[1:]
    train = [r for r in rows if r.endswith(",train")]
    assert len(train) == 15 and not any(r.endswith(",test") for r in rows)
    with pytest.raises(ValueError, match="Received: fraction=0"):
        report.subset_manifest(synthetic_dataset, 0, str(tmp_path / "x.csv"))


def test_report_command_refuses_a_missing_dataset(tmp_path):
    from click.testing import CliRunner

    from cxrkeras.cli import main

    result = CliRunner().invoke(main, ["report", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "r")])
    assert result.exit_code == 2 and "no such folder or manifest" in result.output
    assert not (tmp_path / "r").exists()
    result = CliRunner().invoke(main, ["report", "--data", str(tmp_path), "--out", str(tmp_path / "r"),
                                       "--epochs", "0"])
    assert result.exit_code == 2 and "Invalid value for '--epochs'" in result.output
