"""experiments.mqar: the level mixture, the state count, bad flags and a smoke run."""

import json
import os

import numpy as np
import pytest
from flax import nnx

import nlx
from experiments import mqar


def test_rows_mix_levels_and_pad_to_the_longest():
  batch = mqar.mqar_rows(0, range(4), (2, 4), vocab_size=16)
  assert batch.inputs.shape == batch.targets.shape == batch.mask.shape == (4, 16)
  assert batch.mask.sum(-1).tolist() == [2, 4, 2, 4]  # P queries, level i mod 2
  row = batch.inputs[0]  # P = 2: k1 v1 k2 v2 q1 a1 q2 a2, then pad
  assert (row[8:] == 0).all()
  pairs = dict(zip(row[0:4:2].tolist(), row[1:4:2].tolist()))
  for t in (4, 6):
    assert batch.mask[0, t] == 1 and batch.targets[0, t] == pairs[int(row[t])]
    assert row[t + 1] == pairs[int(row[t])]
  assert batch.mask[0, [0, 1, 2, 3, 5, 7]].sum() == 0


def test_data_is_a_function_of_seed_and_index_and_test_is_disjoint():
  fn = mqar.train_batch_fn(3, (2, 4), 16, batch_size=4)
  np.testing.assert_array_equal(fn(5).inputs, fn(5).inputs)
  np.testing.assert_array_equal(fn(1).inputs, mqar.mqar_rows(3, range(4, 8), (2, 4), 16).inputs)
  test = mqar.test_batches(3, 1, (2, 4), 16, sequences=3, rows=2)
  assert [b.inputs.shape[0] for b in test] == [2, 1]
  assert all(b.mask.sum(-1).tolist() == [4] * len(b.mask) for b in test)  # level 1: P = 4
  train = mqar.mqar_rows(3, range(64), (2, 4), 16).inputs
  assert not any((train == row).all(-1).any() for b in test for row in b.inputs)


def test_state_floats_per_layer():
  settings = dict(mqar.PRESETS["tiny"], pairs=(4,))
  def count(family, width, t):
    model = nnx.eval_shape(lambda: nlx.build_model(mqar.config(family, width, settings),
                                                   rngs=nnx.Rngs(0)))
    return mqar.state_floats_per_layer(model, t)
  assert count("transformer", 32, 16) == 2 * 16 * 32  # K and V caches: 2 T d
  assert count("transformer", 32, 64) == 2 * 64 * 32
  gdn = count("gated_deltanet", 32, 16)
  assert gdn == 2 * 16 * 16 + 3 * 96  # heads dk dv + the conv cache of q, k, v; not T
  assert count("gated_deltanet", 32, 64) == gdn
  assert count("gated_deltanet", 64, 16) > gdn
  assert count("hope", 32, 16) > count("titans_lmm", 32, 16) > 0


def test_bad_flags_name_themselves(tmp_path):
  with pytest.raises(ValueError, match="--families.*'nope'"):
    mqar.main(["--families", "transformer,nope", "--out", str(tmp_path)])
  with pytest.raises(ValueError, match="--widths"):
    mqar.main(["--widths", "32,x", "--out", str(tmp_path)])
  with pytest.raises(ValueError, match="vocab_size"):
    mqar.main(["--pairs", "40", "--out", str(tmp_path)])  # 64 tokens hold 31 keys
  with pytest.raises(ValueError, match="--budget_minutes.*-1"):
    mqar.main(["--scale", "cpu", "--budget_minutes", "-1", "--out", str(tmp_path)])


