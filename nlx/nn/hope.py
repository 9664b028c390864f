"""HOPE: self-modifying Titans followed by the Continuum Memory System; and Hope-attention.

Self-modifying Titans (PAPER.md §4, Eqs. 83–93). Per head, memories ``M_□`` (□ ∈ {k, v, η, α}
and, with ``hope_adaptive_q``, q) generate the inputs of the write, and the output memory
``M_mem`` is written and read:

    k_t = M_k(x^k_t)   v_t = M_v(x^v_t)   q_t = x^q_t            (x^□ = SiLU(conv(x W_□)), as in
    η_t = η_max · sigmoid(mean M_η(x^k_t) + b_η)                 Titans; q, k L2-normalised)
    α_t = sigmoid(mean M_α(x^k_t) + b_α)
    v̂_□ = M_□(v_t)       (each memory makes its own target, □ ∈ {k, v, η, α, mem};
                          v_t L2-normalised too, `hope_normalize_v`: see ModelConfig)
    M_□ ← M_□ (α_t I − η_t k_t k_tᵀ) − η_t ∇ ½‖M_□(k_t) − v̂_□‖²   (DGD with weight decay, Eq. 88)
    y_t = M_mem(q_t)      (after token t's write)

with Titans-style momentum on the write (``hope_momentum``: momentum gate m_t, the write's rate
then η_t(1 − m_t), an average of the writes, as in ``nlx.nn.neural_memory``) and everything
chunk-wise: within a chunk of ``hope_chunk_size`` tokens every k, v, η, α, v̂ comes from the
memories' state at the end of the previous chunk, and every gradient is taken there (Eqs. 90–91).
``memory_chunk_size`` is the output memory's gradient chunk.

How the writes map onto ``nlx.ops`` (no recurrence here): DGD's decay term ``−η M k kᵀ`` is the
gradient of ``½‖M k‖²``, so DGD on the L2 objective is ``titans_memory`` on the memory
``DGDMemory(M)``, whose output is ``[M(k), z_1, …]`` (``z_l``: each layer's pre-activation, the
layer's input being the key of its decay term, PAPER.md §7 item 2) with target ``[v̂, 0, …]``:
``titans_memory`` then applies ``−lr·∇(½‖M(k) − v̂‖² + Σ_l ½‖z_l‖²)`` at the chunk-start state,
decay ``exp(g) = α`` and momentum: exactly Eq. 88 for chunk size 1 (Eq. 93 per chunk). The rate
is ``η' = η/(1+η)`` (``hope_dgd="arxiv"``) or η ("neurips"); "off" drops the decay term.

The dot-product objective on a linear memory (Eq. 92, ``M ← M(αI − η k kᵀ) + η v̂ kᵀ``) is the
gated delta rule. Exactly, without momentum, with ``S = Mᵀ`` (``[K, V]``, the ops' layout)::

    HOPE(dot, linear, no momentum) == nlx.ops.delta_rule(q, k, v=α·v̂, beta=η'/α, g=log α,
                                                         scale=1)

since the delta rule writes ``S ← αS + β k (v − αSᵀk)ᵀ = S(…)`` i.e. ``M ← αM − βα M k kᵀ + β v kᵀ``
(η' is the DGD rate above; α = 1 and g = None without weight decay). With momentum it is
``titans_memory`` on the linear memory with target v̂ (dot + DGD = the L2 gradient), exact for
chunk 1.

Stateful use: the state carries the conv state, every memory's weights (and momentum) at the
start of the chunk in progress, and the inputs of that chunk's tokens so far; a call runs them
again with its own tokens, so a sequence split anywhere across calls (prefill, then token-by-token
decoding) equals one call for every ``hope_chunk_size``.

Hope-attention (``hope_attention``): the softmax attention of Transformer++ followed by CMS.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from nlx import ops
from nlx.memory import LINEAR, MLPMemory, core
from nlx.nn.attention import transformer
from nlx.nn.cms import CMS
from nlx.nn.config import ModelConfig
from nlx.nn.mixer import Mixer
from nlx.nn.mlp import SwiGLU
from nlx.nn.norms import l2_normalize
from nlx.nn.params import Dense, normal, param
from nlx.nn.qkv import QKV, OutputGate
from nlx.nn.registry import register

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class DGDMemory(core.Memory):
  """``base`` whose output also carries the pre-activation of its layers: ``[M(x), z_1, …]``.

  With target ``[v̂, 0, …]`` the L2 objective is ``½‖M(k) − v̂‖² + Σ_l ½‖z_l‖²``, whose extra terms'
  gradients are DGD's decay ``W_l ← W_l − η h_lᵀ h_l W_l`` with each layer's input h_l as key.

  Attributes:
    base: the memory (``LINEAR`` or an ``MLPMemory``).
    keys: "per_layer" (every layer) or "first_layer" (the layer that reads the memory input).
  """

  base: core.Memory
  keys: str = "per_layer"

  def forward(self, matmul: core.MatMul, x: Array) -> Array:
    outs = []

    def tapped(name, h):
      outs.append(matmul(name, h))
      return outs[-1]

    y = self.base.forward(tapped, x)
    return jnp.concatenate([y] + (outs if self.keys == "per_layer" else outs[:1]), axis=-1)

  def layer_shapes(self, key_dim: int, value_dim: int, hidden_dim: int = 0) -> dict:
    del value_dim  # the output is wider than the memory: [M(x), z_1, ...]
    return self.base.layer_shapes(key_dim, key_dim, hidden_dim)

  def hidden_dim(self, weights: dict) -> int:
    return self.base.hidden_dim(weights)

  def extra_dim(self, dim: int, hidden: int) -> int:
    """Width of ``[z_1, …]`` for a memory of width ``dim`` and hidden width ``hidden``."""
    shapes, widths = self.base.layer_shapes(dim, dim, hidden), []

    def matmul(name, h):  # records the layers' output widths in the order of use
      widths.append(shapes[name][1])
      return jnp.zeros(h.shape[:-1] + (shapes[name][1],))

    self.base.forward(matmul, jnp.zeros((dim,)))
    return sum(widths if self.keys == "per_layer" else widths[:1])


def read(memory: core.Memory, weights: dict, x: Array) -> Array:
  """``M(x)`` without a write: weights ``{name: [B, H, in, out]}``, x ``[B, T, H, K]``."""
  apply = lambda w, xh: memory.apply(w, xh.astype(jnp.float32))
  return jax.vmap(jax.vmap(apply, in_axes=(0, 1), out_axes=1))(weights, x).astype(x.dtype)


class HopeState(NamedTuple):
  """The stateful API's state: the memories at the start of the chunk in progress, and the
  mixer inputs of that chunk's first ``offset`` tokens (they are written again, from the
  chunk-start state, when the chunk continues)."""

  conv: Optional[Array]             # [B, W − 1, channels] or None without conv
  components: ops.TitansState       # the k, v, (q), η, α memories, stacked on the head axis
  memory: ops.TitansState           # the output memory
  pending: tuple                    # (q, k, v [B, C − 1, H, dk], momentum [B, C − 1, H] or None)
  offset: Array                     # int32 scalar: tokens of the chunk in progress, 0 ≤ · < C


def check_hope(cfg: ModelConfig) -> None:
  """Refuses HOPE settings that the memories cannot take, naming the field."""
  cfg.require("hope", expand_v=(cfg.expand_v == 1, "HOPE's memories map head_dim -> head_dim "
                                "(v̂ = M(v)); use expand_v = 1"))
  cfg.require("hope", hope_objective=(cfg.hope_objective == "l2" or cfg.hope_memory == "linear",
                                      "the dot-product objective needs hope_memory='linear'"))
  cfg.require("hope", hope_momentum=(not (cfg.hope_objective == "dot" and cfg.hope_dgd == "off"
                                          and cfg.hope_momentum),
                                     "the Hebbian write (dot, hope_dgd='off') has no momentum"))
  cfg.require("hope", memory_chunk_size=(cfg.hope_chunk % cfg.memory_chunk_size == 0,
                                         f"must divide hope_chunk_size={cfg.hope_chunk}"))


class SelfModifyingTitans(Mixer):
  """HOPE's sequence mixer; see the module docstring. Uses the ``hope_*`` fields of ``cfg``."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    check_hope(cfg)
    d, h, dk = cfg.d_model, cfg.n_heads, cfg.dk
    self.cfg, self.heads, self.dk = cfg, h, dk
    self.chunk = cfg.hope_chunk
    self.names = tuple(n for n, on in (("k", cfg.hope_adaptive_k), ("v", cfg.hope_adaptive_v),
                                       ("q", cfg.hope_adaptive_q), ("eta", True),
                                       ("alpha", cfg.hope_weight_decay)) if on)
    self.base = LINEAR if cfg.hope_memory == "linear" else MLPMemory("silu")
    self.hidden = 0 if cfg.hope_memory == "linear" else cfg.memory_expand * dk
    self.qkv = QKV(d, h, dk, dk, cfg.conv_size, rngs=rngs)
    self.components_init = self._memory_init(rngs, len(self.names) * h)
    self.memory_init = self._memory_init(rngs, h)
    # b_η, b_α: η ≈ 0.12 η_max and α ≈ 0.993 at the start (the gates of Titans).
    self.gate_bias = param(rngs, lambda key, shape, dtype: jnp.broadcast_to(
        jnp.asarray([-2.0, 5.0], dtype)[:, None], shape), (2, h), ("gates", "heads"))
    self.momentum_gate = (Dense((d,), (h,), ("embed", "heads"), rngs=rngs, use_bias=True)
                          if cfg.hope_momentum else None)
    self.out = OutputGate(d, h, dk, rngs=rngs, eps=cfg.norm_eps)

  def _memory_init(self, rngs: nnx.Rngs, heads: int) -> nnx.Dict:
    """Learned initial weights of ``heads`` memories: identity (linear) or a fan-in MLP."""
    dk, hidden = self.dk, self.hidden
    if self.hidden == 0:
      eye = lambda key, shape, dtype: jnp.broadcast_to(jnp.eye(dk, dtype=dtype), shape)
      return nnx.Dict(w=param(rngs, eye, (heads, dk, dk), ("heads", "head_dim", "head_dim_v")))
    return nnx.Dict(
        w2=param(rngs, normal(dk**-0.5), (heads, dk, hidden), ("heads", "head_dim", "memory_mlp")),
        w1=param(rngs, normal(hidden**-0.5), (heads, hidden, dk),
                 ("heads", "memory_mlp", "head_dim")))

  def _initial(self, init: nnx.Dict, batch_size: int) -> ops.TitansState:
    # Memory states are float32 (what nlx.ops returns), whatever the compute dtype of the params.
    weights = {n: jnp.broadcast_to(w[...].astype(jnp.promote_types(w.dtype, jnp.float32)),
                                   (batch_size,) + w.shape) for n, w in init.items()}
    momentum = jax.tree.map(jnp.zeros_like, weights) if self.cfg.hope_momentum else None
    return ops.TitansState(weights, momentum)

  def init_state(self, batch_size: int, max_len: int) -> HopeState:
    del max_len
    dtype = self.memory_init[next(iter(self.memory_init))][...].dtype
    seq = jnp.zeros((batch_size, self.chunk - 1, self.heads, self.dk), dtype)
    momentum = (jnp.zeros((batch_size, self.chunk - 1, self.heads), dtype)
                if self.momentum_gate is not None else None)
    return HopeState(self.qkv.init_state(batch_size),
                     self._initial(self.components_init, batch_size),
                     self._initial(self.memory_init, batch_size),
                     (seq, seq, seq, momentum), jnp.zeros((), jnp.int32))

  # -- the write of one group of memories --------------------------------------------------------

  def _rate(self, eta: Array) -> Array:
    return eta / (1.0 + eta) if self.cfg.hope_dgd == "arxiv" else eta

  def write(self, state: ops.TitansState, q, k, target, eta, log_alpha, momentum, chunk: int):
    """Writes ``(k, target)`` into memories with state ``state`` and reads them at q.

    Args:
      q, k, target: ``[B, T, H, dk]``; eta: ``[B, T, H]`` (η, before the DGD rate);
      log_alpha: ``[B, T, H]`` log-retention or None; momentum: ``[B, T, H]`` or None.

    Returns:
      ``(o [B, T, H, dk], TitansState(weights, momentum))``.
    """
    cfg, impl = self.cfg, self.cfg.impl
    rate = self._rate(eta)
    if cfg.hope_objective == "dot" and momentum is None:
      s0 = state.memory["w"]
      if cfg.hope_dgd == "off":  # Hebbian: M ← αM + η v̂ kᵀ
        o, s = ops.linear_attention(q, k, eta[..., None] * target, g=log_alpha, scale=1.0,
                                    initial_state=s0, chunk_size=chunk, impl=impl)
      else:
        alpha = 1.0 if log_alpha is None else jnp.exp(log_alpha)
        beta = rate / alpha
        v = target if log_alpha is None else alpha[..., None] * target
        o, s = ops.delta_rule(q, k, v, beta=beta, g=log_alpha, scale=1.0, initial_state=s0,
                              chunk_size=chunk, impl=impl)
      return o, ops.TitansState({"w": s}, None)
    memory, v = self.base, target
    if cfg.hope_objective == "l2" and cfg.hope_dgd != "off":
      memory = DGDMemory(self.base, cfg.hope_dgd_keys)
      extra = memory.extra_dim(self.dk, self.hidden)
      v = jnp.concatenate([target, jnp.zeros(target.shape[:-1] + (extra,), target.dtype)], -1)
    weights = state.memory["w"] if memory is LINEAR else state.memory
    momentum_state = state.momentum
    if memory is LINEAR and momentum_state is not None:
      momentum_state = momentum_state["w"]
    o, new = ops.titans_memory(q, k, v, lr=rate, momentum=momentum, g=log_alpha, memory=memory,
                               initial_state=ops.TitansState(weights, momentum_state),
                               chunk_size=chunk, impl=impl)
    wrap = (lambda x: None if x is None else {"w": x}) if memory is LINEAR else (lambda x: x)
    return o[..., :self.dk], ops.TitansState(wrap(new.memory), wrap(new.momentum))

  # -- one chunk --------------------------------------------------------------------------------

  def _chunk(self, carry, inputs):
    """One chunk ``[B, C, ...]``: reads and targets at the chunk-start state, then the writes."""
    comps, mem = carry
    q, k, v, momentum = inputs
    n = len(self.names)
    streams = {"k": k, "v": v, "q": q, "eta": k, "alpha": k}
    reads = read(self.base, comps.memory, jnp.concatenate([streams[c] for c in self.names], 2))
    out = dict(zip(self.names, jnp.split(reads, n, axis=2)))
    k = l2_normalize(out["k"]) if "k" in out else k
    v = out.get("v", v)
    v = l2_normalize(v) if self.cfg.hope_normalize_v else v
    q = l2_normalize(out["q"]) if "q" in out else q
    bias = self.gate_bias[...]
    eta = self.cfg.hope_lr * jax.nn.sigmoid(out["eta"].mean(-1) + bias[0])
    if momentum is not None:  # an EMA of the writes: a chunk steps at most C·η_max (ModelConfig)
      eta = eta * (1.0 - momentum)
    log_alpha = (jax.nn.log_sigmoid(out["alpha"].mean(-1) + bias[1]) if "alpha" in out
                 else None)
    targets = read(self.base, comps.memory, jnp.tile(v, (1, 1, n, 1)))
    target_mem = read(self.base, mem.memory, v)
    if self.cfg.hope_stop_gradient:
      targets, target_mem = jax.lax.stop_gradient((targets, target_mem))
    tile = lambda g: None if g is None else jnp.tile(g, (1, 1, n))
    kn = jnp.tile(k, (1, 1, n, 1))
    _, comps = self.write(comps, kn, kn, targets, tile(eta), tile(log_alpha), tile(momentum),
                          q.shape[1])
    o, mem = self.write(mem, q, k, target_mem, eta, log_alpha, momentum,
                        min(self.cfg.memory_chunk_size, q.shape[1]))
    return (comps, mem), o

  def __call__(self, x: Array, state: Optional[HopeState] = None,
               pos: Array | int = 0) -> tuple[Array, Optional[HopeState]]:
    del pos
    q, k, v, conv = self.qkv(x, None if state is None else state.conv)
    momentum = (jax.nn.sigmoid(self.momentum_gate(x)) if self.momentum_gate is not None
                else None)
    if state is None:
      b = x.shape[0]
      carry = (self._initial(self.components_init, b), self._initial(self.memory_init, b))
      (_, _), o = core.scan_chunks(self._chunk_time_major, carry,
                                   tuple(map(_time_major, (q, k, v, momentum))), self.chunk)
      return self.out(_batch_major(o).astype(x.dtype), x), None
    o, state = self._continue(state._replace(conv=conv), (q, k, v, momentum))
    return self.out(o.astype(x.dtype), x), state

  def _chunk_time_major(self, carry, chunk):
    """``_chunk`` on time-major inputs ``[C, B, ...]`` (the layout of ``core.scan_chunks``)."""
    carry, o = self._chunk(carry, jax.tree.map(_batch_major, chunk))
    return carry, _time_major(o)

  def _continue(self, state: HopeState, inputs: tuple) -> tuple[Array, HopeState]:
    """Continues the chunk in progress of ``state`` with ``inputs`` (q, k, v ``[B, T, H, dk]``,
    momentum ``[B, T, H]`` or None): ``(o [B, T, H, dk], state)``.

    The pending ``offset`` tokens and the new ones, in a buffer of whole chunks (zeros after the
    last real token), run from the chunk-start state exactly as one call runs them; the slots
    after the last real token change nothing before it (every write is causal in its chunk). The
    new state is the carry at the start of the chunk the next token falls in, and that chunk's
    inputs so far. Costs at most 2C − 1 extra slots per call (C: ``hope_chunk_size``).
    """
    c, r = self.chunk, state.offset
    t = inputs[0].shape[1]
    n = -(-(c - 1 + t) // c)  # chunks in the buffer

    def place(pending, new):  # [B, n·c + c − 1, ...]: pending, new from slot r, zeros after
      if new is None:
        return None
      buffer = jnp.zeros((new.shape[0], (n + 1) * c - 1) + new.shape[2:], new.dtype)
      buffer = jax.lax.dynamic_update_slice_in_dim(buffer, pending.astype(new.dtype), 0, 1)
      buffer = jax.lax.dynamic_update_slice_in_dim(buffer, new, r, 1)
      return jnp.where(_slots(buffer, 1) < r + t, buffer, 0)

    buffers = tuple(map(place, state.pending, inputs))
    chunks = jax.tree.map(lambda a: _time_major(a[:, :n * c]).reshape((n, c) + a.shape[:1]
                                                                       + a.shape[2:]), buffers)
    finished = (r + t) // c  # the chunk of the next token (== n when the buffer ends there)

    def body(carry, xs):
      now, saved = carry
      j, chunk = xs
      saved = jax.tree.map(lambda a, b: jnp.where(j == finished, a, b), now, saved)
      now, o = self._chunk_time_major(now, chunk)
      return (now, saved), o

    start = (state.components, state.memory)
    (end, saved), o = jax.lax.scan(body, (start, start), (jnp.arange(n), chunks))
    comps, mem = jax.tree.map(lambda a, b: jnp.where(finished == n, a, b), end, saved)
    o = jax.lax.dynamic_slice_in_dim(_batch_major(o.reshape((n * c,) + o.shape[2:])), r, t, 1)
    pending = tuple(None if a is None else
                    jax.lax.dynamic_slice_in_dim(a, finished * c, c - 1, 1).astype(old.dtype)
                    for a, old in zip(buffers, state.pending))
    return o, HopeState(state.conv, comps, mem, pending, (r + t) % c)


def _time_major(a: Optional[Array]) -> Optional[Array]:
  return None if a is None else jnp.moveaxis(a, 1, 0)


def _batch_major(a: Optional[Array]) -> Optional[Array]:
  return None if a is None else jnp.moveaxis(a, 0, 1)


def _slots(a: Array, axis: int) -> Array:
  """The index along ``axis`` of every element of ``a``, broadcastable against it."""
  shape = [1] * a.ndim
  shape[axis] = a.shape[axis]
  return jnp.arange(a.shape[axis]).reshape(shape)


def cms_or_swiglu(cfg: ModelConfig, *, rngs: nnx.Rngs):
  """The MLP of HOPE blocks: the CMS, or (``cms=False``, the "w/o CMS" ablation) SwiGLU."""
  return CMS(cfg, rngs=rngs) if cfg.cms else SwiGLU(cfg.d_model, cfg.mlp_dim, rngs=rngs)


register("hope", SelfModifyingTitans, mlp=cms_or_swiglu, validate=check_hope,
         description="HOPE: self-modifying Titans (DGD, momentum, decay), then CMS")
register("hope_attention", transformer, mlp=cms_or_swiglu,
         description="Hope-attention: softmax attention, then CMS")
