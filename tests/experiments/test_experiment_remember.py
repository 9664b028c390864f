"""Smoke test of experiments.remember: facts and questions, accuracy at the answers, HOPE's
whole state across a real orbax save / restore (split == one call; ~20 s on 2 cores, mostly the
compiles of a HOPE model), bad flags refused by name, and (slow: a second process) the main path
with a Transformer++ trained 2 steps and the answer phase in a subprocess."""

import json
import os

import jax
import numpy as np
import pytest
from flax import nnx

import nlx
from experiments import remember


def test_facts_are_padded_to_the_chunk_and_questions_ask_them():
  ex = remember.examples(0, 5, 2, pairs=3, vocab=16, chunk=4)
  assert ex["facts"].shape == (2, 8) and ex["questions"].shape == (2, 6)
  np.testing.assert_array_equal(ex["facts"][:, 6:], 0)  # pad up to the chunk multiple
  np.testing.assert_array_equal(ex["mask"], [[1, 0, 1, 0, 1, 0]] * 2)
  for facts, questions, targets in zip(ex["facts"], ex["questions"], ex["targets"]):
    pairs = dict(zip(facts[0:6:2], facts[1:6:2]))
    for key, answer, target in zip(questions[0::2], questions[1::2], targets[0::2]):
      assert pairs[key] == answer == target  # the value the facts paired with the key
  again = remember.examples(0, 5, 2, pairs=3, vocab=16, chunk=4)  # a function of (seed, index)
  np.testing.assert_array_equal(again["questions"], ex["questions"])
  assert remember.facts_length(8, 16) == 16 and remember.facts_length(9, 16) == 32


def test_answer_accuracy_counts_masked_positions_only():
  pred = np.array([[3, 9, 4, 9], [3, 9, 5, 9]])
  targets = np.array([[3, 0, 4, 0], [3, 0, 4, 0]])
  mask = np.array([[1, 0, 1, 0], [1, 0, 1, 0]], np.float32)
  assert remember.answer_accuracy(pred, targets, mask) == {"token": 0.75, "sequence": 0.5}
  logits = np.eye(10)[pred]  # [2, 4, 10]: argmax == pred
  assert remember.answer_accuracy(logits, targets, mask) == {"token": 0.75, "sequence": 0.5}


def test_hope_state_through_orbax_continues_like_one_call(tmp_path):
  cfg = remember.study.model_config("hope", vocab_size=16, d_model=16, n_layers=1, n_heads=1,
                                    mlp_dim=16, memory_chunk_size=4, cms_periods=(2, 4))
  model = nlx.build_model(cfg, rngs=nnx.Rngs(0))
  ex = remember.examples(1, 0, 2, pairs=4, vocab=16, chunk=remember.memory_chunk(cfg))
  n, f = ex["facts"].shape  # facts and questions of 8 tokens: one compiled prefill for both
  full = remember.one_call(model, remember.one_call_batch(ex).inputs)[:, f:]
  _, state = remember.prefill(model, ex["facts"], remember.fresh_state(model, n, f + 8))
  remember.save_state(state, str(tmp_path / "state"))
  restored = remember.restore_state(model, n, f + 8, str(tmp_path / "state"))
  assert jax.tree.structure(restored) == jax.tree.structure(state)
  assert "cms" in str(jax.tree_util.tree_structure(state)).lower() or len(jax.tree.leaves(
      state)) > 10  # the CMS levels belong to the state
  split, _ = remember.prefill(model, ex["questions"], restored)
  assert remember.check_split_equals_one_call(split, full) < 1e-5
  fresh, _ = remember.prefill(model, ex["questions"], remember.fresh_state(model, n, f + 8))
  assert np.abs(fresh - full).max() > 1e-4  # the facts matter: without them the logits differ
  with pytest.raises(AssertionError, match="differs from one call"):
    remember.check_split_equals_one_call(fresh, full)


@pytest.mark.slow  # ~15 s more on 2 cores (a subprocess imports JAX and compiles again)
def test_main_writes_outputs_with_the_answer_phase_in_a_subprocess(tmp_path):
  out = str(tmp_path / "out")
  paths = remember.main(["--out", out, "--steps", "2", "--eval_examples", "2",
                         "--families", "transformer"])
  assert all(os.path.isfile(paths[kind]) for kind in ("json", "md", "png"))
  with open(paths["json"], encoding="utf-8") as f:
    result = json.load(f)
  assert result["answer_process"]["pid"] != os.getpid()  # answered in another process
  assert len(result["rows"]) == 3
  assert all(0.0 <= r["token_acc"] <= 1.0 and 0.0 <= r["sequence_acc"] <= 1.0
             for r in result["rows"])
  assert result["answer_process"]["transformer"]["max_abs_diff_vs_one_call"] < 1e-4
  assert not os.path.exists(os.path.join(out, "states"))  # states removed after answering
  assert "| Transformer++ | in the restored state |" in open(paths["md"], encoding="utf-8").read()


def test_bad_flags_are_refused_by_name(tmp_path):
  with pytest.raises(ValueError, match=r"--families: 'mamba9' is not one of"):
    remember.main(["--out", str(tmp_path / "x"), "--families", "mamba9"])
  with pytest.raises(FileNotFoundError, match=r"--out=.*settings.json"):
    remember.main(["--phase", "answer", "--out", str(tmp_path / "missing")])


def test_cpu_preset_builds_and_the_sanity_row_reads_the_one_call_bound():
  s = remember.PRESETS["cpu"]
  for family in remember.FAMILIES:
    assert remember.model_cfg(family, s).init_std == 1.0
  ex = remember.examples(0, remember.EVAL_START, 4, pairs=s["pairs"], vocab=s["vocab"],
                         chunk=remember.memory_chunk(remember.model_cfg("hope", s)))
  train = remember.examples(0, 0, 4, pairs=s["pairs"], vocab=s["vocab"],
                            chunk=remember.memory_chunk(remember.model_cfg("hope", s)))
  assert not np.array_equal(ex["facts"], train["facts"])  # held-out indices
  read = {"transformer": {"one_call": {"token": 0.95}}, "hope": {"one_call": {"token": 0.1}}}
  answered = {"transformer": {"max_abs_diff_vs_one_call": 1e-6},
              "hope": {"max_abs_diff_vs_one_call": 2e-6}}
  san = remember.sanity(read, answered, 1 / 32)
  assert san["holds"] and san["max_abs_diff"] == 2e-6
  read["transformer"]["one_call"]["token"] = 0.3
  assert not remember.sanity(read, answered, 1 / 32)["holds"]
