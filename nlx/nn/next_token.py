"""CMS levels that learn from the LM loss: the ``next_token`` inner objective.

docs/EQUATIONS.md §3 and docs/EQUATIONS.md, choice 8.

With ``model.cms_objective = "next_token"`` every CMS level's inner objective is the language-model
loss of the finished chunk of ``C_1`` tokens (``C_1`` the fastest period): the sum over the chunk of
``−log p(x_{t+1} | x_{≤t})`` for the pairs whose both tokens lie in the chunk (the chunk's last
token has no successor yet, so the update is causal). The model therefore runs chunk by chunk:

    for each chunk of C_1 tokens (aligned to absolute positions):
        logits, states = forward(chunk | states), every CMS reading its levels' current weights
        g_ℓ = ∂ loss(chunk) / ∂ θ_ℓ     for every CMS level ℓ of every layer (per sequence)
        levels.tick(g, C_1 steps)       (level ℓ steps with −η_ℓ · Σ g every C_ℓ tokens)

``η_ℓ`` is level ℓ's rate (``model.cms_lr``, one float for every level or a tuple with one per
level; a level at 0 keeps its weights). The gradient runs through the whole chunk forward (every
layer, attention within the chunk), at the weights of the chunk start; earlier chunks enter only
through the states. The outer loop differentiates through these inner gradients (second order)
unless ``cms_stop_gradient``.

Two paths implement this contract: ``call`` scans the chunks of a whole sequence (training), and
``advance`` runs any piece token by token from any position (``prefill`` / ``step``): it keeps the
tokens of the unfinished chunk and the layer states at its start in the model state
(``state["chunk"]``), and redoes the chunk's forward and gradient when its last token arrives, so
pieces of a sequence reproduce one call (tests/nn/test_cms_next_token.py).

Packed documents (``segments`` / ``segment_ids``): each document runs as if alone. Its levels
restart at its first token (the learned initial weights, zero gradients and counters) and its
chunks count from that token (a chunk ends at document position ``C_1 − 1 mod C_1``).
``call_documents`` places the tokens in a buffer of whole chunks in which every document longer
than a chunk starts on a chunk boundary (``document_layout``; a shorter document never steps
before it ends, so it shares a chunk and reads the initial weights), and ``advance_documents``
counts each row's chunks from its document's start (tests/nn/test_cms_packed.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from nlx import levels as nl_levels
from nlx.nn.segments import Segments, from_ids

Array = jax.Array


def is_cms_state(x) -> bool:
  """A CMS state: ``{level name: LevelState}``."""
  return (isinstance(x, dict) and bool(x)
          and all(isinstance(v, nl_levels.LevelState) for v in x.values()))


def cms_params(layers):
  """The CMS level parameters inside the layer states (``None`` elsewhere)."""
  return jax.tree.map(lambda s: {n: v.params for n, v in s.items()} if is_cms_state(s) else None,
                      layers, is_leaf=is_cms_state)


def with_cms_params(layers, params):
  """``layers`` with the CMS level parameters replaced by ``params`` (as ``cms_params`` gives)."""
  return jax.tree.map(
      lambda s, p: {n: v._replace(params=p[n]) for n, v in s.items()} if is_cms_state(s) else s,
      layers, params, is_leaf=is_cms_state)


def tick_cms(layers, grads, levels, num_steps: int):
  """Advances every CMS state by ``num_steps`` tokens with ``grads`` (leaves
  ``[layers, B, ...]``)."""
  tick = lambda s, g: nl_levels.tick(levels, s, g, num_steps)
  return jax.tree.map(lambda s, g: jax.vmap(jax.vmap(tick))(s, g) if is_cms_state(s) else s,
                      layers, grads, is_leaf=is_cms_state)


def chunk_loss(lm, params, layers, pos, tokens: Array, segments=None, pairs=None):
  """LM loss (summed) of the in-chunk pairs of ``tokens [B, C]`` from ``layers`` at ``pos``, with
  the CMS weights ``params``: ``(loss, (logits [B, C, V], layers after the chunk))``.

  ``segments`` (packed documents) go to the model; ``pairs [B, C − 1]`` (bool, or None: all)
  says which pairs ``(t, t + 1)`` count."""
  logits, layers = lm.run_stateful(tokens, with_cms_params(layers, params), pos, segments)
  nll = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:])
  if pairs is not None:
    nll = jnp.where(pairs, nll, 0.0)
  return nll.sum(), (logits, layers)


def finish_chunk(lm, layers, pos, tokens: Array, levels, segments=None, pairs=None):
  """The forward of one whole chunk ``tokens [B, C]`` from ``layers`` at ``pos``, then the CMS
  step on its loss: ``(logits [B, C, V], layers)`` (``segments``, ``pairs``: ``chunk_loss``)."""
  params = cms_params(layers)  # (cms_stop_gradient: the levels' optimizers stop the writes)
  grads, (logits, layers) = jax.grad(chunk_loss, argnums=1, has_aux=True)(
      lm, params, layers, pos, tokens, segments, pairs)
  return logits, tick_cms(layers, grads, levels, tokens.shape[1])


def call(lm, tokens: Array, levels, segments=None) -> Array:
  """``tokens [B, T]`` from the initial state, chunk by chunk: ``logits [B, T, V]``.

  ``segments`` (packed documents, ``nlx.nn.segments.Segments``, or None): ``call_documents``.
  """
  if segments is not None:
    return call_documents(lm, tokens, levels, segments)
  b, t = tokens.shape
  c = lm.cfg.cms_periods[0]
  n = t // c
  layers = lm.init_state(b, t)["layers"]
  logits = []
  if n:
    chunks = jnp.moveaxis(tokens[:, :n * c].reshape(b, n, c), 1, 0)

    def body(carry, chunk):
      layers, pos = carry
      out, layers = finish_chunk(lm, layers, pos, chunk, levels)
      return (layers, pos + c), out

    (layers, _), out = jax.lax.scan(body, (layers, jnp.zeros((), jnp.int32)), chunks)
    logits.append(jnp.moveaxis(out, 0, 1).reshape(b, n * c, -1))
  if n * c < t:  # the unfinished last chunk: read at the current weights, no step
    logits.append(lm.run_stateful(tokens[:, n * c:], layers, n * c)[0])
  return logits[0] if len(logits) == 1 else jnp.concatenate(logits, 1)


def call_documents(lm, tokens: Array, levels, segments) -> Array:
  """``call`` of packed rows: each document as if alone (its levels restart at its first token
  and its chunks count from it).

  ``document_layout`` places each row's tokens in a buffer of whole chunks where every document
  longer than a chunk starts on a chunk boundary (placeholders before it, which the document's
  reset hides from it), so that each chunk holds one chunk of such a document (its *main*
  document; the chunk's first slot) followed by documents of at most ``C_1`` tokens, which never
  see an update. Before a chunk, the rows whose main document does not continue there restart
  their CMS levels; in the chunk the main document reads the levels' weights and the others the
  initial ones (``nlx.nn.cms.CMS``); the step is taken on the main document's in-chunk pairs.
  """
  b, t = tokens.shape
  c = lm.cfg.cms_periods[0]
  n = -(-(t + (t // (c + 1)) * (c - 1)) // c)  # chunks: documents > C_1 tokens pad < C_1 each
  slots, buf = jax.vmap(lambda *row: document_layout(*row, c, n))(
      tokens, segments.reset, segments.positions, segments.doc)
  layers = lm.init_state(b, n * c)["layers"]
  initial = layers
  chunks = tuple(jnp.moveaxis(a.reshape(b, n, c), 1, 0) for a in buf)
  keep = chunks[4][:, :, 0] & (chunks[2][:, :, 0] >= c)  # [n, B]: the main document continues

  def body(layers, inp):
    (tok, reset, positions, doc, real), keep, pos = inp
    layers = restart_cms(layers, initial, ~keep)
    pairs = (real[:, :-1] & real[:, 1:] & (doc[:, 1:] == doc[:, :-1])
             & (doc[:, :-1] == doc[:, :1]))
    logits, layers = finish_chunk(lm, layers, pos, tok, levels,
                                  Segments(reset, positions, doc), pairs)
    return layers, logits

  xs = (chunks, keep, jnp.arange(n, dtype=jnp.int32) * c)
  layers = settle(layers, jax.eval_shape(body, layers, jax.tree.map(lambda a: a[0], xs))[0])
  _, logits = jax.lax.scan(body, layers, xs)
  logits = jnp.moveaxis(logits, 0, 1).reshape(b, n * c, -1)
  return jnp.take_along_axis(logits, slots[..., None], axis=1)


def document_layout(tokens: Array, reset: Array, positions: Array, doc: Array, c: int, n: int):
  """One row's buffer of ``n`` chunks of ``c`` slots: ``(slots [T], (tokens, reset, positions,
  doc, real) each [n·c])``; a placeholder continues the document before it (not real)."""
  t = tokens.shape[0]
  index = jnp.arange(t)
  after = jnp.concatenate([jax.lax.cummin(jnp.where(reset, index, t), reverse=True)[1:],
                           jnp.full((1,), t, index.dtype)])  # the next document's start
  long = reset & (after - index > c)
  prev = jax.lax.cummax(jnp.where(long, index, -1))
  prev = jnp.concatenate([jnp.full((1,), -1, prev.dtype), prev[:-1]])
  phase = jnp.where(prev >= 0, index - prev, index) % c  # the slot's phase without padding
  slots = index + jnp.cumsum(jnp.where(long, -phase % c, 0))
  slot = jnp.arange(n * c)
  src = jnp.maximum(jax.lax.cummax(jnp.full((n * c,), -1, index.dtype).at[slots].set(index)), 0)
  real = jnp.zeros((n * c,), bool).at[slots].set(True)
  return slots, (jnp.where(real, tokens[src], 0), real & reset[src],
                 (positions[src] + slot - slots[src]).astype(positions.dtype), doc[src], real)


def rows(mask: Array, a, b, shared=None):
  """``a`` in the rows ``mask [B]`` of leaves ``[layers, B, ...]``, else ``b``; the leaves that
  ``shared`` (``shared_flags``) marks have no batch axis: ``a``'s where any row is in ``mask``."""
  n = mask.shape[0]
  pick = lambda u, v: jnp.where(mask.reshape((1, n) + (1,) * (u.ndim - 2)), u, v)
  if shared is None:
    return jax.tree.map(pick, a, b)
  leaves, treedef = jax.tree.flatten(a)
  return treedef.unflatten([jnp.where(jnp.any(mask), u, v) if flag else pick(u, v)
                            for u, v, flag in zip(leaves, jax.tree.leaves(b), shared)])


