"""Batch compaction of the decoding loop: the same tokens and statistics in the original row
order, with fewer computed row-rounds."""

import collections
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

from absl.testing import absltest
import jax
import numpy as np

from ppow_jax import decode_loop, drafters, engine, tree, tree_engine
from ppow_jax.models import eagle3, llama

TARGET = llama.ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
                           num_heads=4, num_kv_heads=2, max_position_embeddings=128,
                           initializer_range=0.3)
PROMPTS = [[1, 2, 3, 4, 5], [7, 8], [9, 10, 11, 12, 13, 14], [3], [20, 21, 22], [30, 31],
           [40, 41, 42, 43], [50]]
MAX_NEW = 16


class PhaseSizesTest(absltest.TestCase):

  def test_halving_down_to_four_rows(self):
    self.assertEqual(decode_loop.phase_sizes(16, True), [16, 8, 4])
    self.assertEqual(decode_loop.phase_sizes(9, True), [9, 4])
    self.assertEqual(decode_loop.phase_sizes(8, True), [8, 4])
    self.assertEqual(decode_loop.phase_sizes(7, True), [7])
    self.assertEqual(decode_loop.phase_sizes(16, False), [16])
    self.assertEqual(decode_loop.phase_sizes(8, True, min_rows=1), [8, 4, 2, 1])
    self.assertEqual(decode_loop.phase_sizes(6, True, min_rows=2), [6, 3])


class CompactionTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.tp = llama.init_params(TARGET, jax.random.PRNGKey(0))
    leaves, treedef = jax.tree_util.tree_flatten(cls.tp)
    keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
    cls.dp = jax.tree_util.tree_unflatten(  # a drafter that mostly agrees with the target
        treedef, [x + 0.01 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])
    cls.prompts, cls.lens = engine.pad_prompts(PROMPTS)
    free = engine.Engine(TARGET, None, engine.DecodeConfig(max_new_tokens=MAX_NEW))
    ar = free.generate(cls.tp, None, cls.prompts, cls.lens, jax.random.PRNGKey(0)).new_tokens()
    # EOS: the token that ends the most rows early, so that rows finish far apart
    first_seen = collections.Counter(t for row in ar for t in set(row[:MAX_NEW // 2]))
    cls.eos = first_seen.most_common(1)[0][0]
    cls.want = [row[:row.index(cls.eos) + 1] if cls.eos in row else row for row in ar]

  def _generate(self, make, dparams, compact: bool, min_rows: int = 4):
    cfg = engine.DecodeConfig(window=3, max_new_tokens=MAX_NEW, eos_ids=(self.eos,),
                              compact_rows=compact, compact_min_rows=min_rows)
    return make(cfg).generate(self.tp, dparams, self.prompts, self.lens, jax.random.PRNGKey(0))

  def test_engines_give_the_same_rows_with_fewer_row_rounds(self):
    # rows finishing at different rounds: at most half active after some round
    lengths = sorted(map(len, self.want))
    self.assertLess(lengths[3], lengths[-1])
    # EAGLE-3's state also carries a hidden state and logits per row
    ecfg = eagle3.Eagle3Config.from_target(TARGET, draft_vocab_size=48)
    eagle = drafters.Eagle3FeatureDrafter.create(ecfg, TARGET)
    eparams = {"net": eagle3.init_eagle3(ecfg, jax.random.PRNGKey(2)),
               "vocab": eagle3.build_draft_vocab(np.arange(64)[::-1].astype(np.float64), 48)}
    lm = drafters.LMDrafter(TARGET)
    makers = {
        "ar": (lambda cfg: engine.Engine(TARGET, None, cfg), None),
        "chain": (lambda cfg: engine.Engine(TARGET, lm, cfg), self.dp),
        "chain-eagle3": (lambda cfg: engine.Engine(TARGET, eagle, cfg), eparams),
        "tree": (lambda cfg: tree_engine.TreeEngine(TARGET, lm, cfg,
                                                    tree.TreeShape.parse("6,3,2")), self.dp)}
    for name, (make, dparams) in makers.items():
      with self.subTest(engine=name):
        whole, compact = (self._generate(make, dparams, c) for c in (False, True))
        # down to a single row (the drafter state with the most parts, and the tree's)
        to_one = (self._generate(make, dparams, True, min_rows=1)
                  if name in ("chain-eagle3", "tree") else None)
        self.assertEqual(whole.new_tokens(), self.want)  # greedy: the AR tokens, EOS included
        for out in [compact] if to_one is None else [compact, to_one]:
          self.assertEqual(out.new_tokens(), self.want)
          np.testing.assert_array_equal(out.length_B, whole.length_B)
          for field in ("verify_calls_B", "drafted_B", "accepted_B", "committed_B",
                        "accepted_at_K", "reached_at_K", "alpha_sum_K", "tau_analytic_sum"):
            np.testing.assert_array_equal(getattr(out.stats, field),
                                          getattr(whole.stats, field), err_msg=field)
        rounds_B = np.asarray(whole.stats.verify_calls_B)
        self.assertEqual(int(whole.stats.row_slots), len(PROMPTS) * rounds_B.max())
        # the loop ran its last rounds on 4 rows, not 8
        self.assertLess(int(compact.stats.row_slots), int(whole.stats.row_slots))
        self.assertGreaterEqual(int(compact.stats.row_slots), rounds_B.sum())
        self.assertGreater(compact.stats.summary()["batch_utilization"],
                           whole.stats.summary()["batch_utilization"])
        if to_one is not None:  # its last rounds ran on fewer rows still
          self.assertLess(int(to_one.stats.row_slots), int(compact.stats.row_slots))
          self.assertGreaterEqual(int(to_one.stats.row_slots), rounds_B.sum())


if __name__ == "__main__":
  absltest.main()
