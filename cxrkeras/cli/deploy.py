"""Ship a model: `cascade` joins two classifiers, `export` writes a SavedModel, `predict` classifies, `serve` serves."""

import os

import click

from cxrkeras.cli.options import (
    TARGET_RECALL,
    THRESHOLD,
    dataset_source,
    echo_json,
    model_errors,
    run_list,
    task_option,
    task_unknown,
    with_facts,
)
from cxrkeras.config import DECISION_THRESHOLD, VAL_FRACTION


@with_facts
@click.command()
@click.argument("run_infected")
@click.argument("run_covid")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="The cascade folder to write.")
@click.option("--target-recall", "target", type=TARGET_RECALL,
              help="Pick thresholds on validation so CLASS reaches RECALL, e.g. covid=0.95.")
@click.option("--data", "data_source", help="Dataset to carve the validation split from [default: the runs' dataset].")
@click.option("--val-fraction", type=click.FloatRange(0, 1, min_open=True, max_open=True),
              help=f"[default: the runs' setting, else {VAL_FRACTION}]")
@click.option("--seed", type=int, help="Seed of the validation split [default: the runs' setting, else 0].")
@click.option("--threshold", "thresholds", type=THRESHOLD, multiple=True,
              help=f"A stage's threshold without --target-recall, e.g. covid=0.7; repeatable (infected, covid) "
              f"[default: {DECISION_THRESHOLD} each].")
@click.option("--overwrite", is_flag=True, help="Replace the model already in OUT (refused without it).")
@click.option("--json", "as_json", is_flag=True, help="Print the cascade record as JSON.")
def cascade(run_infected, run_covid, out_dir, target, data_source, val_fraction, seed, thresholds, overwrite, as_json):
    """Join two trained classifiers into the study's cascade, saved as OUT/model.keras.

    RUN_INFECTED and RUN_COVID are run folders (or .keras files) of the normal
    vs infected and the COVID vs non-COVID classifiers, in that order; either
    may list several runs joined by commas (RUN1,RUN2,...): that stage is then
    an ensemble averaging their probabilities. The cascade says normal if
    p_infected <= the infected threshold, else covid if p_covid > the covid
    threshold, else non-covid; both are {DECISION_THRESHOLD} unless --threshold
    NAME=VALUE sets them. With --target-recall the thresholds are
    picked on the runs' holdout when they carved one (fit --holdout-fraction),
    else on the validation split carved from train (never test): the most
    accurate pair whose recall for CLASS reaches RECALL. OUT/cascade.json holds
    the thresholds, the source runs and the false-negative / false-positive
    trade-off table; OUT/threshold_tradeoff.png draws it. A folder that
    already holds a model (a classifier's run, an older cascade) is refused
    unless --overwrite; every file is written under a temporary name first.
    """
    from cxrkeras.thresholds import make_cascade

    if target is not None and thresholds:
        raise click.UsageError("--threshold and --target-recall exclude each other.")
    if target is None and (data_source or val_fraction is not None or seed is not None):
        raise click.UsageError("--data, --val-fraction and --seed only apply with --target-recall.")
    if data_source is not None:
        dataset_source(data_source)
    try:
        record = make_cascade(run_list(run_infected), run_list(run_covid), out_dir, target=target, data=data_source,
                              val_fraction=val_fraction, seed=seed, overwrite=overwrite,
                              thresholds={name: value for given in thresholds for name, value in given.items()})
    except model_errors() as e:
        raise click.ClickException(str(e))
    except ValueError as e:
        raise click.UsageError(str(e))
    _echo_cascade(record, out_dir, as_json)


def _echo_cascade(record, out_dir, as_json):
    """What `cascade` made: its record (without the table) as JSON, or the thresholds and the trade-off chosen."""
    from cxrkeras.runs import CASCADE_FILE, MODEL_FILE

    summary = {k: v for k, v in record.items() if k != "table"}
    summary["model"] = os.path.join(out_dir, MODEL_FILE)
    summary["record"] = os.path.join(out_dir, CASCADE_FILE)
    if as_json:
        return echo_json(summary)
    t = record["thresholds"]
    click.echo(f"wrote {summary['model']} (thresholds infected={t['infected']:.2f}, covid={t['covid']:.2f})")
    selection = record.get("selection")
    if selection:
        chosen, default, name = selection["chosen"], selection["default"], selection["class"]
        status = "reached" if selection["reached"] else "NOT reached: closest shown"
        click.echo(
            f"{name} recall on {selection['split']} {chosen['recall']:.3f} "
            f"(target {selection['target_recall']:.3f}, {status}); "
            f"FN {chosen['fn']}, FP {chosen['fp']}, accuracy {chosen['accuracy']:.3f}"
        )
        click.echo(
            f"at {DECISION_THRESHOLD} / {DECISION_THRESHOLD}: {name} recall {default['recall']:.3f}; "
            f"FN {default['fn']}, FP {default['fp']}, accuracy {default['accuracy']:.3f}"
        )
        click.echo(f"trade-off: {summary['record']}, {record['plot']}")


