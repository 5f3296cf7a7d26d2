"""A user's mistake on the command line is one line, `error: <what to change>`, and exit status 2.

Each case runs `python -m dense_diffusion.main ...` in a subprocess; all fail before any model is
built, so the module starts them together (most of each one's time is importing) and the tests
check the results.
"""
import concurrent.futures
import os
import pathlib
import subprocess
import sys

import pytest

import subprocess_env
from subprocess_env import xla_flags

REPO = pathlib.Path(__file__).resolve().parents[1]
TIMEOUT = 300  # seconds a subprocess may take before the test gives up on it.
TINY = ("--config", "configs/tiny.py", "--config.input.data_dir={data}")

# Config files with a mistake in them (written to the test's folder as "{name}.py").
BAD_CONFIGS = {
    "typo_config": "c.optimzer = c.optimizer",
    "unknown_task_config": "c.tasks = ('depth', 'dept')",
    "untrained_task_config": "c.tasks = ('depth', 'semantic', 'denoise', 'normals')",
    "composite_task_config": "c.tasks = ('depth', 'panoptic')",
    "bad_task_option_config": "c.input.entries[0]['task_options'] = {'max_depht': 8.0}",
}
CONFIG_TEMPLATE = ("from configs import tiny\n\n\ndef get_config(arg=None):\n"
                   "  c = tiny.get_config(arg)\n  c.input.data_dir = {data!r}\n  {line}\n"
                   "  return c\n")

# name -> (arguments, substrings the error line must contain). "{workdir}" is a fresh folder,
# "{empty}" an empty one (no run in it) and "{configs}" the folder of BAD_CONFIGS, all replaced
# by their paths.
CASES = {
    "no_command": ((), ("command", "train", "eval", "predict")),
    "unknown_command": (("trian",), ("'trian'", "train", "eval")),
    "unexpected_argument": (("train", "extra", *TINY), ("'extra'",)),
    "train_without_workdir": (("train", *TINY), ("train", "--workdir")),
    "unknown_flag": (("train", "--bogus=1"), ("'bogus'",)),
    "unknown_config_key": (("train", *TINY, "--config.no_such_key=1"), ("no_such_key",)),
    "misspelt_config_key": (("train", *TINY, "--config.total_step=3"),
                            ("total_step", "total_steps")),
    "nested_unknown_config_key": (("train", *TINY, "--config.input.no_such_key=1"),
                                  ("input.no_such_key",)),
    "bad_override_value": (("train", *TINY, "--config.total_steps=abc"),
                           ("--config.total_steps", "abc")),
    "override_without_config": (("train", "--config.total_steps=3"),
                                ("--config.total_steps", "--config")),
    "missing_config_file": (("train", "--config", "configs/nope.py", "--workdir", "{workdir}"),
                            ("configs/nope.py",)),
    "get_config_raises": (("train", "--config", "configs/demo.py:bogus=1", "--workdir",
                           "{workdir}"), ("configs/demo.py:bogus=1", "'bogus'")),
    "distributed_flag_without_distributed": (("train", *TINY, "--workdir", "{workdir}",
                                              "--process_id=1"), ("--process_id", "--distributed")),
    "eval_of_a_missing_run": (("eval", "--workdir", "{empty}"), ("{empty}",)),
    "predict_of_a_missing_run": (("predict", "--workdir", "{empty}", "--task=depth",
                                  "--input", "{empty}", "--output", "{workdir}"), ("{empty}",)),
    "unknown_config_key_in_the_file": (("train", "--config", "{configs}/typo_config.py",
                                        "--workdir", "{workdir}"), ("optimzer", "known")),
    "unknown_task": (("train", "--config", "{configs}/unknown_task_config.py", "--workdir",
                      "{workdir}"), ("'dept'", "depth")),
    "task_without_data": (("train", "--config", "{configs}/untrained_task_config.py",
                           "--workdir", "{workdir}"), ("normals", "entries")),
    "composite_task_trained": (("train", "--config", "{configs}/composite_task_config.py",
                                "--workdir", "{workdir}"), ("panoptic", "semantic", "instance")),
    "bad_task_option": (("train", "--config", "{configs}/bad_task_option_config.py",
                         "--workdir", "{workdir}"), ("max_depht", "depth")),
    "unknown_paradigm": (("train", *TINY, "--workdir", "{workdir}",
                          "--config.diffusion.mode=latent"), ("'latent'", "generalist")),
    "bad_diffusion_value": (("train", *TINY, "--workdir", "{workdir}",
                             "--config.diffusion.prediction_type=noise"),
                            ("prediction_type", "noise")),
    "impossible_mesh": (("train", *TINY, "--workdir", "{workdir}", "--config.mesh.data=3"),
                        ("mesh", "config.mesh")),
    "missing_dataset": (("train", "--config", "configs/generalist_pixel128.py", "--workdir",
                         "{workdir}", "--config.input.data_dir={empty}"),
                        ("not prepared", "data/README.md")),
}
TRACEBACK_ARGS = ("train", *TINY, "--config.no_such_key=1", "--traceback")


def _run(args) -> subprocess.CompletedProcess:
  env = dict(os.environ, XLA_FLAGS=xla_flags(), TF_CPP_MIN_LOG_LEVEL="2")
  return subprocess_env.run([sys.executable, "-m", "dense_diffusion.main", *args], cwd=REPO,
                            env=env, capture_output=True, timeout=TIMEOUT)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, synthetic_data_dir):
  """(name -> (expected substrings, CompletedProcess)) of every case, and of the --traceback one."""
  # The tiny config's data, prepared before (so no case prints the preparation's progress).
  data = synthetic_data_dir
  configs = tmp_path_factory.mktemp("configs")
  for name, line in BAD_CONFIGS.items():
    (configs / f"{name}.py").write_text(CONFIG_TEMPLATE.format(line=line, data=str(data)))
  paths = {"{workdir}": str(tmp_path_factory.mktemp("workdir")),
           "{empty}": str(tmp_path_factory.mktemp("empty")), "{configs}": str(configs),
           "{data}": str(data)}

  def fill(strings):
    out = []
    for s in strings:
      for placeholder, path in paths.items():
        s = s.replace(placeholder, path)
      out.append(s)
    return tuple(out)

  with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
    started = {name: (fill(expected), pool.submit(_run, fill(args)))
               for name, (args, expected) in CASES.items()}
    started["--traceback"] = ((), pool.submit(_run, fill(TRACEBACK_ARGS)))
    return {name: (expected, future.result()) for name, (expected, future) in started.items()}


@pytest.mark.parametrize("name", list(CASES))
def test_user_mistake_is_one_error_line_and_status_2(runs, name):
  expected, proc = runs[name]
  output = f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
  lines = [line for line in proc.stderr.splitlines() if line.strip()]
  assert "Traceback" not in proc.stdout + proc.stderr, output
  assert len(lines) == 1 and lines[0].startswith("error: "), output
  for part in expected:
    assert part in lines[0], f"{part!r} not in {lines[0]!r}"
  assert proc.returncode == 2, output


def test_traceback_flag_shows_the_traceback(runs):
  _, proc = runs["--traceback"]
  assert proc.returncode != 0
  assert "Traceback (most recent call last)" in proc.stderr, proc.stderr
  assert "no_such_key" in proc.stderr.splitlines()[-1], proc.stderr
