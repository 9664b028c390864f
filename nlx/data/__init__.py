"""Data: synthetic task generators (MQAR); grain pipelines and tokenizers to follow (§9)."""

from nlx.data.synthetic import MQARVocab, check_mqar_args, mqar, mqar_batch, mqar_vocab

__all__ = ["MQARVocab", "check_mqar_args", "mqar", "mqar_batch", "mqar_vocab"]
