"""`cxrkeras evaluate` and `cxrkeras compare`: the study's tables and figures for a model, side by side for several."""

import click

from cxrkeras.cli.options import dataset_source, echo_json, model_errors, task_option, task_unknown
from cxrkeras.config import AUDIT_BAND, IMAGE_SIZE, VAL_FRACTION


@click.command()
@click.argument("model_path", metavar="MODEL", type=click.Path(exists=True))
@click.option("--data", "data_path", required=True, type=click.Path(),
              help="Dataset folder (the study's layout) or CSV manifest.")
@click.option("--split", type=click.Choice(["test", "val", "validation", "holdout"]), default="test", show_default=True,
              help="test: test/; val: the release's small val/; validation: the split carved from train "
              "(the run's val_fraction and seed); holdout: the one carved before it (the run's holdout_fraction).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), help="Where results go [default: MODEL_DIR/eval-SPLIT].")
@click.option("--image", "images", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="Image for Grad-CAM (repeatable); the first also for the feature maps "
              "[default: the split's first images].")
@task_option
@click.option("--val-fraction", type=click.FloatRange(0, 1, min_open=True, max_open=True),
              help=f"--split validation: fraction carved from train [the run's, else {VAL_FRACTION}].")
@click.option("--seed", type=int, help="--split validation: seed of the carve [the run's, else 0].")
@click.option("--holdout-fraction", type=click.FloatRange(0, 1, min_open=True, max_open=True),
              help="--split holdout / validation: the holdout carved from train [the run's].")
@click.option("--band", type=click.IntRange(1, IMAGE_SIZE // 2 - 1), default=AUDIT_BAND, show_default=True,
              help=f"Shortcut audit: the border band's width in pixels of a {IMAGE_SIZE}-pixel image (scaled to the "
              "model's).")
@click.option("--batch-size", type=click.IntRange(1), default=64, show_default=True)
@click.option("--adapt-on", type=click.Path(exists=True),
              help="Also score MODEL adapted (`cxrkeras adapt`) to these unlabeled images, side by side; "
              "they may be the evaluated split's own folder (labels are not read).")
@click.option("--json", "as_json", is_flag=True, help="Print metrics.json instead of the table.")
def evaluate(model_path, data_path, split, out_dir, images, task, val_fraction, seed, holdout_fraction, band,
             batch_size, adapt_on, as_json):
    """Evaluate MODEL (a .keras file or run dir: binary, three-class or cascade) on one split.

    Prints the study's table (recall, precision, F1 per class; accuracy) and
    writes metrics.json (also the confusion, per-class AUC, ECE, and for the
    cascade its thresholds and stage accuracies), confusion_matrix.png,
    roc.png, pr.png, calibration.png, grid.png (the release's val/ images,
    the study's Figure 2.8.2), feature_maps.png (every second conv layer of
    the covid classifier) and gradcam_*.png. For the covid task only infected
    images are evaluated. The shortcut audit (metrics.json "audit") scores
    the model on the border band alone and on the centre alone, beside the
    majority-class rate, and gives the share of Grad-CAM heat in the band.
    """
    from cxrkeras import evaluation
    from cxrkeras.runs import TaskUnknownError

    dataset_source(data_path)
    log = lambda message: click.echo(message, err=True)  # noqa: E731
    from cxrkeras import adapt as adapt_lib

    options = dict(images=list(images) or None, task=task, val_fraction=val_fraction, seed=seed,
                   holdout_fraction=holdout_fraction, audit_band=band)
    try:
        if adapt_on:
            metrics = adapt_lib.evaluate_adapted(model_path, adapt_on, data_path, split, out_dir,
                                                 batch_size=batch_size, log=log, **options)
        else:
            metrics = evaluation.evaluate_run(model_path, data_path, split, out_dir, batch_size=batch_size, log=log,
                                              **options)
    except adapt_lib.AdaptError as e:
        raise click.UsageError(f"--adapt-on: {e}")
    except TaskUnknownError as e:
        raise task_unknown(e)
    except (*model_errors(), evaluation.EvaluationError) as e:
        raise click.ClickException(str(e))
    if as_json:
        echo_json(metrics)
        return
    click.echo(f"{metrics['model']} on {split} ({metrics['n']} images, data {metrics['fingerprint']})")
    click.echo(evaluation.format_report(metrics))
    if metrics.get("adaptation"):
        click.echo("\n" + adapt_lib.format_side_by_side(metrics["adaptation"]))
    click.echo(f"wrote {len(metrics['files'])} files to {metrics['out_dir']}")


@click.command()
@click.argument("results", nargs=-1, required=True, type=click.Path(exists=True))
@click.option("--chart", "chart_path", type=click.Path(dir_okay=False), help="Also draw a bar chart (PNG) here.")
@click.option("--json", "as_json", is_flag=True, help="Print the table as JSON.")
def compare(results, chart_path, as_json):
    """Side-by-side table of evaluations: one row per RESULTS (metrics.json or an eval dir).

    Columns: F1 per class (normal, non-covid, covid) and accuracy, as in the study.
    """
    from cxrkeras import evaluation

    try:
        table = evaluation.compare(results)
    except evaluation.EvaluationError as e:
        raise click.ClickException(str(e))
    if chart_path:
        from cxrkeras import plots

        plots.comparison_chart(table, chart_path)
    if as_json:
        echo_json(table)
        return
    click.echo(evaluation.format_comparison(table))
    if chart_path:
        click.echo(f"wrote {chart_path}")
