"""Titans: the long-term memory alone (LMM) and its three hybrids with attention (MAC, MAG, MAL).

All four use the same neural memory (``NeuralMemory``: a residual MLP memory per head, written by
gradient descent with momentum and decay through ``nlx.ops.titans_memory``) and attention with
learned persistent-memory tokens (docs/EQUATIONS.md §5):

* ``titans_lmm``: the memory as the mixer of every block.
* ``titans_mag`` (memory as a gate): ``y = RMSNorm(SWA(x)) ⊙ sigmoid(RMSNorm(LMM(x)))``, the
  attention a sliding window over ``[persistent | x]``.
* ``titans_mal`` (memory as a layer): blocks alternate LMM and sliding-window attention with
  persistent tokens (a two-block layer group).
* ``titans_mac`` (memory as context): the sequence is cut into segments of ``window`` tokens. For
  each token of a segment, the memory as it was at the segment start is read at a retrieval query
  (``h_t = M_seg(q_t)``); causal attention inside the segment runs over
  ``[persistent | h_{≤t} | x_{≤t}]``; its output y is written to the memory and the block returns
  ``RMSNorm(y) ⊙ sigmoid(RMSNorm(LMM(y)))`` (the paper's ``o = y ⊗ M(y)``).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from nlx.nn.attention import Attention, KVCache, attend, sliding_window, write_cache
from nlx.nn.config import ModelConfig
from nlx.nn.mixer import Mixer
from nlx.nn.neural_memory import MemoryState, NeuralMemory
from nlx.nn.norms import RMSNorm, l2_normalize
from nlx.nn.params import Dense
from nlx.nn.registry import register
from nlx.nn.rope import rope

Array = jax.Array


def titans_lmm(cfg: ModelConfig, *, rngs: nnx.Rngs) -> NeuralMemory:
  """The Titans long-term memory: MLP memory, momentum and decay."""
  return NeuralMemory(cfg, rngs=rngs, memory="mlp", activation="silu", lr_max=cfg.titans_lr,
                      momentum=True, decay=True)


def persistent_swa(cfg: ModelConfig, *, rngs: nnx.Rngs) -> Attention:
  """Sliding-window attention with ``cfg.n_persistent`` persistent tokens."""
  return sliding_window(cfg, rngs=rngs, n_persistent=cfg.n_persistent)


class GatedOutput(nnx.Module):
  """``RMSNorm(y) ⊙ sigmoid(RMSNorm(m))``: how MAG and MAC combine attention and memory."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.norm_y = RMSNorm((cfg.d_model,), ("embed",), rngs=rngs, eps=cfg.norm_eps)
    self.norm_m = RMSNorm((cfg.d_model,), ("embed",), rngs=rngs, eps=cfg.norm_eps)

  def __call__(self, y: Array, m: Array) -> Array:
    return self.norm_y(y) * jax.nn.sigmoid(self.norm_m(m))


