"""Docs and docstrings cite only what the repository holds.

(a) No tracked file cites the project's private notes (``PAPER.md``, ``DESIGN.md``, ``STYLE.md``)
or anything under ``../shared/``: what a docstring refers to is in docs/ (the equations and the
reading choices in docs/EQUATIONS.md).
(b) Every ``docs/<NAME>.md`` names a file that exists; every ``docs/EQUATIONS.md §N`` a section of
that page, every ``docs/EQUATIONS.md, choice N`` (and ``choice N`` in any file that cites the page)
a ``### Choice N:`` heading, and every ``Eq. N (docs/EQUATIONS.md)`` or
``docs/EQUATIONS.md, Eq. N`` an equation of its "Equation index" table.

Plain text only (no JAX): the whole check reads the files that ``git ls-files`` lists.
"""

import pathlib
import re
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
THIS = pathlib.Path(__file__).resolve().relative_to(ROOT).as_posix()
EQUATIONS = "docs/EQUATIONS.md"

# Names of files outside the repository (the "../" is optional: "shared/data/X" is one too).
FORBIDDEN = re.compile(r"PAPER\.md|DESIGN\.md|STYLE\.md|PROVENANCE\.md|(?:\.\./)?\bshared/")

# "12", "46–49", "56–57 and 88–93", "3, 4 and 5".
_NUMBERS = r"\d+(?:\s*[–-]\s*\d+)?(?:(?:\s*,\s*|\s+and\s+|\s*,\s*and\s+)\d+(?:\s*[–-]\s*\d+)?)*"
_EQ_BEFORE = re.compile(r"\bEqs?\.\s*(" + _NUMBERS + r")\s*\(docs/EQUATIONS\.md\)")
_EQ_AFTER = re.compile(r"docs/EQUATIONS\.md(?:\s*§[\d–-]+)?\s*,\s*Eqs?\.\s*(" + _NUMBERS + ")")
_SECTIONS = re.compile(r"docs/EQUATIONS\.md\s*(§\d+(?:[–-]\d+)?(?:\s*,?\s*(?:and\s+)?§\d+"
                       r"(?:[–-]\d+)?)*)")
_CHOICES = re.compile(r"\bchoices?\s+(" + _NUMBERS + ")")
_DOC_FILES = re.compile(r"\bdocs/([A-Za-z0-9_.-]+\.md)\b")


def _tracked_texts() -> dict[str, str]:
  """``{path: text}`` of every tracked text file (binary files are left out)."""
  try:
    out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True,
                         timeout=30).stdout
  except (OSError, subprocess.SubprocessError) as err:
    pytest.skip(f"not a git checkout ({err})")
  texts = {}
  for name in out.decode().split("\0"):
    path = ROOT / name
    if not name or not path.is_file():
      continue
    data = path.read_bytes()
    if b"\0" in data:
      continue
    texts[name] = data.decode("utf-8", errors="replace")
  return texts


@pytest.fixture(scope="module")
def texts():
  return _tracked_texts()


def _flat(text: str) -> str:
  """Line breaks (and a comment's leading ``#``) as single spaces: references wrap across lines."""
  return re.sub(r"\s*\n\s*(?:#+\s*)?", " ", text)


def _expand(numbers: str) -> set[int]:
  """``"56–57 and 88–93"`` -> {56, 57, 88, ..., 93}."""
  found = set()
  for lo, hi in re.findall(r"(\d+)(?:\s*[–-]\s*(\d+))?", numbers):
    found.update(range(int(lo), int(hi or lo) + 1))
  return found


def _equations_page() -> tuple[set[int], set[int], set[int]]:
  """The sections (§N), reading choices and equation numbers that docs/EQUATIONS.md defines."""
  page = (ROOT / EQUATIONS).read_text(encoding="utf-8")
  sections = {int(n) for n in re.findall(r"^## §(\d+) ", page, flags=re.M)}
  choices = {int(n) for n in re.findall(r"^### Choice (\d+): \S", page, flags=re.M)}
  index = page.split("## Equation index", 1)[1].split("\n## ", 1)[0]
  equations = set()
  for numbers in re.findall(r"^\| Eqs?\. (" + _NUMBERS + r") \|", index, flags=re.M):
    equations |= _expand(numbers)
  return sections, choices, equations


def test_no_file_cites_the_shared_folder(texts):
  bad = []
  for name, text in texts.items():
    if name == THIS:
      continue
    for match in FORBIDDEN.finditer(text):
      line = text.count("\n", 0, match.start()) + 1
      bad.append(f"{name}:{line}: {match.group()}")
  assert not bad, ("files outside the repository are cited (point to docs/ instead, e.g. "
                   "docs/EQUATIONS.md):\n" + "\n".join(bad))


def test_docs_references_name_existing_files(texts):
  missing = sorted({f"{name}: docs/{doc}" for name, text in texts.items()
                    for doc in _DOC_FILES.findall(text) if not (ROOT / "docs" / doc).is_file()})
  assert not missing, "references to docs that do not exist:\n" + "\n".join(missing)


def test_the_equations_page_defines_sections_choices_and_equations():
  sections, choices, equations = _equations_page()
  assert sections == set(range(1, len(sections) + 1)) and len(sections) >= 7, sections
  assert choices == set(range(1, len(choices) + 1)) and len(choices) >= 14, choices
  assert {6, 49, 71, 88, 89, 92, 93, 101, 105} <= equations, equations


def test_equation_page_references_exist(texts):
  sections, choices, equations = _equations_page()
  bad = []
  for name, text in texts.items():
    if EQUATIONS not in text:
      continue
    flat = _flat(text)
    for numbers in _EQ_BEFORE.findall(flat) + _EQ_AFTER.findall(flat):
      bad += [f"{name}: Eq. {n}" for n in sorted(_expand(numbers) - equations)]
    for refs in _SECTIONS.findall(flat):
      bad += [f"{name}: §{n}" for n in sorted(_expand(refs.replace("§", "")) - sections)]
    for numbers in _CHOICES.findall(flat):
      bad += [f"{name}: choice {n}" for n in sorted(_expand(numbers) - choices)]
  assert not bad, f"references that {EQUATIONS} does not define:\n" + "\n".join(bad)
