"""The shortcut audit: does a model read the lungs, or the marks at the image's border?

X-ray collections from different sources carry source marks (side letters,
text, frames, exposure) near the edges. `shortcut_audit` scores a model on the
whole image, on the centre alone (the border band filled) and on the border
alone (the centre filled), with 0 and with each image's mean grey, beside the majority-class rate a blind model
reaches, and measures the share of Grad-CAM heat that falls in the band. A
border-only score well above the majority rate means the border carries
signal the model uses.
"""

import numpy as np

from cxrkeras import explain
from cxrkeras.config import AUDIT_BAND, IMAGE_SIZE
from cxrkeras.models import cascade as cascade_lib


def band_pixels(band, size, reference=IMAGE_SIZE):
    """`band` pixels of a `reference`-pixel image, scaled to a `size`-pixel one (at least 1, less than half)."""
    if not 0 < band < reference / 2:
        raise ValueError(f"`band` must be in (0, {reference / 2}) pixels of {reference}. Received: band={band!r}")
    return min(max(1, round(band * size / reference)), (size - 1) // 2)


def border_mask(height, width, band):
    """[height, width] bool: True within `band` pixels of any edge."""
    rows, cols = np.arange(height), np.arange(width)
    near_row = (rows < band) | (rows >= height - band)
    near_col = (cols < band) | (cols >= width - band)
    return near_row[:, None] | near_col[None, :]


FILLS = ("zeros", "mean")  # what fills the masked part: black, or each image's own mean grey


def _fill(images, fill):
    if fill not in FILLS:
        raise ValueError(f"Unknown `fill`; expected one of {list(FILLS)}. Received: fill={fill!r}")
    return 0.0 if fill == "zeros" else images.mean(axis=(1, 2, 3), keepdims=True)


def centre_only(images, band, fill="zeros"):
    """`images` [N, H, W, C] with the border band filled (`fill`: 0, or each image's mean)."""
    mask = border_mask(images.shape[1], images.shape[2], band)
    return np.where(mask[None, :, :, None], _fill(images, fill), images).astype(images.dtype)


def border_only(images, band, fill="zeros"):
    """`images` [N, H, W, C] with everything but the border band filled (`fill`: 0, or each image's mean)."""
    mask = border_mask(images.shape[1], images.shape[2], band)
    return np.where(mask[None, :, :, None], images, _fill(images, fill)).astype(images.dtype)


def border_mass(heatmaps, band):
    """Mean over heatmaps [N, H, W] of the share of heat inside the band; None when no map has any heat."""
    heatmaps = np.asarray(heatmaps, dtype="float64")
    mask = border_mask(heatmaps.shape[1], heatmaps.shape[2], band)
    total = heatmaps.sum(axis=(1, 2))
    hot = total > 0
    if not hot.any():
        return None
    return float(np.mean(heatmaps[hot][:, mask].sum(axis=1) / total[hot]))


def shortcut_audit(model, images, labels, band=AUDIT_BAND, batch_size=64, whole=None):
    """{"band_px", "whole", "centre_only", "border_only", "fill", "mean_fill", "majority_rate",
    "gradcam_border_mass"} for `model`.

    `images` [N, H, W, 1] in [0, 1], `labels` the class indices the model's
    decisions are scored against; `band` in pixels of an IMAGE_SIZE image;
    `whole`: the model's decisions on `images` when they are known already.
    The accuracies use the model's own decisions (a cascade's thresholds).
    "centre_only" and "border_only" fill the masked part with 0 ("fill":
    "zeros"); "mean_fill" holds both scores with each image's mean grey there
    instead. What fills it changes the verdict (black is far from any X-ray's
    grey), so a border score is read under both fills.
    Grad-CAM explains each image's decision as the export's `explain` signature does
    (`cxrkeras.explain`); "gradcam_border_mass" is None for a model Grad-CAM can't read.
    """
    images = np.asarray(images, dtype="float32")
    labels = np.asarray(labels, dtype="int64")
    px = band_pixels(band, images.shape[1])

    def decisions(x):
        return cascade_lib.predict(model, x, batch_size)[1]

    whole = decisions(images) if whole is None else np.asarray(whole, dtype="int64")
    return {
        "band": band,
        "band_px": px,
        "whole": float(np.mean(whole == labels)),
        "centre_only": float(np.mean(decisions(centre_only(images, px)) == labels)),
        "border_only": float(np.mean(decisions(border_only(images, px)) == labels)),
        "fill": "zeros",
        "mean_fill": {name: float(np.mean(decisions(mask(images, px, "mean")) == labels))
                      for name, mask in (("centre_only", centre_only), ("border_only", border_only))},
        "majority_rate": float(np.bincount(labels).max() / len(labels)),
        "gradcam_border_mass": _gradcam_border_mass(model, images, whole, px, batch_size),
    }


def _gradcam_border_mass(model, images, class_id, px, batch_size):
    """`border_mass` of the Grad-CAM of each image's decision `class_id`, batch by batch (None: no Grad-CAM)."""
    import keras

    explainers = explain.stage_explainers(model, cascade_lib.model_kind(model))
    if not explainers:
        return None
    heatmaps = []
    for start in range(0, len(images), batch_size):
        batch = keras.ops.convert_to_tensor(images[start:start + batch_size])
        heat = explain.explain_heatmaps(explainers, batch, keras.ops.convert_to_tensor(class_id[start:start + batch_size]))
        heatmaps.append(keras.ops.convert_to_numpy(heat))
    return border_mass(np.concatenate(heatmaps), px)
