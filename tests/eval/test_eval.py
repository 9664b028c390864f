"""nlx.eval: log-likelihood scoring, multiple choice (acc, acc_norm), perplexity and S-NIAH against
hand computations on a bigram stub model whose log-probabilities are known."""

import math

import jax
import numpy as np
import pytest
from flax import nnx

from nlx.data import tokenizers
from nlx.eval import loglik, multiple_choice, niah
from nlx.eval import run as eval_run


class Bigram(nnx.Module):
  """``logits[b, t] = table[tokens[b, t]]``: log p(next | previous) is ``log_softmax(table)``."""

  def __init__(self, seed: int = 0):
    self.table = nnx.Param(jax.random.normal(jax.random.PRNGKey(seed), (256, 256)) * 2.0)

  def __call__(self, tokens):
    return self.table[...][tokens]


@pytest.fixture(scope="module")
def bigram():
  model = Bigram()
  return model, np.asarray(jax.nn.log_softmax(model.table[...], -1))


def _hand_logp(logp: np.ndarray, context: str, continuation: str) -> float:
  """sum over the continuation's bytes of log p(byte | previous byte)."""
  ids = list((context + continuation).encode())
  start = len(context.encode())
  return float(sum(logp[ids[i - 1], ids[i]] for i in range(start, len(ids))))


def test_scorer_sums_the_continuations_log_probabilities(bigram):
  model, logp = bigram
  scorer = loglik.Scorer(model, max_len=64, batch_size=3)
  pairs = [("The cat", " sat"), ("A", " much longer continuation than the others"), ("xy", "z"),
           ("Question: why?\nAnswer:", " because")]
  tok = tokenizers.ByteTokenizer()
  scores = scorer.score([(tok.encode(c), tok.encode(x)) for c, x in pairs])
  for (context, continuation), (score, _) in zip(pairs, scores):
    assert score == pytest.approx(_hand_logp(logp, context, continuation), rel=1e-5)


def test_one_shape_scores_equal_the_power_of_two_padding(bigram):
  model, _ = bigram
  pairs = [([1, 2, 3], [4, 5]), ([7] * 40, [8, 9, 10]), ([5], [6])]
  a = loglik.Scorer(model, max_len=32, batch_size=2).score(pairs)
  b = loglik.Scorer(model, max_len=32, batch_size=2, one_shape=True).score(pairs)
  assert [x[1] for x in a] == [x[1] for x in b]
  np.testing.assert_allclose([x[0] for x in a], [x[0] for x in b], rtol=1e-5)


def test_lambada_continuation_follows_the_context_after_one_space():
  assert multiple_choice._spaced("I don't care about", "signs") == " signs"
  assert multiple_choice._spaced("ends in a newline\n", "word") == "word"
  assert multiple_choice._spaced("context", " spaced") == " spaced"


def test_scorer_marks_greedy_continuations(bigram):
  model, logp = bigram
  greedy = [int(np.argmax(logp[ord("a")]))]
  greedy.append(int(np.argmax(logp[greedy[0]])))
  other = [(greedy[0] + 1) % 256 or 1]
  scores = loglik.Scorer(model, max_len=16).score([([ord("a")], greedy), ([ord("a")], other)])
  assert [s[1] for s in scores] == [True, False]


class StubScorer:
  """Scores from a table ``{(context, continuation): log-likelihood}`` (byte-tokenized keys)."""

  def __init__(self, table: dict):
    self.table = {(bytes(c), bytes(x)): v for (c, x), v in
                  ((tuple(s.encode() for s in k), v) for k, v in table.items())}

  def score(self, pairs):
    return [(self.table[(bytes(c), bytes(x))], False) for c, x in pairs]


def test_acc_and_acc_norm_as_lm_eval_harness_computes_them():
  # acc: argmax of the summed log-likelihood; acc_norm: argmax of it over the continuation's
  # length in characters (lm-eval-harness: len(choice); ASCII here, so also its byte length).
  q = multiple_choice.Example(("Q:",), (" a", " bbbb", " cc"), gold=1)
  lls = {("Q:", " a"): -3.0, ("Q:", " bbbb"): -5.0, ("Q:", " cc"): -4.0}
  # acc picks " a" (-3); acc_norm: -3/2 = -1.5, -5/5 = -1.0, -4/3 = -1.33 -> " bbbb".
  r = multiple_choice.evaluate(StubScorer(lls), tokenizers.ByteTokenizer(), [q])
  assert (r["acc"], r["acc_norm"], r["n"]) == (0.0, 1.0, 1)
  q2 = multiple_choice.Example(("Q:",), (" a", " bbbb", " cc"), gold=0)
  r = multiple_choice.evaluate(StubScorer(lls), tokenizers.ByteTokenizer(), [q, q2])
  assert (r["acc"], r["acc_norm"], r["n"]) == (0.5, 0.5, 2)


