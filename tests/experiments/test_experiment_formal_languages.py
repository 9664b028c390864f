"""experiments.formal_languages: the language generators and labels, the string accuracy, bad
flags, one compile per model config, and the main path at the smallest settings (2 steps,
Transformer++, two languages)."""

import json
import os

import numpy as np
import pytest
from flax import nnx

from experiments import formal_languages as fl
from nlx.train import fitting

LANG = fl.LANGUAGES


def test_anbn_next_character_sets():
  # labels a, b, T: a's allow a or b; once a b is read, n is known and the rest is forced.
  np.testing.assert_array_equal(LANG["anbn"].targets("aabb"),
                                [[1, 1, 0], [1, 1, 0], [0, 1, 0], [0, 0, 1]])
  np.testing.assert_array_equal(LANG["anbn"].targets("ab"), [[1, 1, 0], [0, 0, 1]])
  np.testing.assert_array_equal(LANG["anbncn"].targets("aabbcc"),
                                [[1, 1, 0, 0], [1, 1, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0],
                                 [0, 0, 1, 0], [0, 0, 0, 1]])


def test_membership_labels():
  # one-hot (out, in) of each prefix
  np.testing.assert_array_equal(LANG["parity"].targets("0110")[:, 1], [1, 0, 1, 1])
  np.testing.assert_array_equal(LANG["aa"].targets("aaaa")[:, 1], [0, 1, 0, 1])
  np.testing.assert_array_equal(LANG["abab"].targets("abababab")[:, 1], [0, 0, 0, 1] * 2)
  assert (LANG["parity"].targets("0110").sum(1) == 1).all()


def test_strings_belong_to_their_languages():
  for i in range(40):
    s = fl.example(LANG["parity"], 0, fl.TRAIN, i, 1, 50)
    assert 1 <= len(s) <= 50 and set(s) <= {"0", "1"} and s.count("1") % 2 == 0
    n = len(fl.example(LANG["anbncn"], 0, fl.TRAIN, i, 1, 50)) // 3
    assert fl.example(LANG["anbncn"], 0, fl.TRAIN, i, 1, 50) == "a" * n + "b" * n + "c" * n
    assert fl.example(LANG["abab"], 0, fl.BIN1, i, 51, 100) in {"abab" * k for k in range(13, 26)}


def is_dyck2(s):
  stack = []
  for c in s:
    if c in "([":
      stack.append(c)
    elif not stack or stack.pop() != "([)]"["([)]".index(c) - 2]:
      return False
  return not stack


def test_shuffle2_is_a_shuffle_of_two_dyck1_words():
  both = crossing = 0
  for i in range(60):
    s = fl.example(LANG["shuffle2"], 3, fl.TRAIN, i, 1, 50)
    assert len(s) % 2 == 0 and 2 <= len(s) <= 50
    for pair in ("()", "[]"):
      depth = np.cumsum([{pair[0]: 1, pair[1]: -1}.get(c, 0) for c in s])
      assert depth.min() >= 0 and depth[-1] == 0
    both += ("(" in s and "[" in s)
    crossing += not is_dyck2(s)  # e.g. "([)]": in Shuffle-2, not well nested
  assert both > 30 and crossing > 10
  assert is_dyck2("([])[]") and not is_dyck2("([)]")
  # labels over ( ) [ ]: openings always allowed, a closing bracket while its kind is open
  np.testing.assert_array_equal(LANG["shuffle2"].targets("([)]"),
                                [[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 1, 1], [1, 0, 1, 0]])


def test_examples_are_a_pure_function_of_seed_stream_index():
  lang = LANG["shuffle2"]
  assert fl.example(lang, 1, fl.TRAIN, 7, 1, 50) == fl.example(lang, 1, fl.TRAIN, 7, 1, 50)
  assert len({fl.example(lang, 1, fl.TRAIN, i, 1, 50) for i in range(20)}) > 15
  assert fl.example(lang, 1, fl.TRAIN, 7, 1, 50) != fl.example(lang, 2, fl.TRAIN, 7, 1, 50)
  bin1 = fl.bin_strings(LANG["anbn"], 0, fl.BIN1, 200, 51, 100)
  assert sorted(map(len, bin1)) == list(range(52, 101, 2))  # every aⁿbⁿ of the bin, once


def test_score_counts_a_string_right_only_if_every_position_is():
  targets = np.zeros((2, 3, 4), np.float32)
  targets[:, :, 0] = 1
  predicted = targets > 0.5
  predicted[1, 1, 0] = False  # one wrong label in row 1
  predicted[0, 2, 3] = True  # a wrong value outside the mask (position) of row 0: ignored
  predicted[:, :, 2] = True  # label 2 is not a label of the language: ignored
  mask = np.array([[1, 1, 0], [1, 1, 1]], np.float32)
  got = fl.score(predicted, targets, mask, np.array([1, 1, 0, 0], np.float32))
  assert got["string"] == 0.5 and got["strings"] == 2
  assert got["position"] == pytest.approx(4 / 5)


def test_bad_flags_name_the_flag_and_value(tmp_path):
  with pytest.raises(ValueError, match="--families.*'nope'"):
    fl.main(["--families", "nope", "--out", str(tmp_path)])
  with pytest.raises(ValueError, match="--languages.*'dyck9'"):
    fl.main(["--languages", "dyck9", "--out", str(tmp_path)])


def test_one_compiled_step_per_model_config():
  """Every language of a family trains through ``fit``'s one compiled step (one graphdef per
  config, one optimizer per (steps, lr), one loss function)."""
  settings = dict(fl.PRESETS["tiny"], steps=2, lr=0.0123)  # an optimizer no other test builds
  cfg = fl.family_config("transformer", settings)
  misses = fitting.compiled_step.cache_info().misses
  models = [fl.train_language(cfg, LANG[name], settings, seed=0)[0] for name in ("parity", "aa")]
  assert fitting.compiled_step.cache_info().misses == misses + 1
  graphdefs = [nnx.split(m, nnx.Param, ...)[0] for m in models]
  assert graphdefs[0] == graphdefs[1]
  step = fitting.compiled_step(graphdefs[0], fl._optimizer(2, 0.0123), fl.language_loss)
  assert step._cache_size() == 1  # pylint: disable=protected-access  (one XLA program)


def test_main_writes_json_markdown_and_png(tmp_path):
  out = str(tmp_path / "fl")
  results = fl.main(["--families", "transformer", "--languages", "anbn,parity", "--steps", "2",
                     "--eval_size", "8", "--out", out])
  for kind in ("json", "md", "png"):
    assert os.path.getsize(os.path.join(out, f"formal_languages.{kind}")) > 0
  with open(os.path.join(out, "formal_languages.json"), encoding="utf-8") as f:
    saved = json.load(f)
  runs = saved["families"]["transformer"]["languages"]
  assert set(runs) == {"anbn", "parity"} and saved["settings"]["steps"] == 2
  for r in runs.values():
    assert len(r["losses"]) == 2 and all(0 < x < 5 for x in r["losses"])
    for b in ("bin0", "bin1"):
      assert 0.0 <= r[b]["string"] <= r[b]["position"] <= 1.0 and r[b]["strings"] > 0
  assert saved["languages"]["parity"]["bin1_lengths"][0] >= 51
  with open(os.path.join(out, "formal_languages.md"), encoding="utf-8") as f:
    assert "| aⁿbⁿ |" in f.read()
  assert results["families"]["transformer"]["params"] > 0
