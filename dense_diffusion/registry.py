"""`Registry`: the one name -> object table behind every registry of the project.

    TASKS = Registry("task")

    @TASKS.register("depth")
    class DepthTask(...): ...

    TASKS.get("depth")      # the registered object; an unknown name raises UnknownNameError
                            # ("unknown task 'dpth'; known tasks: albedo, depth, ...")

Tasks, paradigms, pp ops, dataset readers, noise schedules, samplers' rules and the commands all
use it, so they behave alike: registering a name twice is an error (two modules claiming one
name is a bug), and an unknown name is a `UserError` that lists the known names.
"""
from __future__ import annotations

from typing import Callable, Generic, Iterator, TypeVar

from dense_diffusion import errors

T = TypeVar("T")


class Registry(Generic[T]):
  """Named objects of one kind (`kind` names them in messages, e.g. "task", "pp op")."""

  def __init__(self, kind: str):
    self.kind = kind
    self._items: dict[str, T] = {}

  def register(self, name: str, item: T | None = None):
    """`register(name, item)`, or `@register(name)` as a decorator; returns the item."""
    def add(obj: T) -> T:
      if not isinstance(name, str) or not name:
        raise ValueError(f"{self.kind} names must be non-empty strings, got {name!r}")
      if name in self._items:
        raise ValueError(f"{self.kind} {name!r} registered twice")
      self._items[name] = obj
      return obj
    return add if item is None else add(item)

  def unregister(self, name: str) -> None:
    """Removes `name` (tests that register temporary entries clean up with it)."""
    self.get(name)
    del self._items[name]

  def get(self, name: str) -> T:
    try:
      return self._items[name]
    except (KeyError, TypeError):
      raise errors.UnknownNameError(
          f"unknown {self.kind} {name!r}; known {self.kind}s: {', '.join(self.names())}"
      ) from None

  def names(self) -> list[str]:
    return sorted(self._items)

  def items(self) -> list[tuple[str, T]]:
    return sorted(self._items.items())

  def __contains__(self, name: object) -> bool:
    return name in self._items

  def __iter__(self) -> Iterator[str]:
    return iter(self.names())

  def __len__(self) -> int:
    return len(self._items)


def call_with_options(kind: str, name: str, factory: Callable[..., T], options: dict) -> T:
  """factory(**options), a wrong option becoming a ConfigError that names `kind` and `name`."""
  try:
    return factory(**options)
  except TypeError as e:
    raise errors.ConfigError(f"bad options {options} for {kind} {name!r}: {e}") from None
