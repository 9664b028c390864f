"""nlx.validation, the one module of config and optimizer checks: types from annotations, minimums,
choices and ranges, each refusal naming the field, the value and what is allowed, in the wording
of the config it checks; traced values and schedules pass; no JAX is imported."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from typing import Optional

import jax
import jax.numpy as jnp
import pytest

from nlx import validation


@dataclasses.dataclass(frozen=True)
class _Section:
  steps: int = 1
  rate: float = 0.1
  name: str = "a"
  flag: bool = True
  path: Optional[str] = None
  lr: float | tuple = 1.0
  periods: tuple = (1,)


def test_kinds_of_annotations():
  assert validation.kinds(Optional[int]) == ((int,), True)
  assert validation.kinds(float | tuple) == ((float, tuple), False)
  assert validation.kinds(str) == ((str,), False)


@pytest.mark.parametrize("field, value, section_message, model_message", [
    ("steps", 2.5, "s.steps=2.5 must be an int", "s.steps must be an int; got 2.5"),
    ("steps", True, "s.steps=True must be an int", "s.steps must be an int; got True"),
    ("steps", None, "s.steps=None must be an int", "s.steps must be an int; got None"),
    ("rate", "x", "s.rate='x' must be a float", "s.rate must be a float; got 'x'"),
    ("flag", 1, "s.flag=1 must be a bool", "s.flag must be a bool; got 1"),
    ("path", 3, "s.path=3 must be a str or None", "s.path must be a str or None; got 3"),
    ("lr", "fast", "s.lr='fast' must be a float or tuple",
     "s.lr must be a float or tuple; got 'fast'"),
])
def test_types_are_refused_in_both_wordings(field, value, section_message, model_message):
  bad = dataclasses.replace(_Section(), **{field: value})
  with pytest.raises(ValueError) as err:
    validation.check_fields(bad, "s")
  assert str(err.value) == section_message
  with pytest.raises(ValueError) as err:
    validation.check_fields(bad, "s", got=True)
  assert str(err.value) == model_message


def test_good_values_pass():
  validation.check_fields(_Section(steps=3, rate=1, lr=(0.1, 0.2), periods=[1, 2]), "s")
  validation.check_type("x", 1.5, float)
  with pytest.raises(TypeError, match="no type check for annotation"):
    validation.check_type("x", 1.5, dict)


def test_minimums_and_choices():
  with pytest.raises(ValueError, match=r"^train.steps=0 must be >= 1$"):
    validation.check_at_least("train.steps", 0, 1)
  with pytest.raises(ValueError, match=r"^model.d_model must be >= 1; got 0$"):
    validation.check_at_least("model.d_model", 0, 1, got=True)
  with pytest.raises(ValueError, match=r"^model.window must be None or >= 1; got 0$"):
    validation.check_at_least("model.window", 0, 1, got=True, none_ok=True)
  validation.check_at_least("model.window", None, 1, got=True, none_ok=True)
  with pytest.raises(ValueError, match=r"^s.rate=-1.0 must be >= 0.0$"):
    validation.check_minimums("s", _Section(rate=-1.0), steps=1, rate=0.0)
  with pytest.raises(ValueError, match=r"^n='c' is not allowed; allowed: \['a', 'b'\]$"):
    validation.check_choice("n", "c", ("a", "b"))
  with pytest.raises(ValueError, match=r"^n='c' is not supported; allowed: \['a', 'b'\]$"):
    validation.check_choice("n", "c", ("a", "b"), style="supported")
  with pytest.raises(ValueError, match=r"^n='c' is not one of \('a', 'b'\)$"):
    validation.check_choice("n", "c", ("a", "b"), style="one_of")
  with pytest.raises(TypeError, match="style='loud'"):
    validation.check_choice("n", "c", ("a", "b"), style="loud")
  validation.check_choice("n", "a", ["a"])


def test_ranges_and_ints_pass_schedules_and_traced_values():
  with pytest.raises(ValueError, match=r"^lr=-1.0 is out of range; allowed: \[0.0, inf\]$"):
    validation.check_range("lr", -1.0, 0.0)
  with pytest.raises(ValueError, match=r"^b=1.0 is out of range; allowed: \[0.0, 1.0\)$"):
    validation.check_range("b", 1.0, 0.0, 1.0, high_open=True)
  with pytest.raises(ValueError, match=r"^b=nan is out of range"):
    validation.check_range("b", float("nan"), 0.0)
  with pytest.raises(ValueError, match=r"^b='x' must be a number$"):
    validation.check_range("b", "x", 0.0)
  with pytest.raises(ValueError, match=r"^n=1.5 must be an int >= 1$"):
    validation.check_int("n", 1.5, 1)
  with pytest.raises(ValueError, match=r"^n=True must be an int >= 1$"):
    validation.check_int("n", True, 1)
  validation.check_range("lr", lambda step: -1.0, 0.0)  # a schedule

  @jax.jit
  def f(x):
    validation.check_range("lr", x, 0.0)
    validation.check_int("n", x, 1)
    return x

  assert float(f(jnp.float32(-1.0))) == -1.0  # traced: not checkable, checked when concrete


def test_the_config_checks_import_no_jax():
  code = ("import sys, nlx.validation, nlx.train.config\n"
          "print('JAX' if 'jax' in sys.modules else 'NOJAX')")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       check=True).stdout
  assert out.strip() == "NOJAX"
