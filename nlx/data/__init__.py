"""Data: sources (embedded corpus, text, jsonl, seqio), tokenizers (byte, SentencePiece), the grain
pipeline of LM training (pack, with segment ids per document when asked; shuffle; per-host
batches), and synthetic task generators (MQAR)."""

from nlx.data.synthetic import MQARVocab, check_mqar_args, mqar, mqar_batch, mqar_vocab

__all__ = ["MQARVocab", "check_mqar_args", "mqar", "mqar_batch", "mqar_vocab"]
