"""Tests of configs/*.py and nlx.configs: every shipped config loads and builds; paper sizes have
parameter counts within ±10% of their names; bad model configs are refused by name; ModelConfig
is the family field classes, flat, in the field order of every saved config."""

import dataclasses
import glob
import json
import math
import os

import jax
import pytest
from flax import nnx

from nlx import configs, pretrained
from nlx.nn import ModelConfig, build_model, registry
from nlx.nn import config as nn_config
from nlx.nn.cms_config import CmsFields
from nlx.nn.hope_config import HopeFields
from nlx.nn.mamba2_config import Mamba2Fields
from nlx.nn.neural_memory_config import NeuralMemoryFields
from nlx.presets import _common

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAMILIES = ("transformer", "retnet", "mamba2", "deltanet", "gated_deltanet", "ttt_linear",
            "ttt_mlp", "titans_lmm", "titans_mac", "titans_mag", "titans_mal", "samba", "hope", "hope_attention")


GIN_CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "*.gin")))
# ModelConfig's field order when it declared every field itself: the order of its repr, of
# dataclasses.asdict (pretrained config.json) and of the ConfigDicts of configs/ (run config.json).
FIELD_ORDER = (
    "family", "vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "expand_v",
    "mlp_dim", "tie_embeddings", "max_seq_len", "rope_theta", "window", "conv_size", "chunk_size",
    "memory_chunk_size", "impl", "remat", "scan_layers", "state_dim", "mamba_expand",
    "mamba_head_dim",
    "memory_expand", "n_persistent", "ttt_base_lr", "titans_lr_max", "titans_rate", "norm_eps",
    "init_std", "cms",
    "cms_periods", "cms_variant", "cms_objective", "cms_lr", "cms_stop_gradient", "cms_grad_clip",
    "hope_memory",
    "hope_objective", "hope_dgd", "hope_dgd_keys", "hope_chunk_size", "hope_chunk_boundary",
    "hope_lr_max", "hope_gate_reduce", "hope_momentum", "hope_weight_decay", "hope_adaptive_k",
    "hope_adaptive_v", "hope_adaptive_q", "hope_stop_gradient", "hope_normalize_v", "hope_read",
    "hope_targets")


def _path(family):
  return os.path.join(ROOT, "configs", f"{family}.py")


def _param_count(model_cfg) -> int:
  model = nnx.eval_shape(lambda: build_model(model_cfg, rngs=nnx.Rngs(0)))
  return sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def test_every_family_has_a_config_and_every_config_a_family():
  shipped = {f[:-3] for f in os.listdir(os.path.join(ROOT, "configs"))
             if f.endswith(".py") and not f.startswith("_")}
  assert shipped == set(FAMILIES)
  assert set(registry.names()) == set(FAMILIES)


@pytest.mark.parametrize("family", FAMILIES)
def test_config_loads_at_every_size(family):
  for size in configs.SIZES:
    cfg = configs.load(f"{_path(family)}:{size}")
    assert cfg.model.family == family
    model_cfg = ModelConfig.from_config(cfg.model)
    assert model_cfg.n_layers == {"tiny": 2, "20m": 10}.get(size, 24)


@pytest.mark.parametrize("family", FAMILIES)
def test_paper_and_bench_sizes_have_their_parameter_counts(family):
  for size in configs.PAPER_SIZES + (configs.BENCH_SIZE,):
    n = _param_count(configs.load(f"{_path(family)}:{size}").model)
    nominal = configs.NOMINAL_PARAMS[size]
    assert abs(n / nominal - 1) <= 0.10, (family, size, n)


def test_tiny_models_are_tiny():
  for family in FAMILIES:
    assert _param_count(configs.load(f"{_path(family)}:tiny").model) < 300_000, family


def test_load_applies_overrides_and_refuses_unknown_fields():
  cfg = configs.load(f"{_path('deltanet')}:tiny", ["model.d_model=128", "model.impl=recurrent",
                                                   "model.window=None"])
  assert (cfg.model.d_model, cfg.model.impl, cfg.model.window) == (128, "recurrent", None)
  with pytest.raises(ValueError, match="no field 'd_modle'"):
    configs.load(f"{_path('deltanet')}:tiny", ["model.d_modle=128"])
  with pytest.raises(ValueError, match="must look like"):
    configs.load(f"{_path('deltanet')}:tiny", ["model.d_model"])


def test_load_refuses_bad_specs():
  with pytest.raises(ValueError, match="does not exist"):
    configs.load("configs/nope.py:tiny")
  with pytest.raises(ValueError, match="'huge' is not a size; allowed: tiny, 340m"):
    configs.load(f"{_path('transformer')}:huge")


