"""Tests of the ops and kernels benchmarks (``benchmarks.ops``, ``benchmarks.kernels``).

The benchmarks run at tiny sizes, as ``python -m benchmarks.X`` from the repository root; the
isolated run uses child processes with a time limit, so that a hung XLA runtime fails the test
instead of stalling the suite.
"""

import json
import math
import os
import subprocess
import sys

import pytest

from benchmarks import harness, kernels, ops

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = ["--batch", "1", "--heads", "2", "--dim", "16", "--repeats", "1", "--no_progress"]


def _run(args, timeout=240):
  return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout,
                        check=False, cwd=ROOT)


def _check_schema(result, ops_, impls, modes, seq_lens):
  assert set(result) >= {"records", "speedups", "unavailable", "failures", "meta"}
  assert result["failures"] == []
  for record in result["records"]:
    for key in ops.REQUIRED_RECORD_KEYS:
      assert key in record, key
    assert record["tokens_per_s"] > 0 and record["peak_bytes"] > 0
    assert record["compile_s"] > 0 and record["seconds"] > 0
    assert (record["B"], record["H"], record["D"], record["dtype"]) == (1, 2, 16, "float32")
    assert record["backend"] == result["meta"]["backend"]
    assert math.isclose(record["tokens_per_s"], record["B"] * record["T"] / record["seconds"])
    assert record["peak_bytes"] == (record["argument_bytes"] + record["output_bytes"] +
                                    record["temp_bytes"])
  measured = {(r["op"], r["impl"], r["mode"], r["T"]) for r in result["records"]}
  assert measured == {(op, impl, mode, t) for op in ops_ for impl in impls for mode in modes
                      for t in seq_lens}
  assert len(result["records"]) == len(measured)
  # pallas on cpu is interpret mode only: reported, not measured, and no crash.
  assert [u["impl"] for u in result["unavailable"]] == ["pallas"]
  assert "interpret mode" in result["unavailable"][0]["reason"]
  # Speedups: chunked over recurrent tokens/s, for every (op, mode, T), from the same records.
  tps = {(r["op"], r["impl"], r["mode"], r["T"]): r["tokens_per_s"] for r in result["records"]}
  assert len(result["speedups"]) == len(ops_) * len(modes) * len(seq_lens)
  for s in result["speedups"]:
    assert (s["impl"], s["baseline"]) == ("chunked", "recurrent")
    expected = tps[s["op"], "chunked", s["mode"], s["T"]] / tps[s["op"], "recurrent", s["mode"],
                                                               s["T"]]
    assert math.isclose(s["speedup"], expected, rel_tol=1e-12)
  meta = result["meta"]
  for key in ("jax_version", "backend", "device_kind", "cpu_count", "date", "command"):
    assert meta[key], key


@pytest.mark.slow  # the default run keeps test_ops_child_processes and the kernels' records
def test_ops_all_configurations_in_process(tmp_path):
  out = tmp_path / "bench.json"
  proc = _run(["-m", "benchmarks.ops", *TINY, "--seq-lens", "40", "--chunk-size", "16",
               "--in-process", "--out", str(out)])
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(out.read_text())
  _check_schema(result, ops.OPS, ("recurrent", "chunked"), ops.MODES, (40,))
  assert result["meta"]["config"]["isolated"] is False
  assert result["meta"]["config"]["benchmark"] == "ops"
  # The tables on stdout.
  assert "tokens/s" in proc.stdout and "peak MiB" in proc.stdout and "speedup" in proc.stdout
  assert "'pallas' unavailable" in proc.stdout


