"""The workdir: paths, the lock, the config history and the settings behind each artifact."""

import json
import os
import socket
import stat
import subprocess
import sys
import tempfile

from absl.testing import absltest
import jax

from ppow_jax import cli, layout, stages
from ppow_jax.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = os.path.join(ROOT, "configs", "tiny.py:smoke")


class LayoutTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.enterContext(jax.numpy_rank_promotion("raise"))
    self._tmp = tempfile.TemporaryDirectory()
    self.root = os.path.join(self._tmp.name, "w")
    self.paths = layout.Layout(self.root)

  def tearDown(self):
    self._tmp.cleanup()
    super().tearDown()

  def test_paths(self):
    p = self.paths
    self.assertEqual(p.export("target"), os.path.join(self.root, "target"))
    self.assertEqual(p.export("ppow"), os.path.join(self.root, "drafters", "ppow"))
    self.assertEqual(p.info("ppow"), os.path.join(self.root, "drafters", "ppow",
                                                  "ppow_stage_info.json"))
    self.assertEqual(p.metrics("ppow"), os.path.join(self.root, "tensorboard", "ppow",
                                                     "metrics.jsonl"))
    self.assertFalse(p.done("ppow"))

  def test_workdir_that_is_a_file_or_read_only(self):
    with open(self.root, "w") as f:
      f.write("x")
    with self.assertRaisesRegex(UserError, r"--workdir .*/w: exists and is not a directory"):
      self.paths.prepare()
    os.remove(self.root)
    os.makedirs(self.root)
    os.chmod(self.root, 0o555)
    try:
      if os.access(self.root, os.W_OK):
        self.skipTest("running as a user who can write anywhere (root)")
      with self.assertRaisesRegex(UserError, "not writable"):
        self.paths.prepare()
    finally:
      os.chmod(self.root, 0o755)

  def test_lock_refuses_a_live_holder_and_takes_over_a_stale_one(self):
    self.paths.prepare()
    with self.paths.lock():
      with open(self.paths.lock_file) as f:
        self.assertEqual(json.load(f)["pid"], os.getpid())
      with self.assertRaisesRegex(UserError, f"in use by process {os.getpid()} on "):
        with self.paths.lock():
          pass
    self.assertFalse(os.path.exists(self.paths.lock_file))
    # a holder that is gone: a finished child process
    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                           capture_output=True, text=True, check=True)
    with open(self.paths.lock_file, "w") as f:
      json.dump({"pid": int(child.stdout), "host": socket.gethostname()}, f)
    with self.paths.lock():
      with open(self.paths.lock_file) as f:
        self.assertEqual(json.load(f)["pid"], os.getpid())
    with self.paths.lock(primary=False):  # other hosts work under process 0's lock
      self.assertFalse(os.path.exists(self.paths.lock_file))

  def test_history_is_appended(self):
    self.paths.prepare()
    c = cli.load_config(SMOKE)
    self.paths.append_history(c, ["a"])
    c.ppow.steps = 9
    self.paths.append_history(c, ["b"])
    with open(self.paths.config_history) as f:
      rows = [json.loads(line) for line in f]
    self.assertEqual([r["argv"] for r in rows], [["a"], ["b"]])
    self.assertEqual([r["config"]["ppow"]["steps"] for r in rows], [3, 9])

  def test_differing_settings_are_named(self):
    c = cli.load_config(SMOKE)
    os.makedirs(self.paths.checkpoints("ppow"))
    cli.write_json(self.paths.settings_file("ppow"), stages.settings(c, "ppow"))
    self.paths.check_settings(c, ("target", "baseline", "ppow"))
    c.ppow.window, c.target.hidden_size = 4, 64
    with self.assertRaisesRegex(
        UserError, r"stage 'ppow' was made with other settings: ppow\.window \(3 -> 4\), "
        r"target\.hidden_size \(32 -> 64\); .*--retrain=ppow"):
      self.paths.check_settings(c, ("ppow",))
    # a finished stage's info wins over its checkpoints' record
    os.makedirs(self.paths.export("ppow"))
    cli.write_json(self.paths.info("ppow"), {"settings": stages.settings(c, "ppow")})
    self.paths.check_settings(c, ("ppow",))
    self.paths.discard("ppow")
    self.assertFalse(os.path.exists(self.paths.checkpoints("ppow")))
    self.assertFalse(os.path.exists(self.paths.export("ppow")))

  def test_leftovers_removed_and_exports_readable(self):
    tmp = os.path.join(self.root, "drafters", ".baseline.tmp-abc")
    keep = os.path.join(self.root, "drafters", "baseline")
    os.makedirs(tmp)
    os.makedirs(keep)
    self.paths.remove_leftovers()
    self.assertFalse(os.path.exists(tmp))
    self.assertTrue(os.path.isdir(keep))
    os.chmod(keep, 0o700)
    layout.make_readable(keep)
    self.assertEqual(stat.S_IMODE(os.stat(keep).st_mode), 0o755)


if __name__ == "__main__":
  absltest.main()