def test_smoke_run_writes_outputs(tmp_path):
  out = mqar.main(["--families", "transformer", "--widths", "16", "--pairs", "2,4",
                   "--steps", "2", "--eval_sequences", "8", "--out", str(tmp_path)])
  for kind in ("json", "md", "png"):
    assert os.path.getsize(tmp_path / f"mqar.{kind}") > 0
  with open(tmp_path / "mqar.json", encoding="utf-8") as f:
    saved = json.load(f)
  (run,) = saved["runs"]
  assert run["family"] == "transformer" and run["d_model"] == 16 and len(run["losses"]) == 2
  for level in run["levels"].values():
    assert 0.0 <= level["accuracy"] <= 1.0
    assert level["state_floats_per_layer"] == 2 * level["seq_len"] * 16
  assert np.isfinite(run["final_loss"]) and out["runs"][0]["params"] > 0 and saved["complete"]
  assert run["skipped_steps"] == 0  # the shared step skipped no non-finite step
  assert "acc P=4 (T=16)" in (tmp_path / "mqar.md").read_text()


def test_a_diverged_run_is_named_in_the_table():
  levels = {"4": {"state_floats_per_layer": 1, "accuracy": 0.0}}
  run = dict(family="titans_lmm", d_model=8, params=1, train_seconds=1.0, final_loss=float("nan"),
             diverged_at_step=45, levels=levels)
  md = mqar.table([run, dict(run, diverged_at_step=None, final_loss=1.5)], (4,), vocab_size=16)
  assert "diverged (non-finite loss from step 45)" in md and "| 1.500 |" in md
  md = mqar.table([dict(run, skipped_steps=3)], (4,), vocab_size=16)
  assert "diverged (non-finite loss from step 45; 3 steps skipped)" in md


# --scale cpu: Zoology's layout ------------------------------------------------------------------

def test_zoology_generator_invariants():
  vocab = mqar.synthetic.mqar_vocab(64)
  for p, t in ((2, 16), (4, 64), (8, 32)):
    for index in range(20):
      ex = mqar.zoology_example(7, index, num_pairs=p, seq_len=t, vocab_size=64)
      tokens, targets, mask = ex["tokens"], ex["targets"], ex["mask"]
      keys, values = tokens[0:2 * p:2], tokens[1:2 * p:2]
      assert len(set(keys)) == p and len(set(values)) == p  # distinct keys and values
      assert ((keys >= vocab.key_lo) & (keys < vocab.key_hi)).all()
      assert ((values >= vocab.value_lo) & (values < vocab.value_hi)).all()
      pairs = dict(zip(keys.tolist(), values.tolist()))
      queries = np.flatnonzero(mask)
      assert len(queries) == p and (queries >= 2 * p).all() and ((queries - 2 * p) % 2 == 0).all()
      assert sorted(tokens[queries].tolist()) == sorted(keys.tolist())  # each key asked once
      for q in queries:  # every query's answer is the value paired with it in the context
        assert targets[q] == pairs[int(tokens[q])]
      rest = np.ones(t, bool)
      rest[:2 * p] = False
      rest[queries] = False
      assert (tokens[rest] == 0).all() and (targets[~mask] == 0).all()  # labels only at queries
      assert not np.isin(tokens[2 * p:], values).any()  # an answer is never an input
  batch = mqar.zoology_rows(7, range(5), num_pairs=4, seq_len=64, vocab_size=64, power_a=0.01)
  assert batch.inputs.shape == (5, 64) and batch.positions.shape == batch.answers.shape == (5, 4)
  ex = mqar.zoology_example(7, 3, num_pairs=4, seq_len=64, vocab_size=64)
  np.testing.assert_array_equal(batch.inputs[3], ex["tokens"])  # a function of (seed, index)
  np.testing.assert_array_equal(batch.answers[3], ex["targets"][ex["mask"]])
  test = mqar.zoology_rows(7 + mqar.TEST_SEED_OFFSET, range(64), num_pairs=4, seq_len=64,
                           vocab_size=64, power_a=0.01).inputs
  train = mqar.zoology_rows(7, range(256), num_pairs=4, seq_len=64, vocab_size=64,
                            power_a=0.01).inputs
  assert not any((train == row).all(-1).any() for row in test)
  with pytest.raises(ValueError, match="seq_len"):
    mqar.zoology_example(0, 0, num_pairs=4, seq_len=12, vocab_size=64)


