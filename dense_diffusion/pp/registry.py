"""Registry of preprocessing ops and the parser of op strings such as `resize(128, key="depth")`.

Every op is a factory registered under a name; called with the arguments written in the string it
returns a function `dict[str, tf.Tensor] -> dict[str, tf.Tensor]`.
"""
from __future__ import annotations

import ast
from typing import Any, Callable

from dense_diffusion import errors
from dense_diffusion.registry import Registry

OPS: Registry[Callable[..., Callable]] = Registry("pp op")


def register(name: str):
  """Decorator: registers an op factory under `name`."""
  return OPS.register(name)


def names() -> list[str]:
  """Names of all registered ops, sorted."""
  return OPS.names()


def lookup(name: str) -> Callable[..., Callable]:
  """The factory of op `name`; an unknown name raises UnknownNameError listing the known ops."""
  return OPS.get(name)


def parse(spec: str) -> tuple[str, tuple[Any, ...], dict[str, Any]]:
  """`name(1, key="x")` -> ("name", (1,), {"key": "x"}); `name` alone -> ("name", (), {}).

  Arguments must be python literals (numbers, strings, tuples, lists, dicts, True/False/None).
  """
  spec = spec.strip()
  try:
    tree = ast.parse(spec if "(" in spec else f"{spec}()", mode="eval").body
  except SyntaxError as e:
    raise errors.ConfigError(f"cannot parse pp op {spec!r}: {e.msg}") from None
  if not isinstance(tree, ast.Call) or not isinstance(tree.func, ast.Name):
    raise errors.ConfigError(f"pp op {spec!r} is not of the form name(args)")
  try:
    args = tuple(ast.literal_eval(a) for a in tree.args)
    kwargs = {k.arg: ast.literal_eval(k.value) for k in tree.keywords}
  except ValueError:
    raise errors.ConfigError(f"pp op {spec!r}: arguments must be python literals") from None
  return tree.func.id, args, kwargs


def build_op(spec: str) -> Callable:
  """Parses one op string and builds the op."""
  name, args, kwargs = parse(spec)
  factory = lookup(name)
  try:
    return factory(*args, **kwargs)
  except TypeError as e:
    raise errors.ConfigError(f"bad arguments in pp op {spec!r}: {e}") from None
