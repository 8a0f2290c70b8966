"""`cxrkeras data`: inspect, check, synthesise and preview datasets."""

import os

import click

from cxrkeras.cli.options import dataset_source, echo_json, with_facts
from cxrkeras.cli.process import Group
from cxrkeras.config import CLASSES


@click.group(cls=Group)
def data():
    """Inspect, check, synthesise and preview datasets."""


@with_facts
@data.command()
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--per-class", type=click.IntRange(1), default=40, show_default=True, help="Train images per class.")
@click.option("--seed", type=int, default=0, show_default=True)
def synth(out_dir, per_class, seed):
    """Write a small synthetic dataset in the study's layout to OUT_DIR (a new or empty folder).

    Train, val and test splits of {IMAGE_SIZE}x{IMAGE_SIZE} grayscale JPEGs with class-dependent
    structure (clear lungs; one dense consolidation; peripheral patches in
    both lungs) that a CNN learns in a few epochs. Deterministic for a seed.
    """
    from cxrkeras.synth import write_synthetic_dataset

    counts = {"train": per_class, "val": max(1, per_class // 5), "test": max(1, per_class * 3 // 10)}
    try:
        n = write_synthetic_dataset(out_dir, counts, seed=seed)
    except FileExistsError as e:
        raise click.UsageError(str(e))
    click.echo(f"wrote {n} images to {out_dir}")


def _readable_samples(source):
    """(samples training can read, problems) of SOURCE, or a ClickException for an unusable layout."""
    from cxrkeras import data as data_lib

    try:
        return data_lib.check_samples(data_lib.find_samples(source))
    except data_lib.DatasetError as e:
        raise click.ClickException(str(e))


@data.command()
@click.argument("source", callback=lambda c, p, v: dataset_source(v))
@click.option("--out", "out_dir", type=click.Path(file_okay=False), help="Where the charts go [default: SOURCE/stats or ./stats].")
@click.option("--dedupe", is_flag=True, help="Also count train images after removing byte-identical duplicates.")
@click.option("--json", "as_json", is_flag=True, help="Print the counts as JSON.")
def stats(source, out_dir, dedupe, as_json):
    """Count images per split and class; draw the study's three distribution charts.

    SOURCE is a folder in the study's layout or a CSV manifest (path,label[,split]).
    Only files that training can read are counted; the others are counted
    apart (`cxrkeras data check` lists them).
    """
    from cxrkeras import data as data_lib
    from cxrkeras import plots

    samples, problems = _readable_samples(source)
    counts = data_lib.class_counts(samples)
    if dedupe:
        train = data_lib.deduplicate([s for s in samples if s.split == "train"])
        counts["train-dedup"] = data_lib.class_counts(train)["train"]
    out_dir = out_dir or "stats"
    os.makedirs(out_dir, exist_ok=True)
    charts = plots.distribution_charts(counts, out_dir)
    if as_json:
        echo_json({"counts": counts, "not_images": len(problems), "charts": charts})
        return
    click.echo(f"{'split':<12}" + "".join(f"{c:>11}" for c in CLASSES) + f"{'total':>9}")
    for split, c in counts.items():
        click.echo(f"{split:<12}" + "".join(f"{c[k]:>11}" for k in CLASSES) + f"{sum(c.values()):>9}")
    if problems:
        click.echo(f"not counted: {len(problems)} file(s) that are not readable images (see `cxrkeras data check`)")
    click.echo("charts: " + ", ".join(charts))


@data.command()
@click.argument("source", callback=lambda c, p, v: dataset_source(v))
@click.option("--json", "as_json", is_flag=True, help="Print the problems as JSON.")
def check(source, as_json):
    """List every problem of a dataset; exit 1 when there is any.

    Checks the layout (split and class folders, empty classes) and reads every
    file the way training does: JPEG, PNG, BMP or GIF judged by content, the
    size its header declares against --max-pixels, then TensorFlow's decoder.
    Folders, empty, non-image, truncated or corrupt files and file names that
    are not UTF-8 are listed with the reason; training skips them. Verdicts
    are cached by path, size and modification time, so a second check is quick.
    """
    from cxrkeras import data as data_lib

    good, problems = data_lib.check_dataset(source)
    if as_json:
        listed = [{"path": data_lib.printable(p.path), "reason": p.reason} for p in problems]
        echo_json({"images": len(good), "problems": listed})
    else:
        for p in problems:
            click.echo(str(p))
        click.echo(f"{len(good)} images decode; {len(problems)} problem(s).")
    if problems:
        raise SystemExit(1)


@data.command()
@click.argument("source", callback=lambda c, p, v: dataset_source(v))
@click.option("--out", "out_path", default="augmentation_preview.png", show_default=True, type=click.Path(dir_okay=False))
@click.option("--images", "n_images", type=click.IntRange(1, 12), default=4, show_default=True)
@click.option("--draws", type=click.IntRange(1, 8), default=4, show_default=True, help="Augmented versions per image.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--augmentation", "kind", type=click.Choice(["study", "strong"]), default="study", show_default=True,
              help="Which stack (a config's data.augmentation).")
@click.option("--border-erase", type=click.FloatRange(0, 0.5, max_open=True), default=0.0, show_default=True,
              help="Also erase bands up to this fraction of the side at random edges (data.border_erase).")
def preview(source, out_path, n_images, draws, seed, kind, border_erase):
    """Draw train images beside augmented versions of them (PNG), to see what augmentation does."""
    from cxrkeras.augment import preview_figure

    good, _ = _readable_samples(source)
    train = [s for s in good if s.split == "train"]
    if not train:
        raise click.ClickException(f"{source}: no readable train images to preview.")
    preview_figure(train, out_path, n_images, draws, seed, kind, border_erase)
    click.echo(f"wrote {out_path}")

