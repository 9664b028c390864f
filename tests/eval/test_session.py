"""Sessions (nlx.eval.session, `nlx generate/eval --state`): a memory state kept in a file makes two
invocations equal one invocation on the concatenated tokens; attention sessions stop at
max_seq_len with a clear error; foreign or damaged files are refused by name."""

import os

import jax
import numpy as np
import pytest
from flax import nnx

from nlx import cli, configs
from nlx.data import tokenizers
from nlx.errors import CheckpointError
from nlx.eval import sampling, session
from nlx.nn import build_model

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOKENIZER = tokenizers.ByteTokenizer()
GREEDY = dict(temperature=0.0)


def tiny_model(family, **fields):
  cfg = configs.load(os.path.join(ROOT, "configs", f"{family}.py:tiny")).model
  cfg.update(dict(d_model=32, mlp_dim=64, max_seq_len=64, memory_chunk_size=4, impl="recurrent"),
             **fields)
  return build_model(cfg, rngs=nnx.Rngs(0))


def leaves(state):
  return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(state))]


# HOPE's row is slow (about 50 s on two busy cores): its state also crosses processes by default in
# tests/experiments/test_experiment_remember.py, and a HOPE session file in the test below.
@pytest.mark.parametrize("family", [pytest.param("hope", marks=pytest.mark.slow),
                                    pytest.param("titans_lmm", marks=pytest.mark.slow),
                                    "gated_deltanet"])
def test_two_sessions_equal_one_call_on_the_concatenated_tokens(family, tmp_path):
  model, path = tiny_model(family), str(tmp_path / "memory.npz")
  first, first_ids = session.continue_text(model, TOKENIZER, "Friday: the key is 7.", 5, path,
                                           step=3, **GREEDY)
  assert os.path.isfile(path) and session.info(path)["tokens"] == 21 + 5
  second, second_ids = session.continue_text(model, TOKENIZER, " Monday: key?", 6, path, step=3,
                                             **GREEDY)
  assert session.info(path)["tokens"] == 21 + 5 + 13 + 6
  # One invocation on the concatenated tokens: prompt 1, what session 1 generated, prompt 2.
  ids = TOKENIZER.encode("Friday: the key is 7.") + first_ids + TOKENIZER.encode(" Monday: key?")
  state = session.fresh(model)
  one_ids, one_state = sampling.continue_state(model, np.asarray([ids], np.int32), 6, state,
                                               **GREEDY)
  assert list(one_ids[0]) == second_ids
  for a, b in zip(leaves(one_state), leaves(session.load(path, model=model)), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  assert first == TOKENIZER.decode(first_ids) and second == TOKENIZER.decode(second_ids)
  assert not [f for f in os.listdir(tmp_path) if f != "memory.npz"]  # no temporary file left


def test_an_attention_session_keeps_its_cache_and_stops_at_max_seq_len(tmp_path):
  model, path = tiny_model("transformer", max_seq_len=40), str(tmp_path / "kv.npz")
  assert session.context_limit(model) == 40 and session.context_limit(tiny_model("hope")) is None
  _, first_ids = session.continue_text(model, TOKENIZER, "abcdefghij", 10, path, **GREEDY)
  _, second_ids = session.continue_text(model, TOKENIZER, "klmno", 5, path, **GREEDY)
  ids = TOKENIZER.encode("abcdefghij") + first_ids + TOKENIZER.encode("klmno")
  one_ids, _ = sampling.continue_state(model, np.asarray([ids], np.int32), 5,
                                       session.fresh(model), **GREEDY)
  assert list(one_ids[0]) == second_ids
  before = open(path, "rb").read()
  with pytest.raises(ValueError, match="the session holds 30 tokens; 15 more would exceed "
                     "model.max_seq_len=40"):
    session.continue_text(model, TOKENIZER, "pqrst", 10, path, **GREEDY)
  assert open(path, "rb").read() == before  # a refused turn leaves the session as it was


def test_a_session_of_another_model_or_a_damaged_file_is_refused(tmp_path):
  path = str(tmp_path / "s.npz")
  session.continue_text(tiny_model("hope"), TOKENIZER, "hello", 2, path, **GREEDY)
  with pytest.raises(CheckpointError, match="is a session of another model \\(family 'hope'"):
    session.load(path, model=tiny_model("gated_deltanet"))
  with pytest.raises(CheckpointError, match="is a session of another model"):
    session.load(path, model=tiny_model("hope", d_model=64))
  with open(path, "r+b") as f:
    f.truncate(100)
  with pytest.raises(CheckpointError, match="is not a readable nlx session file"):
    session.load(path, model=tiny_model("hope"))


def test_a_bfloat16_state_round_trips(tmp_path, monkeypatch):
  """numpy has no bfloat16: such leaves are stored as bits and restored with their dtype."""
  model = tiny_model("gated_deltanet")
  fresh = session.fresh
  as_bf16 = lambda state: jax.tree.map(
      lambda x: x.astype(jax.numpy.bfloat16) if x.dtype == np.float32 else x, state)
  monkeypatch.setattr(session, "fresh", lambda m: as_bf16(fresh(m)))
  state = as_bf16(sampling.continue_state(model, np.asarray([[5, 6, 7]], np.int32), 2,
                                          fresh(model), **GREEDY)[1])
  path = str(tmp_path / "bf16.npz")
  session.save(path, state, model=model)
  restored = session.load(path, model=model)
  bf16 = [a for a in jax.tree.leaves(state) if a.dtype == jax.numpy.bfloat16]
  assert bf16 and any(np.asarray(a, np.float32).any() for a in bf16)
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored), strict=True):
    assert a.dtype == b.dtype
    np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


