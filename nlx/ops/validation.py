"""Argument checks of the ops: every user mistake is a ValueError/TypeError that names the argument.

One module for the checks of every op in ``nlx.ops`` (shapes, dtypes, gates, states, options,
the memory and its continuation state), so that each op's module reads as its algorithm. They
run on concrete Python values and shapes, before anything is traced.
"""

from __future__ import annotations

import numbers
from typing import Optional

import jax.numpy as jnp

from nlx.memory import core
from nlx.memory.deep import MLPMemory
from nlx.memory.linear import LINEAR, LinearMemory

IMPLS = ("auto", "chunked", "recurrent", "pallas")
FLOAT_DTYPES = (jnp.float16, jnp.bfloat16, jnp.float32, jnp.float64)


def check_float(name: str, x) -> None:
  dtype = getattr(x, "dtype", None)
  if dtype is None or not any(dtype == d for d in FLOAT_DTYPES):
    raise TypeError(f"{name} must be a floating-point array (float16, bfloat16, float32 or "
                    f"float64); got dtype {dtype}")


def check_sequences(q, k, v) -> tuple[int, int, int, int, int]:
  """Checks q, k ``[B, T, H, K]`` and v ``[B, T, H, V]``; returns (B, T, H, K, V)."""
  for name, x in (("q", q), ("k", k), ("v", v)):
    if getattr(x, "ndim", None) != 4:
      raise ValueError(f"{name} must have shape [B, T, H, D]; got shape "
                       f"{getattr(x, 'shape', type(x).__name__)}")
    check_float(name, x)
    if 0 in x.shape:
      raise ValueError(f"{name} must have no empty axis; got shape {x.shape}")
  if k.shape != q.shape:
    raise ValueError(f"k must have the shape of q {q.shape} ([B, T, H, K]); got {k.shape}")
  if v.shape[:3] != q.shape[:3]:
    raise ValueError(f"v must have shape [B, T, H, V] = {q.shape[:3]} + [V]; got {v.shape}")
  if not q.dtype == k.dtype == v.dtype:
    raise TypeError(f"q, k and v must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
  return (*q.shape, v.shape[-1])


def check_gate(name: str, x, b: int, t: int, h: int, required: bool) -> None:
  if x is None:
    if required:
      raise ValueError(f"{name} is required: an array of shape [B, T, H] = {(b, t, h)}")
    return
  if getattr(x, "shape", None) != (b, t, h):
    raise ValueError(f"{name} must have shape [B, T, H] = {(b, t, h)}; got "
                     f"{getattr(x, 'shape', type(x).__name__)}")
  check_float(name, x)


def check_reset(reset, b: int, t: int) -> None:
  """Checks ``reset``: None, or a bool/integer ``[B, T]`` array of document boundaries."""
  if reset is None:
    return
  if getattr(reset, "shape", None) != (b, t):
    raise ValueError(f"reset must have shape [B, T] = {(b, t)} (true where a document starts); "
                     f"got {getattr(reset, 'shape', type(reset).__name__)}")
  dtype = reset.dtype
  if not (dtype == jnp.bool_ or jnp.issubdtype(dtype, jnp.integer)):
    raise TypeError(f"reset must be a bool or integer (0/1) array of shape [B, T]; got dtype "
                    f"{dtype}")


def check_state(name: str, x, shape: tuple) -> None:
  if getattr(x, "shape", None) != tuple(shape):
    raise ValueError(f"{name} must have shape {tuple(shape)}; got "
                     f"{getattr(x, 'shape', type(x).__name__)}")
  check_float(name, x)


def check_options(chunk_size, impl, scale=None) -> str:
  if isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral) or chunk_size < 1:
    raise ValueError(f"chunk_size must be a positive int; got {chunk_size!r}")
  if impl not in IMPLS:
    raise ValueError(f"impl={impl!r} is not one of {IMPLS}")
  if scale is not None and (isinstance(scale, bool) or not isinstance(scale, numbers.Real)):
    raise ValueError(f"scale must be a real number or None; got {scale!r}")
  return impl


