"""Tests of nlx.convert: level stacking builds a Hope-attention model from a Transformer++ whose
logits equal the original's exactly with inner learning rates 0 (whole sequences and stateful
decoding), and which learns in context with cms_lr > 0; mismatched configs are refused."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nlx import convert
from nlx.nn import build_model

BASE = dict(d_model=32, n_layers=2, n_heads=2, mlp_dim=48, vocab_size=61, max_seq_len=16,
            impl="recurrent")


def models(**hope_fields):
  transformer = build_model(dict(BASE, family="transformer"), rngs=nnx.Rngs(7))
  cfg = dict(BASE, family="hope_attention", cms_periods=(2, 4, 8), cms_lr=0.0, **hope_fields)
  return transformer, convert.transformer_to_hope_attention(transformer, cfg)


@pytest.mark.parametrize("variant", ["sequential", "independent"])
def test_converted_model_with_zero_rates_is_the_transformer_exactly(variant):
  transformer, hope = models(cms_variant=variant)
  tok = jax.random.randint(jax.random.PRNGKey(0), (2, 12), 0, 61)
  expected = transformer(tok)
  np.testing.assert_array_equal(hope(tok), expected)
  logits, state = hope.prefill(tok[:, :5], hope.init_state(2))
  want, want_state = transformer.prefill(tok[:, :5], transformer.init_state(2))
  np.testing.assert_array_equal(logits, want)
  np.testing.assert_array_equal(hope.step(tok[:, 5], state)[0],
                                transformer.step(tok[:, 5], want_state)[0])


def test_converted_model_from_a_state_learns_in_context_with_positive_rates():
  transformer, _ = models()
  cfg = dict(BASE, family="hope_attention", cms_periods=(2, 4, 8), cms_lr=0.5)
  hope = convert.transformer_to_hope_attention(nnx.state(transformer, nnx.Param), cfg,
                                               source_cfg=dict(BASE, family="transformer"),
                                               level=0)
  tok = jax.random.randint(jax.random.PRNGKey(0), (1, 12), 0, 61)
  expected, got = transformer(tok), hope(tok)
  np.testing.assert_array_equal(got[:, :2], expected[:, :2])  # before the first update
  assert float(jnp.abs(got[:, 2:] - expected[:, 2:]).max()) > 1e-5


@pytest.mark.parametrize("fields, kwargs, message", [
    (dict(mlp_dim=64), {}, r"model.mlp_dim=64 of cfg must equal the Transformer's 48"),
    (dict(family="hope"), {}, r"cfg must be family 'hope_attention'"),
    ({}, dict(level=3), r"level=3 is not a CMS level"),
])
def test_mismatches_are_refused(fields, kwargs, message):
  transformer = build_model(dict(BASE, family="transformer"), rngs=nnx.Rngs(7))
  cfg = dict(BASE, family="hope_attention", cms_periods=(2, 4, 8), cms_lr=0.0)
  cfg.update(fields)
  with pytest.raises(ValueError, match=message):
    convert.transformer_to_hope_attention(transformer, cfg, **kwargs)
