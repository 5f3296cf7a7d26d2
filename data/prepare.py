"""Prepares one dataset as TFDS records: `python data/prepare.py <name> [--manual_dir=...]`.

    python data/prepare.py ade20k --manual_dir=/data/raw/ade --data_dir=~/tensorflow_datasets
    python data/prepare.py synthetic_scenes/res128 --data_dir=~/tensorflow_datasets

Our builders (synthetic_scenes, ade20k, sidd, rain, lol, hypersim, vkitti2) are registered by importing
`dense_diffusion.datasets`; TFDS's own builders (nyu_depth_v2, coco/2017_panoptic) work too.
This script stands in for `tfds build`, whose CLI imports apache_beam (not a dependency here).
"""
from __future__ import annotations

import argparse
import os


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("name", help="builder name with optional config, e.g. synthetic_scenes/res64")
  parser.add_argument("--manual_dir", default=None, help="folder with the manually downloaded data")
  parser.add_argument("--data_dir", default=None, help="TFDS data dir (default: TFDS's default)")
  parser.add_argument("--on_bad_example", choices=("fail", "skip"), default=None,
                      help="our folder builders only: stop on, or skip, a corrupt example")
  args = parser.parse_args(argv)

  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  import dense_diffusion.datasets  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import

  kwargs = {"on_bad_example": args.on_bad_example} if args.on_bad_example else {}
  data_dir = os.path.expanduser(args.data_dir) if args.data_dir else None
  builder = tfds.builder(args.name, data_dir=data_dir, **kwargs)
  manual_dir = os.path.expanduser(args.manual_dir) if args.manual_dir else None
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
  for split, info in builder.info.splits.items():
    print(f"{builder.info.full_name} {split}: {info.num_examples} examples")
  print(f"prepared in {builder.data_dir}")


if __name__ == "__main__":
  main()
