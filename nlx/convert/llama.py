"""Hugging Face Llama-architecture models (Llama, TinyLlama, SmolLM, ...) as nlx Transformer++.

A Llama decoder is nlx's Transformer++ layer for layer: pre-norm RMSNorm, grouped-query causal
attention with RoPE in the rotate-half convention, a SwiGLU MLP, a final RMSNorm and a tied or
untied head. ``load_llama(HF_DIR)`` reads ``config.json`` and the ``*.safetensors`` weights (one
file, or shards listed by ``model.safetensors.index.json``) into an ``nlx.nn.LM``;
``convert_llama(HF_DIR, OUT_WORKDIR)`` (the command ``nlx convert llama``) writes a workdir that
``nlx eval``, ``nlx generate`` and ``nlx train`` use: ``OUT/pretrained/`` (``nlx.pretrained``
format, with the ``tokenizer.json`` of HF_DIR when it has one) and ``OUT/config.json``, a run
config whose ``train.init_from`` names it.

Weight layout: a Hugging Face ``nn.Linear`` stores ``[out, in]``; nlx's ``Dense`` stores
``[in..., out...]`` (``q``: ``[d, heads, head_dim]``, ``o``: ``[heads, head_dim, d]``), and layers are
stacked on a leading axis. Refused by name (nlx has no equivalent): ``rope_scaling`` other than
none/default, attention or MLP biases, an activation other than SiLU, ``pretraining_tp > 1``.
"""

from __future__ import annotations

import json
import os
from typing import Optional

import numpy as np

from nlx.errors import ConfigError, DataError

ARCHITECTURES = ("LlamaForCausalLM",)


def _read_json(path: str) -> dict:
  if not os.path.isfile(path):
    raise DataError(f"{path} does not exist; a Hugging Face model directory holds config.json "
                    "and *.safetensors")
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def rope_theta(hf: dict) -> float:
  """The RoPE base of a config (``rope_theta``, or transformers ≥ 5's ``rope_parameters``)."""
  params = hf.get("rope_parameters") or {}
  scaling = hf.get("rope_scaling") or {}
  for kind in (params.get("rope_type"), scaling.get("rope_type", scaling.get("type"))):
    if kind not in ("default", None):
      raise ConfigError(f"rope scaling {kind!r} of this Llama config is not supported by nlx's "
                        "RoPE; allowed: none or 'default'")
  return float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))


def model_fields(hf: dict, family: str = "transformer") -> dict:
  """The ``ModelConfig`` fields of a Llama ``config.json``.

  Raises:
    ConfigError: a feature nlx's Transformer++ does not have, naming the config field.
  """
  arch = hf.get("architectures") or ["LlamaForCausalLM"]
  if hf.get("model_type", "llama") != "llama" or arch[0] not in ARCHITECTURES:
    raise ConfigError(f"config.json is model_type={hf.get('model_type')!r}, architectures="
                      f"{arch}; allowed: model_type 'llama', {list(ARCHITECTURES)}")
  for field, allowed in (("attention_bias", False), ("mlp_bias", False), ("hidden_act", "silu"),
                         ("pretraining_tp", 1)):
    if hf.get(field, allowed) != allowed:
      raise ConfigError(f"config.json {field}={hf[field]!r} is not supported; allowed: "
                        f"{allowed!r}")
  heads = hf["num_attention_heads"]
  head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
  return dict(family=family, vocab_size=hf["vocab_size"], d_model=hf["hidden_size"],
              n_layers=hf["num_hidden_layers"], n_heads=heads,
              n_kv_heads=hf.get("num_key_value_heads") or heads, head_dim=head_dim,
              mlp_dim=hf["intermediate_size"],
              tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
              max_seq_len=hf.get("max_position_embeddings", 4096), rope_theta=rope_theta(hf),
              norm_eps=float(hf.get("rms_norm_eps", 1e-6)))


def read_tensors(hf_dir: str) -> dict[str, np.ndarray]:
  """Every tensor of the ``*.safetensors`` of ``hf_dir`` (float32), by its Hugging Face name."""
  from safetensors import safe_open  # pylint: disable=g-import-not-at-top
  index = os.path.join(hf_dir, "model.safetensors.index.json")
  if os.path.isfile(index):
    files = sorted(set(_read_json(index)["weight_map"].values()))
  else:
    files = sorted(f for f in os.listdir(hf_dir) if f.endswith(".safetensors"))
  if not files:
    raise DataError(f"{hf_dir} has no *.safetensors weights (PyTorch .bin files are not read: "
                    "save them with safe_serialization=True)")
  tensors = {}
  for name in files:
    # framework "flax" returns jax arrays, which handle bfloat16 (numpy cannot).
    with safe_open(os.path.join(hf_dir, name), framework="flax") as f:
      for key in f.keys():
        tensors[key] = np.asarray(f.get_tensor(key), np.float32)
  return tensors


