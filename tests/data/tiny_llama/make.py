"""Makes the tiny random-weights Llama-architecture models of tests/test_convert_llama.py.

Not run by the tests (they need neither torch nor transformers): run it to remake the files.

  python -m venv /tmp/hf && /tmp/hf/bin/pip install torch transformers tokenizers safetensors
  /tmp/hf/bin/python tests/data/tiny_llama/make.py

Writes, beside this file, ``untied/`` (Llama/TinyLlama style: separate lm_head, GQA with 2 KV
heads for 4 query heads, rope_theta 50,000) and ``tied/`` (SmolLM style: tied embeddings, 3 KV
heads for 6 query heads, rope_theta 10,000), each a Hugging Face model directory (config.json,
model.safetensors, tokenizer.json: a 384-piece BPE trained on the first 60,000 characters of the
embedded tinyshakespeare corpus) plus ``golden.npz``: token ids ``[2, 24]`` and the float32 logits
``[2, 24, vocab]`` of ``transformers``' LlamaForCausalLM (eager attention) on them, and the text
whose ids make the first row (to check the tokenizer).
"""

import gzip
import json
import os

import numpy as np
import tokenizers
import torch
import transformers

HERE = os.path.dirname(os.path.abspath(__file__))
CORPUS = os.path.join(HERE, "..", "..", "..", "nlx", "data", "corpus")
TEXT = "ROMEO: But soft, what light through yonder window breaks? It is the east."


def train_tokenizer(vocab_size: int = 384) -> tokenizers.Tokenizer:
  path = [f for f in os.listdir(CORPUS) if f.endswith(".txt.gz")][0]
  with gzip.open(os.path.join(CORPUS, path), "rt", encoding="utf-8") as f:
    text = f.read()[:60_000]
  tok = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token=None, byte_fallback=False))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = tokenizers.decoders.ByteLevel()
  trainer = tokenizers.trainers.BpeTrainer(
      vocab_size=vocab_size, special_tokens=["<s>", "</s>"],
      initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(text.splitlines(), trainer)
  tok.post_processor = tokenizers.processors.TemplateProcessing(
      single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
  return tok


def make(name: str, tok: tokenizers.Tokenizer, seed: int, **config) -> None:
  out = os.path.join(HERE, name)
  os.makedirs(out, exist_ok=True)
  torch.manual_seed(seed)
  cfg = transformers.LlamaConfig(
      vocab_size=tok.get_vocab_size(), bos_token_id=tok.token_to_id("<s>"),
      eos_token_id=tok.token_to_id("</s>"), max_position_embeddings=128, **config)
  model = transformers.LlamaForCausalLM(cfg).eval()
  with torch.no_grad():  # random weights of a visible size (HF initialises with std 0.02)
    for p in model.parameters():
      p.normal_(0.0, 0.2 if p.ndim == 2 else 1.0)
      if p.ndim == 1:
        p.add_(1.0).mul_(0.5)  # RMSNorm weights around 0.5 +- 0.5
  model.config._attn_implementation = "eager"  # pylint: disable=protected-access
  model.save_pretrained(out, safe_serialization=True)
  tok.save(os.path.join(out, "tokenizer.json"))
  ids = tok.encode(TEXT).ids[:24]
  rng = np.random.default_rng(seed)
  tokens = np.stack([np.asarray(ids + [0] * (24 - len(ids))),
                     rng.integers(0, cfg.vocab_size, 24)]).astype(np.int64)
  with torch.no_grad():
    logits = model(torch.from_numpy(tokens)).logits.float().numpy()
  np.savez_compressed(os.path.join(out, "golden.npz"), tokens=tokens.astype(np.int32),
                      logits=logits.astype(np.float32), text=np.asarray(TEXT),
                      text_ids=np.asarray(tok.encode(TEXT).ids, np.int32))
  print(name, json.dumps({k: getattr(cfg, k) for k in ("hidden_size", "num_hidden_layers",
                                                         "num_attention_heads",
                                                         "num_key_value_heads",
                                                         "tie_word_embeddings")}))


def main():
  tok = train_tokenizer()
  make("untied", tok, seed=0, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
       num_attention_heads=4, num_key_value_heads=2, rope_theta=50_000.0, rms_norm_eps=1e-5,
       tie_word_embeddings=False)
  make("tied", tok, seed=1, hidden_size=48, intermediate_size=128, num_hidden_layers=3,
       num_attention_heads=6, num_key_value_heads=3, rope_theta=10_000.0, rms_norm_eps=1e-6,
       tie_word_embeddings=True)


if __name__ == "__main__":
  main()
