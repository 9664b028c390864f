"""experiments.continual (and experiments.continual_data): class split, label encoding, metrics,
ICL context, the datasets read from small files in the layout of their releases, the one-line
error of a missing dataset, smoke runs."""

import csv
import json
import os

import numpy as np
import pytest

from experiments import continual, study
from experiments import continual_data as data_lib
from nlx.train import fitting


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  """A datasets directory with small CLINC150, Banking77 and DBpedia-14 files (the files'
  layouts: clinc/oos-eval data_full.json, PolyAI banking_data csv, O-LoRA test.json)."""
  root = tmp_path_factory.mktemp("data")
  (root / "clinc150").mkdir()
  clinc = {split: [[f"please {split} intent {c} example {i}", f"intent_{c}"]
                   for c in range(16) for i in range(6)] for split in ("train", "test", "val")}
  (root / "clinc150" / "data_full.json").write_text(json.dumps(clinc), encoding="utf-8")
  (root / "banking77").mkdir()
  for split in ("train", "test"):
    with open(root / "banking77" / f"{split}.csv", "w", encoding="utf-8", newline="") as f:
      writer = csv.writer(f)
      writer.writerow(["text", "category"])
      writer.writerows([f"my card {c}, {split} {i}", f"card_{c}"] for c in range(16)
                       for i in range(6))
  (root / "dbpedia14").mkdir()
  records = [{"sentence": f"{name} number {i} is described here.", "label": name}
             for name in ("Album", "Artist", "Company", "Film", "Village", "Plant", "Animal",
                          "Building", "Athlete", "Politician", "School", "Book", "Vehicle",
                          "River") for i in range(10)]
  (root / "dbpedia14" / "olora_test.json").write_text(json.dumps(records), encoding="utf-8")
  return str(root)


def test_class_split_disjoint_seeded():
  classes = [f"c{i}" for i in range(10)]
  groups = data_lib.class_split(classes, n_tasks=3, per_task=3, seed=0)
  assert [len(g) for g in groups] == [3, 3, 3]
  flat = [c for g in groups for c in g]
  assert len(set(flat)) == 9 and set(flat) <= set(classes)
  assert data_lib.class_split(list(reversed(classes)), 3, 3, seed=0) == groups  # order-free
  assert data_lib.class_split(classes, 3, 3, seed=1) != groups
  with pytest.raises(ValueError, match="needs 12 classes"):
    data_lib.class_split(classes, n_tasks=4, per_task=3, seed=0)


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
  assert [data_lib.label_token(k) for k in (0, 25, 26, 51, 52)] == [65, 90, 97, 122, 128]
  with pytest.raises(ValueError, match="no label byte"):
    data_lib.label_token(180)
  assert data_lib.clean("  hi\n there ", 5) == list(b"hi th")
  ex = data_lib.encode_examples([(list(b"hi"), 65), (list(b"abcdefgh"), 66)], seq_len=12)
  assert bytes(ex.tokens[0, :10].tolist()) == b"hi\nlabel: " and ex.pos[0] == 9
  assert bytes(ex.tokens[1].tolist()) == b"defgh\nlabel: "[-12:]  # cut on the left
  assert ex.pos[1] == 11
  np.testing.assert_array_equal(ex.label, [65, 66])
  batch = data_lib.train_batch(ex, step=0, batch=4, seed=0)
  assert batch.mask.sum() == 4 and (batch.mask.sum(1) == 1).all()
  rows = np.argmax(batch.mask, 1)
  assert set(batch.targets[np.arange(4), rows]) <= {65, 66}
  np.testing.assert_array_equal(batch.inputs, data_lib.train_batch(ex, 0, 4, 0).inputs)


def test_icl_prefix_holds_one_shot_per_seen_class():
  def task(labels):
    ex = data_lib.encode_examples([(list(b"x%d" % b), b) for b in labels], seq_len=16)
    return data_lib.Task(ex, ex, list(labels), [chr(b) for b in labels])

  tasks = [task([65, 66]), task([67, 68])]
  settings = {"icl_shots": 1, "icl_text": 8}
  first = bytes(data_lib.icl_prefix(tasks, 0, settings, seed=0))
  both = bytes(data_lib.icl_prefix(tasks, 1, settings, seed=0))
  assert sorted(first.split(b"\n")[1::2]) == [b"label: A", b"label: B"]
  assert sorted(both.split(b"\n")[1::2]) == [b"label: A", b"label: B", b"label: C", b"label: D"]
  assert b"x65\nlabel: A\n" in first


