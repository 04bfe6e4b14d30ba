"""Smoke tests of the benchmarks: tiny sizes, output schema only (no timing assertions)."""

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")

from absl.testing import absltest
import jax
import jax.numpy as jnp
import numpy as np

from ppow_jax import drafters, gamma, timing
from ppow_jax.bench import compare, decode, decode_table, pairs, peers
from ppow_jax.errors import UserError
from ppow_jax.data import tokenizer as tokenizer_lib
from ppow_jax.models import decode_weights, eagle3, hf, llama
import tool_errors  # tests/tool_errors.py

TINY = pairs.SyntheticSpec(num_layers=2, hidden_size=32, intermediate_size=64, vocab_size=128,
                           residual_scale=0.01)
RESULT_KEYS = {"batch", "ar_tokens_per_s", "spec_tokens_per_s", "tau", "tau_analytic", "alpha",
               "gamma", "gamma_detail", "ideal_speedup", "measured_speedup",
               "measured_over_ideal", "verify_cost_curve", "greedy_identical", "breakdown",
               "ideal_cost_curve_speedup", "measured_over_ideal_cost_curve", "prompt_pass_s",
               "ar_decode_tokens_per_s", "spec_decode_tokens_per_s", "measured_decode_speedup",
               "measured_decode_over_ideal_cost_curve", "batch_utilization",
               "measured_over_ideal_cost_curve_per_round"}


class DecodeBenchTest(absltest.TestCase):

  def test_main_writes_the_documented_json(self):
    tmp = tempfile.mkdtemp()
    self.addCleanup(shutil.rmtree, tmp)
    out = os.path.join(tmp, "decode.json")
    opts = decode.BenchOptions(batch_sizes=(2,), window=2, max_new_tokens=6, prompt_len=4,
                               repeats=1, gamma_calls=2, tree="4,2,2", whole_batch=True)
    decode.benchmark("synthetic", opts, spec=TINY, save_pair=os.path.join(tmp, "pair"),
                     output_json=out)
    with open(out) as f:
      result = json.load(f)
    self.assertEqual(result["pair"], "synthetic")
    self.assertEqual([r["batch"] for r in result["results"]], [2])
    for r in result["results"]:
      self.assertContainsSubset(RESULT_KEYS, set(r))
      self.assertLen(r["alpha"], 2)
      self.assertEqual([c["tokens"] for c in r["verify_cost_curve"]], [1, 2, 3])
      self.assertTrue(r["greedy_identical"])  # T=0: speculative output equals AR
      self.assertGreaterEqual(r["tau"], 1.0)
      self.assertGreater(r["gamma"], 0.0)
      self.assertTrue(r["tree"]["greedy_identical"])  # tree drafting: also equal to AR
      self.assertLen(r["tree"]["alpha_by_depth"], 2)
      self.assertEqual(set(r["prompt_pass_s"]), {"ar", "spec", "tree"})
      self.assertTrue(r["whole_batch"]["greedy_identical"])
      self.assertGreater(r["breakdown"]["spec_round_isolated_one_loop_s"], 0.0)
      self.assertGreater(r["ar_step_bandwidth"]["isolated_gbs"], 0.0)
      self.assertEqual(set(r["gamma_detail"]["loop_start_s"]),
                       {"draft_window", "draft_one", "verify", "target_one", "round"})
      # every timed run, round by round: the engines, their prompt passes, the isolated loops
      self.assertContainsSubset({"ar", "spec", "tree", "spec/whole", "spec/prompt",
                                 "isolated/target_one/x1", "isolated/target_one/x3"},
                                set(r["timings_s"]))
      self.assertEqual({len(v) for v in r["timings_s"].values()}, {opts.repeats})
      self.assertEqual(r["timings_s"]["ar"], r["ar_seconds"])
    self.assertIn("load_average", result["machine"])
    self.assertEqual(result["machine"]["xla_flags"], os.environ.get("XLA_FLAGS", ""))
    self.assertIn("prompt pass ar ", decode_table.format_table(result))
    self.assertIn("without compaction AR ", decode_table.format_table(result))
    self.assertIn("measured ÷ ideal_cc round by round", decode_table.format_table(result))
    # the saved pair loads back, with a tokenizer of exactly vocab_size ids
    target, _ = hf.load(os.path.join(tmp, "pair", "target"))
    tok = hf.load_tokenizer(os.path.join(tmp, "pair", "drafter"))
    self.assertEqual(tok.get_vocab_size(), target.cfg.vocab_size)

  def test_prompt_sets_are_decoded_in_full_batches(self):
    p = pairs.synthetic_pair(TINY)
    opts = decode.BenchOptions(batch_sizes=(2,), window=2, max_new_tokens=5, repeats=1,
                               gamma_calls=2, tree="4,2,2")
    sets = {"a": [[5, 6, 7], [8, 9, 10, 11, 12], [13, 14]]}
    result = decode.run_benchmark(p.target_cfg, p.target_params, p.drafter, p.draft_params, opts,
                                  "synthetic", p.description, sets)
    r, = result["results"]
    self.assertEqual((r["prompts"], r["num_prompts"]), ("a", 2))  # the third fills no batch
    self.assertEqual(r["prompt_len"], 16)  # the longest prompt, padded as evaluate pads
    self.assertEqual(r["new_tokens"], 2 * 5)
    self.assertTrue(r["greedy_identical"])
    self.assertTrue(r["tree"]["greedy_identical"])


  def test_a_bad_batch_size_list_exits_with_one_line_naming_it(self):
    tool_errors.assert_exits_naming(self, "ppow_jax.bench.decode", ["--batch_sizes=1,x"],
                                    "--batch_sizes: want comma-separated integers, got 1,x")


