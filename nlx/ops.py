"""Public sequence ops of nlx: associative memories over ``[B, T, H, D]`` sequences.

Conventions (README.md, "The ops"; the layout of flash-linear-attention):

* q, k: ``[B, T, H, K]``; v: ``[B, T, H, V]``; gates (g, beta, lr, momentum): ``[B, T, H]``.
* ``g`` is a log-decay (≤ 0; the memory is multiplied by ``exp(g_t)`` before token t's write).
* A matrix memory's state is ``[B, H, K, V]``; token t reads ``o_t = S_tᵀ (scale · q_t)`` after its
  own write.
* Recurrences accumulate in float32 (float64 for float64 inputs); ``o`` takes the input dtype and
  the final state stays in the accumulation dtype.
* Every op returns ``(o, final_state)``; passing ``final_state`` as ``initial_state`` of the next
  call continues the sequence.
* Gates are keyword-only (``delta_rule(q, k, v, beta=beta, g=g)``): flash-linear-attention orders
  them ``(q, k, v, g, beta)``, and a positional call in that order would compute something else
  silently; here it is a TypeError.

``impl`` picks the algorithm: ``"recurrent"`` (token-by-token ``lax.scan``: the reference),
``"chunked"`` (parallel form over chunks of ``chunk_size`` tokens), ``"pallas"`` (the kernels of
``pallas_kernels/chunked_memory``: Triton on GPU, Mosaic on TPU, the GPU kernel in Pallas interpret
mode on CPU) and ``"auto"``: the kernel on GPU/TPU when it supports the arguments (float32/bfloat16,
power-of-two head dims and chunk size in [16, 256], a linear memory), else ``"chunked"``.

All three ops are instances of the one memory core in ``nlx.memory``.
"""

from __future__ import annotations

import numbers
from typing import NamedTuple, Optional, Union

import jax
import jax.numpy as jnp

from nlx.memory import core
from nlx.memory.deep import MLPMemory
from nlx.memory.linear import LINEAR, LinearMemory, delta_rule_chunked
from nlx.memory.objectives import DOT, L2
from pallas_kernels.chunked_memory import ops as pallas_ops

Array = jax.Array

IMPLS = ("auto", "chunked", "recurrent", "pallas")
FLOAT_DTYPES = (jnp.float16, jnp.bfloat16, jnp.float32, jnp.float64)


class TitansState(NamedTuple):
  """State of ``titans_memory``: the memory weights and, with momentum, the momentum (surprise).

  ``memory`` is ``[B, H, K, V]`` for the linear memory, or ``{"w2": [B, H, K, hidden],
  "w1": [B, H, hidden, V]}`` for the MLP memory; ``momentum`` has the same structure, or is None.

  ``chunk_start`` and ``offset`` say where the next token falls in its gradient chunk: ``offset``
  tokens of it (int, 0 ≤ offset < chunk_size; may be a traced int32 scalar) were written by an
  earlier call, whose start weights (the chunk's gradient reference) are ``chunk_start`` (same
  structure as ``memory``). ``titans_memory`` returns them, so a sequence split anywhere across
  calls (prefill, then token-by-token decoding) equals one call. None means a chunk starts now.

  ``accumulated`` (only with ``titans_memory``'s ``position_scale``): the chunk in progress's
  writes summed before the position scale (``A`` of ``nlx.memory.core``; same structure as
  ``memory``; zeros when a chunk starts now). The weights of a position-scaled chunk are not a
  function of the previous weights alone, so continuing a chunk needs it. None otherwise.
  """

  memory: Union[Array, dict]
  momentum: Optional[Union[Array, dict]] = None
  chunk_start: Optional[Union[Array, dict]] = None
  offset: Optional[Union[int, Array]] = None
  accumulated: Optional[Union[Array, dict]] = None


# ----------------------------------------------------------------------------------------------
# Validation: every user mistake is a ValueError/TypeError that names the argument.
# ----------------------------------------------------------------------------------------------


def _check_float(name: str, x) -> None:
  dtype = getattr(x, "dtype", None)
  if dtype is None or not any(dtype == d for d in FLOAT_DTYPES):
    raise TypeError(f"{name} must be a floating-point array (float16, bfloat16, float32 or "
                    f"float64); got dtype {dtype}")


