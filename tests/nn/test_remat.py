"""``model.remat``: the same logits and gradients with and without rematerialisation, less
temporary memory in the compiled train step, and a clear error for an unknown policy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nlx import configs
from nlx.nn import ModelConfig, build_model
from nlx.train import sharding
from nlx.train import step as step_lib


def _tokens():
  return jax.random.randint(jax.random.PRNGKey(1), (2, 33), 0, 256)


def _logits_and_grads(family: str, remat: str):
  return _whole_call(_model(family, [f"model.remat={remat}"]))[1:]


def _model(family: str, overrides: list):
  cfg = configs.load(f"configs/{family}.py:tiny", overrides)
  return build_model(cfg.model, rngs=nnx.Rngs(0))


def _whole_call(model):
  """``(params, logits, grads)`` of the model's loss on ``_tokens()``."""
  graphdef, params = nnx.split(model)
  tokens = _tokens()

  def loss(p):
    logits = nnx.merge(graphdef, p)(tokens[:, :-1])
    labels = jax.nn.one_hot(tokens[:, 1:], logits.shape[-1])
    return -(jax.nn.log_softmax(logits) * labels).sum(-1).mean(), logits

  (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
  return params, logits, grads


@pytest.mark.parametrize("family", [
    "transformer", pytest.param("gated_deltanet", marks=pytest.mark.slow)])
def test_remat_gives_the_same_logits_and_gradients(family):
  ref_logits, ref_grads = _logits_and_grads(family, "none")
  flat_ref = jax.tree.leaves(ref_grads)
  assert any(float(jnp.abs(g).max()) > 0 for g in flat_ref)
  for remat in ("full", "dots"):
    logits, grads = _logits_and_grads(family, remat)
    np.testing.assert_allclose(logits, ref_logits, rtol=1e-6, atol=1e-6, err_msg=remat)
    flat = jax.tree.leaves(grads)
    assert len(flat) == len(flat_ref)
    for g, g_ref in zip(flat, flat_ref):
      # atol: float32 rounding of a recomputed forward (6e-7 on Gated DeltaNet's gradients)
      np.testing.assert_allclose(g, g_ref, rtol=1e-5, atol=1e-6, err_msg=remat)


def _temp_bytes(remat: str) -> int:
  """Temporary bytes of the compiled train step of a 2-layer model on 4 x 128 tokens."""
  # The rolled layer scan of the paper presets (the tiny presets unroll it, where XLA:CPU keeps
  # nearly as much with remat as without: docs/TRAINING.md, "Rematerialisation").
  cfg = configs.load("configs/transformer.py:tiny",
                     [f"model.remat={remat}", "model.n_layers=2", "train.batch_size=4",
                      "train.seq_len=128", "model.scan_layers=True"])
  run = configs.validate(cfg, n_devices=1)
  trainer = step_lib.build(run, sharding.make_mesh(run.mesh, jax.devices()[:1]))
  batch = jax.ShapeDtypeStruct((4, 129), jnp.int32, sharding=trainer.batch_sharding)
  compiled = step_lib.jit_train_step(trainer).lower(trainer.abstract_state, batch).compile()
  return compiled.memory_analysis().temp_size_in_bytes


def test_remat_lowers_the_train_steps_temporary_memory():
  none, full = _temp_bytes("none"), _temp_bytes("full")
  # Without remat the backward pass keeps every layer's activations (attention probabilities,
  # MLP hidden units); "full" keeps only each layer's input.
  assert full < none / 2, (none, full)


def test_unknown_remat_is_refused_by_name():
  with pytest.raises(ValueError, match=r"model\.remat='some'.*'none', 'full', 'dots'"):
    ModelConfig(remat="some")


def _run(family: str, overrides: list):
  """Logits and gradients of a whole call, and the logits and states of prefill then one step."""
  model = _model(family, overrides)
  params, logits, grads = _whole_call(model)
  state, tokens = model.init_state(2, 64), _tokens()
  prefill_logits, state = model.prefill(tokens[:, :20], state)
  step_logits, state = model.step(tokens[:, 20], state)
  return params, logits, grads, (prefill_logits, step_logits, state["layers"])


@pytest.mark.parametrize("family", [
    "transformer", "titans_lmm", pytest.param("hope", marks=pytest.mark.slow)])
def test_unrolled_layers_compute_what_the_scan_does(family):
  """``model.scan_layers=False`` unrolls the loop over the stacked layer groups: the parameters
  (so checkpoints), logits, gradients and stateful calls are those of the rolled scan."""
  params, logits, grads, stateful = _run(family, ["model.scan_layers=True"])
  params_u, logits_u, grads_u, stateful_u = _run(family, ["model.scan_layers=False"])
  assert jax.tree.structure(params) == jax.tree.structure(params_u)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params_u)):
    assert a.shape == b.shape and np.array_equal(a, b)
  assert any(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads))
  np.testing.assert_allclose(logits_u, logits, rtol=1e-6, atol=1e-6)
  for g_u, g in zip(jax.tree.leaves(grads_u), jax.tree.leaves(grads)):
    np.testing.assert_allclose(g_u, g, rtol=1e-5, atol=1e-7)
  assert jax.tree.structure(stateful) == jax.tree.structure(stateful_u)
  for a_u, a in zip(jax.tree.leaves(stateful_u), jax.tree.leaves(stateful)):
    np.testing.assert_allclose(a_u, a, rtol=1e-5, atol=1e-6)


def test_scan_layers_must_be_a_bool():
  with pytest.raises(ValueError, match=r"model\.scan_layers must be a bool"):
    configs.load("configs/transformer.py:tiny", ["model.scan_layers=2"])
