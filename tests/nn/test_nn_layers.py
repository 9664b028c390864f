"""Tests of the shared layers of nlx.nn: attention masking and its KV cache, RoPE, the short
convolution's streaming state, gated RMSNorm, and the Mamba2 mixer against its SSD recurrence."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nlx.nn.attention import KVCache, attend, write_cache
from nlx.nn.config import ModelConfig
from nlx.nn.conv import ShortConv
from nlx.nn.mamba2 import Mamba2
from nlx.nn.norms import RMSNorm
from nlx.nn.retnet import Retention
from nlx.nn.rope import rope


def _normal(seed, shape):
  return jax.random.normal(jax.random.PRNGKey(seed), shape, jnp.float32)


def _attend_reference(q, k, v, q_pos, k_pos, window, prefix, segment):
  q, k, v = np.asarray(q, np.float64), np.asarray(k, np.float64), np.asarray(v, np.float64)
  b, t, h, d = q.shape
  group = h // k.shape[2]
  out = np.zeros_like(q)
  for bi in range(b):
    for i in range(t):
      for hi in range(h):
        keys, values = [], []
        if prefix is not None:
          keys += list(np.asarray(prefix[0][bi, :, hi // group]))
          values += list(np.asarray(prefix[1][bi, :, hi // group]))
        for j in range(k.shape[1]):
          ok = 0 <= k_pos[j] <= q_pos[i]
          ok &= window is None or q_pos[i] - k_pos[j] < window
          ok &= segment is None or q_pos[i] // segment == k_pos[j] // segment
          if ok:
            keys.append(k[bi, j, hi // group])
            values.append(v[bi, j, hi // group])
        s = np.array(keys) @ q[bi, i, hi] / np.sqrt(d)
        w = np.exp(s - s.max())
        out[bi, i, hi] = (w / w.sum()) @ np.array(values)
  return out


@pytest.mark.parametrize("window, n_prefix, segment", [(None, 0, None), (3, 2, None),
                                                       (None, 1, 4)])
def test_attend_matches_a_loop_reference(window, n_prefix, segment):
  b, t, s, h, hkv, d = 2, 5, 9, 4, 2, 8
  q, k, v = _normal(0, (b, t, h, d)), _normal(1, (b, s, hkv, d)), _normal(2, (b, s, hkv, d))
  q_pos = jnp.arange(4, 4 + t)
  k_pos = jnp.array([-1, 0, 1, 2, 3, 4, 5, 6, 8])  # an empty slot, and a key in the future
  prefix = ((_normal(3, (b, n_prefix, hkv, d)), _normal(4, (b, n_prefix, hkv, d)))
            if n_prefix else None)
  got = attend(q, k, v, q_pos, k_pos, window, prefix, segment)
  want = _attend_reference(q, k, v, np.asarray(q_pos), np.asarray(k_pos), window, prefix,
                           segment)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("window,n_prefix,segment", [(None, 0, None), (5, 3, None),
                                                     (None, 0, 8)])
def test_query_blocks_equal_one_block(window, n_prefix, segment):
  """Blocked attention (T not a multiple of the block) == all queries at once, values and grads."""
  keys = jax.random.split(jax.random.PRNGKey(3), 5)
  b, t, h, hkv, d = 2, 37, 4, 2, 8
  q = jax.random.normal(keys[0], (b, t, h, d))
  k = jax.random.normal(keys[1], (b, t, hkv, d))
  v = jax.random.normal(keys[2], (b, t, hkv, d))
  prefix = ((jax.random.normal(keys[3], (b, n_prefix, hkv, d)),
             jax.random.normal(keys[4], (b, n_prefix, hkv, d))) if n_prefix else None)
  pos = jnp.arange(t)

  def loss(fn, q, k, v):
    o = fn(q, k, v)
    return jnp.sum(o * jnp.cos(o)), o

  blocked = lambda q, k, v: attend(q, k, v, pos, pos, window, prefix, segment, query_block=16)
  whole = lambda q, k, v: attend(q, k, v, pos, pos, window, prefix, segment)
  (_, o1), g1 = jax.value_and_grad(lambda *a: loss(blocked, *a), (0, 1, 2), has_aux=True)(q, k, v)
  (_, o2), g2 = jax.value_and_grad(lambda *a: loss(whole, *a), (0, 1, 2), has_aux=True)(q, k, v)
  np.testing.assert_allclose(o1, o2, rtol=1e-5, atol=1e-6)
  for a, c in zip(g1, g2):
    np.testing.assert_allclose(a, c, rtol=1e-5, atol=1e-6)


def test_write_cache_keeps_the_last_slots_of_a_ring():
  cache = KVCache(jnp.zeros((1, 4, 1, 2)), jnp.zeros((1, 4, 1, 2)), jnp.full((4,), -1))
  positions = jnp.arange(3, 9)  # 6 tokens into 4 slots: positions 5..8 survive
  k = jnp.broadcast_to(positions[None, :, None, None], (1, 6, 1, 2)).astype(jnp.float32)
  new = write_cache(cache, k, -k, positions)
  np.testing.assert_array_equal(new.slot_pos, [8, 5, 6, 7])
  np.testing.assert_array_equal(new.k[0, :, 0, 0], [8, 5, 6, 7])
  np.testing.assert_array_equal(new.v[0, :, 0, 1], [-8, -5, -6, -7])


def test_rope_scores_depend_only_on_the_offset():
  q, k = _normal(0, (1, 1, 1, 16)), _normal(1, (1, 1, 1, 16))
  score = lambda m, n: float(jnp.sum(rope(q, jnp.array([m])) * rope(k, jnp.array([n]))))
  assert score(7, 3) == pytest.approx(score(104, 100), rel=1e-4)
  assert score(7, 3) != pytest.approx(score(7, 4), rel=1e-3)
  np.testing.assert_allclose(rope(q, jnp.array([0])), q)  # position 0 is the identity


def test_short_conv_in_pieces_equals_one_call():
  conv = ShortConv(6, 4, "c", rngs=nnx.Rngs(0))
  x = _normal(0, (2, 9, 6))
  full, _ = conv(x)
  state = conv.init_state(2)
  pieces = []
  for lo, hi in [(0, 2), (2, 3), (3, 9)]:  # pieces shorter than the kernel too
    y, state = conv(x[:, lo:hi], state)
    pieces.append(y)
  np.testing.assert_allclose(jnp.concatenate(pieces, 1), full, rtol=1e-6, atol=1e-6)
  # Causal: y_t = silu(Σ_i w_i x_{t−i}).
  w = np.asarray(conv.kernel[...])
  t = 5
  pre = sum(w[i] * np.asarray(x[:, t - i]) for i in range(4))
  np.testing.assert_allclose(full[:, t], pre / (1 + np.exp(-pre)), rtol=1e-5, atol=1e-6)


def test_gated_rms_norm():
  norm = RMSNorm((4,), ("embed",), rngs=nnx.Rngs(0), eps=0.0)
  x, z = _normal(0, (3, 4)), _normal(1, (3, 4))
  want = x / np.sqrt(np.mean(np.square(x), -1, keepdims=True)) * z / (1 + np.exp(-z))
  np.testing.assert_allclose(norm(x, z), want, rtol=1e-5, atol=1e-6)


def test_retention_decays_are_retnets():
  cfg = ModelConfig(family="retnet", d_model=32, n_heads=4)
  gamma = np.exp(Retention(cfg, rngs=nnx.Rngs(0)).log_decay())
  np.testing.assert_allclose(gamma, 1 - 2.0**(-5 - np.arange(4)), rtol=1e-6)


def test_mamba2_is_the_ssd_recurrence():
  cfg = ModelConfig(family="mamba2", d_model=16, n_heads=2, state_dim=4, mamba_head_dim=8,
                    impl="chunked", chunk_size=4)
  mixer = Mamba2(cfg, rngs=nnx.Rngs(0))
  x = _normal(0, (1, 7, 16))
  got, _ = mixer(x)
  # The SSD recurrence written out with the mixer's own weights.
  xbc = np.asarray(mixer.conv(mixer.xbc(x))[0][0], np.float64)
  xs, bs, cs = xbc[:, :32].reshape(7, 4, 8), xbc[:, 32:36], xbc[:, 36:40]
  dt = np.log1p(np.exp(np.asarray(mixer.dt(x)[0], np.float64) + np.asarray(mixer.dt_bias[...])))
  a = -np.exp(np.asarray(mixer.a_log[...], np.float64))
  h = np.zeros((4, 4, 8))  # [heads, N, P]
  ys = []
  for t in range(7):
    h = np.exp(a * dt[t])[:, None, None] * h + np.einsum("n,hp->hnp", bs[t],
                                                         dt[t][:, None] * xs[t])
    ys.append(np.einsum("hnp,n->hp", h, cs[t]) + np.asarray(mixer.d_skip[...])[:, None] * xs[t])
  y = jnp.asarray(np.stack(ys).reshape(1, 7, 32), jnp.float32)
  want = mixer.out(mixer.norm(y, gate=mixer.z(x)))
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
