"""Faults of a training run (docs/RELIABILITY.md): kill -9 and rerun, SIGTERM, a partial, corrupt
or foreign checkpoint, non-finite losses, and a user's bad input. Each fault is injected into a
real `nlx train` (a subprocess where a signal is involved) on the tiny Transformer."""

import os
import random
import shutil
import signal
import socket
import time

import jax
import numpy as np
import pytest

from nlx.train import checkpoint as checkpoint_lib
from nlx.train import loop
from nlx.train import metrics as metrics_lib
from nlx.train import trained

from reliability_cases import ROOT, WAIT_S, assert_same_params, log_tail, losses, params, spawn
from reliability_cases import train as _train
from xla_env import xla_flags


def _wait_for_step(proc, workdir, step: int) -> None:
  """Waits until WORKDIR/metrics.jsonl logs ``step`` (the process is then inside the loop)."""
  deadline = time.monotonic() + WAIT_S
  while time.monotonic() < deadline:
    records = metrics_lib.read_records(str(workdir))
    if records and records[-1]["step"] >= step:
      return
    assert proc.poll() is None, log_tail(workdir)
    time.sleep(0.05)
  proc.kill()
  pytest.fail(f"step {step} not reached")


def _finish(proc) -> int:
  return proc.wait(timeout=WAIT_S)


@pytest.fixture(scope="module")
def four_step_run(tmp_path_factory):
  """A finished 4-step run with checkpoints at steps 2 and 4 (copy it before damaging it)."""
  workdir = tmp_path_factory.mktemp("four") / "run"
  assert _train(workdir, "--config.train.steps=4", "--config.train.checkpoint_every=2") == 0
  return workdir


def _copy(run, tmp_path):
  shutil.copytree(run, tmp_path / "run")
  return tmp_path / "run"


def test_kill_9_at_a_random_step_then_rerun_equals_an_uninterrupted_run(tmp_path):
  flags = ["--config.train.steps=10", "--config.train.checkpoint_every=3"]
  assert _train(tmp_path / "full", *flags) == 0
  kill_at = random.Random().randint(2, 9)  # printed on failure by the assertion messages
  proc = spawn(tmp_path / "cut", *flags)
  _wait_for_step(proc, tmp_path / "cut", kill_at)
  proc.send_signal(signal.SIGKILL)
  assert _finish(proc) == -signal.SIGKILL
  saved = checkpoint_lib.Checkpointer(str(tmp_path / "cut" / "checkpoints"), 2).latest_step()
  assert _finish(spawn(tmp_path / "cut", *flags)) == 0, f"killed after step {kill_at}"
  assert losses(tmp_path / "cut") == losses(tmp_path / "full"), (kill_at, saved)
  assert_same_params(tmp_path / "cut", tmp_path / "full")


def test_a_checkpoint_cut_short_by_a_kill_is_never_loaded(four_step_run, tmp_path):
  run = _copy(four_step_run, tmp_path)
  # What a kill during the save of step 6 leaves: orbax's temporary directory, half written.
  partial = run / "checkpoints" / "6.orbax-checkpoint-tmp-1700000000000000"
  shutil.copytree(run / "checkpoints" / "4", partial)
  for path in partial.rglob("*"):
    if path.is_file() and path.stat().st_size > 64:
      os.truncate(path, 64)
  ckpt = checkpoint_lib.Checkpointer(str(run / "checkpoints"), 2)
  assert ckpt.manager.all_steps() == [2, 4]
  ckpt.close()
  assert trained.load(str(run)).step == 4


def test_sigterm_commits_the_current_step_and_exits_0(tmp_path):
  workdir = tmp_path / "run"
  proc = spawn(workdir, "--config.train.steps=100000", "--config.train.checkpoint_every=0")
  _wait_for_step(proc, workdir, 3)
  proc.send_signal(signal.SIGTERM)
  assert _finish(proc) == 0, log_tail(workdir)
  last = metrics_lib.read_records(str(workdir))[-1]["step"]
  assert 3 <= last < 100000
  assert checkpoint_lib.Checkpointer(str(workdir / "checkpoints"), 2).latest_step() == last
  assert trained.load(str(workdir)).step == last


