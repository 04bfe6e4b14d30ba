"""End to end: the real pipeline (data → target → drafters → eval → report) at toy sizes."""

import json
import os
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")

from absl.testing import absltest
import numpy as np

from ppow_jax import run
from ppow_jax.errors import UserError

_CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def _smoke_config():
  import importlib.util
  spec = importlib.util.spec_from_file_location("default_cfg", os.path.join(_CONFIGS,
                                                                             "default.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config("smoke")


class MainPipelineTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.tmp = tempfile.TemporaryDirectory()
    cls.workdir = os.path.join(cls.tmp.name, "w")
    cls.config = _smoke_config()
    cls.report_path = run.run(cls.config, cls.workdir)
    with open(os.path.join(cls.workdir, "report.json")) as f:
      cls.report = json.load(f)

  @classmethod
  def tearDownClass(cls):
    cls.tmp.cleanup()
    super().tearDownClass()

  def test_report_schema_and_sanity(self):
    r = self.report
    self.assertEqual(set(r) >= {"protocol", "hardware", "target", "results"}, True)
    drafters = {row["drafter"] for row in r["results"]}
    self.assertEqual(drafters, {"ar", "baseline", "ppow", "continued"})
    temps = {row["temperature"] for row in r["results"]}
    self.assertEqual(temps, {0.0, 1.0})
    for row in r["results"]:
      for key in ("temperature", "drafter", "tau", "tau_analytic", "alpha", "tokens_per_s",
                  "speedup"):
        self.assertIn(key, row)
      self.assertGreaterEqual(row["tau"], 1.0)
      self.assertLessEqual(row["tau"], self.config.eval.window + 1)
      self.assertTrue(all(0.0 <= a <= 1.0 for a in row["alpha"]), row["alpha"])
      self.assertGreater(row["speedup"], 0.0)
      self.assertGreater(row["tokens_per_s"], 0.0)
      if row["temperature"] == 0.0:
        self.assertTrue(row["greedy_matches_ar"], row)
    self.assertTrue(np.isfinite(r["target"]["heldout_loss_nats"]))
    for name in ("report.md", "tau.png", "alpha_by_position.png", "ppow_training.png"):
      self.assertTrue(os.path.isfile(os.path.join(self.workdir, name)), name)
    for name in ("baseline", "ppow", "continued"):
      self.assertTrue(os.path.isfile(os.path.join(self.workdir, "drafters", name,
                                                  "model.safetensors")))
      best = os.path.join(self.workdir, "checkpoints", name, "best")
      self.assertNotEmpty([d for d in os.listdir(best) if d.isdigit()], best)
    with open(os.path.join(self.workdir, "tensorboard", "ppow", "metrics.jsonl")) as f:
      rows = [json.loads(line) for line in f]
    self.assertTrue(any("eval_tau" in r for r in rows))
    self.assertTrue(any("accepted_hist" in r and "tau_sim" in r for r in rows))

  def test_eval_stage_reevaluates_with_a_prompts_file(self):
    prompts = os.path.join(self.tmp.name, "prompts.jsonl")
    with open(prompts, "w") as f:
      f.write(json.dumps({"prompt": "import os\n"}) + "\n")
      f.write(json.dumps({"messages": [{"role": "user", "content": "def main():"}]}) + "\n")
      f.write(json.dumps({"conversations": [{"from": "human", "value": "class A:"}]}) + "\n")
    c = _smoke_config()
    c.stages = "eval"
    c.eval.prompts_file = prompts
    c.eval.batch_sizes = (1,)
    c.eval.temperatures = (0.0,)
    run.run(c, self.workdir)
    with open(os.path.join(self.workdir, "report.json")) as f:
      report = json.load(f)
    self.assertEqual(report["protocol"]["prompts"], prompts)
    self.assertEqual({row["num_prompts"] for row in report["results"]}, {2})

  def test_missing_corpus_is_a_clear_error(self):
    c = _smoke_config()
    c.data.corpus = "/nonexistent/corpus/dir"
    with self.assertRaisesRegex(UserError, "config.data.corpus: '/nonexistent/corpus/dir'"):
      run.run(c, os.path.join(self.tmp.name, "bad"))


if __name__ == "__main__":
  absltest.main()
