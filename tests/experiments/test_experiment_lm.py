"""experiments.lm: data windows, the datasets directory (--data, $NLX_DATA, the one-line error),
bad flags, and the main path on a 2-step run on a small PTB-like corpus (Transformer++ for both
parts, so that no HOPE compiles here)."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from experiments import lm as lm_study
from experiments import study

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def lm():
  return lm_study


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  """A datasets directory holding ptb/ptb.{train,valid}.txt (a few KB of PTB-like text)."""
  root = tmp_path_factory.mktemp("data")
  (root / "ptb").mkdir()
  rng = np.random.default_rng(0)
  words = ["the", "market", "said", "n't", "<unk>", "shares", "of", "N", "company", "year"]
  for split, n in (("train", 3000), ("valid", 600)):
    text = "\n".join(" " + " ".join(rng.choice(words, 12)) + " " for _ in range(n // 12))
    (root / "ptb" / f"ptb.{split}.txt").write_text(text, encoding="utf-8")
  return str(root)


def test_batches_are_a_pure_function_of_seed_and_step(lm):
  stream = np.arange(1000, dtype=np.uint8) % 251
  a, b = lm.train_batch(stream, 0, 3, 4, 8), lm.train_batch(stream, 0, 3, 4, 8)
  assert np.array_equal(a.inputs, b.inputs)
  assert not np.array_equal(a.inputs, lm.train_batch(stream, 0, 4, 4, 8).inputs)
  assert a.inputs.shape == (4, 8) and np.array_equal(a.inputs[:, 1:], a.targets[:, :-1])
  windows = lm.eval_windows(np.arange(100, dtype=np.uint8), 3, 9)
  assert windows[:, 0].tolist() == [0, 45, 90] and windows.shape == (3, 10)


def test_perplexity_and_bits_per_byte(lm):
  m = lm.metrics(math.log(4.0))
  assert m["val_ppl"] == pytest.approx(4.0) and m["val_bpb"] == pytest.approx(2.0)


def test_bad_flags_name_the_flag_and_value(lm, tmp_path, monkeypatch):
  with pytest.raises(ValueError, match="--families: unknown 'gpt'"):
    lm.main(["--families", "gpt", "--out", str(tmp_path)])
  with pytest.raises(ValueError, match="--ablations: unknown 'w/o q'"):
    lm.main(["--ablations", "w/o q", "--out", str(tmp_path)])
  with pytest.raises(study.DataNotFound) as err:
    lm.main(["--data", "/nope", "--out", str(tmp_path)])
  message = str(err.value)
  assert "\n" not in message and "--data" in message and "$NLX_DATA" in message
  assert "/nope/ptb/ptb.train.txt does not exist" in message and "Penn Treebank" in message
  with pytest.raises(study.DataNotFound, match="tinyshakespeare/input.txt"):
    lm.main(["--data", "/nope", "--corpus", "tinyshakespeare", "--out", str(tmp_path)])
  monkeypatch.delenv("NLX_DATA", raising=False)
  with pytest.raises(study.DataNotFound, match=r"give --data DIR or set \$NLX_DATA=DIR"):
    lm.main(["--out", str(tmp_path)])


def test_the_corpus_is_read_from_nlx_data(lm, data_dir, monkeypatch):
  monkeypatch.setenv("NLX_DATA", data_dir)
  train, valid = lm.load_corpus(None, "ptb")
  assert train.dtype == np.uint8 and len(train) > len(valid) > 0
  with open(os.path.join(data_dir, "ptb", "ptb.valid.txt"), "rb") as f:
    assert valid.tobytes() == f.read()
  monkeypatch.setenv("NLX_DATA", "/nope")  # --data wins over $NLX_DATA
  assert np.array_equal(lm.load_corpus(data_dir, "ptb")[0], train)


def test_a_missing_dataset_is_one_error_line_of_the_command(tmp_path):
  """``python -m experiments.lm`` from the repository root: exit status 1 and one line on stderr
  (no traceback) naming the flag, the variable, the path looked at and what to put there."""
  env = dict(os.environ, NLX_DATA=str(tmp_path), JAX_PLATFORMS="cpu")
  done = subprocess.run([sys.executable, "-m", "experiments.lm", "--out", str(tmp_path / "o")],
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
                        check=False)
  assert done.returncode == 1, done.stderr[-2000:]
  lines = done.stderr.strip().splitlines()
  assert len(lines) == 1, done.stderr[-2000:]
  assert os.path.join(str(tmp_path), "ptb", "ptb.train.txt") in lines[0]
  assert "$NLX_DATA" in lines[0] and "--data" in lines[0] and "ptb.valid.txt" in lines[0]


def test_two_step_run_writes_tables_plot_and_models(lm, tmp_path, monkeypatch, data_dir):
  monkeypatch.setattr(lm, "ABLATION_FAMILY", "transformer")
  out = str(tmp_path / "lm")
  lm.main(["--data", data_dir, "--out", out, "--families", "transformer",
           "--ablations", "w/o momentum",
           "--steps", "2", "--abl_steps", "2", "--batch", "2", "--seq_len", "16",
           "--abl_batch", "2", "--abl_seq_len", "16", "--eval_every", "1", "--eval_rows", "2",
           "--final_eval_rows", "4", "--target_params", "60000"])
  with open(os.path.join(out, "lm.json"), encoding="utf-8") as f:
    results = json.load(f)
  row = results["main"]["transformer"]
  assert 1.0 < row["val_ppl"] < 400 and row["val_bpb"] == pytest.approx(math.log2(row["val_ppl"]))
  assert abs(row["params"] - 60000) < 3000 and row["tokens"] == 2 * 2 * 16
  assert [t for t, _ in row["curve"]] == [32, 64]
  assert list(results["ablations"]) == ["w/o momentum"]
  md = open(os.path.join(out, "lm.md"), encoding="utf-8").read()
  assert "Transformer++" in md and "w/o momentum" in md
  assert os.path.getsize(os.path.join(out, "lm.png")) > 0
  assert os.path.isfile(os.path.join(out, "models", "transformer", "params.msgpack"))
  assert row["skipped_steps"] == 0 and len(row["curve"]) == 2
  assert results["main"]["transformer"]["val_nll"] == pytest.approx(math.log(row["val_ppl"]))


def test_cpu_scale_wiring_runs_the_intended_rows_once(lm, tmp_path, monkeypatch, data_dir):
  """--scale cpu with its default rows, training replaced by a recorder (no model compiles): part 1
  is Transformer++, HOPE and Transformer++ at embedding std 1.0; part 2 is HOPE and its two CMS
  objectives, the default objective's row reusing HOPE's run; curves, the flattening criterion and
  the objective verdict reach the JSON and the table."""
  trained = []

  def fake_train(cfg, batch_fn, steps, windows, s, seed, eval_every, desc):
    trained.append((desc, cfg, steps, eval_every, batch_fn(0).inputs.shape))
    nll = 1.0 + 0.1 * (cfg.cms_objective == "next_token") + 0.01 * len(trained)
    curve = [(k * eval_every * 64, nll + 1.0 / k) for k in range(1, steps // eval_every + 1)]
    return dict(model=None, params=study.param_count(cfg), curve=curve, nll=nll, losses=[nll],
                seconds=1.0, tokens_per_second=10.0, skipped=0)

  monkeypatch.setattr(lm, "train_with_curve", fake_train)
  monkeypatch.setattr(study, "save_model", lambda *a: None)
  out = str(tmp_path / "cpu")
  results = lm.main(["--scale", "cpu", "--data", data_dir, "--out", out, "--steps", "8",
                     "--eval_every", "2", "--abl_steps", "4", "--abl_eval_every", "1",
                     "--batch", "2", "--abl_batch", "2", "--seq_len", "32", "--abl_seq_len",
                     "32", "--eval_rows", "2", "--final_eval_rows", "4"])
  runs = {desc: cfg for desc, cfg, *_ in trained}
  assert list(runs) == ["transformer", "hope", "transformer_std1", "HOPE",
                        "CMS objective next_token"]  # "CMS objective local" is HOPE's run
  assert runs["transformer"].init_std == 0.02 and runs["transformer_std1"].init_std == 1.0
  assert runs["transformer_std1"].family == "transformer"
  assert runs["hope"].cms_objective == runs["HOPE"].cms_objective == "local"
  assert runs["CMS objective next_token"].cms_objective == "next_token"
  assert [t[2:] for t in trained] == [(8, 2, (2, 32))] * 3 + [(4, 1, (2, 32))] * 2
  main, abl = results["main"], results["ablations"]
  assert list(main) == list(lm.CPU_FAMILIES) and list(abl) == list(lm.CPU_ABLATIONS)
  assert abl["CMS objective local"]["same_run_as"] == "HOPE"
  assert abl["CMS objective local"]["val_ppl"] == abl["HOPE"]["val_ppl"]
  assert abl["CMS objective next_token"]["cms_objective"] == "next_token"
  for row in [*main.values(), *abl.values()]:
    assert len(row["curve"]) >= 4 and row["flattening"]["tokens_at_mark"] < row["curve"][-1][0]
  with open(os.path.join(out, "lm.md"), encoding="utf-8") as f:
    md = f.read()
  assert "Transformer++ (embedding std 1.0)" in md and "flat (<= 2%)" in md
  assert "`local` is better" in md and "already is the better one" in md
  assert os.path.getsize(os.path.join(out, "lm.png")) > 0


def test_flattening_criterion(lm):
  curve = [(100, 3.0), (200, 2.0), (300, 1.03), (400, 1.0)]
  f = lm.flattening(curve)
  assert f["tokens_at_mark"] == 300 and f["last_quarter_drop"] == pytest.approx(0.03)
  assert not f["flat"] and lm.flattening(curve[:3] + [(400, 1.02)])["flat"]
  assert lm.flattening(curve[:1]) is None


def test_objective_verdict_names_the_better_objective(lm):
  rows = {"CMS objective next_token": dict(cms_objective="next_token", val_ppl=4.0),
          "CMS objective local": dict(cms_objective="local", val_ppl=5.0)}
  text = lm.objective_verdict(rows, "local")
  assert "`next_token` is better" in text and "should follow the better one" in text
  assert "already" in lm.objective_verdict(rows, "next_token")
  assert lm.objective_verdict({"HOPE": dict(cms_objective="local", val_ppl=1.0)}, "local") == ""


def test_cpu_scale_trains_transformer_std1_with_a_curve(lm, tmp_path, data_dir):
  """A real 3-step --scale cpu run of the init_std=1.0 variant: its saved config has the field,
  and the validation curve has a point per evaluation."""
  out = str(tmp_path / "std1")
  results = lm.main(["--scale", "cpu", "--data", data_dir, "--out", out, "--families",
                     "transformer_std1", "--ablations", "none", "--steps", "3", "--eval_every",
                     "1", "--batch", "2", "--abl_batch", "2", "--seq_len", "16", "--eval_rows", "2",
                     "--final_eval_rows", "4", "--target_params", "60000"])
  row = results["main"]["transformer_std1"]
  assert [t for t, _ in row["curve"]] == [32, 64, 96] and row["skipped_steps"] == 0
  assert row["flattening"]["tokens_at_mark"] == 64
  with open(os.path.join(out, "models", "transformer_std1", "config.json"),
            encoding="utf-8") as f:
    assert json.load(f)["init_std"] == 1.0
