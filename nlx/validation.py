"""The checks of every config field and optimizer argument: a ValueError names the field, the value
and what is allowed.

One module for the model config (``nlx.nn.config`` and the field classes beside the families), the
run sections (``nlx.train.config``) and the optimizer arguments (``nlx.optim``):

* ``check_fields`` / ``check_type``: the type of a dataclass field from its annotation (``int``,
  ``float``, ``bool``, ``str``, ``tuple``, a union of them such as ``float | tuple``, or
  ``Optional[...]``). An int is not a bool; a float may be any real but a bool; a list is a tuple.
* ``check_at_least`` (``check_minimums``: several fields), ``check_choice``: a minimum, a value
  from a list.
* ``check_range``, ``check_int``: numbers that may be traced (inside ``jax.jit`` or
  ``optax.inject_hyperparams``) or schedules (callables); those pass unchecked, they were checked
  when concrete.

Two wordings, kept from the modules these checks came from (users and tests match them):
``NAME=VALUE must be ...`` (run sections, optimizers) and, with ``got=True``, ``NAME must be ...;
got VALUE`` (the model config's types and minimums).

This module imports no JAX: run configs are validated before ``jax.distributed.initialize``. A
value can only be a tracer once JAX is imported, so the tracer test looks JAX up in
``sys.modules``.
"""

from __future__ import annotations

import dataclasses
import functools
import numbers
import sys
import types
import typing
from typing import Any, Iterable, Optional

# How a value is checked against each type a field may be annotated with.
_IS = {
    int: lambda v: isinstance(v, numbers.Integral) and not isinstance(v, bool),
    float: lambda v: isinstance(v, numbers.Real) and not isinstance(v, bool),
    bool: lambda v: isinstance(v, bool),
    str: lambda v: isinstance(v, str),
    tuple: lambda v: isinstance(v, (tuple, list)),
}
# The ways ``check_choice`` words a refusal.
CHOICE_STYLES = ("allowed", "supported", "one_of")


def kinds(annotation: Any) -> tuple[tuple[type, ...], bool]:
  """``(types, optional)`` of a field annotation: ``Optional[int]`` -> ``((int,), True)``,
  ``float | tuple`` -> ``((float, tuple), False)``, ``str`` -> ``((str,), False)``."""
  if typing.get_origin(annotation) in (typing.Union, types.UnionType):
    args = typing.get_args(annotation)
    return tuple(a for a in args if a is not type(None)), type(None) in args
  return (annotation,), False


@functools.lru_cache(maxsize=None)
def _field_kinds(cls: type) -> tuple:
  """``(name, types, optional)`` of every field of the dataclass ``cls``, in field
  order (annotations resolved once per class)."""
  hints = typing.get_type_hints(cls)
  rows = []
  for name, annotation in ((f.name, hints[f.name]) for f in dataclasses.fields(cls)):
    allowed, optional = kinds(annotation)
    missing = [t for t in allowed if t not in _IS]
    if missing:
      raise TypeError(f"{cls.__name__}.{name}: no type check for annotation {annotation!r}")
    rows.append((name, allowed, optional))
  return tuple(rows)


def check_type(name: str, value: Any, annotation: Any, *, got: bool = False) -> None:
  """Raises a ValueError unless ``value`` is of the type ``annotation``.

  Args:
    name: the field as the user spells it (``train.steps``, ``model.d_model``).
    value: its value.
    annotation: ``int``, ``float``, ``bool``, ``str``, ``tuple``, a union of them, or
      ``Optional`` of one.
    got: the wording ``NAME must be an int; got VALUE`` instead of ``NAME=VALUE must be an int``.
  """
  allowed, optional = kinds(annotation)
  missing = [t for t in allowed if t not in _IS]
  if missing:
    raise TypeError(f"{name}: no type check for annotation {annotation!r}")
  _check_kinds(name, value, allowed, optional, got)


def _check_kinds(name: str, value: Any, allowed: tuple, optional: bool, got: bool) -> None:
  if value is None and optional:
    return
  if any(_IS[t](value) for t in allowed):
    return
  article = "an" if allowed[0] is int else "a"
  what = f"{article} {' or '.join(t.__name__ for t in allowed)}{' or None' if optional else ''}"
  raise ValueError(f"{name} must be {what}; got {value!r}" if got
                   else f"{name}={value!r} must be {what}")


def check_fields(obj: Any, prefix: str, *, got: bool = False) -> None:
  """``check_type`` of every field of the dataclass instance ``obj``, named ``prefix.field``."""
  for name, allowed, optional in _field_kinds(type(obj)):
    _check_kinds(f"{prefix}.{name}", getattr(obj, name), allowed, optional, got)


def check_at_least(name: str, value: Any, minimum: Any, *, got: bool = False,
                   none_ok: bool = False) -> None:
  """Raises a ValueError unless ``value >= minimum`` (or, with ``none_ok``, ``value`` is None).

  The message is ``NAME=VALUE must be >= MINIMUM``, or with ``got`` ``NAME must be [None or]
  >= MINIMUM; got VALUE``.
  """
  if value is None and none_ok:
    return
  if value < minimum:
    bound = f"{'None or ' if none_ok else ''}>= {minimum}"
    raise ValueError(f"{name} must be {bound}; got {value!r}" if got
                     else f"{name}={value!r} must be {bound}")


def check_minimums(prefix: str, obj: Any, **minimums: Any) -> None:
  """``check_at_least(f"{prefix}.{name}", obj.name, minimum)`` for each ``name=minimum``."""
  for name, minimum in minimums.items():
    check_at_least(f"{prefix}.{name}", getattr(obj, name), minimum)


def check_choice(name: str, value: Any, allowed: Iterable[Any], *, style: str = "allowed") -> None:
  """Raises a ValueError unless ``value`` is one of ``allowed``.

  Args:
    name: the field or argument.
    value: its value.
    allowed: the allowed values.
    style: the wording: ``"allowed"`` (``NAME=VALUE is not allowed; allowed: [...]``, run
      sections), ``"supported"`` (``... is not supported; allowed: [...]``, optimizers) or
      ``"one_of"`` (``NAME=VALUE is not one of (...)``, the model config).
  """
  allowed = tuple(allowed)
  if value in allowed:
    return
  if style == "one_of":
    raise ValueError(f"{name}={value!r} is not one of {allowed}")
  if style not in CHOICE_STYLES:
    raise TypeError(f"check_choice: style={style!r}; allowed: {list(CHOICE_STYLES)}")
  raise ValueError(f"{name}={value!r} is not {style}; allowed: {list(allowed)}")


def _traced(value: Any) -> bool:
  """Whether ``value`` is a JAX tracer (never true before JAX is imported)."""
  jax = sys.modules.get("jax")
  return jax is not None and isinstance(value, jax.core.Tracer)


def _concrete_float(value: Any) -> Optional[float]:
  """``float(value)``, or None for schedules and traced values."""
  if callable(value) or _traced(value):
    return None
  try:
    return float(value)
  except (TypeError, ValueError) as err:
    raise ValueError(f"expected a number, got {value!r}") from err


def check_range(name: str, value: Any, low: Optional[float] = None, high: Optional[float] = None,
                low_open: bool = False, high_open: bool = False) -> None:
  """Raises a ValueError unless ``low <= value <= high`` (or strict, for the open ends).

  Schedules (callables) and traced values pass.
  """
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
  """Raises a ValueError unless ``value`` is an int >= ``minimum`` (traced values pass)."""
  if _traced(value):
    return
  if isinstance(value, bool) or int(value) != value or value < minimum:
    raise ValueError(f"{name}={value!r} must be an int >= {minimum}")
