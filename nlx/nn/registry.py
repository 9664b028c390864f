"""The registry of model families: a name -> the block types of one layer group.

A family registers the mixer constructors of one group of layers (most families have one; Samba
and Titans MAL interleave two), so that a new family is one file plus one ``register`` call::

  register("deltanet", DeltaNet)
  register("samba", Mamba2, lambda cfg, *, rngs: Attention(cfg, rngs=rngs, window=cfg.window))

A family may also replace the SwiGLU MLP of its blocks (``mlp=``): HOPE's blocks use the
Continuum Memory System, a stateful ``Mixer`` (its in-context levels are part of the state).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

from nlx.nn.config import ModelConfig

MixerFactory = Callable[..., object]  # (cfg: ModelConfig, *, rngs) -> Mixer


@dataclasses.dataclass(frozen=True)
class Family:
  """A registered family: its name, the mixers of one layer group, and a config check.

  ``mlp``: None (every block has the SwiGLU MLP), or a factory ``(cfg, *, rngs)`` of the blocks'
  MLP: an ``nnx.Module`` ``x -> y``, or a stateful ``Mixer`` (``init_state``, ``(x, state, pos)``
  and, with packed documents, ``(x, state, pos, segments)``; ``nlx.nn.mixer``).
  """

  name: str
  mixers: tuple[MixerFactory, ...]
  validate: Callable[[ModelConfig], None]
  description: str = ""
  mlp: Optional[MixerFactory] = None


_FAMILIES: dict[str, Family] = {}


def register(name: str, *mixers: MixerFactory, validate: Callable[[ModelConfig], None] = None,
             description: str = "", mlp: Optional[MixerFactory] = None) -> Family:
  """Registers family ``name`` whose layer group applies ``mixers`` in order (and ``mlp``)."""
  if name in _FAMILIES:
    raise ValueError(f"model family {name!r} is already registered")
  if not mixers:
    raise ValueError(f"family {name!r} needs at least one mixer")
  family = Family(name, tuple(mixers), validate or (lambda cfg: None), description, mlp)
  _FAMILIES[name] = family
  return family


def get(name: str) -> Family:
  if name not in _FAMILIES:
    raise ValueError(f"model.family={name!r} is not a registered family; registered: "
                     f"{', '.join(sorted(_FAMILIES))}")
  return _FAMILIES[name]


def names() -> tuple[str, ...]:
  return tuple(sorted(_FAMILIES))
