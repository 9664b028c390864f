"""From the ``nlx.ops`` layout to the kernels' layout and back (plain, differentiable XLA).

The ops take ``[B, T, H, D]`` sequences and ``[B, T, H]`` gates. The kernels (and ``reference``)
take, per (batch·head) slice ``bh``:

* q, k ``[BH, Tp, K]``, v ``[BH, Tp, V]`` in the input dtype, zero-padded to ``Tp = N·C``;
* gates as a column ``[BH, Tp, 4]`` and a row ``[BH, N, 4, C]`` (float32): β, the chunk-local
  cumulative log-decay, the chunk-local cumulative log-momentum and the chunk-local count of
  document boundaries, the segment (``chunk.GATE_CHANNELS``);
* states ``[BH, K, V]`` (float32).

Everything here is elementwise, a reshape or a cumulative sum over a chunk, so JAX differentiates
it; the kernels' ``custom_vjp`` only covers the kernel call.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

Array = jax.Array


# Per-token log-decays are clamped to [LOG_DECAY_MIN, 0]. Above 0 (outside the ops' contract)
# the chunk's decays e^{G_t − G_j} could overflow; far below, cumulative sums lose the precision
# of their differences and −inf would turn them into NaN. e^{−30} ≈ 1e-13 is zero at the
# precision of a float32 state; the clamp's gradient is zero outside the range.
LOG_DECAY_MIN = -30.0


class Layout(NamedTuple):
  """Static sizes of a kernel call."""

  batch: int
  seq_len: int
  heads: int
  chunk: int

  @property
  def num_chunks(self) -> int:
    return -(-self.seq_len // self.chunk)

  @property
  def padded_len(self) -> int:
    return self.num_chunks * self.chunk

  @property
  def last(self) -> int:
    """Index of the last real token within the final chunk."""
    return (self.seq_len - 1) % self.chunk


def sequences(x: Array, layout: Layout) -> Array:
  """``[B, T, H, D] -> [B·H, Tp, D]``, zero-padded."""
  b, t, h, d = x.shape
  x = jnp.moveaxis(x, 2, 1).reshape(b * h, t, d)
  return jnp.pad(x, ((0, 0), (0, layout.padded_len - t), (0, 0)))


def unsequences(x: Array, layout: Layout) -> Array:
  """``[B·H, Tp, D] -> [B, T, H, D]``."""
  x = x[:, :layout.seq_len].reshape(layout.batch, layout.heads, layout.seq_len, x.shape[-1])
  return jnp.moveaxis(x, 1, 2)


def head_major(x: Array, layout: Layout) -> Array:
  """``[B, T, H, D] -> [B, Tp, H·D]``: the memory order unchanged (a free reshape; a pad only when
  T is not a multiple of the chunk), for the head-strided TPU BlockSpecs."""
  b, t, h, d = x.shape
  if layout.padded_len != t:
    x = jnp.pad(x, ((0, 0), (0, layout.padded_len - t), (0, 0), (0, 0)))
  return x.reshape(b, layout.padded_len, h * d)


def unhead_major(x: Array, layout: Layout) -> Array:
  """``[B, Tp, H·D] -> [B, T, H, D]``."""
  b, tp, hd = x.shape
  return x.reshape(b, tp, layout.heads, hd // layout.heads)[:, :layout.seq_len]


def _chunk_cumsum(x: Array, layout: Layout) -> Array:
  """``[BH, Tp] ->`` cumulative sums restarting at every chunk."""
  n, c = layout.num_chunks, layout.chunk
  return jnp.cumsum(x.reshape(-1, n, c), axis=-1).reshape(-1, n * c)


def gates(beta: Optional[Array], g: Optional[Array], momentum: Optional[Array],
          layout: Layout, reset: Optional[Array] = None,
          segment: Optional[Array] = None) -> tuple[Array, Array]:
  """The kernels' gate arrays: column ``[BH, Tp, 4]`` and row ``[BH, N, 4, C]`` (float32).

  Args:
    beta: ``[B, T, H]`` write strength / inner learning rate, or None (1: linear attention).
    g: ``[B, T, H]`` log-decay or None (0). momentum: ``[B, T, H]`` η in [0, 1] or None.
    reset: ``[B, T]`` bool document boundaries (the same for every head) or None (the segment
      channel is zero).
    segment: ``[BH, Tp]`` the segment channel itself (``titans_segments``), instead of the
      count of boundaries ``reset`` gives.
  """
  b, t, h = layout.batch, layout.seq_len, layout.heads
  pad = layout.padded_len - t

  def flat(x, fill):
    x = jnp.full((b, t, h), fill, jnp.float32) if x is None else x.astype(jnp.float32)
    return jnp.pad(jnp.moveaxis(x, 2, 1).reshape(b * h, t), ((0, 0), (0, pad)))

  log_eta = None
  if momentum is not None:  # η = 0 is allowed (no carry-over): clamp its log to stay finite.
    momentum = momentum.astype(jnp.float32)
    log_eta = jnp.log(jnp.maximum(momentum, jnp.finfo(jnp.float32).tiny))
  beta_p = flat(beta, 1.0)  # padded tokens get β = 0: they write nothing
  if g is not None:  # log-decays ≤ 0 (the ops' contract), clamped: see ``LOG_DECAY_MIN``
    g = jnp.clip(g.astype(jnp.float32), LOG_DECAY_MIN, 0.0)
  channels = [beta_p, _chunk_cumsum(flat(g, 0.0), layout),
              _chunk_cumsum(flat(log_eta, 0.0), layout)]
  if segment is not None:
    channels.append(segment.astype(jnp.float32))
  elif reset is None:
    channels.append(jnp.zeros_like(beta_p))
  else:  # boundaries so far in the chunk (padded tokens: none), exact in float32
    per_head = jnp.broadcast_to(jnp.asarray(reset, bool)[:, :, None], (b, t, h))
    channels.append(_chunk_cumsum(flat(per_head, 0.0), layout))
  col = jnp.stack(channels, axis=-1)
  row = col.reshape(b * h, layout.num_chunks, layout.chunk, 4).swapaxes(-1, -2)
  return col, row


def titans_segments(reset: Array, fresh: Optional[Array], live: Optional[Array],
                    layout: Layout) -> Array:
  """Titans' segment channel ``[BH, Tp]`` (``titans_phases.Segments``): −1 at placeholders
  (``live`` false, and the padding), else the number of boundaries so far in the kernel chunk,
  or 0.5 for a ``fresh`` token before the chunk's first boundary."""
  b, t, h = layout.batch, layout.seq_len, layout.heads
  as_flags = lambda x, fill: (jnp.full((b, t), fill, bool) if x is None else
                              jnp.asarray(x).astype(bool))
  per_token = lambda x: jnp.repeat(x.astype(jnp.float32), h, axis=0)  # [B, T] -> [B·H, T]
  count = per_token(as_flags(reset, False))
  pad = layout.padded_len - t
  count = _chunk_cumsum(jnp.pad(count, ((0, 0), (0, pad))), layout)
  code = jnp.pad(jnp.where(per_token(as_flags(fresh, False)) > 0, 0.5, 0.0), ((0, 0), (0, pad)))
  code = jnp.where(count > 0, count, code)
  live_p = jnp.pad(per_token(as_flags(live, True)), ((0, 0), (0, pad)))  # padding: not live
  return jnp.where(live_p > 0, code, -1.0)


