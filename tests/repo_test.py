"""The repository stands alone: no file points outside it, and the code cites its own protocol."""

import ast
import importlib
import importlib.util
import os
import re
import subprocess
import sys
import tempfile

from absl.testing import absltest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROTOCOL = "docs/protocol.md"
# Modules whose docstrings define a quantity by the protocol; each must cite it.
CITING = ("ppow_jax/acceptance.py", "ppow_jax/engine.py", "ppow_jax/evaluate.py",
          "ppow_jax/rewards.py", "ppow_jax/rollout.py", "configs/common.py",
          "ppow_jax/data/prompts.py", "ppow_jax/bench/decode.py")
PROSE = ("README.md", "BENCHMARKS.md")  # plus docs/*.md
_SKIP_DIRS = {".git", ".venv", "workdir", "__pycache__", "build", "dist", ".pytest_cache"}

# Spelled in pieces so that this file does not match itself.
_OUTSIDE = re.compile("|".join([
    re.escape(".." + "/shared"),  # a sibling folder of the checkout
    re.escape("shared" + "/tools"),
    re.escape("shared" + "/PROTOCOL"),
    r"\b" + "PROTO" + r"COL\.md",  # the protocol is docs/protocol.md, lower case
    r"\b" + "REFER" + r"ENCES\.md",
    r"\b" + "ST" + r"YLE\.md",
    re.escape("/" + "work/"),  # a path on one development machine
]))
# Prose about the project's results, not about how its work was organised.
_ORGANISATION = re.compile(r"\b(" + "iss" + r"ues? #?\d+|#\d{1,4}\b|" + "mis" + r"sion\b|"
                           + "ses" + r"sion\b)", re.IGNORECASE)
_LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def repo_files(root: str = ROOT) -> list[str]:
  """Paths (relative to ``root``) of the files git tracks; every file if git is unavailable."""
  try:
    out = subprocess.run(["git", "ls-files", "-z"], cwd=root, capture_output=True, check=True)
    names = [n for n in out.stdout.decode().split("\0") if n]
    if names:
      return names
  except (OSError, subprocess.CalledProcessError):
    pass
  names = []
  for d, subdirs, files in os.walk(root):
    subdirs[:] = [s for s in subdirs if s not in _SKIP_DIRS and not s.endswith(".egg-info")]
    names += [os.path.relpath(os.path.join(d, f), root) for f in files]
  return names


def _read(root: str, name: str) -> str:
  with open(os.path.join(root, name), "rb") as f:
    return f.read().decode("utf-8", errors="replace")


def outside_references(root: str, names: list[str]) -> list[str]:
  """``file:line: text`` for every line that refers to something outside the repository."""
  hits = []
  for name in names:
    path = os.path.join(root, name)
    if not os.path.isfile(path):  # deleted in the work tree but still tracked
      continue
    for i, line in enumerate(_read(root, name).splitlines(), 1):
      if _OUTSIDE.search(line):
        hits.append(f"{name}:{i}: {line.strip()}")
  return hits


def prose_files(root: str) -> list[str]:
  docs = os.path.join(root, "docs")
  extra = sorted(f"docs/{f}" for f in os.listdir(docs) if f.endswith(".md")) if os.path.isdir(
      docs) else []
  return [p for p in PROSE if os.path.isfile(os.path.join(root, p))] + extra


def missing_module_attributes(paths: list[str]) -> list[str]:
  """``file:line: module.name`` for each ``alias.name`` in ``paths`` where ``alias`` is an
  imported project module that has no ``name``: what a refactor breaks in code paths that no
  test runs (a command's summary line, a branch that needs an external tool)."""
  bad = []
  for path in paths:
    with open(path) as f:
      tree = ast.parse(f.read())
    aliases = {}
    for node in ast.walk(tree):
      if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("ppow_jax"):
        for a in node.names:
          full = f"{node.module}.{a.name}"
          if importlib.util.find_spec(full.rsplit(".", 1)[0]) and _is_module(full):
            aliases[a.asname or a.name] = full
    for node in ast.walk(tree):
      if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
          and node.value.id in aliases):
        if not hasattr(importlib.import_module(aliases[node.value.id]), node.attr):
          bad.append(f"{os.path.relpath(path, ROOT)}:{node.lineno}: "
                     f"{aliases[node.value.id]}.{node.attr}")
  return bad


_IMPORT_EACH_FIRST = """
import importlib, pkgutil, sys
package, failed = sys.argv[1], []
names = [package] + [m.name for m in pkgutil.walk_packages(
    importlib.import_module(package).__path__, package + ".")]
for name in names:
  for loaded in [m for m in sys.modules if m == package or m.startswith(package + ".")]:
    del sys.modules[loaded]
  try:
    importlib.import_module(name)
  except Exception as e:
    failed.append(f"{name}: {type(e).__name__}: {e}")
print("\\n".join(failed))
"""