class CostCurveIdealTest(absltest.TestCase):

  def test_flat_curve_gives_the_protocol_ideal_and_a_steeper_one_less(self):
    tau, k, t_one, gamma = 4.2, 5, 0.003, 0.07
    flat = decode.cost_curve_ideal(tau, t_one, t_one, gamma * t_one, k)
    self.assertAlmostEqual(flat, tau / (1 + k * gamma), delta=1e-9 * flat)
    steep = decode.cost_curve_ideal(tau, t_one, 2.0 * t_one, gamma * t_one, k)
    self.assertAlmostEqual(steep, tau / (2.0 + k * gamma), delta=1e-9 * steep)

  def test_ratio_per_round_pairs_each_round_with_its_own_calls(self):
    tau, k, calls = 3.0, 4, 10
    # per call: t(1) 1 ms, a window call 0.8 ms (a step 0.2 ms), verify 2 ms in round 1 and
    # 3 ms in round 2; round 3's verify loops are hit by noise (the longer no slower)
    verify = [2e-3, 3e-3, 2e-3]
    secs = {"ar": [0.12, 0.13, 0.12], "spec": [0.05, 0.06, 0.05],
            "ar/prompt": [0.02, 0.03, 0.02], "spec/prompt": [0.01, 0.02, 0.01]}
    for name, t in {"target_one": [1e-3] * 3, "verify": verify,
                    "draft_window": [0.8e-3] * 3, "draft_one": [0.3e-3] * 3}.items():
      secs[f"isolated/{name}/x1"] = [0.004 + calls * x for x in t]
      secs[f"isolated/{name}/x3"] = [0.005 + 3 * calls * x for x in t]
    secs["isolated/verify/x3"][2] = secs["isolated/verify/x1"][2]
    paired = gamma.paired_call_seconds(
        {name[len("isolated/"):]: sec for name, sec in secs.items() if "/x" in name}, calls)
    out = decode.ratio_per_round(secs, paired, tau, k, {"ar": 10, "spec": 10})
    # the 1 ms of start-up the longer loops carry beyond the shorter shifts each call by 50 µs
    ideal = [tau * 1.05e-3 / (v + 0.05e-3 + 0.85e-3) for v in verify[:2]]
    np.testing.assert_allclose(out["e2e"], [0.12 / 0.05 / ideal[0], 0.13 / 0.06 / ideal[1]],
                               rtol=1e-9)
    np.testing.assert_allclose(out["decode"], [0.10 / 0.04 / ideal[0], 0.10 / 0.04 / ideal[1]],
                               rtol=1e-9)
    twice = decode.ratio_per_round(secs, paired, tau, k, {"ar": 10, "spec": 20})
    np.testing.assert_allclose(twice["e2e"], 2 * np.asarray(out["e2e"]), rtol=1e-9)


