"""experiments.study, what every study shares: list flags, the datasets directory (--data, else
$NLX_DATA; one error line), the command written beside the results, study.train on nlx's one
train step, a saved sweep's fingerprint (a model field added since resumes at its default);
and the layout rule of issue 19: studies are a package imported as ``from experiments
import study``, with no ``sys.path`` edits in experiments/ or in their tests."""

import os
import pathlib
import re

import numpy as np
import pytest

from experiments import resume, study

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_parse_list_names_the_flag():
  assert study.parse_list("--widths", "32, 64,", convert=int, minimum=1) == [32, 64]
  assert study.parse_list("--lrs", "1e-4,1e-3", convert=float, minimum=0.0) == [1e-4, 1e-3]
  assert study.parse_list("--models", None, known=("a", "b")) == ["a", "b"]
  assert study.parse_list("--models", None, known=("a", "b"), default=["b"]) == ["b"]
  assert study.parse_list("--x", "all", known=("a", "b"), keywords=True) == ["a", "b"]
  assert study.parse_list("--x", "none", known=("a", "b"), keywords=True) == []
  assert study.parse_list("--levels", "", convert=int, empty=True) == []
  with pytest.raises(ValueError, match="--widths: expected comma-separated integers, got '32,x'"):
    study.parse_list("--widths", "32,x", convert=int)
  with pytest.raises(ValueError, match="--widths: expected values >= 1"):
    study.parse_list("--widths", "0,4", convert=int, minimum=1)
  with pytest.raises(ValueError, match="--models: unknown 'c'; allowed: a, b$"):
    study.parse_list("--models", "a,c", known=("a", "b"))
  with pytest.raises(ValueError, match="--x: unknown 'c'; allowed: a, b, all, none"):
    study.parse_list("--x", "c", known=("a", "b"), keywords=True)
  with pytest.raises(ValueError, match="--tasks: expected a comma-separated list"):
    study.parse_list("--tasks", " , ")


def test_data_dir_takes_the_flag_then_nlx_data(tmp_path, monkeypatch):
  (tmp_path / "ptb").mkdir()
  (tmp_path / "ptb" / "ptb.train.txt").write_text("x")
  monkeypatch.setenv("NLX_DATA", str(tmp_path))
  assert study.data_dir(None, ["ptb/ptb.train.txt"], "PTB") == str(tmp_path)
  assert study.data_dir(str(tmp_path), ["ptb/*.txt"], "PTB") == str(tmp_path)  # glob patterns
  with pytest.raises(study.DataNotFound) as err:
    study.data_dir(str(tmp_path / "other"), ["ptb/ptb.train.txt"], "PTB from somewhere")
  message = str(err.value)
  assert message == (f"{tmp_path / 'other' / 'ptb' / 'ptb.train.txt'} does not exist (the "
                     f"datasets directory {str(tmp_path / 'other')!r}, from --data; --data DIR, "
                     "else $NLX_DATA); put there PTB from somewhere")
  with pytest.raises(study.DataNotFound, match=r"from \$NLX_DATA"):
    study.data_dir(None, ["ptb/ptb.valid.txt"], "PTB")
  monkeypatch.delenv("NLX_DATA")
  with pytest.raises(study.DataNotFound) as err:
    study.data_dir(None, ["ptb/ptb.train.txt"], "ptb/ptb.train.txt (PTB)")
  assert str(err.value) == ("no datasets directory: give --data DIR or set $NLX_DATA=DIR; DIR "
                            "should hold ptb/ptb.train.txt (PTB)")
  assert isinstance(err.value, SystemExit)  # a command prints the line and exits with status 1


def test_arg_parser_has_no_data_default():
  args = study.arg_parser("doc", "x").parse_args([])
  assert args.data is None and args.out == os.path.join("runs", "x") and args.scale == "tiny"


def test_command_line_is_the_module_command():
  assert (study.command_line("mqar", ["--scale", "tiny"])
          == "python -m experiments.mqar --scale tiny")


def test_train_runs_the_recipe_on_the_shared_step():
  cfg = study.model_config("transformer", vocab_size=16, d_model=16, n_layers=1, n_heads=1,
                           mlp_dim=16)
  tokens = np.random.default_rng(0).integers(1, 16, (4, 9))
  seen = []
  result = study.train(cfg, lambda step: study.lm_batch(tokens), 6, lr=1e-2, progress=False,
                       on_step=lambda step, up: seen.append(bool(up.finite)))
  assert len(result.losses) == 6 and result.losses[-1] < result.losses[0]
  assert seen == [True] * 6 and result.skipped == 0 and result.params > 0


def test_no_sys_path_edits_in_the_studies_or_their_tests():
  files = sorted(ROOT.glob("experiments/*.py")) + sorted(ROOT.glob("tests/experiments/test_*.py"))
  assert len(files) > 20
  bad = [f"{f.relative_to(ROOT)}: {m}" for f in files
         for m in re.findall(r"sys\.path\.\w+|wrong-import-position|spec_from_file_location",
                             f.read_text(encoding="utf-8"))
         if f.name != pathlib.Path(__file__).name]
  assert not bad, bad


def test_cms_periods_within_puts_every_level_inside_the_training_length():
  assert study.cms_periods_within(256) == (16, 64)
  assert study.cms_periods_within(65) == (16, 64)  # token 64 reads the slowest level's update
  assert study.cms_periods_within(64) == (8, 32)
  assert study.cms_periods_within(50) == (8, 32)
  assert study.cms_periods_within(32) == (4, 16)
  assert study.cms_periods_within(2, (4, 16)) == (1, 4)  # stops at a period of 1


def test_a_sweep_saved_before_a_model_field_existed_resumes_at_its_default(tmp_path):
  cfg = study.model_config("titans_lmm", d_model=16, n_layers=1, n_heads=2, vocab_size=32)
  new = resume.model_fingerprint(cfg)
  old = {k: v for k, v in new.items() if k != "hope_targets"}  # saved before the field existed
  saver = resume.SweepCheckpoint(str(tmp_path), {"seed": 0, "model": old}, every_seconds=0)
  saver.maybe_save({"w": np.zeros(2)}, {"step": 1})
  arrays, progress = resume.SweepCheckpoint(str(tmp_path), {"seed": 0, "model": new}).restore(
      {"w": np.zeros(2)})
  assert progress == {"step": 1}
  changed = dict(new, hope_targets="value")  # not the default: another configuration
  with pytest.raises(ValueError, match=r"another configuration \(model: saved .*'hope_targets': "
                                       r"'value'"):
    resume.SweepCheckpoint(str(tmp_path), {"seed": 0, "model": changed}).restore(
        {"w": np.zeros(2)})
