"""Every study runs as a script path from the checkout, ``python experiments/<study>.py``, as
well as ``python -m experiments.<study>`` (the scripts put the checkout's root on the path)."""

import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STUDIES = ("babi_long", "continual", "formal_languages", "lm", "mad", "meta_optimizer", "mqar",
           "niah", "optimizers", "remember", "zero_shot")


def run_script(study: str, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess:
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  return subprocess.run([sys.executable, os.path.join("experiments", f"{study}.py"), *args],
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout,
                        check=False)


def test_mad_runs_as_a_script_path():
  done = run_script("mad", "--help")
  assert done.returncode == 0, done.stderr[-2000:]
  assert "--scale" in done.stdout


@pytest.mark.slow
@pytest.mark.parametrize("study", STUDIES)
def test_every_study_runs_as_a_script_path(study):
  done = run_script(study, "--help")
  assert done.returncode == 0, done.stderr[-2000:]
  assert "usage" in done.stdout


@pytest.mark.slow
def test_mad_tiny_runs_as_a_script_within_five_minutes(tmp_path):
  done = run_script("mad", "--scale", "tiny", "--out", str(tmp_path), timeout=300.0)
  assert done.returncode == 0, done.stderr[-2000:]
  assert (tmp_path / "mad.json").exists()
