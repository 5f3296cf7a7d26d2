"""PSNR / SSIM against scikit-image, RGB and BT.601 Y channel, the deraining script's 8-bit Y;
streaming and bad input."""
import logging

import numpy as np
import pytest
from skimage.color import rgb2ycbcr
from skimage.metrics import peak_signal_noise_ratio as sk_psnr
from skimage.metrics import structural_similarity as sk_ssim
from skimage.util import img_as_ubyte

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


def _matlab_uint8_y(rgb_u8):
  """MATLAB rgb2ycbcr on a uint8 image, channel 1: the luma computed in double (here by
  scikit-image's rgb2ycbcr, which gives the same unrounded Y in [16, 235]) then rounded by
  imlincomb to uint8 (round half away from zero)."""
  y = rgb2ycbcr(rgb_u8)[..., 0]
  return np.floor(y + 0.5).astype(np.uint8)


def test_rain100_y_channel_as_the_matlab_script():
  """Restormer / MPRNet Deraining/evaluate_PSNR_SSIM.m on the PNGs the test script writes."""
  rng = np.random.default_rng(4)
  pred, gt = _pairs(1.0, rng)
  pred = pred + rng.normal(0, 0.02, pred.shape)  # a float network output, a little outside [0, 1]
  gt_u8 = img_as_ubyte(gt)                        # the dataset's 8-bit ground truth
  pred_u8 = img_as_ubyte(np.clip(pred, 0, 1))     # test.py: img_as_ubyte(clamp(restored, 0, 1))
  for data_range, p, g in ((1.0, pred, gt_u8 / 255.0), (255.0, pred * 255.0, gt_u8)):
    got_psnr = metrics.psnr(p, g, data_range, y_channel=True, as_uint8=True, reduce=False)
    got_ssim = metrics.ssim(p, g, data_range, y_channel=True, as_uint8=True, reduce=False)
    for i in range(2):
      y1 = _matlab_uint8_y(pred_u8[i]).astype(np.float64)
      y2 = _matlab_uint8_y(gt_u8[i]).astype(np.float64)
      rmse = np.sqrt(np.mean((y1 - y2) ** 2))
      assert got_psnr[i] == pytest.approx(20 * np.log10(255 / rmse), abs=1e-9)
      assert got_ssim[i] == pytest.approx(_sk_ssim(y1, y2, 255.0), abs=2e-6)  # SSIM_index, L=255
  # The rounding is a measurable part of the protocol (more so the higher the PSNR).
  unrounded = metrics.psnr(pred, gt_u8 / 255.0, 1.0, y_channel=True, reduce=False)
  assert abs(unrounded[1] - got_psnr[1]) > 0.05
  # The named protocol and the accumulator do the same.
  acc = metrics.restoration_protocol("rain100").accumulator(1.0)
  acc.update(pred, gt_u8 / 255.0)
  assert acc.result()["psnr"] == pytest.approx(got_psnr.mean(), abs=1e-9)


def test_as_uint8_rgb_and_quantize():
  rng = np.random.default_rng(5)
  pred, gt = _pairs(1.0, rng)
  got = metrics.psnr(pred, gt, 1.0, as_uint8=True, reduce=False)
  for i in range(2):
    expected = sk_psnr(img_as_ubyte(gt[i]), img_as_ubyte(pred[i]), data_range=255)
    assert got[i] == pytest.approx(expected, abs=1e-9)
  q = metrics.quantize_uint8(np.array([-0.1, 0.0, 0.5, 1.0 / 255 * 2.5, 1.2, np.nan, np.inf]), 1.0)
  np.testing.assert_array_equal(q[:5], [0, 0, 128, 2, 255])  # rint: 127.5 -> 128, 2.5 -> 2
  assert np.isnan(q[5]) and np.isinf(q[6])
  nan = pred.copy()
  nan[0, :3, 0, 0] = np.nan
  with pytest.raises(ValueError, match="3 non-finite"):
    metrics.psnr(nan, gt, 1.0, y_channel=True, as_uint8=True)
  assert metrics.restoration_protocol("sidd").options == {"y_channel": False, "as_uint8": False}
  assert metrics.restoration_protocol("lol").options == {"y_channel": False, "as_uint8": False}
  with pytest.raises(KeyError, match="known restoration protocols: lol, rain100, sidd"):
    metrics.restoration_protocol("rain100h")
