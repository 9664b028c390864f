"""The nlx demo: a tiny language model learns multi-query associative recall on the nlx ops.

``nlx demo`` (or ``python -m nlx.demo``) trains a two-block model whose sequence mixer is one of
the public ops of ``nlx.ops`` (``delta_rule`` by default, ``linear_attention`` or
``titans_memory``) on MQAR (``nlx.data.synthetic``), evaluates recall on held-out examples, and
prints a summary. With the defaults (12 pairs, 600 steps of 32 examples) it reaches ~99% held-out
recall on 2 CPU cores in one to two minutes.

The model (Flax NNX)::

  embed -> 2 x [x + Mixer(RMSNorm(x)); x + MLP(RMSNorm(x))] -> RMSNorm -> head

  Mixer: q, k, v = short causal depthwise conv (SiLU) of one projection of x; q, k L2-normalised
         per head; then the op:
           delta_rule        beta = sigmoid(W_beta x)
           linear_attention  no gates
           titans            linear memory, lr = sigmoid(W_lr x), momentum = sigmoid(W_eta x),
                             log-decay g = log sigmoid(W_g x)
         -> output projection.

The short convolution lets a key token's features reach the value token that follows it (as in
DeltaNet, Mamba and Zoology's models); all recurrences are in ``nlx.ops``. The train step is a pure
jitted function of ``(graphdef, state, opt_state, batch)``, not ``nnx.jit`` (docs/MODELS.md,
"Example").
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from nlx import ops
from nlx.data.synthetic import check_mqar_args, mqar_batch, mqar_vocab

MIXERS = ("delta_rule", "linear_attention", "titans")
IMPLS = ("auto", "chunked", "recurrent")
EVAL_SEED_OFFSET = 1_000_003  # held-out examples come from seed + this offset


# ----------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------


def _l2_normalize(x: jax.Array, eps: float = 1e-6) -> jax.Array:
  x32 = x.astype(jnp.float32)
  return (x32 * jax.lax.rsqrt(jnp.sum(x32 * x32, axis=-1, keepdims=True) + eps)).astype(x.dtype)


class ShortConv(nnx.Module):
  """Causal depthwise convolution over time: ``y_t = Σ_i w_i ⊙ x_{t-i}``, i < width."""

  def __init__(self, dim: int, width: int, *, rngs: nnx.Rngs):
    w = 0.1 * jax.random.normal(rngs.params(), (width, dim))
    self.width = width
    self.w = nnx.Param(w.at[0].add(1.0))  # starts near the identity (i = 0 is the current token)

  def __call__(self, x: jax.Array) -> jax.Array:  # [B, T, D]
    t = x.shape[1]
    padded = jnp.pad(x, ((0, 0), (self.width - 1, 0), (0, 0)))
    w = self.w[...]
    start = self.width - 1
    return sum(w[i] * padded[:, start - i:start - i + t] for i in range(self.width))


class Mixer(nnx.Module):
  """Sequence mixer on one of the ``nlx.ops`` memories; ``[B, T, d_model] -> [B, T, d_model]``."""

  def __init__(self, kind: str, d_model: int, heads: int, *, conv: int, impl: str,
               chunk_size: int, rngs: nnx.Rngs):
    if kind not in MIXERS:
      raise ValueError(f"mixer={kind!r} is not one of {MIXERS}")
    self.kind, self.heads, self.impl, self.chunk_size = kind, heads, impl, chunk_size
    self.qkv = nnx.Linear(d_model, 3 * d_model, use_bias=False, rngs=rngs)
    self.conv = ShortConv(3 * d_model, conv, rngs=rngs) if conv > 0 else None
    num_gates = {"delta_rule": 1, "linear_attention": 0, "titans": 3}[kind]
    if num_gates:
      self.gates = nnx.Linear(d_model, num_gates * heads, rngs=rngs)
      if kind == "titans":  # start with slow decay (g ≈ -0.0025) and moderate momentum
        bias = jnp.concatenate([jnp.zeros(heads), jnp.full(heads, -1.0), jnp.full(heads, 6.0)])
        self.gates.bias[...] = bias
    else:
      self.gates = None
    self.out = nnx.Linear(d_model, d_model, use_bias=False, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    b, t, d = x.shape
    h = self.heads
    qkv = self.qkv(x)
    if self.conv is not None:
      qkv = jax.nn.silu(self.conv(qkv))
    q, k, v = (y.reshape(b, t, h, d // h) for y in jnp.split(qkv, 3, axis=-1))
    q, k = _l2_normalize(q), _l2_normalize(k)
    if self.kind == "linear_attention":
      o, _ = ops.linear_attention(q, k, v, chunk_size=self.chunk_size, impl=self.impl)
    elif self.kind == "delta_rule":
      beta = jax.nn.sigmoid(self.gates(x))
      o, _ = ops.delta_rule(q, k, v, beta=beta, chunk_size=self.chunk_size, impl=self.impl)
    else:
      lr, eta, g = jnp.split(self.gates(x), 3, axis=-1)
      o, _ = ops.titans_memory(q, k, v, lr=jax.nn.sigmoid(lr), momentum=jax.nn.sigmoid(eta),
                               g=jax.nn.log_sigmoid(g), memory="linear",
                               chunk_size=self.chunk_size, impl=self.impl)
    return self.out(o.reshape(b, t, d))


class MLP(nnx.Module):

  def __init__(self, d_model: int, hidden: int, *, rngs: nnx.Rngs):
    self.up = nnx.Linear(d_model, hidden, rngs=rngs)
    self.down = nnx.Linear(hidden, d_model, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.down(jax.nn.gelu(self.up(x)))


class Block(nnx.Module):

  def __init__(self, kind: str, d_model: int, heads: int, *, conv: int, impl: str,
               chunk_size: int, rngs: nnx.Rngs):
    self.norm1 = nnx.RMSNorm(d_model, rngs=rngs)
    self.mixer = Mixer(kind, d_model, heads, conv=conv, impl=impl, chunk_size=chunk_size,
                       rngs=rngs)
    self.norm2 = nnx.RMSNorm(d_model, rngs=rngs)
    self.mlp = MLP(d_model, 4 * d_model, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x + self.mixer(self.norm1(x))
    return x + self.mlp(self.norm2(x))


class RecallModel(nnx.Module):
  """Embedding, ``layers`` blocks, final RMSNorm, untied head: tokens ``[B, T]`` -> logits."""

  def __init__(self, vocab_size: int, *, mixer: str, d_model: int, heads: int, layers: int = 2,
               conv: int = 4, impl: str = "auto", chunk_size: int = 64, rngs: nnx.Rngs):
    if d_model % heads:
      raise ValueError(f"d_model must be a multiple of heads = {heads}; got {d_model}")
    self.embed = nnx.Embed(vocab_size, d_model, rngs=rngs)
    self.blocks = nnx.List([
        Block(mixer, d_model, heads, conv=conv, impl=impl, chunk_size=chunk_size, rngs=rngs)
        for _ in range(layers)
    ])
    self.norm = nnx.RMSNorm(d_model, rngs=rngs)
    self.head = nnx.Linear(d_model, vocab_size, use_bias=False, rngs=rngs)

  def __call__(self, tokens: jax.Array) -> jax.Array:
    x = self.embed(tokens)
    for block in self.blocks:
      x = block(x)
    return self.head(self.norm(x)).astype(jnp.float32)


# ----------------------------------------------------------------------------------------------
# Loss and steps (pure functions)
# ----------------------------------------------------------------------------------------------


def masked_sums(logits: jax.Array, targets: jax.Array, mask: jax.Array) -> dict:
  """Summed cross-entropy, correct predictions and count over the masked (answer) positions."""
  mask = mask.astype(jnp.float32)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  correct = (jnp.argmax(logits, -1) == targets) * mask
  return {"loss_sum": (ce * mask).sum(), "correct": correct.sum(), "count": mask.sum()}


def masked_metrics(logits: jax.Array, targets: jax.Array, mask: jax.Array):
  """Mean cross-entropy and accuracy over the masked (answer) positions."""
  sums = masked_sums(logits, targets, mask)
  count = jnp.maximum(sums["count"], 1.0)
  return sums["loss_sum"] / count, sums["correct"] / count


def make_steps(tx: optax.GradientTransformation):
  """Returns jitted ``train_step(graphdef, state, opt_state, batch)`` and ``eval_step``."""

  def train_step(graphdef, state, opt_state, batch):
    def loss_fn(state):
      model = nnx.merge(graphdef, state)
      return masked_metrics(model(batch["tokens"]), batch["targets"], batch["mask"])

    (loss, acc), grads = jax.value_and_grad(loss_fn, has_aux=True)(state)
    updates, opt_state = tx.update(grads, opt_state, state)
    state = optax.apply_updates(state, updates)
    return state, opt_state, {"loss": loss, "accuracy": acc}

  def eval_step(graphdef, state, batch):
    model = nnx.merge(graphdef, state)
    return masked_sums(model(batch["tokens"]), batch["targets"], batch["mask"])

  return (jax.jit(train_step, static_argnums=0, donate_argnums=(1, 2)),
          jax.jit(eval_step, static_argnums=0))


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog="nlx demo",
      description="Train a tiny model on multi-query associative recall (MQAR) with one of the "
                  "nlx ops as its sequence mixer, then report held-out recall accuracy.",
      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument("--mixer", choices=MIXERS, default="delta_rule",
                 help="sequence mixer: nlx.ops.delta_rule, nlx.ops.linear_attention or "
                      "nlx.ops.titans_memory (linear memory with lr, momentum and decay gates)")
  p.add_argument("--impl", choices=IMPLS, default="auto", help="implementation of the op")
  p.add_argument("--steps", type=int, default=600, help="training steps")
  p.add_argument("--batch", type=int, default=32, help="examples per step")
  p.add_argument("--seq_len", type=int, default=64, help="tokens per example")
  p.add_argument("--num_pairs", type=int, default=12, help="key-value pairs in the context")
  p.add_argument("--num_queries", type=int, default=None,
                 help="queries per example (default: as many as fit, at most --num_pairs)")
  p.add_argument("--vocab_size", type=int, default=128,
                 help="vocabulary: pad, then disjoint key and value ranges")
  p.add_argument("--d_model", type=int, default=64, help="model width")
  p.add_argument("--heads", type=int, default=2, help="heads of the mixer")
  p.add_argument("--layers", type=int, default=2, help="blocks")
  p.add_argument("--conv", type=int, default=4,
                 help="width of the short causal convolution on q, k, v (0: none)")
  p.add_argument("--chunk_size", type=int, default=None,
                 help="chunk of the op (default 64; titans: 8, since its chunk-start gradients "
                      "make the chunk a modelling choice)")
  p.add_argument("--lr", type=float, default=6e-3, help="peak learning rate (adamw, warmup + "
                                                        "cosine decay)")
  p.add_argument("--weight_decay", type=float, default=0.01, help="adamw weight decay")
  p.add_argument("--seed", type=int, default=0,
                 help="seed of the initialisation and of the training data; held-out data uses "
                      f"seed + {EVAL_SEED_OFFSET}")
  p.add_argument("--eval_examples", type=int, default=1024, help="held-out examples")
  p.add_argument("--log_every", type=int, default=10, help="steps between progress updates")
  p.add_argument("--no_progress", action="store_true", help="no progress bar")
  p.add_argument("--out", default=None, help="write the final metrics to this JSON file")
  return p


def _check_args(p: argparse.ArgumentParser, a: argparse.Namespace) -> None:
  positive = ("steps", "batch", "d_model", "heads", "layers", "eval_examples", "log_every")
  for name in positive:
    if getattr(a, name) < 1:
      p.error(f"--{name.replace('_', '-')} must be >= 1; got {getattr(a, name)}")
  if a.conv < 0:
    p.error(f"--conv must be >= 0; got {a.conv}")
  if a.chunk_size is not None and a.chunk_size < 1:
    p.error(f"--chunk_size must be >= 1; got {a.chunk_size}")
  if not (a.lr > 0 and math.isfinite(a.lr)):
    p.error(f"--lr must be a positive finite number; got {a.lr}")
  if a.weight_decay < 0:
    p.error(f"--weight_decay must be >= 0; got {a.weight_decay}")
  if a.seed < 0:
    p.error(f"--seed must be >= 0; got {a.seed}")
  if a.d_model % a.heads:
    p.error(f"--d_model must be a multiple of --heads = {a.heads}; got {a.d_model}")
  if a.num_queries is None:
    a.num_queries = max(1, min(a.num_pairs, a.seq_len // 2 - a.num_pairs))
  try:
    check_mqar_args(num_pairs=a.num_pairs, seq_len=a.seq_len, vocab_size=a.vocab_size,
                    num_queries=a.num_queries)
  except ValueError as e:
    field = str(e).split(" ", 1)[0]
    p.error(f"--{field.replace('_', '-')}: {e}")


def main(argv: Optional[Sequence[str]] = None) -> int:
  """Runs the demo; returns 0 on success (1 if the loss became non-finite)."""
  from nlx.cli import normalize_flags  # pylint: disable=g-import-not-at-top
  parser = build_parser()
  a = parser.parse_args(normalize_flags(sys.argv[1:] if argv is None else argv))
  _check_args(parser, a)
  chunk_size = a.chunk_size or (8 if a.mixer == "titans" else 64)
  task = dict(num_pairs=a.num_pairs, seq_len=a.seq_len, vocab_size=a.vocab_size,
              num_queries=a.num_queries)
  vocab = mqar_vocab(a.vocab_size)
  chance = 1.0 / vocab.num_values
  eval_seed = a.seed + EVAL_SEED_OFFSET

  t_start = time.perf_counter()
  model = RecallModel(a.vocab_size, mixer=a.mixer, d_model=a.d_model, heads=a.heads,
                      layers=a.layers, conv=a.conv, impl=a.impl, chunk_size=chunk_size,
                      rngs=nnx.Rngs(a.seed))
  graphdef, state = nnx.split(model)
  num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state))
  warmup = max(1, min(100, a.steps // 10))
  schedule = optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=a.lr, warmup_steps=warmup, decay_steps=max(a.steps, warmup + 1),
      end_value=a.lr * 0.05)
  tx = optax.chain(optax.clip_by_global_norm(1.0),
                   optax.adamw(schedule, b1=0.9, b2=0.98, weight_decay=a.weight_decay))
  opt_state = tx.init(state)
  train_step, eval_step = make_steps(tx)

  print(f"nlx demo: MQAR with {a.num_pairs} key-value pairs, {a.num_queries} queries, "
        f"seq_len {a.seq_len}, vocab {a.vocab_size}; mixer {a.mixer} (impl {a.impl}), "
        f"{num_params:,} params, {a.steps} steps x batch {a.batch} on "
        f"{jax.default_backend()}", flush=True)

  bar = None
  if not a.no_progress:
    from tqdm.auto import tqdm
    bar = tqdm(total=a.steps, desc=f"{a.mixer}", unit="step", dynamic_ncols=True,
               file=sys.stderr)
  loss = acc = float("nan")
  last_window = 0
  recent: list = []
  history: list = []
  t_first = None
  for step in range(a.steps):
    batch = mqar_batch(a.seed, step * a.batch, a.batch, **task)
    state, opt_state, metrics = train_step(graphdef, state, opt_state, batch)
    recent.append(metrics)
    last = step == a.steps - 1
    if (step + 1) % a.log_every == 0 or last or step == 0:
      fetched = jax.device_get(recent)
      recent = []
      losses = [float(m["loss"]) for m in fetched]
      if not all(math.isfinite(x) for x in losses):
        bad = step - len(losses) + 1 + next(i for i, x in enumerate(losses) if not math.isfinite(x))
        if bar is not None:
          bar.close()
        print(f"nlx demo: the training loss became non-finite at step {bad} "
              f"(loss={losses}); stopping. Try a lower --lr.", file=sys.stderr)
        return 1
      loss, last_window = float(np.mean(losses)), len(losses)
      acc = float(np.mean([float(m["accuracy"]) for m in fetched]))
      history.append({"step": step + 1, "loss": loss, "accuracy": acc,
                      "time_s": time.perf_counter() - t_start})
      if t_first is None:
        t_first = time.perf_counter() - t_start
      if bar is not None:
        bar.set_postfix(loss=f"{loss:.3f}", acc=f"{acc:.1%}", refresh=False)
        bar.update(step + 1 - bar.n)
  if bar is not None:
    bar.close()

  totals = {"loss_sum": 0.0, "correct": 0.0, "count": 0.0}
  for start in range(0, a.eval_examples, a.batch):
    n = min(a.batch, a.eval_examples - start)
    out = jax.device_get(eval_step(graphdef, state, mqar_batch(eval_seed, start, n, **task)))
    for name in totals:
      totals[name] += float(out[name])
  eval_acc = totals["correct"] / totals["count"]
  eval_loss = totals["loss_sum"] / totals["count"]
  nnx.update(model, state)  # the trained module, for anyone who imports main's pieces
  wall = time.perf_counter() - t_start

  results = {
      "task": "mqar", "mixer": a.mixer, "impl": a.impl, "chunk_size": chunk_size,
      "steps": a.steps, "batch": a.batch, "seq_len": a.seq_len, "num_pairs": a.num_pairs,
      "num_queries": a.num_queries, "vocab_size": a.vocab_size, "num_values": vocab.num_values,
      "d_model": a.d_model, "heads": a.heads, "layers": a.layers, "conv": a.conv, "lr": a.lr,
      "seed": a.seed, "num_params": num_params,
      "final_train_loss": loss, "final_train_accuracy": acc,
      "eval_examples": a.eval_examples, "eval_loss": eval_loss, "eval_accuracy": eval_acc,
      "chance_accuracy": chance, "wall_time_s": wall, "first_step_s": t_first,
      "backend": jax.default_backend(), "devices": jax.device_count(),
      "history": history,
  }
  width = 22
  lines = [
      ("mixer", f"{a.mixer} (nlx.ops, impl={a.impl}, chunk_size={chunk_size})"),
      ("task", f"MQAR: {a.num_pairs} pairs, {a.num_queries} queries, seq_len {a.seq_len}, "
               f"{vocab.num_keys} keys, {vocab.num_values} values"),
      ("model", f"d_model {a.d_model}, {a.heads} heads, {a.layers} layers, {num_params:,} params"),
      ("steps", f"{a.steps} x batch {a.batch} (lr {a.lr:g})"),
      ("final train loss", f"{loss:.4f} (train recall {acc:.1%}; mean of the last "
                           f"{last_window} steps)"),
      ("held-out recall", f"{eval_acc:.1%} over {a.eval_examples} examples "
                          f"(loss {eval_loss:.4f})"),
      ("chance", f"{chance:.1%} (1 / {vocab.num_values} values)"),
      ("wall time", f"{wall:.1f} s (first step incl. compile {t_first:.1f} s)"),
      ("backend", f"{jax.default_backend()} ({jax.device_count()} device(s))"),
  ]
  print("\n== nlx demo summary ==")
  for name, value in lines:
    print(f"  {name:<{width}}{value}")
  if a.out:
    directory = os.path.dirname(os.path.abspath(a.out))
    os.makedirs(directory, exist_ok=True)
    with open(a.out, "w") as f:
      json.dump(results, f, indent=2)
    print(f"  {'metrics written to':<{width}}{a.out}")
  sys.stdout.flush()
  return 0


if __name__ == "__main__":
  sys.exit(main())
