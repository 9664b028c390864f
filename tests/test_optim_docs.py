"""docs/OPTIMIZERS.md's Python examples run as written."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_optimizers_doc_examples_run():
  blocks = re.findall(r"```python\n(.*?)```", (ROOT / "docs" / "OPTIMIZERS.md").read_text(),
                      flags=re.S)
  assert len(blocks) >= 4
  for i, block in enumerate(blocks):
    exec(compile(block, f"OPTIMIZERS.md:example{i}", "exec"), {})
