"""Instance segmentation as an RGB image of centre votes.

Every pixel of a thing instance carries its instance's centre of mass (R = x, G = y in [-1, 1],
B = +1); other pixels are (-1, -1, -1). Decoding clusters the centre votes. Ids: 1..n thing
instances, 0 no instance (stuff), -1 unknown (void or crowd regions of a panoptic annotation):
unknown pixels are painted as "no instance" but masked out of the loss.
"""
from __future__ import annotations

import dataclasses

import numpy as np
from scipy import ndimage

from dense_diffusion import metrics
from dense_diffusion.tasks import base
from dense_diffusion.tasks import outputs
from dense_diffusion.tasks import segmentation

UNKNOWN_INSTANCE = -1  # instance id of pixels whose instance is not known (void, crowd).


def centres_of_mass(instance_ids: np.ndarray) -> dict[int, tuple[float, float]]:
  """{instance id: (x, y) in pixels} for every id > 0 of an i32[H, W] map."""
  ids = np.unique(instance_ids)
  ids = ids[ids > 0]
  if ids.size == 0:
    return {}
  centres = ndimage.center_of_mass(np.ones_like(instance_ids, np.float32), instance_ids, ids)
  return {int(i): (float(c[1]), float(c[0])) for i, c in zip(ids, centres)}


