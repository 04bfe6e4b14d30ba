"""Smoke tests of the benchmarks: tiny sizes, output schema only (no timing assertions)."""

import json
import os
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")

from absl import flags
from absl.testing import absltest, flagsaver

from ppow_jax.bench import decode, pairs, peers
from ppow_jax.models import hf

FLAGS = flags.FLAGS
TINY = dict(synthetic_layers=2, synthetic_hidden=32, synthetic_intermediate=64,
            synthetic_vocab=128)
RESULT_KEYS = {"batch", "ar_tokens_per_s", "spec_tokens_per_s", "tau", "tau_analytic", "alpha",
               "gamma", "gamma_detail", "ideal_speedup", "measured_speedup",
               "measured_over_ideal", "verify_cost_curve", "greedy_identical", "breakdown"}


class DecodeBenchTest(absltest.TestCase):

  def test_main_writes_the_documented_json(self):
    if not FLAGS.is_parsed():
      FLAGS.mark_as_parsed()
    tmp = self.create_tempdir().full_path
    out = os.path.join(tmp, "decode.json")
    with flagsaver.flagsaver(batch_sizes=["2"], window=2, max_new_tokens=6, prompt_len=4,
                             repeats=1, gamma_calls=2, output_json=out, tree="4,2,2",
                             save_pair=os.path.join(tmp, "pair"), **TINY):
      decode.run()
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
    self.assertIn("load_avg_1_5_15", result["machine"])
    # the saved pair loads back, with a tokenizer of exactly vocab_size ids
    target, _ = hf.load(os.path.join(tmp, "pair", "target"))
    tok = hf.load_tokenizer(os.path.join(tmp, "pair", "drafter"))
    self.assertEqual(tok.get_vocab_size(), target.cfg.vocab_size)


class PairTest(absltest.TestCase):

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
      result = peers.run_peers(tmp, window=2, max_new=6, text="ab c", repeats=1, threads=1)
    self.assertEqual(result["prompt_ids"][0], 1)  # BOS, as llama.cpp adds it
    self.assertLen(result["ours"]["tokens"], 6)
    self.assertTrue(result["ours"]["spec_equals_ar"])
    self.assertTrue(result["hf"]["same_tokens_as_ours"])
    self.assertGreater(result["ours_over_hf"], 0.0)


if __name__ == "__main__":
  absltest.main()