def test_query_gaps_follow_the_power_law():
  p, t, n = 4, 64, 3000
  slots = (t - 2 * p) // 2
  law = mqar.gap_probabilities(slots, 0.01)
  assert np.isclose(law.sum(), 1) and (np.diff(law) < 0).all()
  assert np.isclose(law[0] / law[9], 10 ** 0.99)  # p(g) ∝ (g + 1) ** (a - 1)
  # The first key's slot is the first draw: distributed as the law itself.
  first = [mqar.zoology_example(1, i, num_pairs=p, seq_len=t, vocab_size=64)["slots"][0]
           for i in range(n)]
  seen = np.bincount(first, minlength=slots) / n
  assert 0.5 * np.abs(seen - law).sum() < 0.06  # total variation to the law
  assert 0.5 * np.abs(seen - 1 / slots).sum() > 0.3  # far from uniform gaps


def test_query_logits_are_the_models_logits_at_the_queries():
  settings = dict(mqar.PRESETS["cpu"], vocab_size=64, pairs=(2,), n_layers=1)
  model = nlx.build_model(mqar.config("transformer", 16, settings, max_seq_len=32),
                          rngs=nnx.Rngs(0))
  batch = mqar.zoology_rows(0, range(3), num_pairs=2, seq_len=32, vocab_size=64, power_a=0.01)
  full = np.asarray(model(batch.inputs))
  got = np.asarray(mqar.query_logits(model, batch.inputs, batch.positions))
  np.testing.assert_allclose(got, np.take_along_axis(full, batch.positions[..., None], 1),
                             atol=1e-5)


def test_sweep_optimizer_is_the_studies_adamw():
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from experiments import study  # pylint: disable=g-import-not-at-top
  params = {"w": jnp.ones((3, 4)), "b": jnp.ones(4)}
  grads = {"w": jnp.full((3, 4), 0.3), "b": jnp.full(4, -0.2)}
  ref, mine = study.optimizer(6, 3e-3, 1, 0.1, 1.0), mqar.sweep_optimizer(6, 0.1)  # warmup 1
  s_ref, s_mine = ref.init(params), mqar.with_lr(mine.init(params), 3e-3)
  p_ref = p_mine = params
  for _ in range(6):  # the warmup and the cosine decay
    u, s_ref = ref.update(grads, s_ref, p_ref)
    p_ref = optax.apply_updates(p_ref, u)
    u, s_mine = mine.update(grads, s_mine, p_mine)
    p_mine = optax.apply_updates(p_mine, u)
  for k in params:
    np.testing.assert_allclose(p_mine[k], p_ref[k], rtol=1e-6)


def _run(family, width, pairs, lr, acc, val, loss=1.0, steps=100, stopped=None):
  return dict(family=family, d_model=width, pairs=pairs, seq_len=16 * pairs, lr=lr, steps=steps,
              early_stopped_at=stopped, accuracy=acc, final_loss=loss, train_seconds=1.0,
              diverged_at_step=None, state_floats_per_layer=10 * width,
              curve=[{"step": 100, "loss": loss, "val_accuracy": val}])


