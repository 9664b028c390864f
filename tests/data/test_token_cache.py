"""The token cache (``nlx.data.token_cache``): its windows are the in-memory ones (tokens and
segment ids; text, jsonl, directories, the embedded corpus; files read in tiny chunks), a store is
built once and reused, a change of source or tokenizer rebuilds it, a failed build leaves nothing
that is read, grain reads it per host and resumes, a ``gs://`` cache directory (a local stand-in
for GCS through ``etils.epath``) is written once and copied down per host, and two processes
build it once. Every test's cache is in its own temporary ``NLX_CACHE``."""

import dataclasses
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
from etils.epath import backend as epath_backend
from etils.epath import gpath

from nlx.data import pipeline, streams, token_cache, tokenizers
from nlx.errors import DataError
from nlx.train import config as run_config
from xla_env import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
  """Every test: a cache of its own (never ~/.cache/nlx)."""
  monkeypatch.setenv("NLX_CACHE", str(tmp_path / "nlx_cache"))
  return tmp_path / "nlx_cache"


def _in_memory(data, seq_len, segment_ids, workdir=None):
  return pipeline.load_splits(dataclasses.replace(data, token_cache=False), seq_len, workdir,
                              segment_ids)


def _assert_same_windows(memory, cached, segment_ids):
  n = len(memory["tokens"] if segment_ids else memory)
  assert len(cached) == n and cached.shape == (n, cached.seq_len + 1)
  rows = sorted({0, 1 % len(cached), len(cached) // 2, len(cached) - 1})
  if segment_ids:
    for key in ("tokens", "segment_ids"):
      np.testing.assert_array_equal(cached[key], memory[key])
      for i in rows:
        np.testing.assert_array_equal(cached[i][key], memory[key][i])
        assert cached[i][key].dtype == np.int32
  else:
    np.testing.assert_array_equal(np.asarray(cached), memory)
    for i in rows:
      np.testing.assert_array_equal(cached[i], memory[i])


def _shakespeare(n_chars: int) -> str:
  return streams.sources.load_documents(run_config.DataConfig())[0][0][:n_chars]


def _write_sources(tmp_path) -> dict:
  text = "".join(f"line {i}: caf\u00e9 \u2603 na\u00efve\n" for i in range(300))
  (tmp_path / "one.txt").write_text(text, encoding="utf-8")
  (tmp_path / "docs.jsonl").write_text(
      "".join(json.dumps({"text": f"doc {i} " + "\u00e9x" * (i % 9), "id": i}) + "\n"
              for i in range(40)) + "\n", encoding="utf-8")
  split = tmp_path / "split"
  split.mkdir()
  for i, n in enumerate([50, 90, 40]):
    (split / f"part{i}.train.txt").write_text("ab\ncd" * n)
  (split / "x.valid.txt").write_text("held out text " * 9)
  tail = tmp_path / "tail"
  tail.mkdir()
  for i in range(5):
    (tail / f"p{i}.train.jsonl").write_text(
        "".join(json.dumps({"body": f"r{i}.{j} " * (j + 2)}) + "\n" for j in range(4)))
  return {"embedded": run_config.DataConfig(),
          "text": run_config.DataConfig(source="text", path=str(tmp_path / "one.txt")),
          "jsonl": run_config.DataConfig(source="jsonl", path=str(tmp_path / "docs.jsonl")),
          "text_dir": run_config.DataConfig(source="text", path=str(split)),
          "jsonl_dir": run_config.DataConfig(source="jsonl", path=str(tail), text_field="body",
                                             val_fraction=0.25)}


@pytest.mark.parametrize("segment_ids", [False, True])
@pytest.mark.parametrize("source", ["embedded", "text", "jsonl", "text_dir", "jsonl_dir"])
def test_cached_windows_are_the_in_memory_windows(tmp_path, source, segment_ids):
  data = _write_sources(tmp_path)[source]
  seq_len = 64 if source == "embedded" else 7
  _, train, val = pipeline.load_splits(data, seq_len, segment_ids=segment_ids)
  assert isinstance(train, token_cache.TokenWindows)
  _, mem_train, mem_val = _in_memory(data, seq_len, segment_ids)
  _assert_same_windows(mem_train, train, segment_ids)
  _assert_same_windows(mem_val, val, segment_ids)
  if segment_ids and source not in ("embedded", "text"):  # one file, one document
    assert train["segment_ids"].max() >= 1  # documents start inside rows
  batches = pipeline.host_batches(train, batch_size=4, steps=3, seed=1)
  reference = pipeline.host_batches(mem_train, batch_size=4, steps=3, seed=1)
  for s in range(3):
    for a, b in zip(np.atleast_1d(batches[s]), np.atleast_1d(reference[s])):
      if segment_ids:
        for key in ("tokens", "segment_ids"):
          np.testing.assert_array_equal(a[key], b[key])
      else:
        np.testing.assert_array_equal(a, b)


def test_tiny_chunks_cut_characters_lines_and_documents_as_one_read_does(tmp_path, monkeypatch):
  monkeypatch.setattr(streams, "CHUNK_BYTES", 5)  # every multibyte character and line is cut
  sources = _write_sources(tmp_path)
  (tmp_path / "crlf.jsonl").write_bytes(b'{"text": "a\\u00e9"}\r\n\r\n{"text": "\xe2\x98\x83b"}\r\n'
                                        * 7)
  sources["crlf"] = run_config.DataConfig(source="jsonl", path=str(tmp_path / "crlf.jsonl"))
  for name, data in sources.items():
    _, train, val = pipeline.load_splits(data, 3, segment_ids=True)
    _, mem_train, mem_val = _in_memory(data, 3, True)
    for key in ("tokens", "segment_ids"):
      np.testing.assert_array_equal(train[key], mem_train[key], err_msg=name)
      np.testing.assert_array_equal(val[key], mem_val[key], err_msg=name)


@pytest.mark.parametrize("content,source,message", [
    (b"", "text", "is empty"), (b"  \n ", "text", "is empty"),
    (b"caf\xe9 au lait" * 20, "text", "not UTF-8: byte 3"),
    (b"abcdefgh" * 3 + b"\xff tail", "text", "not UTF-8: byte 24"),
    (b"short", "text", "fewer than one window"),
    (b'{"text": "a"}\n{oops', "jsonl", "line 2 .* is not JSON"),
    (b"[1, 2]", "jsonl", "not in record 1"),
    (b'{"text": "a"}\n{"text": "b"}\n', "jsonl", "fewer than one window")])
def test_errors_are_the_in_memory_errors(tmp_path, monkeypatch, content, source, message):
  monkeypatch.setattr(streams, "CHUNK_BYTES", 4)
  path = tmp_path / f"data.{'txt' if source == 'text' else 'jsonl'}"
  path.write_bytes(content)
  data = run_config.DataConfig(source=source, path=str(path))
  for cached in (True, False):
    with pytest.raises(DataError, match=message):
      pipeline.load_splits(dataclasses.replace(data, token_cache=cached), 32)


def test_a_store_is_built_once_and_a_change_of_source_or_tokenizer_rebuilds_it(tmp_path, _cache):
  data = _write_sources(tmp_path)["text"]
  built = len(token_cache.BUILT)
  _, first, _ = pipeline.load_splits(data, 8)
  _, again, _ = pipeline.load_splits(data, 16, segment_ids=True)  # another seq_len: same store
  assert len(token_cache.BUILT) == built + 1 and again.directory == first.directory
  assert os.listdir(_cache / "tokens") == [os.path.basename(first.directory)]
  with open(data.path, "a", encoding="utf-8") as f:  # the source changes: a new store
    f.write("one more line\n")
  _, changed, _ = pipeline.load_splits(data, 8)
  _, fraction, _ = pipeline.load_splits(dataclasses.replace(data, val_fraction=0.2), 8)
  _, no_cache, _ = pipeline.load_splits(dataclasses.replace(data, token_cache=False), 8)
  assert isinstance(no_cache, np.ndarray)
  spm = tokenizers.build_tokenizer("sentencepiece", None, [_shakespeare(30_000)], 400,
                                   str(tmp_path / "w"))
  tok, by_spm, _ = pipeline.load_splits(
      dataclasses.replace(data, tokenizer="sentencepiece", spm_model=spm.model_file), 8)
  assert tok.vocab_size == 400
  dirs = {first.directory, changed.directory, fraction.directory, by_spm.directory}
  assert len(dirs) == 4 and len(token_cache.BUILT) == built + 4
  assert not [d for d in os.listdir(_cache / "tokens") if ".tmp-" in d]
  manifest = token_cache.read_manifest(by_spm.directory)
  assert manifest["tokenizer"]["kind"] == "sentencepiece" and manifest["dtype"] == "uint16"
  _, mem, _ = _in_memory(dataclasses.replace(data, tokenizer="sentencepiece",
                                             spm_model=spm.model_file), 8, False)
  np.testing.assert_array_equal(np.asarray(by_spm), mem)


def test_a_failed_build_leaves_no_store_and_a_store_without_manifest_is_not_read(tmp_path,
                                                                                 _cache):
  path = tmp_path / "late_error.txt"
  path.write_bytes(b"fine text\n" * 100 + b"\xff")
  data = run_config.DataConfig(source="text", path=str(path))
  with pytest.raises(DataError, match="not UTF-8: byte 1000"):
    pipeline.load_splits(data, 8)
  assert os.listdir(_cache / "tokens") == []  # the partial build was removed, nothing renamed
  path.write_bytes(b"fine text\n" * 100)
  documents = streams.documents(data)
  name = token_cache.store_name(documents.fingerprint(), tokenizers.ByteTokenizer().fingerprint())
  half = _cache / "tokens" / name
  half.mkdir()
  (half / token_cache.TOKENS).write_bytes(b"\x01\x00" * 3)  # a killed copy: no manifest
  _, train, _ = pipeline.load_splits(data, 8)
  _, mem, _ = _in_memory(data, 8, False)
  np.testing.assert_array_equal(np.asarray(train), mem)
  assert train.directory == str(half) and token_cache.BUILT[-1] == name


def test_grain_reads_rows_per_host_and_resumes_from_the_iterator_state(tmp_path):
  data = _write_sources(tmp_path)["jsonl"]
  _, train, _ = pipeline.load_splits(data, 5, segment_ids=True)
  hosts = [pipeline.host_batches(train, batch_size=4, steps=20, seed=3, process_index=p,
                                 process_count=2) for p in range(2)]
  whole = pipeline.host_batches(train, batch_size=4, steps=20, seed=3)
  for s in (0, 7, 19):
    for key in ("tokens", "segment_ids"):
      np.testing.assert_array_equal(np.concatenate([h[s][key] for h in hosts]), whole[s][key])
  it = pipeline.train_iterator(train, batch_size=2, steps=20, seed=0)
  for _ in range(5):
    next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(3)]
  _, reopened, _ = pipeline.load_splits(data, 5, segment_ids=True)  # a restart
  resumed = pipeline.train_iterator(reopened, batch_size=2, steps=20, seed=0)
  resumed.set_state(state)
  for batch in expected:
    got = next(resumed)
    for key in ("tokens", "segment_ids"):
      np.testing.assert_array_equal(got[key], batch[key])
  val = pipeline.eval_batches(train, batch_size=4, n_batches=2)
  np.testing.assert_array_equal(val[1]["tokens"], np.stack([train[i]["tokens"]
                                                             for i in range(4, 8)]))


class _FakeGCS(epath_backend._OsPathBackend):  # pylint: disable=protected-access
  """``gs://BUCKET/x`` as the local ``ROOT/BUCKET/x``: GCS for epath without a network."""

  def __init__(self, root: str):
    self.root = root

  def _at(self, path) -> str:
    path = os.fspath(path)
    return os.path.join(self.root, path[len("gs://"):]) if path.startswith("gs://") else path

  def open(self, path, mode):
    return super().open(self._at(path), mode)

  def exists(self, path):
    return super().exists(self._at(path))

  def isdir(self, path):
    return super().isdir(self._at(path))

  def listdir(self, path):
    return super().listdir(self._at(path))

  def makedirs(self, path, *, exist_ok=False, mode=None):
    return super().makedirs(self._at(path), exist_ok=exist_ok, mode=mode)

  def mkdir(self, path, *, exist_ok=False, mode=None):
    return super().mkdir(self._at(path), exist_ok=exist_ok, mode=mode)

  def remove(self, path):
    return super().remove(self._at(path))

  def rename(self, path, dst):
    return super().rename(self._at(path), self._at(dst))

  def replace(self, path, dst):
    return super().replace(self._at(path), self._at(dst))

  def stat(self, path):
    return super().stat(self._at(path))


@pytest.fixture
def fake_gcs(tmp_path, monkeypatch):
  root = tmp_path / "gcs"
  root.mkdir()
  monkeypatch.setattr(gpath, "_is_tf_installed", lambda: False)
  backends = gpath._PREFIX_TO_BACKEND  # pylint: disable=protected-access
  monkeypatch.setitem(backends, "gs", _FakeGCS(str(root)))
  monkeypatch.chdir(tmp_path)
  return root


def test_a_gs_cache_is_written_once_and_copied_down_per_host(tmp_path, fake_gcs, monkeypatch):
  lines = _shakespeare(30_000).splitlines()
  (tmp_path / "plays.jsonl").write_text("".join(json.dumps({"text": "\n".join(lines[i:i + 4])})
                                                + "\n" for i in range(0, len(lines), 4)))
  data = run_config.DataConfig(source="jsonl", path=str(tmp_path / "plays.jsonl"),
                               cache_dir="gs://bucket/cache", tokenizer="sentencepiece",
                               spm_vocab_size=400)
  built = len(token_cache.BUILT)
  tok, train, val = pipeline.load_splits(data, 6, "gs://bucket/run", segment_ids=True)
  assert (fake_gcs / "bucket" / "run" / "spm.model").is_file() and tok.vocab_size == 400
  stores = os.listdir(fake_gcs / "bucket" / "cache" / "tokens")
  assert len(stores) == 1 and len(token_cache.BUILT) == built + 1
  assert sorted(os.listdir(fake_gcs / "bucket" / "cache" / "tokens" / stores[0])) == sorted(
      [token_cache.MANIFEST, token_cache.TOKENS, token_cache.ENDS])
  assert train.directory == str(tmp_path / "nlx_cache" / "mirror" / stores[0])
  monkeypatch.setenv("NLX_CACHE", str(tmp_path / "other_host"))  # another host: copies it down
  _, other, other_val = pipeline.load_splits(data, 6, "gs://bucket/run", segment_ids=True)
  assert len(token_cache.BUILT) == built + 1
  assert other.directory == str(tmp_path / "other_host" / "mirror" / stores[0])
  for key in ("tokens", "segment_ids"):
    np.testing.assert_array_equal(other[key], train[key])
    np.testing.assert_array_equal(other_val[key], val[key])
  _, mem, _ = _in_memory(data, 6, True, "gs://bucket/run")  # the same spm model, in memory
  np.testing.assert_array_equal(train["tokens"], mem["tokens"])
  assert not os.path.exists(tmp_path / "gs:")  # never a local folder named after the URL
  with pytest.raises(DataError, match=r"data.cache_dir='zz://x': no file system"):
    pipeline.load_splits(dataclasses.replace(data, cache_dir="zz://x"), 6, "gs://bucket/run")


SCRIPT = r"""
import json, sys
from nlx.train import sharding
sharding.maybe_initialize_distributed()
import jax
from nlx.data import pipeline, token_cache
from nlx.train import config
data = config.DataConfig(source="jsonl", path=sys.argv[1], cache_dir=sys.argv[2])
_, train, _ = pipeline.load_splits(data, 5, segment_ids=True)
print("RESULT", json.dumps({"process": jax.process_index(), "built": token_cache.BUILT,
                            "directory": train.directory,
                            "tokens": train["tokens"][:3].tolist()}), flush=True)
"""


def test_two_processes_build_the_store_once(tmp_path):
  data = _write_sources(tmp_path)["jsonl"]
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_COORDINATOR_ADDRESS=f"localhost:{port}",
             JAX_NUM_PROCESSES="2")
  env["XLA_FLAGS"] = xla_flags()  # no fake devices
  procs = [subprocess.Popen([sys.executable, "-c", SCRIPT, data.path, str(tmp_path / "shared")],
                            cwd=ROOT, text=True, env=dict(env, JAX_PROCESS_ID=str(i)),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE) for i in range(2)]
  try:
    outputs = [p.communicate(timeout=300) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  results = []
  for p, (out, err) in zip(procs, outputs):
    lines = [l for l in out.splitlines() if l.startswith("RESULT ")]
    assert p.returncode == 0 and lines, err[-3000:]
    results.append(json.loads(lines[0][len("RESULT "):]))
  results.sort(key=lambda r: r["process"])
  assert len(results[0]["built"]) == 1 and results[1]["built"] == []  # process 1 waited
  assert results[0]["directory"] == results[1]["directory"]
  assert results[0]["tokens"] == results[1]["tokens"]


def test_the_benchmark_measures_every_variant_on_the_same_windows(tmp_path):
  out = tmp_path / "token_cache.json"
  proc = subprocess.run([sys.executable, "-m", "benchmarks.token_cache", "--size_mb", "1",
                         "--seq_len", "64", "--out", str(out)], capture_output=True, text=True,
                        timeout=300, check=False, cwd=ROOT)
  assert proc.returncode == 0, proc.stderr[-2000:]
  result = json.loads(out.read_text())
  assert result["failures"] == [] and result["meta"]["complete"]
  records = {r["variant"]: r for r in result["records"]}
  assert list(records) == ["in_memory", "cache_build", "cache_restart"]
  for r in records.values():
    assert all(r[key] is not None for key in ("startup_s", "peak_rss_bytes", "base_rss_bytes"))
    assert r["peak_rss_bytes"] >= r["base_rss_bytes"] > 0
  assert len({(r["train_windows"], r["first_batch_sum"]) for r in records.values()}) == 1
  assert records["in_memory"]["store_bytes"] == 0
  assert records["cache_build"]["store_bytes"] == records["cache_restart"]["store_bytes"] > 2**20
  assert "cache_restart" in proc.stdout and "peak RSS MiB" in proc.stdout
  help_text = subprocess.run([sys.executable, "-m", "benchmarks.token_cache", "--help"],
                             capture_output=True, text=True, timeout=60, check=True, cwd=ROOT)
  assert "usage: python -m benchmarks.token_cache" in help_text.stdout


def test_an_unwritable_cache_directory_is_one_error_line(tmp_path):
  blocker = tmp_path / "a_file"
  blocker.write_text("not a directory")
  data = dataclasses.replace(_write_sources(tmp_path)["text"], cache_dir=str(blocker / "cache"))
  with pytest.raises(DataError, match=r"the token cache cannot be written in .*a_file/cache/tokens"
                                      r".*data.token_cache=False"):
    pipeline.load_splits(data, 8)
