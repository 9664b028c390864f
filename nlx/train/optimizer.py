"""The optax transformation of ``config.optimizer``: schedule, clipping, the update, weight decay.

``name`` picks the update: ``adamw`` (``optax.adamw``), ``adam_memory`` (nlx's Adam-as-memory),
``muon`` (``nlx.optim.nonlinear_output``), ``m3`` and ``momentum_memory``. Matrix-shaped
parameters for Muon and M3 are those with two or more axes besides the stacked ``layers`` axis,
except the embedding (``vocab`` axis), which goes to their Adam branch like the vectors.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from nlx import optim
from nlx.optim import shapes


def schedule(opt, steps: int) -> optax.Schedule:
  """Linear warmup to ``learning_rate``, then cosine/linear decay to ``min_lr_ratio`` of it."""
  peak, warmup = opt.learning_rate, min(opt.warmup_steps, max(steps - 1, 0))
  if opt.schedule == "constant":
    decay = optax.constant_schedule(peak)
  elif opt.schedule == "cosine":
    decay = optax.cosine_decay_schedule(peak, max(steps - warmup, 1), alpha=opt.min_lr_ratio)
  else:
    decay = optax.linear_schedule(peak, peak * opt.min_lr_ratio, max(steps - warmup, 1))
  if warmup == 0:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), decay], [warmup])


def matrix_labels(abstract_params: nnx.State) -> nnx.State:
  """``"matrix"``/``"vector"`` per parameter, from its logical axes."""

  def label(variable: nnx.Variable) -> str:
    axes = variable.get_metadata().get("out_sharding") or ()
    own = [a for a in axes if a != "layers"]
    return shapes.MATRIX if len(own) >= 2 and "vocab" not in axes else shapes.VECTOR

  return jax.tree.map(label, abstract_params, is_leaf=lambda x: isinstance(x, nnx.Variable))


def _decay_mask(params):
  return jax.tree.map(lambda x: x.ndim >= 2, params)


def trainable_mask(abstract_params, regexes) -> list[bool]:
  """Per parameter (``param_paths`` order): whether a regex of ``train.trainable`` matches its
  path in full (every parameter when ``regexes`` is None).

  Raises:
    ValueError: a regex that matches no parameter (a typo would otherwise freeze the model).
  """
  import re  # pylint: disable=g-import-not-at-top
  from nlx.train.step import param_paths  # pylint: disable=g-import-not-at-top
  paths = param_paths(abstract_params)
  if regexes is None:
    return [True] * len(paths)
  for regex in regexes:
    if not any(re.fullmatch(regex, p) for p in paths):
      raise ValueError(f"train.trainable: {regex!r} matches no parameter path; paths look like "
                       f"{paths[:3]} ({len(paths)} in all)")
  return [any(re.fullmatch(r, p) for r in regexes) for p in paths]


def build(opt, steps: int, abstract_params: nnx.State,
          trainable=None) -> optax.GradientTransformation:
  """The transformation of ``opt`` (an ``OptimizerConfig``) for a run of ``steps`` steps.

  ``trainable``: ``train.trainable`` regexes; the other parameters get a zero update and no
  optimizer state (``optax.multi_transform`` with ``set_to_zero``).
  """
  tx = _build(opt, steps, abstract_params)
  if trainable is None:
    return tx
  mask = trainable_mask(abstract_params, trainable)
  leaves, treedef = jax.tree.flatten(abstract_params)
  labels = jax.tree.unflatten(treedef, ["train" if m else "frozen" for m in mask])
  return optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)


def _build(opt, steps: int, abstract_params: nnx.State) -> optax.GradientTransformation:
  lr = schedule(opt, steps)
  if opt.name == "adamw":
    update = optax.adamw(lr, opt.b1, opt.b2, opt.eps, weight_decay=opt.weight_decay,
                         mask=_decay_mask)
    return optax.chain(optax.clip_by_global_norm(opt.clip_norm), update) if opt.clip_norm \
        else update
  labels = matrix_labels(abstract_params)
  if opt.name == "adam_memory":
    update = optim.adam_memory(lr, opt.b1, opt.b2, opt.eps)
  elif opt.name == "muon":
    update = optim.nonlinear_output(lr, beta=opt.b1, eps=opt.eps, adam_b1=opt.b1,
                                    adam_b2=opt.b2, param_labels=labels)
  elif opt.name == "m3":
    update = optim.m3(lr, slow_period=opt.slow_period, eps=opt.eps, adam_b1=opt.b1,
                      adam_b2=opt.b2, param_labels=labels)
  elif opt.name == "momentum_memory":
    update = optim.momentum_memory(lr, beta=opt.b1)
  else:
    raise ValueError(f"optimizer.name={opt.name!r} is not allowed")
  parts = [optax.clip_by_global_norm(opt.clip_norm)] if opt.clip_norm else []
  parts.append(update)
  if opt.weight_decay:
    parts.append(decoupled_weight_decay(opt.weight_decay, lr))
  return optax.chain(*parts)


def decoupled_weight_decay(rate: float, lr: optax.Schedule) -> optax.GradientTransformation:
  """Adds ``-rate · lr(step) · W`` to the update of every parameter of rank >= 2 (AdamW's decay)."""

  def init_fn(params):
    del params
    return optax.ScaleByScheduleState(count=jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params):
    factor = -rate * lr(state.count)
    updates = jax.tree.map(lambda u, p: u + factor * p if p.ndim >= 2 else u, updates, params)
    return updates, optax.ScaleByScheduleState(count=optax.safe_increment(state.count))

  return optax.GradientTransformation(init_fn, update_fn)
