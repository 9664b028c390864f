"""The Python example of docs/HOPE.md runs as written (from the repository root)."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_hope_doc_example_runs(monkeypatch):
  blocks = re.findall(r"```python\n(.*?)```", (ROOT / "docs/HOPE.md").read_text(), flags=re.S)
  assert blocks, "docs/HOPE.md has no python example"
  monkeypatch.chdir(ROOT)
  for block in blocks:
    exec(compile(block, "docs/HOPE.md:example", "exec"), {})  # pylint: disable=exec-used