def _check_sequences(q, k, v) -> tuple[int, int, int, int, int]:
  """Checks q, k ``[B, T, H, K]`` and v ``[B, T, H, V]``; returns (B, T, H, K, V)."""
  for name, x in (("q", q), ("k", k), ("v", v)):
    if getattr(x, "ndim", None) != 4:
      raise ValueError(f"{name} must have shape [B, T, H, D]; got shape "
                       f"{getattr(x, 'shape', type(x).__name__)}")
    _check_float(name, x)
    if 0 in x.shape:
      raise ValueError(f"{name} must have no empty axis; got shape {x.shape}")
  if k.shape != q.shape:
    raise ValueError(f"k must have the shape of q {q.shape} ([B, T, H, K]); got {k.shape}")
  if v.shape[:3] != q.shape[:3]:
    raise ValueError(f"v must have shape [B, T, H, V] = {q.shape[:3]} + [V]; got {v.shape}")
  if not q.dtype == k.dtype == v.dtype:
    raise TypeError(f"q, k and v must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
  return (*q.shape, v.shape[-1])


def _check_gate(name: str, x, b: int, t: int, h: int, required: bool) -> None:
  if x is None:
    if required:
      raise ValueError(f"{name} is required: an array of shape [B, T, H] = {(b, t, h)}")
    return
  if getattr(x, "shape", None) != (b, t, h):
    raise ValueError(f"{name} must have shape [B, T, H] = {(b, t, h)}; got "
                     f"{getattr(x, 'shape', type(x).__name__)}")
  _check_float(name, x)


def _check_state(name: str, x, shape: tuple) -> None:
  if getattr(x, "shape", None) != tuple(shape):
    raise ValueError(f"{name} must have shape {tuple(shape)}; got "
                     f"{getattr(x, 'shape', type(x).__name__)}")
  _check_float(name, x)


def _check_options(chunk_size, impl, scale=None) -> str:
  if isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral) or chunk_size < 1:
    raise ValueError(f"chunk_size must be a positive int; got {chunk_size!r}")
  if impl not in IMPLS:
    raise ValueError(f"impl={impl!r} is not one of {IMPLS}")
  if scale is not None and (isinstance(scale, bool) or not isinstance(scale, numbers.Real)):
    raise ValueError(f"scale must be a real number or None; got {scale!r}")
  return impl


def _resolve_impl(impl: str, kind: str, q, k, v, chunk_size: int,
                  reason: Optional[str] = None) -> str:
  """``impl`` with "auto" resolved; "pallas" checked against what the kernels support.

  ``reason``: why the kernels cannot take this call, when the caller already knows.
  """
  if impl not in ("auto", "pallas"):
    return impl
  reason = reason or pallas_ops.unsupported(kind, q, k, v, chunk_size)
  if impl == "pallas":
    if reason:
      raise ValueError(f"impl='pallas': {reason}; use impl='chunked' or 'recurrent'")
    return impl
  on_accelerator = jax.default_backend() in ("gpu", "cuda", "rocm", "tpu")
  return "pallas" if on_accelerator and not reason else "chunked"


def _compute_dtype(dtype) -> jnp.dtype:
  """float32 accumulation for 16/32-bit inputs, float64 for float64."""
  return jnp.promote_types(dtype, jnp.float32)


# ----------------------------------------------------------------------------------------------
# Layout: the core works on [B, H, T, ...] with two leading batch axes.
# ----------------------------------------------------------------------------------------------


def _heads_first(x):
  """``[B, T, H, ...] -> [B, H, T, ...]`` (None passes through)."""
  return None if x is None else jnp.moveaxis(x, 2, 1)


