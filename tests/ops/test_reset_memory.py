"""Document boundaries (``reset``) in ``titans_memory`` and ``dgd_memory``.

A packed batch must equal every document run alone: separate calls, each from ``reset_state``
(the row's ``initial_state`` for a first document that does not reset at t = 0), with gradient
chunks aligned with the document's first token. The documents alone run through the recurrent
form without ``reset`` (no reset code involved), the packed rows through every XLA form.
Forward (float64 tight, float32 loose) and gradients; boundaries inside a chunk, at a chunk
edge, two in one chunk, at t = 0, a one-token document, documents longer than a chunk (whose
gradient chunks straddle the call's chunks in the chunked form); TTT's position scale; a packed
row split across calls.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nlx import ops
from nlx.memory import MLPMemory, core

B, T, H, D = 2, 19, 2, 4
C = 4
# Row 0: t = 0, 5 and 6 (two in one chunk; a one-token document), 8 (a chunk edge), 18 (the last
# token). Row 1: 3, then 12 (a chunk edge; the document 3..11 is longer than a chunk and starts
# off the call's chunk grid).
BOUNDARIES = ((0, 5, 6, 8, 18), (3, 12))
CASES = {  # name: (op, options)
    "titans": ("titans_memory", dict(momentum=True)),
    "titans_no_momentum": ("titans_memory", dict()),
    "titans_before_write": ("titans_memory", dict(momentum=True, read="before_write")),
    "titans_mlp": ("titans_memory", dict(momentum=True, memory="mlp")),
    "dgd": ("dgd_memory", dict(momentum=True)),
    "dgd_dot": ("dgd_memory", dict(objective="dot")),
    "dgd_mlp": ("dgd_memory", dict(memory="mlp")),
    "dgd_mlp_proximal": ("dgd_memory", dict(memory="mlp", momentum=True, proximal=True)),
}


def _reset(boundaries=BOUNDARIES, t=T):
  r = np.zeros((len(boundaries), t), bool)
  for row, starts in enumerate(boundaries):
    r[row, list(starts)] = True
  return jnp.asarray(r)


def _arrays(dtype, mlp: bool, seed=0):
  ks = jax.random.split(jax.random.PRNGKey(seed), 9)
  normal = lambda key, shape, s=1.0: s * jax.random.normal(key, shape, jnp.float32)
  a = dict(q=normal(ks[0], (B, T, H, D)), k=normal(ks[1], (B, T, H, D), 0.5),
           v=normal(ks[2], (B, T, H, D)),
           lr=0.5 * jax.nn.sigmoid(normal(ks[3], (B, T, H))),
           g=-0.3 * jax.nn.softplus(normal(ks[4], (B, T, H))),
           momentum=jax.nn.sigmoid(normal(ks[5], (B, T, H))))
  if mlp:
    a["s0"] = MLPMemory().init_state(ks[6], B, H, D, 8)
    a["init"] = MLPMemory().init_state(ks[7], B, H, D, 8)
  else:
    a["s0"], a["init"] = normal(ks[6], (B, H, D, D), 0.3), normal(ks[7], (B, H, D, D), 0.3)
  return jax.tree.map(lambda x: x.astype(dtype), a)


def _call(op, options, a, impl, reset=None, initial_state=None, rows=slice(None),
          span=slice(None), **kw):
  options = dict(options)
  momentum = a["momentum"][rows, span] if options.pop("momentum", False) else None
  memory = MLPMemory() if options.pop("memory", "linear") == "mlp" else "linear"
  sl = lambda x: x[rows, span]
  extra = {} if reset is None else {"reset": reset, "reset_state": a["init"]}
  return getattr(ops, op)(sl(a["q"]), sl(a["k"]), sl(a["v"]), lr=sl(a["lr"]), g=sl(a["g"]),
                          momentum=momentum, memory=memory, initial_state=initial_state,
                          chunk_size=C, impl=impl, **extra, **options, **kw)


def _documents(op, options, a):
  """Every document of every row run alone by the recurrent form (no reset), in place."""
  rows = []
  for row, starts in enumerate(BOUNDARIES):
    edges = sorted(set((0,) + tuple(starts) + (T,)))
    pieces = []
    for lo, hi in zip(edges[:-1], edges[1:]):
      first = lo == 0 and 0 not in starts
      state = jax.tree.map(lambda x: x[row:row + 1], a["s0" if first else "init"])
      o, _ = _call(op, options, a, "recurrent", initial_state=state, rows=slice(row, row + 1),
                   span=slice(lo, hi))
      pieces.append(o)
    rows.append(jnp.concatenate(pieces, axis=1))
  return jnp.concatenate(rows, axis=0)


FAST = ("titans", "dgd", "dgd_mlp")  # the default run; every case runs with -m slow


@pytest.mark.parametrize("impl", ["recurrent", "chunked"])
@pytest.mark.parametrize("case", [c if c in FAST else pytest.param(c, marks=pytest.mark.slow)
                                  for c in sorted(CASES)])
def test_packed_equals_documents_alone_float64(case, impl):
  op, options = CASES[case]
  with jax.enable_x64(True):
    a = _arrays(jnp.float64, options.get("memory") == "mlp")
    want = _documents(op, options, a)
    got, state = _call(op, options, a, impl, _reset(), initial_state=a["s0"])
    np.testing.assert_allclose(got, want, atol=1e-10, rtol=1e-10)
    # Each row's next token continues its last document's chunk (the rows differ).
    np.testing.assert_array_equal(state.offset, [(T - 18) % C, (T - 12) % C])


@pytest.mark.parametrize("case", ["titans", pytest.param("dgd_mlp", marks=pytest.mark.slow)])
def test_packed_equals_documents_alone_float32(case):
  op, options = CASES[case]
  a = _arrays(jnp.float32, options.get("memory") == "mlp")
  want = _documents(op, options, a)
  got, _ = _call(op, options, a, "chunked", _reset(), initial_state=a["s0"])
  np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("case", ["dgd", pytest.param("titans", marks=pytest.mark.slow),
                                  pytest.param("dgd_mlp_proximal", marks=pytest.mark.slow),
                                  pytest.param("titans_mlp", marks=pytest.mark.slow)])
def test_packed_gradients_equal_documents_alone(case):
  op, options = CASES[case]
  with jax.enable_x64(True):
    a = _arrays(jnp.float64, options.get("memory") == "mlp")
    weights = jax.random.normal(jax.random.PRNGKey(3), (B, T, H, D), jnp.float64)
    packed = lambda a: (_call(op, options, a, "chunked", _reset(), initial_state=a["s0"])[0]
                        * weights).sum()
    alone = lambda a: (_documents(op, options, a) * weights).sum()
    got, want = jax.jit(jax.grad(packed))(a), jax.jit(jax.grad(alone))(a)
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
      np.testing.assert_allclose(x, y, atol=1e-9, rtol=1e-9, err_msg=jax.tree_util.keystr(path))


# TTT's position scale c_i (not monotone here, so that a scale taken at the wrong position shows).
SCALE = (1.0, 0.7, 0.9, 0.4)


@pytest.mark.parametrize("memory", ["linear", pytest.param("mlp", marks=pytest.mark.slow)])
@pytest.mark.parametrize("impl", [pytest.param("auto", marks=pytest.mark.slow), "chunked"])
def test_position_scaled_packed_equals_documents_alone(memory, impl):
  """TTT's position scale with boundaries: the chunked form (a document's gradient chunk
  straddling the call's chunks, ``core.scaled_coefficients``) equals the documents alone."""
  with jax.enable_x64(True):
    a = _arrays(jnp.float64, memory == "mlp")
    options = dict(position_scale=jnp.asarray(SCALE, jnp.float64), memory=memory)
    want = _documents("titans_memory", options, a)
    got, state = _call("titans_memory", options, a, impl, _reset(), initial_state=a["s0"])
    np.testing.assert_allclose(got, want, atol=1e-10, rtol=1e-10)
    _, ref = _call("titans_memory", options, a, "recurrent", _reset(), initial_state=a["s0"])
    for x, y in zip(jax.tree.leaves(state), jax.tree.leaves(ref)):
      np.testing.assert_allclose(x, y, atol=1e-10, rtol=1e-10)


