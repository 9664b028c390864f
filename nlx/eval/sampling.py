"""Sampling from an LM with its stateful contract: ``prefill`` the prompt, then ``step``."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def sample(model, prompt_ids: np.ndarray, max_new_tokens: int, *, temperature: float = 1.0,
           top_k: int = 0, seed: int = 0) -> np.ndarray:
  """Continues ``prompt_ids [B, T]`` by ``max_new_tokens`` tokens; returns them ``[B, N]``.

  Args:
    model: an ``nlx.nn.LM``.
    prompt_ids: int tokens, at least one per row.
    max_new_tokens: N.
    temperature: 0 is greedy decoding.
    top_k: sample among the k most likely tokens (0: all).
    seed: the sampling PRNG seed.
  """
  if prompt_ids.ndim != 2:
    raise ValueError(f"prompt_ids must be [B, T] with T >= 1; got shape {prompt_ids.shape}")
  state = model.init_state(prompt_ids.shape[0], prompt_ids.shape[1] + max_new_tokens)
  return continue_state(model, prompt_ids, max_new_tokens, state, temperature=temperature,
                        top_k=top_k, seed=seed)[0]


def continue_state(model, prompt_ids: np.ndarray, max_new_tokens: int, state, *,
                   temperature: float = 1.0, top_k: int = 0, seed: int = 0):
  """Like ``sample``, continuing ``state`` (an ``LM.init_state`` after what came before).

  Returns:
    ``(tokens [B, N], state)``: the new tokens and the state after the prompt and all of them
    (the last new token included), ready for the next call.
  """
  if prompt_ids.ndim != 2 or prompt_ids.shape[1] < 1:
    raise ValueError(f"prompt_ids must be [B, T] with T >= 1; got shape {prompt_ids.shape}")
  if temperature < 0 or top_k < 0:
    raise ValueError(f"temperature={temperature} and top_k={top_k} must be >= 0")
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
  graphdef, params = nnx.split(model)

  def pick(logits, key):
    if temperature == 0:
      return jnp.argmax(logits, -1).astype(jnp.int32)
    logits = logits / temperature
    if top_k:
      kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
      logits = jnp.where(logits < kth, -jnp.inf, logits)
    return jax.random.categorical(key, logits).astype(jnp.int32)

  @jax.jit
  def run(params, prompt, state, key):
    lm = nnx.merge(graphdef, params)
    logits, state = lm.prefill(prompt, state)

    def body(carry, key):
      logits, state = carry
      token = pick(logits, key)
      logits, state = lm.step(token, state)
      return (logits, state), token

    keys = jax.random.split(key, max_new_tokens)
    (_, state), tokens = jax.lax.scan(body, (logits[:, -1], state), keys)
    return tokens.T, state

  tokens, state = run(params, jnp.asarray(prompt_ids, jnp.int32), state, jax.random.PRNGKey(seed))
  return np.asarray(tokens), state


def generate_text(model, tokenizer, prompt: str, max_new_tokens: int, **kwargs) -> str:
  """The text the model continues ``prompt`` with."""
  ids = np.asarray([tokenizer.encode(prompt) or [tokenizer.eos_id]], np.int32)
  return tokenizer.decode(sample(model, ids, max_new_tokens, **kwargs)[0])
