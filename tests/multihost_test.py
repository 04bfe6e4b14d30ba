"""Two processes x 4 CPU devices train, checkpoint, die, resume and decode like one process of 8.

The two-process job is killed (SIGKILL) in PPOW after its step-2 checkpoint and rerun: the
resumed job's drafter and its sampled decoding equal an uninterrupted one-process run's (a
one-process kill -9 resume is bit-identical: tests/main_e2e_test.py).

Each run is tests/multihost_worker.py, started with the environment and command line that
``launch/local_multiprocess.sh`` gives each process (read from its DRY_RUN=1 output, so the
launcher is the one source of them). The processes join through a coordinator on 127.0.0.1 and
their CPU devices talk through gloo; the mesh is data 2 x fsdp 2 x tensor 2 either way.
"""

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time

# the launcher keeps these beside its own device count (tests are compile-bound)
os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from absl.testing import absltest
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCHER = os.path.join(REPO, "launch", "local_multiprocess.sh")
WORKER = os.path.join(REPO, "tests", "multihost_worker.py")
TIMEOUT = 600  # seconds for one job (all of its processes): catches a hang


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _commands(processes: int, devices: int) -> list[list[str]]:
  """The launcher's command of each process, running the worker instead of ppow_jax.main."""
  env = dict(os.environ, DRY_RUN="1", PYTHON=sys.executable, PORT=str(_free_port()),
             DEVICES_PER_PROCESS=str(devices))
  out = subprocess.run(["bash", LAUNCHER, str(processes)], env=env, capture_output=True,
                       text=True, check=True, timeout=30).stdout
  commands = [shlex.split(line) for line in out.splitlines()]
  assert len(commands) == processes, out
  for argv in commands:
    i = argv.index("-m")
    assert argv[i:] == ["-m", "ppow_jax.main"], argv
    argv[i:] = [WORKER]
  return commands


class MultiHostTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.tmp = tempfile.TemporaryDirectory()
    cls.procs: list[subprocess.Popen] = []
    cls.timings = {}

  @classmethod
  def tearDownClass(cls):
    cls._kill_all()
    print(f"multihost job timings: {cls.timings}", file=sys.stderr)
    cls.tmp.cleanup()
    super().tearDownClass()

  @classmethod
  def _kill_all(cls):
    for p in cls.procs:
      if p.poll() is None:
        os.killpg(p.pid, signal.SIGKILL)  # each process leads its own group
        p.wait()
    cls.procs = []

  @classmethod
  def _job(cls, name: str, phase: str, processes: int, out_dir: str) -> list[int]:
    """Runs every process of one job; their exit statuses (a hung job fails the test)."""
    os.makedirs(out_dir, exist_ok=True)
    start, procs = time.perf_counter(), []
    for i, argv in enumerate(_commands(processes, 8 // processes)):
      first = next(j for j, a in enumerate(argv) if j and "=" not in a)  # after env's VAR=...
      env = dict(os.environ)
      env.update(a.split("=", 1) for a in argv[1:first])
      log = open(os.path.join(out_dir, f"{phase}_{i}.log"), "w")
      procs.append(subprocess.Popen(argv[first:] + [phase, out_dir], env=env, stdout=log,
                                    stderr=subprocess.STDOUT, cwd=REPO,
                                    start_new_session=True))
      cls.procs.append(procs[-1])
    deadline = time.time() + TIMEOUT
    for p in procs:
      try:
        p.wait(timeout=max(deadline - time.time(), 1))
      except subprocess.TimeoutExpired:
        cls._kill_all()
        raise AssertionError(f"{name}: no end after {TIMEOUT} s; logs in {out_dir}") from None
    cls.timings[name] = round(time.perf_counter() - start, 1)
    return [p.returncode for p in procs]

  def _result(self, out_dir: str) -> tuple[dict, dict]:
    with open(os.path.join(out_dir, "result.json")) as f:
      info = json.load(f)
    with np.load(os.path.join(out_dir, "result.npz")) as z:
      return info, dict(z)

  def _log(self, out_dir: str) -> str:
    logs = sorted(f for f in os.listdir(out_dir) if f.endswith(".log"))
    return "\n".join(f"--- {f}\n" + open(os.path.join(out_dir, f)).read()[-3000:] for f in logs)

  def test_two_processes_train_resume_and_decode_like_one(self):
    one, two = os.path.join(self.tmp.name, "one"), os.path.join(self.tmp.name, "two")
    codes = self._job("1 process x 8 devices", "full", 1, one)
    self.assertEqual(codes, [0], self._log(one))
    codes = self._job("2 processes x 4 devices, killed in PPOW", "kill", 2, two)
    self.assertEqual(codes, [-signal.SIGKILL] * 2, self._log(two))
    self.assertFalse(os.path.exists(os.path.join(two, "result.json")))
    codes = self._job("2 processes x 4 devices, resumed", "resume", 2, two)
    self.assertEqual(codes, [0, 0], self._log(two))
    with open(os.path.join(two, "resume_0.log")) as f:
      self.assertIn("[ppow] resumed from step 2", f.read())  # not trained again from scratch

    info_one, params_one = self._result(one)
    info_two, params_two = self._result(two)
    self.assertEqual((info_one["processes"], info_two["processes"]), (1, 2))
    self.assertEqual(info_one["devices"], info_two["devices"])
    self.assertEqual(sorted(params_two), sorted(params_one))
    for key, want in params_one.items():
      scale = float(np.abs(want).max())
      np.testing.assert_allclose(params_two[key], want, rtol=1e-5, atol=1e-7 * scale,
                                 err_msg=key)
    self.assertEqual(info_two["decoded"], info_one["decoded"])  # tokens, τ, α by position
    self.assertGreater(info_one["decoded"]["accepted"], 0)

if __name__ == "__main__":
  absltest.main()
