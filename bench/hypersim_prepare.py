"""Cost of preparing Hypersim: CPU seconds and stored bytes per 768 x 1024 frame of our builder.

    python bench/hypersim_prepare.py --frames 12

Writes `--frames` synthetic frames in Hypersim's layout (smooth HDR colour, depth, normals,
NYU40, reflectance, illumination as float16 HDF5) to a temporary folder and prepares
`hypersim/depth` and `hypersim/all` from them, printing CPU seconds per frame (this process:
tone map, planar depth, PNG and zlib encoding, HDF5 reads from the page cache) and wall seconds.
Real renders compress worse than these smooth frames, so the stored size is a lower bound.
"""
from __future__ import annotations

import argparse
import pathlib
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

HEIGHT, WIDTH = 768, 1024


def _h5(path, array):
  import h5py  # pylint: disable=g-import-not-at-top
  path.parent.mkdir(parents=True, exist_ok=True)
  with h5py.File(path, "w") as f:
    f.create_dataset("dataset", data=array)


def write_frames(root: pathlib.Path, count: int) -> None:
  rng = np.random.default_rng(0)
  yy, xx = np.mgrid[:HEIGHT, :WIDTH] / WIDTH
  images = root / "ai_001_001" / "images"
  for k in range(count):
    smooth = (np.sin(8 * xx + k) * np.cos(5 * yy) + 1.5)[..., None]
    final, geometry = images / "scene_cam_00_final_hdf5", images / "scene_cam_00_geometry_hdf5"
    stem = f"frame.{k:04d}"
    _h5(final / f"{stem}.color.hdf5",
        (smooth * rng.uniform(0.5, 1, (1, 1, 3))).astype(np.float16))
    _h5(final / f"{stem}.diffuse_reflectance.hdf5",
        np.clip(smooth / 3, 0, 1).repeat(3, -1).astype(np.float16))
    _h5(final / f"{stem}.diffuse_illumination.hdf5",
        (smooth * 1.2).repeat(3, -1).astype(np.float16))
    _h5(geometry / f"{stem}.depth_meters.hdf5", (2 + 3 * smooth[..., 0]).astype(np.float16))
    _h5(geometry / f"{stem}.render_entity_id.hdf5", np.ones((HEIGHT, WIDTH), np.int32))
    normals = np.zeros((HEIGHT, WIDTH, 3), np.float16)
    normals[..., 2] = 1
    _h5(geometry / f"{stem}.normal_cam.hdf5", normals)
    _h5(geometry / f"{stem}.semantic.hdf5", (1 + (xx * 40).astype(np.int16) % 40).astype(np.int16))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--frames", type=int, default=12)
  args = parser.parse_args()
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  import dense_diffusion.datasets  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  tmp = pathlib.Path(tempfile.mkdtemp())
  write_frames(tmp / "raw", args.frames)
  # TF's first PNG encoding starts its runtime (seconds): keep that out of the per-frame cost.
  tfds.features.Image(shape=(None, None, 3), encoding_format="png").encode_example(
      np.zeros((8, 8, 3), np.uint8))
  for name in ("hypersim/depth", "hypersim/all"):
    builder = tfds.builder(name, data_dir=str(tmp / "data"))
    wall, cpu = time.time(), time.process_time()
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=str(tmp / "raw")))
    wall, cpu = time.time() - wall, time.process_time() - cpu
    stored = sum(f.stat().st_size for f in pathlib.Path(builder.data_dir).glob("*tfrecord*"))
    print(f"{name}: {cpu / args.frames:.2f} CPU s/frame ({wall / args.frames:.2f} s wall), "
          f"{stored / args.frames / 1e6:.2f} MB/frame stored, {args.frames} frames")


if __name__ == "__main__":
  main()
