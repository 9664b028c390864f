"""Tests of configs/*.py and nlx.configs: every shipped config loads and builds; paper sizes have
parameter counts within ±10% of their names; bad model configs are refused by name."""

import math
import os

import jax
import pytest
from flax import nnx

from nlx import configs
from nlx.nn import ModelConfig, build_model, registry

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAMILIES = ("transformer", "retnet", "mamba2", "deltanet", "gated_deltanet", "ttt_linear",
            "ttt_mlp", "titans_lmm", "titans_mac", "titans_mag", "titans_mal", "samba", "hope", "hope_attention")


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
