"""PSNR / SSIM against scikit-image, RGB and BT.601 Y channel; streaming and bad input."""
import logging

import numpy as np
import pytest
from skimage.metrics import peak_signal_noise_ratio as sk_psnr
from skimage.metrics import structural_similarity as sk_ssim

from dense_diffusion import metrics


def _sk_ssim(a, b, data_range):
  return sk_ssim(a, b, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                 data_range=data_range, channel_axis=-1 if a.ndim == 3 else None)


def _y_reference(rgb, data_range):
  """MATLAB rgb2ycbcr(im2double(x))(:,:,1), written out independently, in 0..1 units."""
  x = rgb.astype(np.float64) / data_range
  return (16.0 + 65.481 * x[..., 0] + 128.553 * x[..., 1] + 24.966 * x[..., 2]) / 255.0


def _pairs(data_range, rng):
  """Random-noise and structured (smooth pattern + edges + noise) image pairs, (2, 40, 52, 3)."""
  h, w = 40, 52
  a = rng.uniform(0, data_range, (h, w, 3))
  b = np.clip(a + rng.normal(0, 0.1 * data_range, a.shape), 0, data_range)
  y, x = np.mgrid[:h, :w]
  s = np.stack([(np.sin(x / 4.0) + 1) / 2, (np.cos(y / 6.0) + 1) / 2, (x > w // 2) * 0.8], -1)
  s = s * data_range
  t = np.clip(0.9 * s + rng.normal(0, 0.03 * data_range, s.shape) + 0.02 * data_range, 0,
              data_range)
  if data_range == 255:  # uint8-like content
    a, b, s, t = (np.round(v) for v in (a, b, s, t))
  return np.stack([a, s]), np.stack([b, t])


@pytest.mark.parametrize("data_range", [1.0, 255.0])
def test_rgb_matches_skimage(data_range):
  pred, gt = _pairs(data_range, np.random.default_rng(0))
  per_psnr = metrics.psnr(pred, gt, data_range, reduce=False)
  per_ssim = metrics.ssim(pred, gt, data_range, reduce=False)
  for i in range(2):
    assert per_psnr[i] == pytest.approx(sk_psnr(gt[i], pred[i], data_range=data_range),
                                        abs=1e-9)
    assert per_ssim[i] == pytest.approx(_sk_ssim(pred[i], gt[i], data_range), abs=2e-6)
  # Single image and batch mean.
  assert metrics.ssim(pred[1], gt[1], data_range) == pytest.approx(per_ssim[1], abs=1e-6)
  assert metrics.psnr(pred, gt, data_range) == pytest.approx(per_psnr.mean(), abs=1e-12)
  assert 0.1 < per_ssim.min() < per_ssim.max() < 0.999  # a non-trivial regime


@pytest.mark.parametrize("data_range", [1.0, 255.0])
def test_y_channel_matches_skimage_on_matlab_luma(data_range):
  pred, gt = _pairs(data_range, np.random.default_rng(1))
  yp, yg = _y_reference(pred, data_range), _y_reference(gt, data_range)
  assert yp.min() >= 16 / 255 - 1e-12 and yp.max() <= 235 / 255 + 1e-12
  got_psnr = metrics.psnr(pred, gt, data_range, y_channel=True, reduce=False)
  got_ssim = metrics.ssim(pred, gt, data_range, y_channel=True, reduce=False)
  for i in range(2):
    # The deraining scripts: psnr on double Y (peak 1), ssim on Y * 255 (L = 255).
    assert got_psnr[i] == pytest.approx(sk_psnr(yg[i], yp[i], data_range=1.0), abs=1e-9)
    assert got_ssim[i] == pytest.approx(_sk_ssim(yp[i] * 255, yg[i] * 255, 255.0), abs=2e-6)
  # Luma differs from RGB: the option really changes what is measured.
  assert abs(got_psnr[0] - metrics.psnr(pred[0], gt[0], data_range)) > 0.1


def test_identical_images():
  img = np.random.default_rng(2).uniform(0, 1, (16, 16, 3))
  assert metrics.ssim(img, img, 1.0) == pytest.approx(1.0, abs=1e-6)
  assert metrics.psnr(img, img, 1.0) == np.inf


def test_streaming_average_and_nonfinite(caplog):
  pred, gt = _pairs(1.0, np.random.default_rng(3))
  acc = metrics.RestorationMetrics(1.0)
  acc.update(pred[0], gt[0])
  bad = pred.copy()
  bad[0, 3, 4, 1] = np.nan
  with caplog.at_level(logging.WARNING, logger="dense_diffusion.metrics"):
    acc.update(bad, gt)  # image 0 skipped, image 1 counted
  assert "non-finite" in caplog.text
  res = acc.result()
  assert res["num_images"] == 2 and res["num_nonfinite"] == 1
  exp_psnr = np.mean([sk_psnr(gt[i], pred[i], data_range=1.0) for i in (0, 1)])
  exp_ssim = np.mean([_sk_ssim(pred[i], gt[i], 1.0) for i in (0, 1)])
  assert res["psnr"] == pytest.approx(exp_psnr, abs=1e-9)
  assert res["ssim"] == pytest.approx(exp_ssim, abs=2e-6)


def test_bad_input():
  img = np.zeros((16, 16, 3))
  with pytest.raises(ValueError, match="shape mismatch"):
    metrics.psnr(img, np.zeros((16, 17, 3)), 1.0)
  with pytest.raises(ValueError, match="3 channels"):
    metrics.ssim(np.zeros((16, 16, 4)), np.zeros((16, 16, 4)), 1.0)
  nan = img.copy()
  nan[0, :5, 0] = np.nan
  with pytest.raises(ValueError, match="5 non-finite"):
    metrics.psnr(nan, img, 1.0)
  with pytest.raises(ValueError, match="5 non-finite"):
    metrics.ssim(nan, img, 1.0, y_channel=True)
  with pytest.raises(ValueError, match="at least 11x11"):
    metrics.ssim(np.zeros((8, 30, 3)), np.zeros((8, 30, 3)), 1.0)
  with pytest.raises(ValueError, match="data_range"):
    metrics.psnr(img, img, 0)
  with pytest.raises(ValueError, match="shape mismatch"):
    metrics.RestorationMetrics().update(img, np.zeros((1, 16, 16, 3)))
