"""Benchmark means: what the report's "mean" rows are made of."""

from absl.testing import absltest
import numpy as np

from ppow_jax import evaluate


def _row(bench: str, drafter: str, tau: float, speedup: float, alpha: list) -> dict:
  return {"benchmark": bench, "temperature": 0.0, "batch_size": 1, "drafter": drafter,
          "window": 3, "tau": tau, "tau_analytic": tau + 0.1, "speedup": speedup,
          "tokens_per_s": 10.0 * speedup, "alpha": alpha, "greedy_matches_ar": True}


class MeanRowsTest(absltest.TestCase):

  def test_unweighted_mean_over_benchmarks_per_drafter(self):
    rows = [_row("humaneval", "ppow", 3.0, 2.0, [0.9, 0.8, 0.5]),
            _row("chat", "ppow", 2.0, 1.5, [0.7, 0.6, 0.1]),
            _row("humaneval", "baseline", 2.5, 1.8, [0.8, 0.7, 0.4]),
            _row("chat", "baseline", 1.5, 1.1, [0.6, 0.5, 0.2])]
    rows[1]["greedy_matches_ar"] = False
    means = {r["drafter"]: r for r in evaluate.mean_rows(rows)}
    self.assertEqual(set(means), {"ppow", "baseline"})
    ppow = means["ppow"]
    self.assertEqual((ppow["benchmark"], ppow["num_benchmarks"]), ("mean", 2))
    self.assertAlmostEqual(ppow["tau"], 2.5)
    self.assertAlmostEqual(ppow["speedup"], 1.75)
    self.assertAlmostEqual(ppow["tau_analytic"], 2.6)
    np.testing.assert_allclose(ppow["alpha"], [0.8, 0.7, 0.3])
    self.assertFalse(ppow["greedy_matches_ar"])  # one benchmark differed
    self.assertTrue(means["baseline"]["greedy_matches_ar"])
    self.assertAlmostEqual(means["baseline"]["tau"], 2.0)

  def test_chain_and_tree_rows_are_averaged_apart(self):
    rows = [_row(b, "ppow", tau, 1.0, [0.5]) for b, tau in (("humaneval", 2.0), ("chat", 1.0))]
    rows += [{**_row(b, "ppow", tau, 1.2, [0.6, 0.3]), "drafting": "tree", "tree": [8, 4, 2],
              "tau_analytic": None} for b, tau in (("humaneval", 3.0), ("chat", 2.0))]
    means = {r["drafting"]: r for r in evaluate.mean_rows(rows)}
    self.assertEqual(set(means), {"chain", "tree"})  # rows without the field are chain rows
    self.assertAlmostEqual(means["chain"]["tau"], 1.5)
    self.assertAlmostEqual(means["tree"]["tau"], 2.5)
    self.assertEqual(means["tree"]["tree"], [8, 4, 2])
    self.assertIsNone(means["tree"]["tau_analytic"])  # defined for chains only
    self.assertNotIn("tree", means["chain"])


if __name__ == "__main__":
  absltest.main()
