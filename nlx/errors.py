"""The errors nlx raises for a user's mistake or a damaged run, each naming what is wrong.

The command line prints any of them as ``nlx COMMAND: error: ...`` and exits non-zero, without a
traceback (``nlx.cli``). Config and data errors are also ``ValueError``s, so code that catches
``ValueError`` keeps working; config validation (``nlx.train.config.validate``) raises
``ValueError`` naming the field, the value and what is allowed.

* ``ConfigError``: a config field of the wrong type, out of range, inconsistent with another one
  or with the devices of the run.
* ``DataError``: a data path that does not exist, an empty file, invalid UTF-8 or JSON, text
  shorter than one training window.
* ``CheckpointError``: a checkpoint that cannot be read (truncated, corrupt) or that belongs to
  another model (a parameter's shape, dtype or the tree differs); names the step and the mismatch.
* ``NonFiniteError``: a NaN/Inf loss, gradient or parameter; names the step and the first
  non-finite tensor by its parameter path.
"""

from __future__ import annotations


class NlxError(Exception):
  """Base of the errors of this module."""


class ConfigError(NlxError, ValueError):
  """A run config field of the wrong type, out of range or inconsistent."""


class DataError(NlxError, ValueError):
  """Training or evaluation data that is missing, empty, not UTF-8, malformed or too short."""


class CheckpointError(NlxError, RuntimeError):
  """A checkpoint that is corrupt, incomplete or of another model; names its step."""


class NonFiniteError(NlxError, FloatingPointError):
  """A non-finite loss, gradient or parameter; names the step and the tensor."""


# What a user mistake may raise from the CLI, the config loader and the data pipeline.
USER_ERRORS = (NlxError, ValueError)