@base.register("instance")
@dataclasses.dataclass(frozen=True)
class InstanceTask(base.Task):
  """Thing instances (i32[H, W], 0 = none) as per-pixel centre-of-mass votes."""

  name: str = "instance"
  prompt: str = "Perform instance segmentation"
  vote_smoothing: float = 1.0  # Gaussian sigma (pixels) of the vote histogram before peak picking.
  peak_window: int = 3  # peaks are maxima of the smoothed histogram in this window (pixels).
  radius: float = 8.0  # a pixel joins the nearest peak within this distance (pixels) of its vote.
  peak_dip: float = 0.5  # two peaks within `radius` are one centre unless the smoothed vote
                        # histogram between them dips below this fraction of the weaker one.
  min_votes: int = 4  # peaks with fewer votes within `radius` are dropped.
  centre_tolerance: float = 1.0  # pixels; see `_split_cluster`.
  ambiguity_ratio: float = 0.6  # nearest / second-nearest peak distance above which a vote is
                                # ambiguous; see `_assign_votes`.
  min_area: int = 1  # connected components smaller than this (pixels) are dropped.

  label_key = "instance"
  interpolation = "nearest"
  headline = "pq"
  higher_is_better = True

  def valid_mask(self, instance_ids):
    ids = base.check_map(instance_ids, self.name, "an instance-id map (H, W)")
    return ids != UNKNOWN_INSTANCE

  def evaluator(self):
    return InstanceEvaluator(self)

  def write(self, out, stem, image, ids):
    """`X_instance.png`: 16-bit ids (0 = none); `X_instance_overlay.png`: a colour per id."""
    ids = np.asarray(ids)
    if ids.max(initial=0) > outputs.UINT16_MAX:
      raise ValueError(f"{ids.max()} instances do not fit a 16-bit PNG")
    return [outputs.save_png(out / f"{stem}_instance.png", ids.astype(np.uint16)),
            outputs.save_png(out / f"{stem}_instance_overlay.png",
                             outputs.overlay(image, outputs.id_colours(ids), mask=ids > 0))]

  def _encode(self, instance_ids):
    ids = base.check_map(instance_ids, self.name, "an instance-id map (H, W)")
    if not np.issubdtype(ids.dtype, np.integer):
      raise ValueError(f"instance.encode expects integer ids, got {ids.dtype}")
    if ids.size and ids.min() < UNKNOWN_INSTANCE:
      raise ValueError(f"instance.encode got id {ids.min()}; ids are >= 0, or "
                       f"{UNKNOWN_INSTANCE} where the instance is unknown")
    h, w = ids.shape
    rgb = np.full((h, w, 3), -1.0, np.float32)
    centres = centres_of_mass(ids)
    if not centres:
      return rgb
    lut_x = np.zeros(ids.max() + 1, np.float32)
    lut_y = np.zeros(ids.max() + 1, np.float32)
    for i, (x, y) in centres.items():
      lut_x[i], lut_y[i] = x, y
    fg = ids > 0
    rgb[fg, 0] = _to_unit(lut_x[ids[fg]], w)
    rgb[fg, 1] = _to_unit(lut_y[ids[fg]], h)
    rgb[fg, 2] = 1.0
    return rgb

  def _decode_batch(self, rgb):
    return np.stack([self._decode_one(x) for x in rgb]).astype(np.int32)

  def _decode_one(self, rgb: np.ndarray) -> np.ndarray:
    """f32[H, W, 3] -> i32[H, W] instance ids 1..M (0 = none)."""
    h, w = rgb.shape[:2]
    fg = rgb[..., 2] > 0
    out = np.zeros((h, w), np.int32)
    if not fg.any():
      return out
    vx = _from_unit(rgb[..., 0][fg], w)
    vy = _from_unit(rgb[..., 1][fg], h)
    peaks = self._vote_peaks(vx, vy, h, w)
    if peaks.size == 0:
      return out
    clusters = self._assign_votes(fg, vx, vy, peaks)
    vote_x = np.zeros((h, w), np.float32)
    vote_y = np.zeros((h, w), np.float32)
    vote_x[fg], vote_y[fg] = vx, vy
    next_id = 1
    for c in range(1, len(peaks) + 1):
      for mask in self._split_cluster(clusters == c, vote_x, vote_y):
        out[mask] = next_id
        next_id += 1
    return out

  def _assign_votes(self, fg: np.ndarray, vx: np.ndarray, vy: np.ndarray, peaks: np.ndarray
                    ) -> np.ndarray:
    """Foreground votes -> i32[H, W] cluster index 1..M (0 = background).

    Each vote joins its nearest peak within `radius`. Votes about as close to a second peak
    (distance ratio above `ambiguity_ratio`) follow whichever of the two more of their 8
    neighbours joined; foreground pixels whose vote is near no peak take the cluster of the
    nearest assigned pixel within `radius`. Both only touch pixels that noise made uncertain:
    on clean input every vote sits on its peak.
    """
    h, w = fg.shape
    dist2 = (vx[:, None] - peaks[None, :, 0]) ** 2 + (vy[:, None] - peaks[None, :, 1]) ** 2
    dist2 = np.where(dist2 <= self.radius**2, dist2, np.inf)  # [P_fg, peaks]
    order = np.argsort(dist2, axis=1)[:, :2]
    first = order[:, 0]
    d1 = np.take_along_axis(dist2, order[:, :1], 1)[:, 0]
    clusters = np.zeros((h, w), np.int32)
    clusters[fg] = np.where(np.isfinite(d1), first + 1, 0)
    if len(peaks) > 1:
      second = order[:, 1]
      d2 = np.take_along_axis(dist2, order[:, 1:2], 1)[:, 0]
      ambiguous = np.isfinite(d2) & (np.sqrt(d1) > self.ambiguity_ratio * np.sqrt(d2))
      if ambiguous.any():
        own = np.zeros((h, w), np.int32)
        other = np.full((h, w), -1, np.int32)
        own[fg], other[fg] = clusters[fg], np.where(ambiguous, second + 1, -1)
        switch = (segmentation.neighbour_votes(clusters[None], other[None])[0]
                  > segmentation.neighbour_votes(clusters[None], own[None])[0]) & (other > 0)
        clusters = np.where(switch, other, clusters)
    lost = fg & (clusters == 0)
    if lost.any() and (clusters > 0).any():
      distance, (iy, ix) = ndimage.distance_transform_edt(clusters == 0, return_indices=True)
      joined = clusters[iy, ix]
      # Only votes that missed their peak by less than twice the radius: a tiny object (fewer
      # than `min_votes` pixels, so no peak of its own) is dropped, not glued to a neighbour.
      vote_x = np.zeros((h, w), np.float32)
      vote_y = np.zeros((h, w), np.float32)
      vote_x[fg], vote_y[fg] = vx, vy
      peak = peaks[np.maximum(joined - 1, 0)]
      missed = np.hypot(vote_x - peak[..., 0], vote_y - peak[..., 1])
      near = lost & (distance <= self.radius) & (missed <= 2 * self.radius)
      clusters[near] = joined[near]
    return clusters

  def _split_cluster(self, mask: np.ndarray, vote_x: np.ndarray, vote_y: np.ndarray
                     ) -> list[np.ndarray]:
    """One cluster of votes for (nearly) the same centre -> the masks of its instances.

    The encoding is the centre of mass of the whole instance. A connected component that is a
    whole object has its own centre of mass at its mean vote; a piece of an object that an
    occluder cut has not. So the cluster is split into its components only when every component
    is whole in that sense (e.g. a ring and a disc inside it, or two objects whose nearby centres
    merged into one peak); otherwise it is one instance in several pieces. "At" means
    within `centre_tolerance` pixels. Instances smaller than `min_area` are dropped.
    """
    components, count = ndimage.label(mask)
    if count == 0:
      return []
    instances = [mask]
    if count > 1:
      index = np.arange(1, count + 1)
      centres = np.asarray(ndimage.center_of_mass(mask, components, index)).reshape(-1, 2)
      mean_vx = ndimage.mean(vote_x, components, index)
      mean_vy = ndimage.mean(vote_y, components, index)
      whole = ((centres[:, 1] - mean_vx) ** 2 + (centres[:, 0] - mean_vy) ** 2
               <= self.centre_tolerance**2)
      if whole.all():
        instances = [components == i for i in index]
    return [m for m in instances if m.sum() >= self.min_area]

  def _vote_peaks(self, vx: np.ndarray, vy: np.ndarray, h: int, w: int) -> np.ndarray:
    """Centre votes (pixels) -> f32[M, 2] (x, y) cluster centres.

    Two passes. Sharp centres first: histogram bins holding at least `min_votes` votes and at
    least half of the votes of their 3 x 3 neighbourhood (clean or lightly noisy votes of one object land in
    one bin); they are kept even right next to a bigger object's centre. Then local maxima of
    the smoothed histogram, strongest first: noise smears one centre into several maxima, told
    apart from distinct nearby centres by the histogram between them: a maximum within `radius`
    of a kept one, with no dip below `peak_dip` times its height on the way, is dropped. Maxima
    with fewer than `min_votes` votes within `radius` are dropped too.
    """
    hist = np.zeros((h, w), np.float32)
    np.add.at(hist, (np.clip(np.rint(vy), 0, h - 1).astype(int),
                     np.clip(np.rint(vx), 0, w - 1).astype(int)), 1.0)
    near_mass = ndimage.uniform_filter(hist, 3, mode="constant") * 9.0
    sharp = ((hist >= self.min_votes) & (hist >= 0.5 * near_mass)
             & (hist == ndimage.maximum_filter(hist, 3)))
    sy, sx = np.nonzero(sharp)
    kept_xy: list[np.ndarray] = []
    for i in np.argsort(-hist[sy, sx], kind="stable"):
      xy = np.array([sx[i], sy[i]], np.float32)
      if not any(((k - xy) ** 2).sum() <= 2.0 for k in kept_xy):
        kept_xy.append(xy)

    smooth = ndimage.gaussian_filter(hist, self.vote_smoothing) if self.vote_smoothing else hist
    is_peak = (smooth == ndimage.maximum_filter(smooth, self.peak_window)) & (smooth > 0)
    py, px = np.nonzero(is_peak)
    candidates = np.stack([px, py], -1).astype(np.float32)
    dist2 = (vx[:, None] - px[None]) ** 2 + (vy[:, None] - py[None]) ** 2
    support = (dist2 <= self.radius**2).sum(0)
    steps = np.linspace(0.0, 1.0, 9)[1:-1]
    for i in np.argsort(-smooth[py, px], kind="stable"):
      if support[i] < self.min_votes:
        continue
      near = [k for k in kept_xy if ((k - candidates[i]) ** 2).sum() <= self.radius**2]
      if near:
        # Points along the segment from this maximum to each nearby kept centre: no dip between
        # them means one centre smeared by noise; a dip means two centres.
        near = np.stack(near)
        line = candidates[i][None, None] + steps[None, :, None] * (near[:, None] - candidates[i])
        between = ndimage.map_coordinates(smooth, [line[..., 1].ravel(), line[..., 0].ravel()],
                                          order=1).reshape(len(near), -1)
        if (between.min(axis=1) >= self.peak_dip * smooth[py[i], px[i]]).any():
          continue
      kept_xy.append(candidates[i])
    return np.stack(kept_xy) if kept_xy else np.zeros((0, 2), np.float32)