def restart_cms(layers, initial, mask: Array):
  """``layers`` with the CMS states of the rows ``mask [B]`` taken from ``initial``."""
  return jax.tree.map(lambda s, i: rows(mask, i, s) if is_cms_state(s) else s, layers, initial,
                      is_leaf=is_cms_state)


def settle(tree, shapes):
  """``tree`` broadcast to ``shapes`` (a state that a call with documents makes per row, e.g. an
  offset ``[layers]`` that becomes ``[layers, B]``), so that it can be a scan's carry."""
  def fit(x, s):
    if x.shape == s.shape:
      return x
    return jnp.broadcast_to(x.reshape(x.shape + (1,) * (len(s.shape) - x.ndim)), s.shape)
  return jax.tree.map(fit, tree, shapes)


def initial_chunk(lm, batch_size: int, layers) -> dict:
  """``state["chunk"]`` before the first token: no tokens yet, the start states are ``layers``;
  for documents, each slot's ``reset``/``positions``/``doc`` and ``ring``, the layer-state leaves
  without a batch axis (``shared_flags``) at each of the last ``C_1`` positions."""
  c = lm.cfg.cms_periods[0]
  zeros = jnp.zeros((batch_size, c), jnp.int32)
  ring = fresh_ring(layers, shared_flags(lm, layers), c)
  return {"tokens": zeros, "start": layers, "reset": zeros.astype(bool),
          "positions": zeros - 1, "doc": zeros, "ring": ring}