def _tiny(**fields):
  family = fields.get("family", "transformer")
  cfg = configs.load(f"{_path(family if family in FAMILIES else 'transformer')}:tiny")
  cfg = cfg.model.to_dict()
  cfg.update(fields)
  return cfg


@pytest.mark.parametrize("fields, message", [
    (dict(family="lstm"), r"model.family='lstm' is not a registered family; registered: "
     r"deltanet, gated_deltanet, .*transformer"),
    (dict(n_heads=3), r"model.n_heads=3 must divide model.d_model=64"),
    (dict(n_kv_heads=3, n_heads=4), r"model.n_kv_heads=3 must divide model.n_heads=4"),
    (dict(d_modle=3), r"unknown model config field\(s\) \['d_modle'\]"),
    (dict(d_model=0), r"model.d_model must be >= 1; got 0"),
    (dict(d_model=64.0), r"model.d_model must be an int; got 64.0"),
    (dict(impl="fast"), r"model.impl='fast' is not one of"),
    (dict(window=0), r"model.window must be None or >= 1; got 0"),
    (dict(family="samba", n_layers=3), r"model.n_layers=3 must be a multiple of 2 for family "
     r"'samba'"),
    (dict(family="samba", window=None), r"model.window=None is not allowed for family 'samba'"),
    (dict(family="titans_mag", window=None), r"model.window=None is not allowed for family "
     r"'titans_mag'"),
    (dict(family="titans_mac", expand_v=2), r"model.expand_v=2 is not allowed for family "
     r"'titans_mac'"),
    (dict(family="ttt_mlp", expand_v=2), r"model.expand_v=2 is not allowed for family 'ttt_mlp'"),
    (dict(family="mamba2", mamba_head_dim=48), r"model.mamba_head_dim=48 is not allowed for "
     r"family 'mamba2': must divide mamba_expand \* d_model = 128"),
])
def test_bad_model_configs_are_refused_by_name(fields, message):
  with pytest.raises(ValueError, match=message):
    build_model(_tiny(**fields), rngs=nnx.Rngs(0))


@pytest.mark.parametrize("fields, message", [
    (dict(d_model=0, hope_chunk_size=1.0), r"model.hope_chunk_size must be an int or None; got "
     r"1.0"),  # every type first, then the values
    (dict(family="mamba2", state_dim=0), r"model.state_dim must be >= 1; got 0"),
    (dict(family="titans_mac", n_persistent=-1), r"model.n_persistent must be >= 0; got -1"),
    (dict(family="ttt_linear", ttt_base_lr="1"), r"model.ttt_base_lr must be a float; got '1'"),
    (dict(family="titans_lmm", titans_rate="proximal"),
     r"model.titans_rate='proximal' is not allowed; allowed: \['plain', 'normalized', 'gram'\]"),
    (dict(family="titans_lmm", titans_rate="gram", titans_lr_max=0.2), r"model.titans_lr_max=0.2 "
     r"is not allowed with model.memory_chunk_size=16: must be > 0 and at most 0.5/H_16 = 0.1479"),
    (dict(family="titans_lmm", titans_lr_max=1.0), r"model.titans_lr_max=1.0 is not allowed "
     r"with model.memory_chunk_size=16: must be > 0 and at most 0.5/memory_chunk_size = 0.03125"),
    (dict(family="hope", cms_periods=(3, 4)), r"model.cms_periods=\(3, 4\) must be a non-empty "
     r"tuple of ints >= 1, strictly increasing, each dividing the next"),
    (dict(family="hope", cms_variant="deep"), r"model.cms_variant='deep' is not one of "
     r"\('sequential', 'nested', 'independent'\)"),
    (dict(family="hope", hope_chunk_size=0), r"model.hope_chunk_size must be None or >= 1; got 0"),
    (dict(family="hope", hope_lr_max=0.1, hope_chunk_size=64), r"model.hope_lr_max=0.1 is not "
     r"allowed with model.hope_chunk_size=64: must be > 0 and at most 0.5/hope_chunk_size"),
    (dict(family="hope", cms=None), r"model.cms must be a bool; got None"),
])
def test_family_fields_are_refused_by_name(fields, message):
  with pytest.raises(ValueError, match=message):
    ModelConfig.from_config(_tiny(**fields))


def _pretrained_dir(tmp_path) -> str:
  """A tiny Transformer++ as ``nlx export`` writes it (the adapters config's argument)."""
  model = build_model(ModelConfig(d_model=32, n_heads=2, mlp_dim=64, max_seq_len=64),
                      rngs=nnx.Rngs(0))
  return pretrained.save_pretrained(model, str(tmp_path / "pretrained"))