class PairTest(absltest.TestCase):

  def test_dtype_is_honoured_and_checked(self):
    small = dict(num_layers=2, hidden_size=32, intermediate_size=64, vocab_size=128,
                 num_heads=4, num_kv_heads=2)
    f32 = pairs.synthetic_pair(pairs.SyntheticSpec(**small))
    bf16 = pairs.synthetic_pair(pairs.SyntheticSpec(**small, dtype="bfloat16"))
    self.assertEqual((bf16.target_cfg.dtype, bf16.drafter.cfg.param_dtype),
                     ("bfloat16", "bfloat16"))
    w32 = f32.target_params["layers_1"]["mlp"]["down_proj"]
    w16 = bf16.target_params["layers_1"]["mlp"]["down_proj"]
    self.assertEqual(str(w16.dtype), "bfloat16")
    np.testing.assert_allclose(np.asarray(w16, np.float32), w32, rtol=1e-2)
    with self.assertRaisesRegex(UserError, "float8"):
      pairs.synthetic_pair(pairs.SyntheticSpec(**small, dtype="float8"))

  def test_a_saved_pair_loads_back_as_the_tools_load_a_converted_one(self):
    tmp = tempfile.mkdtemp()
    self.addCleanup(shutil.rmtree, tmp)
    p = pairs.synthetic_pair(TINY)
    paths = pairs.save_pair(p, tmp)
    both = pairs.load_pair(paths["target"], paths["drafter"])
    self.assertEqual(both.target_cfg.num_layers, TINY.num_layers)
    self.assertEqual(both.description, f"target {paths['target']}, drafter {paths['drafter']}")
    leaf = lambda params, i: np.asarray(params[f"layers_{i}"]["mlp"]["down_proj"])
    np.testing.assert_array_equal(leaf(both.target_params, 1), leaf(p.target_params, 1))
    np.testing.assert_array_equal(leaf(both.draft_params, 0), leaf(p.draft_params, 0))
    self.assertEqual(type(both.drafter), type(p.drafter))
    alone = pairs.load_pair(paths["target"])
    self.assertIsNone(alone.drafter)
    self.assertIsNone(alone.draft_params)
    self.assertEqual(alone.description, f"target {paths['target']}")

  def test_tokenizer_is_a_bijection_on_text(self):
    tok = pairs.build_tokenizer(128)
    self.assertEqual(tok.get_vocab_size(), 128)
    ids = tok.encode("a b(c)").ids
    self.assertNotIn(0, ids)  # no <unk>
    self.assertEqual(tok.decode(ids), "a b(c)")


