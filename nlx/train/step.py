"""The train state and the pure, jitted train and eval steps.

The state is a pytree ``{"step": int32 [], "params": nnx.State, "opt_state": optax state,
"rng": uint32 [2]}``; its shardings come from the parameters' logical axes (optimizer leaves shaped
like a parameter shard like it, other leaves are replicated). Initialization follows MaxText:
``eval_shape`` -> shardings -> ``jit(init, out_shardings=...)``, so no host ever holds a whole
unsharded model.

Every step checks its loss, gradients and updated parameters for NaN/Inf; a non-finite step leaves
the parameters and optimizer state as they were (the step counter and RNG still advance) and
reports, per parameter, which tensors were non-finite (``nonfinite_grads``/``nonfinite_params``,
bool vectors in ``param_paths`` order): the loop then stops or skips the step.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from nlx.nn import build_model
from nlx.nn.model import activation_sharding
from nlx.train import optimizer as optimizer_lib
from nlx.train import sharding


@dataclasses.dataclass(frozen=True)
class Trainer:
  """What the loop needs: the model's graph, the optimizer, the mesh and every sharding."""

  graphdef: Any
  tx: optax.GradientTransformation
  mesh: Mesh
  abstract_state: dict  # ShapeDtypeStructs with shardings
  state_shardings: dict
  batch_sharding: Any
  compute_dtype: Any
  trainable: tuple = ()  # per parameter (param_paths order): updated by the step (train.trainable)


def build(run, mesh: Mesh) -> Trainer:
  """The ``Trainer`` of a validated ``RunConfig`` on ``mesh``."""
  abstract_model = nnx.eval_shape(lambda: build_model(run.model, rngs=nnx.Rngs(0)))
  graphdef, abstract_params = nnx.split(abstract_model, nnx.Param)
  tx = optimizer_lib.build(run.optimizer, run.train.steps, abstract_params, run.train.trainable)
  trainable = tuple(optimizer_lib.trainable_mask(abstract_params, run.train.trainable))
  param_sh = sharding.param_shardings(abstract_params, run.axis_rules, mesh)
  abstract_opt = jax.eval_shape(tx.init, abstract_params)
  # A frozen parameter (train.trainable) has an empty MaskedNode where its state would be.
  masked = lambda x: isinstance(x, optax.MaskedNode)
  opt_sh = optax.tree_map_params(tx, lambda x, s: x if masked(x) else s, abstract_opt, param_sh,
                                 transform_non_params=lambda _: sharding.replicated(mesh),
                                 is_leaf=masked)
  rep = sharding.replicated(mesh)
  shardings = {"step": rep, "params": param_sh, "opt_state": opt_sh, "rng": rep}
  shapes = {"step": jax.ShapeDtypeStruct((), jnp.int32), "params": abstract_params,
            "opt_state": abstract_opt, "rng": jax.ShapeDtypeStruct((2,), jnp.uint32)}
  abstract_state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                shapes, shardings)
  return Trainer(graphdef, tx, mesh, abstract_state, shardings,
                 sharding.batch_sharding(mesh, run.axis_rules),
                 jnp.bfloat16 if run.train.compute_dtype == "bfloat16" else jnp.float32,
                 trainable)


def init_state(trainer: Trainer, model_config, seed: int) -> dict:
  """The initial state, created sharded (``jit`` with ``out_shardings``)."""

  def init():
    params = nnx.state(build_model(model_config, rngs=nnx.Rngs(seed)), nnx.Param)
    return {"step": jnp.zeros((), jnp.int32), "params": params,
            "opt_state": trainer.tx.init(params), "rng": jax.random.PRNGKey(seed)}

  return jax.jit(init, out_shardings=trainer.state_shardings)()


def loss_fn(graphdef, params, tokens: jax.Array, compute_dtype=jnp.float32,
            activations=None) -> jax.Array:
  """Mean next-token cross-entropy of ``tokens [B, T+1]`` (predict ``tokens[:, 1:]``).

  ``activations``: the sharding of the model's ``[B, T, d]`` activations (the batch sharding), or
  None to leave them to the compiler.
  """
  if compute_dtype != jnp.float32:
    params = jax.tree.map(lambda p: p.astype(compute_dtype), params)
  with activation_sharding(activations) if activations is not None else contextlib.nullcontext():
    logits = nnx.merge(graphdef, params)(tokens[:, :-1])
  return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()


NONFINITE_KEYS = ("nonfinite_grads", "nonfinite_params")


def param_paths(params) -> list[str]:
  """``"layers/mixer/wq/kernel"``-style paths of the leaves of ``params``, in leaf order."""
  def name(key) -> str:
    for attr in ("key", "name", "idx"):
      if hasattr(key, attr):
        return str(getattr(key, attr))
    return str(key)

  return ["/".join(name(k) for k in path if name(k) != "value")
          for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]


def nonfinite_leaves(tree) -> jax.Array:
  """``bool [n_leaves]``: whether each leaf of ``tree`` holds a NaN or an Inf."""
  return jnp.stack([~jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)])


def train_step_fn(trainer: Trainer) -> Callable:
  """``(state, tokens [B, T+1]) -> (state, metrics)``: pure.

  Metrics are float32 scalars, plus the bool vectors ``nonfinite_grads`` and ``nonfinite_params``
  (per parameter, in ``param_paths`` order). A step whose loss, gradients or new parameters are
  not finite keeps the old parameters and optimizer state.
  """
  graphdef, tx, dtype = trainer.graphdef, trainer.tx, trainer.compute_dtype
  activations = trainer.batch_sharding

  def step(state, tokens):
    loss, grads = jax.value_and_grad(
        lambda p: loss_fn(graphdef, p, tokens, dtype, activations))(state["params"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    if not all(trainer.trainable):  # frozen parameters stay bit for bit (even -0.0)
      leaves, treedef = jax.tree.flatten(params)
      old = jax.tree.leaves(state["params"])
      params = jax.tree.unflatten(treedef, [new if t else o for new, o, t in
                                            zip(leaves, old, trainer.trainable)])
    bad_grads, bad_params = nonfinite_leaves(grads), nonfinite_leaves(params)
    finite = jnp.isfinite(loss) & ~bad_grads.any() & ~bad_params.any()
    params, opt_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old),
                                     (params, opt_state), (state["params"], state["opt_state"]))
    rng, _ = jax.random.split(state["rng"])
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads),
               "param_norm": optax.tree.norm(params), "update_norm": optax.tree.norm(updates),
               "nonfinite_grads": bad_grads, "nonfinite_params": bad_params}
    return {"step": state["step"] + 1, "params": params, "opt_state": opt_state,
            "rng": rng}, metrics

  return step


def jit_train_step(trainer: Trainer) -> Callable:
  rep = sharding.replicated(trainer.mesh)
  return jax.jit(train_step_fn(trainer),
                 in_shardings=(trainer.state_shardings, trainer.batch_sharding),
                 out_shardings=(trainer.state_shardings, rep), donate_argnums=0)


def jit_eval_step(trainer: Trainer) -> Callable:
  """``(params, tokens [B, T+1]) -> mean loss`` (jitted)."""
  graphdef, dtype = trainer.graphdef, trainer.compute_dtype
  return jax.jit(lambda params, tokens: loss_fn(graphdef, params, tokens, dtype,
                                                trainer.batch_sharding),
                 in_shardings=(trainer.state_shardings["params"], trainer.batch_sharding),
                 out_shardings=sharding.replicated(trainer.mesh))
