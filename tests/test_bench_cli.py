"""Tests of ``nlx bench ops`` (nlx.bench) and the ``nlx`` command line (nlx.cli).

The benchmarks run at tiny sizes in child processes with a time limit, so that a hung XLA runtime
fails the test instead of stalling the suite.
"""

import json
import math
import os
import subprocess
import sys

import pytest

from nlx import bench, cli

TINY = ["--batch", "1", "--heads", "2", "--dim", "16", "--repeats", "1", "--no_progress"]


def _run(args, timeout=240):
  return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout,
                        check=False)


def _check_schema(result, ops, impls, modes, seq_lens):
  assert set(result) >= {"records", "speedups", "unavailable", "failures", "meta"}
  assert result["failures"] == []
  for record in result["records"]:
    for key in bench.REQUIRED_RECORD_KEYS:
      assert key in record, key
    assert record["tokens_per_s"] > 0 and record["peak_bytes"] > 0
    assert record["compile_s"] > 0 and record["seconds"] > 0
    assert (record["B"], record["H"], record["D"], record["dtype"]) == (1, 2, 16, "float32")
    assert record["backend"] == result["meta"]["backend"]
    assert math.isclose(record["tokens_per_s"], record["B"] * record["T"] / record["seconds"])
    assert record["peak_bytes"] == (record["argument_bytes"] + record["output_bytes"] +
                                    record["temp_bytes"])
  measured = {(r["op"], r["impl"], r["mode"], r["T"]) for r in result["records"]}
  assert measured == {(op, impl, mode, t) for op in ops for impl in impls for mode in modes
                      for t in seq_lens}
  assert len(result["records"]) == len(measured)
  # pallas on cpu is interpret mode only: reported, not measured, and no crash.
  assert [u["impl"] for u in result["unavailable"]] == ["pallas"]
  assert "interpret mode" in result["unavailable"][0]["reason"]
  # Speedups: chunked over recurrent tokens/s, for every (op, mode, T), from the same records.
  tps = {(r["op"], r["impl"], r["mode"], r["T"]): r["tokens_per_s"] for r in result["records"]}
  assert len(result["speedups"]) == len(ops) * len(modes) * len(seq_lens)
  for s in result["speedups"]:
    assert (s["impl"], s["baseline"]) == ("chunked", "recurrent")
    expected = tps[s["op"], "chunked", s["mode"], s["T"]] / tps[s["op"], "recurrent", s["mode"],
                                                               s["T"]]
    assert math.isclose(s["speedup"], expected, rel_tol=1e-12)
  meta = result["meta"]
  for key in ("jax_version", "backend", "device_kind", "cpu_count", "date", "command"):
    assert meta[key], key


def test_bench_ops_all_configurations_in_process(tmp_path):
  out = tmp_path / "bench.json"
  proc = _run(["-m", "nlx.bench", "ops", *TINY, "--seq-lens", "40", "--chunk-size", "16",
               "--in-process", "--out", str(out)])
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(out.read_text())
  _check_schema(result, bench.OPS, ("recurrent", "chunked"), bench.MODES, (40,))
  assert result["meta"]["config"]["isolated"] is False
  # The tables on stdout.
  assert "tokens/s" in proc.stdout and "peak MiB" in proc.stdout and "speedup" in proc.stdout
  assert "'pallas' unavailable" in proc.stdout


def test_bench_ops_child_processes_via_cli(tmp_path):
  out = tmp_path / "bench.json"
  proc = _run(["-m", "nlx.cli", "bench", "ops", *TINY, "--seq-lens", "16",
               "--ops", "linear_attention", "--impls", "chunked,pallas", "--modes", "forward",
               "--timeout-s", "200", "--out", str(out)])
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(out.read_text())
  (record,) = result["records"]
  assert (record["op"], record["impl"], record["mode"], record["T"]) == (
      "linear_attention", "chunked", "forward", 16)
  assert record["isolated"] and record["tokens_per_s"] > 0 and record["peak_bytes"] > 0
  assert result["speedups"] == [] and result["failures"] == []
  assert [u["impl"] for u in result["unavailable"]] == ["pallas"]
  assert result["meta"]["command"].startswith("nlx bench ops")


def test_speedups_and_tables_from_records():
  base = {"op": "delta_rule", "mode": "forward", "T": 8, "B": 1, "H": 1, "D": 4,
          "dtype": "float32", "peak_bytes": 2**20, "compile_s": 0.5}
  records = [{**base, "impl": "recurrent", "tokens_per_s": 100.0},
             {**base, "impl": "chunked", "tokens_per_s": 1500.0},
             {**base, "impl": "chunked", "T": 16, "tokens_per_s": 7.0}]  # no baseline at T=16
  (s,) = bench.speedups(records)
  assert (s["op"], s["mode"], s["T"], s["impl"]) == ("delta_rule", "forward", 8, "chunked")
  assert s["speedup"] == 15.0
  text = bench.format_tables({"records": records, "speedups": [s], "unavailable": [],
                              "failures": [{**base, "impl": "chunked", "T": 32,
                                            "reason": "timed out after 1 s (child killed)"}]})
  assert "15.00x" in text and "1,500" in text and "1.0" in text
  assert "FAILED delta_rule chunked forward T=32: timed out" in text