def test_best_run_is_chosen_on_validation_and_sanity_reads_it():
  runs = [_run("transformer", 8, p, lr, acc, val) for p in (2, 4)
          for lr, acc, val in ((1e-3, 0.5, 0.6), (3e-3, 0.995, 0.995))]
  runs += [_run("retnet", 8, 2, 1e-3, 0.9, 0.9), _run("retnet", 8, 4, 1e-3, 0.4, 0.4)]
  best = mqar.best_runs(runs)
  assert best[("transformer", 8, 2)]["lr"] == 3e-3
  # the test accuracy does not choose: a run better on test but worse on validation loses
  assert mqar.best_runs([_run("x", 8, 2, 1e-3, 0.9, 0.1), _run("x", 8, 2, 3e-3, 0.2, 0.3)]
                        )[("x", 8, 2)]["lr"] == 3e-3
  # the rate the sweep continued (more steps) is the level's result, even when a short sweep
  # run ends with a higher validation accuracy; a rate that stopped early beats both
  sweep = [_run("x", 8, 2, 1e-2, 0.30, 0.30, steps=100), _run("x", 8, 2, 3e-3, 0.25, 0.20,
                                                              steps=800)]
  assert mqar.best_runs(sweep)[("x", 8, 2)]["lr"] == 3e-3
  sweep.append(_run("x", 8, 2, 3e-2, 0.99, 0.99, steps=60, stopped=60))
  assert mqar.best_runs(sweep)[("x", 8, 2)]["lr"] == 3e-2
  checks = mqar.sanity(runs, (2, 4), (8,), 0.99)
  assert checks == {"transformer_solves_every_level": True,
                    "gated_linear_falls_with_pairs": True, "gated_linear_widths": [8]}
  # the fall is read at the widths where every level ran, and says which
  wider = runs + [_run("retnet", 16, 2, 1e-3, 0.9, 0.9)]
  assert mqar.sanity(wider, (2, 4), (8, 16), 0.99)["gated_linear_widths"] == [8]
  assert "fixed width: holds (d_model 8)" in mqar.sanity_line(
      mqar.sanity(wider, (2, 4), (8, 16), 0.99), 0.99)
  # a fixed-state model whose accuracy does not fall with P (as Gated DeltaNet's did) fails it
  flat = runs[:4] + [_run("retnet", 8, p, 1e-3, 0.99, 0.99) for p in (2, 4)]
  assert mqar.sanity(flat, (2, 4), (8,), 0.99)["gated_linear_falls_with_pairs"] is False
  one_level = [r for r in runs if r["pairs"] == 2]  # a command with one level: not tested
  assert mqar.sanity(one_level, (2,), (8,), 0.99)["gated_linear_falls_with_pairs"] is None
  assert mqar.sanity(runs[:2], (2, 4), (8,), 0.99)["transformer_solves_every_level"] is None
  line = mqar.sanity_line(mqar.sanity(runs[:2], (2, 4), (8,), 0.99), 0.99)
  assert "every level: not tested (runs missing)" in line and "None" not in line
  assert "every level: holds" in mqar.sanity_line(checks, 0.99)
  settings = dict(mqar.PRESETS["cpu"], pairs=(2, 4), widths=(8,))
  md = mqar.zoology_table(runs, settings)
  assert "| Transformer++ | 8 | 80/80 | 0.995 (0.003, 100) |" in md
  assert "RetNet's accuracy falling as P grows at fixed width: holds" in mqar.sanity_line(
      checks, 0.99)
  assert mqar.sweep_order(("hope", "gated_deltanet", "transformer", "retnet"), (8, 16)) == [
      ("transformer", 8), ("retnet", 8), ("transformer", 16), ("retnet", 16),
      ("hope", 8), ("gated_deltanet", 8), ("hope", 16), ("gated_deltanet", 16)]


def test_cpu_scale_is_zoologys_figure_2():
  cpu = mqar.PRESETS["cpu"]
  assert cpu["vocab_size"] == 8192 and cpu["n_layers"] == 2 and tuple(cpu["widths"]) == (64, 128)
  assert [(16 * p, p) for p in cpu["pairs"]] == [(64, 4), (128, 8), (256, 16)]
  assert cpu["weight_decay"] == 0.1 and cpu["early_stop"] == 0.99 and len(cpu["lrs"]) >= 3


