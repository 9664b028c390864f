"""experiments/continual.py: class split, label encoding, metrics, ICL context, smoke runs."""

import json
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "experiments"))

import continual  # pylint: disable=g-import-not-at-top,wrong-import-position
import study  # pylint: disable=g-import-not-at-top,wrong-import-position

HAS_DATA = os.path.isdir(os.path.join(study.DEFAULT_DATA, "clinc150"))
needs_data = pytest.mark.skipif(not HAS_DATA, reason="shared/data is not there")


def test_class_split_disjoint_seeded():
  classes = [f"c{i}" for i in range(10)]
  groups = continual.class_split(classes, n_tasks=3, per_task=3, seed=0)
  assert [len(g) for g in groups] == [3, 3, 3]
  flat = [c for g in groups for c in g]
  assert len(set(flat)) == 9 and set(flat) <= set(classes)
  assert continual.class_split(list(reversed(classes)), 3, 3, seed=0) == groups  # order-free
  assert continual.class_split(classes, 3, 3, seed=1) != groups
  with pytest.raises(ValueError, match="needs 12 classes"):
    continual.class_split(classes, n_tasks=4, per_task=3, seed=0)


def test_average_accuracy_and_forgetting_hand_made():
  acc = np.array([[0.8, 0.0, 0.0],
                  [0.2, 0.6, 0.0],
                  [0.1, 0.3, 0.9]])
  avg = continual.average_accuracy(acc, sizes=[10, 10, 20])
  np.testing.assert_allclose(avg, [0.8, 0.4, (1.0 + 3.0 + 18.0) / 40])
  assert continual.forgetting(acc) == pytest.approx(((0.8 - 0.1) + (0.6 - 0.3)) / 2)
  # The max is over earlier rows: task 0 peaked after task 1 here.
  acc2 = np.array([[0.5, 0.0, 0.0], [0.7, 0.4, 0.0], [0.6, 0.4, 1.0]])
  assert continual.forgetting(acc2) == pytest.approx(((0.7 - 0.6) + 0.0) / 2)
  assert continual.forgetting(np.array([[0.9]])) == 0.0


def test_classify_argmax_over_allowed_tokens():
  logits = np.array([[1.0, 5.0, 3.0, 9.0], [4.0, 0.0, 2.0, 1.0]])
  np.testing.assert_array_equal(continual.classify(logits, [1, 2]), [1, 2])
  np.testing.assert_array_equal(continual.classify(logits, [3]), [3, 3])


def test_label_tokens_and_encoding():
  assert [continual.label_token(k) for k in (0, 25, 26, 51, 52)] == [65, 90, 97, 122, 128]
  with pytest.raises(ValueError, match="no label byte"):
    continual.label_token(180)
  assert continual.clean("  hi\n there ", 5) == list(b"hi th")
  ex = continual.encode_examples([(list(b"hi"), 65), (list(b"abcdefgh"), 66)], seq_len=12)
  assert bytes(ex.tokens[0, :10].tolist()) == b"hi\nlabel: " and ex.pos[0] == 9
  assert bytes(ex.tokens[1].tolist()) == b"defgh\nlabel: "[-12:]  # cut on the left
  assert ex.pos[1] == 11
  np.testing.assert_array_equal(ex.label, [65, 66])
  batch = continual.train_batch(ex, step=0, batch=4, seed=0)
  assert batch.mask.sum() == 4 and (batch.mask.sum(1) == 1).all()
  rows = np.argmax(batch.mask, 1)
  assert set(batch.targets[np.arange(4), rows]) <= {65, 66}
  np.testing.assert_array_equal(batch.inputs, continual.train_batch(ex, 0, 4, 0).inputs)


def test_icl_prefix_holds_one_shot_per_seen_class():
  def task(labels):
    ex = continual.encode_examples([(list(b"x%d" % b), b) for b in labels], seq_len=16)
    return continual.Task(ex, ex, list(labels), [chr(b) for b in labels])

  tasks = [task([65, 66]), task([67, 68])]
  settings = {"icl_shots": 1, "icl_text": 8}
  first = bytes(continual.icl_prefix(tasks, 0, settings, seed=0))
  both = bytes(continual.icl_prefix(tasks, 1, settings, seed=0))
  assert sorted(first.split(b"\n")[1::2]) == [b"label: A", b"label: B"]
  assert sorted(both.split(b"\n")[1::2]) == [b"label: A", b"label: B", b"label: C", b"label: D"]
  assert b"x65\nlabel: A\n" in first


@needs_data
def test_dbpedia_split_is_disjoint_and_seeded():
  data = continual.load_dataset("dbpedia14", study.DEFAULT_DATA, seed=0)
  assert len(data["train"]) == 14
  for label, texts in data["train"].items():
    assert not set(texts) & set(data["test"][label])
  again = continual.load_dataset("dbpedia14", study.DEFAULT_DATA, seed=0)
  assert again["train"]["Album"][:3] == data["train"]["Album"][:3]


def test_bad_input_names_the_flag(tmp_path):
  with pytest.raises(ValueError, match="--datasets.*'nope'"):
    continual.load_dataset("nope", str(tmp_path), 0)
  with pytest.raises(FileNotFoundError, match="--data="):
    continual.load_dataset("clinc150", str(tmp_path), 0)
  with pytest.raises(FileNotFoundError, match="--data="):
    continual.main(["--data", str(tmp_path / "missing")])
  with pytest.raises(ValueError, match="--methods.*'bogus'"):
    continual.main(["--methods", "bogus"])


SMOKE = ["--datasets", "clinc150", "--steps", "2", "--pretrain-steps", "0", "--n-train", "4",
         "--n-test", "2", "--levels", "", "--lowest-periods", ""]


def _check_outputs(out, methods):
  for kind in ("json", "md", "png"):
    assert os.path.getsize(os.path.join(out, f"continual.{kind}")) > 0
  with open(os.path.join(out, "continual.json"), encoding="utf-8") as f:
    result = json.load(f)
  per = result["results"]["clinc150"]
  assert sorted(per) == sorted(methods)
  for res in per.values():
    assert len(res["avg_acc"]) == 3 and all(0 <= a <= 1 for a in res["avg_acc"])
    assert -1 <= res["forgetting"] <= 1
  return result


@needs_data
def test_smoke_hope_attention(tmp_path):
  out = str(tmp_path / "out")
  continual.main(SMOKE + ["--methods", "Hope-attention", "--main-periods", "64", "--steps", "1",
                          "--out", out])
  result = _check_outputs(out, ["Hope-attention"])
  assert result["results"]["clinc150"]["Hope-attention"]["periods"] == [64]
  assert len(result["classes"]["clinc150"]) == 3


@needs_data
@pytest.mark.slow
def test_smoke_every_method_and_sweep(tmp_path):
  out = str(tmp_path / "out")
  result = continual.main(SMOKE[:-4] + ["--levels", "1", "--lowest-periods", "32",
                                        "--main-periods", "16,32", "--out", out])
  _check_outputs(out, continual.METHODS)
  assert [r["periods"] for r in result["sweep"]] == [[128], [16, 32]]