def test_bench_timeout_is_reported_as_failure():
  why = bench._run_in_child({"kind": "measure", "op": "linear_attention", "impl": "recurrent",
                             "mode": "forward", "B": 1, "T": 8, "H": 1, "D": 4,
                             "dtype": "float32", "chunk_size": 4, "repeats": 1,
                             "slow_run_s": 10.0, "seed": 0}, timeout_s=0.01, attempts=2)
  assert why[0] is None
  assert why[1].count("timed out after 0.01 s") == 2
  # The stall detector's clock: CPU seconds of a live process (Linux), None for an unknown pid.
  if sys.platform.startswith("linux"):
    assert bench._cpu_seconds(os.getpid()) > 0
    assert bench._cpu_seconds(2**22 + 12345) is None


@pytest.mark.parametrize("argv", [["--help"], ["bench", "--help"], ["bench", "ops", "--help"]])
def test_cli_help(argv, capsys):
  with pytest.raises(SystemExit) as e:
    cli.main(argv)
  assert e.value.code == 0
  text = capsys.readouterr().out
  assert "usage: nlx" in text
  if argv == ["--help"]:
    assert "bench" in text and "demo" in text
  if "ops" in argv:
    for flag in ("--batch", "--heads", "--dim", "--seq_lens", "--ops", "--impls", "--modes",
                 "--dtype", "--chunk_size", "--repeats", "--out"):
      assert flag in text


def test_help_as_subprocesses():
  for args in (["-m", "nlx.cli", "--help"], ["-m", "nlx.bench", "--help"],
               ["-m", "nlx.bench", "ops", "--help"]):
    proc = _run(args, timeout=120)
    assert proc.returncode == 0, (args, proc.stderr)
    assert "usage:" in proc.stdout


def test_defaults():
  args = bench.build_parser().parse_args(["ops"])
  assert (args.batch, args.heads, args.dim, args.seq_lens) == (4, 8, 64, [1024, 4096])
  assert (args.dtype, args.chunk_size, args.repeats) == ("float32", 64, 3)
  assert args.ops == list(bench.OPS) and args.modes == list(bench.MODES)
  assert args.impls == ["recurrent", "chunked", "pallas"]
  assert not args.in_process and args.out is None


@pytest.mark.parametrize("argv, needle", [
    (["bench", "ops", "--ops", "nonsense"],
     "unknown op 'nonsense'; allowed: linear_attention, delta_rule, titans_memory"),
    (["bench", "ops", "--impls", "chunked,triton"],
     "unknown impl 'triton'; allowed: recurrent, chunked, pallas, fla"),
    (["bench", "ops", "--modes", "backward"],
     "unknown mode 'backward'; allowed: forward, forward+backward"),
    (["bench", "ops", "--seq-lens", "1024,-5"], "positive integers"),
    (["bench", "ops", "--dtype", "int8"], "invalid choice: 'int8'"),
    (["bench", "ops", "--batch", "0"], "positive integer"),
    (["bench", "nonsense"], "invalid choice: 'nonsense'"),
    (["train"], "the following arguments are required: --workdir"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
    (["bench", "ops", "--bogus-flag"], "unrecognized arguments: --bogus_flag"),
])
def test_cli_errors_name_the_value(argv, needle, capsys):
  with pytest.raises(SystemExit) as e:
    cli.main(argv)
  assert e.value.code == 2
  assert needle in capsys.readouterr().err


def test_demo_gets_its_arguments_unchanged(monkeypatch):
  import types  # pylint: disable=g-import-not-at-top
  seen = []
  fake = types.ModuleType("nlx.demo")
  fake.main = lambda argv=None: seen.append(argv) or 0
  monkeypatch.setitem(sys.modules, "nlx.demo", fake)
  import nlx  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(nlx, "demo", fake, raising=False)
  assert cli.main(["demo", "--steps", "3", "--out", "x.json", "-h", "demo"]) == 0
  assert seen == [["--steps", "3", "--out", "x.json", "-h", "demo"]]


def test_bench_kernels_defaults_and_records(tmp_path):
  args = bench.build_parser().parse_args(["kernels"])
  assert args.shapes == [[8, 4096, 16, 128], [4, 16384, 8, 64]] and args.dtype == "bfloat16"
  assert args.impls == ["pallas", "chunked", "recurrent", "fla"]
  out = tmp_path / "kernels.json"
  proc = _run(["-m", "nlx.bench", "kernels", "--shapes", "1x24x2x16", "--ops", "delta_rule",
               "--impls", "chunked,recurrent,pallas,fla", "--modes", "forward+backward",
               "--chunk-size", "16", "--repeats", "1", "--in-process", "--out", str(out)])
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(out.read_text())
  assert {r["impl"] for r in result["records"]} == {"chunked", "recurrent"}
  for r in result["records"]:
    assert (r["B"], r["T"], r["H"], r["D"], r["dtype"]) == (1, 24, 2, 16, "bfloat16")
    assert r["flops"] > 0 and r["bytes"] > 0
    assert math.isclose(r["tflops_per_s"], r["flops"] / r["seconds"] / 1e12)
    assert math.isclose(r["gb_per_s"], r["bytes"] / r["seconds"] / 1e9)
  # Both impls do the same model work; on CPU the kernel and flash-linear-attention are reported.
  assert len({r["flops"] for r in result["records"]}) == 1
  assert {u["impl"] for u in result["unavailable"]} == {"pallas", "fla"}
  assert "TFLOP/s" in proc.stdout and "GB/s" in proc.stdout and "1x24x2x16" in proc.stdout


def test_bench_kernels_bad_shape(capsys):
  with pytest.raises(SystemExit):
    cli.main(["bench", "kernels", "--shapes", "8x4096x16"])
  assert "expected shapes BxTxHxD separated by commas, e.g. 8x4096x16x128; got '8x4096x16'" in (
      capsys.readouterr().err)
