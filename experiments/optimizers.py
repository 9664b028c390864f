"""Deep optimizers on the toy function of Fig. 4 and on a tiny byte-level language model.

(a) ``toy``: minimise ``ψ(r, θ) = r² + k (r − θ + a sin(ω r))²`` from ``(−3.5, 2)`` with GD,
momentum, delta momentum, DMGD and M3; each optimizer's learning rate is the best of a small grid
(fewest steps to ``ψ < tol``). Writes trajectories (PNG) and a table of steps to tolerance.
(b) ``lm``: the ``configs/transformer.py:tiny`` model (``nlx.nn.build_model``) on PTB bytes,
trained with AdamW, Muon, M3 and DMGD for the same number of steps, 3 seeds, by nlx's one train
step (``nlx.train.step.apply_gradients``). Writes loss curves (PNG) and a table of final training /
validation loss. PTB is read from the datasets directory (``--data DIR``, else ``$NLX_DATA``):
``DIR/ptb/ptb.{train,valid}.txt`` (a directory holding ``ptb.{train,valid}.txt`` itself is
accepted too).

From the repository root (``DATA`` the datasets directory)::

    python -m experiments.optimizers --out runs/optimizers --data DATA   # both parts
    python -m experiments.optimizers --part toy --out runs/optimizers
    python -m experiments.optimizers --part lm --data DATA --steps 300
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments import study
from nlx import optim
from nlx.train.step import apply_gradients

PTB_FILES = ("ptb.train.txt", "ptb.valid.txt")
PTB = ("ptb/ptb.train.txt and ptb/ptb.valid.txt, Penn Treebank in Mikolov's preprocessing "
       "(ptb.zip of the d2l-ai/d2l-zh repository, data/ptb.zip)")

# ---------------------------------------------------------------------------------------------
# (a) The toy function of Fig. 4
# ---------------------------------------------------------------------------------------------

TOY_START = (-3.5, 2.0)
TOY_LRS = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1)


def psi(x: jax.Array, k: float, a: float, omega: float) -> jax.Array:
  """``ψ(r, θ)`` for ``x = [[r, θ]]`` (a ``[1, 2]`` matrix, so that M3 treats it as one)."""
  r, theta = x[0, 0], x[0, 1]
  return r**2 + k * (r - theta + a * jnp.sin(omega * r)) ** 2


def toy_optimizers() -> dict:
  """name -> (learning rate -> optax transformation)."""
  return {
      "GD": lambda lr: optax.sgd(lr),
      "momentum": lambda lr: optim.momentum_memory(lr, 0.9),
      "delta momentum": lambda lr: optim.momentum_memory(lr, 0.9, objective="l2",
                                                         normalize_keys=True),
      "delta momentum (unnormalised)": lambda lr: optim.momentum_memory(lr, 0.9,
                                                                        objective="l2"),
      "DMGD": lambda lr: optim.deep_momentum(lr, 0.9, inner_lr=0.1, hidden=8),
      "M3": lambda lr: optim.m3(lr, slow_period=10, decay1=0.9, beta1=0.1, decay2=0.99,
                                beta2=0.01, decay3=0.9, beta3=0.1),
  }


def toy_trajectory(tx, steps: int, fn) -> np.ndarray:
  """``[steps + 1, 2]`` positions of ``steps`` updates of tx on fn from ``TOY_START``.

  Not a model trainer (nlx's train step, ``apply_gradients``, trains the part (b) models): the
  trajectory is the optimizer's own behaviour on ψ, divergence included; the shared step's
  finite guard would hold a diverging optimizer at its last finite point and hide it.
  """
  x0 = jnp.asarray([TOY_START], jnp.float32)

  def step(carry, _):
    x, s = carry
    u, s = tx.update(jax.grad(fn)(x), s, x)
    x = optax.apply_updates(x, u)
    return (x, s), x[0]

  _, xs = jax.jit(lambda x: jax.lax.scan(step, (x, tx.init(x)), None, length=steps))(x0)
  return np.concatenate([np.asarray(x0), np.asarray(xs)])


def steps_to_tolerance(values: np.ndarray, tol: float) -> int | None:
  """First step after which ψ stays below tol (None if it never does)."""
  below = values < tol
  if not below[-1]:
    return None
  above = np.nonzero(~below)[0]
  return 0 if len(above) == 0 else int(above[-1] + 1)


def run_toy(args) -> dict:
  fn = functools.partial(psi, k=args.k, a=args.a, omega=args.omega)
  results = {}
  for name, make in toy_optimizers().items():
    best = None
    for lr in TOY_LRS:
      traj = toy_trajectory(make(lr), args.toy_steps, fn)
      values = np.asarray(jax.vmap(lambda p: fn(p[None]))(jnp.asarray(traj)))
      values = np.where(np.isfinite(values), values, np.inf)
      n = steps_to_tolerance(values, args.tol)
      key = (n if n is not None else np.inf, values[-1])
      if best is None or key < best[0]:
        best = (key, lr, traj, values, n)
    _, lr, traj, values, n = best
    results[name] = {"lr": lr, "steps_to_tol": n, "final_psi": float(values[-1]),
                     "trajectory": traj.tolist()}
    print(f"toy {name:32s} lr={lr:g} steps_to_tol={n} final={values[-1]:.3g}", flush=True)
  return results


def plot_toy(results: dict, args, path: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  r, t = np.meshgrid(np.linspace(-4, 1.5, 200), np.linspace(-2.5, 3, 200))
  z = r**2 + args.k * (r - t + args.a * np.sin(args.omega * r)) ** 2
  fig, ax = plt.subplots(figsize=(7, 6))
  ax.contour(r, t, np.log10(z + 1e-3), levels=25, cmap="Greys", linewidths=0.6)
  for name, res in results.items():
    traj = np.asarray(res["trajectory"])
    traj = traj[np.all(np.isfinite(traj), axis=1)]
    ax.plot(traj[:, 0], traj[:, 1], lw=1.2, label=f"{name} (lr {res['lr']:g})")
  ax.plot(*TOY_START, "ko")
  ax.plot(0, 0, "k*", ms=12)
  ax.set(xlim=(-4, 1.5), ylim=(-2.5, 3), xlabel="r", ylabel="θ",
         title=f"ψ(r, θ) = r² + {args.k:g}(r − θ + {args.a:g} sin({args.omega:g} r))²")
  ax.legend(fontsize=8)
  fig.savefig(path, dpi=120, bbox_inches="tight")


# ---------------------------------------------------------------------------------------------
# (b) A tiny byte-level language model on PTB
# ---------------------------------------------------------------------------------------------


def matrix_view(path: tuple, shape: tuple) -> tuple[tuple, str]:
  """How the optimizers see one parameter of the tiny model: ``(view shape, label)``.

  Kernels become stacks of ``[fan_in, fan_out]`` matrices over the layer axis (q/k/v
  ``[L, d, H, Dh] -> [L, d, H·Dh]``, o ``[L, H, Dh, d] -> [L, H·Dh, d]``); norm scales
  (``[L, d]``) and the embedding go to Adam, as is usual for Muon.
  """
  if path[-1] != "kernel":
    return shape, "vector"
  if len(shape) == 4 and path[-2] == "o":
    return (shape[0], shape[1] * shape[2], shape[3]), "matrix"
  if len(shape) == 4:
    return (shape[0], shape[1], shape[2] * shape[3]), "matrix"
  return shape, "matrix"


def lm_optimizers(steps: int, labels: dict) -> dict:
  """name -> optax transformation, all with a warmup-cosine schedule of the same shape."""
  def sched(peak):
    return optax.warmup_cosine_decay_schedule(0.0, peak, max(steps // 20, 1), steps)

  return {
      "AdamW": optax.adamw(sched(3e-3), weight_decay=0.01),
      "Muon": optim.nonlinear_output(sched(0.02), adam_learning_rate=sched(3e-3),
                                     param_labels=labels),
      # M3 divides the orthogonalised momenta by √V element-wise, so its rate is on another
      # scale from Muon's; 3e-4 and DMGD's 0.3 were the best of a 120-step sweep on seed 0.
      "M3": optim.m3(sched(3e-4), slow_period=20, beta1=0.05, decay1=0.95, beta2=0.001,
                     decay2=0.999, beta3=0.05, decay3=0.95, alpha=0.5,
                     adam_learning_rate=sched(3e-3), param_labels=labels),
      "DMGD": optim.deep_momentum(sched(0.3), beta=0.9, inner_lr=0.05, hidden=16),
  }


def load_bytes(path: str) -> np.ndarray:
  with open(path, "rb") as f:
    return np.frombuffer(f.read(), np.uint8)


def batch_at(data: np.ndarray, index: int, batch: int, seq: int, seed: int) -> np.ndarray:
  """Batch ``index``: ``[batch, seq + 1]`` windows at offsets that are a pure function of both."""
  rng = np.random.default_rng([seed, index])
  starts = rng.integers(0, len(data) - seq - 1, size=batch)
  return np.stack([data[s:s + seq + 1] for s in starts]).astype(np.int32)


def tiny_lm(seed: int):
  """The tiny transformer as ``(loss_fn(params, tokens), params, labels)`` over a flat dict of
  matrix views (``matrix_view``)."""
  from flax import nnx, traverse_util  # pylint: disable=g-import-not-at-top
  from nlx import configs  # pylint: disable=g-import-not-at-top
  from nlx.nn import build_model  # pylint: disable=g-import-not-at-top

  cfg = configs.load(os.path.join(study.REPO, "configs", "transformer.py:tiny"))
  graphdef, state = nnx.split(build_model(cfg.model, rngs=nnx.Rngs(seed)), nnx.Param)
  flat = traverse_util.flatten_dict(nnx.to_pure_dict(state))
  views = {"/".join(map(str, k)): (k, v.shape) + matrix_view(k, v.shape)
           for k, v in flat.items()}
  params = {name: jnp.reshape(flat[k], view) for name, (k, _, view, _) in views.items()}
  labels = {name: label for name, (_, _, _, label) in views.items()}

  def loss_fn(p, tokens):
    pure = traverse_util.unflatten_dict(
        {k: jnp.reshape(p[name], shape) for name, (k, shape, _, _) in views.items()})
    st = jax.tree.map(lambda x: x, state)
    nnx.replace_by_pure_dict(st, pure)
    logits = nnx.merge(graphdef, st)(tokens[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

  return loss_fn, params, labels


def run_lm_once(name: str, tx, seed: int, train, valid, args, model) -> dict:
  """Train one model from ``model = (loss_fn, params)`` with tx; per-step losses, valid loss.

  The step is nlx's one train step, ``apply_gradients`` (``nlx.train.fit`` takes an ``nnx``
  model; these parameters are matrix views of one, a flat dict). A step whose loss, gradients or
  parameters are not finite is skipped (``skipped``).
  """
  loss_fn, params = model
  step = jax.jit(lambda p, s, tokens: apply_gradients(loss_fn, tx, p, s, tokens))
  evaluate = jax.jit(loss_fn)
  state = tx.init(params)
  losses, finite = [], []
  start = time.time()
  for i in range(args.steps):
    up = step(params, state, batch_at(train, i, args.batch, args.seq, seed))
    params, state = up.params, up.opt_state
    losses.append(float(up.loss))
    finite.append(bool(up.finite))
  valid_loss = float(np.mean([evaluate(params, batch_at(valid, i, args.batch, args.seq, 10**6))
                              for i in range(args.eval_batches)]))
  seconds = time.time() - start
  print(f"lm {name:6s} seed {seed} train {np.mean(losses[-20:]):.4f} valid {valid_loss:.4f} "
        f"({seconds:.0f}s)", flush=True)
  return {"losses": losses, "valid": valid_loss, "seconds": seconds,
          "skipped": len(finite) - sum(finite)}


def ptb_dir(data) -> str:
  """The directory of ``ptb.{train,valid}.txt``: ``<data>/ptb`` (or ``<data>`` itself), ``data``
  the ``--data`` value (None: ``$NLX_DATA``); ``study.DataNotFound`` (one line) if absent."""
  root, source = study.data_root(data, PTB)
  for directory in (os.path.join(root, "ptb"), root):
    if all(os.path.isfile(os.path.join(directory, f)) for f in PTB_FILES):
      return directory
  missing = next(f for f in PTB_FILES if not os.path.isfile(os.path.join(root, "ptb", f)))
  raise study.missing_data(root, source, os.path.join(root, "ptb", missing), PTB)


def run_lm(args) -> dict:
  directory = ptb_dir(args.data)
  train = load_bytes(os.path.join(directory, "ptb.train.txt"))
  valid = load_bytes(os.path.join(directory, "ptb.valid.txt"))
  results = {}
  for seed in range(args.seeds):
    loss_fn, params, labels = tiny_lm(seed)
    for name, tx in lm_optimizers(args.steps, labels).items():
      results.setdefault(name, []).append(
          run_lm_once(name, tx, seed, train, valid, args, (loss_fn, params)))
  return results


def mean_ci(values) -> tuple[float, float]:
  """Mean and the half-width of a normal-approximation 95% interval (1.96 standard errors)."""
  v = np.asarray(values, np.float64)
  half = 1.96 * v.std(ddof=1) / np.sqrt(len(v)) if len(v) > 1 else float("nan")
  return float(v.mean()), float(half)


def plot_lm(results: dict, path: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for name, runs in results.items():
    curves = np.asarray([r["losses"] for r in runs])
    kernel = np.ones(10) / 10
    smooth = np.asarray([np.convolve(c, kernel, mode="valid") for c in curves])
    x = np.arange(smooth.shape[1]) + 10
    ax.plot(x, smooth.mean(0), label=name)
    ax.fill_between(x, smooth.min(0), smooth.max(0), alpha=0.2)
  ax.set(xlabel="step", ylabel="train loss (nats/byte, 10-step mean)", yscale="log",
         title="tiny transformer on PTB bytes (min-max over seeds)")
  ax.legend()
  fig.savefig(path, dpi=120, bbox_inches="tight")


def write_tables(toy: dict | None, lm: dict | None, args, path: str) -> None:
  lines = []
  if toy is not None:
    lines += [f"Toy ψ (k={args.k:g}, a={args.a:g}, ω={args.omega:g}), steps until ψ stays "
              f"< {args.tol:g} (max {args.toy_steps}), best learning rate of {list(TOY_LRS)}", "",
              "| optimizer | lr | steps to tol | final ψ |", "|---|---|---|---|"]
    for name, res in toy.items():
      n = res["steps_to_tol"]
      lines.append(f"| {name} | {res['lr']:g} | {'not reached' if n is None else n} | "
                   f"{res['final_psi']:.2e} |")
    lines.append("")
  if lm is not None:
    lines += [f"Tiny LM, {args.steps} steps, batch {args.batch}x{args.seq} bytes, "
              f"{args.seeds} seeds: mean ± 95% half-width (normal approximation)", "",
              "| optimizer | train loss (last 20 steps) | valid loss | seconds per run |",
              "|---|---|---|---|"]
    for name, runs in lm.items():
      tr = mean_ci([np.mean(r["losses"][-20:]) for r in runs])
      va = mean_ci([r["valid"] for r in runs])
      sec = np.mean([r["seconds"] for r in runs])
      lines.append(f"| {name} | {tr[0]:.4f} ± {tr[1]:.4f} | {va[0]:.4f} ± {va[1]:.4f} | "
                   f"{sec:.0f} |")
  with open(path, "w") as f:
    f.write("\n".join(lines) + "\n")
  print("\n".join(lines))


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--part", choices=("toy", "lm", "all"), default="all")
  parser.add_argument("--out", default="runs/optimizers")
  parser.add_argument("--data", default=None, metavar="DIR",
                      help=f"the datasets directory holding ptb/ (default: ${study.DATA_ENV})")
  parser.add_argument("--k", type=float, default=10.0)
  parser.add_argument("--a", type=float, default=0.5)
  parser.add_argument("--omega", type=float, default=3.0)
  parser.add_argument("--tol", type=float, default=1e-3)
  parser.add_argument("--toy_steps", type=int, default=1000)
  parser.add_argument("--steps", type=int, default=300)
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--seq", type=int, default=64)
  parser.add_argument("--seeds", type=int, default=3)
  parser.add_argument("--eval_batches", type=int, default=8)
  args = parser.parse_args(argv)
  os.makedirs(args.out, exist_ok=True)
  start = time.time()
  toy = lm = None
  if args.part in ("lm", "all"):
    ptb_dir(args.data)  # a missing PTB stops the run before any work
  if args.part in ("toy", "all"):
    toy = run_toy(args)
    plot_toy(toy, args, os.path.join(args.out, "toy_trajectories.png"))
  if args.part in ("lm", "all"):
    lm = run_lm(args)
    plot_lm(lm, os.path.join(args.out, "lm_loss_curves.png"))
  write_tables(toy, lm, args, os.path.join(args.out, "optimizers.md"))
  with open(os.path.join(args.out, "optimizers.json"), "w") as f:
    json.dump({"args": vars(args), "toy": toy, "lm": lm, "seconds": time.time() - start}, f)
  print(f"total {time.time() - start:.0f}s")


if __name__ == "__main__":
  main()
