"""Mistakes a user can fix, told in one line.

The commands (`python -m dense_diffusion.main ...`) catch `UserError`, print `error: <message>`
on stderr and exit with status 2; `--traceback` shows the traceback as well. Any other exception
is a bug and keeps its traceback. So raise a `UserError` (or one of its subclasses) for what the
user gave wrongly: a config key or value, a task or dataset name, a missing workdir, checkpoint
or dataset, a mesh that does not fit the devices. The message says what to change.

The subclasses also derive from the built-in exception a caller would expect (`ValueError`,
`KeyError`, `FileNotFoundError`), so library code can catch them the usual way.
"""
from __future__ import annotations

EXIT_USER_ERROR = 2  # the commands' exit status for a UserError (as argparse / absl usage).


class UserError(Exception):
  """A mistake in what the user gave; its message is one line saying what to change."""


class ConfigError(UserError, ValueError):
  """A config key or value that cannot work."""


class UnknownNameError(UserError, KeyError):
  """A name that no registry knows (task, paradigm, pp op, reader, ...)."""

  def __str__(self) -> str:  # KeyError would print the message in quotes
    return str(self.args[0]) if self.args else ""


class MissingError(UserError, FileNotFoundError):
  """A workdir, checkpoint, dataset or input file that is not where the user said."""


class DivergedError(ConfigError, FloatingPointError):
  """Training met a non-finite loss or gradient under `nonfinite='stop'`: the remedy is a config
  value (learning rate, clipping, the non-finite policy), so it is told in one line."""
