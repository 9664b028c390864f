"""``titans_memory(..., rate="gram")``: token t's rate is ``lr_t / max(1, Σ_j |k_t · k_j|)`` over
the keys j ≤ t of its gradient chunk (``nlx.memory.rates``).

The reference is a plain Python loop over tokens of Titans' chunk-start step on a linear memory
(``M(x) = x S``), with the chunk's keys kept in a list: every form (recurrent, chunked, kernels)
equals it in float64, with document boundaries anywhere, and a sequence split anywhere across
calls equals one call. The point of the rate: at C = 16 a key seen once is written with its full
rate (the plain bound writes 1/C of it), and a key repeated over whole chunks stays bounded.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nlx import ops
from nlx.memory import MLPMemory
from nlx.memory.rates import gram_rates
from nlx.nn.neural_memory_config import chunk_step_units

B, T, H, D, C = 2, 29, 2, 4, 8


def inputs(seed=0, t=T, dtype=jnp.float64):
  ks = jax.random.split(jax.random.PRNGKey(seed), 6)
  normal = lambda i, shape: jax.random.normal(ks[i], shape, dtype)
  unit = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)
  k = unit(normal(1, (B, t, H, D)))
  k = k.at[:, 5:9].set(k[:, 4:5])  # a repeated key, so that the sum binds
  return dict(q=unit(normal(0, (B, t, H, D))), k=k, v=normal(2, (B, t, H, D)),
              lr=0.4 * jax.nn.sigmoid(normal(3, (B, t, H))),
              g=-0.1 * jax.nn.softplus(normal(4, (B, t, H))),
              momentum=jax.nn.sigmoid(normal(5, (B, t, H))))


def token_loop(x, chunk=C, reset=None, gram=True):
  """Per (batch, head), token by token: the chunk's keys so far in a list, s_t = Σ |k_t·k_j|,
  lr' = lr / max(1, s_t); G_t = k_tᵀ (k_t S_c − v_t) at the chunk-start S_c;
  P ← η P − lr' G; S ← exp(g) S + P; o_t = q_t S. A reset starts a document (S = 0, P = 0)."""
  x = jax.tree.map(np.asarray, x)
  t_len = x["q"].shape[1]
  out, rates = np.zeros(x["v"].shape), np.zeros(x["lr"].shape)
  for b in range(B):
    for h in range(H):
      s, p, chunk_keys = np.zeros((D, D)), np.zeros((D, D)), []
      for t in range(t_len):
        if reset is not None and reset[b, t]:
          s, p, chunk_keys = np.zeros((D, D)), np.zeros((D, D)), []
        if not chunk_keys:
          start = s.copy()
        k, v = x["k"][b, t, h], x["v"][b, t, h]
        chunk_keys.append(k)
        total = sum(abs(float(k @ j)) for j in chunk_keys)
        lr = x["lr"][b, t, h] / (max(1.0, total) if gram else 1.0)
        rates[b, t, h] = lr
        p = x["momentum"][b, t, h] * p - lr * np.outer(k, k @ start - v)
        s = np.exp(x["g"][b, t, h]) * s + p
        out[b, t, h] = x["q"][b, t, h] @ s
        if len(chunk_keys) == chunk:
          chunk_keys = []
  return out, rates


def op(x, impl, state=None, lo=0, hi=None, chunk=C, **kw):
  a = {n: v[:, lo:hi] for n, v in x.items()}
  return ops.titans_memory(a["q"], a["k"], a["v"], lr=a["lr"], g=a["g"],
                           momentum=a["momentum"], initial_state=state, chunk_size=chunk,
                           impl=impl, rate="gram", **kw)


@pytest.mark.parametrize("impl", ["recurrent", "chunked", "pallas"])
def test_gram_rate_is_the_token_loop(impl):
  dtype = jnp.float32 if impl == "pallas" else jnp.float64  # the kernels take float32
  chunk = 16 if impl == "pallas" else C  # the kernels' smallest chunk
  with jax.enable_x64(True):
    x = inputs(dtype=dtype)
    want, rates = token_loop(x, chunk)
    assert np.min(rates / np.asarray(x["lr"])) < 0.3  # the sum binds on the repeated key
    plain, _ = token_loop(x, chunk, gram=False)
    assert np.max(np.abs(plain - want)) > 1e-3  # the test tells the rates apart
    state = ops.TitansState(jnp.zeros((B, H, D, D), dtype), jnp.zeros((B, H, D, D), dtype))
    got, _ = op(x, impl, state, chunk=chunk)
    tol = 1e-10 if impl != "pallas" else 2e-5
    np.testing.assert_allclose(got, want, atol=tol, rtol=tol)


