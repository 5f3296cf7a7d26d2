"""Command-line entry point: `python -m dense_diffusion.main COMMAND [flags]`.

Commands (a registry, not an if-chain; each command module is imported only when it runs):
  train     --config configs/X.py[:arg] --workdir DIR [--config.key=value ...]
  eval      --workdir DIR [--config ...]: evaluate the latest checkpoint on its config's entries
            --protocol NAME (--workdir DIR | --pretrained FOLDER) [--dataset FOLDER_OR_READER]
            [--output DIR]: one benchmark as the papers score it, at full resolution (per-image
            and summary JSON, a markdown table, the worst cases)
  predict   --workdir DIR --task T --input IMG_OR_DIR --output DIR: answers for your images
            (or --pretrained MARIGOLD_FOLDER instead of --workdir and --task)
  pseudo-label --input IMAGES --teacher TASK=SOURCE[,TASK=SOURCE ...] --output DATA_DIR
            [--dataset NAME]: the images labelled by teachers (runs' workdirs or Marigold-format
            pipeline folders) as the TFDS set pseudo_labelled/NAME (resumable; DMP's training data)
  demo      the README's main job (see dense_diffusion/demo.py)
  convert   --from diffusers --src DIR --dst DIR: converted weights -> orbax checkpoint
            (--lora FILE: a diffusers / peft LoRA file folded into the converted UNet)
  export-lora --workdir DIR --dst FILE: a LoRA run's EMA adapters -> diffusers / peft LoRA file
  compile   --config configs/X.py --topology v5e-16: the train step and sampler compiled for a TPU
            slice on this machine; memory per device, FLOPs, step time; exit 1 if it does not fit
  study     --study NAME_OR_FILE --workdir ROOT [--steps N] [--scale NAME]: every arm of a study
            trained and evaluated, one table (docs/studies.md)
  train-vae --config configs/synthetic_vae.py --workdir DIR: a small VAE for synthetic_scenes

A user's mistake (a flag, a config key or value, a missing run: an `errors.UserError`) prints one
line, `error: <what to change>`, on stderr and exits with status 2; `--traceback` shows its
traceback as well. Any other exception is a bug and keeps its traceback.
"""
from __future__ import annotations

import faulthandler
import os
import pathlib
import re
import signal
import sys
import traceback

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from dense_diffusion import errors
from dense_diffusion import registry

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
flags.DEFINE_string("dst", None, "convert: folder for the converted orbax checkpoint; "
                    "export-lora: the LoRA .safetensors file to write.")
flags.DEFINE_string("lora", None, "convert: a diffusers / peft LoRA .safetensors file to fold "
                    "into the converted UNet.")
flags.DEFINE_string("task", None, "predict: the task to predict (one the run was trained on, or "
                    "panoptic when it had semantic and instance).")
flags.DEFINE_string("input", None, "predict: an image file or a folder of images; "
                    "pseudo-label: a folder of images (searched recursively).")
flags.DEFINE_string("output", None, "predict: folder for the predictions; eval --protocol: "
                    "folder for the report (default: WORKDIR/eval/PROTOCOL); pseudo-label: the "
                    "TFDS data_dir to write the set into.")
flags.DEFINE_integer("batch_size", None, "predict / eval --protocol / pseudo-label: images per "
                     "batch (default: eval.batch_size).")
flags.DEFINE_multi_string("teacher", None, "pseudo-label: TASK=SOURCE, the teacher of a task (a "
                          "trained run's workdir or a Marigold-format pipeline folder); repeat "
                          "the flag or join several with commas.")
flags.DEFINE_integer("steps", None, "predict / pseudo-label: sampler steps (default: the run's config, or the "
                     "pretrained folder's default_denoising_steps); study: training steps per "
                     "arm (default: the study's scale).")
flags.DEFINE_string("pretrained", None, "predict: a diffusers Marigold-format pipeline folder "
                    "(depth / normals / intrinsics, E2E-FT fine-tunes) to predict with instead of "
                    "a trained run's --workdir.")
