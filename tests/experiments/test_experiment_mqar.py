"""experiments.mqar: the level mixture, the state count, bad flags and a smoke run."""

import json
import os

import numpy as np
import pytest
from flax import nnx

import nlx
from experiments import mqar


def test_rows_mix_levels_and_pad_to_the_longest():
  batch = mqar.mqar_rows(0, range(4), (2, 4), vocab_size=16)
  assert batch.inputs.shape == batch.targets.shape == batch.mask.shape == (4, 16)
  assert batch.mask.sum(-1).tolist() == [2, 4, 2, 4]  # P queries, level i mod 2
  row = batch.inputs[0]  # P = 2: k1 v1 k2 v2 q1 a1 q2 a2, then pad
  assert (row[8:] == 0).all()
  pairs = dict(zip(row[0:4:2].tolist(), row[1:4:2].tolist()))
  for t in (4, 6):
    assert batch.mask[0, t] == 1 and batch.targets[0, t] == pairs[int(row[t])]
    assert row[t + 1] == pairs[int(row[t])]
  assert batch.mask[0, [0, 1, 2, 3, 5, 7]].sum() == 0


def test_data_is_a_function_of_seed_and_index_and_test_is_disjoint():
  fn = mqar.train_batch_fn(3, (2, 4), 16, batch_size=4)
  np.testing.assert_array_equal(fn(5).inputs, fn(5).inputs)
  np.testing.assert_array_equal(fn(1).inputs, mqar.mqar_rows(3, range(4, 8), (2, 4), 16).inputs)
  test = mqar.test_batches(3, 1, (2, 4), 16, sequences=3, rows=2)
  assert [b.inputs.shape[0] for b in test] == [2, 1]
  assert all(b.mask.sum(-1).tolist() == [4] * len(b.mask) for b in test)  # level 1: P = 4
  train = mqar.mqar_rows(3, range(64), (2, 4), 16).inputs
  assert not any((train == row).all(-1).any() for b in test for row in b.inputs)


def test_state_floats_per_layer():
  settings = dict(mqar.PRESETS["tiny"], pairs=(4,))
  def count(family, width, t):
    model = nnx.eval_shape(lambda: nlx.build_model(mqar.config(family, width, settings),
                                                   rngs=nnx.Rngs(0)))
    return mqar.state_floats_per_layer(model, t)
  assert count("transformer", 32, 16) == 2 * 16 * 32  # K and V caches: 2 T d
  assert count("transformer", 32, 64) == 2 * 64 * 32
  gdn = count("gated_deltanet", 32, 16)
  assert gdn == 2 * 16 * 16 + 3 * 96  # heads dk dv + the conv cache of q, k, v; not T
  assert count("gated_deltanet", 32, 64) == gdn
  assert count("gated_deltanet", 64, 16) > gdn
  assert count("hope", 32, 16) > count("titans_lmm", 32, 16) > 0


def test_bad_flags_name_themselves(tmp_path):
  with pytest.raises(ValueError, match="--families.*'nope'"):
    mqar.main(["--families", "transformer,nope", "--out", str(tmp_path)])
  with pytest.raises(ValueError, match="--widths"):
    mqar.main(["--widths", "32,x", "--out", str(tmp_path)])
  with pytest.raises(ValueError, match="vocab_size"):
    mqar.main(["--pairs", "40", "--out", str(tmp_path)])  # 64 tokens hold 31 keys


def test_smoke_run_writes_outputs(tmp_path):
  out = mqar.main(["--families", "transformer", "--widths", "16", "--pairs", "2,4",
                   "--steps", "2", "--eval_sequences", "8", "--out", str(tmp_path)])
  for kind in ("json", "md", "png"):
    assert os.path.getsize(tmp_path / f"mqar.{kind}") > 0
  with open(tmp_path / "mqar.json", encoding="utf-8") as f:
    saved = json.load(f)
  (run,) = saved["runs"]
  assert run["family"] == "transformer" and run["d_model"] == 16 and len(run["losses"]) == 2
  for level in run["levels"].values():
    assert 0.0 <= level["accuracy"] <= 1.0
    assert level["state_floats_per_layer"] == 2 * level["seq_len"] * 16
  assert np.isfinite(run["final_loss"]) and out["runs"][0]["params"] > 0 and saved["complete"]
  assert run["skipped_steps"] == 0  # the shared step skipped no non-finite step
  assert "acc P=4 (T=16)" in (tmp_path / "mqar.md").read_text()


def test_a_diverged_run_is_named_in_the_table():
  levels = {"4": {"state_floats_per_layer": 1, "accuracy": 0.0}}
  run = dict(family="titans_lmm", d_model=8, params=1, train_seconds=1.0, final_loss=float("nan"),
             diverged_at_step=45, levels=levels)
  md = mqar.table([run, dict(run, diverged_at_step=None, final_loss=1.5)], (4,), vocab_size=16)
  assert "diverged (non-finite loss from step 45)" in md and "| 1.500 |" in md
  md = mqar.table([dict(run, skipped_steps=3)], (4,), vocab_size=16)
  assert "diverged (non-finite loss from step 45; 3 steps skipped)" in md