class MemoryAsGate(Mixer):
  """Titans MAG: sliding-window attention with persistent tokens, gated by the memory branch."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.attn = persistent_swa(cfg, rngs=rngs)
    self.memory = titans_lmm(cfg, rngs=rngs)
    self.combine = GatedOutput(cfg, rngs=rngs)

  def init_state(self, batch_size: int, max_len: int) -> tuple:
    return (self.attn.init_state(batch_size, max_len),
            self.memory.init_state(batch_size, max_len))

  def __call__(self, x: Array, state: Optional[tuple] = None, pos: Array | int = 0):
    y, attn_state = self.attn(x, None if state is None else state[0], pos)
    m, memory_state = self.memory(x, None if state is None else state[1], pos)
    return self.combine(y, m), None if state is None else (attn_state, memory_state)


class MACState(NamedTuple):
  memory: MemoryState   # the memory after the last token (conv state, weights, momentum)
  segment_weights: object  # the memory weights at the start of the current segment
  h_cache: KVCache      # keys/values of the retrieved tokens h of the current segment
  x_cache: KVCache      # keys/values of the input tokens of the current segment


class MemoryAsContext(Mixer):
  """Titans MAC over segments of ``cfg.window`` tokens (see the module docstring).

  A whole sequence (``state=None``) runs as a scan over segments; a stateful call runs token by
  token (the segment-start memory, the segment's keys and the memory state are the state). The two
  agree for any ``memory_chunk_size``: the memory state carries its gradient chunk in progress.
  """

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    _check_mac(cfg)
    self.segment = cfg.window
    self.rope_theta = cfg.rope_theta
    self.heads, self.dk = cfg.n_heads, cfg.dk
    self.retrieve = Dense((cfg.d_model,), (cfg.n_heads, cfg.dk), ("embed", "heads", "head_dim"),
                          rngs=rngs)
    self.attn = Attention(cfg, rngs=rngs, n_persistent=cfg.n_persistent)
    self.memory = titans_lmm(cfg, rngs=rngs)
    self.combine = GatedOutput(cfg, rngs=rngs)

  def init_state(self, batch_size: int, max_len: int) -> MACState:
    memory = self.memory.init_state(batch_size, max_len)
    cache = self.attn.init_state(batch_size, self.segment)  # full attention, `segment` slots
    return MACState(memory, memory.memory.memory, cache, cache)

  def _segment(self, carry: MACState, x: Array, positions: Array, cached: bool):
    """Tokens ``x [B, n, d]`` at ``positions [n]``, all inside one segment."""
    b, n, d = x.shape
    at_start = positions[0] % self.segment == 0
    current = carry.memory.memory.memory
    seg_w = jax.tree.map(lambda c, s: jnp.where(at_start, c, s), current, carry.segment_weights)
    h = self.memory.read(seg_w, l2_normalize(jax.nn.silu(self.retrieve(x)))).reshape(b, n, d)
    attn = self.attn
    q = rope(attn.q(x), positions, self.rope_theta)
    kx, vx = rope(attn.k(x), positions, self.rope_theta), attn.v(x)
    kh, vh = rope(attn.k(h), positions, self.rope_theta), attn.v(h)
    keys, values, k_pos = [kh, kx], [vh, vx], [positions, positions]
    h_cache, x_cache = carry.h_cache, carry.x_cache
    if cached:
      keys = [h_cache.k.astype(x.dtype), x_cache.k.astype(x.dtype)] + keys
      values = [h_cache.v.astype(x.dtype), x_cache.v.astype(x.dtype)] + values
      k_pos = [h_cache.slot_pos, x_cache.slot_pos] + k_pos
      h_cache = write_cache(h_cache, kh, vh, positions)
      x_cache = write_cache(x_cache, kx, vx, positions)
    o = attend(q, jnp.concatenate(keys, 1), jnp.concatenate(values, 1), positions,
               jnp.concatenate(k_pos), prefix=attn.prefix(b, x.dtype), segment=self.segment)
    y = attn.o(o)
    m, memory = self.memory(y, carry.memory)
    return MACState(memory, seg_w, h_cache, x_cache), self.combine(y, m)

  def __call__(self, x: Array, state: Optional[MACState] = None, pos: Array | int = 0):
    b, t, d = x.shape
    if state is None:  # a whole sequence from position 0: one scan step per segment
      s = self.segment
      n_seg = -(-t // s)
      xs = jnp.pad(x, ((0, 0), (0, n_seg * s - t), (0, 0))).reshape(b, n_seg, s, d)
      carry = self.init_state(b, s)

      def body(carry, inputs):
        xseg, start = inputs
        return self._segment(carry, xseg, start + jnp.arange(s, dtype=jnp.int32), cached=False)

      starts = jnp.arange(n_seg, dtype=jnp.int32) * s
      _, ys = jax.lax.scan(body, carry, (jnp.moveaxis(xs, 1, 0), starts))
      return jnp.moveaxis(ys, 0, 1).reshape(b, n_seg * s, d)[:, :t], None

    def body(carry, inputs):  # stateful: token by token
      xt, p = inputs
      carry, y = self._segment(carry, xt[:, None], p[None], cached=True)
      return carry, y[:, 0]

    positions = pos + jnp.arange(t, dtype=jnp.int32)
    state, ys = jax.lax.scan(body, state, (jnp.moveaxis(x, 1, 0), positions))
    return jnp.moveaxis(ys, 0, 1), state


def _check_mac(cfg: ModelConfig) -> None:
  cfg.require("titans_mac", window=(cfg.window is not None,
                                    "MAC needs its segment length in window (an int >= 1)"))
  cfg.require("titans_mac", expand_v=(cfg.n_heads * cfg.dv == cfg.d_model,
                                      "the retrieved tokens need n_heads * head_dim * expand_v "
                                      f"= d_model = {cfg.d_model}"))


def _check_window(name: str):
  def check(cfg: ModelConfig) -> None:
    cfg.require(name, window=(cfg.window is not None, "needs a sliding window (an int >= 1)"))
  return check


register("titans_lmm", titans_lmm, description="Titans LMM: the neural long-term memory alone")
register("titans_mag", MemoryAsGate, validate=_check_window("titans_mag"),
         description="Titans MAG: sliding-window attention gated by the memory")
register("titans_mal", titans_lmm, persistent_swa, validate=_check_window("titans_mal"),
         description="Titans MAL: memory layer, then sliding-window attention")
register("titans_mac", MemoryAsContext, validate=_check_mac,
         description="Titans MAC: attention over persistent, retrieved and segment tokens")
