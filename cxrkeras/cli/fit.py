"""`cxrkeras fit`: train one of the study's classifiers, on one process or across several (multiworker)."""

import os

import click

from cxrkeras.cli.options import TASK, augment_on_option, build_run_config, echo_json, quote, train_options

@click.command()
@click.argument("task", type=TASK, metavar="TASK")
@click.option("--data", "data_path", type=click.Path(), help="Dataset folder (the study's layout) or CSV manifest.")
@train_options
@click.option("--name", help="Run name: the run dir is OUT/TASK/NAME [default: a timestamp].")
@click.option("--out", default="saved_models", show_default=True, type=click.Path(file_okay=False),
              help="Root of the run dirs.")
@click.option("--resume", is_flag=True, help="Continue the run --name (default: the latest unfinished one) "
              "from its last finished epoch, with its own config.json.")
@augment_on_option
@click.option("--tensorboard", is_flag=True, help="Also write TensorBoard logs to RUN_DIR/logs.")
@click.option("--json", "as_json", is_flag=True, help="Print the final summary as JSON (progress goes to stderr).")
@click.option("--coordinator", metavar="HOST:PORT", help="--distribute multiworker: where process 0 listens "
              "[KERAS_DISTRIBUTION_JOB_ADDRESSES]. Every process runs the same command with its own --process-id.")
@click.option("--num-processes", type=click.IntRange(1), help="--distribute multiworker: how many processes train "
              "[KERAS_DISTRIBUTION_NUM_PROCESSES].")
@click.option("--process-id", type=click.IntRange(0), help="--distribute multiworker: this process, 0 to N-1; 0 alone "
              "writes the run dir [KERAS_DISTRIBUTION_PROCESS_ID].")
def fit(task, data_path, config_file, name, out, resume, augment_on, tensorboard, as_json, coordinator, num_processes,
        process_id, **options):
    """Train the study's classifier for TASK: infected, covid or three-class.

    Defaults are the study's: Adam 1e-3, batch 64, binary cross-entropy (sparse
    categorical for three-class), 35 epochs (covid: 25, on infected images
    only), augmentation on. The kept epoch (RUN_DIR/model.keras) is the best on
    a validation split carved from train; test is never looked at. The run dir
    also holds config.json, history.csv and curves.png. A run stopped at any
    point (Ctrl-C, kill) continues with the same command plus --resume.

    --distribute multiworker (KERAS_BACKEND=jax) trains one run across N
    processes: start the same command on each with --coordinator HOST:PORT
    (process 0's), --num-processes N and its own --process-id. Process 0
    writes the run dir; --resume continues on the same N.
    """
    import contextlib
    import sys

    from cxrkeras import distributed, rundir, training
    from cxrkeras.data import DatasetError

    cluster_flags = {"--coordinator": coordinator, "--num-processes": num_processes, "--process-id": process_id}
    multiworker = options["distribute"] == "multiworker"
    if multiworker:
        _join_cluster(coordinator, num_processes, process_id)
    elif any(v is not None for v in cluster_flags.values()):
        raise click.UsageError("--coordinator, --num-processes and --process-id go with --distribute multiworker.")
    run_config, run_dir = _run_config_and_dir(task, data_path, config_file, name, out, resume, options)
    resume_command = _resume_command(task, data_path, out, run_dir, tensorboard, cluster_flags if multiworker else None)
    verbose = 1 if sys.stdout.isatty() and not as_json else 2
    progress_to_stderr = contextlib.redirect_stdout(sys.stderr) if as_json else contextlib.nullcontext()
    try:
        with progress_to_stderr:
            result = training.fit(
                run_config, run_dir, resume=resume, verbose=verbose, augment_on=augment_on, tensorboard=tensorboard,
                log=lambda message: click.echo(message, err=as_json),
            )
    except KeyboardInterrupt:
        click.echo(f"\nInterrupted. Nothing finished is lost; continue with:\n  {resume_command}", err=True)
        raise SystemExit(130)
    except distributed.ClusterError as e:
        _cluster_stopped(e)
    except (DatasetError, rundir.RunDirError) as e:
        raise click.ClickException(str(e))
    except ValueError as e:  # settings that only fail with the data or devices at hand (batch size vs replicas)
        raise click.UsageError(str(e))
    result.run_dir = run_dir  # the other processes trained into a scratch copy; process 0 wrote run_dir
    if as_json:
        echo_json(result.to_dict())
    else:
        click.echo(result.summary())