def check_objective(objective: str) -> None:
  if objective not in ("l2", "dot"):
    raise ValueError(f"objective={objective!r} is not one of ('l2', 'dot')")


def resolve_memory(memory) -> core.Memory:
  if isinstance(memory, core.Memory):
    return memory
  if memory == "linear":
    return LINEAR
  if memory == "mlp":
    return MLPMemory()
  raise ValueError(f"memory={memory!r} is not supported; allowed: 'linear', 'mlp', or an "
                   f"nlx.memory Memory instance such as MLPMemory(activation='silu')")


def check_offset(offset, chunk_start, chunk_size: int, b: Optional[int] = None):
  """Validates ``initial_state.offset`` (and that ``chunk_start`` comes with it): an int, an
  integer scalar, or (after a call with document boundaries, whose rows differ) ``[B]``."""
  if (offset is None) != (chunk_start is None):
    raise ValueError("initial_state.chunk_start and initial_state.offset must be given together "
                     "(both come from a previous titans_memory/dgd_memory call) or both be None")
  if offset is None:
    return
  if isinstance(offset, numbers.Integral) and not isinstance(offset, bool):
    if not 0 <= offset < chunk_size:
      raise ValueError(f"initial_state.offset={offset} must be in [0, chunk_size={chunk_size})")
  elif not (getattr(offset, "shape", None) in ((), (b,)) and
            jnp.issubdtype(getattr(offset, "dtype", jnp.float32), jnp.integer)):
    raise ValueError(f"initial_state.offset must be an int, an integer scalar array or an integer "
                     f"[B] = [{b}] array; got {getattr(offset, 'shape', type(offset).__name__)}")


def check_memory_state(memory: core.Memory, parts: tuple, b, h, dk, dv, chunk_size):
  """Validates the parts ``(memory, momentum, chunk_start, offset, accumulated)`` of a
  ``titans_memory``/``dgd_memory`` ``initial_state``; returns them with the linear memory's
  arrays as ``{"w": ...}`` dicts (each None when absent)."""
  weights, mom, start, offset, acc = parts
  check_offset(offset, start, chunk_size, b)
  trees = (("initial_state.momentum", mom), ("initial_state.chunk_start", start),
           ("initial_state.accumulated", acc))
  if isinstance(memory, LinearMemory):
    if weights is None:
      if acc is not None:
        raise ValueError("initial_state.accumulated is given without initial_state.memory")
      return None, None, None, None, None
    check_state("initial_state.memory", weights, (b, h, dk, dv))
    for label, x in trees:
      if x is not None:
        check_state(label, x, (b, h, dk, dv))
    wrap = lambda x: None if x is None else {"w": x}
    return wrap(weights), wrap(mom), wrap(start), offset, wrap(acc)
  if weights is None:
    if isinstance(memory, MLPMemory):
      raise ValueError("an MLP memory needs initial_state: zero MLP weights have "
                       "zero gradients and never learn; create one with "
                       "MLPMemory().init_state(key, batch, heads, dim, hidden)")
    raise ValueError(f"memory={memory!r} needs initial_state (its weights, a dict with keys "
                     f"{sorted(memory.layer_shapes(dk, dv, 1))}), e.g. from its init_state")
  names = set(memory.layer_shapes(dk, dv, 1))
  for label, tree in (("initial_state.memory", weights),) + trees:
    if tree is None:
      continue
    if not isinstance(tree, dict) or set(tree) != names:
      raise ValueError(f"{label} must be a dict with keys {sorted(names)}; got "
                       f"{sorted(tree) if isinstance(tree, dict) else type(tree).__name__}")
    for name in names:
      if getattr(tree[name], "ndim", None) != 4:
        raise ValueError(f"{label}[{name!r}] must have shape [B, H, in, out]; got "
                         f"{getattr(tree[name], 'shape', type(tree[name]).__name__)}")
    for name, shape in memory.layer_shapes(dk, dv, memory.hidden_dim(tree)).items():
      check_state(f"{label}[{name!r}]", tree[name], (b, h) + shape)
  return weights, mom, start, offset, acc


