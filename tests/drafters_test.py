"""Drafter directories are checked before any loader reads them: one UserError naming the file."""

import json
import os
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")

from absl import flags
from absl.testing import absltest, flagsaver
import jax
import numpy as np
from safetensors.numpy import save_file

from ppow_jax import drafters, generate
from ppow_jax.data import tokenizer as tokenizer_lib
from ppow_jax.errors import UserError

FLAGS = flags.FLAGS


class CheckDrafterDirTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.enterContext(jax.numpy_rank_promotion("raise"))
    self._tmp = tempfile.TemporaryDirectory()
    self.dir = self._tmp.name
    self._write("config.json", json.dumps({"architectures": ["LlamaForCausalLMEagle3"]}))
    save_file({"w": np.arange(12, dtype=np.float32).reshape(3, 4)},
              os.path.join(self.dir, "model.safetensors"))

  def tearDown(self):
    self._tmp.cleanup()
    super().tearDown()

  def _write(self, name: str, text: str) -> str:
    path = os.path.join(self.dir, name)
    with open(path, "w") as f:
      f.write(text)
    return path

  def test_a_good_directory_passes(self):
    self.assertEqual(drafters.check_drafter_dir(self.dir)["architectures"],
                     ["LlamaForCausalLMEagle3"])

  def test_config_that_is_not_json_or_not_an_object(self):
    self._write("config.json", "{not json")
    with self.assertRaisesRegex(UserError, r"config\.json: not valid JSON"):
      drafters.load(self.dir, target_cfg=None)
    self._write("config.json", "[1, 2]")
    with self.assertRaisesRegex(UserError, r"config\.json: config\.json must be a JSON object, "
                                           r"got a list"):
      drafters.load(self.dir, target_cfg=None)

  def test_truncated_safetensors(self):
    path = os.path.join(self.dir, "model.safetensors")
    with open(path, "rb") as f:
      data = f.read()
    with open(path, "wb") as f:
      f.write(data[:-8])  # the last two floats are gone
    with self.assertRaisesRegex(UserError, r"model\.safetensors: truncated \(\d+ bytes; its "
                                           r"header needs \d+\)"):
      drafters.check_drafter_dir(self.dir)
    with open(path, "wb") as f:
      f.write(data[:5])
    with self.assertRaisesRegex(UserError, "not a readable safetensors file"):
      drafters.check_drafter_dir(self.dir)

  def test_index_without_weight_map_or_with_a_missing_file(self):
    os.remove(os.path.join(self.dir, "model.safetensors"))
    self._write("model.safetensors.index.json", json.dumps({"metadata": {}}))
    with self.assertRaisesRegex(UserError, r"index\.json: no weight_map"):
      drafters.check_drafter_dir(self.dir)
    self._write("model.safetensors.index.json",
                json.dumps({"weight_map": {"w": "model-00001-of-00001.safetensors"}}))
    with self.assertRaisesRegex(UserError, r"lists model-00001-of-00001\.safetensors, which "
                                           r"does not exist"):
      drafters.check_drafter_dir(self.dir)


class GeneratePromptTest(absltest.TestCase):

  def test_an_empty_prompt_is_a_user_error(self):
    with tempfile.TemporaryDirectory() as d:
      tok = tokenizer_lib.train_bpe(["def f(x):\n  return x\n"] * 4, 270)
      tokenizer_lib.save(tok, d)
      if not FLAGS.is_parsed():
        FLAGS.mark_as_parsed()
      with flagsaver.flagsaver(prompt="", prompt_ids=None):
        with self.assertRaisesRegex(UserError, "--prompt is empty"):
          generate._prompt_ids(d)
      with flagsaver.flagsaver(prompt="def", prompt_ids=None):
        self.assertNotEmpty(generate._prompt_ids(d))


if __name__ == "__main__":
  absltest.main()
