"""The Python examples of the README and docs/KERNELS.md run as written."""

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _python_blocks(path):
  return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)


@pytest.mark.parametrize("doc", ["README.md", "docs/KERNELS.md"])
def test_python_examples_run(doc):
  blocks = _python_blocks(ROOT / doc)
  assert blocks, f"{doc} has no python example"
  for block in blocks:
    exec(compile(block, f"{doc}:example", "exec"), {})
