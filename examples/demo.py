"""The nlx demo: a tiny language model learns multi-query associative recall on the nlx ops.

``python -m examples.demo`` (from the repository root) trains a two-block model whose sequence
mixer is one of the public ops of ``nlx.ops`` (``delta_rule`` by default, ``linear_attention`` or
``titans_memory``) on MQAR (``nlx.data.synthetic``), evaluates recall on held-out examples, and
prints a summary. With the defaults (12 pairs, 600 steps of 32 examples) it reaches ~99% held-out
recall on 2 CPU cores in one to two minutes.

The model is assembled from ``nlx.nn`` parts::

  Embedding -> layers x Block [x + OpMixer(RMSNorm(x)); x + SwiGLU(RMSNorm(x))] -> RMSNorm -> head

  OpMixer: q, k, v from nlx.nn.qkv.QKV (projections, short causal depthwise conv, SiLU; q and k
           L2-normalised per head); then the op:
             delta_rule        beta = sigmoid(x W_beta)
             linear_attention  no gates
             titans            linear memory, lr = sigmoid(x W_lr), momentum = sigmoid(x W_eta),
                               log-decay g = log sigmoid(x W_g)
           -> nlx.nn.qkv.OutputGate (per-head RMSNorm, output projection).

The short convolution lets a key token's features reach the value token that follows it (as in
DeltaNet, Mamba and Zoology's models); all recurrences are in ``nlx.ops``. Training is
``nlx.train.fit`` (nlx's one train step, ``nlx.train.step.apply_gradients``) on the cross-entropy
of the answer positions. Every ``--log_every`` steps the history records the mean training loss
of those steps and the recall on the next training batch (examples the model has not seen yet).
"""

from __future__ import annotations

import argparse
import functools
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
from nlx.nn import ModelConfig
from nlx.nn.mixer import Mixer
from nlx.nn.model import Block
from nlx.nn.norms import RMSNorm
from nlx.nn.params import Dense, Embedding
from nlx.nn.qkv import QKV, OutputGate
from nlx.train import fit

MIXERS = ("delta_rule", "linear_attention", "titans")
IMPLS = ("auto", "chunked", "recurrent")
EVAL_SEED_OFFSET = 1_000_003  # held-out examples come from seed + this offset
# The initial biases of each mixer's gates: beta; lr, momentum and log-decay (titans starts with
# slow decay, g ≈ -0.0025, and moderate momentum).
GATE_BIASES = {"delta_rule": (0.0,), "linear_attention": (), "titans": (0.0, -1.0, 6.0)}


# ----------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------


class OpMixer(Mixer):
  """Sequence mixer on one of the ``nlx.ops`` memories; ``[B, T, d_model] -> [B, T, d_model]``."""

  def __init__(self, cfg: ModelConfig, *, kind: str, rngs: nnx.Rngs):
    if kind not in MIXERS:
      raise ValueError(f"mixer={kind!r} is not one of {MIXERS}")
    d, h = cfg.d_model, cfg.n_heads
    self.kind, self.chunk_size, self.impl = kind, cfg.chunk_size, cfg.impl
    self.qkv = QKV(d, h, cfg.dk, cfg.dv, cfg.conv_size, rngs=rngs)
    biases = GATE_BIASES[kind]
    init = lambda key, shape, dtype: jnp.broadcast_to(jnp.asarray(biases, dtype)[:, None], shape)
    self.gates = (Dense((d,), (len(biases), h), ("embed", "gates", "heads"), rngs=rngs,
                        use_bias=True, bias_init=init) if biases else None)
    self.out = OutputGate(d, h, cfg.dv, rngs=rngs, gated=False, eps=cfg.norm_eps)

  def __call__(self, x: jax.Array, state=None, pos=0):
    if state is not None:
      raise NotImplementedError("the demo's mixer runs whole sequences (state=None) only")
    q, k, v, _ = self.qkv(x)
    gates = None if self.gates is None else self.gates(x)  # [B, T, gates, H]
    kwargs = dict(chunk_size=self.chunk_size, impl=self.impl)
    if self.kind == "linear_attention":
      o, _ = ops.linear_attention(q, k, v, **kwargs)
    elif self.kind == "delta_rule":
      o, _ = ops.delta_rule(q, k, v, beta=jax.nn.sigmoid(gates[:, :, 0]), **kwargs)
    else:
      o, _ = ops.titans_memory(q, k, v, lr=jax.nn.sigmoid(gates[:, :, 0]),
                               momentum=jax.nn.sigmoid(gates[:, :, 1]),
                               g=jax.nn.log_sigmoid(gates[:, :, 2]), memory="linear", **kwargs)
    return self.out(o, x), None


