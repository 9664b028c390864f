"""The associative-memory core: one recurrence and one chunk-parallel form for every memory.

Every sequence op of nlx is an associative memory ``M`` written once per token by a gradient step
on an inner objective (docs/EQUATIONS.md §1). For token t with key k_t, value v_t, query q_t,
learning rate lr_t, log-decay g_t and momentum η_t:

    decayed = exp(g_t) · M_{t-1}
    G_t     = ∇_M loss(M_ref(k_t), v_t)        M_ref = decayed (online), or the chunk-start state
    P_t     = η_t · P_{t-1} − lr_t · G_t       (P_t = −lr_t · G_t when there is no momentum)
    M_t     = decayed + P_t
    o_t     = M_t(q_t)                         (the read sees token t's own write)

Two options change the write and the read (HOPE's delta gradient descent, docs/EQUATIONS.md §4):

* ``dgd=True`` adds DGD's decay term: each dense layer ``W_l`` (input ``h_l`` at the gradient's
  reference state) becomes ``(exp(g_t) I − lr_t h_lᵀ h_l) W_l + P_t``, the decay touching only that
  layer (``h_l`` a row vector, ``W_l`` ``[in, out]``);
* ``read="before_write"`` reads ``o_t = M_{t−1}(q_t)`` (the memory before token t's write).

A third option is TTT's learning-rate schedule inside a chunk (Sun et al. 2024, Eq. 4 and the
``token_idx`` of its code), for gradients at the chunk-start state and without momentum or DGD:

* ``row_scale`` ``c [C]`` scales the chunk's accumulated writes by the token's position i in its
  chunk: ``M_t = γ_t M_0 + c_i A_t`` with ``A_t = Σ_{j≤t} (γ_t/γ_j) U_j`` (γ_t: the decay since
  the chunk start; ``M_0`` the chunk-start state), so ``c_i = 1/(i+1)`` makes every token read
  the chunk-start weights minus the *mean* of the chunk's gradient steps so far. ``c ≡ 1`` is the
  plain recurrence above. ``A`` is not a function of ``M``, so a call continuing a chunk needs it
  (``accumulated``; zero at a chunk boundary).

``recurrent_scan`` runs exactly this, token by token, with ``jax.grad`` for G_t: it is the
reference every fast path is tested against. ``chunk_start_scan`` is the parallel (dual) form for
gradients taken at the chunk-start state: within a chunk all G_j are known from the chunk-start
weights, so M_t is a linear combination of M_0, P_0 and the per-token gradients, and reads become
masked matmuls. ``nlx.memory.linear.delta_rule_chunked`` covers the remaining case (online L2
gradients on a matrix memory) with the UT transform and shares this file's chunk algebra.

All functions here work on ONE (batch, head) slice: sequences are ``[T, D]``, gates ``[T]``,
memory weights a dict ``{layer name: [in, out]}``. ``nlx.ops`` vmaps them over batch and heads.

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

from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

from nlx.memory.objectives import Objective

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


# ----------------------------------------------------------------------------------------------
# The reference: token by token.
# ----------------------------------------------------------------------------------------------


def batched(fn, batch_ndim: int):
  """``fn`` vmapped over ``batch_ndim`` leading axes of every argument."""
  for _ in range(batch_ndim):
    fn = jax.vmap(fn)
  return fn


def _time_major(x, batch_ndim: int):
  """``[*batch, T, ...] -> [T, *batch, ...]`` (None passes through)."""
  return None if x is None else jnp.moveaxis(x, batch_ndim, 0)


def recurrent_scan(memory: Memory, objective: Objective, q: Array, k: Array, v: Array,
                   lr: Array, log_decay: Array, momentum: Optional[Array], weights: Weights,
                   momentum_state: Optional[Weights], grad_chunk: Optional[int] = None,
                   batch_ndim: int = 0, offset=0, chunk_start: Optional[Weights] = None,
                   dgd: bool = False, read: str = "after_write", params: Optional[dict] = None,
                   row_scale: Optional[Array] = None, accumulated: Optional[Weights] = None):
  """The token-by-token recurrence of the module docstring (the reference).

  Args:
    memory, objective: the memory and its inner objective.
    q, k: ``[T, K]``; v: ``[T, V]``; lr, log_decay: ``[T]``; momentum: ``[T]`` or None.
    weights: initial memory weights ``{name: [in, out]}``.
    momentum_state: initial momentum (same structure) or None (no momentum).
    grad_chunk: None for gradients at the current (decayed) state; an int C for gradients at the
      state at the start of the token's chunk (chunks of C tokens aligned at t = −offset).
    batch_ndim: number of leading batch axes on every argument (e.g. 2 for ``[B, H, T, D]``);
      the scan over time is outermost and the per-slice step is vmapped inside it.
    offset: int scalar (may be traced): tokens of the first chunk already seen by an earlier call.
    chunk_start: the weights at the start of that chunk (needed when ``offset`` can be > 0).
    dgd: add DGD's per-layer decay term ``−lr_t h_lᵀ (h_l W_l)`` (needs ``grad_chunk``; ``h_l``:
      layer l's input for the key ``k_t`` at the gradient's reference state).
    read: "after_write" (``o_t = M_t(q_t)``) or "before_write" (``o_t = M_{t−1}(q_t)``).
    params: the memory's fixed parameters (``Memory.param_shapes``), or None.
    row_scale: ``[C]`` (C = ``grad_chunk``) or None: ``M_t = γ_t M_0 + c_i A_t`` for the token at
      position i of its chunk (module docstring); needs ``grad_chunk``, no momentum, no DGD.
    accumulated: with ``row_scale``, the accumulated writes ``A`` of the chunk that an earlier
      call began (same structure as ``weights``; None: zeros, as at a chunk boundary).

  Returns:
    ``(o [T, V], weights, momentum_state, chunk_start, accumulated)`` after the last token;
    ``chunk_start`` is the start weights of the chunk the next token belongs to (the final
    weights when it starts a new chunk; None without ``grad_chunk``), ``accumulated`` that
    chunk's ``A`` so far (zeros when it starts a new chunk; None without ``row_scale``).
  """
  if (momentum is None) != (momentum_state is None):
    raise ValueError("momentum and momentum_state must both be given or both be None")
  if dgd and grad_chunk is None:
    raise ValueError("dgd=True needs grad_chunk (DGD's keys are taken at the chunk-start state)")
  check_read(read)
  check_row_scale(row_scale, momentum, dgd, grad_chunk)
  scaled = row_scale is not None

  def step(t, carry, x, consts):
    mem, scale = bind(memory, consts[0]), consts[1]
    grad_fn = jax.grad(lambda w, kt, vt: objective.loss(mem.apply(w, kt), vt))
    w, p, w_ref, a, d = carry
    qt, kt, vt, lrt, gt, mt = x
    if grad_chunk is not None:
      position = (t + offset) % grad_chunk
      w_ref = jax.tree.map(lambda x, y: jnp.where(position == 0, x, y), w, w_ref)
    decayed = tree_scale(jnp.exp(gt), w)
    if dgd:  # W_l ← exp(g) W_l − lr h_lᵀ (h_l W_l), h_l: the layer's input at w_ref
      h = layer_inputs(mem, w_ref, kt)
      decayed = {n: decayed[n] - lrt * jnp.outer(h[n], h[n] @ w[n]) for n in w}
    update = tree_scale(-lrt, grad_fn(w_ref if grad_chunk is not None else decayed, kt, vt))
    if scaled:  # M_t = γ_t M_0 + c_i A_t, tracking d = γ_t M_0 and A_t = exp(g_t) A_{t−1} + U_t
      d = tree_scale(jnp.exp(gt), jax.tree.map(lambda x, y: jnp.where(position == 0, x, y), w, d))
      a = jax.tree.map(lambda x, u: jnp.exp(gt) * jnp.where(position == 0, 0, x) + u, a, update)
      new = jax.tree.map(lambda x, y: x + scale[position] * y, d, a)
    else:
      if p is not None:
        p = jax.tree.map(lambda x, u: mt * x + u, p, update)
        update = p
      new = jax.tree.map(jnp.add, decayed, update)
    return (new, p, w_ref, a, d), mem.apply(new if read == "after_write" else w, qt)

  consts = (params, row_scale)

  def body(carry, tx):
    t, x = tx
    return batched(lambda c, xt, cs: step(t, c, xt, cs), batch_ndim)(carry, x, consts)

  xs = jax.tree.map(lambda x: _time_major(x, batch_ndim), (q, k, v, lr, log_decay, momentum))
  t = q.shape[batch_ndim]
  start = weights if chunk_start is None else chunk_start
  a = d = None
  if scaled:
    a = jax.tree.map(jnp.zeros_like, weights) if accumulated is None else accumulated

    def start_d(w, acc, scale):  # γ M_0 of the chunk in progress: M = γ M_0 + c A at its last token
      c_prev = jnp.where(offset % grad_chunk > 0, scale[(offset - 1) % grad_chunk], 0.0)
      return jax.tree.map(lambda x, y: x - c_prev * y, w, acc)

    d = batched(start_d, batch_ndim)(weights, a, row_scale)
  (weights, momentum_state, w_ref, a, _), o = jax.lax.scan(
      body, (weights, momentum_state, start, a, d), (jnp.arange(t), xs))
  if grad_chunk is not None:
    new_chunk = (offset + t) % grad_chunk == 0
    w_ref = jax.tree.map(lambda x, y: jnp.where(new_chunk, x, y), weights, w_ref)
    if scaled:
      a = jax.tree.map(lambda x: jnp.where(new_chunk, 0, x), a)
  return jnp.moveaxis(o, 0, batch_ndim), weights, momentum_state, (
      w_ref if grad_chunk is not None else None), a


def check_row_scale(row_scale: Optional[Array], momentum: Optional[Array], dgd: bool,
                    grad_chunk: Optional[int]) -> None:
  """Refuses ``row_scale`` where it is not defined (module docstring)."""
  if row_scale is None:
    return
  if grad_chunk is None:
    raise ValueError("row_scale needs grad_chunk (it scales by the position inside a chunk)")
  if momentum is not None:
    raise ValueError("row_scale is given with momentum: the position-scaled writes are defined "
                     "without momentum only (TTT's schedule); pass momentum=None")
  if dgd:
    raise ValueError("row_scale is given with dgd=True: the position-scaled writes are defined "
                     "for plain gradient steps only (TTT's schedule); pass dgd=False")
  if row_scale.shape[-1] != grad_chunk:
    raise ValueError(f"row_scale must have shape [..., C] with C = the chunk size {grad_chunk}; "
                     f"got {row_scale.shape}")


# ----------------------------------------------------------------------------------------------
# Chunk algebra shared by the parallel forms.
# ----------------------------------------------------------------------------------------------


def segment_sum(x: Array) -> Array:
  """``[C] -> [C, C]``: ``out[t, s] = Σ_{l=s+1..t} x_l`` for ``s ≤ t``, ``-inf`` above the diagonal.

  Built from a masked cumulative sum rather than a difference of prefix sums, so long runs of
  strong decay lose no precision.
  """
  c = x.shape[-1]
  lower = jnp.tril(jnp.ones((c, c), bool))
  strict = jnp.tril(jnp.ones((c, c), bool), -1)
  # sums[t, s] = Σ_{l ≤ t} [l > s] x_l: a cumulative sum down the rows, as one matmul (XLA's CPU
  # cumsum is a slow reduce-window).
  sums = lower.astype(x.dtype) @ jnp.where(strict, x[:, None], 0)
  return jnp.where(lower, sums, -jnp.inf)


def decay_matrix(log_a: Array) -> Array:
  """``[C] -> [C, C]``: ``Π_{l=s+1..t} a_l`` for ``s ≤ t`` (1 on the diagonal), 0 above."""
  return jnp.exp(segment_sum(log_a))


def unit_lower_inverse(a: Array) -> Array:
  """``(I + a)^{-1}`` for a strictly lower triangular ``a: [C, C]``.

  ``a`` is nilpotent (``aᶜ = 0``), so ``(I + a)^{-1} = Σ_{k<C} (−a)^k = Π_j (I + (−a)^{2^j})``:
  log2(C) squarings and products, only matmuls (differentiable with small residuals, and no
  LAPACK custom call: XLA's CPU triangular solve stalled under load in the backward pass).
  """
  c = a.shape[-1]
  power = -jnp.tril(a, -1)
  inverse = jnp.eye(c, dtype=a.dtype) + power
  span = 2  # inverse = Σ_{k<span} (−a)^k
  while span < c:
    power = power @ power
    inverse = inverse + power @ inverse
    span *= 2
  return inverse


def unit_lower_solve(a: Array, rhs: Array, block: int = 16) -> Array:
  """``(I + a)^{-1} rhs`` for a strictly lower triangular ``a: [C, C]`` and ``rhs: [C, N]``.

  Blocked forward substitution: the diagonal blocks are inverted (``unit_lower_inverse``) and
  the blocks below them are eliminated by matmuls, ``O(C² N + C b²)`` against the explicit
  inverse's ``O(C³ log C)`` (which dominated DGD's chunk at C = 64). Only matmuls, as above.
  """
  c = a.shape[-1]
  a = jnp.tril(a, -1)
  done = []
  for lo in range(0, c, block):
    hi = min(lo + block, c)
    r = rhs[lo:hi]
    if done:
      r = r - a[lo:hi, :lo] @ jnp.concatenate(done, 0)
    done.append(unit_lower_inverse(a[lo:hi, lo:hi]) @ r)
  return done[0] if len(done) == 1 else jnp.concatenate(done, 0)


class ChunkCoefficients(NamedTuple):
  """How memory and momentum at each token of a chunk depend on the chunk's start and writes.

  With U_j = −lr_j G_j the write of token j (a gradient step) and, for DGD, w_j the pseudo-value
  of its decay term (``_dgd_writes``), both outer products with token j's key, for t, j in the
  chunk:
    M_t = gamma[t] M_0 + carry[t] P_0 + Σ_{j≤t} (write[t, j] U_j + decay[t, j] w_j)
    P_t = mom_carry[t] P_0 + Σ_{j≤t} mom_write[t, j] U_j
  Without momentum, ``write`` is the decay matrix and the momentum fields are None; without DGD,
  ``decay`` is None.

  With a row scale ``c`` (``chunk_coefficients(row_scale=...)``, no momentum, no DGD) the second
  state ``P`` is the chunk's accumulated writes ``A`` instead of a momentum: ``M_t = γ_t M_in +
  (c_t − c_{s−1}) γ_t A_in + c_t Σ_{j≤t} (γ_t/γ_j) U_j`` and ``A_t = γ_t A_in + Σ_{j≤t}
  (γ_t/γ_j) U_j``, where ``M_in``, ``A_in`` are the state before slot ``s = start`` (a call that
  continues a chunk; ``c_{−1} = 0``, and ``A_in = 0`` at a chunk boundary). So ``write = c ⊙
  decay`` (row-scaled), ``carry = (c − c_{s−1}) γ``, ``mom_carry = γ``, ``mom_write = decay``.
  """

  gamma: Array          # [C]
  write: Array          # [C, C], lower triangular
  carry: Optional[Array]      # [C]
  mom_carry: Optional[Array]  # [C]
  mom_write: Optional[Array]  # [C, C]
  decay: Optional[Array] = None  # [C, C]


def chunk_coefficients(log_decay: Array, momentum: Optional[Array], start=0,
                       dgd: bool = False, row_scale: Optional[Array] = None) -> ChunkCoefficients:
  """Coefficients of ``ChunkCoefficients`` for one chunk; log_decay, momentum ``[C]``.

  ``start`` (int scalar, may be traced): the first token of the chunk that this call owns; the
  momentum ``P_0`` is carried in at that token (earlier positions hold placeholder tokens that
  write nothing, decay nothing and have η = 1, see ``chunk_start_scan_offset``). ``dgd``: also
  the coefficients of DGD's pseudo-values (they decay, and have no momentum). ``row_scale``:
  ``[C]``, the scale ``c`` of every position's accumulated writes (``ChunkCoefficients``; a
  final partial chunk passes its first positions).
  """
  gamma = jnp.exp(jnp.cumsum(log_decay))
  decay = decay_matrix(log_decay)
  dgd_decay = decay if dgd else None
  if row_scale is not None:
    check_row_scale(row_scale, momentum, dgd, log_decay.shape[-1])
    live = jnp.arange(log_decay.shape[-1]) >= start
    c_in = jnp.where(start > 0, row_scale[jnp.maximum(start - 1, 0)], 0.0)
    return ChunkCoefficients(gamma, row_scale[:, None] * decay, (row_scale - c_in) * gamma * live,
                             gamma * live, decay)
  if momentum is None:
    return ChunkCoefficients(gamma, decay, None, None, None, dgd_decay)
  # η = 0 is allowed (no carry-over); clamp its log so that gradients stay finite.
  log_eta = jnp.log(jnp.maximum(momentum, jnp.finfo(momentum.dtype).tiny))
  mom_write = decay_matrix(log_eta)
  mom_carry = jnp.exp(jnp.cumsum(log_eta)) * (jnp.arange(log_eta.shape[-1]) >= start)
  # M_t = Σ_{s≤t} (γ_t/γ_s) P_s + γ_t M_0, and P_s expands in P_0 and U_j: compose the two.
  return ChunkCoefficients(gamma, decay @ mom_write, decay @ mom_carry, mom_carry, mom_write,
                           dgd_decay)


def previous_rows(coef: ChunkCoefficients) -> ChunkCoefficients:
  """The coefficients of the memory before each token's write: row t is ``coef``'s row t − 1
  (row 0: the chunk's start state). Momentum fields are dropped (reads need the weights only)."""
  def shift(x, first):
    return None if x is None else jnp.concatenate([jnp.full((1,) + x.shape[1:], first, x.dtype),
                                                   x[:-1]], axis=0)

  return ChunkCoefficients(shift(coef.gamma, 1.0), shift(coef.write, 0.0),
                           shift(coef.carry, 0.0), None, None, shift(coef.decay, 0.0))


def chunk_matmul(h: Array, w0: Array, keys: Array, writes: Array, write: Array, gamma: Array,
                 p0: Optional[Array] = None, carry: Optional[Array] = None,
                 pseudo: Optional[Array] = None, decay: Optional[Array] = None) -> Array:
  """Row t of ``h`` times the weights of token t, without forming them (the dual form).

  The weights of token t are ``gamma[t] w0 + carry[t] p0 + Σ_{j≤t} keys_jᵀ (write[t, j] writes_j
  + decay[t, j] pseudo_j)``.

  Args:
    h: ``[C, in]`` inputs; w0, p0: ``[in, out]``; keys: ``[C, in]``; writes, pseudo:
    ``[C, out]``; write, decay: ``[C, C]``; gamma, carry: ``[C]``.

  Returns:
    ``[C, out]``.
  """
  x = h @ keys.T
  out = gamma[:, None] * (h @ w0) + (write * x) @ writes
  if pseudo is not None:
    out = out + (decay * x) @ pseudo
  if p0 is not None:
    out = out + carry[:, None] * (h @ p0)
  return out


def chunk_end_weights(w0: Array, keys: Array, writes: Array, write_row: Array, gamma_end: Array,
                      p0: Optional[Array] = None, carry_end: Optional[Array] = None,
                      pseudo: Optional[Array] = None,
                      decay_row: Optional[Array] = None) -> Array:
  """The weights after the chunk's last token: ``chunk_matmul``'s weights for its last row."""
  combined = write_row[:, None] * writes
  if pseudo is not None:
    combined = combined + decay_row[:, None] * pseudo
  w = gamma_end * w0 + keys.T @ combined
  if p0 is not None:
    w = w + carry_end * p0
  return w


def scan_chunks(body, carry, xs, chunk_size: int, prepare=None, finish=None,
                batch_ndim: int = 0, consts=None):
  """``lax.scan`` of ``body`` over chunks of ``chunk_size`` steps, and the remainder chunk.

  Only ``body`` is sequential. ``prepare`` (before) and ``finish`` (after) run for all chunks at
  once, so the scan carries the state and nothing else (as flash-linear-attention does).

  Args:
    body: ``(carry, chunk) -> (carry, y)`` for one batch slice.
    carry: initial carry (leaves ``[*batch, ...]``).
    xs: pytree of arrays ``[*batch, T, ...]`` (None leaves allowed).
    chunk_size: C. The last ``T mod C`` steps form a shorter final chunk, handled by a second call
      of ``body``; no padding is needed, so no padded token can touch the state.
    prepare: optional state-independent ``chunk -> chunk`` step, run for all chunks in parallel
      (vmapped) before the sequential scan.
    finish: optional ``(chunk, y) -> out [C, ...]``, run for all chunks in parallel after the scan
      (default: ``y`` itself, which must then be ``[C, ...]``).
    batch_ndim: number of leading batch axes. The scan runs over chunk-major arrays
      ``[N, *batch, C, ...]`` with ``body`` vmapped inside it; a scan nested in vmaps would slice
      batch-strided stacks, which XLA's CPU backend copies whole at every step of the backward
      pass (quadratic in the number of chunks).
    consts: optional per-slice constants (a pytree of ``[*batch, ...]`` leaves, e.g. a memory's
      fixed parameters): when given, the last argument of ``body`` and ``finish``.

  Returns:
    ``(carry, ys [*batch, T, ...])``.
  """
  t = jax.tree.leaves(xs)[0].shape[batch_ndim]
  n = t // chunk_size
  prepare = prepare or (lambda chunk: chunk)
  if consts is None:
    finish = finish or (lambda chunk, y: y)
    step = batched(body, batch_ndim)
    finish_all, finish_one = batched(finish, batch_ndim + 1), batched(finish, batch_ndim)
  else:  # constants are per slice: every chunk of a slice shares them (not mapped over chunks)
    per_slice_body = batched(body, batch_ndim)
    per_slice_finish = batched(finish or (lambda chunk, y, cs: y), batch_ndim)
    step = lambda c, chunk: per_slice_body(c, chunk, consts)
    finish_all = lambda chunks, y: jax.vmap(per_slice_finish, in_axes=(0, 0, None))(chunks, y,
                                                                                   consts)
    finish_one = lambda chunk, y: per_slice_finish(chunk, y, consts)
  ys = []
  if n:
    def split(x):
      x = jax.lax.slice_in_dim(x, 0, n * chunk_size, axis=batch_ndim)
      x = x.reshape(x.shape[:batch_ndim] + (n, chunk_size) + x.shape[batch_ndim + 1:])
      return jnp.moveaxis(x, batch_ndim, 0)

    full = batched(prepare, batch_ndim + 1)(jax.tree.map(split, xs))
    carry, y = jax.lax.scan(step, carry, full)
    y = jnp.moveaxis(finish_all(full, y), 0, batch_ndim)
    ys.append(y.reshape(y.shape[:batch_ndim] + (n * chunk_size,) + y.shape[batch_ndim + 2:]))
  if t > n * chunk_size:
    tail = jax.tree.map(lambda x: jax.lax.slice_in_dim(x, n * chunk_size, t, axis=batch_ndim), xs)
    tail = batched(prepare, batch_ndim)(tail)
    # A scan of length 1, not a plain call: the remainder chunk called outside a scan gave
    # garbage gradients (NaN, ~1e30) in about half of the processes under jit on XLA:CPU (jaxlib
    # 0.10.2; Mamba2 with T < chunk_size), right ones eagerly and inside a scan.
    carry, y = jax.lax.scan(step, carry, jax.tree.map(lambda x: x[None], tail))
    ys.append(finish_one(tail, jax.tree.map(lambda x: x[0], y)))
  return carry, jnp.concatenate(ys, axis=batch_ndim) if len(ys) > 1 else ys[0]


# ----------------------------------------------------------------------------------------------
# The chunk-start dual form, for any memory.
# ----------------------------------------------------------------------------------------------


def layer_grad_factors(memory: Memory, objective: Objective, weights: Weights, k: Array,
                       v: Array) -> tuple[Weights, Weights, Weights]:
  """Per-token gradient factors at fixed weights.

  Each layer is used once, so ``∇_{W[name]} loss(M(k_j), v_j) = inputs[name][j]ᵀ ⊗ errors[name][j]``
  with ``inputs`` the layer's input and ``errors`` the loss gradient w.r.t. its output. One
  backward pass for the chunk: a zero "tap" added to every layer's output, one row per token,
  receives exactly that token's error.

  Args:
    k: ``[C, K]``; v: ``[C, V]``.

  Returns:
    ``(inputs, errors, outputs)``: dicts of ``[C, in]``, ``[C, out]`` and ``[C, out]`` arrays
    (``outputs``: each layer's output ``inputs @ W``).
  """

  def tapped_loss(taps):
    inputs, outputs = {}, {}

    def matmul(name, h):
      inputs[name], outputs[name] = h, h @ weights[name]
      return outputs[name] + taps[name]

    return objective.loss(memory.forward(matmul, k), v).sum(), (inputs, outputs)

  taps = {name: jnp.zeros(k.shape[:1] + w.shape[-1:], w.dtype) for name, w in weights.items()}
  errors, (inputs, outputs) = jax.grad(tapped_loss, has_aux=True)(taps)
  return inputs, errors, outputs


class ChunkWrites(NamedTuple):
  """A chunk's writes, per layer: ``keys [C, in]`` (the layer's inputs at the gradient's
  reference state), ``writes [C, out]`` (U_j = −lr_j e_j, e the loss gradient w.r.t. the layer's
  output) and, for DGD, ``pseudo [C, out]`` (the pseudo-values of the decay term)."""

  keys: Weights
  writes: Weights
  pseudo: Optional[Weights] = None


def _chunk_writes(memory: Memory, objective: Objective, w_grad: Weights, k: Array, v: Array,
                  lr: Array) -> tuple[ChunkWrites, Weights]:
  """A chunk's gradient factors at ``w_grad``, and each layer's output there."""
  inputs, errors, outputs = layer_grad_factors(memory, objective, w_grad, k, v)
  return ChunkWrites(inputs, {name: -lr[:, None] * e for name, e in errors.items()}), outputs


def _dgd_writes(memory: Memory, objective: Objective, w_grad: Weights, k: Array, v: Array,
                lr: Array, w0: Weights, p0: Optional[Weights],
                prev: ChunkCoefficients) -> ChunkWrites:
  """A chunk's writes with DGD's decay term.

  Layer l's decay term at token s is ``−lr_s h_sᵀ (h_s W_{s−1})``, an outer product with the key
  ``h_s`` (its input at ``w_grad``) and the pseudo-value ``w_s = −lr_s h_s W_{s−1}``. ``W_{s−1}`` is
  linear in the earlier pseudo-values (``prev``: the coefficients of the state before each
  write), so they solve a unit lower triangular system, as in the delta rule's UT transform:
  ``(I + A) w = −lr ⊙ known``, ``A[s, j] = lr_s (γ_{s−1}/γ_j) (h_s · h_j)`` for j < s and ``known``
  the part of ``h_s W_{s−1}`` that does not involve w.
  """
  (keys, writes, _), outputs = _chunk_writes(memory, objective, w_grad, k, v, lr)
  pseudo = {}
  for name, h in keys.items():
    x = h @ h.T
    hw0 = outputs[name] if w_grad is w0 else h @ w0[name]  # the same product when w_grad is w0
    known = prev.gamma[:, None] * hw0 + (prev.write * x) @ writes[name]
    if p0 is not None:
      known = known + prev.carry[:, None] * (h @ p0[name])
    system = lr[:, None] * prev.decay * x
    pseudo[name] = -unit_lower_solve(system, lr[:, None] * known)
  return ChunkWrites(keys, writes, pseudo)


def _prepare_coefficients(log_decay: Array, momentum: Optional[Array], dgd: bool, read: str,
                          start=0, row_scale: Optional[Array] = None
                          ) -> tuple[ChunkCoefficients, Optional[ChunkCoefficients]]:
  """A chunk's coefficients of the state after each write, and (for DGD's system or a read
  before the write) of the state before each write."""
  coef = chunk_coefficients(log_decay, momentum, start, dgd, row_scale)
  return coef, previous_rows(coef) if dgd or read == "before_write" else None


def _weights_at(w0: Weights, p0: Optional[Weights], cw: ChunkWrites, coef: ChunkCoefficients,
                row) -> tuple[Weights, Optional[Weights]]:
  """Memory and momentum after token ``row`` (int scalar, may be traced) of a chunk."""
  take = lambda x: None if x is None else jax.lax.dynamic_index_in_dim(x, row, axis=0,
                                                                        keepdims=False)
  get = lambda tree, name: None if tree is None else tree[name]
  w = {name: chunk_end_weights(w0[name], cw.keys[name], cw.writes[name], take(coef.write),
                               take(coef.gamma), get(p0, name), take(coef.carry),
                               get(cw.pseudo, name), take(coef.decay)) for name in w0}
  p = None if p0 is None else {
      name: chunk_end_weights(p0[name], cw.keys[name], cw.writes[name], take(coef.mom_write),
                              take(coef.mom_carry)) for name in p0}
  return w, p


def _chunk_read(memory: Memory, q: Array, coef: ChunkCoefficients, w0: Weights,
                p0: Optional[Weights], cw: ChunkWrites) -> Array:
  """Every token's read at the weights of ``coef``'s rows (the dual form); q ``[C, K]``."""
  get = lambda tree, name: None if tree is None else tree[name]

  def matmul(name, h):
    return chunk_matmul(h, w0[name], cw.keys[name], cw.writes[name], coef.write, coef.gamma,
                        get(p0, name), coef.carry, get(cw.pseudo, name), coef.decay)

  return memory.forward(matmul, q)


def chunk_writes(memory: Memory, objective: Objective, w_grad: Weights, w0: Weights,
                 p0: Optional[Weights], chunk: tuple, dgd: bool) -> ChunkWrites:
  """The writes of one prepared chunk ``(q, k, v, lr, coef, prev)`` (``_prepare_coefficients``):
  gradients at ``w_grad``, the chunk's running state starting from ``w0``/``p0``."""
  _, kc, vc, lrc, _, prev = chunk
  if dgd:
    return _dgd_writes(memory, objective, w_grad, kc, vc, lrc, w0, p0, prev)
  return _chunk_writes(memory, objective, w_grad, kc, vc, lrc)[0]


def chunk_read(memory: Memory, chunk: tuple, y: tuple, read: str) -> Array:
  """Every token's read of one prepared chunk, from ``y = (w0, p0, writes)``."""
  return _chunk_read(memory, chunk[0], chunk[5] if read == "before_write" else chunk[4], *y)


def chunk_update(memory: Memory, objective: Objective, w0: Weights, p0: Optional[Weights],
                 k: Array, v: Array, lr: Array, log_decay: Array, momentum: Optional[Array], *,
                 dgd: bool = False, read: str = "after_write"):
  """One whole chunk of ``chunk_start_scan`` for one slice, its coefficients included.

  For callers that scan over chunks themselves (HOPE, whose keys and values come from memories
  written by the previous chunk). Gradients are taken at ``w0``.

  Returns:
    ``((weights, momentum_state) after the chunk, reader)``: ``chunk_output(memory, q, reader)``
    gives the chunk's reads.
  """
  coef, prev = _prepare_coefficients(log_decay, momentum, dgd, read)
  cw = chunk_writes(memory, objective, w0, w0, p0, (None, k, v, lr, coef, prev), dgd)
  state = _weights_at(w0, p0, cw, coef, k.shape[0] - 1)
  return state, (prev if read == "before_write" else coef, w0, p0, cw)


def chunk_output(memory: Memory, q: Array, reader: tuple) -> Array:
  """The reads ``[C, V]`` of a chunk at queries ``q [C, K]`` from ``chunk_update``'s reader."""
  return _chunk_read(memory, q, *reader)


def _positions(row_scale: Optional[Array], t: int, offset=0) -> Optional[Array]:
  """``row_scale [..., C]`` laid out over ``t`` tokens whose first is at position ``offset`` of
  its chunk: ``[..., t]`` (None passes through)."""
  if row_scale is None:
    return None
  return jnp.take(row_scale, (jnp.arange(t) + offset) % row_scale.shape[-1], axis=-1)


def chunk_start_scan(memory: Memory, objective: Objective, q: Array, k: Array, v: Array,
                     lr: Array, log_decay: Array, momentum: Optional[Array], weights: Weights,
                     momentum_state: Optional[Weights], chunk_size: int, batch_ndim: int = 0,
                     dgd: bool = False, read: str = "after_write", params: Optional[dict] = None,
                     row_scale: Optional[Array] = None):
  """The parallel form of ``recurrent_scan(..., grad_chunk=chunk_size)`` (same arguments/returns).

  Within a chunk every gradient is taken at the chunk-start weights, so each per-token weight is
  ``ChunkCoefficients``-linear in the start weights, start momentum and per-token gradient
  factors; the read of token t (after its own write) runs the memory's forward pass with
  ``chunk_matmul`` for every layer. When the objective's gradient does not depend on the memory
  (``dot``), the result equals the online recurrence for every chunk size. With ``dgd`` every
  layer's decay term joins the writes (``_dgd_writes``); with ``row_scale`` (``[*batch, C]``)
  the writes are row-scaled (``ChunkCoefficients``). Returns ``(o, weights, momentum_state)``:
  chunks are aligned with the call (``chunk_start_scan_offset`` continues a chunk that an earlier
  call began).
  """
  if (momentum is None) != (momentum_state is None):
    raise ValueError("momentum and momentum_state must both be given or both be None")
  check_read(read)
  check_row_scale(row_scale, momentum, dgd, chunk_size)

  def prepare(chunk):  # gate coefficients do not depend on the state: all chunks at once
    qc, kc, vc, lrc, gc, mc, rc = chunk
    return (qc, kc, vc, lrc) + _prepare_coefficients(gc, mc, dgd, read, row_scale=rc)

  def body(carry, chunk, consts):  # sequential: only what the next chunk's state needs
    mem, (w0, p0) = bind(memory, consts[0]), carry
    cw = chunk_writes(mem, objective, w0, w0, p0, chunk, dgd)
    return _weights_at(w0, p0, cw, chunk[4], chunk[1].shape[0] - 1), (w0, p0, cw)

  def finish(chunk, y, consts):  # parallel over chunks: token t reads its own weights (dual form)
    return chunk_read(bind(memory, consts[0]), chunk, y, read)

  positions = _positions(row_scale, q.shape[batch_ndim])
  (weights, momentum_state), o = scan_chunks(body, (weights, momentum_state),
                                             (q, k, v, lr, log_decay, momentum, positions),
                                             chunk_size, prepare=prepare, finish=finish,
                                             batch_ndim=batch_ndim, consts=(params,))
  return o, weights, momentum_state


def chunk_start_scan_offset(memory: Memory, objective: Objective, q: Array, k: Array, v: Array,
                            lr: Array, log_decay: Array, momentum: Optional[Array],
                            weights: Weights, momentum_state: Optional[Weights],
                            chunk_start: Weights, offset, chunk_size: int, batch_ndim: int = 0,
                            dgd: bool = False, read: str = "after_write",
                            params: Optional[dict] = None, row_scale: Optional[Array] = None,
                            accumulated: Optional[Weights] = None):
  """``chunk_start_scan`` continuing a chunk: the first token is ``offset`` tokens into a chunk
  whose start weights (its gradient reference) are ``chunk_start``. ``offset`` may be traced.

  The sequence is placed ``offset`` slots into a buffer of whole chunks; the slots around it are
  placeholders that write nothing (lr 0, zero keys), decay nothing (g 0) and keep the momentum
  (η 1). The first chunk takes its gradients at ``chunk_start`` and receives the momentum at slot
  ``offset``; the final state is read at the last real token, not at the end of the buffer.
  Costs at most 2C − 1 extra slots. With ``row_scale`` the chunk's accumulated writes take the
  momentum's place (``ChunkCoefficients``): ``accumulated`` (None: zeros) enters the first chunk
  at slot ``offset``, and every later chunk starts from zero.

  Returns:
    ``(o, weights, momentum_state, chunk_start, offset, accumulated)`` after the last token: the
    last three are the state of the chunk the next token belongs to (``recurrent_scan``'s
    convention; ``accumulated`` None without ``row_scale``).
  """
  if (momentum is None) != (momentum_state is None):
    raise ValueError("momentum and momentum_state must both be given or both be None")
  check_read(read)
  check_row_scale(row_scale, momentum, dgd, chunk_size)
  c, t = chunk_size, q.shape[batch_ndim]
  n = -(-(t + c - 1) // c)
  scaled = row_scale is not None
  if scaled:  # the accumulated writes ride in the momentum's slot (there is no momentum)
    momentum_state = jax.tree.map(jnp.zeros_like, weights) if accumulated is None else accumulated

  def place(x, fill):
    if x is None:
      return None
    buffer = jnp.full(x.shape[:batch_ndim] + (n * c,) + x.shape[batch_ndim + 1:], fill, x.dtype)
    buffer = jax.lax.dynamic_update_slice_in_dim(buffer, x, offset, axis=batch_ndim)
    buffer = buffer.reshape(x.shape[:batch_ndim] + (n, c) + x.shape[batch_ndim + 1:])
    return jnp.moveaxis(buffer, batch_ndim, 0)  # [N, *batch, C, ...]

  # The buffer's chunks are the sequence's: slot s of every chunk is position s.
  positions = None if not scaled else jnp.broadcast_to(row_scale, (n,) + row_scale.shape)
  xs = (place(q, 0), place(k, 0), place(v, 0), place(lr, 0), place(log_decay, 0),
        place(momentum, 1), positions)

  def prepare(start, chunk):
    qc, kc, vc, lrc, gc, mc, rc = chunk
    return (qc, kc, vc, lrc) + _prepare_coefficients(gc, mc, dgd, read, start, rc)

  last = offset + t - 1  # the final state: after the last real token, row last % c of its chunk
  batch_shape = q.shape[:batch_ndim]
  first = jnp.broadcast_to((jnp.arange(n) == 0).reshape((n,) + (1,) * batch_ndim),
                           (n,) + batch_shape)  # [N, *batch]: the chunk that continues

  def body(carry, x, consts):
    mem, (w0, p0, ref), (is_first, chunk) = bind(memory, consts), carry, x
    w_grad = jax.tree.map(lambda a, b: jnp.where(is_first, a, b), ref, w0)
    cw = chunk_writes(mem, objective, w_grad, w0, p0, chunk, dgd)
    at_last = _weights_at(w0, p0, cw, chunk[4], last % c)
    w1, p1 = _weights_at(w0, p0, cw, chunk[4], c - 1)
    if scaled:  # a new chunk accumulates from zero
      p1 = jax.tree.map(jnp.zeros_like, p1)
    return (w1, p1, ref), ((w0, p0, cw), at_last)

  # Momentum arrives at slot `offset` of the first chunk (slot 0 of the others). One scan over
  # all chunks, the first selected by a mask: peeling the first chunk off before the scan gave
  # wrong gradients under jit (batched, jaxlib 0.10.2 CPU), right ones eagerly.
  starts = jnp.where(jnp.arange(n) == 0, offset, 0)
  chunks = jax.vmap(lambda start, ch: batched(lambda x: prepare(start, x), batch_ndim)(ch))(
      starts, xs)
  step = batched(body, batch_ndim)
  _, (ys, at_last) = jax.lax.scan(lambda carry, x: step(carry, x, params),
                                  (weights, momentum_state, chunk_start), (first, chunks))
  read_chunk = batched(lambda ch, y, cs: chunk_read(bind(memory, cs), ch, y, read), batch_ndim)
  o = jax.vmap(read_chunk, in_axes=(0, 0, None))(chunks, ys, params)
  o = jnp.moveaxis(o, 0, batch_ndim)
  o = o.reshape(o.shape[:batch_ndim] + (n * c,) + o.shape[batch_ndim + 2:])
  o = jax.lax.dynamic_slice_in_dim(o, offset, t, axis=batch_ndim)

  pick = lambda tree: jax.tree.map(
      lambda x: jax.lax.dynamic_index_in_dim(x, last // c, axis=0, keepdims=False), tree)
  weights, momentum_state = pick(at_last)
  w0 = pick(ys[0])
  new_offset = (offset + t) % c
  # The next token's chunk: a new one, the first (whose start weights are chunk_start), or w0.
  ref = jax.tree.map(lambda a, b: jnp.where(last // c == 0, a, b), chunk_start, w0)
  chunk_start = jax.tree.map(lambda a, b: jnp.where(new_offset == 0, a, b), weights, ref)
  accumulated = None
  if scaled:
    accumulated = jax.tree.map(lambda x: jnp.where(new_offset == 0, 0, x), momentum_state)
    momentum_state = None
  return o, weights, momentum_state, chunk_start, new_offset, accumulated
