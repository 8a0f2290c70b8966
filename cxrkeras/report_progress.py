"""The progress of `cxrkeras report`'s plan, in epochs: a line per training epoch with the time left, and each
stage's time over the runs it took (LEGS_FILE), so a report resumed across sessions knows its whole cost."""

import os
import time

from cxrkeras.files import write_json_atomic
from cxrkeras.runs import duration
from cxrkeras.tuning_project import TRIAL_FILE, trial_epochs

LEGS_FILE = "legs.json"  # a stage's time over the runs it took: {seconds, epoch_seconds, epochs} so far


class Progress:
    """The plan's progress in epochs: one line per training epoch, with the time the plan has left.

    Time left: every stage's unfinished epochs at the mean epoch time of its
    task measured so far: in this run, by finished stages it reuses and by the
    earlier legs of the stage it resumes (the mean over all tasks for one not
    yet seen); stages that train nothing count as no time.
    """

    def __init__(self, plan, log):
        self.plan, self.log = plan, log
        self.done = {s.name: 0 for s in plan.stages}  # epochs finished, per stage
        self.by_stage = {}  # stage name -> [seconds, epochs] measured in this run
        self.recorded = {}  # stage name -> [seconds, epochs] measured by earlier runs (reused stages, earlier legs)
        self.stage, self._began = None, 0.0
        self.legs_path, self.earlier, self._stage_began = None, {}, 0.0
        self.folder, self.base = None, 0  # the stage's folder; epochs its finished trials trained

    def start(self, stage, folder, earlier):
        """Time `stage` in `folder` from now, after `earlier` legs (LEGS_FILE of the runs it was cut short in)."""
        self.stage, self._stage_began, self.folder = stage, time.perf_counter(), folder
        self.legs_path, self.earlier = os.path.join(folder, LEGS_FILE), earlier
        if earlier.get("epochs"):
            self.recorded[stage.name] = [earlier["epoch_seconds"], earlier["epochs"]]

    def callbacks(self, stage):
        import keras

        return [keras.callbacks.LambdaCallback(on_train_begin=self._train_begin, on_epoch_begin=self._begin,
                                               on_epoch_end=self._end)]

    def finish(self, stage, epoch_seconds=None):
        """`stage` has done its epochs; `epoch_seconds`: its mean epoch time when an earlier run recorded it."""
        self.done[stage.name] = stage.epochs
        if epoch_seconds and stage.name not in self.by_stage:
            self.recorded[stage.name] = [epoch_seconds * stage.epochs, stage.epochs]

    def legs(self, stage):
        """{seconds, epoch_seconds, epochs} of `stage` over every run it took (earlier legs and this one)."""
        seconds, epochs = self.by_stage.get(stage.name, (0.0, 0))
        earlier = self.earlier if stage is self.stage else {}
        return {"seconds": earlier.get("seconds", 0.0) + time.perf_counter() - self._stage_began,
                "epoch_seconds": earlier.get("epoch_seconds", 0.0) + seconds,
                "epochs": earlier.get("epochs", 0) + epochs}

    def epoch_seconds(self, stage):
        legs = self.legs(stage)
        return round(legs["epoch_seconds"] / legs["epochs"], 1) if legs["epochs"] else None

    def seconds_left(self):
        """Seconds the unfinished epochs should take, or None before any epoch was timed."""
        if not self.by_stage and not self.recorded:
            return None
        by_task = {}
        for stage in self.plan.stages:
            spent = by_task.setdefault(stage.task, [0.0, 0])
            for seconds, epochs in (self.by_stage.get(stage.name, (0.0, 0)), self.recorded.get(stage.name, (0.0, 0))):
                spent[0], spent[1] = spent[0] + seconds, spent[1] + epochs
        overall = sum(s for s, _ in by_task.values()) / sum(n for _, n in by_task.values())
        per_epoch = {task: seconds / epochs if epochs else overall for task, (seconds, epochs) in by_task.items()}
        return sum((s.epochs - self.done[s.name]) * per_epoch[s.task] for s in self.plan.stages)

    def _train_begin(self, logs=None):
        self.base = finished_trial_epochs(self.folder)

    def _begin(self, epoch, logs=None):
        self._began = time.perf_counter()

    def _end(self, epoch, logs=None):
        stage, seconds = self.stage, time.perf_counter() - self._began
        spent = self.by_stage.setdefault(stage.name, [0.0, 0])
        spent[0], spent[1] = spent[0] + seconds, spent[1] + 1
        write_json_atomic(self.legs_path, self.legs(stage))  # what a cut-short run has spent on the stage
        # a fit (or a study's trial) resumed at epoch k counts from k, after the study's finished trials
        self.done[stage.name] = min(stage.epochs, self.base + epoch + 1)
        done, total = sum(self.done.values()), sum(s.epochs for s in self.plan.stages)
        self.log(f"    {stage.name}: epoch {self.done[stage.name]}/{stage.epochs} in {duration(seconds)}; "
                 f"plan {done}/{total} epochs, about {duration(self.seconds_left())} left")


def finished_trial_epochs(folder):
    """Epochs the finished trials of the study in `folder` trained (0 for a stage that is not a study)."""
    return trial_epochs(os.path.join(folder, "project"), TRIAL_FILE, lambda state: state.get("status") == "COMPLETED")