def _linear_memory_op(q, k, v, lr, g, scale, initial_state, chunk_size, impl, objective):
  """Shared body of linear_attention and delta_rule (validated inputs)."""
  b, t, h, dk, dv = q.shape[0], q.shape[1], q.shape[2], q.shape[3], v.shape[3]
  scale = dk**-0.5 if scale is None else scale
  if impl == "pallas":
    kind, beta = ("linear_attention", None) if objective is DOT else ("delta_rule", lr)
    o, state, _ = pallas_ops.chunked_memory(kind, q, k, v, beta=beta, g=g,
                                            initial_state=initial_state, scale=scale,
                                            chunk_size=chunk_size)
    return o, state
  cdt = _compute_dtype(q.dtype)
  cast = lambda x: None if x is None else jnp.asarray(x, cdt)
  qs = _heads_first(cast(q) * scale)
  ks, vs = _heads_first(cast(k)), _heads_first(cast(v))
  lr = jnp.moveaxis(cast(lr), 2, 1)
  g = jnp.zeros_like(lr) if g is None else jnp.moveaxis(cast(g), 2, 1)
  s0 = jnp.zeros((b, h, dk, dv), cdt) if initial_state is None else cast(initial_state)

  if impl == "recurrent":
    o, state, _, _, _ = core.recurrent_scan(LINEAR, objective, qs, ks, vs, lr, g, None,
                                            {"w": s0}, None, batch_ndim=2)
    state = state["w"]
  elif objective is DOT:  # chunked: the dot objective's gradient is state-free: exact
    o, state, _ = core.chunk_start_scan(LINEAR, objective, qs, ks, vs, lr, g, None, {"w": s0},
                                        None, chunk_size, batch_ndim=2)
    state = state["w"]
  else:
    o, state = delta_rule_chunked(qs, ks, vs, lr, g, s0, chunk_size, batch_ndim=2)
  return jnp.moveaxis(o, 1, 2).astype(q.dtype), state


def linear_attention(q: Array, k: Array, v: Array, *, g: Optional[Array] = None,
                     scale: Optional[float] = None, initial_state: Optional[Array] = None,
                     chunk_size: int = 64, impl: str = "auto") -> tuple[Array, Array]:
  """(Gated) linear attention: ``S ← exp(g_t) S + k_t v_tᵀ``, ``o_t = S_tᵀ (scale q_t)``.

  The dot-product memory of docs/EQUATIONS.md §1. g=None is linear attention; g constant per head is
  RetNet; data-dependent g is Mamba2/SSD and scalar-gated GLA. The chunked form is exact for
  every chunk size and sequence length.

  Args:
    q, k: ``[B, T, H, K]``; v: ``[B, T, H, V]``; g: ``[B, T, H]`` log-decay (≤ 0) or None.
    scale: multiplies q; default ``K ** -0.5``.
    initial_state: ``[B, H, K, V]`` or None (zeros).
    chunk_size: tokens per chunk of the chunked form.
    impl: "auto" | "chunked" | "recurrent" | "pallas".

  Returns:
    ``(o [B, T, H, V] in q's dtype, final_state [B, H, K, V] in float32/float64)``.
  """
  b, t, h, dk, dv = _check_sequences(q, k, v)
  _check_gate("g", g, b, t, h, required=False)
  if initial_state is not None:
    _check_state("initial_state", initial_state, (b, h, dk, dv))
  impl = _resolve_impl(_check_options(chunk_size, impl, scale), "linear_attention", q, k, v,
                       chunk_size)
  ones = jnp.ones((b, t, h), _compute_dtype(q.dtype))
  return _linear_memory_op(q, k, v, ones, g, scale, initial_state, chunk_size, impl, DOT)


def delta_rule(q: Array, k: Array, v: Array, *, beta: Array, g: Optional[Array] = None,
               scale: Optional[float] = None, initial_state: Optional[Array] = None,
               chunk_size: int = 64, impl: str = "auto") -> tuple[Array, Array]:
  """(Gated) delta rule: ``S ← exp(g_t) S``; ``S ← S + β_t k_t (v_t − Sᵀ k_t)ᵀ``; ``o_t = S_tᵀ(scale q_t)``.

  One online gradient step of ``½‖Sᵀk − v‖²`` per token: DeltaNet (g=None), Gated DeltaNet, and
  HOPE's DGD on a linear memory (docs/EQUATIONS.md §4). The chunked form (UT transform) is exact for
  every chunk size and sequence length. Keys are used as given (DeltaNet L2-normalises them first).

  Args:
    q, k: ``[B, T, H, K]``; v: ``[B, T, H, V]``; beta: ``[B, T, H]`` write strength;
    g: ``[B, T, H]`` log-decay (≤ 0) or None.
    scale, initial_state, chunk_size, impl: as in ``linear_attention``.

  Returns:
    ``(o [B, T, H, V], final_state [B, H, K, V])``.
  """
  b, t, h, dk, dv = _check_sequences(q, k, v)
  _check_gate("beta", beta, b, t, h, required=True)
  _check_gate("g", g, b, t, h, required=False)
  if initial_state is not None:
    _check_state("initial_state", initial_state, (b, h, dk, dv))
  impl = _resolve_impl(_check_options(chunk_size, impl, scale), "delta_rule", q, k, v, chunk_size)
  return _linear_memory_op(q, k, v, beta, g, scale, initial_state, chunk_size, impl, L2)