class RecallModel(nnx.Module):
  """Embedding, ``cfg.n_layers`` blocks of ``OpMixer(kind)``, final RMSNorm, untied head:
  tokens ``[B, T]`` -> logits ``[B, T, vocab]`` (float32)."""

  def __init__(self, cfg: ModelConfig, *, mixer: str, rngs: nnx.Rngs):
    factory = functools.partial(OpMixer, kind=mixer)
    self.embed = Embedding(cfg.vocab_size, cfg.d_model, rngs=rngs, init_std=cfg.init_std)
    self.blocks = nnx.List([Block(cfg, factory, rngs=rngs) for _ in range(cfg.n_layers)])
    self.norm = RMSNorm((cfg.d_model,), ("embed",), rngs=rngs, eps=cfg.norm_eps)
    self.head = Dense((cfg.d_model,), (cfg.vocab_size,), ("embed", "vocab"), rngs=rngs)

  def __call__(self, tokens: jax.Array) -> jax.Array:
    x = self.embed(tokens)
    for block in self.blocks:
      x, _ = block(x)
    return self.head(self.norm(x)).astype(jnp.float32)


def model_config(a: argparse.Namespace, chunk_size: int) -> ModelConfig:
  """The ``ModelConfig`` of the parsed flags (the family field is unused: ``RecallModel``
  assembles its blocks itself). The SwiGLU width is 8/3 d_model, the Transformer++ ratio; the
  embedding's std is 1/sqrt(d_model), as flax's ``nnx.Embed`` draws it."""
  return ModelConfig(vocab_size=a.vocab_size, d_model=a.d_model, n_layers=a.layers,
                     n_heads=a.heads, mlp_dim=max(1, 8 * a.d_model // 3), conv_size=a.conv,
                     chunk_size=chunk_size, impl=a.impl, tie_embeddings=False,
                     init_std=a.d_model**-0.5)


# ----------------------------------------------------------------------------------------------
# Loss and evaluation
# ----------------------------------------------------------------------------------------------


def masked_sums(logits: jax.Array, targets: jax.Array, mask: jax.Array) -> dict:
  """Summed cross-entropy, correct predictions and count over the masked (answer) positions."""
  mask = mask.astype(jnp.float32)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  correct = (jnp.argmax(logits, -1) == targets) * mask
  return {"loss_sum": (ce * mask).sum(), "correct": correct.sum(), "count": mask.sum()}


def answer_loss(model, batch: dict) -> jax.Array:
  """``fit``'s loss: mean cross-entropy over the answer positions of an MQAR batch."""
  sums = masked_sums(model(batch["tokens"]), batch["targets"], batch["mask"])
  return sums["loss_sum"] / jnp.maximum(sums["count"], 1.0)


@functools.partial(jax.jit, static_argnums=0)
def _eval_sums(graphdef, state, batch: dict) -> dict:
  model = nnx.merge(graphdef, state)
  return masked_sums(model(batch["tokens"]), batch["targets"], batch["mask"])


def eval_sums(model, batch: dict) -> dict:
  """``masked_sums`` of ``model`` on ``batch`` (jitted once per model graph), as floats."""
  graphdef, state = nnx.split(model)
  return {k: float(v) for k, v in jax.device_get(_eval_sums(graphdef, state, batch)).items()}


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog="python -m examples.demo",
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
                 help="width of the short causal convolution on q, k, v (0: none, SiLU only)")
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
  p.add_argument("--log_every", type=int, default=10,
                 help="steps between history records (mean loss, recall on the next batch)")
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
  from nlx.cli import normalize_flags  # pylint: disable=g-import-not-at-top  (--seq-len spelling)
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
  model = RecallModel(model_config(a, chunk_size), mixer=a.mixer, rngs=nnx.Rngs(a.seed))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
  warmup = max(1, min(100, a.steps // 10))
  schedule = optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=a.lr, warmup_steps=warmup, decay_steps=max(a.steps, warmup + 1),
      end_value=a.lr * 0.05)
  tx = optax.chain(optax.clip_by_global_norm(1.0),
                   optax.adamw(schedule, b1=0.9, b2=0.98, weight_decay=a.weight_decay))

  print(f"nlx demo: MQAR with {a.num_pairs} key-value pairs, {a.num_queries} queries, "
        f"seq_len {a.seq_len}, vocab {a.vocab_size}; mixer {a.mixer} (impl {a.impl}), "
        f"{num_params:,} params, {a.steps} steps x batch {a.batch} on "
        f"{jax.default_backend()}", flush=True)

  batches = lambda step: mqar_batch(a.seed, step * a.batch, a.batch, **task)

  def probe(trained, step: int) -> dict:
    """Recall on the batch of ``step`` (not trained on yet) and the time so far."""
    sums = eval_sums(trained, batches(step))
    return {"accuracy": sums["correct"] / max(sums["count"], 1.0),
            "time_s": time.perf_counter() - t_start}

  seen = {"step": 0, "first_step_s": None, "first": None}
  finite = []  # per step: loss, gradients and new parameters all finite (else fit skipped it)

  def on_step(step: int, up) -> None:
    seen["step"] = step
    finite.append(up.finite)
    if step == 0:  # the first record of the history, after the (compiling) first step
      jax.block_until_ready(up.loss)
      seen["first_step_s"] = time.perf_counter() - t_start
      seen["first"] = {"step": 1, **probe(nnx.merge(graphdef, up.params, rest), 1)}

  result = fit(model, batches, a.steps, tx=tx, loss=answer_loss,
               evaluate=lambda trained: probe(trained, seen["step"] + 1), eval_every=a.log_every,
               progress=not a.no_progress, desc=a.mixer, on_step=on_step)
  losses = result.losses
  if result.skipped:
    bad = int(np.argmin(jax.device_get(finite)))
    print(f"nlx demo: the training loss became non-finite at step {bad} (its loss, gradients "
          f"or new parameters; {result.skipped} such step(s), skipped); stopping. Try a lower "
          "--lr.", file=sys.stderr)
    return 1
  history, done = [], 0
  for record in [seen["first"]] + [e for e in result.evals if e["step"] > 1]:
    step = record["step"]
    history.append({"step": step, "loss": float(np.mean(losses[done:step])),
                    "accuracy": record["accuracy"], "time_s": record["time_s"]})
    last_window, done = step - done, step
  loss, acc = history[-1]["loss"], history[-1]["accuracy"]

  totals = {"loss_sum": 0.0, "correct": 0.0, "count": 0.0}
  for start in range(0, a.eval_examples, a.batch):
    n = min(a.batch, a.eval_examples - start)
    out = eval_sums(result.model, mqar_batch(eval_seed, start, n, **task))
    for name in totals:
      totals[name] += out[name]
  eval_acc = totals["correct"] / totals["count"]
  eval_loss = totals["loss_sum"] / totals["count"]
  wall = time.perf_counter() - t_start
  t_first = seen["first_step_s"]

  results = {
      "task": "mqar", "mixer": a.mixer, "impl": a.impl, "chunk_size": chunk_size,
      "steps": a.steps, "batch": a.batch, "seq_len": a.seq_len, "num_pairs": a.num_pairs,
      "num_queries": a.num_queries, "vocab_size": a.vocab_size, "num_values": vocab.num_values,
      "d_model": a.d_model, "heads": a.heads, "layers": a.layers, "conv": a.conv, "lr": a.lr,
      "seed": a.seed, "num_params": num_params,
      "final_train_loss": loss, "final_train_accuracy": acc,
      "eval_examples": a.eval_examples, "eval_loss": eval_loss, "eval_accuracy": eval_acc,
      "chance_accuracy": chance, "wall_time_s": wall, "first_step_s": t_first,
      "train_tokens_per_s": result.tokens_per_second,
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
      ("final train loss", f"{loss:.4f} (mean of the last {last_window} steps; train recall "
                           f"{acc:.1%} on the next batch)"),
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
