"""A new site: `cxrkeras adapt` re-estimates a model's BatchNormalization statistics, `calibrate` its probabilities."""

import click

from cxrkeras.cli.options import echo_json, model_errors, stage_list


@click.command()
@click.argument("model_path", metavar="MODEL", type=click.Path(exists=True))
@click.option("--images", "images_source", required=True, type=click.Path(exists=True),
              help="The new site's images: a folder of any layout (DICOM too), or a CSV with a path column.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="The folder for the adapted model.")
@click.option("--stages", callback=stage_list, metavar="STAGE[,STAGE]",
              help="A cascade's stages to adapt: infected, covid or both [default: every stage].")
@click.option("--overwrite", is_flag=True, help="Replace the model already in OUT (refused without it).")
@click.option("--batch-size", type=click.IntRange(1), default=64, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print adapt.json's record.")
def adapt(model_path, images_source, out_dir, stages, overwrite, batch_size, as_json):
    """Adapt MODEL to a new site's unlabeled X-rays: re-estimate its BatchNormalization statistics (AdaBN).

    MODEL is a classifier, an ensemble or a cascade (.keras file, run or
    cascade folder). Every BatchNormalization layer's moving mean and variance
    become the exact mean and variance of its input over the images, layer by
    layer in order. No label is read: files that do not decode are skipped
    and listed. It needs at least 64 images: one training batch, the number
    of images whose statistics BatchNormalization learned to normalise by
    (fewer give noisier statistics than any it met in training). OUT gets a
    model of the same kind (the source's config.json / cascade.json come
    along) and adapt.json: the images' count and fingerprint, the stages and
    layers changed and how far. The input model is never written to.
    `cxrkeras export OUT --out BASE` then makes BASE's next version.
    """
    from cxrkeras import adapt as adapt_lib

    try:
        record = adapt_lib.adapt(model_path, images_source, out_dir, stages, overwrite, batch_size,
                                 log=lambda message: click.echo(message, err=True))
    except adapt_lib.AdaptError as e:
        raise click.UsageError(str(e))
    except model_errors() as e:
        raise click.ClickException(str(e))
    if as_json:
        echo_json(record)
        return
    shifts = ", ".join(f"{c['classifier']}/{c['layer']} {c['mean_shift']:.2f}" for c in record["layers"][:4])
    more = f", ... ({len(record['layers'])} layers)" if len(record["layers"]) > 4 else ""
    click.echo(f"adapted {', '.join(record['stages'])} to {record['images']} images (fingerprint "
               f"{record['fingerprint']}, {len(record['skipped'])} skipped); mean shifts in old standard "
               f"deviations: {shifts}{more}")
    click.echo(f"wrote {record['model']}")


@click.command()
@click.argument("model_path", metavar="MODEL", type=click.Path(exists=True))
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="The folder for the calibrated model.")
@click.option("--data", "data_path", type=click.Path(exists=True), help="The runs' dataset [default: the one their config names].")
@click.option("--overwrite", is_flag=True, help="Replace the model already in OUT (refused without it).")
@click.option("--batch-size", type=click.IntRange(1), default=64, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print calibration.json's record.")
def calibrate(model_path, out_dir, data_path, overwrite, batch_size, as_json):
    """Calibrate MODEL's probabilities: one temperature per stage, fitted on the holdout.

    MODEL is a binary classifier, an ensemble or a cascade whose runs carved
    a holdout from train (`fit --holdout-fraction`): no epoch was picked there,
    and test is never read. Each stage's probability p becomes
    sigmoid(logit(p) / T), T minimising the holdout's negative log-likelihood;
    a cascade's thresholds move the same way, so every decision stays. The
    temperatures live in the model (predict, export and serve apply them);
    OUT/calibration.json holds them with the ECE and NLL before and after.
    """
    from cxrkeras import calibration

    try:
        record = calibration.calibrate(model_path, out_dir, data_path, overwrite, batch_size,
                                       log=lambda message: click.echo(message, err=True))
    except (calibration.CalibrationError, *model_errors()) as e:
        raise click.ClickException(str(e))
    if as_json:
        echo_json(record)
        return
    temps = ", ".join(f"{k} {v:.3f}" for k, v in record["temperatures"].items())
    click.echo(f"temperatures on the holdout ({record['images']} images): {temps}; ECE {record['ece']['before']:.4f} "
               f"-> {record['ece']['after']:.4f}; decisions changed: {record['decisions_changed']}")
    click.echo(f"wrote {record['model']}")
