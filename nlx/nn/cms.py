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
  """

  def __init__(self, periods, variant: str, lr, stop_gradient: bool = False):
    self.periods, self.variant = tuple(periods), variant
    self.rates = level_rates(lr, len(self.periods))
    self.stop_gradient = stop_gradient
    self.names = level_names(len(self.periods))

  @property
  def frozen(self) -> bool:
    """Every rate is 0: nothing learns in context."""
    return not any(self.rates)

  def _key(self):
    # The per-level rates: a float and the tuple repeating it are the same spec.
    return (self.periods, self.variant, self.rates, self.stop_gradient)

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

  def chain(self, params: dict, x: Array, targets: Optional[list], mix: Optional[Array]):
    """Runs the blocks on ``x [..., d]``: ``(y [..., d], {level name: scalar loss})``.

    ``targets[ℓ]``: the learned target weights ``W_ℓ [d, d]`` of level ℓ (target ``h W_ℓ``);
    None: no local losses (``{}``).
    """
    blocks = self.block_weights(params)
    h, y, own = x, None, []
    for i, w in enumerate(blocks):
      inp = x if self.variant == "independent" else h
      o = swiglu(w, inp)
      if targets is not None:
        err = (o - dense(inp, targets[i])).astype(jnp.float32)
        own.append(0.5 * jnp.mean(err * err, axis=-1).sum())
      if self.variant == "independent":
        o = mix[i].astype(o.dtype) * o
      else:
        h = h + o
      y = o if y is None else y + o
    losses = {n: own[i] + (own[i - 1] if self.variant == "nested" and i > 0 else 0.0)
              for i, n in enumerate(self.names)} if own else {}
    return y, losses


def level_grads(spec: CMSSpec, params: dict, x: Array, targets, mix):
  """Each level's gradient of its own loss w.r.t. its own parameters, and the output."""
  fn = lambda p: spec.chain(p, x, targets, mix)
  losses, vjp_fn, y = jax.vjp(lambda p: fn(p)[::-1], params, has_aux=True)
  grads = {}
  for name in spec.names:
    cot = {k: jnp.ones_like(v) if k == name else jnp.zeros_like(v) for k, v in losses.items()}
    grads[name] = vjp_fn(cot)[0][name]
  return grads, y


def run_tokens(spec: CMSSpec, states: dict, x: Array, targets, mix) -> tuple[dict, Array]:
  """One sequence token by token (``x [T, d]``), ``levels.tick`` after each: any start offset."""
  lvls = spec.levels()

  def body(states, xt):
    params = {n: s.params for n, s in states.items()}
    grads, y = level_grads(spec, params, xt[None], targets, mix)
    return nl_levels.tick(lvls, states, grads, 1), y[0]

  return jax.lax.scan(body, states, x)


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
  h, y, new_states = x, None, dict(states)
  for i, (level, name) in enumerate(zip(spec.levels(), spec.names)):
    inp = x if spec.variant == "independent" else h
    target = None if targets is None else targets[i]

    def chunk_fn(params, carry, xs, name=name, target=target):
      o = swiglu(params[name], xs)
      losses = {}
      if target is not None:
        err = (o - dense(xs, target)).astype(jnp.float32)
        losses[name] = 0.5 * jnp.mean(err * err, axis=-1).sum()
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
    o = outs[0] if len(outs) == 1 else jnp.concatenate(outs, 0)
    if spec.variant == "independent":
      o = mix[i].astype(o.dtype) * o
    else:
      h = h + o
    y = o if y is None else y + o
  return new_states, y


class CMS(Mixer):
  """The CMS MLP of a HOPE / Hope-attention block; see the module docstring.

  Args:
    cfg: uses d_model, mlp_dim (hidden width of every level), cms_periods, cms_variant,
      cms_objective, cms_lr, cms_stop_gradient.
  """

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    d, n = cfg.d_model, len(cfg.cms_periods)
    self.spec = CMSSpec(cfg.cms_periods, cfg.cms_variant, cfg.cms_lr, cfg.cms_stop_gradient)
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
    """``segments`` (packed documents): a frozen CMS is a plain MLP and takes them; levels that
    learn in context do not restart at document boundaries yet, so they refuse them."""
    del pos
    if segments is not None and not self.spec.frozen:
      raise NotImplementedError(
          "packed documents (segment_ids) with CMS levels that learn in context: the levels and "
          "their step counters do not restart at a document boundary yet; train with "
          "train.pack_documents=False, or freeze the levels (model.cms_lr=0)")
    targets = None if self.targets is None else [t.kernel[...] for t in self.targets]
    mix = None if self.mix is None else self.mix[...]
    if self.spec.frozen or (self.reads_only and state is None):  # frozen in context
      params = self.spec.initial_params([swiglu_weights(b) for b in self.blocks])
      return self.spec.chain(params, x, targets, mix)[0], state
    if self.reads_only:  # next_token: the weights of the state; nlx.nn.next_token steps them
      params = {n: s.params for n, s in state.items()}
      return jax.vmap(lambda p, xs: self.spec.chain(p, xs, None, mix)[0])(params, x), state
    run = run_sequence if state is None else run_tokens
    states = self.initial_levels(x.shape[0]) if state is None else state
    new, y = jax.vmap(lambda s, xs: run(self.spec, s, xs, targets, mix))(states, x)
    return y, None if state is None else new
