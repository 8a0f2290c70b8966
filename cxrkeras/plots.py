"""Every figure cxrkeras draws (matplotlib, Agg backend, PNG files)."""

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from cxrkeras.files import write_atomic  # noqa: E402


def _save(fig, path, tight=True):
    """Write `fig` as a PNG at `path` through a temporary name (a reader never sees half a figure)."""
    try:
        if tight:
            fig.tight_layout()
        write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    finally:
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



def training_curves(history, path, best_epoch=None, title=None):
    """Train and validation loss and accuracy per epoch, side by side (the study's training figures).

    `history` maps columns of history.csv (`loss`, `val_loss`, `accuracy`,
    `val_accuracy`, ...) to per-epoch values; `best_epoch` (1-based) gets a marker line.
    """
    epochs = np.arange(1, len(history.get("loss", [])) + 1)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), squeeze=False)
    for ax, metric in zip(axes[0], ("loss", "accuracy")):
        for key, label in ((metric, "train"), (f"val_{metric}", "validation")):
            values = history.get(key)
            if values:
                ax.plot(epochs[: len(values)], values, marker="o", markersize=3, label=label)
        if best_epoch:
            ax.axvline(best_epoch, color="gray", linestyle="--", linewidth=1, label=f"kept (epoch {best_epoch})")
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.set_ylabel(metric)
        ax.set_title(f"{title}: {metric}" if title else metric)
        ax.grid(alpha=0.3)
        ax.legend()
    return _save(fig, path)


def threshold_tradeoff(selection, path):
    """The cascade's operating point: false negatives vs false positives of one class over a grid of
    (infected, covid) thresholds, and recall / accuracy along the class's own threshold (from `choose_thresholds`)."""
    from cxrkeras.config import DECISION_THRESHOLD

    table, name, chosen = selection["table"], selection["class"], selection["chosen"]
    fn = np.array([r["fn"] for r in table])
    fp = np.array([r["fp"] for r in table])
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.scatter(fp, fn, s=10, color="0.7", label="threshold pairs")
    frontier = sorted({(int(b), int(min(fn[fp == b]))) for b in np.unique(fp)})
    best = [pt for i, pt in enumerate(frontier) if all(pt[1] < q[1] for q in frontier[:i])]
    left.step([p[0] for p in best], [p[1] for p in best], where="post", color="C0", label="best trade-off")
    default = selection["default"]
    left.scatter([default["fp"]], [default["fn"]], s=60, color="C1", marker="o", label=f"{DECISION_THRESHOLD:g} / {DECISION_THRESHOLD:g}", zorder=3)
    left.scatter([chosen["fp"]], [chosen["fn"]], s=120, color="C3", marker="*", zorder=4,
                 label=f"chosen {chosen['infected']:.2f} / {chosen['covid']:.2f}")
    left.set_xlabel(f"{name} false positives")
    left.set_ylabel(f"{name} false negatives")
    left.set_title(f"{name}: false negatives vs false positives")
    left.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    left.yaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    left.grid(alpha=0.3)
    left.legend(fontsize=8)
    key, fixed = ("infected", "covid") if name == "normal" else ("covid", "infected")
    line = sorted((r for r in table if r[fixed] == chosen[fixed]), key=lambda r: r[key])
    t = [r[key] for r in line]
    right.plot(t, [r["recall"] for r in line], marker=".", label=f"{name} recall")
    right.plot(t, [r["accuracy"] for r in line], marker=".", label="accuracy")
    right.axhline(selection["target_recall"], color="C3", linestyle="--", linewidth=1, label="target recall")
    right.axvline(chosen[key], color="0.5", linestyle=":", linewidth=1)
    right.set_xlabel(f"{key} threshold ({fixed} threshold {chosen[fixed]:.2f})")
    right.set_ylim(0, 1.02)
    right.set_title("recall and accuracy (validation)")
    right.grid(alpha=0.3)
    right.legend(fontsize=8)
    return _save(fig, path)


# ---------------------------------------------------------------- evaluation figures (cxrkeras evaluate / compare)


def _no_ticks(ax):
    ax.set_xticks([])
    ax.set_yticks([])