def check_position_scale(position_scale, chunk_size: int, momentum, dgd: bool) -> None:
  if position_scale is None:
    return
  if getattr(position_scale, "shape", None) != (chunk_size,):
    raise ValueError(f"position_scale must have shape [chunk_size] = ({chunk_size},); got "
                     f"{getattr(position_scale, 'shape', type(position_scale).__name__)}")
  check_float("position_scale", position_scale)
  if momentum is not None:
    raise ValueError("position_scale is given with momentum: position-scaled writes are "
                     "defined without momentum only (TTT's schedule); pass momentum=None")
  if dgd:
    raise ValueError("position_scale is not defined for dgd_memory")


def check_memory_params(memory: core.Memory, memory_params, h, dk, dv, hidden):
  """Validates ``memory_params`` against the memory's fixed parameters."""
  shapes = memory.param_shapes(dk, dv, hidden)
  if memory_params is None:
    if shapes:
      raise ValueError(f"memory={memory!r} needs memory_params: a dict {{name: [H, ...]}} with "
                       f"shapes {{name: [{h}] + shape}} for {shapes}")
    return
  if not shapes:
    raise ValueError(f"memory={memory!r} has no fixed parameters; memory_params must be None, "
                     f"got a {type(memory_params).__name__}")
  if not isinstance(memory_params, dict) or set(memory_params) != set(shapes):
    got = (sorted(memory_params) if isinstance(memory_params, dict)
           else type(memory_params).__name__)
    raise ValueError(f"memory_params must be a dict with keys {sorted(shapes)}; got {got}")
  for name, shape in shapes.items():
    check_state(f"memory_params[{name!r}]", memory_params[name], (h,) + tuple(shape))


def check_continuation(momentum, position_scale, mom, start, offset, acc):
  """Checks that a continued state fits the call's gates; returns ``(start, offset, acc)``, all
  None when the state starts a chunk now (nothing to continue)."""
  if momentum is None and mom is not None:
    raise ValueError("initial_state.momentum is given but momentum=None; pass the momentum "
                     "gates, or an initial_state without momentum")
  if position_scale is None and acc is not None:
    raise ValueError("initial_state.accumulated is given but position_scale=None; it belongs to "
                     "a position-scaled call (pass the same position_scale)")
  if isinstance(offset, numbers.Integral) and offset == 0:
    start, offset, acc = None, None, None  # a chunk starts now: nothing to continue
  if position_scale is not None and offset is not None and acc is None:
    raise ValueError("initial_state continues a chunk (offset given) with position_scale but "
                     "has no accumulated writes: pass the TitansState returned by the previous "
                     "position-scaled call")
  return start, offset, acc


def check_reset_state(memory: core.Memory, reset, reset_state, weights, b, h, dk, dv):
  """Validates ``reset_state``, the memory a document boundary restores; returns it as weights
  (``{"w": ...}`` for the linear memory; zeros when None and the memory is linear)."""
  if reset_state is None:
    if reset is not None and not isinstance(memory, LinearMemory):
      raise ValueError(f"reset is given with memory={memory!r}: pass reset_state, the weights a "
                       "document boundary restores (e.g. the memory's learned initial weights)")
    return None
  if reset is None:
    raise ValueError("reset_state is given but reset=None; it is the memory a document boundary "
                     "restores (pass reset, or drop reset_state)")
  if isinstance(memory, LinearMemory):
    check_state("reset_state", reset_state, (b, h, dk, dv))
    return {"w": reset_state}
  hidden = memory.hidden_dim(weights if weights is not None else reset_state)
  if not isinstance(reset_state, dict):
    raise ValueError(f"reset_state must be a dict with keys "
                     f"{sorted(memory.layer_shapes(dk, dv, hidden))}; got "
                     f"{type(reset_state).__name__}")
  for name, shape in memory.layer_shapes(dk, dv, hidden).items():
    if name not in reset_state:
      raise ValueError(f"reset_state has no layer {name!r}; it must have the keys "
                       f"{sorted(memory.layer_shapes(dk, dv, hidden))}")
    check_state(f"reset_state[{name!r}]", reset_state[name], (b, h) + shape)
  return reset_state
