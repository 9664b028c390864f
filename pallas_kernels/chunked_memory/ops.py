"""The chunked associative-memory kernels as one differentiable function.

``chunked_memory(kind, q, k, v, ...)`` runs the forward kernels and, under ``jax.custom_vjp``, the
backward kernels, on GPU (``kernel_gpu``, ``kernel_gpu_titans``: Pallas Triton) or TPU
(``kernel_tpu``, ``kernel_tpu_titans``: Pallas Mosaic).
On a machine without the accelerator it runs the same kernels in Pallas interpret mode, so the
result can be checked anywhere. Every kind runs as phase kernels (``phases.py``,
``titans_phases.py``). ``nlx.ops`` dispatches ``impl="pallas"`` here; the three kinds are the
linear-memory ops of ``nlx.ops``:

* ``linear_attention``: ``nlx.ops.linear_attention`` (g optional);
* ``delta_rule``: ``nlx.ops.delta_rule`` (beta required, g optional);
* ``titans``: ``nlx.ops.titans_memory`` with the linear memory (beta is the inner learning rate;
  momentum and g optional; no q scale).

Supported (anything else is refused with a ValueError that names it): q, k, v float32 or bfloat16
(float32 accumulation inside); K and V any size from 1 to 256 (zero-padded to the next power of
two ≥ 16, ``padded_head_dim``); ``chunk_size`` a power of two in
[16, 256] (the Triton dot needs every tile dimension ≥ 16); any T ≥ 1 (the final chunk is padded
with tokens that write nothing; see ``chunk.py``); any B and H. Gradients flow to q, k, v, beta,
g, momentum and the initial states.

Document boundaries (``reset [B, T]``, every kind): the state is zero before a reset token's
decay and write, as in ``nlx.ops`` for linear attention and the delta rule (a reset at t = 0
discards ``initial_state`` and ``initial_momentum``, replaced with ``where``, so that not even a
non-finite one reaches the outputs). The boundaries travel as the gates' segment channel
(``layout.gates``) and are applied in the kernels as masks on the chunk's decays
(``chunk.chunk_step``, ``titans_phases.Segments``); without ``reset`` the kernels are compiled
exactly as they are without boundaries (no extra input, no masks).

Titans with ``reset`` also take ``fresh`` and ``live`` (``[B, T]`` bool), the two flags
``nlx.ops.titans_memory`` needs to run a packed batch in a buffer where a document's later
gradient chunks start on kernel chunks (``nlx.memory.core.document_slots``):

* a token takes its gradient at the zero state when a reset precedes it in its kernel chunk, or
  when ``fresh`` (a document's first gradient chunk that began in an earlier kernel chunk; every
  token of a kernel chunk before its first reset must then have the same flag); otherwise at its
  kernel chunk's start state, as without boundaries;
* where ``live`` is false the token is a placeholder: it writes nothing, leaves the memory and the
  momentum as they are, and its output is meaningless; placeholders must follow every live token
  of their kernel chunk (each chunk's end state is read at its last live token).

The flags are data: the kernels cannot check these layouts, the caller builds them.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from pallas_kernels.chunked_memory import (kernel_gpu, kernel_gpu_titans, kernel_tpu,
                                            kernel_tpu_titans)
from pallas_kernels.chunked_memory import layout as lay
from pallas_kernels.chunked_memory.chunk import KINDS, SEGMENTED_KINDS, State

# The kinds whose kernels take document boundaries (``reset``); Titans' masks are its own
# (``titans_phases.Segments``), so ``chunk.SEGMENTED_KINDS`` (``chunk.chunk_step``) excludes it.
RESET_KINDS = SEGMENTED_KINDS + ("titans",)

Array = jax.Array

BACKENDS = ("gpu", "tpu")
DTYPES = (jnp.float32, jnp.bfloat16)
_POW2 = (16, 32, 64, 128, 256)
PHASED_KINDS = ("delta_rule", "linear_attention", "titans")
MAX_HEAD_DIM = 256


def padded_head_dim(d: int) -> int:
  """The head size a kernel runs at: the next power of two ≥ 16 (Triton tiles are powers of two,
  and the matrix units want ≥ 16). The wrapper zero-pads K and V to it and slices the results:
  zero key columns add nothing to any dot, zero value columns stay zero in every state."""
  return max(16, 1 << (d - 1).bit_length())


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tiling of the kernels.

  Attributes:
    block_v: value columns per program (a power of two ≥ 16 dividing V); None: the backend's
      default (GPU: min(V, the ``block_v`` of ``GPU_TABLE[kind]`` for the shape class); TPU: V,
      whole lane-dense tiles).
    grad_block_v: GPU only: the value block of the per-chunk gradient kernel (a power of two
      dividing V, capped at ``block_v``); None: the table's ``grad_block_v``.
    num_warps, num_stages: Triton launch parameters (GPU only) for every kernel; None: the
      per-kernel entries of ``GPU_TABLE[kind][shape class].launch``.
    chunks_per_step: TPU phase kernels: chunks per grid step (a power of two dividing the
      number of chunks); None: ``kernel_tpu.chunks_per_step`` (256 tokens per step where the
      chunk count allows).
    head_strided: TPU phase kernels: index the ``[B, T, H, D]`` inputs with head-strided
      BlockSpecs instead of transposing them to ``[B·H, T, D]`` (``kernel_tpu._Tiles``); None:
      when K, V and the value block are multiples of 128 (Mosaic's lane tile), which is what
      compiled TPU kernels need. Interpret mode takes it at any size (the tests force it).
  """

  block_v: Optional[int] = None
  grad_block_v: Optional[int] = None
  num_warps: Optional[int] = None
  num_stages: Optional[int] = None
  chunks_per_step: Optional[int] = None
  head_strided: Optional[bool] = None

  @classmethod
  def default(cls, backend: str) -> "BlockSizes":
    """Per-backend defaults (``backend`` in ``BACKENDS``)."""
    del backend
    return cls()

  def resolve(self, backend: str, dv: int, kind: str = "delta_rule",
              head: int = 128) -> "BlockSizes":
    """With ``block_v`` (and on GPU ``grad_block_v``) filled in for V = ``dv`` from
    ``GPU_TABLE[kind]`` at the shape class of ``head`` = max(K, V), and checked."""
    entry = gpu_table(kind, head)
    block_v = self.block_v or (min(dv, entry.block_v) if backend == "gpu" else dv)
    if block_v not in _POW2 or dv % block_v:
      raise ValueError(f"block_sizes.block_v={self.block_v!r} is not supported for V={dv}; "
                       f"allowed: a power of two in {_POW2} that divides V, or None")
    grad = self.grad_block_v
    if grad is not None and (grad not in _POW2 or dv % grad):
      raise ValueError(f"block_sizes.grad_block_v={grad!r} is not supported for V={dv}; "
                       f"allowed: a power of two in {_POW2} that divides V, or None")
    if backend == "gpu":
      grad = min(block_v, grad or entry.grad_block_v)
    for name in ("num_warps", "num_stages", "chunks_per_step"):
      value = getattr(self, name)
      if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                or value < 1):
        raise ValueError(f"block_sizes.{name}={value!r}; allowed: a positive int or None")
    return dataclasses.replace(self, block_v=block_v, grad_block_v=grad)


