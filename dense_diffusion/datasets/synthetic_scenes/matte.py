"""A foreground layer with an exact soft alpha, composited over a rendered scene (matting, DIS).

Matting benchmarks built from composites (Composition-1k, AM-2k's and P3M's training images)
paste a foreground F with its alpha matte A over a background B: I = A F + (1 - A) B. Here the
foreground is a 2-D object drawn in image coordinates over the rendered room:

- a star-shaped body, radius r(theta) = r0 (1 + sum_k a_k cos(k theta + phi_k)) about a centre
  (k = 2, 3, 4), opaque, with anti-aliased edges;
- fur on part of its outline: strands (thin angular stripes) that fade out over a length that
  varies along the outline, so the alpha falls off smoothly and unevenly (a fuzzy edge);
- sometimes a translucent window (an ellipse inside the body with opacity in (0.25, 0.75)).

The alpha of a pixel is the mean opacity over an S x S grid of points in its square (S =
`SUPERSAMPLE`) wherever an edge, fur or the window's rim comes within `EDGE_MARGIN_PX` of its
centre, and the opacity at its centre elsewhere; the composite is made with exactly that alpha,
so the answer is exact for the image up to the 8-bit rounding of the composite. The binary mask
of the object (the dichotomous task's answer) is alpha >= 0.5.

Random numbers come from the scene's generator after everything else is drawn, so adding the
layer left every other feature of a scene unchanged.
"""
from __future__ import annotations

import colorsys

import numpy as np

SUPERSAMPLE = 5  # samples per pixel along each axis where the alpha is fractional (25 levels).
# Radial distance (pixels) from an edge within which pixels are supersampled. With |a_k| <= 0.12
# (|r'| / r <= 0.12 (2 + 3 + 4) / 0.64) the outline meets a ray at >= 30 degrees, so a radial
# 2 px is >= 1 px from the outline: more than the half diagonal (0.71 px) of a pixel's square.
EDGE_MARGIN_PX = 2.0
MASK_THRESHOLD = 0.5  # alpha at or above which a pixel belongs to the binary mask.
HARMONICS = (2, 3, 4)  # angular frequencies of the outline.
MAX_HARMONIC_AMPLITUDE = 0.12  # |a_k|; keeps the outline star-shaped and the margin safe.


def sample_foreground(rng: np.random.Generator) -> dict:
  """The layer's parameters, in units of the image size (resolution-independent)."""
  hue = rng.uniform()
  # Saturated colours: the object stands out from the rooms' muted albedos (as a salient
  # matting foreground does).
  base = np.array(colorsys.hsv_to_rgb(hue, rng.uniform(0.55, 0.95), rng.uniform(0.65, 1.0)))
  second = np.array(colorsys.hsv_to_rgb((hue + rng.uniform(0.1, 0.4)) % 1.0,
                                        rng.uniform(0.4, 0.9), rng.uniform(0.5, 1.0)))
  return {
      "center": rng.uniform(0.3, 0.7, size=2),  # (x, y) / R
      "radius": rng.uniform(0.14, 0.26),  # r0 / R
      "amplitudes": rng.uniform(-MAX_HARMONIC_AMPLITUDE, MAX_HARMONIC_AMPLITUDE,
                                size=len(HARMONICS)),
      "phases": rng.uniform(0, 2 * np.pi, size=len(HARMONICS)),
      "fur_length": rng.uniform(0.04, 0.12),  # longest fur / R
      "fur_direction": rng.uniform(0, 2 * np.pi),  # where along the outline the fur is longest
      "fur_span": rng.uniform(np.pi / 2, 2 * np.pi),  # angular extent of the fur
      "strands": int(rng.integers(40, 90)),  # strands around the whole outline
      "strand_width": rng.uniform(0.25, 0.6),  # fraction of a strand period that is hair
      "window": bool(rng.uniform() < 0.35),
      "window_opacity": rng.uniform(0.25, 0.75),
      "window_offset": rng.uniform(-0.3, 0.3, size=2),  # centre, in units of r0
      "window_axes": rng.uniform(0.25, 0.45, size=2),  # semi-axes, in units of r0
      "colours": (base, second),
      "stripe_period": rng.uniform(0.05, 0.15),  # / R
      "stripe_angle": rng.uniform(0, np.pi),
      "light": rng.uniform(-0.6, 0.6, size=2),  # shading direction in the image plane
  }


def _outline(fg: dict, theta: np.ndarray) -> np.ndarray:
  """r(theta) / R of the body."""
  shape = np.ones_like(theta)
  for k, a, phi in zip(HARMONICS, fg["amplitudes"], fg["phases"]):
    shape = shape + a * np.cos(k * theta + phi)
  return fg["radius"] * shape


def _fur_length(fg: dict, theta: np.ndarray) -> np.ndarray:
  """Fur length / R along the outline: longest at `fur_direction`, none outside `fur_span`."""
  half = fg["fur_span"] / 2
  c = np.cos(theta - fg["fur_direction"])
  window = np.clip((c - np.cos(half)) / (1 - np.cos(half)), 0.0, 1.0)
  return fg["fur_length"] * np.sqrt(window)