@with_facts
@click.command()
@click.argument("model_path", metavar="MODEL")
@click.option(
    "--out",
    "base_dir",
    required=True,
    type=click.Path(file_okay=False),
    help="Base folder; the export goes to OUT/VERSION.",
)
@task_option
@click.option("--json", "as_json", is_flag=True, help="Print the export's metadata as JSON.")
def export(model_path, base_dir, task, as_json):
    """Export MODEL as a TensorFlow Serving SavedModel in OUT/VERSION (1, then 2, 3, ...).

    MODEL is a .keras file, a run folder or a cascade folder. Signatures:
    `serving_default` takes encoded JPEG/PNG bytes (`images`, string [N]; the
    REST API's {"b64": ...}) and decodes them in the graph; `predict_images`
    takes float32 [N, SIZE, SIZE, 1] in [0, 1] (SIZE: the model's image
    size, {IMAGE_SIZE} for the study's). Both answer `probabilities`,
    `class_id` and `class_name`; a cascade's thresholds are built in.
    """
    from cxrkeras import export as export_lib
    from cxrkeras.runs import TaskUnknownError

    try:
        version_dir = export_lib.export(model_path, base_dir, task=task)
    except TaskUnknownError as e:
        raise task_unknown(e)
    except model_errors() as e:
        raise click.ClickException(str(e))
    from cxrkeras import savedmodel

    metadata = savedmodel.read_metadata(version_dir)
    signatures = sorted(set(savedmodel.signature_defs(savedmodel.read_proto(version_dir))) - {"__saved_model_init_op"})
    if as_json:
        echo_json({"path": version_dir, **metadata})
        return
    thresholds = ", ".join(f"{k} {v:g}" for k, v in metadata["thresholds"].items()) or "argmax"
    click.echo(
        f"exported {metadata['kind']} model to {version_dir} (classes {', '.join(metadata['class_names'])}; "
        f"thresholds: {thresholds}; signatures: {', '.join(signatures)})"
    )


@click.command()
@click.argument("model_path", metavar="MODEL")
@click.argument("images", nargs=-1, required=True, metavar="IMAGE...")
@click.option("--batch-size", type=click.IntRange(1), default=64, show_default=True)
@task_option
@click.option(
    "--server",
    metavar="URL",
    help="Ask a TensorFlow Serving REST server (`cxrkeras serve` or TensorFlow Serving) at URL; MODEL is then its model name.",
)
@click.option("--trust-model", is_flag=True, help="Run a SavedModel whose graph uses ops outside the allow-list.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list of results.")
def predict(model_path, images, batch_size, task, server, trust_model, as_json):
    """Classify image files with MODEL; one line per image, exit 1 if any failed.

    MODEL is a .keras file, a run or cascade folder, or an exported SavedModel
    (a version folder, or the base folder: its highest version); with
    --server URL, the name of a model served there
    (`cxrkeras predict --server http://127.0.0.1:8501 cxr x.png`). Each line:
    path, class, probabilities. A file that is missing or does not decode gets
    an error line naming it and why; the others are still classified.

    A SavedModel is code: before running one, its graph's ops are checked
    against an allow-list (no file, process, network or Python ops), and one
    that uses others is refused unless --trust-model.
    """
    from cxrkeras import predict as predict_lib
    from cxrkeras.savedmodel import SavedModelError

    if server is not None and (task is not None or trust_model):
        raise click.UsageError("--task and --trust-model apply to a local MODEL, not with --server.")
    try:
        if server is not None:
            predictor = predict_lib.open_server(server, model_path)
        else:
            predictor = _open_local_model(model_path, task, trust_model)
        results = predict_lib.predict_files(predictor, list(images), batch_size)
    except (SavedModelError, predict_lib.ServerError) as e:
        raise click.ClickException(str(e))
    if as_json:
        echo_json(results)
    else:
        for r in results:
            if "error" in r:
                click.echo(f"{r['path']}\terror: {r['error']}")
            else:
                probabilities = " ".join(f"{n}={p:.4f}" for n, p in r["probabilities"].items())
                click.echo(f"{r['path']}\t{r['class']}\t{probabilities}")
    if any("error" in r for r in results):
        raise SystemExit(1)


def _open_local_model(model_path, task, trust_model):
    """predict_lib.open_model, its errors as click's; Keras is imported only for a Keras model or an error."""
    from cxrkeras import predict as predict_lib

    try:
        return predict_lib.open_model(model_path, task=task, trust=trust_model)
    except Exception as e:
        from cxrkeras.runs import TaskUnknownError

        if isinstance(e, TaskUnknownError):
            raise task_unknown(e)
        if isinstance(e, model_errors()):
            raise click.ClickException(str(e))
        raise
