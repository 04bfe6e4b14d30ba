"""End to end: the real pipeline (data → target → drafters → eval → report) at toy sizes, its
workdir safety (settings records, history, lock), the CLI's one-line errors, and kill -9."""

import json
import os
import signal
import stat
import subprocess
import sys
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")

from absl.testing import absltest
import numpy as np
import safetensors.numpy

from ppow_jax import cli, layout, report, run, study
from ppow_jax.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = os.path.join(ROOT, "configs", "tiny.py:smoke")


def _smoke_config():
  return cli.load_config(SMOKE)


def _main(*args, timeout=300):
  return subprocess.run([sys.executable, "-m", "ppow_jax.main", *args], capture_output=True,
                        text=True, cwd=ROOT, timeout=timeout)


class MainPipelineTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.tmp = tempfile.TemporaryDirectory()
    cls.workdir = os.path.join(cls.tmp.name, "w")
    cls.paths = layout.Layout(cls.workdir)
    cls.config = _smoke_config()
    cls.report_path = run.run(cls.config, cls.workdir)
    with open(cls.paths.report_json) as f:
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
      self.assertEqual(row["drafting"], "chain")  # eval.tree is off
    self.assertTrue(np.isfinite(r["target"]["heldout_loss_nats"]))
    for name in ("report.md", "tau.png", "alpha_by_position.png", "ppow_training.png"):
      self.assertTrue(os.path.isfile(self.paths.path(name)), name)
    for name in ("baseline", "ppow", "continued"):
      self.assertTrue(os.path.isfile(os.path.join(self.paths.export(name),
                                                  "model.safetensors")))
    with open(self.paths.metrics("ppow")) as f:
      rows = [json.loads(line) for line in f]
    self.assertEqual([row["step"] for row in rows], [1, 2, 3])  # each step once
    self.assertTrue(any("eval_tau" in row for row in rows))
    self.assertTrue(any("accepted_hist" in row and "tau_sim" in row for row in rows))

  def test_training_counts_and_settings_in_the_report(self):
    c, training = self.config, self.report["training"]
    # a PPOW step drafts B x S x G windows
    self.assertEqual(training["ppow"]["windows"],
                     c.ppow.steps * c.ppow.batch_size * c.ppow.starts_per_seq * c.ppow.group_size)
    self.assertEqual(training["continued"]["sequences"], c.ppow.steps * c.ppow.batch_size)
    self.assertGreater(training["baseline"]["windows"], 0)
    self.assertEqual(training["ppow"]["settings"]["ppow.window"], c.ppow.window)
    self.assertGreater(training["baseline"]["train_seconds"], 0.0)

  def test_exports_are_readable_and_no_temporary_directories_remain(self):
    for name in ("target", "baseline", "ppow", "continued"):
      mode = stat.S_IMODE(os.stat(self.paths.export(name)).st_mode)
      self.assertEqual(mode, 0o755, name)
    self.assertEqual(sorted(os.listdir(self.paths.path("drafters"))),
                     ["baseline", "continued", "ppow"])
    self.assertFalse(os.path.exists(self.paths.lock_file))

  def test_changed_settings_stop_the_rerun_and_name_the_keys(self):
    c = _smoke_config()
    c.ppow.window, c.target.hidden_size = 4, 64
    before = os.path.getsize(self.paths.config_history)
    with self.assertRaisesRegex(UserError, r"stage 'target' was made with other settings: "
                                           r"target\.hidden_size \(32 -> 64\).*--retrain=target"):
      run.run(c, self.workdir)
    c.target.hidden_size = 32
    with self.assertRaisesRegex(UserError, r"stage 'ppow' .* ppow\.window \(3 -> 4\)"):
      run.run(c, self.workdir)
    self.assertEqual(os.path.getsize(self.paths.config_history), before)  # nothing written
    with self.assertRaisesRegex(UserError, "--retrain: unknown stage 'pow'"):
      run.run(c, self.workdir, retrain=("pow",))

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
    with open(self.paths.report_json) as f:
      report = json.load(f)
    self.assertEqual(report["protocol"]["prompts"], prompts)
    self.assertEqual({row["num_prompts"] for row in report["results"]}, {2})
    # the training record is the one the drafters were made with
    self.assertEqual(report["training"]["ppow"]["windows"], self.report["training"]["ppow"]
                     ["windows"])
    with open(self.paths.config_history) as f:
      history = [json.loads(line) for line in f]
    self.assertGreaterEqual(len(history), 2)
    self.assertEqual(history[0]["config"]["stages"], self.config.stages)
    self.assertEqual(history[-1]["config"]["stages"], "eval")

  def test_eval_stage_with_trees_reports_chain_and_tree_side_by_side(self):
    c = _smoke_config()
    c.stages = "eval"
    c.eval.tree = (4, 2, 2)
    c.eval.temperatures = (0.0,)
    run.run(c, self.workdir)
    with open(self.paths.report_json) as f:
      report = json.load(f)
    rows = report["results"]
    self.assertEqual({(r["drafter"], r["drafting"]) for r in rows},
                     {("ar", "chain")} | {(n, d) for n in ("baseline", "ppow", "continued")
                                          for d in ("chain", "tree")})
    for row in rows:
      self.assertTrue(row["greedy_matches_ar"], row)  # T = 0: chain and tree output equal AR
      if row["drafting"] == "tree":
        self.assertEqual(row["tree"], [4, 2, 2])
        self.assertBetween(row["tau"], 1.0, 3.0)  # at most depth + 1 tokens a round
    self.assertEqual(report["protocol"]["drafting"], ["chain", "tree"])
    with open(self.paths.report_md) as f:
      md = f.read()
    self.assertIn("| tree 4/2/2 |", md)
    self.assertIn("tree ÷ chain τ", md)
    self.assertEqual(md.count("| ppow | tree 4/2/2 |"), 2)  # the table and the side by side

  def test_study_reproduces_the_main_job_and_compares_each_seed_with_its_control(self):
    """The study's seed-0 run of the ppow arm is this class's main job (same baseline, same
    settings): the same drafters, bit for bit; its table is built from its own evaluation."""
    root = os.path.join(self.tmp.name, "study")
    result = study.study(self.config, root, ["ppow"], [0], self.workdir, timed=False)
    runs = layout.Layout(os.path.join(root, "runs", "ppow-s0"))
    self.assertTrue(os.path.islink(runs.export("baseline")))  # one baseline for every run
    for stage in ("ppow", "continued"):
      got = safetensors.numpy.load_file(os.path.join(runs.export(stage), "model.safetensors"))
      want = safetensors.numpy.load_file(os.path.join(self.paths.export(stage),
                                                      "model.safetensors"))
      self.assertEqual(sorted(got), sorted(want))
      for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=f"{stage} {key}")
    tau = {(r["temperature"], r["drafter"]): r["tau"] for r in result["rows"]}
    for r in result["summary"]:
      self.assertEqual(r["benchmark"], "heldout")
      if r["arm"] == "ppow":
        t = r["temperature"]
        self.assertAlmostEqual(r["over_control_per_seed"][0],
                               tau[t, "ppow@s0"] / tau[t, "continued@s0"])
    self.assertEqual({r["arm"] for r in result["summary"]}, {"baseline", "continued", "ppow"})
    self.assertEqual({r["batch_size"] for r in result["rows"]}, {self.config.eval.num_prompts})
    # untimed (eval.repeats = 0): τ and α̂ only; the report's table shows no speed
    self.assertEqual({(r["tokens_per_s"], r["speedup"]) for r in result["rows"]}, {(None, None)})
    self.assertIn("| – | – | yes |", report.table(result["rows"]))
    self.assertEqual(result["training"]["continued@s0"]["iterator_seed"],
                     result["training"]["ppow@s0"]["iterator_seed"])
    for name in ("study.json", "study.md", "study_tau.png"):
      self.assertTrue(os.path.isfile(os.path.join(root, name)), name)

  def test_missing_corpus_is_a_clear_error(self):
    c = _smoke_config()
    c.data.corpus = "/nonexistent/corpus/dir"
    with self.assertRaisesRegex(UserError, "config.data.corpus: '/nonexistent/corpus/dir'"):
      run.run(c, os.path.join(self.tmp.name, "bad"))

  def _run_until(self, args, marker):
    """Starts the CLI, kills it (SIGKILL) right after stderr shows ``marker``; None: finish."""
    proc = subprocess.Popen([sys.executable, "-m", "ppow_jax.main", *args], cwd=ROOT,
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    seen = []
    for line in proc.stderr:
      seen.append(line)
      if marker and marker in line:
        os.kill(proc.pid, signal.SIGKILL)
        break
    proc.wait(timeout=600)
    return proc.returncode, "".join(seen)

  def test_kill_9_then_resume_counts_every_step_once(self):
    """``kill -9`` late in the target's and the baseline's training: the reruns resume, and the
    record counts what this class's uninterrupted run of the same recipe counts."""
    paths = layout.Layout(os.path.join(self.tmp.name, "killed"))
    args = ["--config=configs/tiny.py:smoke", "--config.stages=target,baseline",
            f"--workdir={paths.root}"]
    logs = []
    for marker in ("[target] 5/6", "[baseline] 4/4"):
      rc, err = self._run_until(args, marker)
      self.assertEqual(rc, -signal.SIGKILL, err[-3000:])
      self.assertTrue(os.path.exists(paths.lock_file))  # left behind by the killed run
      logs.append(err)
    rc, err = self._run_until(args, None)
    self.assertEqual(rc, 0, err[-3000:])
    self.assertIn("resumed from step", "".join(logs[1:] + [err]))
    info = paths.read_info("baseline")
    want = self.report["training"]["baseline"]
    self.assertEqual((info["steps"], info["windows"]), (want["steps"], want["windows"]))
    for stage, steps in (("target", 6), ("baseline", 4)):
      with open(paths.metrics(stage)) as f:
        self.assertEqual([json.loads(line)["step"] for line in f], list(range(1, steps + 1)))
    self.assertEqual(os.listdir(paths.path("drafters")), ["baseline"])  # no temporary dirs


class CommandLineErrorsTest(absltest.TestCase):
  """Each user error: one line ``error: ...`` naming the culprit, status 2, nothing written."""

  def _assert_one_line(self, proc, pattern):
    self.assertEqual(proc.returncode, 2, proc.stderr[-3000:])
    last = proc.stderr.strip().splitlines()[-1]
    self.assertRegex(last, "^error: " + pattern)
    self.assertNotIn("Traceback", proc.stderr)

  def test_config_errors_before_jax(self):
    with tempfile.TemporaryDirectory() as d:
      w = os.path.join(d, "w")
      cases = [
          (("--config=configs/tiny.py:smoke", "--config.ppow.nope=1"),
           r"--config\.ppow\.nope: unknown key 'ppow\.nope'"),
          (("--config=configs/nope.py",), r"--config=configs/nope\.py: configs/nope\.py is not"),
          (("--config=configs/tiny.py:bad",), r"--config=configs/tiny\.py:bad: .*'bad'"),
          (("--config=configs/tiny.py", "--config.ppow.window=abc"),
           r"--config\.ppow\.window=abc: not a int"),
          (("--config=configs/tiny.py", "--config.target.num_heads=0"),
           r"config\.target\.num_heads=0: must be >= 1"),
          (("--config=configs/tiny.py", "--config.eval.batch_sizes=(0,)"),
           r"config\.eval\.batch_sizes=\(0,\): each entry must be >= 1"),
      ]
      for args, pattern in cases:
        with self.subTest(args=args):
          self._assert_one_line(_main(*args, f"--workdir={w}"), pattern)
      self.assertFalse(os.path.exists(w))  # nothing half-written

  def test_workdir_that_is_a_file(self):
    with tempfile.TemporaryDirectory() as d:
      w = os.path.join(d, "file")
      with open(w, "w") as f:
        f.write("x")
      self._assert_one_line(_main("--config=configs/tiny.py:smoke", f"--workdir={w}"),
                            r"--workdir .*/file: exists and is not a directory")
      w = os.path.join(d, "w")
      self._assert_one_line(_main("--config=configs/tiny.py:smoke", f"--workdir={w}",
                                  "--config.mesh.num_devices=4096"),
                            r"config\.mesh\.num_devices=4096: only \d+ devices are available")
      self.assertFalse(os.path.exists(w))


if __name__ == "__main__":
  absltest.main()
