"""Document boundaries in the Titans kernels: ``reset``, ``fresh`` and ``live``.

The contract (``pallas_kernels.chunked_memory.ops``' docstring) as a plain Python loop over the
tokens of every (batch, head): at a reset the memory and the momentum are zero; a token takes
its gradient at the zero state when a reset precedes it in its kernel chunk or it is ``fresh``,
else at its kernel chunk's start state; a placeholder (``live`` false) changes nothing. The
kernels (GPU Triton interpreted, TPU Mosaic with ``pltpu.InterpretParams()``) must match the loop's
outputs at live tokens, its final memory and momentum, and the gradients of every input (q, k,
v, β, g, η, both initial states), float32, with and without momentum. The layouts are drawn at
random under the contract's rules (placeholders at chunk tails, one ``fresh`` flag per chunk's
first segment), plus the edge cases: a reset at t = 0, at a chunk edge, two in one chunk, a chunk
of placeholders only, and T not a multiple of the chunk.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.chunked_memory import ops as kops

B, T, H, DK, DV, C = 2, 53, 2, 16, 16, 16  # 4 kernel chunks, the last partial
RTOL = 2e-4


def layout(seed=0):
  """``(reset, fresh, live)`` ``[B, T]`` bool under the contract's rules."""
  rng = np.random.default_rng(seed)
  reset, fresh, live = (np.zeros((B, T), bool) for _ in range(3))
  live[:] = True
  for b in range(B):
    for start in range(0, T, C):
      end = min(start + C, T)
      n_live = end - start if rng.random() < 0.5 else int(rng.integers(0, end - start + 1))
      live[b, start + n_live:end] = False
      fresh[b, start:end] = rng.random() < 0.4
      for t in rng.choice(np.arange(start, start + n_live), size=min(n_live, 2), replace=False):
        if rng.random() < 0.6:
          reset[b, t] = True
  # The edge cases, row 0: a reset at t = 0, at a chunk edge (16), two in one chunk (16, 18);
  # row 1: a chunk of placeholders only (32..47) and a fresh first segment before it.
  reset[0, [0, 16, 18]] = True
  live[0, :32] = True
  live[1, 32:48] = False
  reset[1, 32:48] = False
  live[1, 16:32] = True
  fresh[1, 16:32] = True
  reset[1, 16:32] = False
  return jnp.asarray(reset), jnp.asarray(fresh), jnp.asarray(live)


def inputs(momentum: bool, seed=0):
  ks = jax.random.split(jax.random.key(seed), 9)
  normal = lambda i, shape: jax.random.normal(ks[i], shape, jnp.float32)
  k = normal(1, (B, T, H, DK))
  x = {"q": normal(0, (B, T, H, DK)), "k": k / jnp.linalg.norm(k, axis=-1, keepdims=True),
       "v": normal(2, (B, T, H, DV)), "beta": 0.5 * jax.nn.sigmoid(normal(3, (B, T, H))),
       "g": -0.2 * jax.nn.softplus(normal(4, (B, T, H))),
       "initial_state": 0.3 * normal(5, (B, H, DK, DV))}
  if momentum:
    x["momentum"] = jax.nn.sigmoid(normal(6, (B, T, H)))
    x["initial_momentum"] = 0.3 * normal(7, (B, H, DK, DV))
  return x


