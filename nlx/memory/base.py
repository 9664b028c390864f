"""The ``Memory`` abstraction and the per-slice helpers every scan of the core shares.

A memory is any ``Memory`` whose forward pass uses each of its dense layers exactly once, through
a ``matmul(name, h)`` callback. That single restriction lets the same forward pass run with plain
weights, with gradient taps (per-token gradient factors), and with per-token weights (dual form).
A bias is such a layer too, with a constant-1 input (``[1, out]`` weights).

Every entry of the weights dict is written. Parameters that the forward pass reads but the inner
loop must not write (TTT's inner LayerNorm scale and shift, learned by the outer loop only) are
the memory's *fixed parameters*: ``Memory.param_shapes`` declares them, and every scan takes them
per slice as ``params`` (leaves ``[*batch, ...]``, vmapped with the weights) and binds them to
the memory (``Memory.bind``) inside the per-slice step. They are kept out of the weights dict
because everything that walks that dict (decay, gradient taps, the dual form's per-layer
matmuls, the state) would otherwise need to skip them; outside it, no core algebra changes and a
memory without fixed parameters is untouched. Outer gradients reach them like any other input.
"""

from __future__ import annotations

from typing import Callable, Optional

import jax

Array = jax.Array
Weights = dict  # {layer name: [in, out] array}
MatMul = Callable[[str, Array], Array]


class Memory:
  """A memory ``M(x)`` made of named dense layers, each used once in ``forward``.

  Subclasses define ``forward(matmul, x)`` where ``matmul(name, h)`` computes ``h @ W[name]``;
  ``layer_shapes`` gives the ``[in, out]`` shape of each layer.
  """

  def forward(self, matmul: MatMul, x: Array) -> Array:
    raise NotImplementedError

  def layer_shapes(self, key_dim: int, value_dim: int, hidden_dim: int) -> dict:
    """``{name: (in, out)}``; raises ValueError for dimensions the memory cannot take."""
    raise NotImplementedError

  def hidden_dim(self, weights: Weights) -> int:
    """The hidden width of ``weights`` (leaves ``[..., in, out]``); 0 for one-layer memories."""
    del weights
    return 0

  def apply(self, weights: Weights, x: Array) -> Array:
    """``M(x)`` with plain weights; x ``[..., K]`` -> ``[..., V]``."""
    return self.forward(lambda name, h: h @ weights[name], x)

  def param_shapes(self, key_dim: int, value_dim: int, hidden_dim: int) -> dict:
    """``{name: shape}`` of the fixed (not written) parameters of one slice; none by default."""
    del key_dim, value_dim, hidden_dim
    return {}

  def bind(self, params: Optional[dict]) -> "Memory":
    """This memory with its fixed parameters ``params`` (one slice's) in its forward pass."""
    if params:
      raise ValueError(f"{type(self).__name__} has no fixed parameters; got params with keys "
                       f"{sorted(params)}")
    return self


def bind(memory: Memory, params: Optional[dict]) -> Memory:
  """``memory.bind(params)``, or ``memory`` itself when there are no parameters."""
  return memory if params is None else memory.bind(params)


def tree_scale(a: Array, tree):
  """``a * tree`` for a scalar ``a`` and every leaf."""
  return jax.tree.map(lambda x: a * x, tree)


READS = ("after_write", "before_write")


def check_read(read: str) -> None:
  if read not in READS:
    raise ValueError(f"read={read!r} is not one of {READS}")


def layer_inputs(memory: Memory, weights: Weights, x: Array) -> Weights:
  """The input of every dense layer of ``memory`` (weights ``weights``) in ``M(x)``."""
  inputs = {}

  def matmul(name, h):
    inputs[name] = h
    return h @ weights[name]

  memory.forward(matmul, x)
  return inputs


def batched(fn, batch_ndim: int):
  """``fn`` vmapped over ``batch_ndim`` leading axes of every argument."""
  for _ in range(batch_ndim):
    fn = jax.vmap(fn)
  return fn


def decay_term(dgd) -> bool:
  """Whether the core's ``dgd`` option adds DGD's decay term: True or "proximal" (DGD), not
  False (plain gradient steps) or "normalized" (plain steps at ``layer_rates``' normalised
  rates)."""
  return bool(dgd) and dgd != "normalized"


def check_row_scale(row_scale: Optional[Array], momentum: Optional[Array], dgd: bool,
                    grad_chunk: Optional[int]) -> None:
  """Refuses ``row_scale`` where it is not defined (``nlx.memory.core``)."""
  if row_scale is None:
    return
  if grad_chunk is None:
    raise ValueError("row_scale needs grad_chunk (it scales by the position inside a chunk)")
  if momentum is not None:
    raise ValueError("row_scale is given with momentum: the position-scaled writes are defined "
                     "without momentum only (TTT's schedule); pass momentum=None")
  if dgd:
    raise ValueError(f"row_scale is given with dgd={dgd!r}: the position-scaled writes are defined "
                     "for plain gradient steps at the given rates only (TTT's schedule); pass "
                     "dgd=False")
  if row_scale.shape[-1] != grad_chunk:
    raise ValueError(f"row_scale must have shape [..., C] with C = the chunk size {grad_chunk}; "
                     f"got {row_scale.shape}")
