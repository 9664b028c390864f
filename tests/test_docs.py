"""The Python examples of the README and the docs run as written (from the repository root)."""

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ["README.md", "docs/KERNELS.md", "docs/MODELS.md", "docs/HOPE.md", "docs/OPTIMIZERS.md"]


def _python_blocks(path):
  return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)


@pytest.mark.parametrize("doc", DOCS)
def test_python_examples_run(doc, monkeypatch):
  blocks = _python_blocks(ROOT / doc)
  assert blocks, f"{doc} has no python example"
  monkeypatch.chdir(ROOT)
  for i, block in enumerate(blocks):
    exec(compile(block, f"{doc}:example{i}", "exec"), {})  # pylint: disable=exec-used