def confusion_matrix_figure(confusion, class_names, path, title=None):
    """Counts and row-normalised rates side by side (the study's Figure 2.8.1); rows are true classes."""
    confusion = np.asarray(confusion)
    rows = confusion.sum(axis=1, keepdims=True)
    rates = np.divide(confusion, rows, out=np.zeros(confusion.shape), where=rows > 0)
    k = len(class_names)
    fig, axes = plt.subplots(1, 2, figsize=(5.2 + 1.4 * k, 2.4 + 0.7 * k))
    for ax, values, fmt, name in ((axes[0], confusion, "{:d}", "counts"), (axes[1], rates, "{:.2f}", "row-normalised")):
        scale = rates  # colour by rate in both panels, so large classes don't wash out small ones
        ax.imshow(scale, cmap="Blues", vmin=0, vmax=1)
        for i in range(k):
            for j in range(k):
                ax.text(j, i, fmt.format(values[i, j]), ha="center", va="center", fontsize=10,
                        color="white" if scale[i, j] > 0.6 else "black")
        ax.set_xticks(range(k), class_names)
        ax.set_yticks(range(k), class_names)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(name)
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def _curve_figure(curves, path, title, xlabel, ylabel, score_name, diagonal):
    fig, ax = plt.subplots(figsize=(5.2, 4.6))
    for name, (x, y, score) in curves.items():
        ax.plot(x, y, label=f"{name} ({score_name} {score:.3f})")
    if diagonal:
        ax.plot([0, 1], [0, 1], color="gray", linestyle="--", linewidth=1)
    if not curves:
        ax.text(0.5, 0.5, "no class has both positives and negatives", ha="center", va="center")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    if curves:
        ax.legend(loc="lower right" if diagonal else "lower left", fontsize=8)
    return _save(fig, path)


def roc_figure(curves, path, title="ROC, one-vs-rest"):
    """ROC curve per class from {class: (fpr, tpr, auc)}."""
    return _curve_figure(curves, path, title, "false positive rate", "true positive rate", "AUC", True)


def pr_figure(curves, path, title="Precision-recall, one-vs-rest"):
    """Precision-recall curve per class from {class: (recall, precision, average precision)}."""
    return _curve_figure(curves, path, title, "recall", "precision", "AP", False)


def reliability_figure(bins, ece, path, title=None):
    """Reliability diagram: accuracy per max-probability bin against the diagonal, with bin counts and ECE.

    `bins` is `cxrkeras.metrics.reliability_bins` output (edges, confidence, accuracy, count).
    """
    edges, count = np.asarray(bins["edges"]), np.asarray(bins["count"])
    accuracy = np.nan_to_num(np.asarray(bins["accuracy"], dtype="float64"))
    confidence = np.asarray(bins["confidence"], dtype="float64")
    width = np.diff(edges)
    fig, (ax, ax_n) = plt.subplots(2, 1, figsize=(5.2, 5.6), height_ratios=[3, 1], sharex=True)
    used = count > 0
    ax.bar(edges[:-1][used], accuracy[used], width[used], align="edge", edgecolor="black", label="accuracy")
    gap_bottom = np.minimum(accuracy, np.nan_to_num(confidence))[used]
    gap = np.abs(np.nan_to_num(confidence) - accuracy)[used]
    ax.bar(edges[:-1][used], gap, width[used], bottom=gap_bottom, align="edge", color="red", alpha=0.3,
           edgecolor="red", label="|accuracy - confidence|")
    ax.plot([0, 1], [0, 1], color="gray", linestyle="--", linewidth=1, label="perfect calibration")
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.set_title(f"{title + ': ' if title else ''}ECE {ece:.4f} ({len(count)} bins)", fontsize=9)
    ax.legend(loc="upper left", fontsize=8)
    ax_n.bar(edges[:-1], count, width, align="edge", color="gray", edgecolor="black")
    ax_n.set_xlim(0, 1)
    ax_n.set_xlabel("confidence (max probability)")
    ax_n.set_ylabel("images")
    return _save(fig, path)


