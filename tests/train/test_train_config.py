"""Run configs: every shipped config loads and validates; gin builds the same config; bad values
are refused naming field, value and what is allowed; the axis rules cover every parameter."""

import glob
import os

import jax
import pytest
from flax import nnx

from nlx import configs
from nlx.nn import build_model
from nlx.train import config as run_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PY_CONFIGS = sorted(p for p in glob.glob(os.path.join(ROOT, "configs", "*.py"))
                    if not os.path.basename(p).startswith("_"))  # __init__.py: a package marker
GIN_CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "*.gin")))


@pytest.mark.parametrize("path", PY_CONFIGS, ids=os.path.basename)
def test_every_shipped_config_validates_at_every_size(path):
  for size in configs.SIZES:
    cfg = configs.load(f"{path}:{size}")
    run = configs.validate(cfg, n_devices=8)
    assert run.train.batch_size % 8 == 0 or run.mesh.resolve(8)["data"] == 1, size


@pytest.mark.parametrize("path", GIN_CONFIGS, ids=os.path.basename)
def test_gin_file_gives_the_python_config(path):
  family = os.path.basename(path)[:-len(".gin")]
  from_gin = configs.load_gin([path])
  from_py = configs.load(os.path.join(ROOT, "configs", f"{family}.py:tiny"))
  assert from_gin.to_dict() == from_py.to_dict()
  run_config.validate(from_gin, n_devices=1)


def test_gin_bindings_override_and_are_validated():
  gin = os.path.join(ROOT, "configs", "transformer.gin")
  cfg = configs.load_run(gin_files=[gin], gin_bindings=["TrainConfig.steps = 7",
                                                        "MeshConfig.fsdp = 2"])
  assert (cfg.train.steps, cfg.mesh.fsdp) == (7, 2)
  with pytest.raises(ValueError, match=r"train.steps=0 must be >= 1"):
    configs.validate(configs.load_run(gin_files=[gin], gin_bindings=["TrainConfig.steps = 0"]))


def test_command_line_overrides_reach_every_section():
  cfg = configs.load_run(os.path.join(ROOT, "configs", "transformer.py:tiny"),
                         ["train.steps=5", "mesh.fsdp=2", "data.path=x.txt",
                          "optimizer.learning_rate=1"])
  run = configs.validate(cfg)
  assert (run.train.steps, run.mesh.fsdp, run.data.path, run.optimizer.learning_rate) == (
      5, 2, "x.txt", 1.0)


def _tiny(*overrides):
  return configs.load(os.path.join(ROOT, "configs", "transformer.py:tiny"), list(overrides))


@pytest.mark.parametrize("overrides, n_devices, message", [
    (["mesh.data=2"], 8, r"mesh \{'data': 2, 'fsdp': 1, 'tensor': 1\}: product 2 != 8 devices"),
    (["mesh.data=3", "mesh.fsdp=-1"], 8, r"the fixed axes \(3 devices\) do not divide the 8"),
    (["mesh.data=-1", "mesh.fsdp=-1"], 8, r"at most one axis may be -1"),
    (["train.batch_size=12"], 8, r"train.batch_size=12 must be a multiple of mesh data x fsdp"),
    (["train.eval_every=30"], None, r"train.eval_every=30 must be a multiple of "
     r"train.log_every=20"),
    (["optimizer.name='sgd'"], None, r"optimizer.name='sgd' is not allowed; allowed: \['adamw'"),
    (["train.compute_dtype='fp8'"], None, r"train.compute_dtype='fp8' is not allowed"),
    (["model.n_heads=3"], None, r"model.n_heads=3 must divide model.d_model=64"),
    (["data.source='text'"], None, r"data.path=None: source 'text' needs a file"),
    (["data.val_fraction=1.5"], None, r"data.val_fraction=1.5 must be in \(0, 1\)"),
    (["axis_rules=(('embed', 'fsdp'),)"], None, r"axis_rules: no rule for logical axis "
     r"\['batch'"),
    (["axis_rules=(('embed', 'model'),)"], None, r"'model' is not a mesh axis"),
    (["optimizer.name='m3'", "optimizer.slow_period=1000"], None,
     r"optimizer.slow_period=1000 exceeds train.steps=600"),
])
def test_impossible_values_are_refused_by_name(overrides, n_devices, message):
  with pytest.raises(ValueError, match=message):
    configs.validate(_tiny(*overrides), n_devices=n_devices)


def test_a_cms_level_that_training_never_reads_is_refused():
  hope = lambda *o: configs.load(os.path.join(ROOT, "configs", "hope.py:tiny"), list(o))
  with pytest.raises(ValueError, match=r"model.cms_periods=\(16, 64\): the level of period 64 "
                     r"never updates where training reads it \(train.seq_len=64"):
    configs.validate(hope("train.seq_len=64"))
  configs.validate(hope("train.seq_len=65"))  # token 64 reads the level's first update
  configs.validate(hope("train.seq_len=64", "model.cms_lr=(0.001, 0.0)"))  # that level frozen
  configs.validate(hope("train.seq_len=64", "model.cms=False"))
  configs.validate(_tiny("train.seq_len=16"))  # no CMS: the periods do not matter


def test_unknown_fields_and_wrong_types_are_refused():
  with pytest.raises(ValueError, match=r"no field 'stepz'; allowed: \['batch_size'"):
    _tiny("train.stepz=1")
  with pytest.raises(ValueError, match=r"train.steps must be a int like its default 600; got "
                     r"2.5"):
    _tiny("train.steps=2.5")
  cfg = _tiny().to_dict()
  cfg["train"]["shuffle_seed"] = 3
  with pytest.raises(ValueError, match=r"unknown field\(s\) \['train.shuffle_seed'\]"):
    run_config.validate(cfg)
  cfg = _tiny().to_dict()
  cfg["train"]["plots"] = "yes"
  with pytest.raises(ValueError, match=r"train.plots='yes' must be a bool"):
    run_config.validate(cfg)
  cfg = _tiny().to_dict()
  cfg["trainer"] = {}
  with pytest.raises(ValueError, match=r"config sections: unknown \['trainer'\]"):
    run_config.validate(cfg)


def test_tokenizer_vocabulary_must_fit_the_model():
  with pytest.raises(ValueError, match=r"model.vocab_size=256 is smaller than the tokenizer's "
                     r"1024 ids"):
    configs.validate(_tiny("data.tokenizer='sentencepiece'"), tokenizer_vocab=1024)


def test_axis_rules_name_every_logical_axis_of_every_family():
  used = set()
  for path in PY_CONFIGS:
    cfg = configs.load(f"{path}:tiny")
    model = nnx.eval_shape(lambda: build_model(cfg.model, rngs=nnx.Rngs(0)))
    for v in jax.tree.leaves(nnx.state(model, nnx.Param),
                             is_leaf=lambda x: isinstance(x, nnx.Variable)):
      used.update(v.get_metadata()["out_sharding"])
  assert used <= set(run_config.LOGICAL_AXES), used - set(run_config.LOGICAL_AXES)
  assert set(dict(configs.AXIS_RULES)) == set(run_config.LOGICAL_AXES)
