"""``fit``: a small training loop for an ``nnx`` model, on nlx's one train step.

``nlx train`` runs the full loop (``nlx.train.loop``: sharding, checkpoints, metrics files). The
studies, the examples and the benchmarks train small models in one process; they all call
``fit``, whose step is ``nlx.train.step.apply_gradients`` (the step of ``nlx train``), jitted once
per (model graph, optimizer, loss)::

  import numpy as np, optax
  from flax import nnx
  import nlx
  from nlx import configs
  from nlx.nn import ModelConfig
  from nlx.train import fit

  cfg = ModelConfig.from_config(configs.load("transformer:tiny").model)
  model = nlx.build_model(cfg, rngs=nnx.Rngs(0))
  tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (8, 65))
  result = fit(model, lambda step: tokens, steps=20, tx=optax.adamw(1e-3))
  result.losses[-1] < result.losses[0]  # next-token loss (the default) of tokens [B, T+1]
"""

from __future__ import annotations

import dataclasses
import functools
import time
import warnings
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from nlx.train.step import apply_gradients

LossFn = Callable[[Any, Any], jax.Array]  # (model, batch) -> scalar


def next_token_loss(model, tokens: jax.Array) -> jax.Array:
  """Mean next-token cross-entropy of ``tokens [B, T+1]`` (predict ``tokens[:, 1:]``)."""
  logits = model(tokens[:, :-1]).astype(jnp.float32)
  return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()


@dataclasses.dataclass
class FitResult:
  """The trained ``model``; the loss of every step; wall ``seconds`` of the whole call; training
  ``tokens_per_second`` (the compiling first step and the evaluations excluded; 0 for a single
  step); ``evals``: ``{"step": steps done, **evaluate(model)}`` of every evaluation; ``skipped``: steps whose loss,
  gradients or parameters were not finite (their update was not applied); ``params``: the number
  of parameters."""

  model: Any
  losses: list
  seconds: float
  tokens_per_second: float
  params: int
  evals: list = dataclasses.field(default_factory=list)
  skipped: int = 0


@functools.lru_cache(maxsize=16)
def compiled_step(graphdef, tx: optax.GradientTransformation, loss: LossFn, has_aux: bool = False
                  ) -> Callable:
  """``jit((params, rest, opt_state, batch) -> Update)`` of ``loss(merge(graphdef, params, rest),
  batch)``: one compile per (graph, optimizer, loss); the same objects reuse it. The returned
  ``Update`` has no ``grads`` and ``updates`` (None): they would be extra parameter-sized outputs.
  The 16 most recent steps are kept; a caller that builds a new optimizer object per call
  compiles per call."""

  def step(params, rest, opt_state, batch):
    up = apply_gradients(lambda p: loss(nnx.merge(graphdef, p, rest), batch), tx, params,
                         opt_state, has_aux=has_aux)
    return up._replace(grads=None, updates=None)  # not outputs: no parameter-sized copies

  return jax.jit(step)


def param_count(params) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))


def first_leaf_size(batch) -> int:
  """Tokens of a batch: the size of its first leaf (``inputs`` of a study batch, ``tokens``)."""
  return int(np.size(jax.tree.leaves(batch)[0]))


SKIP_CHECK_EVERY = 10  # fit reads the finite flags of the steps since its last read this often


def _count_skipped(finite: list, checked: int, skipped: int) -> tuple[int, int]:
  """Reads the finite flags of the steps ``checked`` onwards (each flag crosses to the host once)
  and warns when one of them was skipped, naming the first; returns ``(steps checked, steps
  skipped)`` so far."""
  recent = np.asarray(jax.device_get(finite[checked:]), bool)
  skipped += int(recent.size - recent.sum())
  if not recent.all():
    warnings.warn(f"fit: step {checked + int(np.argmin(recent))} had a non-finite loss, gradient "
                  f"or parameter and was skipped (parameters unchanged); {skipped} of "
                  f"{len(finite)} steps skipped so far. A model whose forward is non-finite on "
                  "most batches stops learning here.", RuntimeWarning, stacklevel=3)
  return len(finite), skipped


