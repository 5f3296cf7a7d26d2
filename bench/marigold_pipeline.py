"""Marigold depth pipeline: images/s of ours (JAX, jitted) against diffusers' (PyTorch eager).

    .venv/bin/python bench/marigold_pipeline.py [--resolution 128] [--steps 4] [--batches 1,4]

Builds one small random Marigold depth pipeline with diffusers (UNet block_out_channels
32/64/128, two layers per block, cross-attention in the two outer levels; a 4-level VAE, so
latents are 1/8 of the image; a 2-layer CLIP text encoder; DDIM trailing, v-prediction, as
Marigold v1-1), saves it, loads ours from the folder and times whole pipeline calls (preprocess,
VAE encode, the denoising loop, VAE decode, resize back) on the same images and latents: N images
of 96x128, processed at `--resolution`, ensemble 1, batch_size N. Our first call (compilation) is
reported on its own; then rounds alternate the two (so load from other processes hits both) and
the table gives the best and the median call time (images/s from the median). torch uses its
default thread count unless --torch-threads says otherwise; XLA flags come from the environment.
The header gives the load average: on a shared 2-core machine torch's OpenMP threads stall
badly when another process holds a core, so compare runs at similar load. The last column is the
largest difference of the two predictions.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import statistics
import tempfile
import time

import jax
import numpy as np

from dense_diffusion.pipelines import MarigoldDepthPipeline


def _write_vocab(folder: pathlib.Path) -> None:
  """A byte-level vocabulary with CLIP's special tokens (the prompt is empty: only those count)."""
  from tokenizers import pre_tokenizers  # pylint: disable=import-outside-toplevel
  alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
  vocab = {c: i for i, c in enumerate(alphabet)}
  vocab.update({c + "</w>": len(alphabet) + i for i, c in enumerate(alphabet)})
  vocab.update({"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1})
  folder.mkdir(parents=True)
  (folder / "vocab.json").write_text(json.dumps(vocab))
  (folder / "merges.txt").write_text("#version: 0.2\n")
  (folder / "tokenizer_config.json").write_text(json.dumps({
      "model_max_length": 77, "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
      "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}))


def build_diffusers_pipeline(folder: pathlib.Path, channels: tuple[int, ...]):
  import diffusers  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  _write_vocab(folder / "vocab")
  tokenizer = transformers.CLIPTokenizer.from_pretrained(folder / "vocab")
  torch.manual_seed(0)
  levels = len(channels)
  unet = diffusers.UNet2DConditionModel(
      sample_size=16, in_channels=8, out_channels=4, block_out_channels=channels,
      layers_per_block=2, down_block_types=("CrossAttnDownBlock2D",) * (levels - 1)
      + ("DownBlock2D",), up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (levels - 1),
      cross_attention_dim=64, attention_head_dim=8, use_linear_projection=True)
  vae = diffusers.AutoencoderKL(
      block_out_channels=(32, 64, 128, 128), layers_per_block=1, latent_channels=4,
      down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
  text_encoder = transformers.CLIPTextModel(transformers.CLIPTextConfig(
      vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
      num_attention_heads=4, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)).eval()
  scheduler = diffusers.DDIMScheduler(
      beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
      prediction_type="v_prediction", set_alpha_to_one=False, steps_offset=1,
      timestep_spacing="trailing")
  pipe = diffusers.MarigoldDepthPipeline(unet=unet, vae=vae, scheduler=scheduler,
                                         text_encoder=text_encoder, tokenizer=tokenizer,
                                         prediction_type="depth", default_denoising_steps=4,
                                         default_processing_resolution=128)
  pipe.save_pretrained(folder / "pipeline")
  pipe.set_progress_bar_config(disable=True)
  return pipe


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--resolution", type=int, default=128)
  parser.add_argument("--steps", type=int, default=4)
  parser.add_argument("--batches", default="1,4", help="images per call, comma-separated")
  parser.add_argument("--channels", default="32,64,128", help="UNet block_out_channels")
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--torch-threads", type=int, default=0, help="0: torch's default")
  args = parser.parse_args()

  import PIL.Image  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  if args.torch_threads:
    torch.set_num_threads(args.torch_threads)

  channels = tuple(int(c) for c in args.channels.split(","))
  workdir = pathlib.Path(tempfile.mkdtemp(prefix="marigold_bench_"))
  ref = build_diffusers_pipeline(workdir, channels)
  t0 = time.perf_counter()
  ours = MarigoldDepthPipeline.from_pretrained(workdir / "pipeline")
  load_s = time.perf_counter() - t0

  size = (96, 128)
  lat_hw = (args.resolution * size[0] // max(size) + 7) // 8, args.resolution // 8
  print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"jax {jax.__version__} ({jax.devices()[0].platform}), torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), UNet {channels}, input {size[0]}x{size[1]} -> "
        f"{args.resolution}, {args.steps} DDIM steps, ensemble 1, {args.rounds} rounds; "
        f"ours loaded in {load_s:.1f} s; load average {os.getloadavg()[0]:.1f}")
  print("| images / call | ours compile + first call s | ours s / call (best, median) | "
        "diffusers s / call (best, median) | ours images/s | diffusers images/s | speed-up | "
        "max abs diff |")
  print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
  for n in (int(b) for b in args.batches.split(",")):
    rng = np.random.default_rng(n)
    images = [(rng.random(size + (3,)) * 255).astype(np.uint8) for _ in range(n)]
    latents = rng.standard_normal((n, 4) + lat_hw).astype(np.float32)
    common = dict(num_inference_steps=args.steps, processing_resolution=args.resolution,
                  batch_size=n)

    def run_ours():
      return ours(np.stack(images), latents=latents.transpose(0, 2, 3, 1), **common).prediction

    def run_ref():
      return ref([PIL.Image.fromarray(a) for a in images], latents=torch.from_numpy(latents),
                 **common).prediction

    t0 = time.perf_counter()
    got = run_ours()
    first = time.perf_counter() - t0
    want = run_ref()
    times = {"ours": [], "ref": []}
    for _ in range(args.rounds):
      for name, fn in (("ours", run_ours), ("ref", run_ref)):
        t0 = time.perf_counter()
        fn()
        times[name].append(time.perf_counter() - t0)
    ours_s, ref_s = statistics.median(times["ours"]), statistics.median(times["ref"])
    print(f"| {n} | {first:.2f} | {min(times['ours']):.3f}, {ours_s:.3f} | "
          f"{min(times['ref']):.3f}, {ref_s:.3f} | {n / ours_s:.2f} | {n / ref_s:.2f} | "
          f"{ref_s / ours_s:.1f}x | {np.abs(got - want).max():.1e} |")
  print(f"load average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
  main()
