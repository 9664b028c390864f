"""The language model of the zoo: embedding, scanned layer groups, final norm, head.

``build_model(config.model, rngs=...)`` picks the mixers of ``config.model.family`` from the
registry (``nlx.nn.registry``) and returns an ``LM``::

  tokens [B, T] -> embed -> n_layers x [x + Mixer(RMSNorm(x)); x + SwiGLU(RMSNorm(x))]
                 -> RMSNorm -> head (tied to the embedding or not) -> logits [B, T, vocab]

A family's layer group holds one block per mixer of its pattern (one for most families; two for
Samba and Titans MAL, which interleave), and the ``n_layers / len(pattern)`` groups are stacked on
a leading ``"layers"`` axis and run by one ``lax.scan``, so a 24-layer model compiles one layer per
block type (``scan_layers=False``: the same scan unrolled, same parameters and values). Stateful
use: ``init_state(batch)``, ``prefill(tokens, state)``, ``step(token, state)``; the state is
``{"pos": int32 [], "layers": per-block mixer states stacked like the parameters, "stream":
nlx.nn.segments.Stream}``.

Packed documents: ``model(tokens, segment_ids)``, ``prefill(tokens, state, segment_ids)`` and
``step(token, state, segment_id)`` take ``segment_ids [B, T]`` (a new document where the id
changes), turn them into ``nlx.nn.segments.Segments`` once and hand them to every mixer (and to a
stateful MLP), so that each document's logits are those of the document alone; ``prefill``
continues the row's documents across calls with ``state["stream"]``. Without segment ids the
computation is the one without packing.

Activation sharding: inside ``with activation_sharding(sharding):`` (the trainer's batch sharding)
the embeddings and the residual stream between layer groups are constrained to it, so that FSDP
shards activations over the batch as well as the weights (GSPMD alone may keep them whole).
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Any, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from nlx.nn import registry
from nlx.nn.config import ModelConfig
from nlx.nn.mixer import Mixer, apply
from nlx.nn.mlp import SwiGLU
from nlx.nn.norms import RMSNorm
from nlx.nn.params import Dense, Embedding
from nlx.nn.segments import Segments, check_segment_ids, fresh_stream, from_ids

Array = jax.Array
_ACTIVATION_SHARDING = contextvars.ContextVar("nlx_activation_sharding", default=None)


@contextlib.contextmanager
def activation_sharding(sharding):
  """Within the block, traced models constrain ``[B, T, d]`` activations to ``sharding`` (a
  ``NamedSharding`` whose spec names the batch axis first, e.g. ``P(("data", "fsdp"))``)."""
  token = _ACTIVATION_SHARDING.set(sharding)
  try:
    yield
  finally:
    _ACTIVATION_SHARDING.reset(token)


def constrain(x: Array) -> Array:
  """``x`` under the current ``activation_sharding`` (unchanged outside one)."""
  sharding = _ACTIVATION_SHARDING.get()
  return x if sharding is None else jax.lax.with_sharding_constraint(x, sharding)


class Block(nnx.Module):
  """Pre-norm residual block: ``x + Mixer(RMSNorm(x))`` then ``x + MLP(RMSNorm(x))``.

  The MLP is SwiGLU unless the family gives ``mlp_factory``; a stateful MLP (a ``Mixer``, e.g.
  HOPE's CMS) makes the block state ``(mixer state, mlp state)``.
  """

  def __init__(self, cfg: ModelConfig, mixer_factory, *, rngs: nnx.Rngs, mlp_factory=None):
    self.norm1 = RMSNorm((cfg.d_model,), ("embed",), rngs=rngs, eps=cfg.norm_eps)
    self.mixer = mixer_factory(cfg, rngs=rngs)
    self.norm2 = RMSNorm((cfg.d_model,), ("embed",), rngs=rngs, eps=cfg.norm_eps)
    self.mlp = (SwiGLU(cfg.d_model, cfg.mlp_dim, rngs=rngs) if mlp_factory is None else
                mlp_factory(cfg, rngs=rngs))
    self.stateful_mlp = isinstance(self.mlp, Mixer)

  def init_state(self, batch_size: int, max_len: int):
    state = self.mixer.init_state(batch_size, max_len)
    return (state, self.mlp.init_state(batch_size, max_len)) if self.stateful_mlp else state

  def __call__(self, x: Array, state=None, pos=0, segments: Optional[Segments] = None):
    mixer_state, mlp_state = (state if self.stateful_mlp and state is not None else
                              (state, None))
    y, mixer_state = apply(self.mixer, self.norm1(x), mixer_state, pos, segments)
    x = x + y
    if not self.stateful_mlp:
      return x + self.mlp(self.norm2(x)), mixer_state
    y, mlp_state = apply(self.mlp, self.norm2(x), mlp_state, pos, segments)
    return x + y, None if state is None else (mixer_state, mlp_state)


class Group(nnx.Module):
  """One block per mixer of the family's pattern, applied in order."""

  def __init__(self, cfg: ModelConfig, family: registry.Family, *, rngs: nnx.Rngs):
    self.blocks = nnx.List([Block(cfg, f, rngs=rngs, mlp_factory=family.mlp)
                            for f in family.mixers])

  def init_state(self, batch_size: int, max_len: int) -> tuple:
    return tuple(block.init_state(batch_size, max_len) for block in self.blocks)

  def __call__(self, x: Array, states: Optional[tuple] = None, pos=0,
               segments: Optional[Segments] = None):
    new_states = []
    for i, block in enumerate(self.blocks):
      x, s = block(x, None if states is None else states[i], pos, segments)
      new_states.append(s)
    return x, None if states is None else tuple(new_states)


def remat(body, policy: str, rolled: bool = True):
  """``body`` rematerialised as ``ModelConfig.remat`` says ("none" | "full" | "dots").

  "full" saves only the scan carry and the layer inputs for the backward pass; "dots" also saves
  the results of matmuls without batch dimensions (the projections). Inside a rolled
  ``lax.scan`` the loop already keeps XLA from merging the recomputation with the forward pass,
  so CSE prevention is off (as the ``jax.checkpoint`` documentation recommends for scans); an
  unrolled one (``rolled=False``, ``model.scan_layers=False``) is straight-line code, where
  XLA's CSE would undo the remat, so it is on there.
  """
  if policy == "none":
    return body
  policies = {"full": None, "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}
  if policy not in policies:
    raise ValueError(f"model.remat={policy!r} is not one of {('none', *policies)}")
  return jax.checkpoint(body, policy=policies[policy], prevent_cse=not rolled)


def validate(cfg: ModelConfig) -> registry.Family:
  """Checks ``cfg`` for its family; returns the family."""
  family = registry.get(cfg.family)
  if cfg.n_layers % len(family.mixers):
    raise ValueError(f"model.n_layers={cfg.n_layers} must be a multiple of {len(family.mixers)} "
                     f"for family {cfg.family!r} (its layer group has {len(family.mixers)} "
                     "blocks)")
  family.validate(cfg)
  return family


class LM(nnx.Module):
  """A causal language model on one of the registered mixer families."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    family = validate(cfg)
    self.cfg = cfg
    self.n_groups = cfg.n_layers // len(family.mixers)
    self.embed = Embedding(cfg.vocab_size, cfg.d_model, rngs=rngs, init_std=cfg.init_std)

    @nnx.split_rngs(splits=self.n_groups)
    @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make_groups(rngs: nnx.Rngs) -> Group:
      return Group(cfg, family, rngs=rngs)

    self.layers = make_groups(rngs)
    self.norm = RMSNorm((cfg.d_model,), ("embed",), rngs=rngs, eps=cfg.norm_eps)
    self.head = (None if cfg.tie_embeddings else
                 Dense((cfg.d_model,), (cfg.vocab_size,), ("embed", "vocab"), rngs=rngs))
    # CMS levels learning from the LM loss run the model chunk by chunk (nlx.nn.next_token).
    self.cms_next_token = (family.mlp is not None and cfg.cms and any(cfg.cms_lrs)
                           and cfg.cms_objective == "next_token")

  def _cms_levels(self):
    from nlx.nn.cms import CMSSpec  # pylint: disable=g-import-not-at-top
    return CMSSpec.of(self.cfg).levels()

  def _logits(self, x: Array) -> Array:
    x = self.norm(x)
    logits = self.embed.attend(x) if self.head is None else self.head(x)
    return logits.astype(jnp.promote_types(logits.dtype, jnp.float32))  # float64 stays

  def _run_layers(self, x: Array, states=None, pos=0, segments: Optional[Segments] = None):
    """Scans the stacked groups over ``x`` (and their states); returns ``(x, states)``."""
    graphdef, params = nnx.split(self.layers)

    def body(x, layer):
      group_params, group_states = layer
      x, group_states = nnx.merge(graphdef, group_params)(x, group_states, pos, segments)
      return constrain(x), group_states

    return jax.lax.scan(remat(body, self.cfg.remat, self.cfg.scan_layers), constrain(x),
                        (params, states), unroll=not self.cfg.scan_layers)

  def run_stateful(self, tokens: Array, layers, pos,
                   segments: Optional[Segments] = None) -> tuple[Array, Any]:
    """``tokens [B, T]`` continuing the layer states ``layers`` at position ``pos`` (documents:
    ``segments`` or None): ``(logits [B, T, V], layers)``. No chunk-by-chunk CMS learning (see
    ``prefill``)."""
    x, layers = self._run_layers(self.embed(tokens), layers, pos, segments)
    return self._logits(x), layers

  def __call__(self, tokens: Array, segment_ids: Optional[Array] = None) -> Array:
    """``tokens [B, T]`` (int) -> ``logits [B, T, vocab]`` (float32; float64 for a float64
    model), from the initial state.

    ``segment_ids [B, T]`` (int, or None: one document per row): packed documents, a new one
    where the id changes; each document's logits are those of the document alone.
    """
    segments = None
    if segment_ids is not None:
      segments, _ = from_ids(check_segment_ids(segment_ids, tokens.shape))
    if self.cms_next_token:
      from nlx.nn import next_token  # pylint: disable=g-import-not-at-top
      kwargs = {} if segments is None else {"segments": segments}
      return next_token.call(self, tokens, self._cms_levels(), **kwargs)
    x, _ = self._run_layers(self.embed(tokens), segments=segments)
    return self._logits(x)

  def init_state(self, batch_size: int, max_len: Optional[int] = None) -> dict:
    """The state before the first token: ``{"pos": 0, "layers": stacked mixer states,
    "stream": a fresh nlx.nn.segments.Stream}``.

    ``max_len`` (default ``cfg.max_seq_len``) bounds the KV cache of full attention.
    """
    max_len = self.cfg.max_seq_len if max_len is None else max_len
    graphdef, params = nnx.split(self.layers)
    init = lambda p: nnx.merge(graphdef, p).init_state(batch_size, max_len)
    state = {"pos": jnp.zeros((), jnp.int32), "layers": jax.vmap(init)(params),
             "stream": fresh_stream(batch_size)}
    if self.cms_next_token:  # the unfinished chunk: its tokens and the states at its start
      from nlx.nn import next_token  # pylint: disable=g-import-not-at-top
      state["chunk"] = next_token.initial_chunk(self, batch_size, state["layers"])
    return state

  def prefill(self, tokens: Array, state: dict,
              segment_ids: Optional[Array] = None) -> tuple[Array, dict]:
    """Continues the sequence of ``state`` with ``tokens [B, T]``: ``(logits [B, T, V], state)``.

    ``segment_ids [B, T]`` (int): packed documents continuing the row's ``state["stream"]``
    (``nlx.nn.segments.from_ids``: the first token continues the stream's last document when
    its id equals the stream's last id). None: the tokens continue the row as one document at
    absolute positions, as without packing, and the stream advances by T (its last id kept, 0
    for a fresh state), so that a later call with segment ids continues the positions. After a
    call with segment ids that started a document, keep giving segment ids: a call without them
    runs RoPE at absolute positions rather than the document's (``nlx.nn.mixer``).
    """
    b, t = tokens.shape
    stream = state.get("stream")
    stream = fresh_stream(b) if stream is None else stream
    if segment_ids is None:
      segments, kwargs = None, {}
      stream = stream._replace(position=stream.position + t)
    else:
      ids = check_segment_ids(segment_ids, tokens.shape)
      segments, stream = from_ids(ids, stream)
      kwargs = {"segment_ids": ids}
    if self.cms_next_token:  # next_token.advance reads the stream before the call, if any
      from nlx.nn import next_token  # pylint: disable=g-import-not-at-top
      if not kwargs:
        state = {k: v for k, v in state.items() if k != "stream"}
      logits, state = next_token.advance(self, tokens, state, self._cms_levels(), **kwargs)
      return logits, {**state, "stream": stream}
    pos = state["pos"]
    x, layers = self._run_layers(self.embed(tokens), state["layers"], pos, segments)
    return self._logits(x), {"pos": pos + t, "layers": layers, "stream": stream}

  def step(self, token: Array, state: dict,
           segment_id: Optional[Array] = None) -> tuple[Array, dict]:
    """One token ``[B]`` (and its ``segment_id [B]``, or None; see ``prefill``):
    ``(logits [B, V], state)``."""
    segment_ids = None
    if segment_id is not None:
      segment_id = jnp.asarray(segment_id)
      if segment_id.shape != token.shape:
        raise ValueError(f"segment_id has shape {segment_id.shape}; it must be [B] = "
                         f"{token.shape}, the shape of token")
      segment_ids = segment_id[:, None]
    logits, state = self.prefill(token[:, None], state, segment_ids)
    return logits[:, 0], state

  def save_pretrained(self, directory: str, **kwargs) -> str:
    """Writes this model's parameters and config to ``directory`` (``nlx.pretrained``; read back
    by ``nlx.from_pretrained``). ``kwargs``: ``dtype``, ``tokenizer``."""
    from nlx import pretrained  # pylint: disable=g-import-not-at-top
    return pretrained.save_pretrained(self, directory, **kwargs)


def build_model(config: Any, *, rngs: nnx.Rngs) -> LM:
  """The ``LM`` of ``config`` (``config.model``: a ConfigDict, a mapping or a ``ModelConfig``)."""
  import nlx.nn.families  # pylint: disable=g-import-not-at-top,unused-import  (registers them)
  return LM(ModelConfig.from_config(config), rngs=rngs)
