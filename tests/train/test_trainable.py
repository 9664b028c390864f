"""`train.trainable` (only the named parameters train and have optimizer state; the rest stay bit
for bit), and the adapters config: an imported Llama's MLPs become CMS levels, only they train."""

import os

import jax
import numpy as np
import pytest
from flax import nnx

from nlx import cli, configs
from nlx.train import config as run_config
from nlx.train import optimizer as optimizer_lib
from nlx.train import sharding, step, trained

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DATA = os.path.join(ROOT, "tests", "fixtures", "tiny_llama")
FLAGS = ["--config.train.batch_size=2", "--config.train.seq_len=16",
         "--config.train.eval_batches=1", "--config.train.plots=False", "--no_progress"]


def leaves_by_path(workdir):
  params = trained.load(workdir).model
  state = nnx.state(params, nnx.Param)
  return dict(zip(step.param_paths(state), [np.asarray(x) for x in jax.tree.leaves(state)]))


def test_only_the_named_parameters_train_and_get_optimizer_state(tmp_path):
  cfg = configs.load("transformer:tiny", ["train.trainable=('layers/blocks/0/mlp/.*', 'norm/.*')"])
  run = run_config.validate(cfg, n_devices=1)
  trainer = step.build(run, sharding.make_mesh(run.mesh, jax.devices()[:1]))
  paths = step.param_paths(trainer.abstract_state["params"])
  mask = optimizer_lib.trainable_mask(trainer.abstract_state["params"], run.train.trainable)
  assert [p for p, m in zip(paths, mask) if m] == [
      "layers/blocks/0/mlp/down/kernel", "layers/blocks/0/mlp/gate/kernel",
      "layers/blocks/0/mlp/up/kernel", "norm/scale"]
  full = step.build(run_config.validate(configs.load("transformer:tiny"), n_devices=1),
                    sharding.make_mesh(run.mesh, jax.devices()[:1]))
  size = lambda tree: sum(x.size for x in jax.tree.leaves(tree))
  trainable_size = sum(x.size for x, m in zip(jax.tree.leaves(trainer.abstract_state["params"]),
                                              mask) if m)
  # Adam's mu and nu of the trainable parameters only, and step counters.
  assert 2 * trainable_size <= size(trainer.abstract_state["opt_state"]) <= 2 * trainable_size + 4
  assert size(full.abstract_state["opt_state"]) > 2 * size(full.abstract_state["params"])

  base, tuned = str(tmp_path / "base"), str(tmp_path / "tuned")
  assert cli.main(["train", "--workdir", base, "--config=transformer:tiny",
                   "--config.train.steps=1", "--config.optimizer.learning_rate=0.0", *FLAGS]) == 0
  assert cli.main(["train", "--workdir", tuned, "--config=transformer:tiny",
                   "--config.train.steps=3", f"--config.train.init_from={tmp_path}/exported",
                   "--config.train.trainable=('layers/blocks/0/mlp/.*',)",
                   "--config.optimizer.learning_rate=1e-2", *FLAGS]) == 2  # no such directory yet
  assert cli.main(["export", base, str(tmp_path / "exported")]) == 0
  assert cli.main(["train", "--workdir", tuned, "--config=transformer:tiny",
                   "--config.train.steps=3", f"--config.train.init_from={tmp_path}/exported",
                   "--config.train.trainable=('layers/blocks/0/mlp/.*',)",
                   "--config.optimizer.learning_rate=1e-2", *FLAGS]) == 0
  before, after = leaves_by_path(base), leaves_by_path(tuned)
  changed = sorted(p for p in before if not np.array_equal(before[p], after[p]))
  assert changed == ["layers/blocks/0/mlp/down/kernel", "layers/blocks/0/mlp/gate/kernel",
                     "layers/blocks/0/mlp/up/kernel"]


def test_a_trainable_regex_that_matches_nothing_is_refused(tmp_path, capsys):
  assert cli.main(["train", "--workdir", str(tmp_path / "r"), "--config=transformer:tiny",
                   "--config.train.steps=1", "--config.train.trainable=('layers/mlp/.*',)",
                   *FLAGS]) == 2
  assert "'layers/mlp/.*' matches no parameter path" in capsys.readouterr().err
  with pytest.raises(ValueError, match="is not a regex"):
    run_config.validate(configs.load("transformer:tiny", ["train.trainable=('(',)"]))


def test_adapters_on_an_imported_llama_train_only_the_cms_levels(tmp_path, capsys):
  out = str(tmp_path / "llama")
  assert cli.main(["convert", "llama", os.path.join(DATA, "untied"), out]) == 0
  workdir = str(tmp_path / "cms")
  spec = f"--config={ROOT}/configs/adapters/hope_attention.py:{out}/pretrained"
  # With cms_lr = 0 the stacked model is the imported one.
  assert cli.main(["train", "--workdir", str(tmp_path / "same"), spec, "--config.train.steps=1",
                   "--config.optimizer.learning_rate=0.0", "--config.model.cms_lr=0.0",
                   *FLAGS]) == 0
  golden = np.load(os.path.join(DATA, "untied", "golden.npz"))
  np.testing.assert_allclose(np.asarray(trained.load(str(tmp_path / "same")).model(
      golden["tokens"])), golden["logits"], rtol=1e-4, atol=1e-4)
  assert cli.main(["train", "--workdir", workdir, spec, "--config.train.steps=3",
                   "--config.model.cms_periods=(2, 4, 8)", *FLAGS]) == 0  # every level < 16
  capsys.readouterr()
  imported = leaves_by_path(str(tmp_path / "same"))
  tuned = leaves_by_path(workdir)
  changed = {p for p in tuned if not np.array_equal(tuned[p], imported[p])}
  assert changed and all(p.startswith("layers/blocks/0/mlp/") for p in changed), changed
  assert not [p for p in tuned if "mixer" in p and p in changed]
