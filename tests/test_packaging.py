"""The installed package: every package of the tree is listed in setup.cfg, a wheel ships the
configs (nlx.presets) and the corpus, `--config hope:tiny` works outside a checkout, `nlx --help`
does not import JAX, and flags are spelled one way (dashes accepted)."""

import configparser
import os
import subprocess
import sys
import zipfile

import pytest

from nlx import cli, configs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_setup_cfg_lists_every_package_of_the_tree():
  cfg = configparser.ConfigParser()
  cfg.read(os.path.join(ROOT, "setup.cfg"))
  listed = set(cfg["options"]["packages"].split())
  found = set()
  for top, name in (("nlx", "nlx"), ("pallas_kernels", "pallas_kernels"),
                    ("configs", "nlx.presets")):
    for folder, _, files in os.walk(os.path.join(ROOT, top)):
      if "__init__.py" in files:
        rel = os.path.relpath(folder, os.path.join(ROOT, top))
        found.add(".".join([name] + ([] if rel == "." else rel.split(os.sep))))
  assert found == listed, (sorted(found - listed), sorted(listed - found))


def test_a_wheel_ships_the_configs_and_they_load_outside_a_checkout(tmp_path):
  subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                  "--no-build-isolation", ROOT, "-w", str(tmp_path)], check=True,
                 capture_output=True)
  (wheel,) = [p for p in os.listdir(tmp_path) if p.endswith(".whl")]
  with zipfile.ZipFile(tmp_path / wheel) as z:
    names = set(z.namelist())
    z.extractall(tmp_path / "site")
  for name in ("nlx/presets/hope.py", "nlx/presets/transformer.gin",
               "nlx/presets/adapters/hope_attention.py"):
    assert name in names
  assert any(n.startswith("nlx/data/corpus/") and n.endswith(".txt.gz") for n in names)
  code = ("import nlx.configs as c, nlx; cfg = c.load('hope:tiny'); "
          "print(cfg.model.family, nlx.__file__)")
  env = dict(os.environ, PYTHONPATH=str(tmp_path / "site"), JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, check=True,
                       capture_output=True, text=True).stdout
  assert out.startswith("hope ") and str(tmp_path / "site") in out


def test_shipped_configs_load_by_name_and_bad_names_are_refused():
  assert {"hope", "transformer", "adapters/hope_attention"} <= set(configs.shipped())
  assert configs.load("transformer:tiny").model.family == "transformer"
  assert configs.load("transformer:tiny").to_dict() == configs.load(
      os.path.join(ROOT, "configs", "transformer.py:tiny")).to_dict()
  with pytest.raises(ValueError, match="'hopee' is neither a .py file nor a shipped config; "
                     "shipped: adapters/hope_attention, deltanet"):
    configs.load("hopee:tiny")


@pytest.mark.parametrize("args", [["--help"], ["train", "--help"], ["generate", "--help"],
                                  ["eval", "--help"], ["convert", "--help"]])
def test_help_does_not_import_jax(args):
  code = ("import sys; from nlx import cli\ntry: cli.main(%r)\nexcept SystemExit: pass\n"
          "print('JAX' if 'jax' in sys.modules else 'NOJAX')" % (args,))
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=ROOT), check=True).stdout
  assert out.strip().endswith("NOJAX"), out[-500:]


def test_every_generate_flag_has_help_text():
  parser = cli.build_parser()
  sub = next(a for a in parser._actions if a.dest == "command")  # pylint: disable=protected-access
  for name in ("generate", "train", "eval", "convert", "export"):
    for action in sub.choices[name]._actions:  # pylint: disable=protected-access
      assert action.help, f"nlx {name} {action.option_strings or action.dest} has no help"


def test_flags_use_underscores_and_dashes_are_accepted():
  assert cli.normalize_flags(["--no-progress", "--max-new-tokens=5", "--config.train.seq_len=3",
                              "--prompt", "a-b", "-h"]) == [
                                  "--no_progress", "--max_new_tokens=5",
                                  "--config.train.seq_len=3", "--prompt", "a-b", "-h"]
  parser = cli.build_parser()
  for action in parser._actions:  # pylint: disable=protected-access
    for choice in getattr(action, "choices", None) or {}:
      sub = action.choices[choice]
      for option in sub._actions:  # pylint: disable=protected-access
        for flag in option.option_strings:
          assert "-" not in flag.lstrip("-"), f"nlx {choice} {flag}"