class _Config(NamedTuple):
  """Static part of a kernel call (hashable: the custom_vjp's non-differentiable argument)."""

  kind: str
  scale: float
  chunk: int
  last: int
  backend: str
  blocks: BlockSizes
  interpret: bool
  debug: bool
  segmented: bool = False
  head: int = 128  # max(K, V) after padding: its shape class picks the GPU_TABLE entry
  heads: int = 0  # TPU phase kernels: H when head-strided (sequences [B, Tp, H·D]), else 0
  per_step: int = 1  # TPU phase kernels: chunks per grid step


class GpuEntry(NamedTuple):
  """One shape class of ``GPU_TABLE``: the value blocks and each kernel's Triton launch."""

  block_v: int  # value block of the state, output and Pᵀ dO kernels (capped at V)
  grad_block_v: int  # value block of the per-chunk gradient kernel (capped at block_v)
  launch: dict  # {phase: (num_warps, num_stages)}


def _entry(block_v: int, grad_block_v: int, warps: str, stages: str = "") -> GpuEntry:
  """``warps``/``stages``: "phase=n ..." strings (stages default 1)."""
  parse = lambda text: {p: int(n) for p, n in (w.split("=") for w in text.split())}
  st = parse(stages)
  return GpuEntry(block_v, grad_block_v,
                  {p: (w, st.get(p, 1)) for p, w in parse(warps).items()})