class PeersTest(absltest.TestCase):

  def test_ours_and_hugging_face_agree(self):
    spec = pairs.SyntheticSpec(num_layers=2, hidden_size=32, intermediate_size=64,
                               vocab_size=128, num_heads=4, num_kv_heads=2)
    with tempfile.TemporaryDirectory() as tmp:
      pairs.save_pair(pairs.synthetic_pair(spec), tmp)
      # 512 new tokens, medians of 3: the generation outlasts the prompt pass by far more than
      # timing noise (a whole 48-token generation of this model takes ~1 ms on a CPU, within
      # the noise of a loaded machine), so the decode-only rate is measurable
      # (decode_only_rate's test: the rest)
      result = peers.run_peers(tmp, window=2, max_new=512, text="ab c", repeats=3, threads=1)
    self.assertEqual(result["prompt_ids"][0], 1)  # BOS, as llama.cpp adds it
    self.assertLen(result["ours"]["tokens"], 512)
    self.assertTrue(result["ours"]["spec_equals_ar"])
    self.assertTrue(result["hf"]["same_tokens_as_ours"])
    self.assertGreater(result["ours_over_hf"], 0.0)
    # the prompt pass is left out of the decode-only rate, so it is the faster of the two
    self.assertGreater(result["ours"]["ar_decode_only_tokens_per_s"],
                       result["ours"]["ar_tokens_per_s"])

  def test_table_says_how_llamacpp_output_was_compared(self):
    lc = {"spec_tokens_per_s": 50.0, "ar_tokens_per_s_llama_bench": 40.0, "tau": 2.0,
          "spec_decode_only_tokens_per_s": 55.0}
    base = {"ours": {"spec_tokens_per_s": 60.0, "ar_tokens_per_s": 45.0, "tau": 2.0,
                     "spec_equals_ar": True, "ar_decode_only_tokens_per_s": 47.5},
            "load_avg_start_1_5_15": [1.0], "load_avg_end_1_5_15": [1.5],
            "ours_over_llamacpp": 1.2}
    by_ids = peers.format_table(dict(base, llamacpp=dict(
        lc, identical_on_common_prefix=True, compared_tokens=64, first_mismatch=None)))
    self.assertIn("True on 64 tokens", by_ids)
    by_text = peers.format_table(dict(base, llamacpp=dict(
        lc, same_text_as_ours=False, compared_characters=120)))
    self.assertIn("text False on 120 characters", by_text)
    self.assertIn("ours_over_llamacpp: 1.20", by_text)
    self.assertIn("ours AR decode-only (prompt pass left out): 47.5 tok/s", by_text)
    noisy = peers.format_table(dict(base, ours=dict(base["ours"], ar_decode_only_tokens_per_s=None),
                                    llamacpp=dict(lc, same_text_as_ours=True,
                                                  compared_characters=9)))
    self.assertIn("decode-only (prompt pass left out): - (", noisy)

  def test_decode_only_rate_leaves_out_the_prompt_pass_and_its_first_token(self):
    # 65 new tokens in 2.0 s, the prompt pass plus the first token 0.4 s: 64 tokens in 1.6 s
    self.assertAlmostEqual(peers.decode_only_rate(65, 2.0, 0.4), 40.0)
    self.assertIsNone(peers.decode_only_rate(65, 0.4, 0.4))  # noise: no rate, not a huge one
    self.assertIsNone(peers.decode_only_rate(65, 0.3, 0.4))


