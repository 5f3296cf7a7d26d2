"""The largest power-of-two microbatch whose compiled step fits the device (pure logic).

bench/device_check.py compiles the train step at a few sizes; this decides which, from the
compiler's memory analysis of each (tests/test_no_tensorflow.py runs it on made-up compilers).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Optional


@dataclasses.dataclass
class Attempt:
  """One compiled microbatch: its memory per the compiler, and whether it ran."""
  batch: int
  peak_bytes: Optional[float] = None  # arguments + outputs + temporaries - aliased.
  temp_bytes: Optional[float] = None
  fits: Optional[bool] = None  # peak within the budget (None: no budget known, e.g. CPU).
  compile_s: float = 0.0
  error: Optional[str] = None


def fits(attempt: Attempt, budget_bytes: Optional[float]) -> bool:
  """Compiled, and its peak within the budget (or no budget / no analysis known)."""
  if attempt.error is not None:
    return False
  return budget_bytes is None or attempt.peak_bytes is None or attempt.peak_bytes <= budget_bytes


def predict_largest(attempts: list[Attempt], budget_bytes: float) -> Optional[float]:
  """The microbatch at which the predicted peak reaches the budget: temporaries grow linearly in
  the batch (fitted through the two largest fitting compiles; through the origin with one,
  which over-estimates the per-example part, so the prediction errs small)."""
  ok = sorted((a for a in attempts if a.error is None and a.peak_bytes is not None
               and a.temp_bytes is not None), key=lambda a: a.batch)
  if not ok:
    return None
  last = ok[-1]
  fixed = last.peak_bytes - last.temp_bytes  # arguments + outputs - aliased: the state.
  if len(ok) >= 2 and ok[-2].batch != last.batch:
    prev = ok[-2]
    per_example = (last.temp_bytes - prev.temp_bytes) / (last.batch - prev.batch)
    fixed += last.temp_bytes - per_example * last.batch
  else:
    per_example = last.temp_bytes / last.batch
  if per_example <= 0:
    return math.inf
  return (budget_bytes - fixed) / per_example


def search_microbatch(compile_fn: Callable[[int], Attempt], start: int, cap: int,
                      budget_bytes: Optional[float], time_ok: Callable[[], bool],
                      max_compiles: int = 4) -> tuple[Optional[int], list[Attempt]]:
  """The largest power-of-two microbatch (<= cap) whose compiled step fits `budget_bytes`.

  `compile_fn(b)` compiles at b and reports the compiler's memory analysis (or an error).
  Starts at `start` and halves while it does not fit; then grows to the largest power of two the
  fitted temporaries predict to fit (below any size that did not), while `time_ok()` and at most
  `max_compiles` compiles.
  Returns (the largest fitting batch or None, every attempt).
  """
  attempts: list[Attempt] = []
  batch = max(1, min(start, cap))
  best = None
  while batch >= 1 and len(attempts) < max_compiles:
    attempt = compile_fn(batch)
    attempts.append(attempt)
    if fits(attempt, budget_bytes):
      best = batch
      break
    batch //= 2
  if best is None:
    return None, attempts
  while len(attempts) < max_compiles and best < cap and time_ok():
    # Below every size that did not fit, at most the cap.
    limit = min([cap] + [a.batch - 1 for a in attempts if not fits(a, budget_bytes)])
    largest = math.inf if budget_bytes is None else predict_largest(attempts, budget_bytes)
    if largest is None or min(largest, limit) < 2 * best:
      break
    target = 2 ** int(math.log2(min(largest, limit)))
    attempt = compile_fn(target)
    attempts.append(attempt)
    if not fits(attempt, budget_bytes):
      break
    best = target
  return best, attempts