def llama_params(tensors: dict[str, np.ndarray], fields: dict) -> dict:
  """The nlx parameter tree (``nnx.to_pure_dict`` layout) of Llama ``tensors``.

  Raises:
    DataError: a tensor missing or of the wrong shape, named.
  """
  d, h, hkv, dh = fields["d_model"], fields["n_heads"], fields["n_kv_heads"], fields["head_dim"]
  used = set()

  def get(name: str, shape: tuple) -> np.ndarray:
    if name not in tensors:
      raise DataError(f"the weights lack {name}")
    if tuple(tensors[name].shape) != shape:
      raise DataError(f"{name} is {list(tensors[name].shape)}; config.json implies {list(shape)}")
    used.add(name)
    return tensors[name]

  def layer(i: int) -> dict:
    p, f = f"model.layers.{i}.", fields["mlp_dim"]
    return {
        "mixer": {"q": {"kernel": get(p + "self_attn.q_proj.weight", (h * dh, d)).T.reshape(d, h, dh)},
                  "k": {"kernel": get(p + "self_attn.k_proj.weight", (hkv * dh, d)).T.reshape(d, hkv, dh)},
                  "v": {"kernel": get(p + "self_attn.v_proj.weight", (hkv * dh, d)).T.reshape(d, hkv, dh)},
                  "o": {"kernel": get(p + "self_attn.o_proj.weight", (d, h * dh)).T.reshape(h, dh, d)}},
        "mlp": {"gate": {"kernel": get(p + "mlp.gate_proj.weight", (f, d)).T},
                "up": {"kernel": get(p + "mlp.up_proj.weight", (f, d)).T},
                "down": {"kernel": get(p + "mlp.down_proj.weight", (d, f)).T}},
        "norm1": {"scale": get(p + "input_layernorm.weight", (d,))},
        "norm2": {"scale": get(p + "post_attention_layernorm.weight", (d,))}}

  layers = [layer(i) for i in range(fields["n_layers"])]
  stack = lambda *xs: np.stack(xs)
  import jax  # pylint: disable=g-import-not-at-top
  params = {"embed": {"table": get("model.embed_tokens.weight", (fields["vocab_size"], d))},
            "layers": {"blocks": {0: jax.tree.map(stack, *layers)}},
            "norm": {"scale": get("model.norm.weight", (d,))}}
  if not fields["tie_embeddings"]:
    params["head"] = {"kernel": get("lm_head.weight", (fields["vocab_size"], d)).T}
  unused = sorted(set(tensors) - used - {"lm_head.weight"})
  if unused:
    raise DataError(f"the weights hold tensors a Llama of this config does not use: {unused[:5]}")
  return params


def load_llama(hf_dir: str, **fields):
  """``(LM, tokenizer_json_or_None)``: the Hugging Face Llama model of ``hf_dir`` in nlx.

  Args:
    hf_dir: a directory with ``config.json`` and ``*.safetensors``.
    **fields: ModelConfig fields to set besides the architecture's (e.g. ``impl``).
  """
  import jax  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from nlx.nn import build_model  # pylint: disable=g-import-not-at-top
  hf_fields = model_fields(_read_json(os.path.join(hf_dir, "config.json")))
  params = llama_params(read_tensors(hf_dir), hf_fields)
  model = build_model({**_model_defaults(), **hf_fields, **fields}, rngs=nnx.Rngs(0))
  state = nnx.state(model, nnx.Param)
  nnx.replace_by_pure_dict(state, jax.tree.map(lambda x: jax.numpy.asarray(x), params))
  nnx.update(model, state)
  tokenizer = os.path.join(hf_dir, "tokenizer.json")
  return model, tokenizer if os.path.isfile(tokenizer) else None


def _model_defaults() -> dict:
  from nlx import configs  # pylint: disable=g-import-not-at-top
  return configs.model_config("transformer", "tiny").to_dict()


def convert_llama(hf_dir: str, out_workdir: str, *, dtype: Optional[str] = None) -> dict:
  """Writes the nlx workdir of the Hugging Face Llama model in ``hf_dir``; returns its summary.

  The workdir's run config is the tiny preset's training defaults with the model's fields, the
  Hugging Face tokenizer (when HF_DIR has ``tokenizer.json``) and ``train.init_from`` =
  ``OUT/pretrained``; ``nlx train --workdir OUT`` fine-tunes it (override data, steps, ... with
  ``--config.*`` flags), ``nlx generate/eval --workdir OUT`` use it as it is.
  """
  from nlx import configs, pretrained  # pylint: disable=g-import-not-at-top
  from nlx.data import tokenizers  # pylint: disable=g-import-not-at-top
  from nlx.train import loop  # pylint: disable=g-import-not-at-top
  model, tokenizer = load_llama(hf_dir)
  out_workdir = os.path.abspath(out_workdir)
  target = os.path.join(out_workdir, "pretrained")
  hf = _read_json(os.path.join(hf_dir, "config.json"))
  tok = tokenizers.HFTokenizer(tokenizer) if tokenizer else None
  pretrained.save_pretrained(model, target, dtype=dtype, tokenizer=tok)
  eos = hf.get("eos_token_id")
  eos = eos[0] if isinstance(eos, list) else eos
  config_path = os.path.join(target, pretrained.TOKENIZER_CONFIG_FILE)
  if tok is not None and eos is not None and not os.path.isfile(config_path):
    # The model's own end-of-text token (config.json), for the tokenizer's eos_id.
    with open(config_path, "w", encoding="utf-8") as f:
      json.dump({"eos_token": tok._tok.id_to_token(eos)}, f)  # pylint: disable=protected-access
  run = configs.config(configs.model_config("transformer", "tiny", **{
      k: v for k, v in model_fields(hf).items() if k != "family"}))
  run.train.init_from = target
  run.train.seq_len = min(run.train.seq_len, model.cfg.max_seq_len - 1)
  if tokenizer:
    run.data.tokenizer = "hf"
    run.data.tokenizer_file = os.path.join(target, pretrained.TOKENIZER_FILE)
  else:
    print(f"warning: {hf_dir} has no tokenizer.json; the workdir uses data.tokenizer="
          f"{run.data.tokenizer!r}, which does not match the model's vocabulary")
  os.makedirs(out_workdir, exist_ok=True)
  loop.save_config(run, out_workdir)
  import jax  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  n_params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  return {"workdir": out_workdir, "pretrained": target, "params": int(n_params),
          "tokenizer": bool(tokenizer), "family": "transformer"}