def _resolve_memory(memory) -> core.Memory:
  if isinstance(memory, core.Memory):
    return memory
  if memory == "linear":
    return LINEAR
  if memory == "mlp":
    return MLPMemory()
  raise ValueError(f"memory={memory!r} is not supported; allowed: 'linear', 'mlp', or an "
                   f"nlx.memory Memory instance such as MLPMemory(activation='silu')")


def _check_offset(offset, chunk_start, chunk_size: int):
  """Validates ``initial_state.offset`` (and that ``chunk_start`` comes with it)."""
  if (offset is None) != (chunk_start is None):
    raise ValueError("initial_state.chunk_start and initial_state.offset must be given together "
                     "(both come from a previous titans_memory/dgd_memory call) or both be None")
  if offset is None:
    return
  if isinstance(offset, numbers.Integral) and not isinstance(offset, bool):
    if not 0 <= offset < chunk_size:
      raise ValueError(f"initial_state.offset={offset} must be in [0, chunk_size={chunk_size})")
  elif not (getattr(offset, "shape", None) == () and
            jnp.issubdtype(getattr(offset, "dtype", jnp.float32), jnp.integer)):
    raise ValueError(f"initial_state.offset must be an int or an integer scalar array; got "
                     f"{getattr(offset, 'shape', type(offset).__name__)}")


def _check_titans_state(memory: core.Memory, state, b, h, dk, dv, chunk_size):
  """Validates and splits ``initial_state`` into weights, momentum, chunk-start and accumulated
  dicts (each or None) and the offset."""
  if isinstance(state, TitansState):
    weights, mom, start, offset, acc = state
  else:
    weights, mom, start, offset, acc = state, None, None, None, None
  _check_offset(offset, start, chunk_size)
  trees = (("initial_state.momentum", mom), ("initial_state.chunk_start", start),
           ("initial_state.accumulated", acc))
  if isinstance(memory, LinearMemory):
    if weights is None:
      if acc is not None:
        raise ValueError("initial_state.accumulated is given without initial_state.memory")
      return None, None, None, None, None
    _check_state("initial_state.memory", weights, (b, h, dk, dv))
    for label, x in trees:
      if x is not None:
        _check_state(label, x, (b, h, dk, dv))
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
      _check_state(f"{label}[{name!r}]", tree[name], (b, h) + shape)
  return weights, mom, start, offset, acc


def _check_position_scale(position_scale, chunk_size: int, momentum, dgd: bool) -> None:
  if position_scale is None:
    return
  if getattr(position_scale, "shape", None) != (chunk_size,):
    raise ValueError(f"position_scale must have shape [chunk_size] = ({chunk_size},); got "
                     f"{getattr(position_scale, 'shape', type(position_scale).__name__)}")
  _check_float("position_scale", position_scale)
  if momentum is not None:
    raise ValueError("position_scale is given with momentum: position-scaled writes are "
                     "defined without momentum only (TTT's schedule); pass momentum=None")
  if dgd:
    raise ValueError("position_scale is not defined for dgd_memory")


def _check_memory_params(memory: core.Memory, memory_params, h, dk, dv, hidden):
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
    _check_state(f"memory_params[{name!r}]", memory_params[name], (h,) + tuple(shape))


