"""Document boundaries (``reset``) in the Pallas kernels of linear attention and the delta rule.

The kernels (GPU Triton with ``interpret=True``, TPU Mosaic with ``pltpu.InterpretParams()``) with
``reset [B, T]`` must equal the chunked XLA form and the token-by-token recurrence of ``nlx.ops``
and the kernels' own algorithm in plain JAX (``reference.py``, differentiated by JAX): outputs,
final state and the gradients of q, k, v, beta, g and initial_state, float32. One batch holds every
case: a boundary at t = 0 (discards initial_state), inside a chunk, at a chunk edge, two in one
chunk, at a chunk's last token, at the last token, none in a row, and T odd (not a multiple of
the chunk). A packed batch must also equal each of its documents run alone (padded into a batch
of their own, through the kernels without boundaries).
"""

import functools
import json
import os
import subprocess
import sys

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from nlx import ops
from nlx.ops import common
from pallas_kernels.chunked_memory import chunk as chunk_lib
from pallas_kernels.chunked_memory import ops as kops
from pallas_kernels.chunked_memory import reference
from pallas_kernels.chunked_memory.lowering import expected_kernels

KINDS = chunk_lib.SEGMENTED_KINDS
B, T, H, DK, DV, C = 3, 37, 2, 16, 32, 16  # chunks [0, 16), [16, 32), [32, 37): T is odd
# Row 0: t = 0, 5 (inside a chunk), 16 (a chunk edge), 20 and 23 (two in one chunk), 36 (the last
# token, in the partial chunk). Row 1: none. Row 2: 15 (a chunk's last token), 32 and 33 (two in
# a row at the start of the partial chunk); rows 1 and 2 start from initial_state.
BOUNDARIES = ((0, 5, 16, 20, 23, 36), (), (15, 32, 33))
RTOL = 1e-4


def make_reset(boundaries=BOUNDARIES, t=T):
  r = np.zeros((len(boundaries), t), bool)
  for row, starts in enumerate(boundaries):
    r[row, list(starts)] = True
  return jnp.asarray(r)


def make_inputs(kind, seed=0):
  """Normalised keys, sigmoid β, small log-decays, a nonzero initial state (float32)."""
  ks = jax.random.split(jax.random.key(seed), 6)
  normal = lambda i, shape: jax.random.normal(ks[i], shape, jnp.float32)
  k = normal(1, (B, T, H, DK))
  x = {"q": normal(0, (B, T, H, DK)), "k": k / jnp.linalg.norm(k, axis=-1, keepdims=True),
       "v": normal(2, (B, T, H, DV)), "g": -0.2 * jax.nn.softplus(normal(3, (B, T, H))),
       "initial_state": 0.3 * normal(4, (B, H, DK, DV))}
  if kind == "delta_rule":
    x["beta"] = jax.nn.sigmoid(normal(5, (B, T, H)))
  return x


def via_kernel(kind, backend, reset):
  return functools.partial(kops.chunked_memory, kind, chunk_size=C, backend=backend,
                           interpret=True, reset=reset)


def via_nlx_ops(kind, impl, reset):
  """``nlx.ops`` (chunked XLA form or recurrence) with the kernels' signature."""

  def run(q, k, v, *, beta=None, g=None, initial_state=None):
    fn = getattr(ops, kind)
    extra = {} if beta is None else {"beta": beta}
    o, s = fn(q, k, v, g=g, initial_state=initial_state, chunk_size=C, impl=impl, reset=reset,
              **extra)
    return o, s, None

  return run


def value_and_grads(fn, x, seed=1):
  """The outputs and the gradients of a fixed random linear functional of them w.r.t. ``x``."""

  @jax.jit
  def run(x):
    out, pull = jax.vjp(lambda x: fn(**x)[:2], x)
    keys = jax.random.split(jax.random.key(seed), len(out))
    weights = tuple(jax.random.normal(key, o.shape).astype(o.dtype) for key, o in zip(keys, out))
    (grads,) = pull(weights)
    return out, grads

  return run(x)