flags.DEFINE_integer("ensemble_size", 1, "predict / eval --pretrained, pseudo-label's pipeline "
                     "teachers: predictions combined per image.")
flags.DEFINE_string("protocol", None, "eval: the benchmark's protocol (nyu_eigen, kitti_eigen, "
                    "kitti_garg, eth3d, scannet, diode, ade20k, coco_panoptic, rain100, sidd, lol, "
                    "normals_pixel, normals_image); docs/evaluation.md.")
flags.DEFINE_string("dataset", None, "eval --protocol: a folder in the layout of Marigold's "
                    "evaluation sets (RGB files, answer files, a filename list), or a dataset "
                    "reader's name (nyu_depth_v2, ade20k, coco_panoptic, sidd, rain, lol, "
                    "synthetic_scenes/CONFIG); default for --workdir: the run's own entry. "
                    "pseudo-label: the set's NAME, pseudo_labelled/NAME (default: the --input "
                    "folder's name).")
flags.DEFINE_string("alignment", None, "eval --protocol, depth: override the protocol's "
                    "alignment (scale_shift, scale_shift_disparity, scale, none).")
flags.DEFINE_string("split", None, "eval --protocol with a dataset reader: the split (default: "
                    "the reader's evaluation split).")
flags.DEFINE_string("filename_list", None, "eval --dataset FOLDER: the filename list (default: "
                    "FOLDER/filename_list.txt or the folder's only .txt file).")
flags.DEFINE_float("depth_scale", 1000.0, "eval --dataset FOLDER: integer depth PNGs hold "
                   "metres * depth_scale (1000: millimetres; KITTI: 256).")
flags.DEFINE_integer("processing_resolution", None, "eval / predict --pretrained, pseudo-label's "
                     "pipeline teachers: the longer side the pipeline works at (default: the "
                     "folder's).")
flags.DEFINE_integer("max_examples", None, "eval --protocol: stop after this many images.")
flags.DEFINE_string("topology", None, "compile: the TPU slice to compile for (v5e-16, v5p-8, "
                    "v4-8, v6e-8, ...); needs the [tpu-aot] extra (libtpu).")
flags.DEFINE_string("mfu", "0.4,0.6", "compile: model FLOPs utilisations at which to state the "
                    "step time and examples/s.")
flags.DEFINE_string("study", None, "study: a study name (configs/studies/NAME.py) or file.")
flags.DEFINE_string("scale", None, "study: the study file's budget by name (cpu, accelerator).")
flags.DEFINE_bool("traceback", False, "Show the traceback of a user error (a wrong flag, config "
                  "key or value, a missing run) as well as its one-line message.")

# command name -> function(FLAGS) returning an exit code or None.
COMMANDS: registry.Registry = registry.Registry("command")


def _require(command: str, *names: str) -> None:
  missing = [f"--{n}" for n in names if FLAGS[n].value is None]
  if missing:
    raise errors.UserError(f"{command} needs {' '.join(missing)}")


def _maybe_distributed() -> None:
  """jax.distributed.initialize() with the flags given; None lets JAX read the environment."""
  explicit = {"coordinator_address": FLAGS.coordinator_address,
              "num_processes": FLAGS.num_processes, "process_id": FLAGS.process_id}
  if not FLAGS.distributed:
    given = [f"--{k}" for k, v in explicit.items() if v is not None]
    if given or FLAGS.local_device_ids:
      raise errors.UserError(f"{' '.join(given) or '--local_device_ids'} only apply with "
                             "--distributed")
    return
  import jax
  local_ids = None
  if FLAGS.local_device_ids:
    local_ids = [int(i) for i in FLAGS.local_device_ids.split(",")]
  jax.distributed.initialize(**explicit, local_device_ids=local_ids)


@COMMANDS.register("train")
def _train(_) -> int | None:
  _require("train", "config", "workdir")
  _maybe_distributed()
  from dense_diffusion import train
  train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  return 0