class GammaTest(absltest.TestCase):

  def test_summary_of_per_call_seconds(self):
    # a window call of 5 drafter steps 5 ms, a one-token drafter call 2 ms, a 6-token
    # verification 10 ms, a one-token target call 4 ms
    g = gamma.gamma_summary({"draft_window": 0.005, "draft_one": 0.002, "verify": 0.01,
                             "target_one": 0.004}, window=5)
    self.assertAlmostEqual(g["draft_step_s"], 0.001)
    self.assertAlmostEqual(g["gamma"], 0.1)
    self.assertAlmostEqual(g["gamma_vs_one_token_call"], 0.25)
    self.assertAlmostEqual(g["gamma_marginal"], 0.00075 / 0.01)
    self.assertAlmostEqual(g["target_one_token_s"], 0.004)

  def test_per_call_seconds_leave_out_the_loop_start(self):
    # a loop costs 30 ms to start and 2 ms per call: 10 calls 50 ms, 30 calls 90 ms
    fns = gamma.marginal_fns({"verify": None, "target_one": None}, 10)
    self.assertEqual(sorted(fns), ["target_one/x1", "target_one/x3", "verify/x1", "verify/x3"])
    # three rounds; the machine slows down by 10 ms in the third, for both runs of the pair
    t = gamma.per_call_seconds({"verify/x1": [0.05, 0.05, 0.06], "verify/x3": [0.09, 0.09, 0.1],
                                "target_one/x1": [0.05] * 3, "target_one/x3": [0.048] * 3},
                               calls=10)
    self.assertAlmostEqual(t["verify"], 0.002)
    self.assertAlmostEqual(t["target_one"], 0.048 / 30)  # noise: the longer run's mean

  def test_drafting_is_priced_with_the_rounds_sync(self):
    # EAGLE-3 drafts its first token from the sync of the previous round's K+1 tokens: the
    # draft loops and the whole-round loop call sync, the verification loops do not
    p = pairs.synthetic_pair(TINY)
    traced = []

    @dataclasses.dataclass(frozen=True)
    class Counting(drafters.LMDrafter):
      def sync(self, *args):
        traced.append(args[3].shape)  # the committed tokens
        return super().sync(*args)

    loops = gamma.gamma_loops(p.target_cfg, p.target_params, Counting(p.drafter.cfg),
                              p.draft_params, 3, 1, 4, cache_len=9, with_round=True)
    for name, loop in loops.items():
      before = len(traced)
      loop(2)
      self.assertEqual(len(traced) - before, name in ("draft_window", "draft_one", "round"),
                       name)
    self.assertEqual(traced, [(1, 4), (1, 2), (1, 4)])  # K+1 tokens per row (K = 1: draft_one)
    ecfg = eagle3.Eagle3Config.from_target(p.target_cfg, draft_vocab_size=48)
    eagle = drafters.Eagle3FeatureDrafter.create(ecfg, p.target_cfg)
    eparams = {"net": eagle3.init_eagle3(ecfg, jax.random.PRNGKey(2)),
               "vocab": eagle3.build_draft_vocab(np.arange(128)[::-1].astype(np.float64), 48)}
    g = gamma.measure_gamma(p.target_cfg, p.target_params, eagle, eparams, window=3, batch=2,
                            context_len=4, calls=2, repeats=1)
    self.assertGreater(g["draft_window_s"], 0.0)

  def test_looped_runs_as_many_calls_as_asked(self):
    loop = gamma.Looped(lambda c, step: c + step, jnp.zeros((), jnp.int32), (jnp.int32(2),))
    self.assertEqual(int(loop(3)), 6)
    self.assertEqual(int(loop(10)), 26)  # the carry goes on from the last call

  def test_measure_gamma_times_its_loops(self):
    p = pairs.synthetic_pair(TINY)
    g = gamma.measure_gamma(p.target_cfg, p.target_params, p.drafter, p.draft_params, window=2,
                            batch=1, context_len=4, calls=2, repeats=1)
    self.assertGreater(g["gamma"], 0.0)
    self.assertEqual((g["cache_len"], g["repeats"]), (8, 1))
    with self.assertRaisesRegex(UserError, "cache_len 5 cannot hold 4 tokens"):
      gamma.gamma_loops(p.target_cfg, p.target_params, p.drafter, p.draft_params, 2, 1, 4,
                        cache_len=5)


