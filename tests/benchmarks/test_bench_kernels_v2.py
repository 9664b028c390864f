"""``benchmarks.kernels``' agreement, H200 and packed-AOT modes: argument checks and the table arithmetic
(the modes themselves need minutes of interpretation or a GPU: tests/pallas_kernels runs one
agreement row; benchmarks/h200.sh has not run, docs/KERNELS.md)."""

import json

import pytest

from benchmarks import kernels
from pallas_kernels.chunked_memory import layout


def test_agreement_refuses_an_unknown_row(capsys):
  with pytest.raises(SystemExit) as e:
    kernels.main(["--agreement", "--rows", "delta_rule:gpu:float16"])
  assert e.value.code == 2
  assert "unknown row 'delta_rule:gpu:float16'" in capsys.readouterr().err


def test_agreement_rows_cover_every_kind_backend_and_dtype():
  assert len(kernels.AGREEMENT_ROWS) == 12
  assert {r[2] for r in kernels.AGREEMENT_ROWS} == set(kernels.AGREEMENT_RTOL)


def test_h200_table_ratios_and_roofline(tmp_path, capsys):
  nlx = [{"impl": "nlx", "kind": "delta_rule", "fwd_ms": 4.0, "fwdbwd_ms": 12.0}]
  fla = [{"impl": "fla", "kind": "delta_rule", "fla_op": "chunk_gated_delta_rule",
          "fwd_ms": 2.0, "fwdbwd_ms": 8.0}]
  paths = []
  for name, rows in (("nlx", nlx), ("fla", fla)):
    paths.append(tmp_path / f"{name}.json")
    paths[-1].write_text(json.dumps(rows))
  assert kernels.main(["--h200", "table"] + [str(p) for p in paths]) == 0
  out = capsys.readouterr().out.splitlines()
  fwd = next(l.split() for l in out if l.startswith("delta_rule") and " nlx " in l
             and " fwd " in l)
  assert fwd[3:5] == ["4.000", "2.00"]  # ms, nlx/fla
  flops = 8 * 16 * 64 * sum(layout.phase_flops(p, 64, 128, 128) for p in ("ut", "state", "out"))
  assert float(fwd[5]) == pytest.approx(flops / 4e-3 / 1e12, abs=0.05)  # TFLOP/s
  ideal_s = max(flops / kernels.H200_PEAK_FLOPS,
                (4 * 8 * 4096 * 16 * 128 * 2 + 2 * 8 * 4096 * 16 * 4 + 8 * 16 * 128 * 128 * 4)
                / kernels.H200_HBM_BYTES_PER_S)
  assert float(fwd[6].rstrip("%")) == pytest.approx(100 * ideal_s / 4e-3, abs=0.05)
  assert any(l.startswith("linear_attention") and "not run" in l for l in out)


@pytest.mark.slow
def test_packed_aot_compiles_both_buffers_for_tpu(tmp_path):
  """``--packed-aot`` at a small shape, in a child process (libtpu): every row compiles the
  Mosaic kernels, and the buffers order as built (the small one between none and the worst)."""
  import os
  import subprocess
  import sys
  out = tmp_path / "aot.json"
  env = dict(os.environ, ALLOW_MULTIPLE_LIBTPU_LOAD="1")
  proc = subprocess.run([sys.executable, "-m", "benchmarks.kernels", "--packed-aot", "--shape",
                         "1,256,2,128,64", "--json", str(out)], capture_output=True, text=True,
                        timeout=600, env=env)
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = {(r["packed"], r["buffer"]): r for r in json.loads(out.read_text())}
  none, small, full = rows[(False, None)], rows[(True, "small")], rows[(True, "full")]
  assert all(r["mosaic_custom_calls"] >= 6 for r in rows.values())
  assert none["flops"] < small["flops"] < full["flops"]
  assert "| reset | small |" in proc.stdout