def states(x: Optional[Array], b: int, h: int, dk: int, dv: int) -> Array:
  """``[B, H, K, V]`` (or None: zeros) ``-> [B·H, K, V]`` float32."""
  if x is None:
    return jnp.zeros((b * h, dk, dv), jnp.float32)
  return x.astype(jnp.float32).reshape(b * h, dk, dv)


def reset_at_start(w0: Array, reset: Array, h: int) -> Array:
  """``[B·H, K, V]`` states, zero in the rows whose ``reset [B, T]`` holds at t = 0 (a ``where``:
  not even a non-finite state survives it; the segment masks alone would multiply it by 0)."""
  first = jnp.repeat(jnp.asarray(reset, bool)[:, 0], h)  # [B·H], batch-major like ``sequences``
  return jnp.where(first[:, None, None], jnp.zeros_like(w0), w0)


def chunk_flops(kind: str, chunk: int, dk: int, block_v: int, momentum: bool) -> int:
  """Matmul FLOPs of one forward ``chunk.chunk_step`` on a ``[K, block_v]`` state (the count the
  kernels report to XLA and the benchmark's TFLOP/s use)."""
  c, v = chunk, block_v
  flops = 2 * c * c * dk + 2 * c * c * v + 4 * c * dk * v  # qkᵀ, (Γ∘qkᵀ)u, q·S0, kᵀu
  if kind == "delta_rule":
    flops += 2 * c * c * dk + 2 * c**3 + 2 * c * c * v + 2 * c * dk * v  # kkᵀ, inverse, T·(…), k·S0
  if kind == "titans":
    flops += 2 * c * dk * v  # k·S0
  if momentum:
    flops += 2 * c**3 + 4 * c * dk * v  # Γ = D·Dη, q·P0, kᵀ(…)
  return flops


