"""Meta-learning a deep-momentum (DMGD) optimizer on families of small tasks.

Two task families: random linear regressions (w ∈ R^8, 64 noisy samples, MSE) and 2-layer MLP
classifiers (8 → 16 tanh → 4 classes, labels from a random teacher net, cross-entropy). For each
family, ``nlx.optim.meta.meta_train`` learns DMGD's initial memory and rates by differentiating
through K unrolled training steps (nested scans through ``nlx.levels``), then the learned
optimizer is evaluated on held-out tasks of the same family against momentum and Adam whose
learning rates are tuned on a small grid (on the training tasks, by mean final loss).

    python -m experiments.meta_optimizer --out runs/meta_optimizer   # from the repository root
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from nlx import optim
from nlx.optim import meta

LR_GRID = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0)
D_IN, HIDDEN, CLASSES, SAMPLES = 8, 16, 4, 64

# ---------------------------------------------------------------------------------------------
# Task families: (params0, data) with a leading task axis; a loss (params, data) -> scalar
# ---------------------------------------------------------------------------------------------


def regression_tasks(n: int, seed: int):
  kx, kw, kn = jax.random.split(jax.random.PRNGKey(seed), 3)
  x = jax.random.normal(kx, (n, SAMPLES, D_IN))
  w = jax.random.normal(kw, (n, D_IN))
  y = jnp.einsum("tsd,td->ts", x, w) + 0.1 * jax.random.normal(kn, (n, SAMPLES))
  return jnp.zeros((n, D_IN)), (x, y)


def regression_loss(w, data):
  x, y = data
  return 0.5 * jnp.mean((x @ w - y) ** 2)


def mlp_init(key):
  k1, k2 = jax.random.split(key)
  return {"w1": jax.random.normal(k1, (D_IN, HIDDEN)) * D_IN**-0.5, "b1": jnp.zeros(HIDDEN),
          "w2": jax.random.normal(k2, (HIDDEN, CLASSES)) * HIDDEN**-0.5,
          "b2": jnp.zeros(CLASSES)}


def mlp_apply(p, x):
  return jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]


def mlp_tasks(n: int, seed: int):
  keys = jax.random.split(jax.random.PRNGKey(seed), 3)
  x = jax.random.normal(keys[0], (n, SAMPLES, D_IN))
  teachers = jax.vmap(mlp_init)(jax.random.split(keys[1], n))
  teachers = jax.tree.map(lambda a: 3.0 * a, teachers)  # sharper teacher logits
  labels = jnp.argmax(jax.vmap(mlp_apply)(teachers, x), -1)
  return jax.vmap(mlp_init)(jax.random.split(keys[2], n)), (x, labels)


def mlp_loss(p, data):
  x, labels = data
  return optax.softmax_cross_entropy_with_integer_labels(mlp_apply(p, x), labels).mean()


FAMILIES = {"regression": (regression_tasks, regression_loss),
            "mlp": (mlp_tasks, mlp_loss)}

# ---------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------


def final_losses(tx, loss_fn, tasks, steps: int) -> np.ndarray:
  """``[n_tasks]`` loss after ``steps`` steps of tx on each task."""
  run = lambda p, d: meta.unroll(tx, loss_fn, p, d, steps)[1][-1]
  out = np.asarray(jax.jit(jax.vmap(run))(*tasks))
  return np.where(np.isfinite(out), out, np.inf)


def tune(make, loss_fn, tasks, steps: int) -> tuple[float, dict]:
  """The grid learning rate with the lowest mean final loss on ``tasks``."""
  scores = {lr: float(np.mean(final_losses(make(lr), loss_fn, tasks, steps))) for lr in LR_GRID}
  return min(scores, key=scores.get), scores


def mean_ci(values) -> tuple[float, float]:
  """Mean and the half-width of a normal-approximation 95% interval (1.96 standard errors)."""
  v = np.asarray(values, np.float64)
  return float(v.mean()), float(1.96 * v.std(ddof=1) / np.sqrt(len(v)))


def run_family(name: str, args) -> dict:
  make_tasks, loss_fn = FAMILIES[name]
  train = make_tasks(args.episodes, seed=1)
  tune_tasks = make_tasks(args.tune_tasks, seed=2)
  test = make_tasks(args.test_tasks, seed=3)
  example = jax.tree.map(lambda a: a[0], train[0])
  start = meta.init_meta_params(example, learning_rate=args.init_lr, beta=0.9, inner_lr=0.05,
                                hidden=args.hidden)
  t0 = time.time()
  trained, episode_losses = jax.jit(lambda m, t: meta.meta_train(
      m, loss_fn, t, args.inner_steps, args.meta_batch, optax.adam(args.meta_lr)))(start, train)
  meta_seconds = time.time() - t0
  results = {"meta_train_seconds": meta_seconds,
             "episode_meta_losses": np.asarray(episode_losses).tolist(),
             "learned": {"learning_rate": float(jnp.exp(trained.log_learning_rate)),
                         "beta": float(jax.nn.sigmoid(trained.logit_beta)),
                         "inner_lr": float(jnp.exp(trained.log_inner_lr))}}
  rows = {}
  for opt_name, make in (("momentum", lambda lr: optim.momentum_memory(lr, 0.9)),
                         ("Adam", lambda lr: optim.adam_memory(lr))):
    lr, scores = tune(make, loss_fn, tune_tasks, args.inner_steps)
    rows[f"{opt_name} (lr {lr:g})"] = final_losses(make(lr), loss_fn, test, args.inner_steps)
    results[f"{opt_name}_grid"] = scores
  rows["DMGD, initial meta-params"] = final_losses(meta.optimizer(start), loss_fn, test,
                                                   args.inner_steps)
  rows["DMGD, meta-learned"] = final_losses(meta.optimizer(trained), loss_fn, test,
                                            args.inner_steps)
  results["test_final_losses"] = {k: v.tolist() for k, v in rows.items()}
  results["initial_test_loss"] = float(np.mean(jax.vmap(loss_fn)(*test)))
  for k, v in rows.items():
    m, h = mean_ci(v)
    print(f"{name:10s} {k:28s} {m:.4f} ± {h:.4f}", flush=True)
  print(f"{name:10s} meta-training {meta_seconds:.0f}s, learned {results['learned']}", flush=True)
  return results


def write_outputs(results: dict, args, out: str) -> None:
  lines = [f"Final training loss after K={args.inner_steps} steps on {args.test_tasks} held-out "
           f"tasks per family: mean ± 95% half-width (normal approximation). Meta-training: "
           f"{args.episodes} episodes, meta-batch {args.meta_batch}. Baseline learning rates: "
           f"best of {list(LR_GRID)} on {args.tune_tasks} separate tuning tasks.", ""]
  for family, res in results.items():
    lines += [f"**{family}** (loss at initialisation {res['initial_test_loss']:.4f}; learned "
              f"η={res['learned']['learning_rate']:.3g}, β={res['learned']['beta']:.3f}, "
              f"inner lr={res['learned']['inner_lr']:.3g}; meta-training "
              f"{res['meta_train_seconds']:.0f}s)", "",
              "| optimizer | final loss |", "|---|---|"]
    for k, v in res["test_final_losses"].items():
      m, h = mean_ci(v)
      lines.append(f"| {k} | {m:.4f} ± {h:.4f} |")
    lines.append("")
  with open(os.path.join(out, "meta_optimizer.md"), "w") as f:
    f.write("\n".join(lines))
  print("\n".join(lines))
  with open(os.path.join(out, "meta_optimizer.json"), "w") as f:
    json.dump({"args": vars(args), "results": results}, f)
  plot(results, os.path.join(out, "meta_optimizer.png"))


def plot(results: dict, path: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(2, len(results), figsize=(5 * len(results), 7), squeeze=False)
  for col, (family, res) in enumerate(results.items()):
    names = list(res["test_final_losses"])
    stats = [mean_ci(res["test_final_losses"][k]) for k in names]
    ax = axes[0, col]
    ax.bar(range(len(names)), [s[0] for s in stats], yerr=[s[1] for s in stats], capsize=4)
    ax.set_xticks(range(len(names)), names, rotation=20, ha="right", fontsize=8)
    ax.set(title=f"{family}: held-out final loss (95% CI)", ylabel="loss")
    ax = axes[1, col]
    ep = np.asarray(res["episode_meta_losses"])
    ax.plot(ep, ".", ms=2, alpha=0.4)
    k = min(32, len(ep))
    ax.plot(np.arange(k - 1, len(ep)), np.convolve(ep, np.ones(k) / k, "valid"), "k")
    ax.set(title=f"{family}: meta-loss per episode", xlabel="episode",
           ylabel="mean loss / initial loss")
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", default="runs/meta_optimizer")
  parser.add_argument("--families", default="regression,mlp")
  parser.add_argument("--episodes", type=int, default=512)
  parser.add_argument("--meta_batch", type=int, default=8)
  parser.add_argument("--inner_steps", type=int, default=20)
  parser.add_argument("--meta_lr", type=float, default=0.1)
  parser.add_argument("--init_lr", type=float, default=0.1)
  parser.add_argument("--hidden", type=int, default=8)
  parser.add_argument("--tune_tasks", type=int, default=32)
  parser.add_argument("--test_tasks", type=int, default=32)
  args = parser.parse_args(argv)
  if args.test_tasks < 20:
    raise SystemExit(f"--test_tasks={args.test_tasks}: use at least 20 held-out tasks")
  os.makedirs(args.out, exist_ok=True)
  start = time.time()
  results = {family: run_family(family, args) for family in args.families.split(",")}
  write_outputs(results, args, args.out)
  print(f"total {time.time() - start:.0f}s")


if __name__ == "__main__":
  main()
