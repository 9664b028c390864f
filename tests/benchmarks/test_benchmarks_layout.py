"""The layout of the checkout around the library: ``benchmarks/`` and ``examples/`` are folders of
the repository that use nlx; nlx (the installed library) imports neither, nor has their commands.

* No module of the installed packages (``nlx``, ``pallas_kernels``) imports ``benchmarks`` or
  ``examples``, and neither folder is a package of setup.cfg.
* Inside ``benchmarks/`` the imports form no cycle and no module reads another's private names.
* Every entry point runs as ``python -m ...`` from the repository root.
* The ``nlx`` command line no longer has ``bench`` or ``demo``.
"""

import ast
import configparser
import os
import subprocess
import sys

import pytest

from nlx import cli

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OUTSIDE = ("benchmarks", "examples")


def _modules(folder: str) -> dict:
  """``{dotted module name: parsed AST}`` of every .py file under ``ROOT/folder``."""
  out = {}
  for directory, _, files in os.walk(os.path.join(ROOT, folder)):
    for name in files:
      if name.endswith(".py"):
        path = os.path.join(directory, name)
        rel = os.path.relpath(path, ROOT)[:-len(".py")].split(os.sep)
        module = ".".join(rel[:-1] if rel[-1] == "__init__" else rel)
        with open(path, encoding="utf-8") as f:
          out[module] = ast.parse(f.read(), path)
  return out


def _imports(tree: ast.AST) -> set:
  """Dotted names a module imports: import statements and ``importlib.import_module("...")``."""
  names = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
      names.add(node.module)
      names.update(f"{node.module}.{alias.name}" for alias in node.names)
    elif (isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "import_module"
          and node.args and isinstance(node.args[0], ast.Constant)):
      names.add(str(node.args[0].value))
  return names


def _is_outside(name: str) -> bool:
  return name.split(".")[0] in OUTSIDE


def test_the_library_imports_no_benchmark_and_no_example():
  for package in ("nlx", "pallas_kernels"):
    modules = _modules(package)
    assert modules, package
    for module, tree in modules.items():
      bad = sorted(n for n in _imports(tree) if _is_outside(n))
      assert not bad, f"{module} imports {bad}"


def test_benchmarks_and_examples_are_not_installed():
  cfg = configparser.ConfigParser()
  cfg.read(os.path.join(ROOT, "setup.cfg"))
  listed = cfg["options"]["packages"].split()
  assert not [p for p in listed if _is_outside(p)], listed
  for folder in OUTSIDE:
    assert os.path.isfile(os.path.join(ROOT, folder, "__init__.py")), folder


def test_benchmark_imports_have_no_cycle_and_no_private_names():
  modules = _modules("benchmarks")
  assert {"benchmarks.harness", "benchmarks.ops", "benchmarks.kernels",
          "benchmarks.models"} <= set(modules)
  graph = {m: {n for n in _imports(t) if n in modules and n != m} for m, t in modules.items()}
  # Remove modules without imports inside the folder until none is left: else there is a cycle.
  left = dict(graph)
  while left:
    leaves = [m for m, deps in left.items() if not deps & set(left)]
    assert leaves, f"import cycle among {sorted(left)}"
    for m in leaves:
      del left[m]
  for name, tree in {**modules, **_modules("examples")}.items():
    imported = {alias.asname or alias.name for node in ast.walk(tree)
                if isinstance(node, ast.ImportFrom) and node.module in OUTSIDE
                for alias in node.names}
    for node in ast.walk(tree):
      if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
          and node.value.id in imported):
        assert not node.attr.startswith("_"), f"{name} reads {node.value.id}.{node.attr}"


@pytest.mark.parametrize("module", ["benchmarks.ops", "benchmarks.kernels", "benchmarks.models",
                                    "examples.demo"])
def test_entry_points_run_from_the_repository_root(module):
  proc = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True,
                        timeout=120, check=False, cwd=ROOT)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert f"usage: python -m {module}" in proc.stdout


def test_nlx_help_lists_its_commands_and_no_bench_or_demo(capsys):
  with pytest.raises(SystemExit) as e:
    cli.main(["--help"])
  assert e.value.code == 0
  text = capsys.readouterr().out
  assert "usage: nlx" in text
  for command in ("train", "eval", "generate", "convert", "export", "aot"):
    assert command in text
  assert "bench" not in text and "demo" not in text


@pytest.mark.parametrize("argv, needle", [
    (["bench", "ops"], "invalid choice: 'bench'"),
    (["demo"], "invalid choice: 'demo'"),
    (["train"], "the following arguments are required: --workdir"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
])
def test_nlx_errors_name_the_value(argv, needle, capsys):
  with pytest.raises(SystemExit) as e:
    cli.main(argv)
  assert e.value.code == 2
  assert needle in capsys.readouterr().err
