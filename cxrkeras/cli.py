"""The `cxrkeras` command: thin click commands over the library modules.

Misuse of a command -> click.UsageError (exit 2); a failure at run time ->
click.ClickException (exit 1) with a message naming the thing and what was expected.
"""

import json
import os

import click

from cxrkeras import data as data_lib
from cxrkeras.config import CLASSES


def _dataset_source(path):
    """A folder or a CSV manifest that exists, or a UsageError naming it."""
    if not os.path.exists(path):
        raise click.UsageError(f"{path}: no such folder or manifest.\n{data_lib.EXPECTED_LAYOUT}")
    return path


def _echo_json(obj):
    click.echo(json.dumps(obj, indent=2))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="cxrkeras")
def main():
    """Chest X-ray classification with Keras 3: normal, infected non-COVID, infected COVID.

    The study's cascade of two binary CNNs (normal vs infected, then COVID vs
    non-COVID), as a tool. Start with `cxrkeras data synth DIR` for a small
    synthetic dataset, or point `--data` at a folder in the study's layout.
    """


# ---------------------------------------------------------------- data


@main.group()
def data():
    """Inspect, check, synthesise and preview datasets."""


@data.command()
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--per-class", type=click.IntRange(1), default=40, show_default=True, help="Train images per class.")
@click.option("--seed", type=int, default=0, show_default=True)
def synth(out_dir, per_class, seed):
    """Write a small synthetic dataset in the study's layout to OUT_DIR.

    Train, val and test splits of 150x150 grayscale JPEGs with class-dependent
    structure (clear lungs; one dense consolidation; peripheral patches in
    both lungs) that a CNN learns in a few epochs. Deterministic for a seed.
    """
    from cxrkeras.synth import write_synthetic_dataset

    counts = {"train": per_class, "val": max(1, per_class // 5), "test": max(1, per_class * 3 // 10)}
    n = write_synthetic_dataset(out_dir, counts, seed=seed)
    click.echo(f"wrote {n} images to {out_dir}")


@data.command()
@click.argument("source", callback=lambda c, p, v: _dataset_source(v))
@click.option("--out", "out_dir", type=click.Path(file_okay=False), help="Where the charts go [default: SOURCE/stats or ./stats].")
@click.option("--dedupe", is_flag=True, help="Also count train images after removing byte-identical duplicates.")
@click.option("--json", "as_json", is_flag=True, help="Print the counts as JSON.")
def stats(source, out_dir, dedupe, as_json):
    """Count images per split and class; draw the study's three distribution charts.

    SOURCE is a folder in the study's layout or a CSV manifest (path,label[,split]).
    """
    from cxrkeras import plots

    try:
        samples = data_lib.find_samples(source)
    except data_lib.DatasetError as e:
        raise click.ClickException(str(e))
    counts = data_lib.class_counts(samples)
    if dedupe:
        counts["train-dedup"] = data_lib.class_counts(data_lib.deduplicate([s for s in samples if s.split == "train"]))[
            "train"
        ]
    out_dir = out_dir or "stats"
    os.makedirs(out_dir, exist_ok=True)
    charts = plots.distribution_charts(counts, out_dir)
    if as_json:
        _echo_json({"counts": counts, "charts": charts})
        return
    click.echo(f"{'split':<12}" + "".join(f"{c:>11}" for c in CLASSES) + f"{'total':>9}")
    for split, c in counts.items():
        click.echo(f"{split:<12}" + "".join(f"{c[k]:>11}" for k in CLASSES) + f"{sum(c.values()):>9}")
    click.echo("charts: " + ", ".join(charts))


@data.command()
@click.argument("source", callback=lambda c, p, v: _dataset_source(v))
@click.option("--json", "as_json", is_flag=True, help="Print the problems as JSON.")
def check(source, as_json):
    """List every problem of a dataset; exit 1 when there is any.

    Checks the layout (split and class folders, empty classes) and decodes
    every file: truncated, empty, non-image or wrongly named files are listed
    with the reason. Training skips such files; this command finds them first.
    """
    good, problems = data_lib.check_dataset(source)
    if as_json:
        _echo_json({"images": len(good), "problems": [{"path": p.path, "reason": p.reason} for p in problems]})
    else:
        for p in problems:
            click.echo(str(p))
        click.echo(f"{len(good)} images decode; {len(problems)} problem(s).")
    if problems:
        raise SystemExit(1)


@data.command()
@click.argument("source", callback=lambda c, p, v: _dataset_source(v))
@click.option("--out", "out_path", default="augmentation_preview.png", show_default=True, type=click.Path(dir_okay=False))
@click.option("--images", "n_images", type=click.IntRange(1, 12), default=4, show_default=True)
@click.option("--draws", type=click.IntRange(1, 8), default=4, show_default=True, help="Augmented versions per image.")
@click.option("--seed", type=int, default=0, show_default=True)
def preview(source, out_path, n_images, draws, seed):
    """Draw train images beside augmented versions of them (PNG), to see what augmentation does."""
    import numpy as np

    from cxrkeras import plots
    from cxrkeras.augment import study_augmentation

    try:
        good, _ = data_lib.check_samples(data_lib.find_samples(source))
    except data_lib.DatasetError as e:
        raise click.ClickException(str(e))
    train = [s for s in good if s.split == "train"]
    picks = np.random.default_rng(seed).choice(len(train), size=min(n_images, len(train)), replace=False)
    chosen = [train[i] for i in sorted(picks)]
    originals = data_lib.load_images([s.path for s in chosen])
    augmenter = study_augmentation(seed=seed)
    augmented = np.stack([np.asarray(augmenter(originals, training=True)) for _ in range(draws)], axis=1)
    plots.augmentation_grid(originals, augmented, [s.label for s in chosen], out_path)
    click.echo(f"wrote {out_path}")


if __name__ == "__main__":
    main()