def shared_flags(lm, layers) -> tuple[bool, ...]:
  """For each leaf of the layer states ``layers``: whether it has no batch axis (the same for
  every row, e.g. the KV cache's slot positions), from the shapes of fresh states of 1 and 2
  rows; a leaf that has gained an axis since (made per row by a call with documents) has one."""
  graphdef, params = nnx.split(lm.layers)
  fresh = lambda n: jax.tree.leaves(jax.eval_shape(
      lambda p: jax.vmap(lambda q: nnx.merge(graphdef, q).init_state(n, 1))(p), params))
  return tuple(a.shape == b.shape and x.ndim == a.ndim
               for a, b, x in zip(fresh(1), fresh(2), jax.tree.leaves(layers)))


def shared_leaves(layers, shared) -> list:
  return [x for x, flag in zip(jax.tree.leaves(layers), shared) if flag]


def fresh_ring(layers, shared, c: int) -> list:
  return [jnp.broadcast_to(x, (c,) + x.shape) for x in shared_leaves(layers, shared)]


def with_shared(layers, shared, values: list):
  """``layers`` with its leaves without a batch axis (``shared``) replaced by ``values``."""
  leaves, treedef = jax.tree.flatten(layers)
  it = iter(values)
  return treedef.unflatten([next(it) if flag else x for x, flag in zip(leaves, shared)])


