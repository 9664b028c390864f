"""The sequence-mixer contract shared by every family of the zoo.

A mixer maps ``x [B, T, d_model]`` to ``y [B, T, d_model]``. With ``state=None`` it runs a whole
sequence from its initial state (training) and returns no state; with a state (from
``init_state``) it continues the sequence from position ``pos`` and returns the new state, so
that feeding a sequence in pieces (prefill, then one token at a time) reproduces one call.
States are pytrees of arrays (orbax saves them). Recurrent state updates go through ``nlx.ops``.
"""

from __future__ import annotations

from typing import Any, Optional

import jax
from flax import nnx

Array = jax.Array
State = Any


class Mixer(nnx.Module):
  """Base class: subclasses implement ``init_state`` and ``__call__``."""

  def init_state(self, batch_size: int, max_len: int) -> State:
    """The state before the first token, for ``batch_size`` sequences of up to ``max_len``."""
    raise NotImplementedError

  def __call__(self, x: Array, state: Optional[State] = None,
               pos: Array | int = 0) -> tuple[Array, Optional[State]]:
    """``x [B, T, d]`` at absolute positions ``pos + arange(T)`` -> ``(y [B, T, d], state)``."""
    raise NotImplementedError
