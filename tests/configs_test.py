"""Every shipped config loads, validates, and says how to run it."""

import glob
import importlib.util
import os

from absl.testing import absltest, parameterized

from ppow_jax import config_lib
from ppow_jax.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "*.py")))
VARIANTS = {"default.py": (None, "smoke", "lm", "smoke,lm")}
REAL = (None, "tpu_v5p", "gpu_8xh100", "runlocal")


def _load(path):
  spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


class ShippedConfigsTest(parameterized.TestCase):

  def test_found_the_configs(self):
    names = {os.path.basename(p) for p in CONFIGS}
    self.assertLessEqual({"default.py", "llama31_8b_eagle3.py", "qwen3_8b_eagle3.py"}, names)

  @parameterized.parameters(*CONFIGS)
  def test_loads_and_validates(self, path):
    mod = _load(path)
    self.assertIn("python -m ppow_jax.main --config=configs/", mod.__doc__)
    for variant in VARIANTS.get(os.path.basename(path), REAL):
      c = mod.get_config(variant)
      config_lib.validate(c)
      # every key the library reads exists (a locked config refuses unknown keys)
      self.assertEqual(set(c.keys()), set(config_lib.base_config().keys()))
      c.lock()
      with self.assertRaises(AttributeError):
        c.ppow.no_such_knob = 1

  def test_real_configs_need_local_paths(self):
    c = _load(os.path.join(ROOT, "configs", "llama31_8b_eagle3.py")).get_config()
    with self.assertRaisesRegex(UserError, "config.target.hf_dir"):
      config_lib.check_runnable(c)

  def test_unknown_variant(self):
    with self.assertRaises(ValueError):
      _load(os.path.join(ROOT, "configs", "default.py")).get_config("nope")


if __name__ == "__main__":
  absltest.main()