def test_cpu_embedding_init_is_per_family_and_model_flag_overrides_it():
  cpu = dict(mqar.PRESETS["cpu"], model={})
  std = lambda family, settings: mqar.config(family, 64, settings).init_std
  assert std("transformer", cpu) == 1.0  # the std that lets attention learn recall here
  assert std("gated_deltanet", cpu) == std("hope", cpu) == 0.02  # nlx's default
  forced = dict(cpu, model={"init_std": 0.5})  # --model init_std=0.5: every family
  assert std("transformer", forced) == std("gated_deltanet", forced) == 0.5


def test_cpu_titans_chunk_lets_a_key_seen_once_be_bound():
  cpu = dict(mqar.PRESETS["cpu"], model={})
  titans = mqar.config("titans_lmm", 64, cpu)
  # the inner-rate bound follows the chunk: 0.5 / 4, four times the tiny default's 0.5 / 16
  assert titans.memory_chunk_size == 4 and titans.titans_lr == pytest.approx(0.125)
  assert mqar.config("gated_deltanet", 64, cpu).memory_chunk_size == 16  # others untouched
  default = mqar.config("titans_lmm", 64, dict(cpu, model={"memory_chunk_size": 16}))
  assert default.titans_lr == pytest.approx(0.5 / 16)  # --model measures the default


# Issue 21: Transformer++ against Gated DeltaNet on the user's MQAR setting ----------------------

USERS_SETTING = ["--scale", "tiny", "--widths", "64", "--pairs", "8", "--steps", "1500",
                 "--batch_size", "64", "--vocab_size", "256", "--eval_sequences", "512",
                 "--families", "transformer", "--lr", "3e-3"]


@pytest.mark.slow
def test_transformer_learns_the_users_mqar_setting(tmp_path):
  """Transformer++ (the tiny preset, 2 layers, d_model 64) with embeddings drawn at std 1.0
  recalls >= 0.95 of MQAR at T = 32, 8 pairs, vocabulary 256 after 1500 steps of 64 sequences
  (measured 1.000; at nlx's default ``init_std`` 0.02 it recalls 0.336, an open finding of issue
  21 recorded in docs/RESULTS.md, MQAR, not a test)."""
  model = ["--model", "init_std=1.0"]
  out = mqar.main(USERS_SETTING + model + ["--out", str(tmp_path)])
  assert out["runs"][0]["levels"]["8"]["accuracy"] >= 0.95


def test_sweep_runs_rates_in_order_to_the_end_until_one_stops():
  settings = dict(mqar.PRESETS["cpu"], vocab_size=64, pairs=(2,), n_layers=1, steps=4,
                  eval_every=2, val_sequences=4, eval_sequences=4, batch_size=2,
                  lrs=(1e-2, 3e-3), sweep_steps=None)
  level = mqar.zoology_levels(settings)[0]
  never = mqar.sweep_level("transformer", 8, level, dict(settings, early_stop=2.0), seed=0)
  assert [(r["lr"], r["steps"], r["early_stopped_at"]) for r in never] == [
      (1e-2, 4, None), (3e-3, 4, None)]  # every rate to the full steps (no short sweep)
  first = mqar.sweep_level("transformer", 8, level, dict(settings, early_stop=0.0), seed=0)
  assert [(r["lr"], r["steps"], r["early_stopped_at"]) for r in first] == [(1e-2, 2, 2)]