class BandwidthTest(absltest.TestCase):

  def test_an_ar_step_reads_every_weight_but_the_embedding_table(self):
    for tied in (False, True):
      cfg = llama.ModelConfig(vocab_size=100, hidden_size=8, intermediate_size=16, num_layers=1,
                              num_heads=2, num_kv_heads=1, tie_embeddings=tied)
      params = llama.init_params(cfg, jax.random.PRNGKey(0))
      table = 100 * 8 * 4
      want = 4 * llama.param_count(params) - (0 if tied else table)
      self.assertEqual(decode_weights.weight_bytes_per_step(cfg, params), want)

  def test_bandwidth_summary(self):
    # 1 GB of weights: a 2 ms step reads 500 GB/s, 2.5x the 0.8 ms it takes at 1250 GB/s
    b = timing.bandwidth_summary(10**9, {"engine": 0.002}, 1250.0)
    self.assertAlmostEqual(b["engine_gbs"], 500.0)
    self.assertAlmostEqual(b["engine_over_bandwidth_time"], 2.5)
    self.assertIsNone(timing.bandwidth_summary(10**9, {"engine": 0.002}, 0.0)[
        "engine_over_bandwidth_time"])
    noisy = timing.bandwidth_summary(10**9, {"engine": -0.001}, 1250.0)  # a noisy difference
    self.assertIsNone(noisy["engine_gbs"])
    self.assertIsNone(noisy["engine_over_bandwidth_time"])


class CompareTest(absltest.TestCase):

  def test_drafters_are_compared_as_a_user_runs_it(self):
    tmp = tempfile.mkdtemp()
    self.addCleanup(shutil.rmtree, tmp)
    out, target, drafter = (os.path.join(tmp, n) for n in ("compare.json", "target", "drafter"))
    tok = tokenizer_lib.train_bpe(["def f(x):\n    return x + 1", "Write a story."], 300)
    for path, layers in ((target, 2), (drafter, 1)):  # an LM drafter over the same vocabulary
      cfg = llama.ModelConfig(vocab_size=300, hidden_size=16, intermediate_size=32,
                              num_layers=layers, num_heads=2, num_kv_heads=1)
      hf.save(path, cfg, llama.init_params(cfg, jax.random.PRNGKey(layers)))
      tokenizer_lib.save(tok, path)
    proc = subprocess.run(
        [sys.executable, "-m", "ppow_jax.bench.compare", "--config=configs/tiny.py:smoke",
         f"--config.target.hf_dir={target}", "--config.eval.prompt_len=24",
         f"--drafters=one={drafter},two={drafter}", "--config.eval.benchmarks=chat,humaneval",
         "--config.eval.num_prompts=1", "--config.eval.max_new_tokens=4",
         "--config.eval.temperatures=(0.0,)", "--config.eval.batch_sizes=(1,)",
         "--config.eval.tree=()", f"--output_json={out}"],
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), capture_output=True,
        text=True, timeout=300, check=False)
    self.assertEqual(proc.returncode, 0, proc.stderr[-2000:])
    with open(out) as f:
      rows = json.load(f)["rows"]
    key = lambda r: (r["benchmark"], r["drafter"])
    self.assertEqual(sorted(map(key, rows)), sorted(
        (b, d) for b in ("chat", "humaneval", "mean") for d in ("ar", "one", "two")))
    by = {key(r): r for r in rows}
    for b in ("chat", "humaneval"):  # the same drafter twice: the same acceptance, greedy = AR
      self.assertEqual(by[b, "one"]["tau"], by[b, "two"]["tau"])
      self.assertTrue(by[b, "one"]["greedy_matches_ar"])
    self.assertIn("| chat | 0 | 1 | two | chain |", proc.stdout)

  def test_bad_drafter_lists_are_named(self):
    tmp = tempfile.mkdtemp()
    self.addCleanup(shutil.rmtree, tmp)
    for items, message in ((["x"], "not NAME=DIR"), ([f"ar={tmp}"], "reserved"),
                           ([f"a={tmp}", f"a={tmp}"], "given twice"),
                           (["a=/no/such/dir"], "no such directory"), ([], "at least one")):
      with self.assertRaisesRegex(UserError, message):
        compare.parse_drafters(items)
    self.assertEqual(compare.parse_drafters([f"a={tmp}", f" b = {tmp}"]), {"a": tmp, "b": tmp})


if __name__ == "__main__":
  absltest.main()
