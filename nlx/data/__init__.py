"""Data: sources (embedded corpus, text, jsonl, seqio, Hugging Face ``datasets``), tokenizers (byte,
SentencePiece, a ``tokenizer.json``), the token cache (a source tokenized once into a memory-mapped
store, read lazily), the grain pipeline of LM training (pack, with segment ids per document when
asked; shuffle; per-host batches), and synthetic task generators (MQAR)."""

from nlx.data.synthetic import MQARVocab, check_mqar_args, mqar, mqar_batch, mqar_vocab

__all__ = ["MQARVocab", "check_mqar_args", "mqar", "mqar_batch", "mqar_vocab"]
