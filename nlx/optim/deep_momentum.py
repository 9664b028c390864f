"""Deep momentum gradient descent (DMGD): the momentum is an MLP memory trained inside the update.

Eq. 50 (docs/EQUATIONS.md): ``W ← W + m(u)`` with ``u = ∇L(W)``, and the memory ``m`` takes a
gradient step on its own inner objective at every step. In nlx the memory is any
``nlx.memory.Memory`` (default: the residual MLP ``MLPMemory``, ``M(x) = x + σ(x W2) W1``) with an
``nlx.memory`` objective (``dot`` by default, or ``l2``), applied to the rows of each gradient
(``shapes.as_rows``: ``[n, d]``, one memory of width d per parameter). For each parameter and step:

    k = G / ‖G‖_row                        keys = values = queries: the gradient's row directions
    w ← decay · w − inner_lr · ∇_w mean_rows loss(M_w(k), k)      (the memory's own step)
    o = ‖G‖_row · M_w(k)                    the read, after the write, at the gradient's scale
    p ← β p + o,  W ← W − η p               an outer (linear) momentum on the memory's output

With ``inner_lr = 0``, ``memory_decay = 1`` and the memory at identity (its initial state:
``W1 = 0`` for the MLP, ``w = I`` for a linear memory) this is classical momentum,
``optax.sgd(η, momentum=β)``; ``β = 0`` leaves the deep memory as the only momentum. Normalising keys makes the memory learn a map of
gradient directions whose writes are bounded whatever the gradient's scale; ``memory_decay < 1``
(default 0.9) keeps the Hebbian (``dot``) memory bounded over time.

The memory weights are small (``[d, hidden]``) and replicated; the outer momentum is shaped like
the parameters and shards with them.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from nlx import validation
from nlx.memory import LinearMemory, Memory, MLPMemory, Objective, get_objective
from nlx.optim import shapes

PyTree = Any


class DeepMomentumState(NamedTuple):
  """State of ``scale_by_deep_momentum``.

  Attributes:
    memory: per parameter leaf, the memory weights ``{layer: [in, out]}`` (a pytree with the
      parameters' structure as its prefix).
    momentum: the outer momentum p, shaped like the parameters.
  """

  memory: PyTree
  momentum: optax.Updates


def init_memory_weights(memory: Memory, dim: int, hidden: int, key: jax.Array,
                        dtype=jnp.float32) -> dict:
  """Weights at which ``memory`` is the identity map on ``[*, dim]`` rows.

  ``MLPMemory``: ``w2`` fan-in scaled normal ``[dim, hidden]``, ``w1`` zeros ``[hidden, dim]``.
  ``LinearMemory``: ``w = I``. Other memories need explicit ``initial_memory``.
  """
  if isinstance(memory, MLPMemory):
    w2 = jax.random.normal(key, (dim, hidden), dtype) * dim**-0.5
    return {"w2": w2, "w1": jnp.zeros((hidden, dim), dtype)}
  if isinstance(memory, LinearMemory):
    return {"w": jnp.eye(dim, dtype=dtype)}
  raise ValueError(f"memory={memory!r} has no default initial state; pass initial_memory "
                   f"(allowed without it: MLPMemory, LinearMemory)")


def init_memory(params: PyTree, memory: Memory, hidden: int, seed: int = 0) -> PyTree:
  """Identity-at-start memory weights for every leaf of ``params`` (width = its last axis)."""
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(seed), max(len(leaves), 1))
  dtypes = [jnp.promote_types(jnp.result_type(x), jnp.float32) for x in leaves]
  weights = [init_memory_weights(memory, shapes.as_rows(x).shape[-1], hidden, k, dt)
             for x, k, dt in zip(leaves, keys, dtypes)]
  return jax.tree.unflatten(treedef, weights)


def _row_directions(g: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``G [n, d] -> (G / ‖G‖_row, ‖G‖_row [n, 1])``."""
  norm = jnp.linalg.norm(g, axis=-1, keepdims=True)
  return g / (norm + jnp.finfo(g.dtype).eps), norm


def memory_step(memory: Memory, objective: Objective, weights: dict, grad: jax.Array,
                inner_lr, decay) -> tuple[dict, jax.Array]:
  """One DMGD step of one parameter's memory: its write, then its read.

  Args:
    memory, objective: the memory and its inner objective.
    weights: ``{layer: [in, out]}``.
    grad: the parameter's gradient, any shape ``[..., d]``.
    inner_lr, decay: the memory's step size and weight retention.

  Returns:
    ``(weights, output)``: the written weights and ``‖G‖_row · M(k)`` in grad's shape.
  """
  rows = shapes.as_rows(grad).astype(jax.tree.leaves(weights)[0].dtype)
  keys, norms = _row_directions(rows)

  def inner_loss(w):
    return objective.loss(memory.apply(w, keys), keys).mean()

  grads = jax.grad(inner_loss)(weights)
  weights = jax.tree.map(lambda w, gw: decay * w - inner_lr * gw, weights, grads)
  out = norms * memory.apply(weights, keys)
  return weights, out.reshape(jnp.shape(grad)).astype(grad.dtype)


def scale_by_deep_momentum(beta=0.9, inner_lr=0.1, memory_decay=0.9,
                           memory: Optional[Memory] = None, objective: str | Objective = "dot",
                           hidden: int = 16, initial_memory: Optional[PyTree] = None,
                           seed: int = 0) -> optax.GradientTransformation:
  """DMGD without the learning rate: updates are the outer momentum p (module docstring).

  Args:
    beta: retention of the outer momentum p, in [0, 1] (0: the deep memory alone).
    inner_lr: the memory's own step size (>= 0; may be a traced value, e.g. meta-learned).
    memory_decay: retention of the memory weights at each write, in [0, 1].
    memory: an ``nlx.memory.Memory`` with key dim = value dim; default ``MLPMemory("gelu")``.
    objective: the memory's inner objective, ``"dot"``, ``"l2"`` or an ``Objective``.
    hidden: hidden width of the default memory initial state (>= 1).
    initial_memory: initial weights (a pytree from ``init_memory``); None for the identity
      start of ``init_memory(params, memory, hidden, seed)``.
    seed: seed of the default initial state.
  """
  validation.check_range("beta", beta, 0.0, 1.0)
  validation.check_range("inner_lr", inner_lr, 0.0)
  validation.check_range("memory_decay", memory_decay, 0.0, 1.0)
  validation.check_int("hidden", hidden, 1)
  memory = MLPMemory("gelu") if memory is None else memory
  if not isinstance(memory, Memory):
    raise ValueError(f"memory={memory!r} must be an nlx.memory.Memory")
  objective = get_objective(objective)

  def init_fn(params):
    weights = init_memory(params, memory, hidden, seed) if initial_memory is None else (
        initial_memory)
    return DeepMomentumState(weights, jax.tree.map(jnp.zeros_like, params))

  def update_fn(updates, state, params=None):
    del params
    leaves, treedef = jax.tree.flatten(updates)
    weights = treedef.flatten_up_to(state.memory)
    stepped = [memory_step(memory, objective, w, g, inner_lr, memory_decay)
               for w, g in zip(weights, leaves)]
    outputs = jax.tree.unflatten(treedef, [o for _, o in stepped])
    new_memory = jax.tree.unflatten(treedef, [w for w, _ in stepped])
    momentum = jax.tree.map(lambda p, o: beta * p + o, state.momentum, outputs)
    return momentum, DeepMomentumState(new_memory, momentum)

  return optax.GradientTransformation(init_fn, update_fn)


def deep_momentum(learning_rate: optax.ScalarOrSchedule, beta=0.9, inner_lr=0.1,
                  memory_decay=0.9, memory: Optional[Memory] = None,
                  objective: str | Objective = "dot", hidden: int = 16,
                  initial_memory: Optional[PyTree] = None, seed: int = 0
                  ) -> optax.GradientTransformation:
  """DMGD: ``W ← W − learning_rate · p`` with p the outer momentum of the deep memory's reads.

  Args:
    learning_rate: η, a float or an optax schedule.
    Others: as in ``scale_by_deep_momentum``.
  """
  validation.check_range("learning_rate", learning_rate, 0.0)
  return optax.chain(
      scale_by_deep_momentum(beta, inner_lr, memory_decay, memory, objective, hidden,
                             initial_memory, seed),
      optax.scale_by_learning_rate(learning_rate))
