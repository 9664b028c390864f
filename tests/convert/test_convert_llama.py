"""Hugging Face Llama import (nlx.convert.llama, `nlx convert llama`): logits equal transformers'
on tiny random-weights models (tests/fixtures/tiny_llama, made by its make.py; neither torch nor
transformers is needed here), the tokenizer.json is used, and the converted workdir serves
generate, eval and train."""

import json
import os
import shutil

import numpy as np
import pytest

from nlx import cli
from nlx.convert import llama
from nlx.data import tokenizers
from nlx.errors import ConfigError, DataError
from nlx.train import metrics as metrics_lib
from nlx.train import trained

DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fixtures",
                    "tiny_llama")


@pytest.mark.parametrize("name", ["untied", "tied"])
def test_logits_equal_transformers_to_1e_4(name):
  model, tokenizer_file = llama.load_llama(os.path.join(DATA, name))
  golden = np.load(os.path.join(DATA, name, "golden.npz"))
  logits = np.asarray(model(golden["tokens"]))
  reference = golden["logits"]
  assert np.abs(reference).max() > 1.0  # the comparison is not of near-zero numbers
  np.testing.assert_allclose(logits, reference, rtol=1e-4, atol=1e-4)
  assert model.cfg.tie_embeddings == (name == "tied")
  assert (model.cfg.n_kv_heads, model.cfg.n_heads) == ((2, 4) if name == "untied" else (3, 6))
  tok = tokenizers.HFTokenizer(tokenizer_file)
  assert tok.encode(str(golden["text"])) == list(golden["text_ids"])  # BOS first, as in HF
  assert tok.eos_id == 1 and tok.decode(tok.encode("ROMEO: soft")) == "ROMEO: soft"


def test_unsupported_configs_and_weights_are_refused_by_name(tmp_path):
  hf = json.load(open(os.path.join(DATA, "untied", "config.json")))
  with pytest.raises(ConfigError, match="attention_bias=True is not supported"):
    llama.model_fields({**hf, "attention_bias": True})
  with pytest.raises(ConfigError, match="rope scaling 'llama3'"):
    llama.model_fields({**hf, "rope_scaling": {"rope_type": "llama3", "factor": 8.0}})
  with pytest.raises(ConfigError, match="model_type='gpt2'"):
    llama.model_fields({**hf, "model_type": "gpt2"})
  assert llama.model_fields({**{k: v for k, v in hf.items() if k != "rope_parameters"},
                             "rope_theta": 500000.0})["rope_theta"] == 500000.0
  broken = tmp_path / "broken"
  shutil.copytree(os.path.join(DATA, "untied"), broken)
  with open(broken / "config.json", "w") as f:
    json.dump({**hf, "intermediate_size": 161}, f)
  with pytest.raises(DataError, match="model.layers.0.mlp.gate_proj.weight is \\[160, 64\\]; "
                     "config.json implies \\[161, 64\\]"):
    llama.load_llama(str(broken))
  os.remove(broken / "model.safetensors")
  with pytest.raises(DataError, match="has no \\*.safetensors weights"):
    llama.load_llama(str(broken))


def test_the_converted_workdir_generates_evaluates_and_fine_tunes(tmp_path, capsys):
  out = str(tmp_path / "llama")
  assert cli.main(["convert", "llama", os.path.join(DATA, "untied"), out]) == 0
  summary = json.loads(capsys.readouterr().out)
  assert summary["params"] == 135488 and summary["tokenizer"]
  golden = np.load(os.path.join(DATA, "untied", "golden.npz"))
  t = trained.load(out)
  assert t.step == 0 and isinstance(t.tokenizer, tokenizers.HFTokenizer)
  np.testing.assert_allclose(np.asarray(t.model(golden["tokens"])), golden["logits"], rtol=1e-4,
                             atol=1e-4)
  assert cli.main(["generate", "--workdir", out, "--prompt", "ROMEO:", "--max_new_tokens", "5",
                   "--temperature", "0"]) == 0
  assert capsys.readouterr().out.startswith("ROMEO:")
  text = tmp_path / "t.txt"
  text.write_text("JULIET: O Romeo, Romeo! wherefore art thou Romeo? " * 4)
  assert cli.main(["eval", "--workdir", out, "--task", "ppl", "--path", str(text)]) == 0
  assert json.loads(capsys.readouterr().out)["ppl"] > 1
  # Fine-tuning: no --config (the workdir's own), starting from the imported weights.
  assert cli.main(["train", "--workdir", out, "--config.train.steps=2",
                   "--config.train.batch_size=2", "--config.train.seq_len=32",
                   "--config.train.eval_batches=1", "--config.train.plots=False",
                   "--no_progress"]) == 0
  assert f"starting from the parameters of {out}/pretrained" in capsys.readouterr().err
  assert [r["step"] for r in metrics_lib.read_records(out)][-1] == 2
  assert trained.load(out).step == 2