@pytest.mark.parametrize("impl", ["recurrent", "chunked"])
def test_gram_rate_with_document_boundaries(impl):
  """Boundaries inside a chunk, at a chunk edge and two in one chunk: each document's chunks
  (and their key sums) start at its first token."""
  with jax.enable_x64(True):
    x = inputs(1)
    reset = np.zeros((B, T), bool)
    reset[0, [3, 8, 11, 12]] = True  # inside, at the edge (8), two in one chunk
    reset[1, [0, 20]] = True
    want, _ = token_loop(x, reset=reset)
    got, _ = op(x, impl, reset=jnp.asarray(reset))
    np.testing.assert_allclose(got, want, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("impl", [pytest.param("recurrent", marks=pytest.mark.slow), "chunked"])
def test_gram_rate_split_anywhere_equals_one_call(impl):
  """The state carries the chunk in progress's keys: pieces of 3, 1, 1, 10 and 14 tokens."""
  with jax.enable_x64(True):
    x = inputs(2)
    want, _ = token_loop(x)
    state, outs = None, []
    for lo, hi in zip((0, 3, 4, 5, 15), (3, 4, 5, 15, T)):
      o, state = op(x, impl, state, lo, hi)
      outs.append(o)
    np.testing.assert_allclose(jnp.concatenate(outs, 1), want, atol=1e-10, rtol=1e-10)
    assert int(state.offset) == T % C and state.keys.shape == (B, H, C, D)
    np.testing.assert_array_equal(state.keys[:, :, T % C:], 0.0)
    np.testing.assert_allclose(state.keys[:, :, :T % C], jnp.moveaxis(x["k"][:, T - T % C:], 1, 2))


def test_gram_rate_traced_offset_under_jit():
  """Token-by-token decoding in one jitted step (traced offset, as the models' stateful API)."""
  x = inputs(3, dtype=jnp.float32)
  want, _ = token_loop(x)
  _, state = op(x, "chunked", None, 0, 5)
  step = jax.jit(lambda a, st: ops.titans_memory(
      a["q"], a["k"], a["v"], lr=a["lr"], g=a["g"], momentum=a["momentum"], initial_state=st,
      chunk_size=C, impl="chunked", rate="gram"))
  state = state._replace(offset=jnp.asarray(state.offset, jnp.int32))
  outs = []
  for t in range(5, T):
    o, state = step({n: v[:, t:t + 1] for n, v in x.items()}, state)
    outs.append(o)
  np.testing.assert_allclose(jnp.concatenate(outs, 1), want[:, 5:], atol=2e-5, rtol=2e-5)


def test_gram_rate_gradients_are_those_of_the_plain_step_at_fixed_rates():
  """No gradient flows through the sum: d(loss)/d(inputs) equals the plain step's at lr'."""
  with jax.enable_x64(True):
    x = inputs(4)
    _, rates = token_loop(x)

    def loss(a, rate, lr):
      o, s = ops.titans_memory(a["q"], a["k"], a["v"], lr=lr(a), g=a["g"],
                               momentum=a["momentum"], chunk_size=C, impl="chunked", rate=rate)
      return jnp.sum(jnp.sin(o)) + jnp.sum(jnp.sin(s.memory))

    got = jax.grad(loss)(x, "gram", lambda a: a["lr"])
    scale = jnp.asarray(rates) / x["lr"]
    want = jax.grad(loss)(x, "plain", lambda a: a["lr"] * scale)
    for name in x:
      np.testing.assert_allclose(got[name], want[name], atol=1e-9, rtol=1e-9, err_msg=name)


def test_gram_rate_mlp_memory_is_the_normalized_step_at_the_gram_rates():
  with jax.enable_x64(True):
    x = inputs(5)
    _, rates = token_loop(x)
    w = MLPMemory().init_state(jax.random.PRNGKey(0), B, H, D, 8)
    w = jax.tree.map(lambda a: a.astype(jnp.float64), w)
    call = lambda lr, rate, impl: ops.titans_memory(
        x["q"], x["k"], x["v"], lr=lr, g=x["g"], momentum=x["momentum"], memory="mlp",
        initial_state=w, chunk_size=C, impl=impl, rate=rate)[0]
    want = call(jnp.asarray(rates), "normalized", "recurrent")
    for impl in ("recurrent", "chunked"):
      np.testing.assert_allclose(call(x["lr"], "gram", impl), want, atol=1e-10, rtol=1e-10)


def test_a_key_seen_once_is_written_at_the_full_rate():
  """C = 16, 16 orthogonal keys each seen once at lr = 0.5/H_16 (the gram bound): each is
  read back with that fraction of its value, about 5× what the plain bound 0.5/16 writes; and
  one key repeated over 16 chunks stays bounded (the chunk steps lr·H_16 = 0.5 at most), where
  the plain step at the same rate diverges."""
  c, d = 16, 16
  keys = jnp.eye(d)[None, :, None, :]  # [1, 16, 1, 16]
  values = jax.random.normal(jax.random.PRNGKey(0), (1, c, 1, d))
  read = lambda lr, rate: ops.titans_memory(keys, keys, values, lr=jnp.full((1, c, 1), lr),
                                            chunk_size=c, rate=rate)[1].memory
  bound = 0.5 / chunk_step_units(c, "gram")
  s = read(bound, "gram")[0, 0]  # M(k_i) = k_i S = row i
  np.testing.assert_allclose(s, bound * values[0, :, 0], rtol=1e-5, atol=1e-6)
  plain = read(0.5 / c, "plain")[0, 0]
  assert np.linalg.norm(s) > 4.5 * np.linalg.norm(plain)
  t = 16 * c
  one = jnp.broadcast_to(keys[:, :1], (1, t, 1, d))
  # With momentum η the models write at lr·(1 − η) (nlx.nn.neural_memory), as here.
  o, _ = ops.titans_memory(one, one, jnp.ones((1, t, 1, d)),
                           lr=jnp.full((1, t, 1), bound * (1 - 0.9)),
                           momentum=jnp.full((1, t, 1), 0.9), chunk_size=c, rate="gram")
  assert np.all(np.isfinite(o)) and np.max(np.abs(o)) < 1.5
  o, _ = ops.titans_memory(one, one, jnp.ones((1, t, 1, d)),
                           lr=jnp.full((1, t, 1), bound * (1 - 0.9)),
                           momentum=jnp.full((1, t, 1), 0.9), chunk_size=c, rate="plain")
  assert not np.max(np.abs(o)) < 1.5


def test_equal_keys_are_the_largest_chunk_step_that_a_search_finds():
  """The chunk's step ``Σ_j lr'_j k_j k_jᵀ`` at the gram rates (lr = 1): its largest eigenvalue
  is H_C for C equal keys, and gradient ascent over unit keys from random starts (2, 4 and 16
  dimensions) does not find a larger one (what the bound 0.5/H_C rests on; not a proof)."""
  c = 16

  def step_size(x):
    k = x / jnp.linalg.norm(x, axis=-1, keepdims=True)
    rates, _ = gram_rates(jnp.ones((1, c, 1)), k[None, :, None, :], c)
    return jnp.linalg.eigvalsh((k * rates[0, :, 0, None]).T @ k)[-1]

  ascend = jax.jit(jax.vmap(lambda x: jax.lax.fori_loop(
      0, 200, lambda _, y: y + 0.05 * jax.grad(step_size)(y), x)))
  with jax.enable_x64(True):
    h = chunk_step_units(c, "gram")
    np.testing.assert_allclose(step_size(jnp.ones((c, 4))), h, rtol=1e-9)
    found = 0.0
    for d in (2, 4, 16):
      starts = jax.random.normal(jax.random.PRNGKey(d), (8, c, d), jnp.float64)
      found = max(found, float(jnp.max(jax.vmap(step_size)(ascend(starts)))))
    assert 0.5 * h < found <= h * (1 + 1e-9)


@pytest.mark.parametrize("state, match", [
    (ops.TitansState(jnp.zeros((B, H, D, D)), None, jnp.zeros((B, H, D, D)), 3),
     r"initial_state.keys is None"),
    (ops.TitansState(jnp.zeros((B, H, D, D)), None, jnp.zeros((B, H, D, D)), 3,
                     None, jnp.zeros((B, H, C + 1, D))), r"initial_state.keys must have shape"),
])
def test_bad_gram_state(state, match):
  x = inputs(dtype=jnp.float32)
  with pytest.raises(ValueError, match=match):
    ops.titans_memory(x["q"], x["k"], x["v"], lr=x["lr"], initial_state=state, chunk_size=C,
                      rate="gram")


def test_a_bad_chunk_size_is_refused_before_the_rates():
  x = inputs(dtype=jnp.float32)
  with pytest.raises(ValueError, match=r"chunk_size must be a positive int; got 0"):
    ops.titans_memory(x["q"], x["k"], x["v"], lr=x["lr"], chunk_size=0, rate="gram")


def test_keys_without_the_gram_rate_are_refused():
  x = inputs(dtype=jnp.float32)
  state = ops.TitansState(jnp.zeros((B, H, D, D)), keys=jnp.zeros((B, H, C, D)))
  with pytest.raises(ValueError, match=r"initial_state.keys is given but rate is not 'gram'"):
    ops.titans_memory(x["q"], x["k"], x["v"], lr=x["lr"], initial_state=state, chunk_size=C)
