"""`cxrkeras tune` searches hyperparameters; `cxrkeras report` runs the study's whole plan."""

import os

import click

from cxrkeras.cli.options import (
    TASK,
    augment_on_option,
    build_run_config,
    dataset_source,
    echo_json,
    model_errors,
    quote,
    train_options,
)
from cxrkeras.config import STUDY_EPOCHS
from cxrkeras.search_spaces import TUNERS


@click.command()
@click.argument("task", type=TASK, metavar="TASK")
@click.option("--study", default="joint", show_default=True,
              help="A study in tuning/: depth, batch-size, optimizer, learning-rate, weight-decay, augmentation "
              "(the study's one-factor experiments), joint (all of them); or a TOML file of your own.")
@click.option("--data", "data_path", type=click.Path(), help="Dataset folder or CSV manifest (not with --summary).")
@train_options
@click.option("--tuner", type=click.Choice(TUNERS), help="[the study's: grid for one factor, random for joint]")
@click.option("--max-trials", type=click.IntRange(1), help="Trials to run at most [grid: all; the study's].")
@click.option("--executions-per-trial", type=click.IntRange(1), default=1, show_default=True,
              help="Trainings per trial, each from its own seed; the trial's score is their mean.")
@click.option("--name", help="Project name: the project is OUT/TASK/NAME [default: the study's name].")
@click.option("--out", default=os.path.join("saved_models", "tune"), show_default=True,
              type=click.Path(file_okay=False), help="Root of the tuning projects.")
@augment_on_option
@click.option("--summary", is_flag=True, help="Print the project's trials, best first, and stop (no search).")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON (progress goes to stderr).")
def tune(task, study, data_path, config_file, tuner, max_trials, executions_per_trial, name, out, augment_on,
         summary, as_json, **options):
    """Search hyperparameters of TASK's classifier with keras-tuner; rerun the same command to resume.

    The other settings stay at the study's defaults, or at what --config and the
    training options set (e.g. --epochs 5 --precision mixed_bfloat16). Each
    trial trains on the validation split carved from train and is scored by
    --monitor (val_loss by default); test is never looked at. One line per
    trial: its values, score, the best so far, the time left. The project
    (OUT/TASK/NAME) keeps every trial; at the end it holds results.md (the
    table), study.png (loss and accuracy per epoch, one line per value) and
    best_config.json, which `cxrkeras fit TASK --config` trains.

    Distributed: one chief (KERASTUNER_TUNER_ID=chief) and workers (tuner0,
    tuner1, ...) run this same command on a shared --out, with
    KERASTUNER_ORACLE_IP and KERASTUNER_ORACLE_PORT set to the chief's address.
    """
    import contextlib
    import sys

    from cxrkeras import search_spaces
    from cxrkeras import tuning_project as project
    from cxrkeras.data import DatasetError

    try:
        spec = search_spaces.load_study(study)
    except search_spaces.StudyError as e:
        raise click.UsageError(f"--study: {e}")
    project_dir = project.project_dir_for(out, task, name or spec.name)
    if summary:
        try:
            result = project.summarize(project_dir)
        except project.TuneError as e:
            raise click.ClickException(str(e))
        return _echo_tune(result, as_json)
    base = build_run_config(task, data_path, config_file, **options)
    from cxrkeras import tuning  # the search itself: keras-tuner, Keras and TensorFlow

    progress_to_stderr = contextlib.redirect_stdout(sys.stderr) if as_json else contextlib.nullcontext()
    try:
        with project.hold_project(project_dir), progress_to_stderr:  # one tune per project
            result = tuning.tune(spec, base, project_dir, tuner, max_trials, executions_per_trial, augment_on,
                                 log=lambda message: click.echo(message, err=as_json))
    except KeyboardInterrupt:
        click.echo("\nInterrupted. Finished trials are kept; the same command resumes the search.", err=True)
        raise SystemExit(130)
    except (project.TuneError, DatasetError) as e:
        raise click.ClickException(str(e))
    except ValueError as e:  # a study or a value the config refuses, a tuner without --max-trials
        raise click.UsageError(str(e))
    if result is not None:  # a distributed worker leaves the results to the chief
        _echo_tune(result, as_json)


def _echo_tune(result, as_json):
    from cxrkeras.tuning_project import format_table

    if as_json:
        return echo_json(result)
    click.echo(f"{result['task']} / {result['study']} ({result['tuner']}): {len(result['trials'])} trial(s) in "
               f"{result['project']}, best first by {result['objective']}")
    click.echo(format_table(result))
    if result["best_config"]:
        click.echo(f"best config: {result['best_config']} (train it: cxrkeras fit {result['task']} --data DIR "
                   f"--config {quote(result['best_config'])})")
    if result.get("figure"):
        click.echo(f"figure: {result['figure']}")


@click.command()
@click.option("--data", "data_path", required=True, type=click.Path(), help="Dataset folder (the study's layout).")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="The report folder, e.g. reports/NAME.")
@click.option("--quick", is_flag=True, help="The same plan with 1-epoch trainings and 2 values per study, for a look.")
@click.option("--epochs", type=click.IntRange(1), default=None,
              help=f"Stop every training after this many epochs (default: the study's "
              f"{' / '.join(map(str, STUDY_EPOCHS.values()))}).")
@click.option("--fraction", type=click.FloatRange(0, 1, min_open=True), default=1.0, show_default=True,
              help="Share of each train class used (a seeded subset).")
def report(data_path, out_dir, quick, epochs, fraction):
    """Run the study's whole plan and write OUT/README.md with every figure and table in the study's order.

    Stages: data summary, augmentation preview, the infected, covid and
    three-class fits, the cascade evaluated with the three-class classifier on
    the validation split carved from train (test is never read), and the
    one-factor studies. A line per stage and per training epoch says where it
    is and about how long the plan has left. A stage already finished in OUT
    with the same settings is reused, so an interrupted report resumes with
    the same command. The study's full plan is many CPU-hours (its timing
    section shows each epoch's cost): `--epochs 2` or `--quick` for a look.
    """
    from cxrkeras import evaluation, rundir
    from cxrkeras import report as report_lib
    from cxrkeras.tuning_project import TuneError

    source = dataset_source(data_path)
    try:
        report_lib.report(source, out_dir, quick, fraction, log=click.echo, epochs=epochs)
    except KeyboardInterrupt:
        click.echo("\nInterrupted. Finished stages are kept; the same command resumes the report.", err=True)
        raise SystemExit(130)
    except (*model_errors(), rundir.RunDirError, TuneError, evaluation.EvaluationError) as e:
        raise click.ClickException(str(e))
    click.echo(f"wrote {os.path.join(out_dir, 'README.md')}")