def prediction_grid(images, true_names, pred_names, confidences, path, title):
    """Up to 25 images in a 5-column grid, true and predicted labels (green correct, red wrong): Figure 2.8.2."""
    n = len(images)
    cols = min(5, max(n, 1))
    rows = max(1, -(-n // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 2.5 * rows + 0.4), squeeze=False)
    for i, ax in enumerate(axes.flat):
        _no_ticks(ax)
        if i >= n:
            ax.axis("off")
            continue
        ax.imshow(images[i][..., 0], cmap="gray", vmin=0, vmax=1)
        ok = true_names[i] == pred_names[i]
        color = "green" if ok else "red"
        ax.set_title(f"true: {true_names[i]}\npred: {pred_names[i]} ({confidences[i]:.2f})", fontsize=8, color=color)
        for spine in ax.spines.values():
            spine.set_edgecolor(color)
            spine.set_linewidth(3)
    fig.suptitle(title, fontsize=11)
    return _save(fig, path)


def feature_map_figure(image, maps, path, title=None, channels=16):
    """The input image, then one row per layer with its first `channels` channels (the study's Figures 3.4.x)."""
    layers = list(maps)
    cols = max(1, min(channels, max((m.shape[-1] for m in maps.values()), default=1)))
    fig = plt.figure(figsize=(1.1 * cols + 2.6, 1.25 * max(len(layers), 2) + 0.5))
    left, right = fig.subfigures(1, 2, width_ratios=[2.4, 1.1 * cols])
    ax = left.subplots()
    ax.imshow(image[..., 0], cmap="gray", vmin=0, vmax=1)
    ax.set_title("input", fontsize=9)
    _no_ticks(ax)
    axes = right.subplots(len(layers), cols, squeeze=False)
    for r, name in enumerate(layers):
        fmap = maps[name]
        for c in range(cols):
            ax = axes[r, c]
            _no_ticks(ax)
            if c >= fmap.shape[-1]:
                ax.axis("off")
                continue
            ax.imshow(fmap[..., c], cmap="viridis")
        axes[r, 0].set_ylabel(f"{name}\n{fmap.shape[0]}x{fmap.shape[1]}x{fmap.shape[-1]}", fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path, tight=False)


def gradcam_figure(image, heatmap, path, title=""):
    """The image, the Grad-CAM heatmap, and the heatmap over the image."""
    fig, axes = plt.subplots(1, 3, figsize=(9, 3.5))
    axes[0].imshow(image[..., 0], cmap="gray", vmin=0, vmax=1)
    axes[0].set_title("image", fontsize=9)
    shown = axes[1].imshow(heatmap, cmap="jet", vmin=0, vmax=1)
    axes[1].set_title("Grad-CAM", fontsize=9)
    fig.colorbar(shown, ax=axes[1], fraction=0.046, pad=0.04)
    axes[2].imshow(image[..., 0], cmap="gray", vmin=0, vmax=1)
    axes[2].imshow(heatmap, cmap="jet", vmin=0, vmax=1, alpha=0.4)
    axes[2].set_title("overlay", fontsize=9)
    for ax in axes:
        _no_ticks(ax)
    fig.suptitle(title, fontsize=9)
    return _save(fig, path)


def comparison_chart(table, path):
    """Grouped bars: one group per column (F1 per class, accuracy), one bar per model (`compare` output)."""
    columns, rows = table["columns"], table["rows"]
    width = 0.8 / max(len(rows), 1)
    x = np.arange(len(columns))
    fig, ax = plt.subplots(figsize=(1.6 * len(columns) + 3, 4.2))
    for i, row in enumerate(rows):
        values = [row["values"].get(c, np.nan) for c in columns]
        bars = ax.bar(x + i * width, values, width, label=row["name"])
        ax.bar_label(bars, fmt="%.3f", fontsize=7)
    ax.set_xticks(x + width * (len(rows) - 1) / 2, columns)
    ax.set_ylim(0, 1.08)
    ax.set_ylabel("score")
    ax.set_title("F1 per class and accuracy")
    ax.legend(fontsize=8, loc="lower right")
    return _save(fig, path)


def study_curves(curves, path, title=None):
    """A tuning study's figure (the study's Figures 1.2.x, 2.x): train and validation loss and accuracy
    per epoch, one line per value (or trial) in every panel.

    `curves` is [(label, history)], each history mapping history.csv's columns to per-epoch values.
    """
    fig, axes = plt.subplots(2, 2, figsize=(11, 8), squeeze=False)
    panels = [("loss", "train loss"), ("val_loss", "validation loss"),
              ("accuracy", "train accuracy"), ("val_accuracy", "validation accuracy")]
    for ax, (key, name) in zip(axes.flat, panels):
        for label, history in curves:
            values = history.get(key) or []
            ax.plot(np.arange(1, len(values) + 1), values, marker="o", markersize=3, label=label)
        losses = [v for _, h in curves for v in (h.get(key) or []) if key.endswith("loss") and v > 0]
        if losses and max(losses) > 100 * min(losses):  # a diverging value would flatten the others
            ax.set_yscale("log")
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.set_title(name)
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    return _save(fig, path)
