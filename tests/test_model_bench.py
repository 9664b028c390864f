"""Tests of ``nlx bench models`` (nlx.bench_models) at a tiny size, through the CLI."""

import json
import math
import subprocess
import sys

import pytest

from nlx import bench_models, cli


def test_bench_models_writes_records_with_ratios(tmp_path):
  out = tmp_path / "models.json"
  proc = subprocess.run([sys.executable, "-m", "nlx.cli", "bench", "models", "--families",
                         "transformer,deltanet", "--size", "tiny", "--seq-len", "32",
                         "--repeats", "1", "--out", str(out)], capture_output=True, text=True,
                        timeout=600, check=False)
  assert proc.returncode == 0, proc.stderr[-2000:]
  result = json.loads(out.read_text())
  assert result["failures"] == []
  records = {r["family"]: r for r in result["records"]}
  assert set(records) == {"transformer", "deltanet"}
  for r in records.values():
    for key in bench_models.REQUIRED_RECORD_KEYS:
      assert r[key] is not None, key
    assert (r["B"], r["T"]) == (1, 32) and r["params"] > 10_000
    assert math.isclose(r["tokens_per_s"], 32 / r["seconds"])
    assert r["peak_bytes"] == r["argument_bytes"] + r["output_bytes"] + r["temp_bytes"]
    assert math.isclose(r["tokens_per_s_vs_transformer"],
                        r["tokens_per_s"] / records["transformer"]["tokens_per_s"])
    assert math.isfinite(r["loss"])
  assert records["transformer"]["tokens_per_s_vs_transformer"] == 1.0
  assert "deltanet" in proc.stdout and "vs T++" in proc.stdout


def test_bench_models_refuses_unknown_families(capsys):
  with pytest.raises(SystemExit) as e:
    cli.main(["bench", "models", "--families", "lstm"])
  assert e.value.code == 2
  assert "unknown family 'lstm'" in capsys.readouterr().err