def _log2(n: int) -> int:
  return max(n.bit_length() - 1, 0)


def phase_flops(phase: str, chunk: int, dk: int, dv: int, kind: str = "delta_rule",
                momentum: bool = False) -> int:
  """Matmul FLOPs of one chunk (one batch·head, all of V) in a phase of the phase kernels
  (``phases.py``): "ut", "state", "out", "dvl", "bwd_state", "grad"; ``kind`` "delta_rule",
  "linear_attention" (no UT system: no "ut"/"dvl", lighter state steps) or "titans"
  (``titans_phase_flops``)."""
  c = chunk
  if kind == "titans":
    return titans_phase_flops(phase, chunk, dk, dv, momentum)
  if kind == "linear_attention":
    return {"state": 2 * c * dk * dv, "out": 2 * c * c * dk + 2 * c * dk * dv + 2 * c * c * dv,
            "bwd_state": 2 * c * dk * dv,
            "grad": 3 * chunk_flops("linear_attention", c, dk, dv, False)}[phase]
  inverse = 2 * max(_log2(c) - 1, 0) * 2 * c**3  # two [C, C] matmuls per doubling level
  return {
      "ut": 2 * c * c * dk + inverse + 2 * c * c * dk + 2 * c * c * dv,  # KKᵀ, T, W, U
      "state": 4 * c * dk * dv,  # W S₀, (γK)ᵀ u
      "out": 2 * c * c * dk + 2 * c * dk * dv + 2 * c * c * dv,  # qKᵀ, q S₀, P u
      "dvl": 2 * c * c * dk + 2 * c * c * dv,  # qKᵀ, Pᵀ dO
      "bwd_state": 6 * c * dk * dv,  # (γK) dS₁, (aq)ᵀ dO, Wᵀ du
      # chunk_vjp: the forward chunk again (with the inverse), then about twice its dots.
      "grad": 3 * (chunk_flops("delta_rule", c, dk, dv, False) - 2 * c**3) + inverse,
  }[phase]