def _titans_pallas(q, k, v, lr, momentum, g, state, offset, chunk_size):
  """``titans_memory`` on the kernels, which take whole chunks aligned with their call.

  A chunk in progress (static ``offset``) is finished by the XLA form; whole chunks run on the
  kernel; a final partial chunk runs as a second kernel call, so that the state at its start
  (the returned ``chunk_start``) is known.
  """
  t = q.shape[1]
  piece = lambda x, a, b: None if x is None else x[:, a:b]
  call = lambda a, b, st, impl: titans_memory(
      piece(q, a, b), piece(k, a, b), piece(v, a, b), lr=piece(lr, a, b),
      momentum=piece(momentum, a, b), g=piece(g, a, b), initial_state=st,
      chunk_size=chunk_size, impl=impl)
  if offset:  # finish the chunk in progress, then continue on the kernel
    head = min(chunk_size - offset, t)
    o1, state = call(0, head, state, "chunked")
    if head == t:
      return o1, state
    o2, state = call(head, t, state, "pallas")
    return jnp.concatenate([o1, o2], axis=1), state
  whole = t - t % chunk_size
  if whole not in (0, t):
    o1, state = call(0, whole, state, "pallas")
    o2, state = call(whole, t, state, "pallas")
    return jnp.concatenate([o1, o2], axis=1), state
  weights, mom = (state.memory, state.momentum) if isinstance(state, TitansState) else (state,
                                                                                       None)
  o, w, p = pallas_ops.chunked_memory("titans", q, k, v, beta=lr, g=g, momentum=momentum,
                                      initial_state=weights, initial_momentum=mom,
                                      chunk_size=chunk_size)
  if whole == t:
    return o, TitansState(w, p, w, 0)
  start = jnp.zeros_like(w) if weights is None else weights.astype(w.dtype)
  return o, TitansState(w, p, start, t)


def titans_memory(q: Array, k: Array, v: Array, *, lr: Array, momentum: Optional[Array] = None,
                  g: Optional[Array] = None, memory: Union[str, core.Memory] = "linear",
                  initial_state=None, chunk_size: int = 64, read: str = "after_write",
                  impl: str = "auto", position_scale: Optional[Array] = None,
                  memory_params: Optional[dict] = None) -> tuple[Array, TitansState]:
  """Titans neural memory: gradient descent with momentum and decay on ``½‖M(k) − v‖²``.

  For token t in a chunk whose start state is ``M_c``: ``G_t = ∇ℓ(M_c; k_t, v_t)``,
  ``P_t = η_t P_{t−1} − lr_t G_t`` (η = 0 without momentum), ``M_t = exp(g_t) M_{t−1} + P_t``,
  ``o_t = M_t(q_t)``. Gradients at the chunk-start state are part of the model (as in Titans and
  TTT): the chunk size changes the result, the recurrent reference follows the same rule, and
  ``chunk_size=1`` is exact online gradient descent. TTT-Linear/TTT-MLP: no momentum, no decay,
  ``memory=TTTMemory(...)`` with its LayerNorm in ``memory_params`` and TTT's ``1/(i+1)``
  schedule in ``position_scale``; Titans LMM: momentum and decay. q is used as given (no scale).

  Args:
    q, k: ``[B, T, H, K]``; v: ``[B, T, H, V]``; lr: ``[B, T, H]`` inner learning rate;
    momentum: ``[B, T, H]`` η in [0, 1] or None; g: ``[B, T, H]`` log-decay (≤ 0) or None.
    memory: "linear" (``M(x) = Sᵀx``), "mlp" (``MLPMemory()``: ``x + W1 σ(W2 x)``, K == V) or a
      ``Memory`` instance (e.g. ``nlx.memory.deep.TTTMemory``).
    initial_state: a ``TitansState``, or the memory alone (momentum then starts at zero).
      Linear: ``[B, H, K, V]`` (zeros if None). MLP: required (see ``MLPMemory.init_state``).
    chunk_size: the chunk of the chunk-start gradients (a modelling choice), aligned with the
      start of the sequence. Splitting a sequence across calls anywhere reproduces one call when
      each call gets the previous call's ``TitansState`` (which carries the chunk in progress).
    read: "after_write" (``o_t = M_t(q_t)``) or "before_write" (``o_t = M_{t−1}(q_t)``).
    impl: "auto" | "chunked" (dual form) | "recurrent" | "pallas".
    position_scale: ``[chunk_size]`` ``c`` or None (``c ≡ 1``): TTT's schedule inside a chunk.
      Without momentum only. The token at position i of its chunk (i = 0..C−1; a final partial
      chunk of r tokens uses ``c_0..c_{r−1}``) reads ``M_t = γ_t M_c + c_i Σ_{j≤t} (γ_t/γ_j) U_j``
      with ``U_j = −lr_j G_j`` and γ the decay since the chunk start ``M_c``; the chunk's last
      token's weights are the next chunk's start. ``c_i = 1/(i+1)`` (TTT: ``token_idx``) steps by
      the mean of the chunk's gradients so far. Differentiable (TTT learns an offset on it).
      The returned state carries the chunk's accumulated writes (``TitansState.accumulated``).
    memory_params: the memory's fixed (not written) parameters, per head, shared by the batch:
      ``{name: [H, *shape]}`` for ``memory.param_shapes`` (``TTTMemory``: the LayerNorm's
      ``scale`` and ``shift``, ``[H, V]``), or None for memories without any. Differentiable.

  Returns:
    ``(o [B, T, H, V], TitansState)``.
  """
  return _gradient_memory(q, k, v, lr, momentum, g, memory, L2, initial_state, chunk_size, read,
                          impl, dgd=False, position_scale=position_scale,
                          memory_params=memory_params)


