"""Adapters on an imported model: its MLPs become CMS levels (level stacking), only those train.

The paper's §7.3 on a pretrained model: every MLP of a Llama-architecture model (imported with
``nlx convert llama``) becomes the slowest level of a Continuum Memory System, faster levels are
added (they start adding exactly 0), and only the CMS levels train; attention, embeddings and
norms stay frozen bit for bit (``train.trainable``). The argument is the imported model's
pretrained directory::

  nlx convert llama HF_DIR runs/llama
  nlx train --config configs/adapters/hope_attention.py:runs/llama/pretrained \\
      --workdir runs/llama-cms --config.train.steps=200
  nlx generate --workdir runs/llama-cms --prompt "ROMEO:"

With ``cms_lr = 0`` the converted model's logits equal the imported model's; the faster levels
learn in context at their periods (``cms_periods``: 16 / 64 / 256 for windows of 512 tokens,
halved for a model with a shorter context) once training gives them weights.
"""

import os

from nlx import pretrained
from nlx.convert.level_stacking import SHARED
from nlx.nn.cms_config import periods_within
from nlx.presets import _common as common

# The levels that learn: each block's CMS (its SwiGLU levels and their local targets).
CMS_PARAMS = (r"layers/blocks/0/mlp/.*",)


def get_config(pretrained_dir: str):
  pretrained_dir = os.path.abspath(pretrained_dir)
  source = pretrained.load_config(pretrained_dir)
  if source.family != "transformer":
    raise ValueError(f"{pretrained_dir} holds a {source.family!r} model; level stacking needs a "
                     "Transformer++ (e.g. from 'nlx convert llama')")
  shared = {name: getattr(source, name) for name in SHARED + ("max_seq_len",)}
  seq_len = min(512, source.max_seq_len)
  model = common.model_config("hope_attention", "tiny", **shared,
                              cms_periods=periods_within((16, 64, 256), seq_len), cms_lr=1e-3)
  data = {}
  if os.path.isfile(os.path.join(pretrained_dir, pretrained.TOKENIZER_FILE)):
    data = dict(tokenizer="hf",
                tokenizer_file=os.path.join(pretrained_dir, pretrained.TOKENIZER_FILE))
  return common.config(
      model, data=data,
      train=dict(init_from=pretrained_dir, trainable=CMS_PARAMS, steps=200, batch_size=8,
                 seq_len=seq_len, checkpoint_every=100, eval_every=100,
                 log_every=10),
      optimizer=dict(learning_rate=1e-3, warmup_steps=20))
