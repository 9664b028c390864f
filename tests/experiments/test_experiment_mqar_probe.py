"""experiments.mqar_probe: the measures on hand-made queries and keys, and a probe of a saved run."""

import numpy as np
import pytest

from experiments import mqar, mqar_probe


def _unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_match_and_cosine_on_hand_made_queries_and_keys():
  rng = np.random.default_rng(0)
  keys = _unit(rng.normal(size=(3, 4, 2, 16)))  # [B, P, H, d]
  own = np.stack([rng.permutation(4) for _ in range(3)])  # query p asks for pair own[b, p]
  q = np.take_along_axis(keys, own[:, :, None, None], 1)  # each query equals its pair's key
  np.testing.assert_allclose(mqar_probe._match(q, keys, own), [1.0, 1.0])
  np.testing.assert_allclose(mqar_probe._match(q, keys, (own + 1) % 4), [0.0, 0.0])
  same = np.broadcast_to(keys[:, :1], keys.shape)  # every query the same vector
  np.testing.assert_allclose(mqar_probe._mean_offdiagonal_cosine(same), [1.0, 1.0], rtol=1e-6)
  cos = mqar_probe._mean_offdiagonal_cosine(keys)
  assert np.all(np.abs(cos) < 0.5)  # random 16-d unit vectors: nearly orthogonal


def test_probe_reads_every_layer_of_a_saved_run(tmp_path):
  out = str(tmp_path / "run")
  mqar.main(["--scale", "cpu", "--families", "titans_lmm", "--widths", "16", "--pairs", "2",
             "--vocab_size", "64", "--lrs", "1e-2", "--steps", "3", "--eval_sequences", "8",
             "--budget_minutes", "0", "--checkpoint_minutes", "0", "--out", out])
  result = mqar_probe.main(["--runs", out, "--sequences", "6", "--out", str(tmp_path / "p")])
  (run,) = result["runs"]
  assert len(run["layers"]) == mqar.PRESETS["cpu"]["n_layers"]  # one QKV per layer, in a scan
  for layer in run["layers"]:
    assert len(layer["match"]) == mqar.PRESETS["cpu"]["n_heads"]
    assert all(0.0 <= m <= 1.0 for m in layer["match"] + layer["match_key_token"])
    assert all(-1.0 <= c <= 1.0 + 1e-6 for c in layer["cos_queries"] + layer["cos_keys"])
  md = (tmp_path / "p" / "mqar_probe.md").read_text()
  assert "| Titans (LMM) d=16 P=2 lr=0.01, 3 steps, memory_chunk_size=4" in md
  mqar.main(["--scale", "cpu", "--families", "titans_lmm", "--widths", "16", "--pairs", "2",
             "--vocab_size", "64", "--lrs", "1e-2", "--steps", "1", "--eval_sequences", "4",
             "--budget_minutes", "0", "--checkpoint_minutes", "-1", "--out", str(tmp_path / "b")])
  with pytest.raises(ValueError, match="kept no weights"):
    mqar_probe.main(["--runs", str(tmp_path / "b"), "--out", str(tmp_path / "q")])
