"""The Pallas kernels, run in interpret mode on CPU, against reference.py and the nlx.ops recurrence.

Both kernels run: the GPU (Triton) kernel with ``interpret=True`` and the TPU (Mosaic) kernel with
``pltpu.InterpretParams()``. Every check covers the outputs, the final state(s) and the gradients
of q, k, v, beta/lr, g, momentum and the initial state(s), through the kernels' ``custom_vjp``
(the backward kernel), against ``reference.chunked_memory_reference`` (plain JAX, autodiff) and
against the token-by-token recurrence of ``nlx.ops`` (``impl="recurrent"``).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nlx import ops
from pallas_kernels.chunked_memory import ops as kops
from pallas_kernels.chunked_memory import reference
from pallas_kernels.chunked_memory.chunk import KINDS

# Which gates each kind takes (beta is titans' inner learning rate).
GATES = {"linear_attention": ("g",), "delta_rule": ("beta", "g"),
         "titans": ("beta", "g", "momentum")}


def make_inputs(kind, b, t, h, dk, dv, seed=0):
  """Realistic inputs (normalised keys, sigmoid gates, small log-decays) as float32 arrays."""
  ks = jax.random.split(jax.random.key(seed), 8)
  normal = lambda i, shape: jax.random.normal(ks[i], shape, jnp.float32)
  k = normal(1, (b, t, h, dk))
  x = {"q": normal(0, (b, t, h, dk)), "k": k / jnp.linalg.norm(k, axis=-1, keepdims=True),
       "v": normal(2, (b, t, h, dv)), "initial_state": 0.3 * normal(6, (b, h, dk, dv))}
  x["g"] = -0.2 * jax.nn.softplus(normal(4, (b, t, h)))
  if "beta" in GATES[kind]:
    x["beta"] = jax.nn.sigmoid(normal(3, (b, t, h))) * (0.5 if kind == "titans" else 1.0)
  if kind == "titans":
    x["momentum"] = jax.nn.sigmoid(normal(5, (b, t, h)))
    x["initial_momentum"] = 0.3 * normal(7, (b, h, dk, dv))
  return x


def via_kernel(kind, chunk, backend, block_sizes=None):
  return functools.partial(kops.chunked_memory, kind, chunk_size=chunk, backend=backend,
                           interpret=True, block_sizes=block_sizes)


def via_reference(kind, chunk):
  return functools.partial(reference.chunked_memory_reference, kind, chunk_size=chunk)


def via_recurrence(kind, chunk):
  """nlx.ops's token-by-token reference with the kernel's signature."""

  def run(q, k, v, *, beta=None, g=None, momentum=None, initial_state=None,
          initial_momentum=None):
    if kind == "linear_attention":
      o, s = ops.linear_attention(q, k, v, g=g, initial_state=initial_state, impl="recurrent")
      return o, s, None
    if kind == "delta_rule":
      o, s = ops.delta_rule(q, k, v, beta=beta, g=g, initial_state=initial_state, impl="recurrent")
      return o, s, None
    o, st = ops.titans_memory(q, k, v, lr=beta, momentum=momentum, g=g,
                              initial_state=ops.TitansState(initial_state, initial_momentum),
                              chunk_size=chunk, impl="recurrent")
    return o, st.memory, st.momentum

  return run


def value_and_grads(fn, x, seed=1):
  """``(outputs, grads)``: the outputs and the gradients of a fixed random linear functional of
  them (float32 weights) w.r.t. every input; one jitted forward + backward."""

  @jax.jit
  def run(x):
    out, pull = jax.vjp(lambda x: fn(**x), x)
    weights = tuple(None if o is None else
                    jax.random.normal(jax.random.key(seed + i), o.shape).astype(o.dtype)
                    for i, o in enumerate(out))
    (grads,) = pull(weights)
    return out, grads

  return run(x)


@functools.lru_cache(maxsize=None)
def expected(kind, chunk, b, t, h, dk, dv, seed):
  """Reference and recurrence results for ``make_inputs(...)``, shared by both backends."""
  x = make_inputs(kind, b, t, h, dk, dv, seed)
  return (value_and_grads(via_reference(kind, chunk), x),
          value_and_grads(via_recurrence(kind, chunk), x))


def assert_close(got, want, rtol, what):
  """Elementwise rtol, with an absolute floor of rtol·max|want| for entries near zero."""
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  scale = max(float(np.max(np.abs(want))), 1e-30)
  np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * scale, err_msg=what)


def assert_all_close(got, want, rtol, label):
  (out_g, grad_g), (out_w, grad_w) = got, want
  for name, a, b in zip(("o", "final_state", "final_momentum"), out_g, out_w):
    assert (a is None) == (b is None), name
    if a is not None:
      assert_close(a, b, rtol, f"{label}: {name}")
  assert set(grad_g) == set(grad_w)
  for name in grad_w:
    assert_close(grad_g[name], grad_w[name], rtol, f"{label}: d{name}")
    assert float(jnp.max(jnp.abs(grad_w[name]))) > 0, f"{label}: d{name} is identically zero"


@pytest.mark.parametrize("backend", ["gpu", "tpu"])
@pytest.mark.parametrize("kind", KINDS)
def test_kernel_float32_matches_reference_and_recurrence(kind, backend):
  # T = 37 is not a multiple of the chunk (16); H = 1.
  x = make_inputs(kind, 2, 37, 1, 16, 64)
  # TPU phase kernels: head-strided tiles and all three chunks (the last one padded) in one step.
  blocks = (kops.BlockSizes(head_strided=True, chunks_per_step=3)
            if backend == "tpu" and kind in kops.PHASED_KINDS else None)
  got = value_and_grads(via_kernel(kind, 16, backend, blocks), x)
  assert got[0][0].dtype == jnp.float32 and got[0][1].dtype == jnp.float32
  want_reference, want_recurrence = expected(kind, 16, 2, 37, 1, 16, 64, 0)
  assert_all_close(got, want_reference, 1e-4, "vs reference")
  assert_all_close(got, want_recurrence, 1e-4, "vs recurrence")


SLOW = pytest.mark.slow  # the default run keeps one case per feature (~13 s of interpretation each)


@pytest.mark.parametrize("kind,backend,dk,dv,block_v", [
    ("delta_rule", "gpu", 16, 128, None),     # V split into two 64-wide programs (GPU default)
    pytest.param("titans", "gpu", 128, 16, None, marks=SLOW),
    pytest.param("linear_attention", "tpu", 64, 64, None, marks=SLOW),
    ("delta_rule", "tpu", 128, 128, 64),      # V split on TPU too, head-strided, 2 chunks a step
    pytest.param("titans", "tpu", 64, 128, None, marks=SLOW),
])
def test_kernel_head_dims(kind, backend, dk, dv, block_v):
  x = make_inputs(kind, 1, 40, 2, dk, dv, seed=3)
  blocks = kops.BlockSizes(block_v=block_v)
  if backend == "tpu" and kind in kops.PHASED_KINDS:
    blocks = kops.BlockSizes(block_v=block_v, head_strided=True)
  got = value_and_grads(via_kernel(kind, 32, backend, blocks), x)
  assert_all_close(got, value_and_grads(via_reference(kind, 32), x), 1e-4, f"K={dk} V={dv}")


@SLOW  # ~25-40 s each; the default run covers the same tiling in the two tests above
@pytest.mark.parametrize("kind", kops.PHASED_KINDS)
@pytest.mark.parametrize("blocks", [
    kops.BlockSizes(head_strided=True, chunks_per_step=2),
    kops.BlockSizes(head_strided=True, block_v=16, chunks_per_step=1),
    kops.BlockSizes(head_strided=False, chunks_per_step=4)], ids=["strided-2", "strided-v16",
                                                                   "transposed-4"])
def test_tpu_tiling_head_strided_and_chunks_per_step(kind, blocks):
  """TPU phase kernels, H = 3, T = 120 (8 chunks of 16, the last one padded), K = 16, V = 32."""
  x = make_inputs(kind, 2, 120, 3, 16, 32, seed=4)
  got = value_and_grads(via_kernel(kind, 16, "tpu", blocks), x)
  assert_all_close(got, value_and_grads(via_reference(kind, 16), x), 1e-4, str(blocks))


def test_tiling_options_are_checked():
  x = make_inputs("delta_rule", 1, 40, 1, 16, 16)
  with pytest.raises(ValueError, match="chunks_per_step=2 does not divide the 3 chunks"):
    via_kernel("delta_rule", 16, "tpu", kops.BlockSizes(chunks_per_step=2))(**x)
  with pytest.raises(ValueError, match="for the TPU kernels"):
    via_kernel("delta_rule", 16, "gpu", kops.BlockSizes(head_strided=True))(**x)
  with pytest.raises(ValueError, match="chunks_per_step=2 does not divide the 3 chunks"):
    via_kernel("titans", 16, "tpu", kops.BlockSizes(chunks_per_step=2))(**make_inputs(
        "titans", 1, 40, 1, 16, 16))


def test_gpu_launch_table_has_every_kind_and_shape_class():
  # ops.GPU_TABLE (chosen by sm_90 compile statistics, docs/KERNELS.md "GPU"): every kind has the
  # classes 32, 64, 128 and 256, each kernel of the kind has a launch, and the blocks are legal.
  from pallas_kernels.chunked_memory.lowering import PHASE_KERNELS
  assert kops.GPU_CLASSES == (32, 64, 128, 256)
  for kind in kops.PHASED_KINDS:
    assert tuple(sorted(kops.GPU_TABLE[kind])) == kops.GPU_CLASSES
    for head, entry in kops.GPU_TABLE[kind].items():
      assert set(entry.launch) == set(PHASE_KERNELS[kind]), (kind, head)
      assert entry.grad_block_v <= entry.block_v <= min(head, 64), (kind, head)
      assert all(w in (4, 8) and st in (1, 2) for w, st in entry.launch.values())
  # A head uses the nearest class at or above it (padded K, V of 24 -> 32; 200 -> 256).
  for head, cls in ((16, 32), (32, 32), (48, 64), (128, 128), (200, 256), (256, 256)):
    assert kops.shape_class(head) == cls
  entry = kops.GPU_TABLE["titans"][256]
  got = kops.BlockSizes().resolve("gpu", 256, "titans", 256)
  assert (got.block_v, got.grad_block_v) == (entry.block_v, entry.grad_block_v)
  got = kops.BlockSizes(grad_block_v=16).resolve("gpu", 64, "delta_rule", 64)
  assert got.grad_block_v == 16
  with pytest.raises(ValueError, match="grad_block_v=24"):
    kops.BlockSizes(grad_block_v=24).resolve("gpu", 64, "delta_rule", 64)


def test_gpu_launch_table_follows_its_rule_on_the_recorded_statistics():
  # The table is ptx.choose applied to the recorded sm_90 statistics (sm90_stats.jsonl, the
  # output of the ptx commands in docs/KERNELS.md): no entry was picked by hand.
  import json, pathlib  # pylint: disable=g-import-not-at-top,multiple-imports
  from pallas_kernels.chunked_memory import ptx
  path = pathlib.Path(ptx.__file__).with_name("sm90_stats.jsonl")
  rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
  for kind in kops.PHASED_KINDS:
    for head, entry in kops.GPU_TABLE[kind].items():
      got = ptx.choose(rows, kind, head)
      assert (got["block_v"], got["grad_block_v"]) == (entry.block_v, entry.grad_block_v), (
          kind, head)
      assert {p: tuple(c) for p, c in got["launch"].items()} == entry.launch, (kind, head)


def relative_rmse(got, want):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return float(np.sqrt(np.mean((got - want) ** 2) / np.mean(want**2)))


# All GPU rows are slow (~35 s each): test_pallas_precision's default row checks the GPU delta
# rule in bfloat16 against the float64 recurrence, forward and gradients.
@pytest.mark.parametrize("kind,backend", [
    pytest.param(kind, "gpu", marks=SLOW) for kind in KINDS] + [("delta_rule", "tpu")])
def test_kernel_bfloat16(kind, backend):
  """bfloat16 q, k, v: forward within 5e-3 and gradients within 1e-2 relative RMSE of float32."""
  x32 = make_inputs(kind, 2, 50, 2, 64, 64, seed=5)
  x16 = {name: (a.astype(jnp.bfloat16) if name in ("q", "k", "v") else a)
         for name, a in x32.items()}
  # The float32 reference sees exactly the bfloat16-rounded inputs.
  x_ref = {name: a.astype(jnp.float32) for name, a in x16.items()}
  (out, grads) = value_and_grads(via_kernel(kind, 16, backend), x16)
  (out_ref, grads_ref) = value_and_grads(via_reference(kind, 16), x_ref)
  assert out[0].dtype == jnp.bfloat16 and out[1].dtype == jnp.float32
  assert grads["q"].dtype == jnp.bfloat16
  for name, a, b in zip(("o", "final_state", "final_momentum"), out, out_ref):
    if b is not None:
      assert relative_rmse(a, b) <= 5e-3, (name, relative_rmse(a, b))
  for name in grads_ref:
    assert relative_rmse(grads[name], grads_ref[name]) <= 1e-2, (name, relative_rmse(grads[name],
                                                                                  grads_ref[name]))


def test_nlx_ops_dispatch_pallas_and_auto():
  """impl="pallas" runs the kernel from nlx.ops (interpreted on CPU); "auto" is the XLA form on CPU."""
  x = make_inputs("titans", 1, 20, 2, 16, 16, seed=7)
  q, k, v = x["q"], x["k"], x["v"]
  pairs = [
      lambda impl: ops.linear_attention(q, k, v, g=x["g"], initial_state=x["initial_state"],
                                        impl=impl, chunk_size=16),
      lambda impl: ops.delta_rule(q, k, v, beta=x["beta"], g=x["g"], impl=impl, chunk_size=16),
      lambda impl: ops.titans_memory(q, k, v, lr=x["beta"], momentum=x["momentum"], g=x["g"],
                                     impl=impl, chunk_size=16),
  ]
  for run in pairs:
    got, want = run("pallas"), run("recurrent")
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      assert_close(a, b, 1e-4, "nlx.ops pallas vs recurrent")
    assert "pallas_call" in str(jax.make_jaxpr(lambda: run("pallas"))())
    assert "pallas_call" not in str(jax.make_jaxpr(lambda: run("auto"))())


def test_continuation_across_calls():
  """final state (and momentum) of the first half, as initial state of the second: one call."""
  x = make_inputs("titans", 1, 48, 2, 16, 32, seed=9)
  run = via_kernel("titans", 16, "gpu")
  whole = run(**x)
  states = ("initial_state", "initial_momentum")
  seqs = {n: a for n, a in x.items() if n not in states}  # [B, T, ...]: split along T
  first = run(**{n: a[:, :32] for n, a in seqs.items()}, **{n: x[n] for n in states})
  second = run(**{n: a[:, 32:] for n, a in seqs.items()}, initial_state=first[1],
               initial_momentum=first[2])
  assert_close(jnp.concatenate([first[0], second[0]], axis=1), whole[0], 1e-5, "o")
  assert_close(second[1], whole[1], 1e-5, "state")
  assert_close(second[2], whole[2], 1e-5, "momentum")


Q = jnp.zeros((1, 8, 2, 16))
G = jnp.zeros((1, 8, 2))


@pytest.mark.parametrize("call,match", [
    (lambda: kops.chunked_memory("gla", Q, Q, Q), r"kind='gla' is not one of"),
    (lambda: kops.chunked_memory("linear_attention", np.zeros(Q.shape, np.float64), Q, Q),
     r"q has dtype float64; the kernels take float32 or bfloat16"),
    (lambda: kops.chunked_memory("linear_attention", Q.astype(jnp.float16), Q, Q),
     r"q has dtype float16"),
    (lambda: kops.chunked_memory("linear_attention", jnp.zeros((1, 8, 2, 300)),
                                 jnp.zeros((1, 8, 2, 300)), Q),
     r"head dim K=300 is not supported by the kernels; allowed: 1 to 256"),
    (lambda: kops.chunked_memory("linear_attention", Q, Q, jnp.zeros((1, 8, 2, 257))),
     r"head dim V=257"),
    (lambda: kops.chunked_memory("linear_attention", Q, Q, Q, chunk_size=20),
     r"chunk_size=20 is not supported by the kernels"),
    (lambda: kops.chunked_memory("delta_rule", Q, Q, Q), r"kind='delta_rule' needs beta"),
    (lambda: kops.chunked_memory("linear_attention", Q, Q, Q, beta=G), r"takes no beta"),
    (lambda: kops.chunked_memory("delta_rule", Q, Q, Q, beta=G, momentum=G),
     r"momentum is only for kind='titans'"),
    (lambda: kops.chunked_memory("delta_rule", Q, Q, Q, beta=G[:, :4]),
     r"beta must have shape \[B, T, H\] = \(1, 8, 2\); got \(1, 4, 2\)"),
    (lambda: kops.chunked_memory("titans", Q, Q, Q, beta=G, initial_state=jnp.zeros((1, 2, 16))),
     r"initial_state must have shape \[B, H, K, V\] = \(1, 2, 16, 16\)"),
    (lambda: kops.chunked_memory("linear_attention", Q, Q, Q, backend="cuda"),
     r"backend='cuda' is not one of \('gpu', 'tpu'\)"),
    (lambda: kops.chunked_memory("linear_attention", Q, Q, Q,
                                 block_sizes=kops.BlockSizes(block_v=32)),
     r"block_sizes.block_v=32 is not supported for V=16"),
    (lambda: kops.chunked_memory("linear_attention", Q, Q, Q,
                                 block_sizes=kops.BlockSizes(num_warps=0)),
     r"block_sizes.num_warps=0"),
])
def test_bad_arguments_are_refused_by_name(call, match):
  with pytest.raises(ValueError, match=match):
    call()
