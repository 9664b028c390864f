"""A stand-in for Google Cloud Storage in tests (the test machine has no network).

``install(root, monkeypatch)`` makes every ``gs://BUCKET/PATH`` that nlx reads or writes land in
``root/BUCKET/PATH``, at the level of the storage drivers, so that the code under test runs its
real ``gs://`` paths (``nlx.train.paths``, orbax's GCS commit protocol, ``commit_success.txt``
files instead of renames):

* ``etils.epath`` (nlx's files and orbax's metadata): the ``gs`` backend is a local-directory one
  (instead of ``tf.io.gfile`` or ``gcsfs``);
* TensorStore (orbax's arrays): the GCS kvstore spec becomes a ``file`` one under ``root``;
* orbax's hierarchical-namespace probe (a Cloud Storage API call) answers no;
* ``nlx.train.paths`` sees the ``gs`` backend as installed.
"""

import os

from etils.epath import backend as backend_lib
from etils.epath import gpath
from orbax.checkpoint._src.path import gcs_utils

from nlx.train import paths

PREFIX = "gs://"


class LocalGcsBackend(backend_lib.Backend):
  """An ``etils.epath`` backend storing ``gs://BUCKET/PATH`` as ``root/BUCKET/PATH``."""

  def __init__(self, root: str):
    self.root = root
    self.os = backend_lib.os_backend

  def local(self, path) -> str:
    path = os.fspath(path)
    assert path.startswith(PREFIX), path
    return os.path.join(self.root, path[len(PREFIX):])

  def url(self, local: str) -> str:
    return PREFIX + os.path.relpath(local, self.root)

  def open(self, path, mode):
    return self.os.open(self.local(path), mode)

  def exists(self, path):
    return self.os.exists(self.local(path))

  def isdir(self, path):
    return self.os.isdir(self.local(path))

  def listdir(self, path):
    return self.os.listdir(self.local(path))

  def glob(self, path):
    return [self.url(p) for p in self.os.glob(self.local(path))]

  def walk(self, top, *, top_down=True, on_error=None):
    for directory, dirs, files in self.os.walk(self.local(top), top_down=top_down,
                                               on_error=on_error):
      yield self.url(directory), dirs, files

  def makedirs(self, path, *, exist_ok=False, mode=None):
    return self.os.makedirs(self.local(path), exist_ok=exist_ok)

  def mkdir(self, path, *, exist_ok=False, mode=None):
    return self.os.mkdir(self.local(path), exist_ok=exist_ok)

  def rmtree(self, path):
    return self.os.rmtree(self.local(path))

  def remove(self, path):
    return self.os.remove(self.local(path))

  def rename(self, path, dst):
    return self.os.rename(self.local(path), self.local(dst))

  def replace(self, path, dst):
    return self.os.replace(self.local(path), self.local(dst))

  def copy(self, path, dst, overwrite):
    return self.os.copy(self.local(path), self.local(dst), overwrite)

  def stat(self, path):
    return self.os.stat(self.local(path))


def install(root, monkeypatch) -> LocalGcsBackend:
  """Routes ``gs://`` to ``root`` for the test (undone by ``monkeypatch``); returns the backend."""
  backend = LocalGcsBackend(str(root))
  monkeypatch.setitem(gpath._PREFIX_TO_BACKEND, "gs", backend)  # pylint: disable=protected-access
  monkeypatch.setattr(gpath, "_is_tf_installed", lambda: False)
  monkeypatch.setattr(gcs_utils, "get_kvstore_for_gcs",
                      lambda path: {"driver": "file", "path": backend.local(path)})
  monkeypatch.setattr(gcs_utils, "is_hierarchical_namespace_enabled", lambda path: False)
  monkeypatch.setitem(paths.REMOTE_BACKENDS, "gs", lambda: [])
  return backend
