"""Pretrained model directories: parameters and model config, without optimizer or run state.

The layout follows Hugging Face's, so the files are familiar and readable without nlx::

  DIR/config.json        {"nlx_format": 1, "model": {every ModelConfig field},
                          "tokenizer": "byte" | "sentencepiece" | "hf" | null}
  DIR/model.safetensors  every parameter, named by its path ("layers.blocks.0.mixer.q.kernel"),
                         float32 unless saved with another dtype
  DIR/tokenizer.json     with "hf": the Hugging Face tokenizer (and its tokenizer_config.json)
  DIR/spm.model          with "sentencepiece": the SentencePiece model

``save_pretrained(model, DIR)`` (also ``LM.save_pretrained``) writes one; ``from_pretrained(DIR)``
builds the ``LM`` back; ``load_params(DIR, abstract)`` fills a parameter tree of the same model
(``nlx train`` with ``train.init_from=DIR`` starts from it). ``nlx export WORKDIR OUT`` writes the
newest checkpoint of a training run in this format, ``nlx convert llama HF_DIR OUT_WORKDIR`` a
Hugging Face Llama model (``nlx.convert.llama``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from nlx.errors import CheckpointError

FORMAT = 1
CONFIG_FILE, WEIGHTS_FILE = "config.json", "model.safetensors"
TOKENIZER_FILE, TOKENIZER_CONFIG_FILE, SPM_FILE = "tokenizer.json", "tokenizer_config.json", "spm.model"


def _name(path) -> str:
  parts = [str(getattr(key, "key", getattr(key, "idx", getattr(key, "name", key))))
           for key in path]
  return ".".join(p for p in parts if p != "value")  # an nnx.State's Variable adds "value"


def flatten(params) -> dict[str, Any]:
  """``{"layers.blocks.0.mixer.q.kernel": array, ...}`` of a parameter tree (an nnx pure dict or
  ``nnx.State``)."""
  return {_name(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}


def save_pretrained(model, directory: str, *, dtype: Optional[str] = None,
                    tokenizer=None) -> str:
  """Writes ``model`` (an ``nlx.nn.LM``) to ``directory``; returns the directory.

  Args:
    model: the LM.
    directory: created if absent; its files are replaced.
    dtype: the stored dtype of floating parameters (default: as they are, float32).
    tokenizer: its tokenizer (``nlx.data.tokenizers``), whose files are copied beside the
      weights (``load_tokenizer`` reads it back); None records none.
  """
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  tensors = {}
  for name, leaf in flatten(params).items():
    array = np.asarray(jax.device_get(leaf))
    if dtype and np.issubdtype(array.dtype, np.floating):
      array = array.astype(dtype)
    tensors[name] = np.ascontiguousarray(array)
  os.makedirs(directory, exist_ok=True)
  tmp = os.path.join(directory, f".{WEIGHTS_FILE}.tmp-{os.getpid()}")
  save_file(tensors, tmp, metadata={"format": "np", "nlx_format": str(FORMAT)})
  os.replace(tmp, os.path.join(directory, WEIGHTS_FILE))
  config = {"nlx_format": FORMAT, "model": dataclasses.asdict(model.cfg),
            "tokenizer": _save_tokenizer(tokenizer, directory)}
  with open(os.path.join(directory, CONFIG_FILE), "w", encoding="utf-8") as f:
    json.dump(config, f, indent=2)
    f.write("\n")
  return directory


def _save_tokenizer(tokenizer, directory: str) -> Optional[str]:
  from nlx.data import tokenizers  # pylint: disable=g-import-not-at-top
  if tokenizer is None:
    return None
  if isinstance(tokenizer, tokenizers.ByteTokenizer):
    return "byte"
  if isinstance(tokenizer, tokenizers.SentencePieceTokenizer):
    shutil.copyfile(tokenizer.model_file, os.path.join(directory, SPM_FILE))
    return "sentencepiece"
  if isinstance(tokenizer, tokenizers.HFTokenizer):
    if os.path.abspath(tokenizer.path) != os.path.abspath(os.path.join(directory, TOKENIZER_FILE)):
      shutil.copyfile(tokenizer.path, os.path.join(directory, TOKENIZER_FILE))
      beside = os.path.join(os.path.dirname(tokenizer.path), TOKENIZER_CONFIG_FILE)
      if os.path.isfile(beside):
        shutil.copyfile(beside, os.path.join(directory, TOKENIZER_CONFIG_FILE))
    return "hf"
  raise ValueError(f"cannot save a tokenizer of type {type(tokenizer).__name__}")


def load_tokenizer(directory: str):
  """The tokenizer saved with the model in ``directory``; None if it has none."""
  from nlx.data import tokenizers  # pylint: disable=g-import-not-at-top
  with open(os.path.join(directory, CONFIG_FILE), encoding="utf-8") as f:
    kind = json.load(f).get("tokenizer")
  if kind is None:
    return None
  return tokenizers.build_tokenizer(kind, spm_model=os.path.join(directory, SPM_FILE),
                                    tokenizer_file=os.path.join(directory, TOKENIZER_FILE))


def load_config(directory: str):
  """The ``ModelConfig`` of a pretrained directory."""
  from nlx.nn import ModelConfig  # pylint: disable=g-import-not-at-top
  path = os.path.join(directory, CONFIG_FILE)
  if not os.path.isfile(path):
    raise CheckpointError(f"{directory} is not an nlx pretrained directory: no {CONFIG_FILE}")
  with open(path, encoding="utf-8") as f:
    config = json.load(f)
  if config.get("nlx_format") != FORMAT or "model" not in config:
    raise CheckpointError(f"{path} is not an nlx model config (nlx_format {FORMAT}); a Hugging "
                          "Face model directory is converted with 'nlx convert llama'")
  # JSON has no tuples: a list field (cms_periods) is a tuple of the config.
  fields = {k: tuple(v) if isinstance(v, list) else v for k, v in config["model"].items()}
  return ModelConfig.from_config(fields)


def load_params(directory: str, abstract):
  """The parameters of ``directory`` in the structure, shapes and dtypes of ``abstract``.

  Args:
    directory: a pretrained directory.
    abstract: a parameter tree (arrays or ``ShapeDtypeStruct``s, e.g. with shardings) of the
      same model.

  Raises:
    CheckpointError: a tensor missing, extra, or of another shape (named).
  """
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  path = os.path.join(directory, WEIGHTS_FILE)
  try:
    stored = load_file(path)
  except Exception as e:  # pylint: disable=broad-except
    raise CheckpointError(f"{path} cannot be read: {type(e).__name__}: {e}") from e
  names = list(flatten(abstract))
  missing, extra = sorted(set(names) - set(stored)), sorted(set(stored) - set(names))
  if missing or extra:
    raise CheckpointError(f"{path} does not fit this model: {len(missing)} tensor(s) missing "
                          f"(first: {missing[:3]}), {len(extra)} extra (first: {extra[:3]})")
  leaves, treedef = jax.tree.flatten(abstract)
  out = []
  for name, want in zip(names, leaves):
    have = stored[name]
    if tuple(have.shape) != tuple(want.shape):
      raise CheckpointError(f"{path}: {name} is {list(have.shape)}, this model's is "
                            f"{list(want.shape)}")
    sharding = getattr(want, "sharding", None)
    value = have.astype(want.dtype)
    out.append(jax.device_put(value, sharding) if sharding is not None else jnp.asarray(value))
  return jax.tree.unflatten(treedef, out)


def init_params(directory: str, model_cfg, abstract, *, seed: int = 0):
  """The starting parameters of a run of ``model_cfg`` (``train.init_from = directory``).

  The same family: the saved parameters. A Transformer++ directory for a Hope-attention model:
  level stacking (``nlx.convert.transformer_to_hope_attention``): each block's MLP becomes the
  slowest CMS level, the faster levels start adding exactly 0 (``configs/adapters``).

  Args:
    directory: a pretrained directory.
    model_cfg: the run's ``ModelConfig``.
    abstract: its parameter tree (arrays or sharded ``ShapeDtypeStruct``s).
    seed: the seed of the parameters level stacking adds.
  """
  from flax import nnx  # pylint: disable=g-import-not-at-top
  source = load_config(directory)
  if source.family == model_cfg.family:
    return load_params(directory, abstract)
  if (source.family, model_cfg.family) != ("transformer", "hope_attention"):
    raise CheckpointError(f"{directory} holds a model of family {source.family!r}; this run's "
                          f"model is {model_cfg.family!r}; allowed: the same family, or "
                          "transformer -> hope_attention (level stacking)")
  from nlx.convert import transformer_to_hope_attention  # pylint: disable=g-import-not-at-top
  stacked = transformer_to_hope_attention(from_pretrained(directory), model_cfg, seed=seed)
  values = jax.tree.leaves(nnx.state(stacked, nnx.Param))
  leaves, treedef = jax.tree.flatten(abstract)
  placed = [jax.device_put(v, getattr(a, "sharding", None)) if getattr(a, "sharding", None)
            is not None else v for v, a in zip(values, leaves, strict=True)]
  return jax.tree.unflatten(treedef, placed)


def from_pretrained(directory: str, *, seed: int = 0):
  """The ``nlx.nn.LM`` saved in ``directory`` (by ``save_pretrained`` or ``nlx export``)."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from nlx.nn import build_model  # pylint: disable=g-import-not-at-top
  cfg = load_config(directory)
  model = build_model(cfg, rngs=nnx.Rngs(seed))
  state = nnx.state(model, nnx.Param)
  pure = nnx.to_pure_dict(state)
  nnx.replace_by_pure_dict(state, load_params(directory, pure))
  nnx.update(model, state)
  return model