def test_dbpedia_split_is_disjoint_and_seeded(data_dir):
  data = data_lib.load_dataset("dbpedia14", data_dir, seed=0)
  assert len(data["train"]) == 14 and all(len(t) == 5 for t in data["train"].values())
  for label, texts in data["train"].items():
    assert not set(texts) & set(data["test"][label])
    assert len(set(texts) | set(data["test"][label])) == 10
  again = data_lib.load_dataset("dbpedia14", data_dir, seed=0)
  assert again["train"]["Album"] == data["train"]["Album"]
  assert data_lib.load_dataset("dbpedia14", data_dir, seed=1)["train"] != data["train"]


def test_clinc_and_banking_are_read_by_class(data_dir, monkeypatch):
  clinc = data_lib.load_dataset("clinc150", data_dir, seed=0)
  assert len(clinc["train"]) == 16
  assert clinc["test"]["intent_3"][0] == "please test intent 3 example 0"
  monkeypatch.setenv("NLX_DATA", data_dir)  # no --data: $NLX_DATA
  banking = data_lib.load_dataset("banking77", None, seed=0)
  assert sorted(banking) == ["test", "train"] and len(banking["train"]["card_5"]) == 6
  assert banking["train"]["card_5"][0] == "my card 5, train 0"


def test_bad_input_names_the_flag(tmp_path, monkeypatch):
  with pytest.raises(ValueError, match="--datasets.*'nope'"):
    data_lib.load_dataset("nope", str(tmp_path), 0)
  with pytest.raises(study.DataNotFound) as err:
    data_lib.load_dataset("clinc150", str(tmp_path), 0)
  message = str(err.value)
  assert "\n" not in message and "--data" in message and "$NLX_DATA" in message
  assert os.path.join(str(tmp_path), "clinc150", "data_full.json") in message
  assert "clinc/oos-eval" in message  # where to get it
  with pytest.raises(study.DataNotFound, match="banking77/train.csv"):
    continual.main(["--data", str(tmp_path / "missing"), "--datasets", "banking77"])
  monkeypatch.delenv("NLX_DATA", raising=False)
  with pytest.raises(study.DataNotFound, match=r"give --data DIR or set \$NLX_DATA"):
    continual.main(["--datasets", "dbpedia14"])
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


def test_smoke_hope_attention(tmp_path, data_dir):
  out = str(tmp_path / "out")
  misses = fitting.compiled_step.cache_info().misses
  continual.main(SMOKE + ["--methods", "Hope-attention", "--main-periods", "64", "--steps", "1",
                          "--out", out, "--data", data_dir])
  assert fitting.compiled_step.cache_info().misses == misses + 1  # one compile for 3 tasks
  result = _check_outputs(out, ["Hope-attention"])
  assert result["results"]["clinc150"]["Hope-attention"]["periods"] == [64]
  assert len(result["classes"]["clinc150"]) == 3


@pytest.mark.slow
def test_smoke_every_method_and_sweep(tmp_path, data_dir):
  out = str(tmp_path / "out")
  result = continual.main(SMOKE[:-4] + ["--levels", "1", "--lowest-periods", "32",
                                        "--main-periods", "16,32", "--out", out,
                                        "--data", data_dir])
  _check_outputs(out, continual.METHODS)
  assert [r["periods"] for r in result["sweep"]] == [[128], [16, 32]]


def test_cpu_preset_tasks_and_sanity_row(data_dir):
  """The cpu scale (seconds): its tasks are disjoint in classes, labels sit where the mask
  is, test texts are not training texts; the sanity row reads the accuracy matrix's diagonal."""
  s = continual.PRESETS["cpu"]
  assert set(s) == set(continual.PRESETS["tiny"])
  data = data_lib.load_dataset("clinc150", data_dir, 0)
  tasks = data_lib.make_tasks(data, dict(s, classes_per_task=4, n_train=4, n_test=2), seed=0)
  assert len(tasks) == s["n_tasks"]
  classes = [c for t in tasks for c in t.classes]
  assert len(classes) == len(set(classes))
  for t in tasks:
    batch = data_lib.train_batch(t.train, 0, 4, seed=0)
    rows = np.flatnonzero(batch.mask.sum(-1))
    assert len(rows) == 4 and (batch.mask.sum(-1) == 1).all()
    assert set(batch.targets[batch.mask > 0]) <= set(t.tokens)  # the label token, where counted
    train_rows = {tuple(r) for r in t.train.tokens}
    assert not any(tuple(r) in train_rows for r in t.test.tokens)
  good = {"fine-tune": {"acc_matrix": [[0.9, 0, 0], [0.1, 0.8, 0], [0, 0, 0.7]]}}
  bad = {"fine-tune": {"acc_matrix": [[0.3, 0, 0], [0.1, 0.2, 0], [0, 0, 0.4]]}}
  assert continual.current_task_accuracy(good["fine-tune"]) == pytest.approx(0.8)
  assert continual.sanity({"clinc150": good})["holds"]
  assert not continual.sanity({"clinc150": good, "banking77": bad})["holds"]