# The GPU launch table: per kind and shape class (max(K, V) after padding; a head uses the
# nearest class at or above it), the value blocks and every phase kernel's (num_warps,
# num_stages), **chosen by compile statistics**, not timed (no GPU was available): the rule of
# ``ptx.choose`` applied to the sm_90 registers, spills and shared memory recorded in
# ``sm90_stats.jsonl`` (``ptx.py``; the statistics and the rule are in docs/KERNELS.md, "GPU").
# Titans at 256 spills in every configuration tried (its two [256, block_v] float32 states).
_DELTA_PARALLEL = "fwd_ut=4 fwd_out=4 bwd_dvl=4"
GPU_TABLE = {
    "delta_rule": {
        32: _entry(32, 32, f"{_DELTA_PARALLEL} fwd_state=8 bwd_state=8 bwd_grad=4"),
        64: _entry(64, 64, f"{_DELTA_PARALLEL} fwd_state=8 bwd_state=8 bwd_grad=8"),
        128: _entry(64, 64, f"{_DELTA_PARALLEL} fwd_state=8 bwd_state=8 bwd_grad=8"),
        256: _entry(32, 32, "fwd_ut=8 fwd_out=4 bwd_dvl=4 fwd_state=8 bwd_state=8 bwd_grad=8"),
    },
    "linear_attention": {
        32: _entry(32, 32, "fwd_state=8 fwd_out=4 bwd_state=8 bwd_grad=4"),
        64: _entry(64, 32, "fwd_state=8 fwd_out=4 bwd_state=8 bwd_grad=8"),
        128: _entry(64, 64, "fwd_state=8 fwd_out=4 bwd_state=8 bwd_grad=8"),
        256: _entry(64, 64, "fwd_state=8 fwd_out=4 bwd_state=8 bwd_grad=8"),
    },
    "titans": {
        32: _entry(32, 32, "fwd_coef=4 fwd_state=8 fwd_out=4 bwd_dvl=4 bwd_state=8 bwd_grad=8"),
        64: _entry(64, 64, "fwd_coef=4 fwd_state=8 fwd_out=4 bwd_dvl=4 bwd_state=8 bwd_grad=8",
                   "bwd_state=2"),
        128: _entry(32, 32, "fwd_coef=4 fwd_state=8 fwd_out=4 bwd_dvl=4 bwd_state=8 bwd_grad=8"),
        256: _entry(16, 16, "fwd_coef=4 fwd_state=8 fwd_out=4 bwd_dvl=4 bwd_state=8 bwd_grad=8"),
    },
}
GPU_CLASSES = (32, 64, 128, 256)


def shape_class(head: int) -> int:
  """The class of ``GPU_TABLE`` for max(K, V) = ``head``: the nearest at or above it, else the
  largest."""
  return next((c for c in GPU_CLASSES if c >= head), GPU_CLASSES[-1])


def gpu_table(kind: str, head: int) -> GpuEntry:
  """``GPU_TABLE``'s entry for ``kind`` at the shape class of ``head``."""
  return GPU_TABLE[kind if kind in GPU_TABLE else "delta_rule"][shape_class(head)]


def gpu_launch(head: int, blocks: "BlockSizes", kind: str = "delta_rule") -> dict:
  """``{phase: (num_warps, num_stages)}`` for ``kind`` at the shape class of ``head``, with
  ``blocks``' explicit values overriding the table."""
  return {phase: (blocks.num_warps or w, blocks.num_stages or st)
          for phase, (w, st) in gpu_table(kind, head).launch.items()}


def _kernels(backend: str):
  return kernel_gpu if backend == "gpu" else kernel_tpu


def _titans_kernels(backend: str):
  return kernel_gpu_titans if backend == "gpu" else kernel_tpu_titans


def _kernel_kwargs(cfg: _Config) -> dict:
  kw = dict(chunk=cfg.chunk, last=cfg.last, block_v=cfg.blocks.block_v, interpret=cfg.interpret,
            debug=cfg.debug, segmented=cfg.segmented)
  if cfg.backend == "gpu":
    kw.update(num_warps=cfg.blocks.num_warps or 4, num_stages=cfg.blocks.num_stages or 1)
    if _phased(cfg):
      kw["launch"] = gpu_launch(cfg.head, cfg.blocks, cfg.kind)
  elif _phased(cfg):
    kw.update(heads=cfg.heads, per_step=cfg.per_step)
  return kw