def advance(lm, tokens: Array, state: dict, levels, segment_ids=None) -> tuple[Array, dict]:
  """Continues ``state`` by ``tokens [B, T]`` token by token: ``(logits [B, T, V], state)``.

  ``segment_ids [B, T]`` (packed documents continuing ``state["stream"]``, or None):
  ``advance_documents``."""
  if segment_ids is not None:
    return advance_documents(lm, tokens, state, levels, segment_ids)
  c = lm.cfg.cms_periods[0]
  shared = shared_flags(lm, state["layers"])

  def body(state, token):
    pos, chunk = state["pos"], state["chunk"]
    ring = record(chunk, state["layers"], pos, shared, c)
    logits, layers = lm.run_stateful(token[:, None], state["layers"], pos)
    index = pos % c
    buffer = jax.lax.dynamic_update_slice_in_dim(chunk["tokens"], token[:, None].astype(jnp.int32),
                                                 index, 1)

    def finish(_):
      _, done = finish_chunk(lm, chunk["start"], pos + 1 - c, buffer, levels)
      return done, done

    layers, start = jax.lax.cond(index == c - 1, finish, lambda _: (layers, chunk["start"]),
                                 None)
    # The slots' documents for a later call with segment ids: this call continues the last one.
    before = lambda buf: jax.lax.dynamic_slice_in_dim(buf, (index - 1) % c, 1, 1)
    at = jnp.arange(c) == index
    chunk = {**chunk, "tokens": buffer, "start": start, "ring": ring,
             "reset": jnp.where(at, False, chunk["reset"]),
             "positions": jnp.where(at, before(chunk["positions"]) + 1, chunk["positions"]),
             "doc": jnp.where(at, before(chunk["doc"]), chunk["doc"])}
    return {"pos": pos + 1, "layers": layers, "chunk": chunk}, logits[:, 0]

  state, logits = jax.lax.scan(body, state, jnp.moveaxis(tokens, 1, 0))
  return jnp.moveaxis(logits, 0, 1), state


def record(chunk: dict, layers, pos, shared, c: int) -> list:
  """``chunk["ring"]`` with the shared leaves of ``layers`` (the states before position ``pos``)
  in its slot ``pos mod C_1``."""
  return [r.at[pos % c].set(x) for r, x in zip(chunk["ring"], shared_leaves(layers, shared))]


def advance_documents(lm, tokens: Array, state: dict, levels, segment_ids) -> tuple[Array, dict]:
  """``advance`` of packed rows: each row counts its chunks from its document's first token.

  At a document's first token the row's CMS levels restart. A row's chunk ends at its document
  position ``C_1 − 1 mod C_1``; the rows whose chunk ends at a token (all started it ``C_1``
  tokens before) redo its forward from the states at its start (per row in ``chunk["start"]``;
  the leaves without a batch axis from ``chunk["ring"]``) and step their levels on its loss.
  """
  b = tokens.shape[0]
  c = lm.cfg.cms_periods[0]
  segments, _ = from_ids(segment_ids, state["stream"])
  initial = lm.init_state(b)["layers"]

  def body(state, inp):
    token, reset, position, doc = inp
    pos, chunk = state["pos"], state["chunk"]
    layers = restart_cms(state["layers"], initial, reset)
    index = position % c
    at = jnp.arange(c)[None, :] == index[:, None]  # [B, C]: each row's slot
    start = rows(index == 0, layers, chunk["start"], shared)
    ring = record(chunk, layers, pos, shared, c)
    logits, layers = lm.run_stateful(token[:, None], layers, pos,
                                     Segments(reset[:, None], position[:, None], doc[:, None]))
    put = lambda buf, x: jnp.where(at, x[:, None].astype(buf.dtype), buf)
    chunk = {**chunk, "tokens": put(chunk["tokens"], token), "reset": put(chunk["reset"], reset),
             "positions": put(chunk["positions"], position), "doc": put(chunk["doc"], doc),
             "start": start, "ring": ring}
    done = index == c - 1

    def finish(layers):
      begin = with_shared(start, shared, [r[(pos + 1) % c] for r in ring])
      seg = Segments(chunk["reset"], chunk["positions"], chunk["doc"])
      _, new = finish_chunk(lm, begin, pos + 1 - c, chunk["tokens"], levels, seg)
      return restart_cms(layers, new, done)

    layers = jax.lax.cond(jnp.any(done), finish, lambda layers: layers, layers)
    return {**state, "pos": pos + 1, "layers": layers, "chunk": chunk}, logits[:, 0]

  xs = tuple(jnp.moveaxis(a, 1, 0) for a in (tokens, *segments))
  shared = shared_flags(lm, state["layers"])
  shapes = jax.eval_shape(body, state, jax.tree.map(lambda a: a[0], xs))[0]
  state = settle_state(lm, state, shapes, c)
  shared = shared_flags(lm, state["layers"])
  state, logits = jax.lax.scan(body, state, xs)
  return jnp.moveaxis(logits, 0, 1), state


def settle_state(lm, state: dict, shapes: dict, c: int) -> dict:
  """``state`` fit to ``shapes`` (``settle``), its ring rebuilt when the shared leaves changed."""
  layers = settle(state["layers"], shapes["layers"])
  chunk = dict(state["chunk"], start=settle(state["chunk"]["start"], shapes["layers"]))
  shared = shared_flags(lm, layers)
  if [r.shape[1:] for r in chunk["ring"]] != [x.shape for x in shared_leaves(layers, shared)]:
    chunk["ring"] = fresh_ring(layers, shared, c)
  return {**state, "layers": layers, "chunk": chunk}
