"""Registry of preprocessing ops and the parser of op strings such as `resize(128, key="depth")`.

Every op is a factory registered under a name; called with the arguments written in the string it
returns a function `dict[str, tf.Tensor] -> dict[str, tf.Tensor]`.
"""
from __future__ import annotations

import ast
from typing import Any, Callable

_OPS: dict[str, Callable[..., Callable]] = {}


def register(name: str):
  """Decorator: registers an op factory under `name`."""
  def wrap(factory):
    if name in _OPS:
      raise ValueError(f"pp op {name!r} registered twice")
    _OPS[name] = factory
    return factory
  return wrap


def names() -> list[str]:
  """Names of all registered ops, sorted."""
  return sorted(_OPS)


def lookup(name: str) -> Callable[..., Callable]:
  if name not in _OPS:
    raise KeyError(f"unknown pp op {name!r}; known ops: {', '.join(names())}")
  return _OPS[name]


def parse(spec: str) -> tuple[str, tuple[Any, ...], dict[str, Any]]:
  """`name(1, key="x")` -> ("name", (1,), {"key": "x"}); `name` alone -> ("name", (), {}).

  Arguments must be python literals (numbers, strings, tuples, lists, dicts, True/False/None).
  """
  spec = spec.strip()
  try:
    tree = ast.parse(spec if "(" in spec else f"{spec}()", mode="eval").body
  except SyntaxError as e:
    raise ValueError(f"cannot parse pp op {spec!r}: {e.msg}") from None
  if not isinstance(tree, ast.Call) or not isinstance(tree.func, ast.Name):
    raise ValueError(f"pp op {spec!r} is not of the form name(args)")
  try:
    args = tuple(ast.literal_eval(a) for a in tree.args)
    kwargs = {k.arg: ast.literal_eval(k.value) for k in tree.keywords}
  except ValueError:
    raise ValueError(f"pp op {spec!r}: arguments must be python literals") from None
  return tree.func.id, args, kwargs


def build_op(spec: str) -> Callable:
  """Parses one op string and builds the op."""
  name, args, kwargs = parse(spec)
  factory = lookup(name)
  try:
    return factory(*args, **kwargs)
  except TypeError as e:
    raise ValueError(f"bad arguments in pp op {spec!r}: {e}") from None