def test_partial_scoring_compares_contexts_with_a_shared_continuation():
  # WinoGrande: each option is a context; the continuation after it is scored.
  e = multiple_choice.Example(("Sarah ... so Sarah", "Sarah ... so Maria"), (" got it.",), gold=1)
  lls = {("Sarah ... so Sarah", " got it."): -9.0, ("Sarah ... so Maria", " got it."): -7.0}
  r = multiple_choice.evaluate(StubScorer(lls), tokenizers.ByteTokenizer(), [e])
  assert (r["acc"], r["acc_norm"]) == (1.0, 1.0)


def test_single_continuations_report_greedy_accuracy_and_perplexity(bigram):
  model, logp = bigram
  scorer = loglik.Scorer(model, max_len=64)
  examples = [multiple_choice.Example((c,), (x,), 0) for c, x in
              [("the end of the", " story"), ("once upon a", " time")]]
  r = multiple_choice.evaluate(scorer, tokenizers.ByteTokenizer(), examples)
  nll = -sum(_hand_logp(logp, e.contexts[0], e.continuations[0]) for e in examples)
  n_tokens = len(" story") + len(" time")
  assert r["ppl"] == pytest.approx(math.exp(nll / n_tokens), rel=1e-5)
  assert r["ppl_continuation"] == pytest.approx(math.exp(nll / 2), rel=1e-5)  # lm-eval's
  assert r["acc"] == 0.0 and r["n"] == 2  # a random bigram table does not write " story"


def test_perplexity_of_a_text_file_equals_the_direct_computation(bigram, tmp_path):
  model, logp = bigram
  path = tmp_path / "text.txt"
  path.write_text("It was the best of times, it was the worst of times. " * 12)
  text = path.read_text()
  seq_len = 32
  r = eval_run.perplexity(model, tokenizers.ByteTokenizer(), text, seq_len, batch_size=4)
  stream = list(text.encode()) + [0]  # the packed stream: the text, then the end-of-document id
  n_windows = (len(stream) - 1) // seq_len
  targets = range(1, n_windows * seq_len + 1)
  nll = -sum(logp[stream[i - 1], stream[i]] for i in targets)
  assert r["tokens"] == n_windows * seq_len
  assert r["ppl"] == pytest.approx(math.exp(nll / len(targets)), rel=1e-5)
  assert r["bits_per_byte"] == pytest.approx(nll / len(targets) / math.log(2), rel=1e-5)


HAYSTACK = " ".join(f"Sentence number {i} of the essay says something else." for i in range(400))


@pytest.mark.parametrize("task", niah.TASKS)
@pytest.mark.parametrize("depth", [0.0, 0.25, 0.5, 0.9])
def test_needle_sits_at_the_requested_depth_and_its_answer_is_recoverable(task, depth):
  e = niah.make_example(task, HAYSTACK, 4000, seed=3, index=7, depth=depth)
  kind = "uuid" if task == "s_niah_3" else "number"
  needle = f"One of the special magic {kind}s for "
  assert e.prompt.count(needle) == 1 and e.prompt.count(e.answer) == 1
  context = e.prompt[:e.prompt.index("\nWhat is the special magic")]
  at = context.index(needle) / len(context)
  assert depth - 0.03 <= at <= depth + 1e-9, at  # the sentence boundary at or before the depth
  key = context[context.index(needle) + len(needle):].split(" is: ")[0]
  sentence = f"{needle}{key} is: {e.answer}. "
  assert sentence in context
  assert e.prompt.endswith(f"The special magic {kind} for {key} mentioned in the provided text is")
  haystack = context.replace(sentence, "")
  assert len(haystack) == 4000
  assert haystack == (niah.NOISE * 50)[:4000] if task == "s_niah_1" else haystack in HAYSTACK * 2
  if task == "s_niah_3":
    assert len(e.answer) == 36 and e.answer.count("-") == 4
  else:
    assert len(e.answer) == 7 and e.answer.isdigit()


def test_needle_examples_are_a_pure_function_of_seed_and_index():
  a = niah.make_example("s_niah_2", HAYSTACK, 2000, seed=0, index=1)
  assert a == niah.make_example("s_niah_2", HAYSTACK, 2000, seed=0, index=1)
  assert a.answer != niah.make_example("s_niah_2", HAYSTACK, 2000, seed=0, index=2).answer
  with pytest.raises(ValueError, match="s_niah_4.*allowed"):
    niah.make_example("s_niah_4", HAYSTACK, 2000, seed=0, index=1)


def test_needle_scoring_is_rulers_string_match():
  examples = [niah.make_example("s_niah_1", "", 1000, seed=0, index=i) for i in range(4)]
  predictions = [f" {examples[0].answer}.", "no idea", examples[2].answer[:-1],
                 f"it is {examples[3].answer}"]
  assert niah.score(predictions, examples) == 0.5
  with pytest.raises(ValueError, match="3 predictions for 4 examples"):
    niah.score(predictions[:3], examples)