def dgd_memory(q: Array, k: Array, v: Array, *, lr: Array, g: Optional[Array] = None,
               momentum: Optional[Array] = None, memory: Union[str, core.Memory] = "linear",
               objective: str = "l2", initial_state=None, chunk_size: int = 64,
               read: str = "after_write", impl: str = "auto") -> tuple[Array, TitansState]:
  """Delta gradient descent (DGD): ``titans_memory`` plus a decay term on every layer's input.

  HOPE's inner optimizer (docs/EQUATIONS.md, Eqs. 56–57 and 88–93). Per head, with row-vector
  layers ``y = h W`` (linear memory: ``M(x) = x S``, ``S`` ``[K, V]``; MLP: ``M(x) = x +
  σ(x W2) W1``): for token t of a chunk (chunks aligned with the sequence start) whose start state
  is ``W_c``, let ``h_l`` be layer l's input and ``e_l`` the gradient of the objective (``½‖M(k_t) −
  v_t‖²`` for "l2", ``−⟨M(k_t), v_t⟩`` for "dot") with respect to layer l's output, both with M at
  ``W_c``. Then::

      P_l ← m_t P_l − lr_t h_lᵀ e_l                         (no momentum: P_l = −lr_t h_lᵀ e_l)
      W_l ← (exp(g_t) I − lr_t h_lᵀ h_l) W_l + P_l          (the decay touches only W_l)
      o_t = M_W(q_t)     after the write ("after_write") or before it ("before_write")

  ``chunk_size=1`` is Eq. 88 token by token; per chunk, the decay term acts on the running state
  and only the gradient term on ``W_c`` (Eq. 93). The chunked form solves each layer's decay terms
  of a chunk as a unit lower triangular system (the UT transform of ``delta_rule``) and equals
  the recurrence for every chunk size. ``objective="dot"`` on a linear memory without momentum is
  the gated delta rule: ``delta_rule(q, k, exp(g)·v, beta=lr/exp(g), g=g, scale=1)``.

  Args:
    q, k: ``[B, T, H, K]``; v: ``[B, T, H, V]``; lr: ``[B, T, H]`` the rate of both terms;
    g: ``[B, T, H]`` log-retention (≤ 0; ``exp(g) = α``) or None; momentum: ``[B, T, H]`` or None.
    memory, initial_state, chunk_size, read: as in ``titans_memory`` (the same state and
      continuation contract: a sequence split anywhere across calls equals one call).
    objective: "l2" (Eq. 88) or "dot" (Eq. 92).
    impl: "auto" | "chunked" | "recurrent" | "pallas" (the ``delta_rule`` kernels; only for the
      gated-delta-rule case above, read after the write, chunks aligned with the call).

  Returns:
    ``(o [B, T, H, V], TitansState)``.
  """
  if objective not in ("l2", "dot"):
    raise ValueError(f"objective={objective!r} is not one of ('l2', 'dot')")
  return _gradient_memory(q, k, v, lr, momentum, g, memory, L2 if objective == "l2" else DOT,
                          initial_state, chunk_size, read, impl, dgd=True)