def test_scoring_in_a_session_equals_scoring_the_concatenation(tmp_path):
  model, path = tiny_model("gated_deltanet"), str(tmp_path / "s.npz")
  first = session.score_text(model, TOKENIZER, "To be, or not to be", path, piece=8)
  second = session.score_text(model, TOKENIZER, ": that is the question", path, piece=8)
  whole = session.score_text(model, TOKENIZER, "To be, or not to be: that is the question", None,
                             piece=8)
  # The concatenation also scores the first token of the second text (given the first text).
  assert second["session_tokens"] == 19 and first["tokens"] + second["tokens"] + 1 == whole["tokens"]
  assert whole["nll"] > first["nll"] + second["nll"]


def test_generate_and_eval_with_state_on_the_command_line(tmp_path, capsys):
  workdir = str(tmp_path / "run")
  assert cli.main(["train", "--workdir", workdir, f"--config={ROOT}/configs/gated_deltanet.py:tiny",
                   "--config.train.steps=1", "--config.train.batch_size=2",
                   "--config.train.seq_len=16", "--config.train.eval_batches=1",
                   "--config.train.plots=False", "--no_progress"]) == 0
  capsys.readouterr()
  state = tmp_path / "monday.npz"
  for prompt in ("ROMEO: I met her on Friday.", "JULIET: When?"):
    assert cli.main(["generate", "--workdir", workdir, "--state", str(state), "--prompt", prompt,
                     "--max_new_tokens", "8", "--temperature", "0"]) == 0
    assert capsys.readouterr().out.startswith(prompt)
  assert session.info(str(state))["tokens"] == 27 + 8 + 13 + 8
  text = tmp_path / "more.txt"
  text.write_text("ROMEO: On Friday.")
  assert cli.main(["eval", "--workdir", workdir, "--task", "ppl", "--path", str(text),
                   "--state", str(state)]) == 0
  assert '"session_tokens": 56' in capsys.readouterr().out
  assert cli.main(["eval", "--workdir", workdir, "--task", "piqa", "--state", str(state)]) == 2
  assert "--state is a flag of --task ppl" in capsys.readouterr().err
