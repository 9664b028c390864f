"""The Python example of docs/MODELS.md runs as written (from the repository root)."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_models_doc_example_runs(monkeypatch):
  blocks = re.findall(r"```python\n(.*?)```", (ROOT / "docs/MODELS.md").read_text(), flags=re.S)
  assert blocks, "docs/MODELS.md has no python example"
  monkeypatch.chdir(ROOT)
  for block in blocks:
    exec(compile(block, "docs/MODELS.md:example", "exec"), {})  # pylint: disable=exec-used