def _gradient_memory(q, k, v, lr, momentum, g, memory, objective, initial_state, chunk_size, read,
                     impl, dgd: bool, position_scale=None,
                     memory_params=None) -> tuple[Array, TitansState]:
  """The body of ``titans_memory`` and ``dgd_memory``: validation, dispatch, layout."""
  b, t, h, dk, dv = _check_sequences(q, k, v)
  _check_gate("lr", lr, b, t, h, required=True)
  _check_gate("momentum", momentum, b, t, h, required=False)
  _check_gate("g", g, b, t, h, required=False)
  impl = _check_options(chunk_size, impl)
  core.check_read(read)
  mem = _resolve_memory(memory)
  _check_position_scale(position_scale, chunk_size, momentum, dgd)
  weights, mom, start, offset, acc = _check_titans_state(mem, initial_state, b, h, dk, dv,
                                                         chunk_size)
  _check_memory_params(mem, memory_params, h, dk, dv,
                       0 if weights is None else mem.hidden_dim(weights))
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
  reason = None
  if position_scale is not None:
    reason = "the kernels do not implement position_scale"
  elif not isinstance(mem, LinearMemory):
    reason = "the kernels implement linear memories only"
  elif read != "after_write":
    reason = "the kernels read after the write only"
  elif dgd and (objective is not DOT or momentum is not None):
    reason = ("the kernels implement DGD only as the gated delta rule (objective='dot', a linear "
              "memory, no momentum)")
  elif offset is not None and not isinstance(offset, numbers.Integral):
    reason = ("initial_state.offset is a traced array; the kernels need to know statically how "
              "many tokens finish the chunk in progress")
  impl = _resolve_impl(impl, "delta_rule" if dgd else "titans", q, k, v, chunk_size, reason)
  if impl == "pallas" and dgd:
    if offset is not None:
      raise ValueError("impl='pallas': dgd_memory on the kernels starts at a chunk boundary; "
                       "use impl='chunked' to continue a chunk in progress")
    alpha = jnp.ones_like(lr) if g is None else jnp.exp(g.astype(lr.dtype))
    o, s = delta_rule(q, k, (alpha[..., None] * v).astype(v.dtype), beta=lr / alpha, g=g,
                      scale=1.0, initial_state=weights if weights is None else weights["w"],
                      chunk_size=chunk_size, impl="pallas")
    return o, TitansState(s, None, s, 0)
  if impl == "pallas":
    return _titans_pallas(q, k, v, lr, momentum, g, initial_state, offset, chunk_size)

  cdt = _compute_dtype(q.dtype)
  cast = lambda x: None if x is None else jnp.asarray(x, cdt)
  castt = lambda tree: None if tree is None else jax.tree.map(cast, tree)
  if weights is None:
    weights = {"w": jnp.zeros((b, h, dk, dv), cdt)}
  weights = castt(weights)
  if momentum is not None and mom is None:
    mom = jax.tree.map(jnp.zeros_like, weights)
  mom = castt(mom) if momentum is not None else None
  start, acc = castt(start), castt(acc)
  gates = [None if x is None else jnp.moveaxis(cast(x), 2, 1) for x in (lr, g, momentum)]
  lr_, g_, m_ = gates
  if g_ is None:
    g_ = jnp.zeros_like(lr_)
  per_slice = lambda x: jnp.broadcast_to(cast(x), (b,) + x.shape)  # [H, ...] -> [B, H, ...]
  params = None if memory_params is None else jax.tree.map(per_slice, memory_params)
  scale = None if position_scale is None else jnp.broadcast_to(cast(position_scale),
                                                               (b, h, chunk_size))

  seqs = [_heads_first(cast(x)) for x in (q, k, v)]
  args = (mem, objective, *seqs, lr_, g_, m_, weights, mom)
  options = dict(batch_ndim=2, dgd=dgd, read=read, params=params, row_scale=scale)
  aligned = offset is None and t % chunk_size == 0
  if impl == "recurrent":
    o, w, p, start, acc = core.recurrent_scan(*args, grad_chunk=chunk_size,
                                              offset=0 if offset is None else offset,
                                              chunk_start=start, accumulated=acc, **options)
    offset = ((0 if offset is None else offset) + t) % chunk_size
  elif aligned:  # the fast path: chunks aligned with the call, whole chunks
    o, w, p = core.chunk_start_scan(*args, chunk_size, **options)
    start, offset = w, 0
    acc = None if scale is None else jax.tree.map(jnp.zeros_like, w)
  else:
    o, w, p, start, offset, acc = core.chunk_start_scan_offset(
        *args, weights if start is None else start, 0 if offset is None else offset, chunk_size,
        accumulated=acc, **options)
  if isinstance(mem, LinearMemory):
    w, p, start, acc = (None if x is None else x["w"] for x in (w, p, start, acc))
  return jnp.moveaxis(o, 1, 2).astype(q.dtype), TitansState(w, p, start, offset, acc)
