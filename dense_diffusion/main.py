"""Command-line entry point: `python -m dense_diffusion.main COMMAND [flags]`.

Commands (a registry, not an if-chain; each command module is imported only when it runs):
  train     --config configs/X.py[:arg] --workdir DIR [--config.key=value ...]
  eval      --workdir DIR [--config ...]: evaluate the latest checkpoint
  predict   --workdir DIR --task T --input IMG_OR_DIR --output DIR: answers for your images
  demo      the README's main job (see dense_diffusion/demo.py)
  convert   --from diffusers --src DIR --dst DIR: converted weights -> orbax checkpoint
"""
from __future__ import annotations

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:arg]).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Where checkpoints, logs, metrics and pictures go.")
flags.DEFINE_bool("distributed", False,
                  "Call jax.distributed.initialize() first (multi-host launchers set this). On "
                  "TPU pods and under SLURM it finds the coordinator itself; elsewhere give "
                  "--coordinator_address, --num_processes and --process_id.")
flags.DEFINE_string("coordinator_address", None,
                    "--distributed: host:port of process 0 (default: from the environment).")
flags.DEFINE_integer("num_processes", None,
                     "--distributed: number of processes (default: from the environment).")
flags.DEFINE_integer("process_id", None,
                     "--distributed: this process's index (default: from the environment).")
flags.DEFINE_string("local_device_ids", None,
                    "--distributed: comma-separated local accelerator ids this process uses "
                    "(one process per GPU on one host); default: all visible.")
flags.DEFINE_string("from", "diffusers", "convert: source format of the checkpoint.")
flags.DEFINE_string("src", None, "convert: folder of the source checkpoint.")
flags.DEFINE_string("dst", None, "convert: folder for the converted orbax checkpoint.")
flags.DEFINE_string("task", None, "predict: the task to predict (one the run was trained on, or "
                    "panoptic when it had semantic and instance).")
flags.DEFINE_string("input", None, "predict: an image file or a folder of images.")
flags.DEFINE_string("output", None, "predict: folder for the predictions.")
flags.DEFINE_integer("batch_size", None, "predict: images per batch (default: eval.batch_size).")
flags.DEFINE_integer("steps", None, "predict: sampler steps (default: the run's config).")



def _require(command: str, *names: str) -> None:
  missing = [f"--{n}" for n in names if FLAGS[n].value is None]
  if missing:
    raise app.UsageError(f"{command} needs {' '.join(missing)}")


def _maybe_distributed() -> None:
  """jax.distributed.initialize() with the flags given; None lets JAX read the environment."""
  explicit = {"coordinator_address": FLAGS.coordinator_address,
              "num_processes": FLAGS.num_processes, "process_id": FLAGS.process_id}
  if not FLAGS.distributed:
    given = [f"--{k}" for k, v in explicit.items() if v is not None]
    if given or FLAGS.local_device_ids:
      raise app.UsageError(f"{' '.join(given) or '--local_device_ids'} only apply with "
                           "--distributed")
    return
  import jax
  local_ids = None
  if FLAGS.local_device_ids:
    local_ids = [int(i) for i in FLAGS.local_device_ids.split(",")]
  jax.distributed.initialize(**explicit, local_device_ids=local_ids)


def _train(_) -> int | None:
  _require("train", "config", "workdir")
  _maybe_distributed()
  from dense_diffusion import train
  train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  return 0


def _eval(_) -> int | None:
  _require("eval", "workdir")
  _maybe_distributed()
  from dense_diffusion import train
  train.evaluate_latest(FLAGS.config, FLAGS.workdir)
  return 0


def _demo(_) -> int | None:
  from dense_diffusion import demo
  if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    # Before any JAX computation; only the CPU platform is split, an accelerator is unaffected.
    import jax
    jax.config.update("jax_num_cpu_devices", demo.CPU_DEVICES)
  return demo.run(workdir=FLAGS.workdir or "runs/demo")


def _convert(_) -> int | None:
  _require("convert", "src", "dst")
  from dense_diffusion.convert import command
  return command.run(FLAGS["from"].value, FLAGS.src, FLAGS.dst)


def _predict(_) -> int | None:
  _require("predict", "workdir", "task", "input", "output")
  from dense_diffusion import predict
  return predict.run(FLAGS.workdir, FLAGS.task, FLAGS.input, FLAGS.output,
                     batch_size=FLAGS.batch_size, steps=FLAGS.steps)


# command name -> function(FLAGS) returning an exit code or None.
COMMANDS = {
    "train": _train,
    "eval": _eval,
    "demo": _demo,
    "convert": _convert,
    "predict": _predict,
}


def main(argv: list[str]) -> int | None:
  if len(argv) < 2:
    raise app.UsageError(f"usage: python -m dense_diffusion.main {{{'|'.join(COMMANDS)}}} [flags]")
  command, extra = argv[1], argv[2:]
  if command not in COMMANDS:
    raise app.UsageError(f"unknown command {command!r}; commands: {', '.join(COMMANDS)}")
  if extra:
    raise app.UsageError(f"unexpected arguments {extra}; options are --flags")
  if not FLAGS["verbosity"].present:
    # The console shows progress lines and tables; library INFO logs only with -v 0.
    logging.set_verbosity(logging.WARNING)
  return COMMANDS[command](FLAGS)


def run() -> None:
  app.run(main)


if __name__ == "__main__":
  sys.exit(run())
