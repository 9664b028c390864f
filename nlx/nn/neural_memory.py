"""A neural long-term memory mixer on ``nlx.ops.titans_memory`` (TTT and Titans share it).

For each token the memory ``M`` (a matrix or the residual MLP of ``nlx.memory.MLPMemory``, one per
head, or TTT's inner model ``nlx.memory.deep.TTTMemory``) takes a gradient step on
``½‖M(k_t) − v_t‖²`` at the chunk-start weights, with optional momentum and decay, and is read at
``q_t`` after the write (the convention of ``nlx.ops``; docs/EQUATIONS.md, choice 13):

* TTT-Linear / TTT-MLP (``ttt=True``), as the TTT paper's code (Sun et al. 2024): the inner model
  is ``M(x) = x + LN(x W + b)`` or ``x + LN(gelu(x W1 + b1) W2 + b2)`` with a per-head
  LayerNorm whose scale and shift (init 1, 0) are learned by the outer loop only, while the
  inner loop writes W and b (init: normals of std 0.02, zero biases, as TTT); the loss
  ``½‖M(k) − v‖²`` is TTT's ``½‖LN(·) − (v − k)‖²`` and the read is ``q + LN(·)``. Inside each
  chunk (TTT's mini-batch) token i reads the chunk-start weights minus ``c_i`` times its
  accumulated gradient steps, ``c_i = max(1/(i+1) + offset_i, 0)`` with a learned per-position
  offset (init 0; TTT's ``token_idx + learnable_token_idx``), and the chunk ends at its last
  token's weights (``titans_memory``'s ``position_scale``).
  ``lr = ttt_base_lr · sigmoid(x W_lr) / head_dim``, no momentum, no decay. Not TTT's: the gate's
  bias starts at −2 as for every family here (TTT's code: 0), the hidden width of TTT-MLP is
  ``memory_expand · head_dim`` (TTT: 4 · head_dim), and q, k, v come from ``QKV`` below rather
  than TTT's projections (which also apply RoPE within each mini-batch).
* Titans LMM: ``lr = titans_lr_max · sigmoid(x W_lr) · (1 − η)`` (``ModelConfig.titans_lr``),
  momentum ``η = sigmoid(x W_η)``, log-decay ``g = log sigmoid(x W_α)`` (retention 1 − α in the
  paper). The factor 1 − η makes the momentum an average of gradients: Titans' θ_t is a learned
  gate, and with θ_t free a chunk of C tokens, whose C gradients are taken at one state, moved by
  up to C(C+1)/2·θ·G as η → 1 (a repeated key then diverged; tests/nn/test_long_sequences.py).
  ``model.titans_rate="normalized"``: each memory layer at that rate over max(1, ‖h_l‖²) (its
  input's squared norm; ``ops.titans_memory``'s ``rate``), for MLP memories whose hidden input
  outgrows the bound (docs/RELIABILITY.md). ``model.titans_rate="gram"``: each token's rate
  over the similarity of its key to the keys so far in its chunk (``nlx/memory/rates.py``), so
  that a key seen once is written at up to ``titans_lr_max = 0.5 / H_C`` (C = 16: 0.148 against
  the plain 0.031), then as "normalized".

q, k, v come from the shared ``QKV`` input (short conv, SiLU, L2-normalised q and k); the output
is per-head RMSNorm, a SiLU gate and the output projection (docs/EQUATIONS.md §5, the block). The
memory's initial weights are parameters (learned in the outer loop); the state carries the
weights and momentum after the last token.

Stateful use is exact for any ``memory_chunk_size`` and any split of a sequence into calls
(prefill, then token-by-token steps): the state carries the gradient chunk in progress
(``ops.TitansState.chunk_start`` and ``offset``; for TTT also the chunk's accumulated writes,
``accumulated``), so a call that starts mid-chunk keeps taking gradients at that chunk's start
weights.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from nlx import ops
from nlx.memory import LINEAR, MLPMemory
from nlx.memory.deep import TTTMemory
from nlx.nn.config import ModelConfig
from nlx.nn.mixer import Mixer
from nlx.nn.params import Dense, constant, normal, param
from nlx.nn.qkv import QKV, OutputGate

Array = jax.Array


class MemoryState(NamedTuple):
  conv: Optional[Array]     # [B, W − 1, channels] or None without conv
  memory: ops.TitansState   # weights (and momentum) after the last token


class NeuralMemory(Mixer):
  """The memory mixer; see the module docstring.

  Args:
    cfg: uses d_model, n_heads, head_dim, expand_v, conv_size, memory_expand, memory_chunk_size,
      impl, norm_eps.
    memory: "linear" (``M(x) = x S``) or "mlp" (``x + σ(x W2) W1``, needs dk == dv).
    activation: σ of the MLP memory.
    lr_max: the largest inner learning rate.
    momentum, decay: Titans' momentum and forgetting gate.
    ttt: TTT's inner model and schedule (module docstring): ``TTTMemory(memory, activation)``
      with a learned LayerNorm and biases, and the position-scaled chunk (needs no momentum, no
      decay).
  """

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, memory: str, lr_max: float,
               activation: str = "silu", momentum: bool = False, decay: bool = False,
               ttt: bool = False):
    d, h, dk, dv = cfg.d_model, cfg.n_heads, cfg.dk, cfg.dv
    if memory not in ("linear", "mlp"):
      raise ValueError(f"memory={memory!r} is not one of ('linear', 'mlp')")
    if ttt and (momentum or decay):
      raise ValueError(f"ttt=True takes no momentum and no decay; got momentum={momentum}, "
                       f"decay={decay}")
    if (memory == "mlp" or ttt) and dk != dv:
      what = "TTT's inner model x + LN(...)" if ttt else "the residual MLP memory"
      raise ValueError(f"model.expand_v={cfg.expand_v} is not allowed for family "
                       f"{cfg.family!r}: {what} needs expand_v = 1")
    self.heads, self.dk, self.dv, self.lr_max = h, dk, dv, lr_max
    self.chunk_size, self.impl, self.ttt = cfg.memory_chunk_size, cfg.impl, ttt
    self.rate = "plain" if ttt else cfg.titans_rate  # TTT's rate is its own (ttt_base_lr)
    if ttt:
      self.memory = TTTMemory(memory, activation)
    else:
      self.memory = LINEAR if memory == "linear" else MLPMemory(activation)
    self.qkv = QKV(d, h, dk, dv, cfg.conv_size, rngs=rngs)
    # Gates: [lr, momentum, decay] logits per head; biases start at lr ≈ 0.12 lr_max, η = 0.5,
    # g ≈ −0.007 (slow forgetting). A chunk of C tokens steps C gradients from one state, so the
    # effective step is about C·lr/(1 − η): η ≈ 0.9 made the MLP memory diverge at T=4096.
    biases = [-2.0] + ([0.0] if momentum else []) + ([5.0] if decay else [])
    self.momentum, self.decay = momentum, decay
    self.gates = Dense((d,), (len(biases), h), ("embed", "gates", "heads"), rngs=rngs,
                       use_bias=True,
                       bias_init=lambda key, shape, dtype: jnp.broadcast_to(
                           jnp.asarray(biases, dtype)[:, None], shape))
    # Initial weights with the head axis folded into the rows ([heads·in, out], logical axis
    # memory_rows) so that FSDP shards them whatever the head count.
    self.hidden = 0 if memory == "linear" else cfg.memory_expand * dk
    if ttt:
      # TTT's initialisation: normals of std 0.02, zero biases. A zero W would make every
      # LN(x W + b) the normalisation of a constant vector, whose gradient is 1/sqrt(eps) large.
      out_axis = lambda n: "memory_mlp" if n in ("w1", "b1") else "head_dim_v"
      self.init_weights = nnx.Dict({
          n: param(rngs, constant(0.0) if n.startswith("b") else normal(0.02),
                   (h * shape[0], shape[1]), ("memory_rows", out_axis(n)))
          for n, shape in self.memory.layer_shapes(dk, dv, self.hidden).items()})
      # The inner LayerNorm (outer-learned only) and the learned offset of the schedule c_i.
      self.ln = nnx.Dict(scale=param(rngs, constant(1.0), (h, dv), ("heads", "head_dim_v")),
                         shift=param(rngs, constant(0.0), (h, dv), ("heads", "head_dim_v")))
      self.position_offset = param(rngs, constant(0.0), (self.chunk_size,), ("gates",))
    elif memory == "linear":
      self.init_weights = nnx.Dict(w=param(rngs, constant(0.0), (h * dk, dv),
                                           ("memory_rows", "head_dim_v")))
    else:
      self.init_weights = nnx.Dict(
          w2=param(rngs, normal(dk**-0.5), (h * dk, self.hidden), ("memory_rows", "memory_mlp")),
          w1=param(rngs, normal(self.hidden**-0.5), (h * self.hidden, dv),
                   ("memory_rows", "head_dim")))
    self.out = OutputGate(d, h, dv, rngs=rngs, eps=cfg.norm_eps)

  def position_scale(self) -> Optional[Array]:
    """TTT's ``c_i = max(1/(i+1) + offset_i, 0)`` for positions i of a chunk, or None."""
    if not self.ttt:
      return None
    offset = self.position_offset[...]
    first = 1.0 / jnp.arange(1, self.chunk_size + 1, dtype=offset.dtype)
    return jnp.maximum(first + offset, 0.0)

  def memory_params(self) -> Optional[dict]:
    """The inner LayerNorm's ``{"scale", "shift": [H, dv]}`` (TTT), or None."""
    return {name: p[...] for name, p in self.ln.items()} if self.ttt else None

  def initial_memory(self, batch_size: int, stateful: bool = False) -> ops.TitansState:
    """The learned initial weights broadcast to the batch (momentum zero, if any).

    ``stateful``: the state of the stateful API, with the chunk-in-progress fields filled (a
    chunk starts at offset 0), so that its structure stays the same from call to call.
    """
    # Memory states are float32 (what nlx.ops returns), whatever the compute dtype of the params.
    shapes = self.memory.layer_shapes(self.dk, self.dv, self.hidden)
    weights = {name: w[...].reshape((self.heads,) + shapes[name])
               for name, w in self.init_weights.items()}
    weights = {name: jnp.broadcast_to(w.astype(jnp.promote_types(w.dtype, jnp.float32)),
                                      (batch_size,) + w.shape) for name, w in weights.items()}
    if self.memory is LINEAR:
      weights = weights["w"]
    momentum = jax.tree.map(jnp.zeros_like, weights) if self.momentum else None
    accumulated = jax.tree.map(jnp.zeros_like, weights) if self.ttt else None
    if stateful:  # one chunk offset per row: packed rows continue different chunks
      keys = (jnp.zeros((batch_size, self.heads, self.chunk_size, self.dk), jnp.float32)
              if self.rate == "gram" else None)  # the gram rate's chunk in progress
      return ops.TitansState(weights, momentum, weights, jnp.zeros((batch_size,), jnp.int32),
                             accumulated, keys)
    return ops.TitansState(weights, momentum)

  def init_state(self, batch_size: int, max_len: int) -> MemoryState:
    del max_len
    return MemoryState(self.qkv.init_state(batch_size),
                       self.initial_memory(batch_size, stateful=True))

  def read(self, weights, q: Array) -> Array:
    """``M(q)`` without a write: weights of ``TitansState.memory``, q ``[B, T, H, dk]`` -> dv."""
    tree = {"w": weights} if self.memory is LINEAR else weights
    dtype = jnp.promote_types(q.dtype, jnp.float32)  # float64 stays float64 (hope.read)
    apply = lambda w, x, params: self.memory.bind(params).apply(w, x.astype(dtype))
    o = jax.vmap(jax.vmap(apply, in_axes=(0, 1, 0), out_axes=1),
                 in_axes=(0, 0, None))(tree, q, self.memory_params())
    return o.astype(q.dtype)

  def __call__(self, x: Array, state: Optional[MemoryState] = None, pos: Array | int = 0,
               segments=None) -> tuple[Array, Optional[MemoryState]]:
    """``segments`` (``nlx.nn.segments.Segments`` or None): at each document's first token the
    conv window, the memory (to its learned initial weights), the momentum and the gradient
    chunk restart, so a packed row equals its documents run alone."""
    del pos
    reset = None if segments is None else segments.reset
    conv_state = None if state is None else state.conv
    q, k, v, conv = self.qkv(x, conv_state, reset=reset)
    gates = self.gates(x)  # [B, T, n_gates, H]
    lr = self.lr_max * jax.nn.sigmoid(gates[:, :, 0])
    momentum = jax.nn.sigmoid(gates[:, :, 1]) if self.momentum else None
    if momentum is not None:  # an EMA of the gradients: a chunk steps at most C·lr_max
      lr = lr * (1.0 - momentum)
    g = jax.nn.log_sigmoid(gates[:, :, -1]) if self.decay else None
    initial = self.initial_memory(x.shape[0]) if state is None else state.memory
    boundaries = {} if reset is None else dict(
        reset=reset, reset_state=self.initial_memory(x.shape[0]).memory)
    o, memory = ops.titans_memory(q, k, v, lr=lr, momentum=momentum, g=g, memory=self.memory,
                                  initial_state=initial, chunk_size=self.chunk_size,
                                  impl=self.impl, position_scale=self.position_scale(),
                                  memory_params=self.memory_params(), rate=self.rate,
                                  **boundaries)
    return self.out(o, x), None if state is None else MemoryState(conv, memory)
