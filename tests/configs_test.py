"""Every shipped config loads without JAX, validates, says how to run it, and every one of its
settings is read by the library."""

import glob
import io
import os
import re
import subprocess
import sys
import tempfile
import tokenize

from absl.testing import absltest, parameterized
import jax

from ppow_jax import cli, rewards, rollout, settings, train_step
from ppow_jax.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(p for p in glob.glob(os.path.join(ROOT, "configs", "*.py"))
                 if os.path.basename(p) != "common.py")
VARIANTS = {"tiny.py": ("", "smoke", "lm", "smoke,lm", "smoke,sharded"), "default.py": ("", "quick")}
REAL = ("", "tpu_v5p", "gpu_8xh100", "runlocal")
# Nodes read through a typed view (``settings.view``: its fields) or by a function's knobs
# (``settings.knobs``: its keyword-only parameters without a default).
VIEWS = {"ppow": (rollout.PPOWConfig, rewards.total_reward),
         "baseline": (train_step.BaselineConfig,), "*.optim": (train_step.OptimConfig,)}


def _view_keys(reader) -> set:
  if isinstance(reader, type):
    return {f.name for f in reader.__dataclass_fields__.values()}
  return set(settings.knob_names(reader))


def _specs():
  return [f"{p}:{v}" if v else p for p in CONFIGS
          for v in VARIANTS.get(os.path.basename(p), REAL)]


def _leaves(node, prefix=""):
  for k, v in node.items():
    if hasattr(v, "items"):
      yield from _leaves(v, f"{prefix}{k}.")
    else:
      yield f"{prefix}{k}"


def _code_without_strings(path: str) -> str:
  """The file's code with string literals and comments blanked: a key named in a message or
  in a rule table is not a read."""
  with open(path, encoding="utf-8") as f:
    src = f.read()
  out = []
  for tok in tokenize.generate_tokens(io.StringIO(src).readline):
    if tok.type in (tokenize.STRING, tokenize.COMMENT) or tok.type == getattr(
        tokenize, "FSTRING_MIDDLE", -1):
      out.append(" ")
    else:
      out.append(tok.string + (" " if tok.type == tokenize.NAME else ""))
  return "".join(out).replace(" .", ".").replace(". ", ".")


def _library_code() -> dict:
  files = glob.glob(os.path.join(ROOT, "ppow_jax", "**", "*.py"), recursive=True)
  return {p: _code_without_strings(p) for p in files}


def _is_read(key: str, code: dict) -> bool:
  parts = key.split(".")
  for pattern, readers in VIEWS.items():
    if re.fullmatch(pattern.replace(".", r"\.").replace("*", r"\w+"), ".".join(parts[:-1])):
      if any(parts[-1] in _view_keys(reader) for reader in readers):
        return True
  direct = re.compile(r"\b\w+\." + re.escape(key) + r"\b")
  for text in code.values():
    if direct.search(text):
      return True
    for i in range(1, len(parts)):  # ``d = c.drafter`` ... ``d.kind``
      prefix, rest = ".".join(parts[:i]), ".".join(parts[i:])
      for alias in re.findall(r"\b(\w+) ?= ?\w+\." + re.escape(prefix) + r"\b(?!\.)", text):
        if re.search(r"\b" + alias + r"\." + re.escape(rest) + r"\b", text):
          return True
  return False


class ShippedConfigsTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    self.enterContext(jax.numpy_rank_promotion("raise"))

  def test_found_the_configs(self):
    names = {os.path.basename(p) for p in CONFIGS}
    self.assertLessEqual({"default.py", "tiny.py", "llama31_8b_eagle3.py", "qwen3_8b_eagle3.py"},
                         names)

  def test_loading_every_config_imports_no_jax(self):
    code = ("import sys\nfrom ppow_jax import cli\n"
            f"for spec in {_specs()!r}:\n  cli.load_config(spec)\n"
            "assert 'jax' not in sys.modules, sorted(m for m in sys.modules if 'jax' in m)\n"
            "print('loaded', len(" + repr(_specs()) + "))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)
    self.assertEqual(proc.returncode, 0, proc.stderr)
    self.assertIn(f"loaded {len(_specs())}", proc.stdout)

  @parameterized.parameters(*_specs())
  def test_loads_and_validates(self, spec):
    c = cli.load_config(spec)
    settings.validate(c)
    with open(spec.split(":")[0]) as f:
      self.assertIn("python -m ppow_jax.main --config=configs/", f.read())
    with self.assertRaises(AttributeError):  # locked: a typo is an error
      c.ppow.no_such_knob = 1

  def test_every_setting_is_read_by_the_library(self):
    code = _library_code()
    keys = sorted({k for spec in _specs() for k in _leaves(cli.load_config(spec))})
    self.assertIn("ppow.window", keys)
    unread = [k for k in keys if not _is_read(k, code)]
    self.assertEqual(unread, [], "config keys that no library code reads")

  def test_the_unread_check_can_fail(self):
    code = _library_code()
    self.assertTrue(_is_read("data.seq_len", code))  # c.data.seq_len
    self.assertTrue(_is_read("drafter.kind", code))  # d = c.drafter; d.kind
    self.assertTrue(_is_read("ppow.clip_eps", code))  # the PPOWConfig view
    self.assertTrue(_is_read("ppow.prox_eta", code))  # a knob of rewards.total_reward
    self.assertFalse(_is_read("data.no_such_knob", code))
    self.assertFalse(_is_read("ppow.no_such_knob", code))
    # a key named only in a message or a rule table is not read
    with tempfile.TemporaryDirectory() as d:
      said, read = os.path.join(d, "said.py"), os.path.join(d, "read.py")
      with open(said, "w") as f:
        f.write('print(f"config.x.y={1}")  # c.x.y\n')
      with open(read, "w") as f:
        f.write("def f(c):\n  n = c.x\n  return n.y\n")
      self.assertFalse(_is_read("x.y", {said: _code_without_strings(said)}))
      self.assertTrue(_is_read("x.y", {read: _code_without_strings(read)}))

  def test_real_configs_need_local_paths(self):
    c = cli.load_config(os.path.join(ROOT, "configs", "llama31_8b_eagle3.py"))
    with self.assertRaisesRegex(UserError, "config.target.hf_dir"):
      settings.check_runnable(c)

  def test_unknown_variant_names_the_known_ones(self):
    with self.assertRaisesRegex(UserError, r"tiny.py:nope: .*'nope'.*\['lm', 'sharded', 'smoke'\]"):
      cli.load_config(os.path.join(ROOT, "configs", "tiny.py:nope"))


class OverridesTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.enterContext(jax.numpy_rank_promotion("raise"))
    self.path = os.path.join(ROOT, "configs", "tiny.py")

  def test_values_are_typed_like_the_default(self):
    c = cli.load_config(self.path, [("ppow.steps", "7"), ("ppow.gamma", "1"),
                                    ("eval.batch_sizes", "(2, 4)"), ("data.corpus", "/x"),
                                    ("continued.enabled", "false"),
                                    ("eval.temperatures", "0")])
    self.assertEqual((c.ppow.steps, c.ppow.gamma, c.eval.batch_sizes, c.data.corpus),
                     (7, 1.0, (2, 4), "/x"))
    self.assertIsInstance(c.ppow.gamma, float)
    self.assertFalse(c.continued.enabled)
    self.assertEqual(c.eval.temperatures, (0,))

  def test_unknown_key_names_its_full_path(self):
    with self.assertRaisesRegex(UserError, r"^--config\.ppow\.nope: unknown key 'ppow\.nope' "
                                           r"\(keys of ppow: .*window"):
      cli.load_config(self.path, [("ppow.nope", "1")])
    with self.assertRaisesRegex(UserError, r"unknown key 'ppow\.optim\.lr' \(keys of ppow\.optim:"):
      cli.load_config(self.path, [("ppow.optim.lr", "1")])

  def test_bad_values_name_key_and_value(self):
    with self.assertRaisesRegex(UserError, r"--config\.ppow\.window=abc: not a int"):
      cli.load_config(self.path, [("ppow.window", "abc")])
    with self.assertRaisesRegex(UserError, r"--config\.ppow\.window=1\.5: expected a int"):
      cli.load_config(self.path, [("ppow.window", "1.5")])
    with self.assertRaisesRegex(UserError, r"--config\.ppow: a group of settings"):
      cli.load_config(self.path, [("ppow", "1")])

  def test_missing_or_broken_file(self):
    with self.assertRaisesRegex(UserError, r"configs/nope\.py is not a file"):
      cli.load_config("configs/nope.py")
    with tempfile.TemporaryDirectory() as d:
      broken = os.path.join(d, "broken.py")
      with open(broken, "w") as f:
        f.write("def get_config(arg=None):\n  return 1/0\n")
      with self.assertRaisesRegex(UserError, r"broken\.py: ZeroDivisionError"):
        cli.load_config(broken)


if __name__ == "__main__":
  absltest.main()
