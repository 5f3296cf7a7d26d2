"""Which parameters train: the trainable set of a run, declared in its config.

    model.trainable = ("lora", "fresh")     # selectors of the parameters the optimizer updates
    model.frozen = ("image_encoder",)       # selectors held fixed even when selected above
    model.allow_frozen_fresh = ()           # selectors of fresh parameters that may stay
                                            # frozen (("vae",): a random VAE kept as plumbing)

Selectors (each matches a set of parameters; paths are '/'-joined, e.g.
`unet/down_blocks/0/attentions/0/proj_in/kernel`):

    "all"          every parameter
    "lora"         the LoRA adapters (`nnx.LoRAParam`, models/lora.py)
    "fresh"        parameters with no pretrained value: every parameter of a module that was not
                   read from a checkpoint, LoRA adapters, and what a load reshapes (a widened
                   `conv_in`, a re-initialised `conv_out`: `Provenance`)
    "pretrained"   parameters read from a checkpoint as they are
    "unet", "unet/conv_in", ...   a module or a path prefix (whole '/'-separated parts)
    "re:<regex>"   parameters whose path matches the regex (`re.search`)

Defaults: `trainable` is ("lora", "fresh") when the config has `model.lora` (the adapters and
everything the model adds on top of the pretrained weights: task tokens, projections, widened
channels), else ("all",). Tuples, so `--config.model.frozen='("unet",)'` overrides them. `frozen` always holds the latent space's VAE (unless
`model.vae.trainable`) and a frozen image-encoder tower (`image_encoder_options.trainable=False`),
then the config's own selectors.

A run refuses (ConfigError) a set that leaves fresh parameters frozen, since they would stay at
their random initialisation for the whole run, unless `model.allow_frozen_fresh` covers them.
`TrainableSet.summary()` is the table `main train` prints at start.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Iterable, Sequence

import numpy as np
from flax import nnx

from dense_diffusion import errors

IMAGE_TOWER = "image_encoder/vision_model"  # models/image_encoder.FROZEN_TOWER_PATH in the model.
VAE = "vae"  # experiment/model.VAE_PATH.
KEYWORDS = ("all", "lora", "fresh", "pretrained")


def path_name(path: Sequence[Any]) -> str:
  return "/".join(str(p) for p in path)


@dataclasses.dataclass
class Provenance:
  """Which parameters a model build read from checkpoints (filled by `build_model`).

  `loaded[prefix]` = the paths under `prefix` that the load did not take as they are
  (`convert.unet.fresh_params`, the image encoder's projection), relative to `prefix`.
  """
  loaded: dict[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)

  def add(self, prefix: str, fresh: Iterable[str] = ()) -> None:
    self.loaded[prefix] = tuple(fresh)

  def is_pretrained(self, name: str) -> bool:
    for prefix, fresh in self.loaded.items():
      if _under(name, prefix):
        rest = name[len(prefix) + 1:]
        return not any(_under(rest, f) for f in fresh)
    return False


def _under(name: str, prefix: str) -> bool:
  return name == prefix or name.startswith(prefix + "/")


@dataclasses.dataclass(frozen=True)
class Param:
  name: str
  size: int
  lora: bool
  fresh: bool
  trainable: bool

  @property
  def module(self) -> str:
    return self.name.split("/", 1)[0]


def _selector_matches(selector: str, p: Param) -> bool:
  if selector == "all":
    return True
  if selector == "lora":
    return p.lora
  if selector == "fresh":
    return p.fresh
  if selector == "pretrained":
    return not p.fresh
  if selector.startswith("re:"):
    return re.search(selector[3:], p.name) is not None
  return _under(p.name, selector.strip("/"))


def _selectors(value: Any, key: str) -> list[str]:
  if value is None:
    return []
  if isinstance(value, str):
    value = [value]
  out = []
  for s in value:
    if not isinstance(s, str) or not s:
      raise errors.ConfigError(f"model.{key} holds {s!r}; selectors are strings: "
                               f"{', '.join(KEYWORDS)}, a module path, or 're:<regex>'")
    if s.startswith("re:"):
      try:
        re.compile(s[3:])
      except re.error as e:
        raise errors.ConfigError(f"model.{key}: {s!r} is not a valid regex ({e})") from None
    out.append(s)
  return out


def default_frozen(model_config: Any) -> list[str]:
  """The selectors frozen whatever the config's `trainable` says (see module doc)."""
  frozen = []
  vae = dict(model_config.get("vae") or {})
  if model_config.get("latent") and not vae.get("trainable", False):
    frozen.append(VAE)
  options = dict(model_config.get("image_encoder_options") or {})
  if model_config.get("image_encoder") and not options.get("trainable", False):
    frozen.append(IMAGE_TOWER)
  return frozen


@dataclasses.dataclass
class TrainableSet:
  """The run's parameters, each with its provenance and whether it trains."""
  params: list[Param]
  trainable_selectors: list[str]
  frozen_selectors: list[str]

  @property
  def names(self) -> frozenset[str]:
    return frozenset(p.name for p in self.params if p.trainable)

  def filter(self):
    """NNX filter of the trainable parameters (for `nnx.split(model, filter, ...)`)."""
    names = self.names

    def trainable(path, value) -> bool:
      return isinstance(value, nnx.Param) and path_name(path) in names
    return trainable

  def fresh_frozen(self) -> list[Param]:
    return [p for p in self.params if p.fresh and not p.trainable]

  def summary(self) -> str:
    """Per top-level module: parameters trained / frozen, and how many are fresh."""
    rows: dict[str, list[int]] = {}
    for p in self.params:
      r = rows.setdefault(p.module, [0, 0, 0, 0])
      r[0 if p.trainable else 1] += p.size
      r[2 if p.fresh else 3] += p.size
    width = max([len("module")] + [len(m) for m in rows])
    lines = [f"trainable set: model.trainable={self.trainable_selectors} "
             f"frozen={self.frozen_selectors}",
             f"  {'module':<{width}}  {'trainable':>12}  {'frozen':>12}  {'fresh':>12}  "
             f"{'pretrained':>12}"]
    total = [0, 0, 0, 0]
    for module, r in sorted(rows.items()):
      lines.append(f"  {module:<{width}}  {r[0]:>12,}  {r[1]:>12,}  {r[2]:>12,}  {r[3]:>12,}")
      total = [a + b for a, b in zip(total, r)]
    lines.append(f"  {'total':<{width}}  {total[0]:>12,}  {total[1]:>12,}  {total[2]:>12,}  "
                 f"{total[3]:>12,}")
    return "\n".join(lines)

  def fresh_frozen_not_allowed(self, allow: Any) -> list[Param]:
    """The fresh frozen parameters that the selectors `allow` do not cover."""
    allowed = _selectors(allow or None, "allow_frozen_fresh")
    return [p for p in self.fresh_frozen() if not any(_selector_matches(s, p) for s in allowed)]

  def check_fresh_frozen(self, allow: Any) -> None:
    """ConfigError when fresh parameters stay frozen and the selectors `allow` do not cover
    them."""
    stuck = self.fresh_frozen_not_allowed(allow)
    if not stuck:
      return
    modules = sorted({p.module for p in stuck})
    size = sum(p.size for p in stuck)
    example = ", ".join(p.name for p in stuck[:3])
    raise errors.ConfigError(
        f"model.trainable={self.trainable_selectors} / model.frozen={self.frozen_selectors} "
        f"leave {len(stuck)} freshly initialised parameters ({size:,} values, in "
        f"{', '.join(modules)}; e.g. {example}) frozen at their random values: train them "
        f"(\"fresh\" in model.trainable, not in model.frozen; a VAE: model.vae.trainable), "
        f"load their weights, or say model.allow_frozen_fresh={tuple(modules)!r} if that is "
        f"meant")


def select(model: nnx.Module, model_config: Any, provenance: Provenance) -> TrainableSet:
  """The trainable set of `model` under the config's `model.trainable` / `model.frozen`."""
  lora = model_config.get("lora")
  trainable = _selectors(model_config.get("trainable"), "trainable") or (
      ["lora", "fresh"] if lora else ["all"])
  always_frozen = default_frozen(model_config)
  frozen = always_frozen + _selectors(model_config.get("frozen"), "frozen")
  flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
  infos = []
  for path, var in flat:
    name = path_name(path)
    is_lora = isinstance(var, nnx.LoRAParam)
    infos.append(Param(name=name, size=int(np.prod(var.get_value().shape)), lora=is_lora,
                       fresh=is_lora or not provenance.is_pretrained(name), trainable=False))
  # A selector that names no parameter is a typo (or a module this model does not have).
  for key, selectors in (("trainable", trainable), ("frozen", frozen)):
    for s in selectors:
      if s in KEYWORDS or s in always_frozen:
        continue
      if not any(_selector_matches(s, p) for p in infos):
        modules = sorted({p.module for p in infos})
        raise errors.ConfigError(f"model.{key} selector {s!r} matches no parameter; modules "
                                 f"of this model: {', '.join(modules)}")
  params = [dataclasses.replace(
      p, trainable=any(_selector_matches(s, p) for s in trainable)
      and not any(_selector_matches(s, p) for s in frozen)) for p in infos]
  return TrainableSet(params, trainable, frozen)