def token_loop(reset, fresh, live, q, k, v, *, beta, g, initial_state, momentum=None,
               initial_momentum=None):
  """The contract, token by token (jnp, differentiable): ``(o, memory, momentum or None)``."""
  o = []
  s = initial_state
  p = None if momentum is None else initial_momentum
  zero = jnp.zeros_like(s)
  start = s
  since_reset = np.zeros((B,), bool)
  for t in range(T):
    if t % C == 0:
      start, since_reset = s, np.zeros((B,), bool)
    r = np.asarray(reset[:, t])
    since_reset = since_reset | r
    keep = lambda x: jnp.where(r[:, None, None, None], zero, x)
    s = keep(s)
    p = None if p is None else keep(p)
    at_zero = since_reset | np.asarray(fresh[:, t])
    ref = jnp.where(at_zero[:, None, None, None], zero, start)
    pred = jnp.einsum("bhk,bhkv->bhv", k[:, t], ref)
    write = jnp.einsum("bhk,bhv->bhkv", k[:, t], beta[:, t, :, None] * (v[:, t] - pred))
    a = jnp.exp(g[:, t])[..., None, None]
    if p is None:
      s_new, p_new = a * s + write, None
    else:
      p_new = momentum[:, t][..., None, None] * p + write
      s_new = a * s + p_new
    on = np.asarray(live[:, t])[:, None, None, None]
    s = jnp.where(on, s_new, s)
    p = None if p is None else jnp.where(on, p_new, p)
    o.append(jnp.einsum("bhk,bhkv->bhv", q[:, t], s))
  return jnp.stack(o, 1), s, p


def value_and_grads(fn, x, live, seed=1):
  """Outputs at live tokens, end states, and the gradients of a random functional of them."""
  ks = jax.random.split(jax.random.key(seed), 3)
  mask = jnp.asarray(live)[:, :, None, None]

  def loss(x):
    o, s, p = fn(**x)
    total = jnp.sum(mask * o * jax.random.normal(ks[0], o.shape))
    total += jnp.sum(s * jax.random.normal(ks[1], s.shape))
    if p is not None:
      total += jnp.sum(p * jax.random.normal(ks[2], p.shape))
    return total, (jnp.where(mask, o, 0.0), s, p)

  (_, outs), grads = jax.value_and_grad(loss, has_aux=True)(x)
  return outs, grads


def _close(a, b, what):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  scale = max(np.max(np.abs(b)), 1e-6)
  err = np.max(np.abs(a - b)) / scale
  assert err < RTOL, f"{what}: relative error {err:.2e}"


# By default only the TPU kernels with momentum (the backends share titans_phases.Segments, and
# the GPU kernels are compared with the chunked form in the op-level test below); -m slow runs all.
@pytest.mark.parametrize("backend", [pytest.param("gpu", marks=pytest.mark.slow), "tpu"])
@pytest.mark.parametrize("momentum", [pytest.param(False, marks=pytest.mark.slow), True])
def test_titans_kernels_with_boundaries_match_the_token_loop(backend, momentum):
  reset, fresh, live = layout()
  x = inputs(momentum)
  kernel = functools.partial(kops.chunked_memory, "titans", chunk_size=C, backend=backend,
                             interpret=True, reset=reset, fresh=fresh, live=live)
  loop = functools.partial(token_loop, reset, fresh, live)
  got, got_g = value_and_grads(kernel, x, live)
  want, want_g = value_and_grads(loop, x, live)
  for name, a, b in zip(("o", "memory", "momentum"), got, want):
    if b is not None:
      _close(a, b, name)
  for name in x:
    _close(got_g[name], want_g[name], f"d{name}")


def test_titans_kernels_without_flags_cut_gradient_chunks_at_resets():
  """``reset`` alone: every token before a chunk's first reset is stale, every one after fresh."""
  reset, _, _ = layout(seed=3)
  none = jnp.zeros_like(reset)
  x = inputs(True, seed=2)
  got = kops.chunked_memory("titans", **x, chunk_size=C, interpret=True, reset=reset)
  want = token_loop(reset, none, ~none, **x)
  for name, a, b in zip(("o", "memory", "momentum"), got, want):
    _close(a, b, name)


def test_titans_flags_refused_where_they_do_not_apply():
  x = inputs(False)
  flags = jnp.zeros((B, T), bool)
  with pytest.raises(ValueError, match="fresh is only for kind='titans' with reset"):
    kops.chunked_memory("titans", **x, chunk_size=C, interpret=True, fresh=flags)
  with pytest.raises(ValueError, match="live is only for kind='titans'"):
    kops.chunked_memory("delta_rule", x["q"], x["k"], x["v"], beta=x["beta"], chunk_size=C,
                        interpret=True, reset=flags, live=flags)
  with pytest.raises(ValueError, match=r"live must have shape \[B, T\]"):
    kops.chunked_memory("titans", **x, chunk_size=C, interpret=True, reset=flags,
                        live=flags[:, :-1])


