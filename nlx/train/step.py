"""The train state and the pure, jitted train and eval steps.

The state is a pytree ``{"step": int32 [], "params": nnx.State, "opt_state": optax state,
"rng": uint32 [2]}``; its shardings come from the parameters' logical axes (optimizer leaves shaped
like a parameter shard like it, other leaves are replicated). Initialization follows MaxText:
``eval_shape`` -> shardings -> ``jit(init, out_shardings=...)``, so no host ever holds a whole
unsharded model.

Every step checks its loss, gradients and updated parameters for NaN/Inf; a non-finite step leaves
the parameters and optimizer state as they were (the step counter and RNG still advance) and
reports, per parameter, which tensors were non-finite (``nonfinite_grads``/``nonfinite_params``,
bool vectors in ``param_paths`` order). The loop's step (``guarded_step_fn``) folds these checks
into a small device pytree, the *guard* (``init_guard``: how many steps were non-finite since it
was reset, and the first one's number, loss and flag vectors), so that the host fetches it only
when it checks (``train.check_finite``) instead of after every step; the loop then stops or
skips. The guard is not part of the checkpointed state.

A batch is ``tokens [B, T+1]`` (int32), or with ``train.pack_documents`` the dict ``{"tokens":
[B, T+1], "segment_ids": [B, T+1]}`` of ``nlx.data.pipeline.pack_segments``: the model then reads
``model(tokens[:, :-1], segment_ids=segment_ids[:, :-1])`` and the loss leaves out the targets
that cross a document boundary (``target_mask``).
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable, Mapping, NamedTuple, Optional, Sequence

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
  pack_documents: bool = False  # batches carry segment ids (RunConfig.pack_documents)


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
                 trainable, run.pack_documents)


def abstract_batch(trainer: Trainer, batch_size: int, seq_len: int):
  """The global batch the train step of ``trainer`` takes, as ``ShapeDtypeStruct``s (with the
  batch sharding): ``tokens [B, T+1]``, or the dict with ``segment_ids`` when packing."""
  row = jax.ShapeDtypeStruct((batch_size, seq_len + 1), jnp.int32,
                             sharding=trainer.batch_sharding)
  return {"tokens": row, "segment_ids": row} if trainer.pack_documents else row


def init_state(trainer: Trainer, model_config, seed: int) -> dict:
  """The initial state, created sharded (``jit`` with ``out_shardings``)."""

  def init():
    params = nnx.state(build_model(model_config, rngs=nnx.Rngs(seed)), nnx.Param)
    return {"step": jnp.zeros((), jnp.int32), "params": params,
            "opt_state": trainer.tx.init(params), "rng": jax.random.PRNGKey(seed)}

  return jax.jit(init, out_shardings=trainer.state_shardings)()


def split_batch(batch) -> tuple[Any, Any]:
  """``(tokens [B, T+1], segment_ids [B, T+1] or None)`` of a batch (an array or a dict)."""
  if isinstance(batch, Mapping):
    return batch["tokens"], batch.get("segment_ids")
  return batch, None


def target_mask(segment_ids: jax.Array) -> jax.Array:
  """``bool [B, T]``: whether target ``t`` (token ``t + 1`` of ``segment_ids [B, T+1]``) is in
  the document of its input token ``t``; False where it starts a new document."""
  return segment_ids[:, 1:] == segment_ids[:, :-1]


def token_losses(graphdef, params, tokens: jax.Array, compute_dtype=jnp.float32,
                 activations=None, segment_ids: Optional[jax.Array] = None) -> jax.Array:
  """Next-token cross-entropy ``[B, T]`` of ``tokens [B, T+1]`` (predict ``tokens[:, 1:]``).

  Args:
    graphdef, params: the model (``nnx.split``).
    tokens: ``[B, T+1]`` int.
    compute_dtype: the parameters are cast to it (logits stay float32).
    activations: the sharding of the model's ``[B, T, d]`` activations (the batch sharding), or
      None to leave them to the compiler.
    segment_ids: ``[B, T+1]`` or None; given, the model reads ``segment_ids[:, :-1]``.
  """
  if compute_dtype != jnp.float32:
    params = jax.tree.map(lambda p: p.astype(compute_dtype), params)
  with activation_sharding(activations) if activations is not None else contextlib.nullcontext():
    model = nnx.merge(graphdef, params)
    if segment_ids is None:
      logits = model(tokens[:, :-1])
    else:
      logits = model(tokens[:, :-1], segment_ids=segment_ids[:, :-1])
  return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:])


def masked_mean(losses: jax.Array, segment_ids: Optional[jax.Array]) -> tuple[jax.Array,
                                                                               jax.Array]:
  """``(mean of losses [B, T] over the kept targets, their number)``: every target without
  ``segment_ids``, else those of ``target_mask`` (0 when none is kept)."""
  if segment_ids is None:
    return losses.mean(), jnp.asarray(losses.size, jnp.float32)
  keep = target_mask(segment_ids)
  n = keep.sum()
  return jnp.where(keep, losses, 0.0).sum() / jnp.maximum(n, 1), n.astype(jnp.float32)


def loss_fn(graphdef, params, tokens: jax.Array, compute_dtype=jnp.float32,
            activations=None, segment_ids: Optional[jax.Array] = None) -> jax.Array:
  """Mean next-token cross-entropy of ``tokens [B, T+1]`` (predict ``tokens[:, 1:]``).

  ``activations``: the sharding of the model's ``[B, T, d]`` activations (the batch sharding), or
  None to leave them to the compiler. ``segment_ids [B, T+1]`` (packed documents): the model
  reads them and the mean leaves out the targets that start a document (``target_mask``); None:
  the mean of every target, the model called with the tokens alone.
  """
  losses = token_losses(graphdef, params, tokens, compute_dtype, activations, segment_ids)
  return masked_mean(losses, segment_ids)[0]


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


class Update(NamedTuple):
  """What ``apply_gradients`` returns: the new (or, after a non-finite step, the old) parameters
  and optimizer state, the loss, the loss function's auxiliary output (None without ``has_aux``),
  the gradients and updates, and the finite checks."""

  params: Any
  opt_state: Any
  loss: jax.Array
  aux: Any
  grads: Any
  updates: Any
  finite: jax.Array  # bool []: loss, gradients and new parameters all finite
  nonfinite_grads: jax.Array  # bool [n_params]
  nonfinite_params: jax.Array  # bool [n_params]


def apply_gradients(loss_fn: Callable, tx: optax.GradientTransformation, params, opt_state,
                    *args, has_aux: bool = False, trainable: Optional[Sequence[bool]] = None
                    ) -> Update:
  """One optimizer step on ``loss_fn(params, *args)``: the train step of every trainer in nlx.

  ``nlx train`` (``train_step_fn``), ``fit`` (studies, examples, benchmarks) all step through
  this function: gradients by ``jax.value_and_grad``, ``tx.update``, ``optax.apply_updates``.

  Args:
    loss_fn: ``(params, *args) -> loss`` (a float32 scalar), or ``-> (loss, aux)`` with
      ``has_aux``.
    tx: the optax optimizer; ``opt_state`` its state.
    trainable: per parameter leaf, whether the step updates it (``train.trainable``); frozen
      leaves are kept bit for bit (even -0.0). None: all train.

  A step whose loss, gradients or new parameters are not finite returns the old parameters and
  optimizer state (``finite`` False, and which leaves were not finite); pure and jittable.
  """
  (loss, aux), grads = jax.value_and_grad(
      loss_fn if has_aux else lambda p, *a: (loss_fn(p, *a), None), has_aux=True)(params, *args)
  updates, new_opt_state = tx.update(grads, opt_state, params)
  new_params = optax.apply_updates(params, updates)
  if trainable is not None and not all(trainable):
    leaves, treedef = jax.tree.flatten(new_params)
    old = jax.tree.leaves(params)
    new_params = jax.tree.unflatten(treedef, [new if t else o for new, o, t in
                                              zip(leaves, old, trainable)])
  bad_grads, bad_params = nonfinite_leaves(grads), nonfinite_leaves(new_params)
  finite = jnp.isfinite(loss) & ~bad_grads.any() & ~bad_params.any()
  new_params, new_opt_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old),
                                           (new_params, new_opt_state), (params, opt_state))
  return Update(new_params, new_opt_state, loss, aux, grads, updates, finite, bad_grads,
                bad_params)


def train_step_fn(trainer: Trainer) -> Callable:
  """``(state, batch) -> (state, metrics)``: pure (``apply_gradients`` on the state).

  ``batch``: ``tokens [B, T+1]``, or ``{"tokens", "segment_ids"}`` (packed documents).
  Metrics are float32 scalars (with segment ids also ``scored_fraction``: the fraction of the
  targets the loss kept), plus the bool vectors ``nonfinite_grads`` and ``nonfinite_params``
  (per parameter, in ``param_paths`` order). A step whose loss, gradients or new parameters are
  not finite keeps the old parameters and optimizer state.
  """
  graphdef, tx, dtype = trainer.graphdef, trainer.tx, trainer.compute_dtype
  activations = trainer.batch_sharding

  def step(state, batch):
    tokens, segment_ids = split_batch(batch)
    packed = {} if segment_ids is None else {"segment_ids": segment_ids}  # None: today's call
    up = apply_gradients(lambda p: loss_fn(graphdef, p, tokens, dtype, activations, **packed),
                         tx, state["params"], state["opt_state"], trainable=trainer.trainable)
    rng, _ = jax.random.split(state["rng"])
    metrics = {"loss": up.loss, "grad_norm": optax.tree.norm(up.grads),
               "param_norm": optax.tree.norm(up.params),
               "update_norm": optax.tree.norm(up.updates),
               "nonfinite_grads": up.nonfinite_grads, "nonfinite_params": up.nonfinite_params}
    if segment_ids is not None:
      metrics["scored_fraction"] = target_mask(segment_ids).mean(dtype=jnp.float32)
    return {"step": state["step"] + 1, "params": up.params, "opt_state": up.opt_state,
            "rng": rng}, metrics

  return step


def init_guard(n_params: int) -> dict:
  """A guard that has seen no non-finite step: ``{"count": int32 [], "first_step": int32 [],
  "first_loss": float32 [], "first_grads": bool [n_params], "first_params": bool [n_params]}``
  (``first_*``: the first non-finite step since the reset: its 1-based number, its loss and
  ``nonfinite_grads``/``nonfinite_params``; ``first_step`` 0 while there is none)."""
  flags = jnp.zeros((n_params,), jnp.bool_)
  return {"count": jnp.zeros((), jnp.int32), "first_step": jnp.zeros((), jnp.int32),
          "first_loss": jnp.zeros((), jnp.float32), "first_grads": flags, "first_params": flags}


def update_guard(guard: dict, step: jax.Array, metrics: Mapping) -> dict:
  """``guard`` after the step numbered ``step`` (1-based) with ``metrics`` (``train_step_fn``'s:
  ``loss`` and the ``NONFINITE_KEYS`` vectors): counted, and kept as the first if it is the first
  non-finite one."""
  bad = ~(jnp.isfinite(metrics["loss"]) & ~metrics["nonfinite_grads"].any()
          & ~metrics["nonfinite_params"].any())
  first = bad & (guard["first_step"] == 0)
  new = {"first_step": step.astype(jnp.int32), "first_loss": metrics["loss"].astype(jnp.float32),
         "first_grads": metrics["nonfinite_grads"], "first_params": metrics["nonfinite_params"]}
  kept = {k: jnp.where(first, v, guard[k]) for k, v in new.items()}
  return {"count": guard["count"] + bad.astype(jnp.int32), **kept}


def guarded_step_fn(trainer: Trainer) -> Callable:
  """``(state, guard, batch) -> (state, guard, metrics)``: ``train_step_fn``'s step with its
  finite checks folded into ``guard`` (``update_guard``); the metrics are its float32 scalars
  (the flag vectors stay on the device, in the guard)."""
  step = train_step_fn(trainer)

  def guarded(state, guard, batch):
    new_state, metrics = step(state, batch)
    guard = update_guard(guard, state["step"] + 1, metrics)
    return new_state, guard, {k: v for k, v in metrics.items() if k not in NONFINITE_KEYS}

  return guarded


def jit_guarded_step(trainer: Trainer) -> Callable:
  """``guarded_step_fn`` jitted: the state sharded and donated, the guard and metrics
  replicated."""
  rep = sharding.replicated(trainer.mesh)
  return jax.jit(guarded_step_fn(trainer),
                 in_shardings=(trainer.state_shardings, rep, trainer.batch_sharding),
                 out_shardings=(trainer.state_shardings, rep, rep), donate_argnums=0)


def jit_train_step(trainer: Trainer) -> Callable:
  rep = sharding.replicated(trainer.mesh)
  return jax.jit(train_step_fn(trainer),
                 in_shardings=(trainer.state_shardings, trainer.batch_sharding),
                 out_shardings=(trainer.state_shardings, rep), donate_argnums=0)


def jit_eval_step(trainer: Trainer) -> Callable:
  """``(params, batch) -> (mean loss, number of targets it averages)`` (jitted).

  ``batch`` as in ``train_step_fn``; with segment ids, the targets that start a document are
  left out (so batches are combined weighted by the number of targets, ``loop.evaluate``).
  """
  graphdef, dtype = trainer.graphdef, trainer.compute_dtype

  def eval_step(params, batch):
    tokens, segment_ids = split_batch(batch)
    losses = token_losses(graphdef, params, tokens, dtype, trainer.batch_sharding, segment_ids)
    return masked_mean(losses, segment_ids)

  return jax.jit(eval_step,
                 in_shardings=(trainer.state_shardings["params"], trainer.batch_sharding),
                 out_shardings=sharding.replicated(trainer.mesh))