def modules_failing_first(package: str, root: str) -> list[str]:
  """``module: error`` for each module of ``package`` (under ``root``) that cannot be the first
  of the package imported: an import cycle that other modules hide when they load first. One
  interpreter; the package's modules are dropped before each import (third-party ones stay)."""
  out = subprocess.run([sys.executable, "-c", _IMPORT_EACH_FIRST, package], cwd=root,
                       capture_output=True, text=True, check=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": root})
  return [line for line in out.stdout.splitlines() if line]


def _is_module(name: str) -> bool:
  try:
    return importlib.util.find_spec(name) is not None
  except ModuleNotFoundError:
    return False


class RepoTest(absltest.TestCase):

  def test_every_module_attribute_used_exists(self):
    paths = [os.path.join(ROOT, f) for f in repo_files()
             if f.endswith(".py") and f.startswith(("ppow_jax/", "tests/"))]
    self.assertEmpty(missing_module_attributes(paths))
    broken = os.path.join(tempfile.mkdtemp(), "broken.py")
    with open(broken, "w") as f:
      f.write("from ppow_jax import timing\ntiming.machine_info()\ntiming.no_such_thing()\n")
    self.assertEqual([l.split(": ")[1] for l in missing_module_attributes([broken])],
                     ["ppow_jax.timing.no_such_thing"])

  def test_an_installed_package_holds_its_data_files(self):
    # a non-editable install (pip install .) copies only what setup.py names: the C++ kernels'
    # sources and the chat prompts must be there, or the kernels cannot be built
    data = [f for f in repo_files() if f.startswith("ppow_jax/") and not f.endswith(".py")]
    self.assertContainsSubset({"ppow_jax/cpu_gemv.cc", "ppow_jax/cpu_kernels.h"}, set(data))
    with tempfile.TemporaryDirectory() as tmp:
      proc = subprocess.run([sys.executable, "setup.py", "-q", "build_py", "--build-lib", tmp],
                            cwd=ROOT, capture_output=True, text=True)
      self.assertEqual(proc.returncode, 0, proc.stderr[-2000:])
      missing = [f for f in data if not os.path.isfile(os.path.join(tmp, f))]
    self.assertEqual(missing, [])

  def test_every_module_imports_first(self):
    self.assertEqual(modules_failing_first("ppow_jax", ROOT), [])
    # the check finds a cycle that only one import order hides
    with tempfile.TemporaryDirectory() as tmp:
      os.mkdir(os.path.join(tmp, "cyc"))
      for name, text in {"__init__.py": "", "a.py": "from cyc import b\ny = 1\n",
                         "b.py": "from cyc.a import y\n"}.items():
        with open(os.path.join(tmp, "cyc", name), "w") as f:
          f.write(text)
      self.assertEqual([line.split(":")[0] for line in modules_failing_first("cyc", tmp)],
                       ["cyc.a"])

  def test_no_file_refers_outside_the_repository(self):
    hits = outside_references(ROOT, repo_files())
    self.assertEqual(hits, [], "files refer to paths a user of the repository does not have")

  def test_the_check_finds_an_outside_reference(self):
    files = {"ok.py": "See docs/protocol.md.\n",
             "bad.md": "a\nsee [p](" + ".." + "/sha" + "red/x.md)\n",
             "bad.py": "# cite " + "PROTO" + "COL.md\n"}
    with tempfile.TemporaryDirectory() as tmp:
      for name, text in files.items():
        with open(os.path.join(tmp, name), "w") as f:
          f.write(text)
      hits = outside_references(tmp, list(files))
    self.assertEqual([h.split(": ")[0] for h in hits], ["bad.md:2", "bad.py:1"])

  def test_protocol_exists_and_is_cited(self):
    self.assertTrue(os.path.isfile(os.path.join(ROOT, PROTOCOL)), PROTOCOL)
    text = _read(ROOT, PROTOCOL)
    for term in ("τ", "α", "γ", "bonus", "speedup", "2605.14978", "2509.22134"):
      self.assertIn(term, text)
    uncited = [m for m in CITING if PROTOCOL not in _read(ROOT, m)]
    self.assertEqual(uncited, [], f"these modules do not cite {PROTOCOL}")
    self.assertIn(f"]({PROTOCOL})", _read(ROOT, "README.md"))

  def test_prose_speaks_of_the_project_only(self):
    hits = []
    for name in prose_files(ROOT):
      for i, line in enumerate(_read(ROOT, name).splitlines(), 1):
        m = _ORGANISATION.search(line)
        if m:
          hits.append(f"{name}:{i}: {m.group(0)!r}")
    self.assertEqual(hits, [])

  def test_relative_links_resolve(self):
    broken = []
    for name in prose_files(ROOT):
      for target in _LINK.findall(_read(ROOT, name)):
        if "://" in target or target.startswith("mailto:"):
          continue
        if not os.path.exists(os.path.join(ROOT, os.path.dirname(name), target)):
          broken.append(f"{name}: {target}")
    self.assertEqual(broken, [])


if __name__ == "__main__":
  absltest.main()