def _phased(cfg: _Config) -> bool:
  """Every kind runs as phase kernels: the delta rule and linear attention those of
  ``phases.py``, Titans those of ``titans_phases.py``."""
  return cfg.kind in PHASED_KINDS


def _forward(cfg: _Config, q, k, v, gates_col, gates_row, w0, p0):
  """``(o, final State, residuals)`` of the forward kernels."""
  if cfg.kind == "titans":
    o, final, starts, coef = _titans_kernels(cfg.backend).titans_forward(
        cfg.scale, q, k, v, gates_col, gates_row, w0, p0, **_kernel_kwargs(cfg))
    return o, final, (starts, coef)
  o, final, starts, w = _kernels(cfg.backend).delta_forward(
      cfg.scale, q, k, v, gates_col, gates_row, w0, kind=cfg.kind, **_kernel_kwargs(cfg))
  return o, State(final, None), (starts, w)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _memory(cfg: _Config, q, k, v, gates_col, gates_row, w0, p0):
  o, final, _ = _forward(cfg, q, k, v, gates_col, gates_row, w0, p0)
  return o, final


def _memory_fwd(cfg: _Config, q, k, v, gates_col, gates_row, w0, p0):
  o, final, res = _forward(cfg, q, k, v, gates_col, gates_row, w0, p0)
  return (o, final), (q, k, v, gates_col, gates_row, res)


def _memory_bwd(cfg: _Config, residuals, cotangents):
  q, k, v, gates_col, gates_row, res = residuals  # res: (start states, w) or (starts, coef)
  d_o, d_final = cotangents
  kw = _kernel_kwargs(cfg)
  if cfg.backend == "gpu":
    kw["grad_block_v"] = cfg.blocks.grad_block_v
  if cfg.kind == "titans":
    starts, coef = res
    if d_final.momentum is None and starts.momentum is not None:
      d_final = State(d_final.memory, jnp.zeros_like(starts.momentum[:, 0]))
    dq, dk, dv, dgc, dgr, d_initial = _titans_kernels(cfg.backend).titans_backward(
        cfg.scale, q, k, v, gates_col, gates_row, starts, coef, d_o, d_final, **kw)
    return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), dgc, dgr,
            d_initial.memory, d_initial.momentum)
  dq, dk, dv, dgc, dgr, d_initial = _kernels(cfg.backend).delta_backward(
      cfg.scale, q, k, v, gates_col, gates_row, *res, d_o, d_final.memory, kind=cfg.kind, **kw)
  return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), dgc, dgr, d_initial,
          None)


_memory.defvjp(_memory_fwd, _memory_bwd)


def default_backend() -> tuple[str, bool]:
  """``(backend, interpret)`` for the present JAX backend: the kernel it runs natively, or the
  GPU kernel in interpret mode on CPU."""
  platform = jax.default_backend()
  if platform == "tpu":
    return "tpu", False
  if platform in ("gpu", "cuda", "rocm"):
    return "gpu", False
  return "gpu", True


def unsupported(kind: str, q, k, v, chunk_size: int) -> Optional[str]:
  """Why the kernels cannot take these arguments, or None if they can."""
  if kind not in KINDS:
    return f"kind={kind!r} is not one of {KINDS}"
  for name, x in (("q", q), ("k", k), ("v", v)):
    if getattr(x, "ndim", None) != 4:
      return f"{name} must be [B, T, H, D]; got shape {getattr(x, 'shape', None)}"
    if jnp.dtype(x.dtype) not in [jnp.dtype(d) for d in DTYPES]:
      return f"{name} has dtype {x.dtype}; the kernels take float32 or bfloat16"
  if q.shape != k.shape or q.shape[:3] != v.shape[:3]:
    return f"q {q.shape}, k {k.shape} and v {v.shape} must share [B, T, H] (and q, k their K)"
  for name, d in (("K", q.shape[3]), ("V", v.shape[3])):
    if not 1 <= d <= MAX_HEAD_DIM:
      return (f"head dim {name}={d} is not supported by the kernels; allowed: 1 to "
              f"{MAX_HEAD_DIM}")
  if chunk_size not in _POW2:
    return f"chunk_size={chunk_size!r} is not supported by the kernels; allowed: {_POW2}"
  return None