def test_a_cut_sweep_resumes_from_its_checkpoint_to_the_same_runs(tmp_path, monkeypatch,
                                                                  capsys):
  settings = dict(mqar.PRESETS["cpu"], vocab_size=64, pairs=(2,), n_layers=1, steps=6,
                  eval_every=2, val_sequences=4, eval_sequences=4, batch_size=2,
                  lrs=(1e-2, 3e-3), sweep_steps=None, early_stop=2.0, checkpoint_minutes=0)
  level = mqar.zoology_levels(settings)[0]
  sweep = lambda **kw: mqar.sweep_level("transformer", 8, level, settings, seed=0, **kw)
  whole = sweep()
  where = str(tmp_path / "transformer_d8_P2")
  cut = sweep(deadline=0.0, checkpoint_dir=where)  # every run stops at its first evaluation
  assert all(r["cut_by_budget"] for r in cut)
  assert [r["steps"] for r in cut] == [4, 2]  # the lower-loss rate went on, to its next eval
  assert not os.path.exists(os.path.join(where, "result.json"))
  trained = []  # the training batches drawn (2 rows each; validation and test draw 4)
  rows = mqar.zoology_rows
  monkeypatch.setattr(mqar, "zoology_rows", lambda seed, indices, **kw: (
      trained.append(len(indices)) if len(indices) == 2 else None, rows(seed, indices, **kw))[1])
  resumed = sweep(checkpoint_dir=where)
  assert len(trained) == (6 - 4) + (6 - 2)  # only the steps after the save
  assert "resuming from lr=0.01 step 4, lr=0.003 step 2" in capsys.readouterr().out
  keep = lambda runs: [(r["lr"], r["steps"], r["accuracy"], r["final_loss"],
                        [(c["step"], c["loss"], c["val_accuracy"]) for c in r["curve"]])
                       for r in runs]
  assert keep(resumed) == keep(whole)  # the same steps on the same data, from the saved state
  assert not any(r["cut_by_budget"] for r in resumed)
  assert keep(sweep(checkpoint_dir=where)) == keep(whole)  # finished: read back, not retrained
  with pytest.raises(ValueError, match=r"another configuration \(lrs: saved \[0.01, 0.003\]"):
    mqar.sweep_level("transformer", 8, level, dict(settings, lrs=(3e-2,)), seed=0,
                     checkpoint_dir=where)
  with pytest.raises(ValueError, match="--checkpoint_minutes must be >= 0"):
    mqar.main(["--scale", "cpu", "--checkpoint_minutes", "-2", "--out", str(tmp_path)])


def test_combine_merges_the_runs_of_several_commands(tmp_path):
  settings = dict(mqar.PRESETS["cpu"], family_model={"transformer": {"init_std": 1.0}})
  def command(name, runs, **changes):
    os.makedirs(tmp_path / name)
    with open(tmp_path / name / "mqar.json", "w", encoding="utf-8") as f:
      json.dump({"settings": dict(settings, **changes), "runs": runs, "wall_seconds": 10.0}, f)
    return str(tmp_path / name)
  dirs = [command("t2", [_run("transformer", 8, 2, 3e-3, 0.995, 0.995, stopped=100)]),
          command("t4", [_run("transformer", 8, 4, 3e-3, 0.991, 0.992, stopped=100)]),
          command("r2", [_run("retnet", 8, 2, 1e-2, 0.9, 0.9)]),
          command("r4", [_run("retnet", 8, 4, 1e-2, 0.3, 0.3), _run("retnet", 8, 4, 3e-2, 0.2,
                                                                     0.2, steps=50)])]
  out = mqar.main(["--scale", "cpu", "--combine", ",".join(dirs), "--pairs", "2,4", "--widths",
                   "8", "--out", str(tmp_path / "all")])
  assert out["settings"]["pairs"] == [2, 4] and out["settings"]["widths"] == [8]
  # the preset's grid by default: levels and widths no command ran are not tested
  grid = mqar.main(["--scale", "cpu", "--combine", ",".join(dirs), "--out", str(tmp_path / "g")])
  assert grid["sanity"]["transformer_solves_every_level"] is None
  assert "not run" in (tmp_path / "g" / "mqar.md").read_text()
  assert out["sanity"] == {"transformer_solves_every_level": True,
                           "gated_linear_falls_with_pairs": True, "gated_linear_widths": [8]}
  assert len(out["runs"]) == 5 and out["wall_seconds"] == 40.0
  assert {r["source"] for r in out["runs"]} == set(dirs)
  md = (tmp_path / "all" / "mqar.md").read_text()
  assert "| RetNet | 8 | 80/80 | 0.900 (0.01, 100) | 0.300 (0.01, 100) |" in md
  with pytest.raises(ValueError, match=r"ran with batch_size=16, .* with 32"):
    mqar.main(["--scale", "cpu", "--combine", f"{dirs[0]},"
               + command("b", [_run("retnet", 8, 2, 1e-2, 0.9, 0.9)], batch_size=16),
               "--out", str(tmp_path / "x")])
  with pytest.raises(ValueError, match=r"RetNet ran with model fields \{'init_std': 1.0\}"):
    mqar.main(["--scale", "cpu", "--combine", f"{dirs[2]},"
               + command("m", [_run("retnet", 8, 4, 1e-2, 0.3, 0.3)], model={"init_std": 1.0}),
               "--out", str(tmp_path / "x")])
  with pytest.raises(ValueError, match="holds no mqar.json"):
    mqar.main(["--scale", "cpu", "--combine", str(tmp_path), "--out", str(tmp_path / "x")])


