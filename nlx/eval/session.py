"""Sessions: a model's memory state kept in a file, so that it remembers across invocations.

Nested Learning's promise is a model that keeps learning in context: what it read on Friday is in
its memory on Monday. A *session* is that memory for one stream of text: the model's whole
``LM.init_state`` pytree (every layer's memories, momentum, conv and CMS states, attention caches,
the position) after every token the stream has seen so far. ``nlx generate --state FILE`` and
``nlx eval --task ppl --state FILE`` restore it from ``FILE`` when it exists, continue it with
their text, and save it back; two invocations then equal one invocation on the concatenated
tokens (the prompt, the tokens generated, the next prompt, ...)::

  nlx generate --workdir runs/tiny --state monday.npz --prompt "ROMEO: I met her on Friday."
  nlx generate --workdir runs/tiny --state monday.npz --prompt "JULIET: When did we meet?"

The file is one ``.npz`` (no pickles): each state leaf under its tree path, plus ``__meta__`` (a
JSON string: the format, the model family, a fingerprint of the model config, the checkpoint
step, the number of tokens in the session, each leaf's dtype). It is written to a temporary file
and renamed, so a crash never leaves a half-written session. A session of another model config is
refused naming the difference; one written with another checkpoint of the same config is used
with a warning (the memories were written by other weights).

Memory families (HOPE, Titans, DeltaNet, Mamba2, ...) have a state of fixed size, so a session can
grow without bound. Families with softmax attention over the whole context keep their KV cache,
sized ``model.max_seq_len``; a session that would exceed it is refused with an error saying so.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from nlx.errors import CheckpointError

FORMAT = "nlx-session-v1"
BATCH = 1  # a session is one stream of text


def config_fingerprint(cfg) -> str:
  """A short hash of a model config (a ``ModelConfig``): sessions of other configs are refused."""
  import dataclasses  # pylint: disable=g-import-not-at-top
  fields = dataclasses.asdict(cfg)
  return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:16]


def context_limit(model) -> Optional[int]:
  """The most tokens a session of ``model`` may hold: ``max_seq_len`` when its state holds a cache
  that grows with the context (full attention), None when the state has a fixed size."""
  small = jax.eval_shape(lambda: model.init_state(BATCH, 8))
  large = jax.eval_shape(lambda: model.init_state(BATCH, 16))
  grows = any(a.shape != b.shape for a, b in zip(jax.tree.leaves(small), jax.tree.leaves(large)))
  return model.cfg.max_seq_len if grows else None


def fresh(model) -> dict:
  """The state of an empty session (attention caches sized ``model.max_seq_len``)."""
  return model.init_state(BATCH, model.cfg.max_seq_len)


def tokens_in(state: dict) -> int:
  """How many tokens the session ``state`` has read."""
  return int(jax.device_get(state["pos"]))


def check_room(model, state: dict, n_new: int) -> None:
  """Refuses ``n_new`` more tokens when the session would exceed the model's context limit.

  Raises:
    ValueError: naming the tokens held, the tokens asked and ``model.max_seq_len``.
  """
  limit, held = context_limit(model), tokens_in(state)
  if limit is not None and held + n_new > limit:
    raise ValueError(
        f"the session holds {held} tokens; {n_new} more would exceed model.max_seq_len={limit}, "
        f"the length of the attention cache of family {model.cfg.family!r}; allowed: session "
        "tokens + prompt tokens + --max_new_tokens <= model.max_seq_len (start a new --state "
        "file, or use a memory family such as hope, whose state does not grow)")


def _path_names(tree) -> list[str]:
  return [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def save(path: str, state: dict, *, model, step: Optional[int] = None) -> None:
  """Writes the session ``state`` of ``model`` to ``path`` atomically (temporary file + rename)."""
  leaves = [np.asarray(x) for x in jax.tree.leaves(jax.device_get(state))]
  names = _path_names(state)
  meta = {"format": FORMAT, "family": model.cfg.family,
          "config": config_fingerprint(model.cfg), "step": step, "tokens": tokens_in(state),
          "dtypes": {name: str(x.dtype) for name, x in zip(names, leaves)}}
  arrays = {"__meta__": np.asarray(json.dumps(meta))}
  for name, leaf in zip(names, leaves):
    # numpy has no bfloat16: such leaves are stored as their bits, the dtype is in the metadata.
    arrays[name] = leaf if leaf.dtype.isbuiltin else leaf.view(f"u{leaf.dtype.itemsize}")
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp-{os.getpid()}")
  try:
    with open(tmp, "wb") as f:
      np.savez(f, **arrays)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def load(path: str, *, model, step: Optional[int] = None) -> dict:
  """The session state of ``model`` in ``path``.

  Raises:
    CheckpointError: the file is not a session, or is one of another model config (named).
  """
  template = fresh(model)
  try:
    with np.load(path, allow_pickle=False) as f:
      meta = json.loads(str(f["__meta__"]))
      stored = {name: f[name] for name in f.files if name != "__meta__"}
  except Exception as e:  # pylint: disable=broad-except  (any unreadable file: name it)
    raise CheckpointError(f"--state {path} is not a readable nlx session file: "
                          f"{type(e).__name__}: {e}") from e
  if meta.get("format") != FORMAT:
    raise CheckpointError(f"--state {path} has format {meta.get('format')!r}; expected {FORMAT!r}")
  if meta["config"] != config_fingerprint(model.cfg):
    raise CheckpointError(f"--state {path} is a session of another model (family "
                          f"{meta['family']!r}, config {meta['config']}); this workdir's model is "
                          f"family {model.cfg.family!r}, config {config_fingerprint(model.cfg)}; "
                          "use a new --state file")
  if step is not None and meta.get("step") not in (None, step):
    print(f"warning: --state {path} was written with checkpoint step {meta['step']}; the model "
          f"is now at step {step}", file=sys.stderr)
  names, (leaves, treedef) = _path_names(template), jax.tree.flatten(template)
  if sorted(names) != sorted(stored):
    raise CheckpointError(f"--state {path} holds the state leaves {sorted(set(stored) - set(names))}"
                          f" that this model lacks and lacks {sorted(set(names) - set(stored))}")
  restored = []
  for name, want in zip(names, leaves):
    have = stored[name].view(jnp.dtype(meta["dtypes"][name]))
    if have.shape != want.shape or have.dtype != want.dtype:
      raise CheckpointError(f"--state {path}: {name} is {have.dtype}{list(have.shape)} in the "
                            f"file, {want.dtype}{list(want.shape)} in this model")
    restored.append(jnp.asarray(have))
  return jax.tree.unflatten(treedef, restored)


def load_or_fresh(path: Optional[str], *, model, step: Optional[int] = None) -> dict:
  """The session in ``path`` if the file exists, else an empty one."""
  if path and os.path.exists(path):
    return load(path, model=model, step=step)
  return fresh(model)


def info(path: str) -> dict[str, Any]:
  """The metadata of a session file (family, config fingerprint, step, tokens)."""
  with np.load(path, allow_pickle=False) as f:
    return json.loads(str(f["__meta__"]))


def continue_text(model, tokenizer, prompt: str, max_new_tokens: int, path: str, *,
                  step: Optional[int] = None, **sampling_kwargs) -> tuple[str, list[int]]:
  """One turn of a session: restore ``path`` (or start one), read ``prompt``, generate, save.

  Args:
    model: an ``nlx.nn.LM``.
    tokenizer: its tokenizer.
    prompt: the text of this turn (at least one token; an empty prompt reads the EOS token).
    max_new_tokens: tokens to generate after it.
    path: the session file (created if absent, replaced atomically).
    step: the checkpoint step of ``model``, recorded in the file.
    **sampling_kwargs: ``temperature``, ``top_k``, ``seed`` of ``nlx.eval.sampling``.

  Returns:
    ``(text, ids)``: the generated text and its token ids.
  """
  from nlx.eval import sampling  # pylint: disable=g-import-not-at-top
  state = load_or_fresh(path, model=model, step=step)
  ids = tokenizer.encode(prompt) or [tokenizer.eos_id]
  check_room(model, state, len(ids) + max_new_tokens)
  new, state = sampling.continue_state(model, np.asarray([ids], np.int32), max_new_tokens, state,
                                       **sampling_kwargs)
  save(path, state, model=model, step=step)
  new = [int(i) for i in new[0]]
  return tokenizer.decode(new), new


def score_text(model, tokenizer, text: str, path: Optional[str], *, piece: int = 1024,
               step: Optional[int] = None) -> dict:
  """Perplexity of ``text`` read as the continuation of the session in ``path`` (then saved).

  Every token but the first is scored given the session and all the text before it; the text is
  read in pieces of ``piece`` tokens (one ``prefill`` each), so memory families read any length.

  Returns:
    ``{"ppl", "nll", "tokens"}`` (``tokens``: the number scored), plus ``session_tokens``: the
    tokens the session held before.
  """
  import optax  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  state = load_or_fresh(path, model=model, step=step)
  held = tokens_in(state)
  ids = tokenizer.encode(text)
  if len(ids) < 2:
    raise ValueError(f"the text has {len(ids)} tokens; scoring needs at least 2")
  check_room(model, state, len(ids))
  graphdef, params = nnx.split(model)

  @jax.jit
  def read(params, tokens, targets, state):
    logits, state = nnx.merge(graphdef, params).prefill(tokens, state)
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).sum(), state

  nll = 0.0
  inputs, targets = ids[:-1], ids[1:]
  for start in range(0, len(inputs), piece):
    tokens = np.asarray([inputs[start:start + piece]], np.int32)
    piece_nll, state = read(params, tokens, np.asarray([targets[start:start + piece]], np.int32),
                            state)
    nll += float(piece_nll)
  _, state = read(params, np.asarray([ids[-1:]], np.int32), np.zeros((1, 1), np.int32), state)
  if path:
    save(path, state, model=model, step=step)
  import math  # pylint: disable=g-import-not-at-top
  return {"ppl": math.exp(min(nll / len(targets), 50.0)), "nll": nll, "tokens": len(targets),
          "session_tokens": held}