def _check_gate(name: str, x, b: int, t: int, h: int):
  if x is not None and getattr(x, "shape", None) != (b, t, h):
    raise ValueError(f"{name} must have shape [B, T, H] = {(b, t, h)}; got "
                     f"{getattr(x, 'shape', type(x).__name__)}")


def _check_flags(name: str, x, b: int, t: int):
  if getattr(x, "shape", None) != (b, t):
    raise ValueError(f"{name} must have shape [B, T] = {(b, t)}; got "
                     f"{getattr(x, 'shape', type(x).__name__)}")
  dtype = jnp.dtype(x.dtype)
  if not (dtype == jnp.bool_ or jnp.issubdtype(dtype, jnp.integer)):
    raise ValueError(f"{name} must be a bool or integer array; got dtype {dtype}")


def _check_reset(kind: str, reset, b: int, t: int, fresh=None, live=None):
  for name, x in (("fresh", fresh), ("live", live)):
    if x is None:
      continue
    if kind != "titans" or reset is None:
      raise ValueError(f"{name} is only for kind='titans' with reset; got kind={kind!r}, "
                       f"reset={'None' if reset is None else 'given'}")
    _check_flags(name, x, b, t)
  if reset is None:
    return
  if kind not in RESET_KINDS:
    raise ValueError(f"reset (document boundaries) is only for kinds {RESET_KINDS}; got "
                     f"kind={kind!r}")
  _check_flags("reset", reset, b, t)


