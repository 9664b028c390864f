"""The sequence-mixer contract shared by every family of the zoo.

A mixer maps ``x [B, T, d_model]`` to ``y [B, T, d_model]``. With ``state=None`` it runs a whole
sequence from its initial state (training) and returns no state; with a state (from
``init_state``) it continues the sequence from position ``pos`` and returns the new state, so
that feeding a sequence in pieces (prefill, then one token at a time) reproduces one call.
States are pytrees of arrays (orbax saves them). Recurrent state updates go through ``nlx.ops``.

Packed documents: ``segments`` is an ``nlx.nn.segments.Segments`` (``reset``, ``positions``,
``doc``, each ``[B, T]``) or None. None is one document per row and leaves the computation as it
is without packing. With segments, each document of a row runs as if alone:

* ``pos`` stays the absolute position of the call's first token in the row (the KV cache's
  slots, sliding windows);
* ``segments.positions`` are the positions inside the documents (RoPE, chunk and segment counts);
* ``segments.doc`` masks attention across documents (the KV cache keeps each slot's document);
* ``segments.reset`` restarts every recurrent state (memories, convolution windows) before the
  token's write (``nlx.ops``' ``reset``).

A stateful call without segments is one document continuing at absolute positions
``pos + arange(T)``, as without packing: it continues the row's last document (attention keeps
hiding the earlier documents), but its RoPE positions are absolute, so after calls with segments
give segments to later calls too (``nlx.nn.model.LM`` builds them from its ``Stream``).
"""

from __future__ import annotations

from typing import Any, Optional

import jax
from flax import nnx

from nlx.nn.segments import Segments

Array = jax.Array
State = Any


class Mixer(nnx.Module):
  """Base class: subclasses implement ``init_state`` and ``__call__``."""

  def init_state(self, batch_size: int, max_len: int) -> State:
    """The state before the first token, for ``batch_size`` sequences of up to ``max_len``."""
    raise NotImplementedError

  def __call__(self, x: Array, state: Optional[State] = None, pos: Array | int = 0,
               segments: Optional[Segments] = None) -> tuple[Array, Optional[State]]:
    """``x [B, T, d]`` at absolute positions ``pos + arange(T)`` (documents: ``segments``) ->
    ``(y [B, T, d], state)``."""
    raise NotImplementedError


def apply(module, x: Array, state=None, pos: Array | int = 0,
          segments: Optional[Segments] = None):
  """``module(x, state, pos, segments)``, or ``module(x, state, pos)`` when ``segments`` is
  None (the call of a mixer without packed documents, whatever its signature)."""
  if segments is None:
    return module(x, state, pos)
  return module(x, state, pos, segments)
