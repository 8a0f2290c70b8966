"""The shortcut audit: border-only and centre-only scores, the majority rate, Grad-CAM heat in the band."""

import numpy as np
import pytest
from tiny_models import tiny

from cxrkeras import audit
from cxrkeras.models import build_cascade
from cxrkeras.models.cascade import predict


def marked_images(n=12, size=150, seed=0):
    """Noise images in [0.3, 0.5]; the odd ones carry a bright 8 x 8 marker in the top-right corner."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(0.3, 0.5, (n, size, size, 1)).astype("float32")
    labels = np.arange(n) % 2
    x[labels == 1, 2:10, -10:-2] = 1.0
    return x, labels


def test_the_band_scales_with_the_image_and_is_checked():
    assert audit.band_pixels(22, 150) == 22 and audit.band_pixels(22, 300) == 44 and audit.band_pixels(22, 32) == 5
    with pytest.raises(ValueError, match="band=75"):
        audit.band_pixels(75, 150)
    mask = audit.border_mask(10, 8, 2)
    assert mask.sum() == 10 * 8 - 6 * 4 and not mask[2:8, 2:6].any()


def test_masks_keep_what_they_say():
    x, _ = marked_images(2)
    centre, border = audit.centre_only(x, 22), audit.border_only(x, 22)
    assert np.array_equal(centre + border, x)
    assert centre[:, :22].max() == 0 and np.array_equal(centre[:, 22:-22, 22:-22], x[:, 22:-22, 22:-22])
    assert border[:, 22:-22, 22:-22].max() == 0 and np.array_equal(border[:, :22], x[:, :22])
    mean = x.mean(axis=(1, 2, 3))
    centre, border = audit.centre_only(x, 22, fill="mean"), audit.border_only(x, 22, fill="mean")
    for i in range(len(x)):  # the filled part is the image's own mean grey; the kept part untouched
        np.testing.assert_allclose(centre[i, :22], mean[i], rtol=1e-6)
        np.testing.assert_allclose(border[i, 22:-22, 22:-22], mean[i], rtol=1e-6)
    assert np.array_equal(centre[:, 22:-22, 22:-22], x[:, 22:-22, 22:-22]) and np.array_equal(border[:, :22], x[:, :22])
    with pytest.raises(ValueError, match="fill='grey'"):
        audit.centre_only(x, 22, fill="grey")


def test_border_only_score_equals_masking_by_hand():
    x, labels3 = marked_images()
    labels3 = np.where(labels3 == 1, 2, labels3)  # marked images are covid, the others normal
    cascade = build_cascade(tiny("infected"), tiny("covid"))
    result = audit.shortcut_audit(cascade, x, labels3, band=22, batch_size=5)

    by_hand = x.copy()
    by_hand[:, 22:-22, 22:-22] = 0
    assert result["border_only"] == pytest.approx(np.mean(predict(cascade, by_hand)[1] == labels3))
    by_hand = x.copy()
    by_hand[:, :22], by_hand[:, -22:], by_hand[:, :, :22], by_hand[:, :, -22:] = 0, 0, 0, 0
    assert result["centre_only"] == pytest.approx(np.mean(predict(cascade, by_hand)[1] == labels3))
    assert result["whole"] == pytest.approx(np.mean(predict(cascade, x)[1] == labels3))
    assert result["majority_rate"] == 0.5 and result["band_px"] == 22
    # the second fill: each image's own mean grey where the part is masked
    mean = x.mean(axis=(1, 2, 3), keepdims=True)
    by_hand = np.broadcast_to(mean, x.shape).copy()
    by_hand[:, :22], by_hand[:, -22:], by_hand[:, :, :22], by_hand[:, :, -22:] = (
        x[:, :22], x[:, -22:], x[:, :, :22], x[:, :, -22:])  # the border kept, the centre the image's mean
    assert result["fill"] == "zeros"
    assert result["mean_fill"]["border_only"] == pytest.approx(np.mean(predict(cascade, by_hand)[1] == labels3))
    by_hand = np.where(audit.border_mask(*x.shape[1:3], 22)[None, :, :, None], mean, x)
    assert result["mean_fill"]["centre_only"] == pytest.approx(np.mean(predict(cascade, by_hand)[1] == labels3))
    assert 0 <= result["gradcam_border_mass"] <= 1


def test_border_mass_is_the_mean_share_of_heat_in_the_band():
    heat = np.zeros((3, 10, 10))
    heat[0, 0, 0] = 1.0  # all in the band
    heat[1, 5, 5] = 1.0  # none in it
    heat[2] = 1.0  # 64 of 100 pixels in a band of 2
    assert audit.border_mass(heat, 2) == pytest.approx((1 + 0 + 0.64) / 3)
    assert audit.border_mass(np.zeros((2, 10, 10)), 2) is None