def chunked_memory(kind: str, q: Array, k: Array, v: Array, *, beta: Optional[Array] = None,
                   g: Optional[Array] = None, momentum: Optional[Array] = None,
                   initial_state: Optional[Array] = None,
                   initial_momentum: Optional[Array] = None, scale: Optional[float] = None,
                   chunk_size: int = 64, block_sizes: Optional[BlockSizes] = None,
                   backend: Optional[str] = None, interpret=None, debug: bool = False,
                   reset: Optional[Array] = None, fresh: Optional[Array] = None,
                   live: Optional[Array] = None):
  """One linear associative memory over a sequence, by the Pallas kernels.

  Args:
    kind: "linear_attention" | "delta_rule" | "titans" (see the module docstring).
    q, k: ``[B, T, H, K]``; v: ``[B, T, H, V]`` (float32 or bfloat16).
    beta: ``[B, T, H]``: the delta rule's write strength, the Titans inner learning rate (both
      required); must be None for linear attention.
    g: ``[B, T, H]`` log-decay or None. momentum: ``[B, T, H]`` η (titans only) or None.
    initial_state, initial_momentum: ``[B, H, K, V]`` or None (zeros).
    scale: multiplies q; default ``K ** -0.5`` (1 for titans).
    chunk_size: tokens per chunk (for titans, the chunk of the chunk-start gradients).
    block_sizes: a ``BlockSizes``; None for the backend's defaults.
    backend: "gpu" | "tpu" | None (the present backend; on CPU the GPU kernel, interpreted).
    interpret: run in Pallas interpret mode (True/False; None: only where the backend's hardware
      is absent). The TPU kernel interprets with ``pltpu.InterpretParams()``.
    debug: print the kernels' jaxprs and lowered IR (Pallas ``debug``).
    reset: ``[B, T]`` bool (or 0/1 integer) document boundaries, or None (see the module
      docstring).
    fresh, live: ``[B, T]`` bool (or 0/1 integer) or None (no token fresh beyond the resets'
      chunks, every token live): Titans' packed-buffer flags (kind "titans" with ``reset`` only;
      see the module docstring).

  Returns:
    ``(o [B, T, H, V] in q's dtype, final_state [B, H, K, V] float32, final_momentum or None)``.
  """
  reason = unsupported(kind, q, k, v, chunk_size)
  if reason:
    raise ValueError(reason)
  b, t, h, dk = q.shape
  dv = v.shape[3]
  if kind != "linear_attention" and beta is None:
    raise ValueError(f"kind={kind!r} needs beta ([B, T, H]); got None")
  if kind == "linear_attention" and beta is not None:
    raise ValueError("kind='linear_attention' takes no beta; got one")
  if momentum is not None and kind != "titans":
    raise ValueError(f"momentum is only for kind='titans'; got it with kind={kind!r}")
  if initial_momentum is not None and momentum is None:
    raise ValueError("initial_momentum is given but momentum=None")
  for name, x in (("beta", beta), ("g", g), ("momentum", momentum)):
    _check_gate(name, x, b, t, h)
  _check_reset(kind, reset, b, t, fresh, live)
  for name, x in (("initial_state", initial_state), ("initial_momentum", initial_momentum)):
    if x is not None and getattr(x, "shape", None) != (b, h, dk, dv):
      raise ValueError(f"{name} must have shape [B, H, K, V] = {(b, h, dk, dv)}; got "
                       f"{getattr(x, 'shape', type(x).__name__)}")
  native, native_interpret = default_backend()
  if backend is None:
    backend = native
  elif backend not in BACKENDS:
    raise ValueError(f"backend={backend!r} is not one of {BACKENDS} or None")
  if interpret is None:
    interpret = backend != native or native_interpret
  if scale is None:
    scale = 1.0 if kind == "titans" else dk**-0.5

  # Any head size: zero-pad K and V to the kernels' sizes (differentiable; sliced back below).
  kp, vp = padded_head_dim(dk), padded_head_dim(dv)
  if (kp, vp) != (dk, dv):
    pad = lambda x, dims: None if x is None else jnp.pad(
        x, [(0, 0)] * (x.ndim - len(dims)) + [(0, p - x.shape[x.ndim - len(dims) + i])
                                              for i, p in enumerate(dims)])
    o, final, final_p = chunked_memory(
        kind, pad(q, (kp,)), pad(k, (kp,)), pad(v, (vp,)), beta=beta, g=g, momentum=momentum,
        initial_state=pad(initial_state, (kp, vp)),
        initial_momentum=pad(initial_momentum, (kp, vp)), scale=scale, chunk_size=chunk_size,
        block_sizes=block_sizes, backend=backend, interpret=interpret, debug=debug, reset=reset,
        fresh=fresh, live=live)
    cut = lambda x: None if x is None else x[..., :dk, :dv]
    return o[..., :dv], cut(final), cut(final_p)
  blocks = (block_sizes or BlockSizes.default(backend)).resolve(backend, dv, kind, max(dk, dv))
  lo = lay.Layout(b, t, h, chunk_size)
  heads, per_step = 0, 1
  if backend == "tpu" and kind in PHASED_KINDS:
    strided = blocks.head_strided
    if strided is None:
      strided = dk % 128 == 0 and dv % 128 == 0 and blocks.block_v % 128 == 0
    heads = h if strided else 0
    per_step = blocks.chunks_per_step or kernel_tpu.chunks_per_step(lo.num_chunks, chunk_size)
    if lo.num_chunks % per_step:
      raise ValueError(f"block_sizes.chunks_per_step={per_step} does not divide the "
                       f"{lo.num_chunks} chunks of T={t} at chunk_size={chunk_size}")
  elif blocks.head_strided or (blocks.chunks_per_step or 1) > 1:
    raise ValueError("block_sizes.head_strided and chunks_per_step are for the TPU kernels of "
                     f"{PHASED_KINDS}; got backend={backend!r}, kind={kind!r}")
  cfg = _Config(kind, float(scale), chunk_size, lo.last, backend, blocks, bool(interpret), debug,
                reset is not None, max(dk, dv), heads, per_step)
  segment = None
  if kind == "titans" and reset is not None:
    segment = lay.titans_segments(reset, fresh, live, lo)
  gates_col, gates_row = lay.gates(beta, g, momentum, lo, reset, segment)
  w0 = lay.states(initial_state, b, h, dk, dv)
  p0 = None if momentum is None else lay.states(initial_momentum, b, h, dk, dv)
  if reset is not None:
    w0 = lay.reset_at_start(w0, reset, h)
    p0 = None if p0 is None else lay.reset_at_start(p0, reset, h)
  seq = functools.partial(lay.head_major if heads else lay.sequences, layout=lo)
  o, final = _memory(cfg, seq(q), seq(k), seq(v), gates_col, gates_row, w0, p0)
  unstate = lambda x: None if x is None else x.reshape(b, h, dk, dv)
  o = lay.unhead_major(o, lo) if heads else lay.unsequences(o, lo)
  return o, unstate(final.memory), unstate(final.momentum)
