"""CMS levels that learn from the LM loss: the ``next_token`` inner objective.

docs/EQUATIONS.md §3 and docs/EQUATIONS.md, choice 8.

With ``model.cms_objective = "next_token"`` every CMS level's inner objective is the language-model
loss of the finished chunk of ``C_1`` tokens (``C_1`` the fastest period): the sum over the chunk of
``−log p(x_{t+1} | x_{≤t})`` for the pairs whose both tokens lie in the chunk (the chunk's last token
has no successor yet, so the update is causal). The model therefore runs chunk by chunk:

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
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from nlx import levels as nl_levels

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
  """Advances every CMS state by ``num_steps`` tokens with ``grads`` (leaves ``[layers, B, ...]``)."""
  tick = lambda s, g: nl_levels.tick(levels, s, g, num_steps)
  return jax.tree.map(lambda s, g: jax.vmap(jax.vmap(tick))(s, g) if is_cms_state(s) else s,
                      layers, grads, is_leaf=is_cms_state)


def chunk_loss(lm, params, layers, pos, tokens: Array):
  """LM loss (summed) of the in-chunk pairs of ``tokens [B, C]`` from ``layers`` at ``pos``, with
  the CMS weights ``params``: ``(loss, (logits [B, C, V], layers after the chunk))``."""
  logits, layers = lm.run_stateful(tokens, with_cms_params(layers, params), pos)
  nll = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:])
  return nll.sum(), (logits, layers)


def finish_chunk(lm, layers, pos, tokens: Array, levels):
  """The forward of one whole chunk ``tokens [B, C]`` from ``layers`` at ``pos``, then the CMS
  step on its loss: ``(logits [B, C, V], layers)``."""
  params = cms_params(layers)  # (cms_stop_gradient: the levels' optimizers stop the writes)
  grads, (logits, layers) = jax.grad(chunk_loss, argnums=1, has_aux=True)(
      lm, params, layers, pos, tokens)
  return logits, tick_cms(layers, grads, levels, tokens.shape[1])


def call(lm, tokens: Array, levels) -> Array:
  """``tokens [B, T]`` from the initial state, chunk by chunk: ``logits [B, T, V]``."""
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


def initial_chunk(lm, batch_size: int, layers) -> dict:
  """``state["chunk"]`` before the first token: no tokens yet, the start states are ``layers``."""
  return {"tokens": jnp.zeros((batch_size, lm.cfg.cms_periods[0]), jnp.int32), "start": layers}


def advance(lm, tokens: Array, state: dict, levels) -> tuple[Array, dict]:
  """Continues ``state`` by ``tokens [B, T]`` token by token: ``(logits [B, T, V], state)``."""
  c = lm.cfg.cms_periods[0]

  def body(state, token):
    pos, chunk = state["pos"], state["chunk"]
    logits, layers = lm.run_stateful(token[:, None], state["layers"], pos)
    index = pos % c
    buffer = jax.lax.dynamic_update_slice_in_dim(chunk["tokens"], token[:, None].astype(jnp.int32),
                                                 index, 1)

    def finish(_):
      _, done = finish_chunk(lm, chunk["start"], pos + 1 - c, buffer, levels)
      return done, done

    layers, start = jax.lax.cond(index == c - 1, finish, lambda _: (layers, chunk["start"]),
                                 None)
    return ({"pos": pos + 1, "layers": layers, "chunk": {"tokens": buffer, "start": start}},
            logits[:, 0])

  state, logits = jax.lax.scan(body, state, jnp.moveaxis(tokens, 1, 0))
  return jnp.moveaxis(logits, 0, 1), state