def assert_close(got, want, what, rtol=RTOL):
  """Elementwise rtol, with an absolute floor of rtol·max|want| for entries near zero."""
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  assert np.all(np.isfinite(got)), what
  scale = max(float(np.max(np.abs(want))), 1e-30)
  np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * scale, err_msg=what)


def assert_all_close(got, want, label):
  (out_g, grad_g), (out_w, grad_w) = got, want
  for name, a, b in zip(("o", "final_state"), out_g, out_w):
    assert_close(a, b, f"{label}: {name}")
  assert set(grad_g) == set(grad_w)
  for name in grad_w:
    assert_close(grad_g[name], grad_w[name], f"{label}: d{name}")
    assert float(jnp.max(jnp.abs(grad_w[name]))) > 0, f"{label}: d{name} is identically zero"


@functools.lru_cache(maxsize=None)
def expected(kind):
  """Chunked XLA form, recurrence and the kernels' plain-JAX algorithm, all with reset."""
  x, reset = make_inputs(kind), make_reset()
  ref = functools.partial(reference.chunked_memory_reference, kind, chunk_size=C, reset=reset)
  return {"chunked": value_and_grads(via_nlx_ops(kind, "chunked", reset), x),
          "recurrent": value_and_grads(via_nlx_ops(kind, "recurrent", reset), x),
          "reference": value_and_grads(ref, x)}


# linear_attention's rows are slow (~60 s on GPU, ~25 s on TPU): the packed-batch test and the
# nlx.ops dispatch test below run its segmented phase kernels in the default run, and the delta
# rule's rows both backends' masks.
@pytest.mark.parametrize("kind,backend", [
    pytest.param(kind, backend, marks=pytest.mark.slow
                 if kind == "linear_attention" else ())
    for kind in KINDS for backend in ("gpu", "tpu")])
def test_kernel_with_reset_matches_chunked_recurrence_and_reference(kind, backend):
  x, reset = make_inputs(kind), make_reset()
  got = value_and_grads(via_kernel(kind, backend, reset), x)
  assert got[0][0].dtype == jnp.float32
  for name, want in expected(kind).items():
    assert_all_close(got, want, f"{kind} {backend} vs {name}")
  # Row 0 resets at t = 0: its initial state reaches nothing; the others' does.
  d_s0 = np.asarray(got[1]["initial_state"])
  assert not np.any(d_s0[0]) and np.all(np.any(d_s0[1:] != 0, axis=(1, 2, 3)))
  # The boundaries matter: the recurrence without them is far from the result.
  o_plain = via_nlx_ops(kind, "recurrent", None)(**x)[0]
  assert float(jnp.max(jnp.abs(o_plain - got[0][0]))) > 1e-2


def documents_alone(kind, backend):
  """Every document of every row run alone through the kernels WITHOUT reset, put back in place.

  The documents are the rows of one call, each padded at its end to T tokens with zero q, k, v
  and log-decay (tokens that leave the state as it is), from a zero initial state (its row's
  ``initial_state`` for a first document that does not reset at t = 0). A function of the
  packed inputs, so its gradients are comparable with the packed call's.
  """
  docs = []
  for row, starts in enumerate(BOUNDARIES):
    edges = sorted(set((0,) + starts + (T,)))
    docs += [(row, lo, hi, lo == 0 and 0 not in starts) for lo, hi in zip(edges[:-1], edges[1:])]

  def run(q, k, v, *, beta=None, g=None, initial_state=None):
    seqs = {"q": q, "k": k, "v": v, "g": g, "beta": beta}
    pad = lambda x, row, lo, hi: jnp.pad(x[row, lo:hi], [(0, T - hi + lo)] + [(0, 0)] *
                                         (x.ndim - 2))
    batch = {name: jnp.stack([pad(x, row, lo, hi) for row, lo, hi, _ in docs])
             for name, x in seqs.items() if x is not None}
    batch["initial_state"] = jnp.stack([initial_state[row] * keep for row, _, _, keep in docs])
    o, s, _ = via_kernel(kind, backend, None)(**batch)
    outs = [jnp.concatenate([o[i, :hi - lo] for i, (r, lo, hi, _) in enumerate(docs) if r == row])
            for row in range(B)]
    last = [max(i for i, d in enumerate(docs) if d[0] == row) for row in range(B)]
    return jnp.stack(outs), s[jnp.asarray(last)], None

  return run


