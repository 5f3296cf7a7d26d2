"""`get_preprocess_fn("decode|resize(128)|value_range(-1, 1)")`: compose registered ops."""
from __future__ import annotations

from typing import Callable

from dense_diffusion.pp import registry


def split_ops(pp: str) -> list[str]:
  """Splits an op string at the top-level `|` (not inside brackets or quotes)."""
  parts, depth, quote, cur = [], 0, None, []
  for ch in pp:
    if quote:
      quote = None if ch == quote else quote
    elif ch in "\"'":
      quote = ch
    elif ch in "([{":
      depth += 1
    elif ch in ")]}":
      depth -= 1
    elif ch == "|" and depth == 0:
      parts.append("".join(cur))
      cur = []
      continue
    cur.append(ch)
  parts.append("".join(cur))
  return [p.strip() for p in parts if p.strip()]


def get_preprocess_fn(pp: str | None) -> Callable[[dict], dict]:
  """Returns a function applying the ops of `pp` in order to an example dict (empty = identity).

  Raises:
    KeyError: for an unknown op name (the message lists the known ops).
    ValueError: for a malformed op string or bad arguments.
  """
  ops = [registry.build_op(spec) for spec in split_ops(pp or "")]

  def preprocess(data: dict) -> dict:
    if not isinstance(data, dict):
      raise ValueError(f"pp functions take a dict of tensors, got {type(data).__name__}")
    for op in ops:
      data = op(data)
    return data

  return preprocess