def _polar(fg: dict, x: np.ndarray, y: np.ndarray):
  dx, dy = x - fg["center"][0], y - fg["center"][1]
  return np.hypot(dx, dy), np.arctan2(dy, dx)


def _window_value(fg: dict, x: np.ndarray, y: np.ndarray) -> np.ndarray:
  """Elliptic distance (1 on the rim) from the window's centre."""
  r0 = fg["radius"]
  cx, cy = fg["center"] + fg["window_offset"] * r0
  ax, ay = fg["window_axes"] * r0
  return np.hypot((x - cx) / ax, (y - cy) / ay)


def opacity(fg: dict, x: np.ndarray, y: np.ndarray) -> np.ndarray:
  """The layer's opacity in [0, 1] at image points (x, y) / R."""
  rho, theta = _polar(fg, x, y)
  r = _outline(fg, theta)
  body = rho <= r
  fur = _fur_length(fg, theta)
  t = (rho - r) / np.maximum(fur, 1e-9)
  strand = 0.5 + 0.5 * np.cos(fg["strands"] * theta + 3.0 * t)  # strands curl outwards
  hair = (strand > 1 - fg["strand_width"]) & (t > 0) & (t < 1) & (fur > 0)
  a = np.where(body, 1.0, np.where(hair, np.clip(1 - t, 0.0, 1.0) ** 1.5, 0.0))
  if fg["window"]:
    a = np.where(body & (_window_value(fg, x, y) <= 1.0), fg["window_opacity"], a)
  return a


def _near_edge(fg: dict, x: np.ndarray, y: np.ndarray, resolution: int) -> np.ndarray:
  """Pixels (centres x, y) whose square an edge, the fur or the window's rim may cross."""
  margin = EDGE_MARGIN_PX / resolution
  rho, theta = _polar(fg, x, y)
  r = _outline(fg, theta)
  near = (rho > r - margin) & (rho < r + _fur_length(fg, theta) + margin)
  if fg["window"]:
    # The elliptic distance grows at least 1 / (largest semi-axis) per unit of length.
    spread = margin / (min(fg["window_axes"]) * fg["radius"])
    near |= np.abs(_window_value(fg, x, y) - 1.0) < spread
  return near


def alpha_matte(fg: dict, resolution: int) -> np.ndarray:
  """f32[R, R] in [0, 1]: the layer's mean opacity over each pixel's square."""
  r = resolution
  centres = (np.arange(r) + 0.5) / r
  y, x = np.meshgrid(centres, centres, indexing="ij")
  alpha = opacity(fg, x, y)
  near = _near_edge(fg, x, y, r)
  if near.any():
    offsets = ((np.arange(SUPERSAMPLE) + 0.5) / SUPERSAMPLE - 0.5) / r
    oy, ox = np.meshgrid(offsets, offsets, indexing="ij")
    xs = x[near][:, None] + ox.ravel()[None]
    ys = y[near][:, None] + oy.ravel()[None]
    alpha[near] = opacity(fg, xs, ys).mean(axis=1)
  return alpha.astype(np.float32)


def foreground_colour(fg: dict, resolution: int) -> np.ndarray:
  """f32[R, R, 3] in [0, 1]: the layer's colour (stripes of two colours, shaded like a dome)."""
  r = resolution
  centres = (np.arange(r) + 0.5) / r
  y, x = np.meshgrid(centres, centres, indexing="ij")
  ca, sa = np.cos(fg["stripe_angle"]), np.sin(fg["stripe_angle"])
  stripe = np.floor((ca * x + sa * y) / fg["stripe_period"]).astype(np.int64) % 2
  colour = np.where(stripe[..., None] == 0, fg["colours"][0], fg["colours"][1])
  rho, theta = _polar(fg, x, y)
  # A dome's normal tilts outwards with rho / r: brighter on the side facing the light.
  u = np.clip(rho / _outline(fg, theta), 0.0, 1.0)
  tilt = u * (fg["light"][0] * np.cos(theta) + fg["light"][1] * np.sin(theta))
  shade = np.clip(0.75 + 0.35 * tilt + 0.1 * np.sqrt(1 - u**2), 0.2, 1.0)
  return (colour * shade[..., None]).astype(np.float32)


def composite_layer(rng: np.random.Generator, background: np.ndarray) -> dict:
  """Draws a foreground and composites it over `background` u8[R, R, 3].

  Returns: composite u8[R, R, 3] = round(255 (alpha F + (1 - alpha) B / 255)); alpha f32[R, R]
  in [0, 1]; mask bool[R, R] (alpha >= 0.5); foreground f32[R, R, 3] = F in [0, 1].
  """
  resolution = background.shape[0]
  fg = sample_foreground(rng)
  alpha = alpha_matte(fg, resolution)
  colour = foreground_colour(fg, resolution)
  a = alpha.astype(np.float64)[..., None]
  mixed = a * colour + (1 - a) * background.astype(np.float64) / 255.0
  composite = np.round(np.clip(mixed, 0.0, 1.0) * 255.0).astype(np.uint8)
  return {"composite": composite, "alpha": alpha, "mask": alpha >= MASK_THRESHOLD,
          "foreground": colour}