def titans_phase_flops(phase: str, chunk: int, dk: int, dv: int, momentum: bool) -> int:
  """Matmul FLOPs of one Titans chunk in a phase of ``titans_phases.py``: "coef" (gate-only
  reductions: none), "state", "out", "dvl", "bwd_state", "grad"; with ``momentum`` the ``[C, C]``
  products of ``Γ = D·Dη`` (and their pullbacks) and the momentum state's dots."""
  ckv, cck, ccv, ccc = 2 * chunk * dk * dv, 2 * chunk**2 * dk, 2 * chunk**2 * dv, 2 * chunk**3
  m = int(momentum)
  return {
      "coef": 0,
      "state": (2 + m) * ckv,  # K S₀, (γK)ᵀ u, (μK)ᵀ u
      "out": cck + ccv + (2 + m) * ckv + m * ccc,  # qKᵀ, P u, K S₀, q S₀, q P₀, D·Dη
      "dvl": cck + ccv + m * ccc,  # qKᵀ, Pᵀ dO, D·Dη
      "bwd_state": (3 + 2 * m) * ckv,  # (γK) dS₁, (aq)ᵀ dO, (βK)ᵀ du, (μK) dP₁, (cq)ᵀ dO
      "grad": 3 * cck + 2 * ccv + (6 + 4 * m) * ckv + 3 * m * ccc,
  }[phase]


def phase_bytes(phase: str, chunk: int, dk: int, dv: int, dtype, kind: str = "delta_rule",
                momentum: bool = False) -> int:
  """HBM bytes one chunk's phase reads and writes (inputs in ``dtype``, states float32)."""
  c, e, f = chunk, jnp.dtype(dtype).itemsize, 4
  gates = 2 * c * 4 * f
  state = dk * dv * f
  if kind == "titans":
    n_st, coef = 1 + int(momentum), c * 4 * f * int(momentum)
    return {
        "coef": gates + c * 4 * f,
        "state": c * dk * e + c * dv * e + gates / 2 + coef + n_st * state,
        "out": 2 * c * dk * e + 2 * c * dv * e + gates + n_st * state,
        "dvl": 2 * c * dk * e + gates + c * dv * e + c * dv * f,
        "bwd_state": 2 * c * dk * e + gates / 2 + coef + c * dv * (f + e) + n_st * state,
        "grad": 2 * c * dk * e + 2 * c * dv * e + gates + 2 * n_st * state + 2 * c * dk * f
                + c * dv * f + gates / 2,
    }[phase]
  return {
      "ut": c * dk * e + c * dv * e + gates + c * dk * e + c * dv * e,
      "state": c * dk * e * 2 + c * dv * e * 2 + gates / 2 + state,
      "out": 2 * c * dk * e + gates + state + c * dv * e * 2,
      "dvl": 2 * c * dk * e + gates + c * dv * e + c * dv * f,
      "bwd_state": 3 * c * dk * e + gates / 2 + c * dv * (f + e) + state,
      "grad": 2 * c * dk * e + c * dv * e * 2 + gates + 2 * state + 2 * c * dk * f + c * dv * f
              + gates,
  }[phase]


def phase_cost(phase: str, bh: int, num_chunks: int, chunk: int, dk: int, dv: int, dtype,
               kind: str = "delta_rule", momentum: bool = False):
  """A ``pl.CostEstimate`` of one phase kernel over all ``bh · num_chunks`` chunks (``momentum``:
  Titans with momentum)."""
  from jax.experimental import pallas as pl  # pylint: disable=g-import-not-at-top
  units = bh * num_chunks
  exps = {"ut": 2, "state": 0, "out": 1, "dvl": 1, "bwd_state": 0, "grad": 6, "coef": 3}[phase]
  if kind == "titans":  # [C, C] exponentials: D, plus Dη and its transpose with momentum
    exps = {"coef": 3, "state": 0, "out": 1, "dvl": 1, "bwd_state": 0, "grad": 1}[phase]
    exps += 2 * int(momentum) * (phase in ("out", "dvl", "grad"))
  return pl.CostEstimate(
      flops=int(units * phase_flops(phase, chunk, dk, dv, kind, momentum)),
      transcendentals=int(units * exps * chunk * chunk),
      bytes_accessed=int(units * phase_bytes(phase, chunk, dk, dv, dtype, kind, momentum)))