@pytest.mark.parametrize("name", configs.shipped())
def test_every_shipped_config_gives_its_model_config_and_builds(name, tmp_path):
  """Every shipped config by name, at every size (adapters: on a pretrained directory)."""
  args = [_pretrained_dir(tmp_path)] if name.startswith("adapters/") else configs.SIZES
  for arg in args:
    cfg = configs.load(f"{name}:{arg}")
    model_cfg = ModelConfig.from_config(cfg.model)
    assert dataclasses.asdict(model_cfg) == cfg.model.to_dict() | {
        "cms_periods": model_cfg.cms_periods, "cms_lr": model_cfg.cms_lr}
    saved = json.loads(json.dumps(dataclasses.asdict(model_cfg)))  # as config.json holds it
    assert ModelConfig.from_config(saved) == model_cfg
    if arg == "tiny" or name.startswith("adapters/"):
      assert _param_count(model_cfg) > 0


@pytest.mark.parametrize("path", GIN_CONFIGS, ids=os.path.basename)
def test_every_gin_file_gives_its_model_config_and_builds(path):
  model_cfg = ModelConfig.from_config(configs.load_gin([path]).model)
  assert model_cfg.family == os.path.basename(path)[:-len(".gin")]
  assert _param_count(model_cfg) > 0


def test_model_config_is_the_field_classes_flat_in_the_saved_order():
  names = tuple(f.name for f in dataclasses.fields(ModelConfig))
  assert names == FIELD_ORDER
  assert names == tuple(f.name for cls, _ in nn_config.GROUPS for f in dataclasses.fields(cls))
  assert [cls for cls, _ in nn_config.GROUPS] == [
      nn_config.CoreFields, Mamba2Fields, NeuralMemoryFields, nn_config.NormInitFields,
      CmsFields, HopeFields]
  for cls, _ in nn_config.GROUPS:
    for f in dataclasses.fields(cls):
      assert ModelConfig.__dataclass_fields__[f.name].default == f.default, f.name
  # Each family's prefix is defined beside the family, none in the core.
  core = {f.name for cls in (nn_config.CoreFields, nn_config.NormInitFields)
          for f in dataclasses.fields(cls)}
  assert not [n for n in core if n.startswith(("hope_", "cms", "mamba_", "ttt_", "titans_"))]
  assert all(f.name.startswith("hope_") for f in dataclasses.fields(HopeFields))
  assert all(f.name.startswith("cms") for f in dataclasses.fields(CmsFields))
  assert {f.name for f in dataclasses.fields(Mamba2Fields)} == {
      "state_dim", "mamba_expand", "mamba_head_dim"}


def test_model_config_equality_hash_replace_and_json_round_trip():
  a = ModelConfig(family="hope", cms_periods=[4, 8], cms_lr=[1, 0])  # lists, as JSON has them
  assert (a.cms_periods, a.cms_lr, a.cms_lrs) == ((4, 8), (1.0, 0.0), (1.0, 0.0))
  b = ModelConfig.from_config(json.loads(json.dumps(dataclasses.asdict(a))))
  assert a == b and hash(a) == hash(b) and {a: "jit cache entry"}[b] == "jit cache entry"
  c = dataclasses.replace(a, hope_chunk_size=32)
  assert c != a and (c.hope_chunk, c.hope_lr, c.titans_lr) == (32, 0.5 / 32, 0.5 / 16)
  assert (a.hope_chunk, a.dk, a.dv, a.kv_heads) == (16, 32, 32, 2)
  with pytest.raises(ValueError, match=r"model.hope_lr_max=1.0 is not allowed"):
    dataclasses.replace(a, hope_lr_max=1.0)
  with pytest.raises(dataclasses.FrozenInstanceError):
    a.hope_dgd = "off"  # pylint: disable=attribute-defined-outside-init


def test_the_common_module_is_no_shipped_config_and_nlx_configs_names_it():
  assert "_common" not in configs.shipped()
  assert configs.model_config is _common.model_config and configs.config is _common.config
  assert configs.SIZES is _common.SIZES and configs.AXIS_RULES is _common.AXIS_RULES
  # A family with no settings of its own is the skeleton (gin's base, nlx.configs.preset).
  for size in configs.SIZES:
    assert configs.load(f"deltanet:{size}").to_dict() == configs.preset("deltanet", size).to_dict()
  assert configs.load("hope:tiny").train.steps == 300  # a family's own run settings
  assert configs.load("hope:340m").train.steps == int(15e9 // (128 * 4096))