@COMMANDS.register("eval")
def _eval(_) -> int | None:
  from dense_diffusion import evaluate
  if FLAGS.protocol is None:
    for name in ("pretrained", "dataset", "alignment", "output"):
      if FLAGS[name].value is not None:
        raise errors.UserError(f"eval --{name} needs --protocol (the benchmark to score)")
    _require("eval", "workdir")
    _maybe_distributed()
    evaluate.evaluate_latest(FLAGS.config, FLAGS.workdir)
    return 0
  from dense_diffusion import protocol_eval
  protocol_eval.run_protocol(
      FLAGS.protocol, workdir=FLAGS.workdir, pretrained=FLAGS.pretrained, dataset=FLAGS.dataset,
      output=FLAGS.output, alignment=FLAGS.alignment, split=FLAGS.split,
      filename_list=FLAGS.filename_list, depth_scale=FLAGS.depth_scale,
      batch_size=FLAGS.batch_size, steps=FLAGS.steps, ensemble_size=FLAGS.ensemble_size,
      processing_resolution=FLAGS.processing_resolution, max_examples=FLAGS.max_examples)
  return 0


@COMMANDS.register("demo")
def _demo(_) -> int | None:
  from dense_diffusion import demo
  if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    # Before any JAX computation; only the CPU platform is split, an accelerator is unaffected.
    import jax
    jax.config.update("jax_num_cpu_devices", demo.CPU_DEVICES)
  return demo.run(workdir=FLAGS.workdir or "runs/demo")


@COMMANDS.register("convert")
def _convert(_) -> int | None:
  _require("convert", "src", "dst")
  from dense_diffusion.convert import command
  return command.run(FLAGS["from"].value, FLAGS.src, FLAGS.dst, lora=FLAGS.lora)


@COMMANDS.register("export-lora")
def _export_lora(_) -> int | None:
  _require("export-lora", "workdir", "dst")
  from dense_diffusion import experiment
  from dense_diffusion.convert import lora as lora_convert
  exp = experiment.Experiment(experiment.load_config(FLAGS.workdir))
  step, state = exp.restore_latest(FLAGS.workdir, async_save=False)
  unet = exp.model(state.ema).unet
  out = lora_convert.save_diffusers_lora(unet, FLAGS.dst)
  print(f"wrote the LoRA adapters of {FLAGS.workdir} (step {step}, EMA) -> {out}")
  return 0


@COMMANDS.register("predict")
def _predict(_) -> int | None:
  _require("predict", "input", "output")
  from dense_diffusion import predict
  return predict.run(FLAGS.workdir, FLAGS.task, FLAGS.input, FLAGS.output,
                     batch_size=FLAGS.batch_size, steps=FLAGS.steps,
                     pretrained=FLAGS.pretrained, ensemble_size=FLAGS.ensemble_size,
                     processing_resolution=FLAGS.processing_resolution)


@COMMANDS.register("pseudo-label")
def _pseudo_label(_) -> int | None:
  _require("pseudo-label", "input", "teacher", "output")
  from dense_diffusion import pseudo_label
  return pseudo_label.run(FLAGS.input, FLAGS.teacher, FLAGS.output, dataset=FLAGS.dataset,
                          batch_size=FLAGS.batch_size, steps=FLAGS.steps,
                          ensemble_size=FLAGS.ensemble_size,
                          processing_resolution=FLAGS.processing_resolution)


@COMMANDS.register("compile")
def _compile(_) -> int | None:
  _require("compile", "config", "topology")
  from dense_diffusion import aot
  aot.use_cpu_host()
  return aot.run(FLAGS.config, FLAGS.topology, FLAGS.mfu)


@COMMANDS.register("study")
def _study(_) -> int | None:
  _require("study", "study", "workdir")
  from dense_diffusion import studies
  studies.run(FLAGS.study, FLAGS.workdir, scale=FLAGS.scale, steps=FLAGS.steps)
  return 0


@COMMANDS.register("train-vae")
def _train_vae(_) -> int | None:
  _require("train-vae", "config", "workdir")
  from dense_diffusion.studies import vae_training
  vae_training.train(FLAGS.config, FLAGS.workdir)
  return 0


