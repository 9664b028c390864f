"""Argument checks shared by the optimizers: refuse bad hyperparameters with a message naming them.

Values that are traced (inside ``jax.jit`` or ``optax.inject_hyperparams``) or schedules
(callables) cannot be checked and pass through; they were checked when concrete.
"""

from __future__ import annotations

from typing import Any, Iterable

import jax


def _concrete_float(value: Any) -> float | None:
  """``float(value)``, or None for schedules and traced values."""
  if callable(value) or isinstance(value, jax.core.Tracer):
    return None
  try:
    return float(value)
  except (TypeError, ValueError) as err:
    raise ValueError(f"expected a number, got {value!r}") from err


def check_range(name: str, value: Any, low: float | None = None, high: float | None = None,
                low_open: bool = False, high_open: bool = False) -> None:
  """Raise ValueError unless ``low <= value <= high`` (or strict, for the open ends)."""
  try:
    x = _concrete_float(value)
  except ValueError as err:
    raise ValueError(f"{name}={value!r} must be a number") from err
  if x is None:
    return
  bad_low = low is not None and (x <= low if low_open else x < low)
  bad_high = high is not None and (x >= high if high_open else x > high)
  if bad_low or bad_high or x != x:
    left = "(" if low_open else "["
    right = ")" if high_open else "]"
    lo = "-inf" if low is None else low
    hi = "inf" if high is None else high
    raise ValueError(f"{name}={value!r} is out of range; allowed: {left}{lo}, {hi}{right}")


def check_int(name: str, value: Any, minimum: int) -> None:
  """Raise ValueError unless ``value`` is an int >= ``minimum`` (traced values pass)."""
  if isinstance(value, jax.core.Tracer):
    return
  if isinstance(value, bool) or int(value) != value or value < minimum:
    raise ValueError(f"{name}={value!r} must be an int >= {minimum}")


def check_choice(name: str, value: Any, allowed: Iterable[Any]) -> None:
  """Raise ValueError unless ``value`` is one of ``allowed``."""
  allowed = tuple(allowed)
  if value not in allowed:
    raise ValueError(f"{name}={value!r} is not supported; allowed: {list(allowed)}")
