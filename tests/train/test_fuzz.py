"""Fuzzing the two doors a user's input comes through (docs/RELIABILITY.md): run configs and data
files. Whatever the input, the only exceptions are the documented ones: ``ValueError`` (config
validation; ``nlx.errors.ConfigError`` is one) and ``nlx.errors.DataError`` (data)."""

import copy
import json
import os
import tempfile

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nlx import configs
from nlx.data import pipeline
from nlx.errors import DataError
from nlx.train import config as run_config

EXAMPLES = int(os.environ.get("NLX_FUZZ_EXAMPLES", "150"))  # docs/RELIABILITY.md runs 3000
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BASE = configs.load(os.path.join(ROOT, "configs", "transformer.py") + ":tiny").to_dict()
FIELDS = [(section, name) for section, values in BASE.items() if isinstance(values, dict)
          for name in values]
VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 5000), st.floats(allow_nan=True),
    st.text(max_size=12), st.sampled_from(["float32", "bfloat16", "cosine", "text", "jsonl",
                                           "sentencepiece", "muon", "transformer", "hope"]),
    st.lists(st.integers(-2, 64), max_size=4), st.dictionaries(st.text(max_size=4),
                                                               st.integers(), max_size=2))
MUTATION = st.one_of(
    st.tuples(st.sampled_from(FIELDS), VALUES),  # a field gets any value
    st.tuples(st.sampled_from(list(BASE)), st.just("<delete>")),  # a section goes missing
    st.tuples(st.tuples(st.sampled_from(list(BASE)), st.text(min_size=1, max_size=6)), VALUES))


def _mutate(config: dict, mutation) -> None:
  where, value = mutation
  if value == "<delete>":
    config.pop(where, None)
  elif isinstance(config.get(where[0]), dict):
    config[where[0]][where[1]] = value
  else:
    config[where[0]] = value


@settings(max_examples=EXAMPLES, deadline=None)
@given(st.lists(MUTATION, min_size=1, max_size=3), st.integers(1, 8), st.integers(1, 4))
def test_any_config_is_valid_or_a_value_error(mutations, n_devices, n_processes):
  config = copy.deepcopy(BASE)
  for mutation in mutations:
    _mutate(config, mutation)
  try:
    run_config.validate(config, n_devices=n_devices, n_processes=n_processes)
  except ValueError as e:
    assert str(e), "an error must say what is wrong"


def _load(content: bytes, source: str, seq_len: int):
  with tempfile.TemporaryDirectory() as directory:
    path = os.path.join(directory, f"data.{'txt' if source == 'text' else 'jsonl'}")
    with open(path, "wb") as f:
      f.write(content)
    data = run_config.DataConfig(source=source, path=path)
    return pipeline.load_splits(data, seq_len)


JSONL = st.lists(st.one_of(
    st.dictionaries(st.sampled_from(["text", "id", "body"]),
                    st.one_of(st.text(max_size=40), st.integers(), st.none()), max_size=2)
    .map(json.dumps), st.text(max_size=20)), max_size=8).map("\n".join)


@settings(max_examples=EXAMPLES, deadline=None)
@given(st.one_of(st.binary(max_size=600), st.text(max_size=600).map(str.encode),
                 JSONL.map(str.encode)),
       st.sampled_from(["text", "jsonl"]), st.integers(2, 64))
def test_any_bytes_are_data_or_a_data_error(content, source, seq_len):
  try:
    _, train, val = _load(content, source, seq_len)
  except DataError as e:
    assert str(e)
    return
  assert train.shape[1] == val.shape[1] == seq_len + 1 and len(train) and len(val)


@pytest.mark.parametrize("content,source,message", [
    (b"", "text", "is empty"), (b"  \n ", "text", "is empty"),
    (b"caf\xe9 au lait" * 20, "text", "not UTF-8: byte 3"),
    (b"short", "text", "fewer than one window"),
    (b'{"text": "a"}\n{oops', "jsonl", "line 2 .* is not JSON"),
    (b"[1, 2]", "jsonl", "not in record 1")])
def test_data_errors_name_the_problem(content, source, message):
  with pytest.raises(DataError, match=message):
    _load(content, source, 32)
