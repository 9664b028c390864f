"""Meta-learning an optimizer memory: DMGD's initial memory and rates, through unrolled training.

The outer ("meta") level holds the optimizer's meta-parameters: the initial weights of the DMGD
memory of every parameter leaf and its log rates (learning rate, outer momentum, inner step
size). One episode trains a task's parameters for K steps with ``deep_momentum`` built from the
meta-parameters (an inner ``lax.scan``), and scores the run by the mean over the K steps of the
training loss relative to its initial value. The meta-gradient goes through all K steps, the
memory's own inner gradient steps included (second order).

``meta_train`` runs a stream of episodes through ``nlx.levels.scan_levels`` with one level,
``"meta"``, whose period is the meta-batch B: the driver cuts the stream into chunks of B episodes
(run in parallel, ``vmap``), sums their meta-losses, and steps the meta-parameters with their
own optimizer once per chunk. That is the nested scan: episodes (levels' scan) → inner steps (the
episode's scan) → the memory's gradient step inside each.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from nlx import levels, validation
from nlx.memory import Memory, MLPMemory
from nlx.optim import deep_momentum as dm

PyTree = Any
LossFn = Callable[[PyTree, PyTree], jax.Array]  # (params, data) -> scalar
META = "meta"


class MetaParams(NamedTuple):
  """Meta-parameters of a DMGD optimizer (all floating point, all meta-learned).

  Attributes:
    memory: the initial memory weights, a pytree with the task parameters' structure as prefix.
    log_learning_rate: log η (scalar).
    logit_beta: logit of the outer momentum β (scalar).
    log_inner_lr: log of the memory's own step size (scalar).
  """

  memory: PyTree
  log_learning_rate: jax.Array
  logit_beta: jax.Array
  log_inner_lr: jax.Array


def init_meta_params(params: PyTree, learning_rate: float = 0.05, beta: float = 0.9,
                     inner_lr: float = 0.1, memory: Optional[Memory] = None, hidden: int = 16,
                     seed: int = 0) -> MetaParams:
  """Meta-parameters that start as DMGD with an identity memory and the given rates.

  Args:
    params: a task's parameters (only shapes and structure are used).
    learning_rate, beta, inner_lr: the starting rates (> 0; beta in (0, 1)).
    memory, hidden, seed: the memory and its initial state, as in ``deep_momentum``.
  """
  validation.check_range("learning_rate", learning_rate, 0.0, low_open=True)
  validation.check_range("beta", beta, 0.0, 1.0, low_open=True, high_open=True)
  validation.check_range("inner_lr", inner_lr, 0.0, low_open=True)
  memory = MLPMemory("gelu") if memory is None else memory
  f32 = lambda x: jnp.asarray(x, jnp.float32)
  return MetaParams(
      memory=dm.init_memory(params, memory, hidden, seed),
      log_learning_rate=f32(jnp.log(learning_rate)),
      logit_beta=f32(jnp.log(beta) - jnp.log1p(-beta)),
      log_inner_lr=f32(jnp.log(inner_lr)))


def optimizer(meta: MetaParams, memory: Optional[Memory] = None,
              objective: str = "dot") -> optax.GradientTransformation:
  """The DMGD transform that ``meta`` describes (differentiable in ``meta``)."""
  return dm.deep_momentum(
      jnp.exp(meta.log_learning_rate), beta=jax.nn.sigmoid(meta.logit_beta),
      inner_lr=jnp.exp(meta.log_inner_lr), memory=memory, objective=objective,
      initial_memory=meta.memory)


def unroll(tx: optax.GradientTransformation, loss_fn: LossFn, params: PyTree, data: PyTree,
           num_steps: int) -> tuple[PyTree, jax.Array]:
  """Train ``params`` on ``data`` for ``num_steps`` full-batch steps of ``tx`` (a ``lax.scan``).

  Args:
    tx: any optax transformation.
    loss_fn: ``(params, data) -> scalar``.
    params: the initial parameters.
    data: the task's data (any pytree).
    num_steps: K >= 1.

  Returns:
    ``(params, losses [K + 1])``: the final parameters and the loss before each step and after
    the last.
  """
  validation.check_int("num_steps", num_steps, 1)
  grad_fn = jax.value_and_grad(loss_fn)

  def step(carry, _):
    p, s = carry
    loss, grads = grad_fn(p, data)
    updates, s = tx.update(grads, s, p)
    return (optax.apply_updates(p, updates), s), loss

  (params, _), losses = jax.lax.scan(step, (params, tx.init(params)), None, length=num_steps)
  return params, jnp.concatenate([losses, loss_fn(params, data)[None]])


def meta_loss(meta: MetaParams, loss_fn: LossFn, params: PyTree, data: PyTree, num_steps: int,
              memory: Optional[Memory] = None, objective: str = "dot") -> jax.Array:
  """Mean over the K + 1 losses of an unrolled DMGD run, relative to the initial loss."""
  _, losses = unroll(optimizer(meta, memory, objective), loss_fn, params, data, num_steps)
  return jnp.mean(losses / jax.lax.stop_gradient(losses[0]))


def meta_train(meta: MetaParams, loss_fn: LossFn, tasks: tuple[PyTree, PyTree], num_steps: int,
               meta_batch: int, meta_optimizer: optax.GradientTransformation,
               memory: Optional[Memory] = None, objective: str = "dot"
               ) -> tuple[MetaParams, jax.Array]:
  """Meta-train ``meta`` on a stream of episodes with ``nlx.levels.scan_levels``.

  Args:
    meta: the starting meta-parameters.
    loss_fn: ``(params, data) -> scalar``, the task loss.
    tasks: ``(params0, data)``, pytrees whose leaves have a leading episode axis E (a multiple
      of ``meta_batch``): each episode's initial parameters and data.
    num_steps: K, inner steps per episode.
    meta_batch: B, episodes per meta-update (the meta level's period).
    meta_optimizer: the optimizer of the meta-parameters (e.g. ``optax.adam(1e-2)``).
    memory, objective: DMGD's memory and inner objective.

  Returns:
    ``(meta, episode_losses [E])``: the trained meta-parameters and each episode's meta-loss
    (computed with the meta-parameters current when its chunk ran).
  """
  validation.check_int("meta_batch", meta_batch, 1)
  meta_levels = (levels.Level(META, meta_batch, meta_optimizer),)
  states = levels.init_levels(meta_levels, {META: meta})

  def episode(m, task):
    params0, data = task
    return meta_loss(m, loss_fn, params0, data, num_steps, memory, objective)

  def chunk_fn(level_params, carry, tasks_chunk):
    losses = jax.vmap(episode, in_axes=(None, 0))(level_params[META], tasks_chunk)
    return {META: losses.sum()}, (carry, losses)

  states, _, losses = levels.scan_levels(meta_levels, chunk_fn, states, (), tasks)
  return states[META].params, losses