def _to_unit(coord: np.ndarray, size: int) -> np.ndarray:
  """Pixel coordinate in [0, size-1] -> [-1, 1]."""
  return 2.0 * coord / max(size - 1, 1) - 1.0


def _from_unit(value: np.ndarray, size: int) -> np.ndarray:
  return (value + 1.0) * 0.5 * max(size - 1, 1)


class InstanceEvaluator(base.Evaluator):
  """Class-agnostic PQ of the thing instances; baseline: no instances (PQ 0)."""
  _CATEGORIES = [{"id": 1, "isthing": 1}]

  def __init__(self, task: InstanceTask):
    super().__init__(task)
    self.model = metrics.PanopticQuality(self._CATEGORIES)

  @staticmethod
  def _as_panoptic(ids: np.ndarray):
    ids = np.maximum(ids, 0)  # unknown pixels are void (0) for PQ
    return ids, [{"id": int(i), "category_id": 1, "iscrowd": 0} for i in np.unique(ids) if i > 0]

  def update(self, answers, truths, inputs):
    for pred, gt in zip(answers, truths):
      self.model.update(*self._as_panoptic(gt), *self._as_panoptic(pred))

  def result(self):
    things = self.model.result()["Things"]
    return {"pq": things["pq"], "sq": things["sq"], "rq": things["rq"], "baseline": {"pq": 0.0}}
