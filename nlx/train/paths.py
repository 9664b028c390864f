"""Paths of a run, resolved once where they enter nlx (the CLI and ``nlx.train.loop.train``).

A local path is made absolute against the current directory when it is given (orbax refuses
relative checkpoint paths, and a run should not change meaning if the process later changes
directory); a URL (``gs://bucket/run``, any ``scheme://``) is kept as it is.
"""

from __future__ import annotations

import os
import re

_URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")


def is_url(path: str) -> bool:
  """Whether ``path`` names a remote location (``scheme://...``) rather than a local path."""
  return bool(_URL.match(str(path)))


def resolve(path: str) -> str:
  """``path`` made absolute (``~`` expanded) if local; unchanged if a URL."""
  path = os.fspath(path)
  if is_url(path):
    return path
  return os.path.abspath(os.path.expanduser(path))
