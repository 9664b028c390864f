"""The Continuum Memory System (CMS): MLP blocks that keep learning in context at their own periods.

A CMS is a chain of SwiGLU blocks, one per level, with periods ``C_1 < C_2 < …`` (each dividing the
next; docs/EQUATIONS.md §3). Level ℓ's weights are an in-context memory: the level accumulates the
gradient of its inner objective over ``C_ℓ`` tokens and then takes one step,
``θ_ℓ ← θ_ℓ − η_ℓ Σ ∇ℓ_t`` (Eq. 71), so a token t reads the weights left by the updates after
tokens ``< t``. Each level has its own rate ``η_ℓ`` (``model.cms_lr``: one float for every level, or
a tuple with one per level). The levels run through ``nlx.levels``: a whole sequence
(``state=None``) by ``levels.scan_levels`` (nested scans, chunks of ``C_1`` tokens processed in
parallel), a stateful call token by token with ``levels.tick`` (per-level step counters), so that
pieces of a sequence reproduce one call.

Variants (``model.cms_variant``), with ``h_0 = x`` the block input and ``o_ℓ`` block ℓ's output:

* ``sequential`` (default, Eq. 73): ``o_ℓ = MLP_ℓ(h_{ℓ−1})``, ``h_ℓ = h_{ℓ−1} + o_ℓ``;
  ``y = Σ_ℓ o_ℓ``. Initial weights are learned by the outer loop.
* ``nested`` (Eq. 72): the chain of ``sequential``, but the weights of a faster block ℓ are
  ``init_ℓ + Δ_ℓ``: Δ_ℓ is level ℓ's in-context state (0 at start, reset to 0 every ``C_{ℓ+1}``
  tokens), and ``init_ℓ`` belongs to level ℓ + 1, which meta-learns it: level ℓ + 1's objective
  is its own loss plus level ℓ's (first-order meta-learning of the faster level's initial state).
* ``independent`` (Eq. 74): ``o_ℓ = MLP_ℓ(x)`` in parallel, ``y = Σ_ℓ w_ℓ o_ℓ`` with learned
  weights ``w`` (initialised to 1).

Inner objectives (``model.cms_objective``):

* ``local``: ``ℓ_t = ½·mean_c (o_ℓ,t − h_{ℓ−1,t} W_ℓ)²`` (``x`` instead of ``h_{ℓ−1}`` for
  ``independent``), block-local regression to a learned linear target ``W_ℓ``.
* ``next_token``: the LM loss of the finished chunk of ``C_1`` tokens. It needs the whole model:
  ``nlx.nn.next_token`` runs the LM chunk by chunk and steps the levels of every layer; the CMS
  itself then only reads its levels' weights from the state (no targets ``W_ℓ``).

The block output ``y`` is what the residual adds (``x + y`` in ``nlx.nn.model.Block``); with
``cms_lr = 0`` and every level but one starting with a zero ``down`` projection, ``y`` is exactly
that level's SwiGLU, which is how ``nlx.convert`` stacks a Transformer's MLPs into CMS levels.

With every rate 0 the levels are frozen in context: the blocks run on the whole input at once and a
state passes through unchanged. A level whose own rate is 0 keeps its weights (its gradient is
still computed and summed, then scaled by 0), while the other levels learn.

Packed documents (``segments``, ``nlx.nn.segments``): at a document's first token every level
restarts (its learned initial weights, zero accumulated gradient, zero counter), and its periods
count from that token, so each document runs as if alone. A stateful call does this token by
token (``run_tokens`` restores the fresh states where ``segments.reset``); a whole sequence
(``run_documents``) places each level's tokens in buffer periods (``packed_scan``) where every
period boundary inside a document is a buffer boundary, so that the levels stay parallel inside
their periods (``nested``: the whole chain in buffer chunks of ``C_1`` tokens).

The state of a stateful call is ``{level name: levels.LevelState}`` with a leading batch axis on
every leaf (each sequence learns its own weights); orbax saves it like any pytree.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from nlx import levels as nl_levels
from nlx.memory import core
from nlx.nn.config import ModelConfig
from nlx.nn.mixer import Mixer
from nlx.nn.mlp import SwiGLU
from nlx.nn.params import Dense, constant, param

Array = jax.Array
LAYERS = ("gate", "up", "down")


def swiglu(p: dict, x: Array) -> Array:
  """``SwiGLU`` of ``nlx.nn.mlp`` with weights ``p = {"gate", "up", "down"}`` (the same ops)."""
  return dense(jax.nn.silu(dense(x, p["gate"])) * dense(x, p["up"]), p["down"])


def swiglu_weights(mlp: SwiGLU) -> dict:
  """The kernels of a ``SwiGLU`` module as a dict ``{"gate", "up", "down"}``."""
  return {name: getattr(mlp, name).kernel[...] for name in LAYERS}


def dense(h: Array, w: Array) -> Array:
  """``h ⋅ w`` over the last axis of h, as ``nlx.nn.params.Dense`` computes it."""
  return jnp.tensordot(h, w.astype(h.dtype), axes=1)


def level_names(n: int) -> tuple[str, ...]:
  return tuple(f"level{i}" for i in range(n))


def reset_every(n: int, lr: float) -> optax.GradientTransformation:
  """SGD with rate ``lr`` whose every n-th update sets the parameters to zero (nested CMS)."""

  def init(params):
    del params
    return jnp.zeros((), jnp.int32)

  def update(grads, count, params):
    count = count + 1
    reset = count >= n
    updates = jax.tree.map(lambda g, p: jnp.where(reset, -p, -lr * g), grads, params)
    return updates, jnp.where(reset, 0, count)

  return optax.GradientTransformation(init, update)


def stop_gradient_transform() -> optax.GradientTransformation:
  """Passes gradients on with ``stop_gradient``: the outer loop does not see through writes."""
  return optax.stateless(lambda grads, params: jax.lax.stop_gradient(grads))


def level_rates(lr, n: int) -> tuple[float, ...]:
  """η of each of ``n`` levels from ``model.cms_lr``: a float for all, or a tuple of ``n``."""
  if isinstance(lr, (tuple, list)):
    if len(lr) != n:
      raise ValueError(f"cms_lr={tuple(lr)!r} must have one rate per CMS level ({n})")
    return tuple(float(r) for r in lr)
  return (float(lr),) * n


class CMSSpec:
  """The static part of a CMS: periods, variant, rates; builds levels and runs the chain.

  Args:
    periods: ``C_ℓ`` of each level.
    variant: ``model.cms_variant``.
    lr: ``model.cms_lr``: η of every level (a float) or one η per level (a tuple).
    stop_gradient: ``model.cms_stop_gradient``.
    grad_clip: ``model.cms_grad_clip`` (None: the plain step).
  """

  def __init__(self, periods, variant: str, lr, stop_gradient: bool = False, grad_clip=None):
    self.periods, self.variant = tuple(periods), variant
    self.rates = level_rates(lr, len(self.periods))
    self.stop_gradient, self.grad_clip = stop_gradient, grad_clip
    self.names = level_names(len(self.periods))

  @classmethod
  def of(cls, cfg: ModelConfig) -> "CMSSpec":
    """The spec of a model config's CMS fields."""
    return cls(cfg.cms_periods, cfg.cms_variant, cfg.cms_lr, cfg.cms_stop_gradient,
               cfg.cms_grad_clip)

  @property
  def frozen(self) -> bool:
    """Every rate is 0: nothing learns in context."""
    return not any(self.rates)

  def _key(self):
    # The per-level rates: a float and the tuple repeating it are the same spec.
    return (self.periods, self.variant, self.rates, self.stop_gradient, self.grad_clip)

  # Compared by value: a static field of the model's graph, so equal configs share jit caches.
  def __eq__(self, other):
    return isinstance(other, CMSSpec) and self._key() == other._key()

  def __hash__(self):
    return hash(self._key())

  def levels(self) -> tuple[nl_levels.Level, ...]:
    out = []
    for i, (name, period, rate) in enumerate(zip(self.names, self.periods, self.rates)):
      faster_reset = self.variant == "nested" and i < len(self.periods) - 1
      opt = (reset_every(self.periods[i + 1] // period, rate) if faster_reset
             else optax.sgd(rate))
      if self.grad_clip is not None:
        opt = optax.chain(optax.clip_by_global_norm(self.grad_clip), opt)
      if self.stop_gradient:
        opt = optax.chain(stop_gradient_transform(), opt)
      out.append(nl_levels.Level(name, period, opt))
    return tuple(out)

  def initial_params(self, blocks: list[dict]) -> dict:
    """Level parameters from the initial block weights (``nested``: Δ = 0, inits one level up)."""
    if self.variant != "nested":
      return dict(zip(self.names, blocks))
    last = len(blocks) - 1
    params = {}
    for i, name in enumerate(self.names):
      p = {"block": blocks[i]} if i == last else {"delta": jax.tree.map(jnp.zeros_like, blocks[i])}
      if i > 0:
        p["init"] = blocks[i - 1]
      params[name] = p
    return params

  def block_weights(self, params: dict) -> list[dict]:
    """The weights every block uses now, from the level parameters."""
    if self.variant != "nested":
      return [params[n] for n in self.names]
    last = len(self.names) - 1
    return [params[n]["block"] if i == last else
            jax.tree.map(jnp.add, params[self.names[i + 1]]["init"], params[n]["delta"])
            for i, n in enumerate(self.names)]

  def chain(self, params: dict, x: Array, targets: Optional[list], mix: Optional[Array],
            weights: Optional[Array] = None):
    """Runs the blocks on ``x [..., d]``: ``(y [..., d], {level name: scalar loss})``.

    ``targets[ℓ]``: the learned target weights ``W_ℓ [d, d]`` of level ℓ (target ``h W_ℓ``);
    None: no local losses (``{}``). ``weights [...]``: each token's weight in the losses (None:
    1 each).
    """
    blocks = self.block_weights(params)
    h, y, own = x, None, []
    for i, w in enumerate(blocks):
      inp = x if self.variant == "independent" else h
      o = swiglu(w, inp)
      if targets is not None:
        own.append(local_loss(o, inp, targets[i], weights))
      if self.variant == "independent":
        o = mix[i].astype(o.dtype) * o
      else:
        h = h + o
      y = o if y is None else y + o
    losses = {n: own[i] + (own[i - 1] if self.variant == "nested" and i > 0 else 0.0)
              for i, n in enumerate(self.names)} if own else {}
    return y, losses


def local_loss(o: Array, inp: Array, target: Array, weights: Optional[Array] = None) -> Array:
  """``Σ_t w_t · ½·mean_c (o_t − inp_t W)²``: the ``local`` objective (``weights`` None: 1)."""
  err = (o - dense(inp, target)).astype(jnp.promote_types(o.dtype, jnp.float32))
  per_token = 0.5 * jnp.mean(err * err, axis=-1)
  return (per_token if weights is None else per_token * weights.astype(per_token.dtype)).sum()


def level_grads(spec: CMSSpec, params: dict, x: Array, targets, mix, weights=None):
  """Each level's gradient of its own loss w.r.t. its own parameters, and the output."""
  return own_grads(lambda p: spec.chain(p, x, targets, mix, weights)[::-1], params, spec.names)


def own_grads(fn, params: dict, names) -> tuple[dict, Array]:
  """``fn(params) -> ({level name: loss}, y)``: ``({name: ∂ loss[name] / ∂ params[name]}, y)``."""
  losses, vjp_fn, y = jax.vjp(fn, params, has_aux=True)
  grads = {}
  for name in names:
    cot = {k: jnp.ones_like(v) if k == name else jnp.zeros_like(v) for k, v in losses.items()}
    grads[name] = vjp_fn(cot)[0][name]
  return grads, y


def run_tokens(spec: CMSSpec, states: dict, x: Array, targets, mix, reset: Optional[Array] = None,
               initial: Optional[dict] = None) -> tuple[dict, Array]:
  """One sequence token by token (``x [T, d]``), ``levels.tick`` after each: any start offset.

  ``reset [T]`` (bool, or None): a token that starts a document first restores ``initial`` (the
  fresh level states: initial weights, zero gradients and counters).
  """
  lvls = spec.levels()

  def body(states, inp):
    xt, rt = inp
    if rt is not None:
      states = tree_where(rt, initial, states)
    params = {n: s.params for n, s in states.items()}
    grads, y = level_grads(spec, params, xt[None], targets, mix)
    return nl_levels.tick(lvls, states, grads, 1), y[0]

  return jax.lax.scan(body, states, (x, reset))


def tree_where(pred: Array, a, b):
  """``a`` where the scalar ``pred`` holds, else ``b`` (leaf by leaf)."""
  return jax.tree.map(lambda u, v: jnp.where(pred, u, v), a, b)


def run_sequence(spec: CMSSpec, states: dict, x: Array, targets, mix) -> tuple[dict, Array]:
  """One sequence from level boundaries (``x [T, d]``), its outputs and final states.

  ``sequential`` and ``independent``: a level's input does not depend on the faster levels'
  weights, only on their outputs, so the levels run one after another, each a flat scan over its
  own periods (``T / C_ℓ`` steps of one block): a token reads the weights of the level's last
  update before it, as in the nested form, at a fraction of its sequential steps. ``nested``
  (a level meta-learns the faster one's initial state): ``levels.scan_levels`` over chunks of
  ``C_1`` tokens with every level, then the remainder token by token.
  """
  if spec.variant != "nested":
    return _run_levels_in_turn(spec, states, x, targets, mix)
  c1 = spec.periods[0]
  main = x.shape[0] - x.shape[0] % c1
  ys = []
  if main:
    def chunk_fn(params, carry, xs):
      y, losses = spec.chain(params, xs, targets, mix)
      return losses, (carry, y)

    states, _, y = nl_levels.scan_levels(spec.levels(), chunk_fn, states, None, x[:main])
    ys.append(y)
  if main < x.shape[0]:
    states, y = run_tokens(spec, states, x[main:], targets, mix)
    ys.append(y)
  return states, ys[0] if len(ys) == 1 else jnp.concatenate(ys, 0)


def _run_levels_in_turn(spec: CMSSpec, states: dict, x: Array, targets, mix):
  """``run_sequence`` for ``sequential``/``independent``: one flat scan per level.

  The returned states are those after the last whole period of each level (the tokens after it
  are read with those weights; their gradients, which no update has used yet, are not kept: the
  stateful path, ``run_tokens``, carries them).
  """
  new_states = dict(states)

  def level_output(i, level, name, inp):
    target = None if targets is None else targets[i]

    def chunk_fn(params, carry, xs, name=name, target=target):
      o = swiglu(params[name], xs)
      losses = {} if target is None else {name: local_loss(o, xs, target)}
      return losses, (carry, o)

    main = inp.shape[0] - inp.shape[0] % level.period
    outs = []
    if main:
      run, _, o = nl_levels.scan_levels((level,), chunk_fn, {name: states[name]}, None,
                                        inp[:main])
      new_states[name] = run[name]
      outs.append(o)
    if main < inp.shape[0]:  # fewer than C_ℓ tokens: they all read the last update's weights
      outs.append(swiglu(new_states[name].params, inp[main:]))
    return outs[0] if len(outs) == 1 else jnp.concatenate(outs, 0)

  return new_states, _levels_in_turn(spec, x, mix, level_output)


def _levels_in_turn(spec: CMSSpec, x: Array, mix, level_output) -> Array:
  """The chain of ``sequential``/``independent`` levels, one level after another:
  ``level_output(i, level, name, input) -> o`` runs level i on its input (``x``, or ``h`` of the
  levels before it); returns ``y``, the sum of the (``independent``: mixed) outputs."""
  h, y = x, None
  for i, (level, name) in enumerate(zip(spec.levels(), spec.names)):
    o = level_output(i, level, name, x if spec.variant == "independent" else h)
    if spec.variant == "independent":
      o = mix[i].astype(o.dtype) * o
    else:
      h = h + o
    y = o if y is None else y + o
  return y


def run_documents(spec: CMSSpec, states: dict, initial: dict, x: Array, targets, mix,
                  reset: Array, doc: Array) -> tuple[dict, Array]:
  """``run_sequence`` of a packed row (``x [T, d]``, ``reset``/``doc [T]``): each document as if
  alone, from ``initial`` (its levels restart at its first token and count their periods from it).

  ``sequential`` and ``independent``: each level in turn, ``packed_scan`` over buffer periods of
  ``C_ℓ`` tokens (one block); ``nested``: the whole chain, ``packed_scan`` over buffer chunks of
  ``C_1`` tokens in which ``levels.tick`` steps the levels whose counters reach their periods.
  A level whose period is at least T never updates before a document ends: it reads its initial
  weights (the returned states are then those of the call's start).
  """
  lvls = spec.levels()
  if spec.variant == "nested":
    if x.shape[0] <= spec.periods[0]:  # no document is long enough to read an update
      return states, spec.chain({n: s.params for n, s in initial.items()}, x, targets, mix)[0]
    forward = lambda p, xs, w: spec.chain(p, xs, targets, mix, w)[::-1]
    return packed_scan(lvls, spec.periods[0], forward, states, initial, x, reset, doc)
  new_states = dict(states)

  def level_output(i, level, name, inp):
    def forward(params, xs, w):
      o = swiglu(params[name], xs)
      return {name: local_loss(o, xs, targets[i], w)}, o

    if inp.shape[0] <= level.period:  # no document is long enough to read an update
      return swiglu(initial[name].params, inp)
    run, o = packed_scan((level,), level.period, forward, {name: states[name]},
                         {name: initial[name]}, inp, reset, doc)
    new_states[name] = run[name]
    return o

  return new_states, _levels_in_turn(spec, x, mix, level_output)


def packed_scan(lvls, period: int, forward, states: dict, initial: dict, x: Array, reset: Array,
                doc: Array) -> tuple[dict, Array]:
  """Levels ``lvls`` over a packed row ``x [T, d]`` in buffer periods of ``period`` tokens.

  ``nlx.memory.core.document_slots`` places the tokens so that every period boundary inside a
  document lands on a buffer boundary (placeholders, zero input and zero loss weight, pad up to
  it). In a buffer period, the tokens of a document's first period (``fresh``; that period may
  straddle two buffer periods) read and differentiate the ``initial`` weights, the others the
  carried ones. After the period, the carried states are those that ``levels.tick`` makes of
  ``initial`` and the summed gradients of the first period so far of the last real token's
  document, when that token is fresh; else of the carried states and the other tokens'
  gradients. ``forward(params, xs [period, d], weights [period]) -> ({level: loss}, y)``.

  Returns ``(states, y [T, d])``: the states after the last buffer period (exact when the row
  ends on a period boundary) and every token's output.
  """
  t, c = x.shape[0], period
  slots, _, fresh = core.document_slots(reset, 0, c)
  n = core.buffer_chunks(t, c)

  def place(a, fill):
    return core.place_at_slots(a, slots, n * c, fill).reshape((n, c) + a.shape[1:])

  names = [lv.name for lv in lvls]
  params = lambda st: {name: st[name].params for name in names}
  zero = jax.tree.map(jnp.zeros_like, {name: initial[name].grad_sum for name in names})

  def body(carry, inp):
    run, acc, acc_doc = carry
    xs, real, first, docs = inp
    last = jnp.max(jnp.where(real, jnp.arange(c), -1))
    any_real, last = last >= 0, jnp.maximum(last, 0)
    last_doc, last_fresh = docs[last], any_real & first[last]
    mask = lambda m: m.astype(x.dtype)
    g_run, y_run = own_grads(lambda p: forward(p, xs, mask(real & ~first)), params(run), names)
    g_ini, y_ini = own_grads(lambda p: forward(p, xs, mask(real & first & (docs == last_doc))),
                             params(initial), names)
    total = jax.tree.map(lambda a, g: jnp.where(acc_doc == last_doc, a, 0) + g.astype(a.dtype),
                         acc, g_ini)
    stepped = tree_where(last_fresh, nl_levels.tick(lvls, initial, total, c),
                         nl_levels.tick(lvls, run, g_run, c))
    run = tree_where(any_real, stepped, run)
    acc = tree_where(last_fresh, total, zero)
    y = jnp.where(first[:, None], y_ini, y_run)
    return (run, acc, jnp.where(last_fresh, last_doc, -1)), y

  xs = (place(x, 0), place(jnp.ones((t,), bool), False), place(fresh, False),
        place(doc.astype(jnp.int32), -1))
  init = (dict(states), zero, jnp.asarray(-1, jnp.int32))
  (run, _, _), ys = jax.lax.scan(body, init, xs)
  return {**states, **run}, ys.reshape((n * c,) + ys.shape[2:])[slots]


class CMS(Mixer):
  """The CMS MLP of a HOPE / Hope-attention block; see the module docstring.

  Args:
    cfg: uses d_model, mlp_dim (hidden width of every level), cms_periods, cms_variant,
      cms_objective, cms_lr, cms_stop_gradient, cms_grad_clip.
  """

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    d, n = cfg.d_model, len(cfg.cms_periods)
    self.spec = CMSSpec.of(cfg)
    self.reads_only = cfg.cms_objective == "next_token"  # the LM steps the levels
    self.blocks = nnx.List([SwiGLU(d, cfg.mlp_dim, rngs=rngs) for _ in range(n)])
    self.targets = (None if self.reads_only else
                    nnx.List([Dense((d,), (d,), ("embed", "cms_target"), rngs=rngs)
                              for _ in range(n)]))
    self.mix = (param(rngs, constant(1.0), (n,), ("cms_levels",))
                if cfg.cms_variant == "independent" else None)

  def initial_levels(self, batch_size: int) -> dict:
    """Fresh level states (learned initial weights, zero counters) with a batch axis."""
    params = self.spec.initial_params([swiglu_weights(b) for b in self.blocks])
    params = jax.tree.map(lambda w: jnp.broadcast_to(w, (batch_size,) + w.shape), params)
    return jax.vmap(lambda p: nl_levels.init_levels(self.spec.levels(), p))(params)

  def init_state(self, batch_size: int, max_len: int) -> dict:
    del max_len
    return self.initial_levels(batch_size)

  def __call__(self, x: Array, state: Optional[dict] = None, pos: Array | int = 0,
               segments=None) -> tuple[Array, Optional[dict]]:
    """``x [B, T, d]`` -> ``(y, state)``; ``segments`` (packed documents, or None): every level
    restarts at a document's first token (``segments.reset``: initial weights, zero gradient and
    counter), so that each document runs as if alone. A frozen CMS ignores them."""
    del pos
    if segments is not None:
      for name in ("reset", "doc"):
        shape = jnp.shape(getattr(segments, name))
        if shape != x.shape[:2]:
          raise ValueError(f"segments.{name} has shape {shape}; it must be [B, T] = "
                           f"{x.shape[:2]}, the leading axes of x")
    targets = None if self.targets is None else [t.kernel[...] for t in self.targets]
    mix = None if self.mix is None else self.mix[...]
    if self.spec.frozen or (self.reads_only and state is None):  # frozen in context
      params = self.spec.initial_params([swiglu_weights(b) for b in self.blocks])
      return self.spec.chain(params, x, targets, mix)[0], state
    if self.reads_only:  # next_token: the weights of the state; nlx.nn.next_token steps them
      return self._read(state, x, mix, segments), state
    initial = self.initial_levels(x.shape[0]) if state is None or segments is not None else None
    if segments is None:
      run = run_sequence if state is None else run_tokens
      states = initial if state is None else state
      new, y = jax.vmap(lambda s, xs: run(self.spec, s, xs, targets, mix))(states, x)
    elif state is None:
      new, y = jax.vmap(lambda s, xs, r, d: run_documents(self.spec, s, s, xs, targets, mix, r, d))(
          initial, x, segments.reset, segments.doc)
    else:
      new, y = jax.vmap(lambda s, xs, r, i: run_tokens(self.spec, s, xs, targets, mix, r, i))(
          state, x, segments.reset, initial)
    return y, None if state is None else new

  def _read(self, state: dict, x: Array, mix, segments) -> Array:
    """The ``next_token`` CMS: every token reads its row's level weights in ``state``; with
    ``segments``, only the tokens of the call's first document do, the others (documents that
    ``nlx.nn.next_token`` places after it in a chunk, still in their first chunk) read the
    initial weights."""
    params = {n: s.params for n, s in state.items()}
    y = jax.vmap(lambda p, xs: self.spec.chain(p, xs, None, mix)[0])(params, x)
    if segments is None:
      return y
    initial = self.spec.initial_params([swiglu_weights(b) for b in self.blocks])
    y0 = self.spec.chain(initial, x, None, mix)[0]
    return jnp.where((segments.doc == segments.doc[:, :1])[..., None], y, y0)