def fit(model, batches: Callable[[int], Any], steps: int, *, tx: optax.GradientTransformation,
        loss: LossFn = next_token_loss, opt_state=None, evaluate: Optional[Callable] = None,
        eval_every: int = 0, progress: bool = True, desc: str = "",
        count_tokens: Callable[[Any], int] = first_leaf_size,
        on_step: Optional[Callable[[int, Any], None]] = None,
        max_seconds: Optional[float] = None) -> FitResult:
  """Trains ``model`` (an ``nnx.Module``) for ``steps`` optimizer steps on ``batches(step)``.

  Args:
    model: the model; its ``nnx.Param`` leaves train, everything else is held fixed.
    batches: ``step -> batch`` (any pytree of arrays ``loss`` reads); a pure function of the step
      for reproducible runs.
    steps: optimizer steps.
    tx: the optax optimizer. Pass the same object (and the same ``loss`` function) to reuse a
      compiled step across calls.
    loss: ``(model, batch) -> scalar``; default ``next_token_loss`` of a token batch ``[B, T+1]``.
    opt_state: ``tx``'s state to continue from (default ``tx.init(params)``).
    evaluate, eval_every: ``evaluate(model) -> dict`` after every ``eval_every`` steps and after
      the last, into ``FitResult.evals``; its time is not counted in the throughput.
    progress, desc: a tqdm progress bar (the loss every 10 steps) and its label.
    count_tokens: ``batch -> tokens`` for the throughput (default: the size of the first leaf).
    on_step: ``(step, Update)`` after each step (e.g. to record metrics); may block.
    max_seconds: a wall-time cap: training stops after the first step that ends this many
      seconds after the start (compilation included); ``evaluate`` then runs as after the last
      step. ``FitResult.losses`` has one entry per step run, so a cut run is shorter than
      ``steps``. None: no cap.
  """
  if max_seconds is not None and not max_seconds > 0:
    raise ValueError(f"max_seconds must be > 0 (or None: no cap); got {max_seconds!r}")
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  opt_state = tx.init(params) if opt_state is None else opt_state
  step_fn = compiled_step(graphdef, tx, loss)
  losses, finite, evals = [], [], []
  tokens, eval_seconds, start, compiled = 0, 0.0, time.time(), None
  checked = skipped = 0  # finite flags read so far, and the skipped steps among them
  bar = tqdm(range(steps), desc=desc, unit="step", dynamic_ncols=True, disable=not progress,
             leave=False)
  for step in bar:
    batch = jax.tree.map(jnp.asarray, batches(step))
    up = step_fn(params, rest, opt_state, batch)
    params, opt_state = up.params, up.opt_state
    losses.append(up.loss)
    finite.append(up.finite)
    if on_step is not None:
      on_step(step, up)
    if step == 0:
      jax.block_until_ready(up.loss)
      compiled = time.time()  # the throughput excludes the first (compiling) step
    else:
      tokens += count_tokens(batch)
    if progress and (step % 10 == 0 or step == steps - 1):
      bar.set_postfix(loss=f"{float(up.loss):.3f}")
    if (step + 1) % SKIP_CHECK_EVERY == 0:
      checked, skipped = _count_skipped(finite, checked, skipped)
    cut = False
    if max_seconds is not None and step < steps - 1:
      jax.block_until_ready(up.loss)
      cut = time.time() - start >= max_seconds
    if evaluate is not None and eval_every and ((step + 1) % eval_every == 0
                                                or step == steps - 1 or cut):
      jax.block_until_ready(up.loss)
      tic = time.time()
      evals.append({"step": step + 1, **evaluate(nnx.merge(graphdef, params, rest))})
      eval_seconds += time.time() - tic
    if cut:
      break
  bar.close()
  losses = [float(x) for x in jax.device_get(losses)]
  checked, skipped = _count_skipped(finite, checked, skipped)  # the steps since the last check
  end = time.time()
  return FitResult(nnx.merge(graphdef, params, rest), losses, end - start,
                   tokens / max(end - (compiled or start) - eval_seconds, 1e-9),
                   param_count(params), evals, skipped)
