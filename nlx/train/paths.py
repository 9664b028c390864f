"""Paths of a run: one layer over local directories and Google Cloud Storage (``gs://``).

Every file of a run (the workdir, ``config.json``, ``metrics.jsonl``, TensorBoard events, plots,
the wandb run id and, through orbax, the checkpoints) is read and written through
``etils.epath``. It is the path library orbax already uses for checkpoints, so a workdir gets the
same backend, credentials and behaviour as its checkpoints: ``tf.io.gfile`` when tensorflow is
installed, else fsspec with ``gcsfs``.

Supported: local paths and ``gs://BUCKET/PATH``. A local path is made absolute when it enters nlx
(``resolve``: orbax refuses relative checkpoint paths, and a run should not change meaning if the
process changes directory). ``check`` refuses, with one line naming the flag, any other scheme
(``s3://``, ``memory://``, ...) and a ``gs://`` path whose packages are not installed: such a path
is never turned into a local folder like ``./gs:/bucket``.

Object stores have no append and no atomic rename: a file is written whole (``write_text``: one
object; locally a temporary file renamed over the target, so a reader never sees half of it).
Files that grow during a run (metrics, TensorBoard events) are written in a local staging
directory and uploaded (``upload``) by ``nlx.train.metrics``.
"""

from __future__ import annotations

import importlib.util
import os
import posixpath
import re
import shutil
import tempfile
from typing import Optional

from etils import epath

from nlx.errors import ConfigError

_URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")
SUPPORTED = "a local path or gs://BUCKET/PATH (Google Cloud Storage)"


def is_url(path: str) -> bool:
  """Whether ``path`` names a remote location (``scheme://...``) rather than a local path."""
  return bool(_URL.match(str(path)))


def scheme(path: str) -> Optional[str]:
  """The scheme of a URL (``"gs"``), None for a local path."""
  return str(path).split("://", 1)[0].lower() if is_url(path) else None


def resolve(path: str) -> str:
  """``path`` made absolute (``~`` expanded) if local; unchanged if a URL."""
  path = os.fspath(path)
  if is_url(path):
    return path
  return os.path.abspath(os.path.expanduser(path))


def _installed(module: str) -> bool:
  try:
    return importlib.util.find_spec(module) is not None
  except (ImportError, ValueError):  # a parent package missing, or a half-installed one
    return False


def _gcs_missing() -> list[str]:
  """The pip packages that ``gs://`` paths need and that are not installed."""
  missing = []
  use_tf = os.environ.get("EPATH_USE_TF", "").lower() not in ("false", "no", "f", "0")
  if not ((use_tf and _installed("tensorflow")) or _installed("gcsfs")):
    missing.append("gcsfs (or tensorflow): the workdir's files, through etils.epath")
  if not _installed("google.cloud.storage"):
    missing.append("google-cloud-storage: orbax's checkpoints")
  return missing


# scheme -> () -> the packages it needs that are missing (empty: usable).
REMOTE_BACKENDS = {"gs": _gcs_missing}


def check(path: str, flag: str, remote: bool = True) -> str:
  """``path`` resolved (``resolve``), after refusing what no installed backend handles.

  Args:
    path: a local path or a URL.
    flag: what names the path for the user (``--workdir``, ``train.init_from``).
    remote: whether a URL is allowed at all (False: a local path only).

  Raises:
    ConfigError: one line naming ``flag``, ``path`` and what is supported (or what to install).
  """
  path = os.fspath(path)
  kind = scheme(path)
  if kind is None:
    return resolve(path)
  if not remote:
    raise ConfigError(f"{flag} {path!r}: {kind}:// is not supported here; allowed: a local path")
  if kind not in REMOTE_BACKENDS:
    raise ConfigError(f"{flag} {path!r}: the scheme {kind}:// is not supported; allowed: "
                      f"{SUPPORTED}")
  missing = REMOTE_BACKENDS[kind]()
  if missing:
    raise ConfigError(f"{flag} {path!r}: {kind}:// needs packages that are not installed: "
                      f"{'; '.join(missing)} (pip install 'nlx[gcs]': gcsfs, "
                      "google-cloud-storage)")
  if not path[len(kind) + 3:].strip("/"):
    raise ConfigError(f"{flag} {path!r} names no bucket; allowed: {SUPPORTED}")
  return path


def join(base: str, *parts: str) -> str:
  """``base/part/...``: ``posixpath.join`` for a URL (its ``//`` kept), ``os.path.join`` else."""
  return posixpath.join(base, *parts) if is_url(base) else os.path.join(base, *parts)


def basename(path: str) -> str:
  """The last component of ``path`` (``run1`` of ``gs://bucket/run1/``)."""
  return posixpath.basename(str(path).rstrip("/")) if is_url(path) else os.path.basename(
      os.path.abspath(path))


def path(p: str) -> epath.Path:
  """``p`` as an ``etils.epath.Path``."""
  return epath.Path(p)


def exists(p: str) -> bool:
  return path(p).exists()


def isfile(p: str) -> bool:
  """Whether ``p`` is a file (an object, on GCS)."""
  return path(p).is_file() if is_url(p) else os.path.isfile(p)


def isdir(p: str) -> bool:
  """Whether ``p`` is a directory (on GCS: a prefix that holds objects)."""
  return path(p).is_dir() if is_url(p) else os.path.isdir(p)


def makedirs(p: str) -> None:
  """Creates the directory ``p`` and its parents (on GCS, where directories are only prefixes
  of objects, nothing needs creating)."""
  path(p).mkdir(parents=True, exist_ok=True)


def read_text(p: str) -> str:
  return path(p).read_text(encoding="utf-8")


def write_text(p: str, text: str) -> None:
  """Writes ``p`` whole: one object on GCS; locally a temporary file renamed over ``p``."""
  if is_url(p):
    target = path(p)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text, encoding="utf-8")
    return
  directory = os.path.dirname(os.path.abspath(p))
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(p)}.")
  try:
    with os.fdopen(fd, "w", encoding="utf-8") as f:
      f.write(text)
    os.replace(tmp, p)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def upload(local: str, target: str) -> None:
  """Copies the local file ``local`` to ``target`` (a URL or a local path), overwriting it."""
  target = path(target)
  target.parent.mkdir(parents=True, exist_ok=True)
  # Through the target's backend (a copy by the source's, the local one, would write a local
  # folder named gs:).
  with open(local, "rb") as src, target.open("wb") as dst:
    shutil.copyfileobj(src, dst, 1 << 20)
