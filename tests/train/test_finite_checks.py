"""The step guard without a per-step fetch (``train.check_finite``): the device keeps the first
non-finite step between checks (``nlx.train.step.update_guard``) and the check at the next log
step names it and its first non-finite tensor; ``every_step`` stops at the step itself."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nlx.train import checkpoint as checkpoint_lib
from nlx.train import metrics as metrics_lib
from nlx.train import step as step_lib

from reliability_cases import params
from reliability_cases import train as _train

# A learning rate that overflows the parameters within a few steps; four steps, one log step.
BLOW_UP = ["--config.optimizer.learning_rate=1e30", "--config.optimizer.warmup_steps=0",
           "--config.train.steps=4", "--config.train.log_every=4", "--config.train.eval_every=0",
           "--config.train.checkpoint_every=0"]


def _first_bad(err: str) -> int:
  found = re.search(r"step (\d+): non-finite values: loss=", err)
  assert found, err
  return int(found.group(1))


def test_the_guard_keeps_the_first_non_finite_step_and_counts_them():
  n = 3
  guard = step_lib.init_guard(n)
  flags = lambda *bad: jnp.asarray([i in bad for i in range(n)])
  steps = {1: (1.0, flags(), flags()), 2: (jnp.nan, flags(1), flags(1, 2)),
           3: (2.0, flags(), flags()), 4: (jnp.inf, flags(0), flags())}
  update = jax.jit(step_lib.update_guard)
  for number, (loss, grads, new_params) in steps.items():
    guard = update(guard, jnp.int32(number), {"loss": jnp.float32(loss),
                                              "nonfinite_grads": grads,
                                              "nonfinite_params": new_params})
  guard = jax.device_get(guard)
  assert int(guard["count"]) == 2 and int(guard["first_step"]) == 2
  assert np.isnan(guard["first_loss"])
  np.testing.assert_array_equal(guard["first_grads"], [False, True, False])
  np.testing.assert_array_equal(guard["first_params"], [False, True, True])
  fresh = jax.device_get(step_lib.init_guard(n))
  assert int(fresh["count"]) == 0 and int(fresh["first_step"]) == 0


def test_a_non_finite_step_between_log_steps_is_named_at_the_next_log_step(tmp_path, capsys):
  assert _train(tmp_path / "every", *BLOW_UP, "--config.train.check_finite=every_step") == 1
  err = capsys.readouterr().err
  first_bad = _first_bad(err)
  assert 1 < first_bad < 4, err  # a step between the log steps 0 and 4
  assert "first non-finite gradient: " in err and " of steps " not in err, err
  assert not metrics_lib.read_records(str(tmp_path / "every"))  # stopped before the log step
  # The default: the same run (same seed) checks at step 4 only, and names the same step.
  assert _train(tmp_path / "logged", *BLOW_UP) == 1
  err = capsys.readouterr().err
  assert _first_bad(err) == first_bad, err
  assert f"of steps 1-4 were non-finite; each was skipped (parameters unchanged) and the " \
         "others trained on until this check at step 4" in err, err
  assert "no checkpoint of this run was written" in err and "check_finite=every_step" in err
  assert "first non-finite gradient: " in err
  assert checkpoint_lib.Checkpointer(str(tmp_path / "logged" / "checkpoints"),
                                     2).latest_step() is None  # nothing saved after a bad step


def test_skip_counts_the_non_finite_steps_of_the_interval(tmp_path, capsys, monkeypatch):
  fetched, device_get = [], jax.device_get

  def spy(tree):  # the host reads the guard only when it checks: at the log steps 2 and 4
    if isinstance(tree, dict) and "first_step" in tree:
      fetched.append(int(tree["count"]))
    return device_get(tree)

  monkeypatch.setattr(jax, "device_get", spy)
  workdir = tmp_path / "run"
  assert _train(workdir, *BLOW_UP, "--config.train.log_every=2", "--on_nonfinite=skip") == 0
  assert len(fetched) == 2, fetched
  err = capsys.readouterr().err
  records = metrics_lib.read_records(str(workdir))
  assert [r["step"] for r in records] == [2, 4]
  skipped = int(records[-1]["skipped_steps"])
  assert 1 <= skipped <= 3 and "skipped (parameters unchanged)" in err, err
  assert sum(fetched) == skipped
  assert _first_bad(err) <= 4
  assert all(np.isfinite(x).all() for x in params(workdir))


@pytest.mark.parametrize("bad", ["loss", "gradient"])
def test_the_guard_report_names_the_first_step_and_tensor(bad):
  from nlx.train import loop  # pylint: disable=g-import-not-at-top
  paths = ["embed/table", "norm/scale", "lm_head/kernel"]
  guard = jax.device_get(step_lib.init_guard(3))
  assert loop.guard_report(guard, paths) is None
  guard = dict(guard, count=np.int32(2), first_step=np.int32(7),
               first_loss=np.float32(np.nan if bad == "loss" else 1.0),
               first_grads=np.asarray([False, bad == "gradient", False]))
  report = loop.guard_report(guard, paths)
  assert report.startswith("step 7: non-finite values: loss="), report
  assert ("first non-finite gradient: norm/scale (1 of 3" in report) == (bad == "gradient")
