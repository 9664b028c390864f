"""Pretrained directories (nlx.pretrained): save_pretrained / from_pretrained round trips,
`nlx export` of a checkpoint, `train.init_from`, and refusals of foreign files."""

import json
import os

import jax
import numpy as np
import pytest
from flax import nnx

import nlx
from nlx import cli, configs, pretrained
from nlx.data import tokenizers
from nlx.errors import CheckpointError
from nlx.nn import build_model
from nlx.train import trained

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENS = np.arange(24, dtype=np.int32).reshape(2, 12) % 200


def tiny(family="hope"):
  cfg = configs.load(f"{family}:tiny").model
  cfg.update(d_model=32, mlp_dim=64)
  return build_model(cfg, rngs=nnx.Rngs(3))


@pytest.mark.parametrize("family", ["hope", "transformer"])
def test_save_and_from_pretrained_round_trip_bit_for_bit(family, tmp_path):
  model = tiny(family)
  model.save_pretrained(str(tmp_path / "m"), tokenizer=tokenizers.ByteTokenizer())
  assert sorted(os.listdir(tmp_path / "m")) == ["config.json", "model.safetensors"]
  again = nlx.from_pretrained(str(tmp_path / "m"))
  assert again.cfg == model.cfg
  for a, b in zip(jax.tree.leaves(nnx.state(model, nnx.Param)),
                  jax.tree.leaves(nnx.state(again, nnx.Param)), strict=True):
    np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(model(TOKENS), again(TOKENS))
  assert isinstance(pretrained.load_tokenizer(str(tmp_path / "m")), tokenizers.ByteTokenizer)


def test_foreign_directories_are_refused_by_name(tmp_path):
  model = tiny("transformer")
  path = pretrained.save_pretrained(model, str(tmp_path / "m"), dtype="bfloat16")
  bigger = build_model(model.cfg.__class__(**{**model.cfg.__dict__, "d_model": 64}),
                       rngs=nnx.Rngs(0))
  with pytest.raises(CheckpointError, match="embed.table is \\[256, 32\\], this model's is "
                     "\\[256, 64\\]"):
    pretrained.load_params(path, nnx.to_pure_dict(nnx.state(bigger, nnx.Param)))
  with pytest.raises(CheckpointError, match="is not an nlx pretrained directory"):
    pretrained.load_config(str(tmp_path))
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump({"model_type": "llama"}, f)
  with pytest.raises(CheckpointError, match="'nlx convert llama'"):
    pretrained.load_config(path)


def test_export_a_checkpoint_then_init_a_new_run_from_it(tmp_path, capsys):
  run = str(tmp_path / "run")
  flags = ["--config.train.batch_size=2", "--config.train.seq_len=16",
           "--config.train.eval_batches=1", "--config.train.plots=False", "--no_progress"]
  assert cli.main(["train", "--workdir", run, "--config=transformer:tiny",
                   "--config.train.steps=2", *flags]) == 0
  assert cli.main(["export", run, str(tmp_path / "exported")]) == 0
  assert "wrote step 2" in capsys.readouterr().out
  source = trained.load(run)
  exported = nlx.from_pretrained(str(tmp_path / "exported"))
  np.testing.assert_array_equal(source.model(TOKENS), exported(TOKENS))
  second = str(tmp_path / "second")
  assert cli.main(["train", "--workdir", second, "--config=transformer:tiny",
                   "--config.train.steps=1", "--config.train.init_from=" +
                   str(tmp_path / "exported"), "--config.optimizer.learning_rate=0.0", *flags]) == 0
  np.testing.assert_array_equal(trained.load(second).model(TOKENS), exported(TOKENS))