def _usage() -> str:
  return f"python -m dense_diffusion.main {{{'|'.join(COMMANDS.names())}}} [flags]"


def _dispatch(argv: list[str]) -> int | None:
  if len(argv) < 2:
    raise errors.UserError(f"give a command: {_usage()}")
  command, extra = argv[1], argv[2:]
  run_command = COMMANDS.get(command)
  if extra:
    raise errors.UserError(f"unexpected arguments {extra}; options are --flags")
  if not FLAGS["verbosity"].present:
    # The console shows progress lines and tables; library INFO logs only with -v 0.
    logging.set_verbosity(logging.WARNING)
    logging.get_absl_handler().addFilter(_drop_library_deprecations)
  return run_command(FLAGS)


def _drop_library_deprecations(record) -> bool:
  """False for TensorFlow's and TFDS's deprecation notices about their own internals (a dozen
  lines per run that a user cannot act on); every other record passes."""
  return not ("tensorflow" in record.pathname and "deprecat" in record.getMessage())


def _one_line(message: str) -> str:
  """`message` on one line: a multi-line one's lines joined, a quoted traceback's last line."""
  lines = [line.strip() for line in str(message).splitlines() if line.strip()]
  if "Traceback (most recent call last):" in lines:
    # ml_collections quotes get_config's traceback: "flag --config=X: Error whilst parsing config
    # file:", the traceback, "ValueError: what went wrong". Keep the flag and what went wrong.
    head = lines[0].removesuffix("Error whilst parsing config file:").strip()
    return f"{head} {lines[-1]}" if head else lines[-1]
  return " ".join(lines)


def _report(error: errors.UserError) -> int:
  """Prints `error: <message>` on stderr; returns the exit status of a user error."""
  sys.stdout.flush()
  sys.stderr.write(f"error: {_one_line(str(error))}\n")
  sys.stderr.flush()
  return errors.EXIT_USER_ERROR


def main(argv: list[str]) -> int | None:
  try:
    return _dispatch(argv)
  except errors.UserError as e:
    if FLAGS.traceback:
      raise
    return _report(e)


# `--config.KEY=VALUE` (and the boolean `--noconfig.KEY`): the overrides ml_collections applies.
_OVERRIDE = re.compile(r"^--?(?:no)?config\.([^=]+)")


def _traceback_requested(argv: list[str]) -> bool:
  """Whether argv asks for --traceback; read from argv as FLAGS may have failed to parse."""
  wanted = False
  for arg in argv[1:]:
    if arg == "--":
      break
    if not arg.startswith("-"):
      continue
    name, has_value, value = arg.lstrip("-").partition("=")
    if name == "traceback":
      try:
        wanted = not has_value or bool(FLAGS["traceback"].parser.parse(value))
      except ValueError:
        pass
    elif name == "notraceback":
      wanted = False
  return wanted


def _raised_applying_overrides(e: Exception) -> bool:
  """Whether `e` (not a flags.Error) escaped while ml_collections applied --config.KEY overrides.

  ml_collections resolves each override's key in the config flag's `_parse` after loading the
  file, and lets KeyError, AttributeError, TypeError, ... of an unknown or ill-formed key escape
  unwrapped. An exception of get_config() itself passes through the file parser's `parse` (it
  wraps only TypeError and ValueError into a flags.Error): that is the config file's bug.
  """
  frames = {(pathlib.Path(f.filename).name, f.name)
            for f in traceback.extract_tb(e.__traceback__)}
  return (("config_flags.py", "_parse") in frames
          and ("config_flags.py", "parse") not in frames)