def _run_config_and_dir(task, data_path, config_file, name, out, resume, options):
    """The RunConfig and run dir: a new run's, or with --resume the run to continue and its own config.json."""
    from cxrkeras import rundir, runs
    from cxrkeras.config import RunConfig

    if not resume:
        if options["precision"] is None and not config_file:
            options["precision"] = "auto"  # the study's float32 where bfloat16 would be emulated (slower)
        run_config = build_run_config(task, data_path, config_file, **options)
        return run_config, _on_chief(lambda: rundir.run_dir_for(out, task, name))  # one timestamp for all processes
    if config_file:
        raise click.UsageError("--config with --resume: a resumed run uses its own config.json.")

    def find_run():
        run_dir = os.path.join(out, task, name) if name else rundir.latest_unfinished_run(out, task)
        if not run_dir or not os.path.exists(os.path.join(run_dir, runs.CONFIG_FILE)):
            where = run_dir or os.path.join(out, task)
            raise click.UsageError(f"--resume: no run to resume in {where} (no {runs.CONFIG_FILE}).")
        try:
            return run_dir, RunConfig.load(os.path.join(run_dir, runs.CONFIG_FILE)).to_dict()
        except ValueError as e:
            raise click.ClickException(str(e))

    run_dir, base = _on_chief(find_run)  # process 0 reads the run dir; the others may not see it
    return build_run_config(task, data_path, base=RunConfig.from_dict(base), **options), run_dir


def _resume_command(task, data_path, out, run_dir, tensorboard, cluster_flags):
    """The command that continues this run (`cluster_flags`: a multiworker run's, else None)."""
    return " ".join(
        ["cxrkeras", "fit", task]
        + (["--data", quote(data_path)] if data_path else [])
        + ["--out", quote(out), "--name", quote(os.path.basename(os.path.normpath(run_dir))), "--resume"]
        + (["--tensorboard"] if tensorboard else [])
        + (["--distribute", "multiworker"] if cluster_flags is not None else [])
        + [f"{flag} {quote(value)}" for flag, value in (cluster_flags or {}).items() if value is not None]
    )


def _join_cluster(coordinator, num_processes, process_id):
    """Join the processes of a multiworker fit (flags, else Keras' variables); UsageError for a gap or a bad value."""
    from cxrkeras import distributed

    try:
        distributed.check_backend()
        distributed.initialize(distributed.cluster_from(coordinator, num_processes, process_id))
    except ValueError as e:
        raise click.UsageError(str(e))
    except distributed.ClusterError as e:
        _cluster_stopped(e)


def _cluster_stopped(error):
    """Say why a multiworker run stopped and end the process at once (JAX's own exit would wait for the dead peer)."""
    from cxrkeras import distributed

    click.echo(f"Error: {error}", err=True)
    distributed.exit_now(1)


def _on_chief(find):
    """`find()` run by process 0 of a multiworker fit, its answer (or its click error) returned on every process."""
    from cxrkeras import distributed

    if distributed.process_count() == 1:
        return find()
    answer = None
    if distributed.is_chief():
        try:
            answer = {"value": find()}
        except click.ClickException as e:
            answer = {"error": e.message, "usage": isinstance(e, click.UsageError)}
    try:
        answer = distributed.broadcast_json(answer)
    except distributed.ClusterError as e:
        _cluster_stopped(e)
    if "error" in answer:
        raise (click.UsageError if answer["usage"] else click.ClickException)(answer["error"])
    return answer["value"]