# ``nlx.ops.titans_memory(..., reset=, impl="pallas")``: the packed batch in the kernels' buffer.
OB, OT, OD = 2, 70, 8  # batch, length (chunks of C = 16, the last partial), head size (padded)
# Row 0: t = 0, 5 and 6 (a one-token document), 16 (a chunk edge), 40 (after a document longer
# than a chunk), 45. Row 1: 3, then 30 (the document 3..29 is longer than a chunk and starts off
# the chunk grid), 31, 62; its last document ends mid-chunk (offset ≠ 0).
OP_BOUNDARIES = ((0, 5, 6, 16, 40, 45), (3, 30, 31, 62))
# Documents of C + 1 tokens pad the most: this layout does not fit the T + T/4 buffer (112
# slots), so the worst case's (160) runs.
WORST_BOUNDARIES = ((0, 17, 34, 51, 68), (1, 18, 35, 52, 69))


def op_inputs(seed=0):
  ks = jax.random.split(jax.random.key(seed), 9)
  normal = lambda i, shape, s=1.0: s * jax.random.normal(ks[i], shape, jnp.float32)
  return dict(q=normal(0, (OB, OT, H, OD)), k=normal(1, (OB, OT, H, OD), 0.4),
              v=normal(2, (OB, OT, H, OD)), lr=0.5 * jax.nn.sigmoid(normal(3, (OB, OT, H))),
              g=-0.2 * jax.nn.softplus(normal(4, (OB, OT, H))),
              momentum=jax.nn.sigmoid(normal(5, (OB, OT, H))),
              initial_state=normal(6, (OB, H, OD, OD), 0.3),
              reset_state=normal(7, (OB, H, OD, OD), 0.3))


def op_reset(boundaries=OP_BOUNDARIES):
  r = np.zeros((OB, OT), bool)
  for row, starts in enumerate(boundaries):
    r[row, list(starts)] = True
  return jnp.asarray(r)


def titans_op(impl, momentum=True, reset_state=True, span=slice(None), reset=None):
  from nlx import ops

  def run(q, k, v, lr, g, momentum_, initial_state, reset_state_):
    sl = lambda x: x[:, span]
    r = op_reset() if reset is None else reset
    return ops.titans_memory(sl(q), sl(k), sl(v), lr=sl(lr), g=sl(g),
                             momentum=sl(momentum_) if momentum else None,
                             initial_state=initial_state, chunk_size=C, impl=impl,
                             reset=r[:, span], reset_state=reset_state_ if reset_state else None)

  return run


@pytest.mark.parametrize("momentum,reset_state,boundaries", [
    (True, True, OP_BOUNDARIES),
    pytest.param(False, False, OP_BOUNDARIES, marks=pytest.mark.slow),
    pytest.param(True, True, WORST_BOUNDARIES, marks=pytest.mark.slow)])
