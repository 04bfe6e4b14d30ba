"""Bad checkpoints and bad exports raise UserError naming the file or key; saves are atomic."""

import json
import os
import shutil
import tempfile
from unittest import mock

os.environ.setdefault("JAX_PLATFORMS", "cpu")

from absl.testing import absltest
import jax
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from ppow_jax.errors import UserError
from ppow_jax.models import hf
from ppow_jax.models import llama

_CFG = llama.ModelConfig(vocab_size=32, hidden_size=16, intermediate_size=24, num_layers=1,
                         num_heads=2, num_kv_heads=1)
_Q = "model.layers.0.self_attn.q_proj.weight"


def _contents(d: str) -> dict[str, bytes]:
  out = {}
  for name in os.listdir(d):
    with open(os.path.join(d, name), "rb") as f:
      out[name] = f.read()
  return out


class HfErrorsTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls._root = tempfile.mkdtemp()
    # Shapes by tracing only (running init eagerly costs seconds); values from numpy.
    shapes = jax.eval_shape(lambda: llama.init_params(_CFG, jax.random.PRNGKey(0)))
    rng = np.random.default_rng(0)
    cls.params = jax.tree_util.tree_map(
        lambda s: rng.normal(size=s.shape).astype(np.float32), shapes)
    cls.base = os.path.join(cls._root, "base")
    hf.save(cls.base, _CFG, cls.params)

  @classmethod
  def tearDownClass(cls):
    shutil.rmtree(cls._root, ignore_errors=True)
    super().tearDownClass()

  def _tmpdir(self) -> str:
    d = tempfile.mkdtemp()
    self.addCleanup(shutil.rmtree, d, ignore_errors=True)
    return d

  def _copy(self) -> str:
    """A fresh valid checkpoint directory to break."""
    d = os.path.join(self._tmpdir(), "model")
    shutil.copytree(self.base, d)
    return d

  def _edit_config(self, d: str, **changes) -> None:
    path = os.path.join(d, hf.CONFIG)
    with open(path) as f:
      raw = json.load(f)
    raw.update(changes)
    with open(path, "w") as f:
      json.dump(raw, f)

  def _edit_tensors(self, d: str, edit) -> None:
    path = os.path.join(d, hf.WEIGHTS)
    with safe_open(path, framework="numpy") as f:
      tensors = {k: f.get_tensor(k) for k in f.keys()}
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})

  def _raises(self, fn, *needles: str) -> str:
    with self.assertRaises(UserError) as ctx:
      fn()
    msg = str(ctx.exception)
    for needle in needles:
      self.assertIn(needle, msg)
    return msg

  # ---------------------------------------------------------------- load

  def test_valid_checkpoint_loads(self):
    model, params = hf.load(self.base)
    self.assertEqual(model.cfg, _CFG)
    jax.tree_util.tree_map(np.testing.assert_array_equal, params, self.params)

  def test_missing_directory(self):
    d = os.path.join(self._root, "nope")
    self._raises(lambda: hf.load(d), d)

  def test_missing_config(self):
    d = self._copy()
    os.remove(os.path.join(d, hf.CONFIG))
    self._raises(lambda: hf.load(d), os.path.join(d, "config.json"))

  def test_invalid_json_config(self):
    d = self._copy()
    with open(os.path.join(d, hf.CONFIG), "w") as f:
      f.write("{not json")
    self._raises(lambda: hf.load_config(d), "config.json", "JSON")

  def test_missing_safetensors(self):
    d = self._copy()
    os.remove(os.path.join(d, hf.WEIGHTS))
    self._raises(lambda: hf.load(d), "model.safetensors")

  def test_corrupt_safetensors(self):
    d = self._copy()
    with open(os.path.join(d, hf.WEIGHTS), "wb") as f:
      f.write(b"garbage")
    self._raises(lambda: hf.load(d), os.path.join(d, hf.WEIGHTS))

  def test_unsupported_architecture(self):
    d = self._copy()
    self._edit_config(d, architectures=["GPT2LMHeadModel"])
    self._raises(lambda: hf.load(d), "config.json", "GPT2LMHeadModel")

  def test_remote_code(self):
    d = self._copy()
    self._edit_config(d, auto_map={"AutoModelForCausalLM": "modeling_x.XForCausalLM"})
    self._raises(lambda: hf.load(d), "config.json", "remote code", "auto_map")

  def test_transformers_v4_config_keys(self):
    """Configs written by transformers v4: rope keys at the top level, no layer_types."""
    d = self._copy()
    llama3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
              "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    self._edit_config(d, rope_parameters=None, rope_theta=5e5, rope_scaling=llama3)
    cfg = hf.load_config(d)
    self.assertEqual((cfg.rope_theta, cfg.rope_scaling), (5e5, llama.RopeScaling()))
    self._edit_config(d, architectures=["Qwen3ForCausalLM"], head_dim=None, rope_scaling=None,
                      use_sliding_window=False, sliding_window=4096, layer_types=None)
    cfg = hf.load_config(d)
    self.assertEqual((cfg.resolved_head_dim, cfg.sliding_window, cfg.qk_norm), (128, 0, True))
    self.assertIsNone(cfg.rope_scaling)

  def test_unsupported_rope_type(self):
    d = self._copy()
    self._edit_config(d, rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0})
    self._raises(lambda: hf.load_config(d), "config.json", "'yarn'")

  def test_llama_attention_bias_refused(self):
    d = self._copy()
    self._edit_config(d, attention_bias=True)
    self._raises(lambda: hf.load_config(d), "config.json", "attention_bias")

  def test_per_layer_sliding_window_refused(self):
    d = self._copy()
    self._edit_config(d, architectures=["Qwen2ForCausalLM"], num_hidden_layers=2,
                      use_sliding_window=True, sliding_window=8,
                      layer_types=["full_attention", "sliding_attention"])
    self._raises(lambda: hf.load_config(d), "config.json", "layer_types")

  def test_bad_dtype(self):
    self._raises(lambda: hf.load(self.base, dtype="float8"), "dtype='float8'")

  def test_shape_mismatch(self):
    d = self._copy()
    self._edit_tensors(d, lambda t: t.update({_Q: np.zeros((8, 16), np.float32)}))
    self._raises(lambda: hf.load(d), hf.WEIGHTS, _Q, "[8, 16]", "[16, 16]")

  def test_missing_tensor(self):
    d = self._copy()
    self._edit_tensors(d, lambda t: t.pop("lm_head.weight"))
    self._raises(lambda: hf.load(d), "'lm_head.weight'")

  def test_extra_tensor(self):
    d = self._copy()
    key = "model.layers.0.self_attn.o_proj.bias"
    self._edit_tensors(d, lambda t: t.update({key: np.zeros((16,), np.float32)}))
    self._raises(lambda: hf.load(d), key)

  def test_ignores_rotary_inv_freq(self):
    d = self._copy()
    key = "model.layers.0.self_attn.rotary_emb.inv_freq"
    self._edit_tensors(d, lambda t: t.update({key: np.ones((4,), np.float32)}))
    hf.load(d)

  def test_sharded_index(self):
    d = self._copy()
    path = os.path.join(d, hf.WEIGHTS)
    with safe_open(path, framework="numpy") as f:
      tensors = {k: f.get_tensor(k) for k in f.keys()}
    os.remove(path)
    keys = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": keys[:4],
              "model-00002-of-00002.safetensors": keys[4:]}
    for name, names in shards.items():
      save_file({k: tensors[k] for k in names}, os.path.join(d, name), metadata={"format": "pt"})
    with open(os.path.join(d, hf.INDEX), "w") as f:
      json.dump({"weight_map": {k: n for n, ks in shards.items() for k in ks}}, f)
    _, params = hf.load(d)
    jax.tree_util.tree_map(np.testing.assert_array_equal, params, self.params)

    os.remove(os.path.join(d, "model-00002-of-00002.safetensors"))
    self._raises(lambda: hf.load(d), "model-00002-of-00002.safetensors", hf.INDEX)

  # ---------------------------------------------------------------- save

  def test_save_bad_shape_writes_nothing(self):
    parent = self._tmpdir()
    target = os.path.join(parent, "out")
    params = jax.tree_util.tree_map(lambda x: x, self.params)
    params["layers_0"]["mlp"]["up_proj"] = np.zeros((16, 7), np.float32)
    self._raises(lambda: hf.save(target, _CFG, params), "layers_0/mlp/up_proj", "[16, 7]")
    self.assertEqual(os.listdir(parent), [])

  def test_save_into_empty_dir(self):
    d = self._tmpdir()
    hf.save(d, _CFG, self.params)
    self.assertEqual(hf.load_config(d), _CFG)

  def test_save_missing_and_extra_params(self):
    target = os.path.join(self._root, "never")
    params = dict(self.params)
    params.pop("lm_head")
    self._raises(lambda: hf.save(target, _CFG, params), "lm_head")
    params = {**self.params, "bogus": np.zeros(3)}
    self._raises(lambda: hf.save(target, _CFG, params), "bogus")
    self.assertFalse(os.path.exists(target))

  def test_save_incompatible_architecture(self):
    cfg = llama.ModelConfig(**{**_CFG.__dict__, "qkv_bias": True})
    self._raises(lambda: hf.save(os.path.join(self._root, "x"), cfg, self.params),
                 "LlamaForCausalLM", "Qwen2ForCausalLM")

  def test_save_refuses_nonempty_dir_then_overwrites_keeping_tokenizer(self):
    d = self._copy()
    with open(os.path.join(d, "tokenizer.json"), "w") as f:
      f.write("{}")
    self._raises(lambda: hf.save(d, _CFG, self.params), d, "overwrite")
    hf.save(d, _CFG, self.params, overwrite=True)
    self.assertCountEqual(os.listdir(d), [hf.CONFIG, hf.WEIGHTS, "tokenizer.json"])
    self.assertEqual(os.listdir(os.path.dirname(d)), ["model"])  # no temp dirs left

  def test_failed_write_changes_nothing(self):
    d = self._copy()
    before = _contents(d)
    with mock.patch.object(hf, "save_file", side_effect=OSError("disk full")):
      self._raises(lambda: hf.save(d, _CFG, self.params, overwrite=True), d, "disk full")
    self.assertEqual(_contents(d), before)
    self.assertEqual(os.listdir(os.path.dirname(d)), ["model"])

  # ---------------------------------------------------------------- tokenizer, ids, vocab

  def test_missing_tokenizer(self):
    self._raises(lambda: hf.load_tokenizer(self.base), "tokenizer.json")

  def test_tokenizer_loads(self):
    import tokenizers
    d = self._copy()
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({"a": 0, "[UNK]": 1}, "[UNK]"))
    tok.save(os.path.join(d, "tokenizer.json"))
    self.assertEqual(hf.load_tokenizer(d).get_vocab_size(), 2)

  def test_generation_info(self):
    d = self._copy()
    self._edit_config(d, bos_token_id=1, eos_token_id=2)
    self.assertEqual(hf.read_generation_info(d), hf.GenerationInfo(1, (2,), None))
    with open(os.path.join(d, "generation_config.json"), "w") as f:
      json.dump({"eos_token_id": [2, 7], "pad_token_id": 0}, f)
    self.assertEqual(hf.read_generation_info(d), hf.GenerationInfo(1, (2, 7), 0))
    with open(os.path.join(d, "generation_config.json"), "w") as f:
      json.dump({"eos_token_id": "x"}, f)
    self._raises(lambda: hf.read_generation_info(d), "generation_config.json", "eos_token_id")

  def test_check_same_vocab(self):
    other = llama.ModelConfig(**{**_CFG.__dict__, "vocab_size": 64})
    hf.check_same_vocab(_CFG, _CFG, "engine")
    self._raises(lambda: hf.check_same_vocab(_CFG, other, "engine"), "engine", "32", "64")


if __name__ == "__main__":
  absltest.main()