def test_ops_child_processes(tmp_path):
  out = tmp_path / "bench.json"
  proc = _run(["-m", "benchmarks.ops", *TINY, "--seq-lens", "16",
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
  assert result["meta"]["command"].startswith("python -m benchmarks.ops --batch 1")


def test_speedups_and_tables_from_records():
  base = {"op": "delta_rule", "mode": "forward", "T": 8, "B": 1, "H": 1, "D": 4,
          "dtype": "float32", "peak_bytes": 2**20, "compile_s": 0.5}
  records = [{**base, "impl": "recurrent", "tokens_per_s": 100.0},
             {**base, "impl": "chunked", "tokens_per_s": 1500.0},
             {**base, "impl": "chunked", "T": 16, "tokens_per_s": 7.0}]  # no baseline at T=16
  (s,) = ops.speedups(records)
  assert (s["op"], s["mode"], s["T"], s["impl"]) == ("delta_rule", "forward", 8, "chunked")
  assert s["speedup"] == 15.0
  text = ops.format_tables({"records": records, "speedups": [s], "unavailable": [],
                            "failures": [{**base, "impl": "chunked", "T": 32,
                                          "reason": "timed out after 1 s (child killed)"}]})
  assert "15.00x" in text and "1,500" in text and "1.0" in text
  assert "FAILED delta_rule chunked forward T=32: timed out" in text


def test_timeout_is_reported_as_failure():
  why = harness.run_in_child(ops.MODULE, {
      "kind": "measure", "op": "linear_attention", "impl": "recurrent", "mode": "forward",
      "B": 1, "T": 8, "H": 1, "D": 4, "dtype": "float32", "chunk_size": 4, "repeats": 1,
      "slow_run_s": 10.0, "seed": 0}, timeout_s=0.01, attempts=2)
  assert why[0] is None
  assert why[1].count("timed out after 0.01 s") == 2
  # The stall detector's clock: CPU seconds of a live process (Linux), None for an unknown pid.
  if sys.platform.startswith("linux"):
    assert harness.cpu_seconds(os.getpid()) > 0
    assert harness.cpu_seconds(2**22 + 12345) is None


def test_time_runs_takes_the_median_and_times_a_slow_run_once():
  calls = []
  out, timing = harness.time_runs(lambda: calls.append(1) or len(calls), repeats=3,
                                  slow_run_s=10.0)
  assert out == 1 and len(calls) == 4  # the warm-up, then 3 timed runs
  assert timing["repeats"] == 3 and len(timing["times_s"]) == 3
  assert timing["seconds"] == sorted(timing["times_s"])[1]
  _, timing = harness.time_runs(lambda: None, repeats=3, slow_run_s=1e-12)
  assert timing["repeats"] == 1 and len(timing["times_s"]) == 1


def test_help_lists_the_flags(capsys):
  for module in (ops, kernels):
    with pytest.raises(SystemExit) as e:
      module.main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert f"usage: python -m benchmarks.{module.__name__.split('.')[-1]}" in text
    for flag in ("--batch", "--heads", "--dim", "--seq_lens", "--ops", "--impls", "--modes",
                 "--dtype", "--chunk_size", "--repeats", "--out", "--in_process", "--timeout_s"):
      assert flag in text


def test_defaults():
  args = ops.build_parser().parse_args([])
  assert (args.batch, args.heads, args.dim, args.seq_lens) == (4, 8, 64, [1024, 4096])
  assert (args.dtype, args.chunk_size, args.repeats) == ("float32", 64, 3)
  assert args.ops == list(ops.OPS) and args.modes == list(ops.MODES)
  assert args.impls == ["recurrent", "chunked", "pallas"] and args.shapes is None
  assert not args.in_process and args.out is None and args.benchmark_name == "ops"


@pytest.mark.parametrize("argv, needle", [
    (["--ops", "nonsense"],
     "unknown op 'nonsense'; allowed: linear_attention, delta_rule, titans_memory"),
    (["--impls", "chunked,triton"],
     "unknown impl 'triton'; allowed: recurrent, chunked, pallas, fla"),
    (["--modes", "backward"], "unknown mode 'backward'; allowed: forward, forward+backward"),
    (["--seq-lens", "1024,-5"], "positive integers"),
    (["--dtype", "int8"], "invalid choice: 'int8'"),
    (["--batch", "0"], "positive integer"),
    (["--bogus-flag"], "unrecognized arguments: --bogus_flag"),
])
def test_errors_name_the_value(argv, needle, capsys):
  with pytest.raises(SystemExit) as e:
    ops.main(argv)
  assert e.value.code == 2
  assert needle in capsys.readouterr().err


def test_kernels_defaults_and_records(tmp_path):
  args = kernels.build_parser().parse_args([])
  assert args.shapes == [[8, 4096, 16, 128], [4, 16384, 8, 64]] and args.dtype == "bfloat16"
  assert args.impls == ["pallas", "chunked", "recurrent", "fla"]
  assert args.benchmark_name == "kernels"
  out = tmp_path / "kernels.json"
  proc = _run(["-m", "benchmarks.kernels", "--shapes", "1x24x2x16", "--ops", "delta_rule",
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
  assert result["meta"]["config"]["benchmark"] == "kernels"
  assert result["meta"]["command"].startswith("python -m benchmarks.kernels --shapes")
  assert "TFLOP/s" in proc.stdout and "GB/s" in proc.stdout and "1x24x2x16" in proc.stdout


def test_kernels_bad_shape(capsys):
  with pytest.raises(SystemExit):
    kernels.main(["--shapes", "8x4096x16"])
  assert "expected shapes BxTxHxD separated by commas, e.g. 8x4096x16x128; got '8x4096x16'" in (
      capsys.readouterr().err)
