"""Every figure cxrkeras draws (matplotlib, Agg backend, PNG files)."""

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def _save(fig, path):
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def bar_chart(counts, title, path):
    """One bar chart of {split: {name: n}}, grouped by split (the study's Figures 1.1.x)."""
    splits = list(counts)
    names = list(next(iter(counts.values())))
    width = 0.8 / len(names)
    fig, ax = plt.subplots(figsize=(6, 4))
    x = np.arange(len(splits))
    for i, name in enumerate(names):
        values = [counts[sp][name] for sp in splits]
        bars = ax.bar(x + i * width, values, width, label=name)
        ax.bar_label(bars, fontsize=8)
    ax.set_xticks(x + width * (len(names) - 1) / 2, splits)
    ax.set_ylabel("images")
    ax.set_title(title)
    ax.legend()
    return _save(fig, path)


def distribution_charts(counts, out_dir):
    """The study's three distribution charts from {split: {class: n}}; returns their paths."""

    two = {sp: {"normal": c["normal"], "infected": c["non-covid"] + c["covid"]} for sp, c in counts.items()}
    inf = {sp: {"non-covid": c["non-covid"], "covid": c["covid"]} for sp, c in counts.items()}
    return [
        bar_chart(counts, "Three classes", os.path.join(out_dir, "distribution_three_class.png")),
        bar_chart(two, "Normal vs infected", os.path.join(out_dir, "distribution_infected.png")),
        bar_chart(inf, "COVID vs non-COVID (infected only)", os.path.join(out_dir, "distribution_covid.png")),
    ]


def augmentation_grid(originals, augmented, labels, path):
    """Each row: an original image, then several augmented draws of it."""
    rows, cols = augmented.shape[0], augmented.shape[1] + 1
    fig, axes = plt.subplots(rows, cols, figsize=(1.8 * cols, 1.9 * rows), squeeze=False)
    for r in range(rows):
        panels = [originals[r]] + list(augmented[r])
        for c, img in enumerate(panels):
            ax = axes[r, c]
            ax.imshow(img[..., 0], cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title("original" if c == 0 else f"augmented {c}", fontsize=8)
        axes[r, 0].set_ylabel(labels[r], fontsize=8)
    return _save(fig, path)

