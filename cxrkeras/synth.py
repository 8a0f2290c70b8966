"""A small synthetic chest X-ray dataset in the study's layout: the embedded default.

Each image is a dark background with a bright body, two darker lung fields and
rib arcs, plus noise. The classes differ the way the report describes them:
normal lungs are clear; non-covid (bacterial-like) has one dense lobar
consolidation low in one lung; covid has several ground-glass patches at
the periphery of both lungs. The findings are drawn bold (a dense
consolidation of +0.6, patches of +0.4 over the lungs' 0.3): the study's
classifiers then leave the "always infected" plateau within the first few
epochs of the README's quickstart, instead of after ten of twelve.
"""

import os

import numpy as np
from PIL import Image

from cxrkeras.config import IMAGE_SIZE
from cxrkeras.data import CLASS_DIRS

DEFAULT_COUNTS = {"train": 40, "val": 8, "test": 12}


def _blob(yy, xx, cy, cx, ry, rx):
    return np.exp(-(((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2))


def _ellipse(yy, xx, cy, cx, ry, rx, edge=0.08):
    """A soft-edged filled ellipse (1 inside, 0 outside)."""
    d = np.sqrt(((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2)
    return 1 / (1 + np.exp((d - 1) / edge))


def synth_image(label, rng, size=IMAGE_SIZE):
    """One uint8 [size, size] image of class `label` (normal, non-covid or covid)."""
    yy, xx = np.mgrid[0:size, 0:size].astype("float32") / size
    dy, dx = rng.normal(0, 0.02, 2)
    body = _ellipse(yy, xx, 0.6 + dy, 0.5 + dx, 0.6, 0.44, 0.1)
    image = 0.1 + 0.6 * body
    lungs, lung_mask = [], np.zeros_like(image)
    for side in (-1, 1):
        cy, cx = 0.5 + dy + rng.normal(0, 0.01), 0.5 + side * 0.2 + dx
        lung = _ellipse(yy, xx, cy, cx, 0.3, 0.14)
        lungs.append((cy, cx))
        lung_mask += lung
    image -= 0.4 * lung_mask
    for k in range(7):  # ribs: bright arcs over the lungs
        arc = 0.24 + 0.075 * k + 0.6 * (xx - 0.5 - dx) ** 2
        image += 0.1 * np.exp(-(((yy - arc - dy) / 0.012) ** 2)) * lung_mask
    if label == "non-covid":  # one dense lobar consolidation, low in one lung
        cy, cx = lungs[rng.integers(2)]
        spot = _blob(yy, xx, cy + 0.12 + rng.normal(0, 0.03), cx + rng.normal(0, 0.02), 0.13, 0.1)
        image += 0.6 * spot * lung_mask
    elif label == "covid":  # patches at the periphery of both lungs
        for cy, cx in lungs:
            out = np.sign(cx - 0.5)
            for _ in range(3):
                py = cy + rng.uniform(-0.2, 0.2)
                image += 0.4 * _blob(yy, xx, py, cx + out * rng.uniform(0.06, 0.1), 0.08, 0.05) * lung_mask
    image += rng.normal(0, 0.03, image.shape)
    return (np.clip(image, 0, 1) * 255).astype("uint8")


def write_synthetic_dataset(out_dir, counts=None, seed=0, size=IMAGE_SIZE):
    """Write `counts[split]` images per class and split as JPEG; returns the number written.

    `out_dir` must be new or empty (FileExistsError otherwise): synthetic
    images never replace or mix with images already there.
    """
    out_dir = os.fspath(out_dir)
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise FileExistsError(f"{out_dir}: a file; expected a new or empty folder for the synthetic dataset.")
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        raise FileExistsError(
            f"{out_dir}: not empty; the synthetic dataset goes into a new or empty folder "
            f"(it would replace or mix with the files there)."
        )
    counts = counts or DEFAULT_COUNTS
    rng = np.random.default_rng(seed)
    written = 0
    for split, n in counts.items():
        for label, sub in CLASS_DIRS.items():
            folder = os.path.join(out_dir, split, sub)
            os.makedirs(folder, exist_ok=True)
            for i in range(n):
                path = os.path.join(folder, f"{label}-{i:04d}.jpg")
                Image.fromarray(synth_image(label, rng, size), mode="L").save(path, quality=92)
                written += 1
    return written