@pytest.mark.parametrize("kind,backend", [
    ("linear_attention", "gpu"), ("delta_rule", "gpu"),
    pytest.param("delta_rule", "tpu", marks=pytest.mark.slow)])
def test_packed_batch_equals_documents_alone(kind, backend):
  x = make_inputs(kind, seed=2)
  got = value_and_grads(via_kernel(kind, backend, make_reset()), x)
  want = value_and_grads(documents_alone(kind, backend), x)
  assert_all_close(got, want, f"{kind} {backend} packed vs documents alone")


def test_no_reset_all_false_int_reset_and_non_finite_initial_state():
  """All-false reset is no reset; 0/1 integers are booleans; a reset at t = 0 discards even a
  non-finite initial state (replaced, not multiplied by zero)."""
  x = make_inputs("delta_rule", seed=3)
  plain = via_kernel("delta_rule", "gpu", None)(**x)
  all_false = via_kernel("delta_rule", "gpu", jnp.zeros((B, T), bool))(**x)
  for a, b, name in zip(plain[:2], all_false[:2], ("o", "state")):
    assert_close(b, a, f"all-false reset: {name}", rtol=1e-6)
  reset = make_reset().at[:, 0].set(True)
  bad = dict(x, initial_state=x["initial_state"].at[0].set(jnp.nan).at[1].set(jnp.inf))
  got = via_kernel("delta_rule", "gpu", reset.astype(jnp.int32))(**bad)
  want = via_kernel("delta_rule", "gpu", reset)(**dict(x, initial_state=None))
  for a, b, name in zip(got[:2], want[:2], ("o", "state")):
    assert_close(a, b, f"non-finite initial state: {name}", rtol=1e-6)


def _pallas_calls(fn, *args):
  """The ``pallas_call`` equations of ``fn``'s forward + backward jaxpr."""
  loss = lambda *a: sum(jnp.sum(o) for o in fn(*a)[:2])
  jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2)))(*args).jaxpr
  found = []

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == "pallas_call":
        found.append(eqn)
      for sub in jax.extend.core.jaxprs_in_params(eqn.params):
        walk(sub)

  walk(jaxpr)
  return found


def test_reset_adds_no_kernel_input_and_none_adds_no_mask():
  """With reset the kernels take the same operands (the boundaries ride in the gates' spare
  channel); without it their bodies are smaller (no segment masks compiled in)."""
  x = make_inputs("linear_attention")
  args = (x["q"], x["k"], x["v"])
  for backend in ("gpu", "tpu"):
    with_reset = _pallas_calls(lambda *a: via_kernel("linear_attention", backend, make_reset())(
        *a, g=x["g"]), *args)
    without = _pallas_calls(lambda *a: via_kernel("linear_attention", backend, None)(
        *a, g=x["g"]), *args)
    # Every kernel of the forward and backward passes (linear attention: four phase kernels).
    assert len(with_reset) == len(without) == len(expected_kernels("linear_attention")), backend
    for a, b in zip(with_reset, without):
      assert len(a.invars) == len(b.invars), backend
      assert len(str(a.params["jaxpr"])) > len(str(b.params["jaxpr"])), backend


@pytest.mark.parametrize("kind", KINDS)
def test_nlx_ops_pallas_and_auto_take_reset(kind, monkeypatch):
  """impl="pallas" with reset runs the kernels; "auto" on an accelerator hands reset to them."""
  x = make_inputs(kind, seed=4)
  reset = make_reset()
  want = via_nlx_ops(kind, "chunked", reset)(**x)
  got = via_nlx_ops(kind, "pallas", reset)(**x)
  for a, b, name in zip(got[:2], want[:2], ("o", "state")):
    assert_close(a, b, f"{kind} impl=pallas vs chunked: {name}")
  calls = []
  kernel = kops.chunked_memory

  def spy(*args, **kwargs):  # the GPU kernel, interpreted: the patched backend has no GPU
    calls.append(kwargs)
    return kernel(*args, **dict(kwargs, backend="gpu", interpret=True))

  monkeypatch.setattr(common.jax, "default_backend", lambda: "gpu")
  monkeypatch.setattr(kops, "chunked_memory", spy)
  got = via_nlx_ops(kind, "auto", reset)(**x)
  monkeypatch.undo()
  assert len(calls) == 1 and calls[0]["reset"] is reset
  for a, b, name in zip(got[:2], want[:2], ("o", "state")):
    assert_close(a, b, f"{kind} impl=auto vs chunked: {name}")