def _override_message(e: Exception, argv: list[str]) -> str:
  """One line naming the --config.KEY override that failed and what is wrong with its key."""
  paths = []
  for arg in argv[1:]:
    match = _OVERRIDE.match(arg)
    if match and match.group(1) not in paths:
      paths.append(match.group(1))
  inner = e.args[0] if isinstance(e, AttributeError) and e.args else e
  text = str(inner.args[0]) if isinstance(inner, BaseException) and inner.args else str(inner)
  if isinstance(inner, KeyError):
    # ConfigDict: "'key'" and maybe a line 'Did you mean "keys" instead of "key"?'.
    key, *hint = text.splitlines() or [""]
    key = key.strip("'\"")
    for path in paths:
      parts = path.split(".")
      if key in parts:
        parent = ".".join(["config", *parts[:parts.index(key)]])
        message = f"--config.{path}: {parent} has no key {key!r}"
        hint = _one_line(" ".join(hint))  # 'Did you mean "keys" instead of "key"?'
        return f"{message}; {hint[:1].lower()}{hint[1:]}" if hint else message
  culprits = [p for p in paths if p in text] or paths
  where = ", ".join(f"--config.{p}" for p in culprits) or "--config"
  return f"{where}: {type(inner).__name__}: {_one_line(text)}"


def _flag_error_message(e: Exception, argv: list[str]) -> str:
  if isinstance(e, flags.UnrecognizedFlagError) and e.flagname.startswith("config."):
    if _config_arg(argv) is None:
      return f"--{e.flagname} overrides a config key: give --config FILE before it"
  return _one_line(str(e))


def _config_arg(argv: list[str]) -> str | None:
  """The value given to --config in argv (its last one), or None."""
  value = None
  for i, arg in enumerate(argv[1:], 1):
    if arg == "--":
      break
    match = re.match(r"^--?config(=|$)", arg)
    if match:
      value = arg[match.end():] if match.group(1) else (argv[i + 1] if i + 1 < len(argv) else "")
  return value


def _config_load_error(error: Exception, arg: str) -> errors.UserError:
  """The user error for a --config file that failed to load with `error` (an OSError)."""
  path = arg.split(":", 1)[0]
  if path and not os.path.exists(path):
    where = "" if os.path.isabs(path) else f" (relative to {os.getcwd()})"
    return errors.MissingError(f"--config: no config file {path!r}{where}")
  return errors.ConfigError(f"--config={arg}: {_one_line(str(error))}")


def _check_config_loaded() -> None:
  """A --config file that failed to load is a user error now, not at the config's first use.

  ml_collections keeps an OSError of loading the file (no such file, or one that get_config()
  raised) in a stand-in config that raises it when the config is first used.
  """
  error_config = getattr(config_flags.config_flags, "_ErrorConfig", ())
  config = FLAGS["config"].value
  if not isinstance(config, error_config):
    return
  try:
    config.lock  # pylint: disable=pointless-statement  # raises the kept error
  except OSError as e:
    arg = config_flags.get_config_filename(FLAGS["config"])
    raise _config_load_error(e.__cause__ or e, arg) from e


def parse_flags(argv: list[str]) -> list[str]:
  """app.run's flags_parser: FLAGS(argv), a mistake in the flags one line and exit status 2."""
  try:
    try:
      remaining = FLAGS(argv)
    except flags.Error as e:
      raise errors.UserError(_flag_error_message(e, argv)) from e
    except Exception as e:  # pylint: disable=broad-except
      if not _raised_applying_overrides(e):
        raise
      if isinstance(e, OSError) and "earlier failure to load" in str(e):
        # The file failed to load (see _check_config_loaded), found applying an override.
        raise _config_load_error(e.__cause__ or e, _config_arg(argv) or "") from e
      raise errors.ConfigError(_override_message(e, argv)) from e
    _check_config_loaded()
  except errors.UserError as e:
    if _traceback_requested(argv):
      raise
    sys.exit(_report(e))
  return remaining


def _dump_stacks_on_sigusr1() -> None:
  """`kill -USR1 PID` prints every thread's Python stack on stderr and the command goes on.

  A command that seems stuck (a test's timeout, a run on a cluster) shows where each thread
  waits instead of only "timed out"; the test suite's subprocess helper sends it before a kill.
  """
  if hasattr(signal, "SIGUSR1"):  # not on Windows
    faulthandler.register(signal.SIGUSR1, file=sys.stderr, all_threads=True)


def run() -> None:
  _dump_stacks_on_sigusr1()
  app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
  sys.exit(run())
