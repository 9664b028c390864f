"""The import graph of the library against docs/ARCHITECTURE.md ("What may import what")."""

import ast
import collections
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Where each top-level folder of the library is imported from (configs/ installs as nlx.presets).
SOURCES = {"nlx": "nlx", "pallas_kernels": "pallas_kernels", "configs": "nlx.presets"}
OUTSIDE = ("experiments", "benchmarks", "examples", "tests", "configs")
MAX_LINES = 500


def library_files():
  for folder, package in SOURCES.items():
    for dirpath, _, files in os.walk(os.path.join(ROOT, folder)):
      for name in sorted(files):
        if name.endswith(".py"):
          path = os.path.join(dirpath, name)
          rel = os.path.relpath(path, os.path.join(ROOT, folder))[:-3].replace(os.sep, ".")
          module = package if rel == "__init__" else f"{package}.{rel.removesuffix('.__init__')}"
          yield path, module


def exists(module: str) -> bool:
  """Whether ``module`` names a module or package of the checkout (``nlx.presets`` = configs/)."""
  for folder, package in SOURCES.items():
    if module == package or module.startswith(package + "."):
      rel = module[len(package):].lstrip(".").replace(".", os.sep)
      path = os.path.join(ROOT, folder, rel)
      return os.path.isdir(path) or os.path.exists(path + ".py")
  return False


def package_of(module: str) -> str:
  """The unit of the architecture table: ``nlx.<first>`` or ``pallas_kernels``."""
  parts = module.split(".")
  if parts[0] == "nlx" and len(parts) > 1:
    return ".".join(parts[:2])
  return parts[0]


def imports(path: str):
  """``(imported module, inside a function)`` of every absolute import in ``path``."""
  tree = ast.parse(open(path, encoding="utf-8").read())
  in_function = set()
  for node in ast.walk(tree):
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
      in_function.update(id(n) for n in ast.walk(node) if n is not node)
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
      names = [f"{node.module}.{a.name}" if exists(f"{node.module}.{a.name}") else node.module
               for a in node.names]
    else:
      continue
    for name in names:
      yield name, id(node) in in_function


def graph():
  """``{(from package, to package): {"top", "lazy"}}`` between packages of the library, and the
  imports of the folders outside it."""
  edges, outside = collections.defaultdict(set), []
  for path, module in library_files():
    for name, lazy in imports(path):
      top = name.split(".")[0]
      if top in OUTSIDE:
        outside.append(f"{module} imports {name}")
      if top not in ("nlx", "pallas_kernels") or package_of(name) == package_of(module):
        continue
      if package_of(name) == "nlx":
        continue  # ``import nlx`` (its names load on first use) is not a package edge
      edges[(package_of(module), package_of(name))].add("lazy" if lazy else "top")
  return edges, outside


def documented():
  """``{package: (module-level set, function-level set)}`` from docs/ARCHITECTURE.md."""
  text = open(os.path.join(ROOT, "docs", "ARCHITECTURE.md"), encoding="utf-8").read()
  section = text.split("## What may import what", 1)[1].split("\n## ", 1)[0]
  table = {}
  for line in section.splitlines():
    cells = [c.strip() for c in line.strip().strip("|").split("|")]
    if len(cells) != 3 or not cells[0].startswith("`"):
      continue
    names = lambda cell: set(re.findall(r"`([\w.]+)`", cell))
    table[cells[0].strip("`")] = (names(cells[1]), names(cells[2]))
  return table


def test_the_table_names_every_package_of_the_library():
  table = documented()
  packages = {package_of(module) for _, module in library_files()} - {"nlx"}
  assert packages == set(table), (sorted(packages - set(table)), sorted(set(table) - packages))


def violations(edges, table) -> list:
  """What in ``edges`` the ``table`` does not allow, and what it lists that ``edges`` lack."""
  wrong = []
  for (a, b), kinds in sorted(edges.items()):
    top, lazy = table[a]
    if "top" in kinds and b not in top:
      wrong.append(f"{a} imports {b} at module level (allowed: {sorted(top) or 'nothing'})")
    elif "lazy" in kinds and b not in top | lazy:
      wrong.append(f"{a} imports {b} inside a function (allowed: {sorted(top | lazy)})")
  for a, (top, lazy) in sorted(table.items()):
    for b in sorted(top | lazy):
      if (a, b) not in edges:
        wrong.append(f"docs/ARCHITECTURE.md lists {a} -> {b}, which nothing imports")
      elif b in top and "top" not in edges[(a, b)]:
        wrong.append(f"docs/ARCHITECTURE.md lists {a} -> {b} at module level; it is only "
                     "imported inside functions")
  return wrong


def test_every_import_between_packages_is_documented_and_every_documented_edge_is_used():
  edges, _ = graph()
  wrong = violations(edges, documented())
  assert not wrong, "\n".join(wrong)


def test_module_level_imports_have_no_cycle():
  edges, _ = graph()
  succ = collections.defaultdict(set)
  for (a, b), kinds in edges.items():
    if "top" in kinds:
      succ[a].add(b)
  state = {}

  def visit(node, path):
    state[node] = "open"
    for nxt in succ[node]:
      assert state.get(nxt) != "open", f"import cycle: {' -> '.join(path + [nxt])}"
      if nxt not in state:
        visit(nxt, path + [nxt])
    state[node] = "done"

  for node in list(succ):
    if node not in state:
      visit(node, [node])


def test_the_library_imports_nothing_from_outside_it():
  _, outside = graph()
  assert not outside, outside


def test_no_library_file_is_long_without_a_reason():
  long = []
  for path, _ in library_files():
    text = open(path, encoding="utf-8").read()
    if text.count("\n") > MAX_LINES and "Longer than 500 lines:" not in text:
      long.append(f"{os.path.relpath(path, ROOT)}: {text.count(chr(10))} lines")
  assert not long, long


def test_the_checker_sees_a_violation():
  edges, _ = graph()
  table = documented()
  assert ("nlx.ops", "nlx.memory") in edges and ("nlx.train", "nlx.nn") in edges
  upward = dict(edges)
  upward[("nlx.ops", "nlx.train")] = {"top"}
  assert violations(upward, table) == [
      "nlx.ops imports nlx.train at module level (allowed: ['nlx.memory', 'pallas_kernels'])"]
  lazy = dict(edges)
  lazy[("nlx.memory", "nlx.ops")] = {"lazy"}
  assert len(violations(lazy, table)) == 1
  missing = dict(edges)
  del missing[("nlx.ops", "nlx.memory")]
  assert violations(missing, table) == [
      "docs/ARCHITECTURE.md lists nlx.ops -> nlx.memory, which nothing imports"]


def test_tests_mirror_the_tree():
  tests = os.path.join(ROOT, "tests")
  folders = {d for d in os.listdir(tests)
             if os.path.isdir(os.path.join(tests, d)) and d != "__pycache__"}
  packages = {m.split(".")[1] for _, m in library_files()
              if m.startswith("nlx.") and os.path.isdir(os.path.join(ROOT, *m.split(".")[:2]))}
  packages -= {"memory", "presets"}  # the memory core is tested through its ops (tests/ops)
  outside = {"experiments", "benchmarks", "examples", "fixtures", "pallas_kernels"}
  assert folders == packages | outside, (sorted(folders - packages - outside),
                                         sorted(packages | outside - folders))
  names = [f for _, _, files in os.walk(tests) for f in files if f.endswith(".py")]
  assert len(names) == len(set(names)), sorted({n for n in names if names.count(n) > 1})
  assert not [f for _, _, files in os.walk(tests) for f in files if f == "__init__.py"]