@pytest.mark.slow
def test_sigterm_to_one_of_two_processes_stops_both_at_the_same_step(tmp_path):
  """Two processes (jax.distributed over gloo, one device each): a SIGTERM to process 1 alone
  is voted on by both (``Checkpointer.should_stop``), which save the same step and exit 0."""
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_COORDINATOR_ADDRESS=f"localhost:{port}",
             JAX_NUM_PROCESSES="2", NLX_CACHE=str(tmp_path / "cache"))
  env["XLA_FLAGS"] = xla_flags()  # no fake devices
  workdir = tmp_path / "run"
  procs = [spawn(workdir, "--config.train.steps=100000", "--config.train.checkpoint_every=0",
                 env=dict(env, JAX_PROCESS_ID=str(i)), log=tmp_path / f"p{i}.log")
           for i in range(2)]
  try:
    deadline = time.monotonic() + WAIT_S
    while not (metrics_lib.read_records(str(workdir)) or [{"step": 0}])[-1]["step"] >= 3:
      assert all(p.poll() is None for p in procs) and time.monotonic() < deadline, (
          (tmp_path / "p0.log").read_text()[-3000:] + (tmp_path / "p1.log").read_text()[-3000:])
      time.sleep(0.05)
    procs[1].send_signal(signal.SIGTERM)
    codes = [_finish(p) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  assert codes == [0, 0], (tmp_path / "p1.log").read_text()[-3000:]
  last = metrics_lib.read_records(str(workdir))[-1]["step"]
  ckpt = checkpoint_lib.Checkpointer(str(workdir / "checkpoints"), 2, read_only=True)
  assert 3 <= ckpt.latest_step() == last < 100000
  ckpt.close()


def _truncate_largest_file(step_dir) -> None:
  largest = max((p for p in step_dir.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
  os.truncate(largest, largest.stat().st_size // 2)


def test_a_truncated_checkpoint_is_named_and_fallback_resumes_from_the_newest_good(
    four_step_run, tmp_path, capsys):
  run = _copy(four_step_run, tmp_path)
  _truncate_largest_file(run / "checkpoints" / "4" / "state")
  assert _train(run, "--config.train.steps=6") == 1
  err = capsys.readouterr().err
  assert "error: checkpoint step 4" in err and "--fallback_to_good_checkpoint" in err
  assert _train(run, "--config.train.steps=6", "--fallback_to_good_checkpoint") == 0
  assert "checkpoint step 4" in capsys.readouterr().err  # the warning
  assert (run / "checkpoints" / "bad-4").is_dir()
  assert [r["step"] for r in metrics_lib.read_records(str(run))] == [1, 2, 3, 4, 5, 6]
  assert trained.load(str(run)).step == 6


def test_a_checkpoint_of_another_config_names_the_step_and_the_tensor(four_step_run, capsys):
  ckpt_dir = str(four_step_run / "checkpoints")
  run = loop.load_workdir_config(str(four_step_run))
  run.model.d_model = 128
  with pytest.raises(Exception, match="checkpoint step 4.*: params/embed/table is float32\\[256, 64\\] in "
                     "the checkpoint, float32\\[256, 128\\] in this config"):
    _restore(run, ckpt_dir)
  assert _train(four_step_run, "--config.train.steps=6", "--config.model.d_model=128",
                "--checkpoint_dir", ckpt_dir) == 1
  assert "error: checkpoint step 4 " in capsys.readouterr().err
  assert checkpoint_lib.Checkpointer(ckpt_dir, 2).latest_step() == 4  # nothing moved or written


def _restore(cfg, ckpt_dir):
  from nlx.train import config as run_config  # pylint: disable=g-import-not-at-top
  from nlx.train import sharding, step  # pylint: disable=g-import-not-at-top
  run = run_config.validate(cfg, n_devices=jax.device_count())
  trainer = step.build(run, sharding.make_mesh(run.mesh))
  return checkpoint_lib.Checkpointer(ckpt_dir, 2).restore_newest_good(trainer.abstract_state)


BLOW_UP = ["--config.optimizer.learning_rate=1e30", "--config.optimizer.warmup_steps=0",
           "--config.train.steps=4", "--config.train.checkpoint_every=1"]


def test_a_non_finite_loss_stops_naming_the_step_and_tensor_and_keeps_the_checkpoint(
    tmp_path, capsys):
  workdir = tmp_path / "run"
  assert _train(workdir, *BLOW_UP) == 1
  err = capsys.readouterr().err
  records = metrics_lib.read_records(str(workdir))
  first_bad = len(records) + 1
  assert f"error: step {first_bad}: non-finite values: loss=" in err, err
  assert "first non-finite gradient: " in err and "newest checkpoint" in err
  good = trained.load(str(workdir))
  assert good.step == first_bad - 1 >= 1
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(jax.device_get(good.model)))


def test_skip_on_non_finite_keeps_the_parameters(tmp_path, capsys):
  workdir = tmp_path / "run"
  assert _train(workdir, *BLOW_UP, "--on_nonfinite=skip") == 0
  assert "step skipped" in capsys.readouterr().err
  records = metrics_lib.read_records(str(workdir))
  skipped = int(records[-1]["skipped_steps"])
  assert 1 <= skipped <= 3
  # Every skipped step left the parameters as they were: the norms repeat from the first skip.
  norms = [r["param_norm"] for r in records]
  assert norms[-skipped - 1:] == [norms[-1]] * (skipped + 1)
  assert all(np.isfinite(x).all() for x in params(workdir))  # (their norm overflows: ~1e30 each)


def test_the_step_guard_names_the_first_non_finite_tensor_and_keeps_the_state():
  from nlx import configs  # pylint: disable=g-import-not-at-top
  from nlx.train import sharding, step  # pylint: disable=g-import-not-at-top
  run = configs.validate(configs.load(os.path.join(ROOT, "configs", "transformer.py") + ":tiny",
                                      ["train.steps=2"]), n_devices=1)
  trainer = step.build(run, sharding.make_mesh(run.mesh, jax.devices()[:1]))
  state = step.init_state(trainer, run.model, 0)
  paths = step.param_paths(state["params"])
  leaves, treedef = jax.tree.flatten(state["params"])
  target = paths.index("norm/scale")
  leaves[target] = leaves[target].at[0].set(np.inf)
  state["params"] = jax.tree.unflatten(treedef, leaves)
  tokens = np.ones((2, 9), np.int32)
  new_state, metrics = jax.jit(step.train_step_fn(trainer))(state, tokens)
  metrics = jax.device_get(metrics)
  assert metrics["nonfinite_params"][target] and metrics["nonfinite_grads"].any()
  assert loop.nonfinite_report(7, metrics, paths).startswith("step 7: non-finite values: loss=nan")
  for key in ("params", "opt_state"):  # the guard kept them
    for old, new in zip(jax.tree.leaves(state[key]), jax.tree.leaves(new_state[key]), strict=True):
      np.testing.assert_array_equal(old, new)
  flags = {"nonfinite_grads": np.zeros(len(paths), bool),
           "nonfinite_params": np.zeros(len(paths), bool)}
  assert loop.nonfinite_report(1, {"loss": 1.0, **flags}, paths) is None
  flags["nonfinite_grads"][3] = True
  assert f"first non-finite gradient: {paths[3]} (1 of" in loop.nonfinite_report(
      1, {"loss": 1.0, **flags}, paths)


@pytest.mark.parametrize("flags,message", [
    (["--config.train.batch_size=0"], "train.batch_size=0 must be >= 1"),
    (["--config.train.steps=many"], "train.steps must be a int like its default"),
    (["--config.model.n_heads=3"], "model.n_heads=3 must divide model.d_model=64"),
    (["--config.mesh.data=3"], "product 3 != 1 devices"),
    (["--config.data.source=text", "--config.data.path=/no/such/file.txt"], "does not exist"),
    (["--config.train.seq_len=900000"], "fewer than one window"),
    (["--config=configs/no_such_config.py:tiny"], "does not exist")])
def test_a_user_mistake_is_one_error_line_and_exit_2(tmp_path, capsys, flags, message):
  assert _train(tmp_path / "run", *flags, "--config.train.steps=1") == 2
  err = capsys.readouterr().err  # the error is the last line (after the token cache's notes)
  last = err.strip().splitlines()[-1]
  assert last.startswith("nlx train: error: ") and message in last, err
  assert err.count("error: ") == 1 and "Traceback" not in err, err


@pytest.mark.parametrize("content,message", [(b"", "is empty"), (b"\xff\xfeabc" * 50, "is not UTF-8")])
def test_bad_data_files_are_named(tmp_path, capsys, content, message):
  path = tmp_path / "corpus.txt"
  path.write_bytes(content)
  assert _train(tmp_path / "run", "--config.data.source=text", f"--config.data.path={path}") == 2
  assert f"data file '{path}' {message}" in capsys.readouterr().err


def test_a_prompt_longer_than_the_model_supports_is_refused(four_step_run, capsys):
  from nlx import cli  # pylint: disable=g-import-not-at-top
  assert cli.main(["generate", "--workdir", str(four_step_run), "--prompt", "x" * 4000,
                   "--max_new_tokens", "100"]) == 2
  err = capsys.readouterr().err
  assert "the prompt is 4000 tokens" in err and "model.max_seq_len=4096" in err


def test_a_relative_workdir_checkpoints_is_killed_and_resumes(tmp_path):
  """The README's main job: `nlx train --workdir runs/x` from the user's current directory."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)  # this checkout, from any cwd
  flags = ["--config.train.steps=8", "--config.train.checkpoint_every=2"]
  log = tmp_path / "run.log"
  proc = spawn("runs/x", *flags, env=env, cwd=tmp_path, log=log)
  workdir = tmp_path / "runs" / "x"
  deadline = time.monotonic() + WAIT_S
  while not (workdir / "checkpoints" / "2").is_dir():
    assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  assert _finish(proc) == -signal.SIGKILL
  saved = checkpoint_lib.Checkpointer(str(workdir / "checkpoints"), 2).latest_step()
  assert saved is not None and saved >= 2
  assert _finish(spawn("runs/x", *flags, env=env, cwd=tmp_path, log=log)) == 0, log.read_text()
  text = log.read_text()
  assert f"resuming from checkpoint step {saved} ({workdir}/checkpoints/{saved})" in text, text
  assert trained.load(str(workdir)).step == 8
  assert not list(tmp_path.glob("**/*.orbax-checkpoint-tmp*")), "a save failed"


def test_an_unwritable_checkpoint_directory_is_refused_before_training(tmp_path, capsys):
  blocker = tmp_path / "file"
  blocker.write_text("not a directory")
  assert _train(tmp_path / "run", "--checkpoint_dir", str(blocker / "checkpoints"),
                "--config.train.steps=2") == 1
  err = capsys.readouterr().err
  assert err.strip().splitlines()[-1].startswith(
      f"nlx train: error: checkpoint directory {blocker}/checkpoints is not writable: "), err
  assert "Traceback" not in err and not metrics_lib.read_records(str(tmp_path / "run"))


def test_a_disk_without_room_for_a_checkpoint_is_refused_before_training(
    tmp_path, capsys, monkeypatch):
  import shutil as shutil_lib  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(shutil_lib, "disk_usage", lambda path: shutil_lib._ntuple_diskusage(
      10 * 2**20, 10 * 2**20 - 4096, 4096))
  assert _train(tmp_path / "run", "--config.train.steps=2") == 1
  err = capsys.readouterr().err
  assert "has 0.0 MiB free; one checkpoint needs" in err and "Traceback" not in err, err


def test_a_save_failing_mid_run_with_enospc_stops_at_that_step_and_keeps_the_last_good(
    tmp_path, capsys, monkeypatch):
  """A full disk during the (background) save of step 4: stop there, naming step and path."""
  import errno  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  original, saves = ocp.JsonCheckpointHandler._save_fn, []

  async def save_fn(self, item, directory):
    saves.append(str(directory))
    if len(saves) == 2:  # the second save (step 4) finds the disk full
      raise OSError(errno.ENOSPC, "No space left on device", str(directory))
    return await original(self, item, directory)

  monkeypatch.setattr(ocp.JsonCheckpointHandler, "_save_fn", save_fn)
  workdir = tmp_path / "run"
  assert _train(workdir, "--config.train.steps=12", "--config.train.checkpoint_every=2") == 1
  err = capsys.readouterr().err
  ckpts = workdir / "checkpoints"
  assert (f"nlx train: error: saving checkpoint step 4 to {ckpts}/4 failed: OSError: [Errno 28] "
          "No space left on device") in err, err
  assert "the newest good checkpoint is step 2; stopped" in err and "Traceback" not in err, err
  assert metrics_lib.read_records(str(workdir))[-1]["step"] <= 5  # at most the step in flight
  monkeypatch.setattr(ocp.JsonCheckpointHandler, "_save_fn", original)
  ckpt = checkpoint_lib.Checkpointer(str(ckpts), 2)
  assert ckpt.manager.all_steps() == [2]
  ckpt.close()
  assert _train(workdir, "--config.train.steps=6", "--config.train.checkpoint_every=2") == 0
  assert "resuming from checkpoint step 2" in capsys.readouterr().err
  assert trained.load(str(workdir)).step == 6