def test_position_scaled_packed_gradients_equal_documents_alone():
  with jax.enable_x64(True):
    a = _arrays(jnp.float64, False)
    options = dict(position_scale=jnp.asarray(SCALE, jnp.float64))
    weights = jax.random.normal(jax.random.PRNGKey(3), (B, T, H, D), jnp.float64)
    packed = lambda a: (_call("titans_memory", options, a, "chunked", _reset(),
                              initial_state=a["s0"])[0] * weights).sum()
    alone = lambda a: (_documents("titans_memory", options, a) * weights).sum()
    got, want = jax.jit(jax.grad(packed))(a), jax.jit(jax.grad(alone))(a)
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
      np.testing.assert_allclose(x, y, atol=1e-9, rtol=1e-9, err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("split", [pytest.param(1, marks=pytest.mark.slow), 6,
                                   pytest.param(13, marks=pytest.mark.slow)])
def test_position_scaled_packed_row_split_across_calls(split):
  """The accumulated writes of a chunk in progress carry across calls, per row."""
  with jax.enable_x64(True):
    a = _arrays(jnp.float64, False)
    options = dict(position_scale=jnp.asarray(SCALE, jnp.float64))
    reset = _reset()
    want, _ = _call("titans_memory", options, a, "recurrent", reset, initial_state=a["s0"])
    o1, state = _call("titans_memory", options, a, "chunked", reset[:, :split],
                      initial_state=a["s0"], span=slice(0, split))
    o2, _ = _call("titans_memory", options, a, "chunked", reset[:, split:], initial_state=state,
                  span=slice(split, T))
    np.testing.assert_allclose(jnp.concatenate([o1, o2], 1), want, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("impl", ["recurrent", "chunked"])
@pytest.mark.parametrize("split", [pytest.param(1, marks=pytest.mark.slow), 6,
                                   pytest.param(10, marks=pytest.mark.slow)])
def test_packed_row_split_across_calls(impl, split):
  """The state after a packed call (a per-row offset) continues like one call."""
  op, options = CASES["dgd"]
  with jax.enable_x64(True):
    a = _arrays(jnp.float64, False)
    reset = _reset()
    want, _ = _call(op, options, a, impl, reset, initial_state=a["s0"])
    o1, state = _call(op, options, a, impl, reset[:, :split], initial_state=a["s0"],
                      span=slice(0, split))
    o2, _ = _call(op, options, a, impl, reset[:, split:], initial_state=state,
                  span=slice(split, T))
    np.testing.assert_allclose(jnp.concatenate([o1, o2], 1), want, atol=1e-10, rtol=1e-10)
    # A per-row offset continues in a call without boundaries too.
    o2b, _ = _call(op, options, a, impl, initial_state=state, span=slice(split, T))
    if not bool(reset[:, split:].any()):
      np.testing.assert_allclose(o2b, o2, atol=1e-10)


def test_document_slots_align_every_later_chunk():
  """Every chunk boundary inside a document lands on a buffer-chunk boundary, the buffer is
  large enough, and only documents longer than a chunk pad."""
  rng = np.random.default_rng(0)
  t = 40
  for c in (1, 2, 4, 7):
    slots_of = jax.jit(lambda r, o, c=c: core.document_slots(r, o, c)[:2])
    positions_of = jax.jit(lambda r, o, c=c: core.chunk_positions(r, o, c))
    for _ in range(20):
      reset = jnp.asarray(rng.random(t) < rng.choice([0.05, 0.2, 0.5]))
      offset = int(rng.integers(0, c))
      slots, positions = (np.asarray(x) for x in slots_of(reset, offset))
      assert np.all(np.diff(slots) >= 1) and slots[0] == offset
      assert slots[-1] < core.buffer_chunks(t, c) * c
      inner = (positions == 0) & ~np.asarray(reset)
      assert np.all(slots[inner] % c == 0)
      np.testing.assert_array_equal(positions, positions_of(reset, offset))


def test_bad_reset_state_is_refused():
  a = _arrays(jnp.float32, False)
  with pytest.raises(ValueError, match="reset_state"):
    ops.titans_memory(a["q"], a["k"], a["v"], lr=a["lr"], reset=_reset(),
                      reset_state=jnp.zeros((B, H, D, D + 1)))
  with pytest.raises(ValueError, match="reset_state"):
    ops.titans_memory(a["q"], a["k"], a["v"], lr=a["lr"], reset_state=a["init"])
  mlp = _arrays(jnp.float32, True)
  with pytest.raises(ValueError, match="reset_state"):
    ops.titans_memory(a["q"], a["k"], a["v"], lr=a["lr"], memory=MLPMemory(),
                      initial_state=mlp["s0"], reset=_reset())
  with pytest.raises(ValueError, match="reset"):
    ops.titans_memory(a["q"], a["k"], a["v"], lr=a["lr"], reset=_reset()[:, :5])
  # The kernels take boundaries for the linear memory read after the write only.
  with pytest.raises(ValueError, match="impl='pallas': the kernels read after the write only"):
    ops.titans_memory(a["q"], a["k"], a["v"], lr=a["lr"], reset=_reset(), impl="pallas",
                      chunk_size=16, read="before_write")
  with pytest.raises(ValueError, match="impl='pallas': the kernels implement DGD only as"):
    ops.dgd_memory(a["q"], a["k"], a["v"], lr=a["lr"], reset=_reset(), impl="pallas",
                   chunk_size=16)
  with pytest.raises(ValueError, match="the DGD kernels .* restart from zero at a reset"):
    ops.dgd_memory(a["q"], a["k"], a["v"], lr=a["lr"], reset=_reset(), impl="pallas",
                   chunk_size=16, objective="dot", reset_state=a["init"])


@pytest.mark.parametrize("impl", ["recurrent", "chunked"])
def test_rows_at_different_chunk_offsets_continue_without_reset(impl):
  """A state with one offset per row (after a packed call) continues each row like a call of
  that row alone, position-scaled (TTT) included."""
  with jax.enable_x64(True):
    a = _arrays(jnp.float64, False)
    scale = 1.0 / jnp.arange(1, C + 1, dtype=jnp.float64)
    options = dict(position_scale=scale)
    _, state = _call("titans_memory", options, a, "recurrent", _reset()[:, :7],
                     initial_state=a["s0"], span=slice(0, 7))
    assert state.offset.shape == (B,)
    got, _ = _call("titans_memory", options, a, impl, initial_state=state, span=slice(7, T))
    for r in range(B):
      one = jax.tree.map(lambda x: x[r:r + 1] if getattr(x, "ndim", 0) else x, state)
      one = one._replace(offset=int(state.offset[r]))
      want, _ = _call("titans_memory", options, a, "recurrent", initial_state=one,
                      rows=slice(r, r + 1), span=slice(7, T))
      np.testing.assert_allclose(got[r:r + 1], want, atol=1e-10, rtol=1e-10)


def test_small_buffer_is_taken_exactly_when_every_row_fits():
  t, c = 70, 16
  assert core.small_buffer_chunks(t, c) == 5 + 2 < core.buffer_chunks(t, c) == 10
  assert core.small_buffer_chunks(t, c, slack=0) == core.buffer_chunks(t, c)
  assert core.small_buffer_chunks(8, 16) == core.buffer_chunks(8, 16)  # no smaller: no cond
  which = lambda boundaries: bool(core.with_small_buffer(_reset(boundaries, t), (c,),
                                                         lambda small: jnp.asarray(small)))
  assert which(((0, 40), (3, 30, 31, 62)))  # few long documents: fits 112 slots
  assert not which(((0, 40), (0, 17, 34, 51, 68)))  # documents of C + 1 in one row: does not
  assert core.with_small_buffer(_reset(((0,),), 8), (16,), lambda small: small) is False