Q = jnp.zeros((1, 8, 2, 16))
G = jnp.zeros((1, 8, 2))
R = jnp.zeros((1, 8), bool)


@pytest.mark.parametrize("call,match", [
    (lambda: kops.chunked_memory("titans", Q, Q, Q, beta=G, reset=R, fresh=G),
     r"fresh must have shape \[B, T\] = \(1, 8\); got \(1, 8, 2\)"),
    (lambda: kops.chunked_memory("linear_attention", Q, Q, Q, reset=R[:, :4]),
     r"reset must have shape \[B, T\] = \(1, 8\); got \(1, 4\)"),
    (lambda: kops.chunked_memory("linear_attention", Q, Q, Q, reset=G),
     r"reset must have shape \[B, T\] = \(1, 8\); got \(1, 8, 2\)"),
    (lambda: kops.chunked_memory("delta_rule", Q, Q, Q, beta=G, reset=R.astype(jnp.float32)),
     r"reset must be a bool or integer array; got dtype float32"),
    (lambda: common.resolve_impl("pallas", "titans", Q, Q, Q, 16, common.reset_reason(R)),
     r"not supported by the kernels for kind=None"),
])
def test_bad_reset_is_refused_by_name(call, match):
  with pytest.raises(ValueError, match=match):
    call()


def test_reset_reason():
  assert common.reset_reason(None) is None and common.reset_reason(None, "titans") is None
  assert common.reset_reason(R, "linear_attention") is None
  assert common.reset_reason(R, "delta_rule") is None
  assert common.reset_reason(R, "titans") is None
  assert "kind='mamba2'" in common.reset_reason(R, "mamba2")


def lower(*args):
  """``python -m pallas_kernels.chunked_memory.lowering`` in a child process (libtpu there)."""
  env = dict(os.environ, ALLOW_MULTIPLE_LIBTPU_LOAD="1")
  proc = subprocess.run([sys.executable, "-m", "pallas_kernels.chunked_memory.lowering", *args],
                        capture_output=True, text=True, timeout=600, env=env)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


def test_tpu_kernels_with_reset_compile_ahead_of_time():
  """Forward and backward Mosaic kernels with reset compile for a v5e topology, taking as many
  operands as without reset."""
  results = lower("tpu", "v5e:2x2", "--reset")
  plain = {r["kind"]: r for r in lower("tpu", "v5e:2x2")}
  assert [r["kind"] for r in results] == list(kops.RESET_KINDS)
  for r in results:
    assert r["reset"] and r["chips"] == 4 and r["device_kind"] == "TPU v5 lite", r
    assert r["mosaic_custom_calls"] == len(expected_kernels(r["kind"])), r
    assert r["kernels"] == expected_kernels(r["kind"])
    assert r["cost_analysis"]["flops"] > 1e8, r["cost_analysis"]
    assert len(r["kernel_operands"]) == len(expected_kernels(r["kind"]))
    assert r["kernel_operands"] == plain[r["kind"]]["kernel_operands"], (r, plain[r["kind"]])


def test_gpu_kernels_with_reset_lower_to_triton_for_cuda():
  results = lower("gpu", "--reset")
  assert [r["kind"] for r in results] == list(kops.RESET_KINDS)
  for r in results:
    assert r["reset"] and r["platforms"] == ["cuda"]
    assert r["triton_custom_calls"] == len(expected_kernels(r["kind"])), r
    assert r["kernels"] == expected_kernels(r["kind"])
