"""Tests of the models benchmark (``benchmarks.models``) at a tiny size, as ``python -m``."""

import json
import math
import os
import subprocess
import sys

import pytest

from benchmarks import models

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_models_writes_records_with_ratios(tmp_path):
  out = tmp_path / "models.json"
  proc = subprocess.run([sys.executable, "-m", "benchmarks.models", "--families",
                         "transformer,deltanet", "--size", "tiny", "--seq-len", "32",
                         "--repeats", "1", "--out", str(out)], capture_output=True, text=True,
                        timeout=600, check=False, cwd=ROOT)
  assert proc.returncode == 0, proc.stderr[-2000:]
  result = json.loads(out.read_text())
  assert result["failures"] == []
  records = {r["family"]: r for r in result["records"]}
  assert set(records) == {"transformer", "deltanet"}
  for r in records.values():
    for key in models.REQUIRED_RECORD_KEYS:
      assert r[key] is not None, key
    assert (r["B"], r["T"]) == (1, 32) and r["params"] > 10_000
    assert math.isclose(r["tokens_per_s"], 32 / r["seconds"])
    assert r["peak_bytes"] == r["argument_bytes"] + r["output_bytes"] + r["temp_bytes"]
    assert math.isclose(r["tokens_per_s_vs_transformer"],
                        r["tokens_per_s"] / records["transformer"]["tokens_per_s"])
    assert math.isfinite(r["loss"])
  assert records["transformer"]["tokens_per_s_vs_transformer"] == 1.0
  # Matmul FLOPs: every parameter of Transformer++ is in one matmul per token (the tied table in
  # the output head), 6 FLOPs each with the backward pass, plus attention's T-long dots.
  t = records["transformer"]
  assert 6 * t["params"] <= t["flops_per_token"] <= 1.5 * 6 * t["params"]
  assert math.isclose(t["gflops_per_s"], t["step_flops"] / t["seconds"] / 1e9)
  # The printed table carries the ratios (they were computed only after printing once).
  row = next(line for line in proc.stdout.splitlines() if line.startswith("transformer"))
  assert row.count("1.00x") == 3, row
  # An untrained model's first loss is about ln(vocabulary) (the tiny configs: 256 bytes).
  assert abs(records["transformer"]["loss"] - math.log(256)) < 0.5
  assert result["meta"]["config"]["config_dir"] is None
  assert "deltanet" in proc.stdout and "vs T++" in proc.stdout


def test_configs_come_from_the_shipped_presets_or_a_directory():
  assert models.config_spec("hope", "20m") == "hope:20m"
  assert models.config_spec("hope", "tiny", "/x/configs") == "/x/configs/hope.py:tiny"
  # Every family has a shipped config (configs/ installs as nlx.presets; see test_packaging).
  for family in models.FAMILIES:
    assert os.path.isfile(os.path.join(ROOT, "configs", f"{family}.py")), family


def test_models_refuses_unknown_families(capsys):
  with pytest.raises(SystemExit) as e:
    models.main(["--families", "lstm"])
  assert e.value.code == 2
  assert "unknown family 'lstm'" in capsys.readouterr().err


def test_compare_measures_each_family_with_and_without_the_overrides(tmp_path):
  out = tmp_path / "compare.json"
  proc = subprocess.run([sys.executable, "-m", "benchmarks.models", "--families", "transformer",
                         "--size", "tiny", "--seq-len", "32", "--repeats", "1", "--compare",
                         "model.scan_layers=True", "--compare", "model.remat=full", "--out",
                         str(out)], capture_output=True, text=True, timeout=600, check=False,
                        cwd=ROOT)
  assert proc.returncode == 0, proc.stderr[-2000:]
  result = json.loads(out.read_text())
  (r,) = result["records"]
  assert result["meta"]["config"]["compare"] == ["model.scan_layers=True", "model.remat=full"]
  assert math.isclose(r["compare_vs_base"], r["compare_tokens_per_s"] / r["tokens_per_s"])
  assert math.isclose(r["compare_tokens_per_s"], 32 / r["compare_seconds"])
  # The same model and batch: remat and the rolled layer loop change how, not what, it computes.
  assert math.isclose(r["compare_loss"], r["loss"], rel_tol=1e-6)
  # Remat keeps less for the backward pass: the overrides reached the compared step.
  assert r["compare_peak_bytes"] < r["peak_bytes"]
  assert "compare/base" in proc.stdout


def test_compare_refuses_packed(capsys):
  with pytest.raises(SystemExit) as e:
    models.main(["--compare", "model.remat=full", "--packed", "both"])
  assert e.value.code == 2
  assert "--compare measures the plain step; got --packed both" in capsys.readouterr().err