def test_titans_op_packed_kernel_equals_the_chunked_form(momentum, reset_state, boundaries):
  """Outputs, every field of the returned state, and the gradients of every input."""
  from nlx.memory import core
  reset = op_reset(boundaries)
  slots, _, _ = core.batched(lambda r: core.document_slots(r, 0, C), 1)(reset)
  assert (int(slots.max()) >= 112) == (boundaries is WORST_BOUNDARIES)  # which buffer runs
  x = op_inputs()
  args = lambda x: (x["q"], x["k"], x["v"], x["lr"], x["g"], x["momentum"], x["initial_state"],
                    x["reset_state"])
  got_o, got_s = titans_op("pallas", momentum, reset_state, reset=reset)(*args(x))
  want_o, want_s = titans_op("chunked", momentum, reset_state, reset=reset)(*args(x))
  _close(got_o, want_o, "o")
  for name in ("memory", "momentum", "chunk_start"):
    a, b = getattr(got_s, name), getattr(want_s, name)
    assert (a is None) == (b is None), name
    if b is not None:
      _close(a, b, name)
  np.testing.assert_array_equal(got_s.offset, want_s.offset)
  if boundaries is OP_BOUNDARIES:
    np.testing.assert_array_equal(want_s.offset, [(OT - 45) % C, (OT - 62) % C])

  ks = jax.random.split(jax.random.key(5), 4)

  def loss(impl):
    def f(x):
      o, s = titans_op(impl, momentum, reset_state, reset=reset)(*args(x))
      total = jnp.sum(o * jax.random.normal(ks[0], o.shape))
      for i, part in enumerate((s.memory, s.chunk_start, s.momentum)):
        if part is not None:
          total += jnp.sum(part * jax.random.normal(ks[i + 1], part.shape))
      return total
    return f

  got_g, want_g = jax.grad(loss("pallas"))(x), jax.grad(loss("chunked"))(x)
  for name in x:
    if name == "momentum" and not momentum or name == "reset_state" and not reset_state:
      continue
    _close(got_g[name], want_g[name], f"d{name}")


@pytest.mark.slow  # the state's fields are compared in the test above; this continues a row
def test_titans_op_packed_kernel_state_continues():
  """A packed row split across calls: the kernels' call, then the chunked form from its state
  (offsets that differ by row), equals one call."""
  x = op_inputs(seed=1)
  args = (x["q"], x["k"], x["v"], x["lr"], x["g"], x["momentum"])
  want, _ = titans_op("chunked")(*args, x["initial_state"], x["reset_state"])
  split = 37  # row 0 mid-document (16..39: position 5 of its second chunk), row 1 at 37 - 31
  o1, state = titans_op("pallas", span=slice(0, split))(*args, x["initial_state"],
                                                          x["reset_state"])
  o2, _ = titans_op("chunked", span=slice(split, None))(*args, state, x["reset_state"])
  _close(jnp.concatenate([o1, o2], axis=1), want, "o")


@pytest.mark.slow  # the delta rule's kernels with reset are compared by default in test_pallas_reset.py
def test_dgd_dot_packed_kernel_equals_the_chunked_form():
  """``dgd_memory(objective="dot", reset=...)`` on the delta rule's kernels (restarting from
  zero): outputs, memory, offsets and gradients equal the chunked form, and its state
  continues."""
  from nlx import ops
  x = op_inputs(seed=2)
  names = ("q", "k", "v", "lr", "g", "initial_state")

  def run(impl, span=slice(None), state=None):
    def f(q, k, v, lr, g, initial_state):
      sl = lambda a: a[:, span]
      return ops.dgd_memory(sl(q), sl(k), sl(v), lr=sl(lr), g=sl(g), objective="dot",
                            initial_state=initial_state if state is None else state,
                            chunk_size=C, impl=impl, reset=op_reset()[:, span])
    return f

  args = [x[n] for n in names]
  (got_o, got_s), (want_o, want_s) = run("pallas")(*args), run("chunked")(*args)
  _close(got_o, want_o, "o")
  _close(got_s.memory, want_s.memory, "memory")
  np.testing.assert_array_equal(got_s.offset, want_s.offset)
  w = jax.random.normal(jax.random.key(4), got_o.shape)
  loss = lambda impl: lambda *a: jnp.sum(run(impl)(*a)[0] * w) + jnp.sum(run(impl)(*a)[1].memory)
  argnums = tuple(range(len(names)))
  for name, a, b in zip(names, jax.grad(loss("pallas"), argnums)(*args),
                        jax.grad(loss("chunked"), argnums)(*args)):
    _close(a, b, f"d{name}")
  o1, state = run("pallas", slice(0, 37))(*args)
  o2, _ = run("chunked", slice(37, None), state)(*args)
  _close(jnp.concatenate([o1, o2], axis=1), want_o, "continued o")