def test_curves_overlays_runs_that_differ_in_their_model_fields(tmp_path):
  def command(name, model, seed=0, family="hope", lr=1e-2):
    os.makedirs(tmp_path / name)
    settings = dict(mqar.PRESETS["cpu"], model=model,
                    family_model={"hope": {"memory_chunk_size": 4}})
    with open(tmp_path / name / "mqar.json", "w", encoding="utf-8") as f:
      json.dump({"settings": settings, "seed": seed, "wall_seconds": 1.0,
                 "runs": [_run(family, 64, 4, lr, 0.1, 0.11, loss=6.5)]}, f)
    return str(tmp_path / name)
  dirs = [command("a", {"cms": False, "hope_targets": "value"}),
          command("b", {"cms": False}, seed=1)]
  # beside another family, a run's label names only the fields in which its own family's runs
  # differ (not the HOPE fields a Titans run does not read)
  mixed = mqar.main(["--scale", "cpu", "--curves", ",".join(dirs + [command("t", {}, family=
                     "titans_lmm")]), "--out", str(tmp_path / "m")])
  assert [r["label"] for r in mixed["runs"]] == [
      "HOPE d=64 P=4 seed 0: hope_targets=value", "HOPE d=64 P=4 seed 1: hope_targets=self",
      "Titans (LMM) d=64 P=4 seed 0"]
  # runs of one family at two learning rates: the label names the rate
  rates = mqar.main(["--scale", "cpu", "--curves", ",".join(
      [command("t1", {}, family="titans_lmm"), command("t2", {}, family="titans_lmm", lr=3e-3)]),
      "--out", str(tmp_path / "r")])
  assert [r["label"] for r in rates["runs"]] == ["Titans (LMM) d=64 P=4 seed 0 lr 0.01",
                                                 "Titans (LMM) d=64 P=4 seed 0 lr 0.003"]
  out = mqar.main(["--scale", "cpu", "--curves", ",".join(dirs), "--out", str(tmp_path / "c")])
  # a field one command did not set has the value the study gave it; shared fields head the table
  assert [r["label"] for r in out["runs"]] == [
      "HOPE d=64 P=4 seed 0: hope_targets=value", "HOPE d=64 P=4 seed 1: hope_targets=self"]
  md = (tmp_path / "c" / "mqar_curves.md").read_text()
  assert "Fields of every run: `cms=False`, `memory_chunk_size=4`" in md
  assert f"| 0.01 | 100 | 6.500 | 0.110 | 0.100 | 1 | {dirs[1]} |" in md
  assert (tmp_path / "c" / "mqar_curves.png").exists()
  with pytest.raises(ValueError, match="holds no mqar.json"):
    mqar.main(["--scale", "cpu", "--curves", str(tmp_path), "--out", str(tmp_path / "x")])
