"""The study's plan, seeds and table: pure parts against numpy, and its one-line CLI errors.
(The study run end to end, reproducing the main job's drafters: tests/main_e2e_test.py.)"""

import os
import subprocess
import sys

from absl.testing import absltest
import numpy as np

from ppow_jax import cli, stages, study
from ppow_jax.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = os.path.join(ROOT, "configs", "tiny.py:smoke")


def _rows(taus: dict) -> list[dict]:
  """Evaluation rows {(benchmark, T, drafter): τ} with α̂₀ = τ - 1 (a stand-in, checked too)."""
  return [{"benchmark": b, "temperature": t, "drafter": d, "drafting": "chain", "tau": tau,
           "alpha": [tau - 1.0, 0.5]} for (b, t, d), tau in taus.items()]


class SummaryTest(absltest.TestCase):

  def test_each_seed_is_compared_with_the_control_of_the_same_seed(self):
    ppow = [1.30, 1.50, 1.20]
    control = [1.25, 1.40, 1.30]
    taus = {("he", 0.0, "baseline"): 1.1}
    for s in range(3):
      taus["he", 0.0, f"ppow@s{s}"] = ppow[s]
      taus["he", 0.0, f"continued@s{s}"] = control[s]
    summary = {r["arm"]: r for r in study.summarize(_rows(taus), ["ppow"], [0, 1, 2])}
    self.assertEqual(list(summary), ["baseline", "continued", "ppow"])
    p = summary["ppow"]
    np.testing.assert_allclose(p["tau_per_seed"], ppow)
    np.testing.assert_allclose(p["tau_mean"], np.mean(ppow))
    np.testing.assert_allclose(p["tau_std"], np.std(ppow, ddof=1))
    np.testing.assert_allclose(p["over_control_per_seed"], np.divide(ppow, control))
    np.testing.assert_allclose(p["over_control_of_means"], np.mean(ppow) / np.mean(control))
    np.testing.assert_allclose(p["alpha0_mean"], np.mean(ppow) - 1.0)
    self.assertNotIn("over_control_per_seed", summary["continued"])
    self.assertEqual(summary["baseline"]["tau_per_seed"], [1.1])
    md = study.markdown(list(summary.values()))
    self.assertIn("| he | 0 | ppow | 1.333 ± 0.153 | 1.300, 1.500, 1.200 | 1.040, 1.071, 0.923 "
                  "| 1.013 | 0.33 |", md)

  def test_tree_rows_and_other_temperatures_stay_apart(self):
    taus = {("he", t, f"{a}@s0"): tau for t, a, tau in
            ((0.0, "ppow", 1.4), (0.0, "continued", 1.2), (1.0, "ppow", 1.1),
             (1.0, "continued", 1.0))}
    rows = _rows(taus) + [{**_rows({("he", 0.0, "ppow@s0"): 9.0})[0], "drafting": "tree"}]
    got = {(r["temperature"], r["arm"]): r for r in study.summarize(rows, ["ppow"], [0])}
    np.testing.assert_allclose(got[0.0, "ppow"]["over_control_per_seed"], [1.4 / 1.2])
    np.testing.assert_allclose(got[1.0, "ppow"]["over_control_per_seed"], [1.1])


class PlanTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.config = cli.load_config(SMOKE)  # group size 2

  def test_ppow_first_with_its_control_and_repeated_settings_dropped(self):
    runs = study.plan(["no_adaw", "G2", "G8", "ppow"], [3, 1], self.config.ppow)
    self.assertEqual([(r.name, r.stages) for r in runs],
                     [("ppow-s3", "ppow,continued"), ("ppow-s1", "ppow,continued"),
                      ("no_adaw-s3", "ppow"), ("no_adaw-s1", "ppow"), ("G8-s3", "ppow"),
                      ("G8-s1", "ppow")])  # G2 is this config's own group size
    rc = study.run_config(self.config, runs[-1])
    self.assertEqual((rc.ppow.group_size, rc.ppow.seed, rc.stages), (8, 1, "ppow"))
    self.assertEqual((self.config.ppow.group_size, self.config.ppow.seed), (2, 0))  # a copy
    rc = study.run_config(self.config, runs[2])
    self.assertEqual((rc.ppow.selection, rc.ppow.use_prox), ("uniform", True))

  def test_arms_of_any_ppow_settings(self):
    runs = study.plan(["prox_eps=20+prox_eta=0.5", "use_prox=false", "group_size=2"], [0],
                      self.config.ppow)
    self.assertEqual([r.arm for r in runs], ["ppow", "prox_eps=20+prox_eta=0.5",
                                             "use_prox=false"])  # group_size=2: the config's
    self.assertEqual(runs[1].settings, {"prox_eps": 20.0, "prox_eta": 0.5})
    self.assertIsInstance(runs[1].settings["prox_eps"], float)
    self.assertEqual(study.run_config(self.config, runs[2]).ppow.use_prox, False)

  def test_bad_arms_and_seeds(self):
    for arms, seeds, pattern in ((["ppw"], [0], "unknown arm 'ppw'"),
                                 (["G1"], [0], "unknown arm 'G1'"),
                                 (["prox_eps=x"], [0], r"'prox_eps=x': ppow.prox_eps=x: not a"),
                                 (["nope=1"], [0], "'nope=1': ppow.nope: unknown key"),
                                 (["optim=1"], [0], "a group of settings"),
                                 (["seed=3"], [0], "'seed' is not a PPOW setting"),
                                 (["ppow"], [0, 0], "distinct seeds"),
                                 (["ppow"], [-1], "distinct seeds >= 0"),
                                 (["ppow"], [], "distinct seeds")):
      with self.assertRaisesRegex(UserError, pattern):
        study.plan(arms, seeds, self.config.ppow)

  def test_the_seed_moves_ppow_and_its_control_together_and_nothing_else(self):
    c = self.config
    before = {n: stages.stage_seed(c, n) for n in stages.NAMES[:-1]}
    c.ppow.seed = 5
    after = {n: stages.stage_seed(c, n) for n in stages.NAMES[:-1]}
    self.assertEqual({n for n in before if before[n] != after[n]}, {"ppow", "continued"})
    self.assertEqual(after["ppow"], after["continued"])  # the control reads PPOW's batches
    self.assertEqual(after["ppow"] - before["ppow"], 5)
    # a run made with another seed is not silently reused
    self.assertIn("ppow.seed", stages.settings(c, "continued"))

  def test_cli_errors_are_one_line_before_jax(self):
    for args, pattern in ((["--arms=ppow,nope"], "--arms: unknown arm 'nope'"),
                          (["--seeds=0,x"], "--seeds: "),
                          ([], "--workdir is required")):
      workdir = [] if not args else ["--workdir=/tmp/never-created-study"]
      proc = subprocess.run([sys.executable, "-m", "ppow_jax.study", f"--config={SMOKE}",
                             *workdir, *args], capture_output=True, text=True, cwd=ROOT,
                            timeout=120)
      self.assertEqual(proc.returncode, 2, proc.stderr[-2000:])
      self.assertRegex(proc.stderr.strip().splitlines()[-1], "^error: " + pattern)
      self.assertNotIn("Traceback", proc.stderr)
    self.assertFalse(os.path.exists("/tmp/never-created-study"))


if __name__ == "__main__":
  absltest.main()
