"""Memory plan from abstract shapes, presets, and every shipped config (no devices needed)."""

import json
import os
import subprocess
import sys
import tempfile

from absl.testing import absltest, parameterized
import jax

from ppow_jax import cli, drafter_stages, settings, sharding
from ppow_jax.errors import UserError
from ppow_jax.models import eagle3, hf, presets
from ppow_jax.tools import memory_plan

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = ("llama31_8b_eagle3", "llama33_70b_eagle3")
LLAMA31_8B_PARAMS = 8_030_261_248
KEYS = ("target_param_bytes_per_device", "drafter_param_bytes_per_device",
        "opt_state_bytes_per_device", "kv_cache_bytes_per_device",
        "activation_bytes_per_device", "total_bytes_per_device", "num_devices", "mesh_shape")

# The published config.json files (trimmed to the keys hf.load_config reads).
HF_CONFIGS = {
    "llama3.1-8b": {
        "architectures": ["LlamaForCausalLM"], "hidden_act": "silu", "hidden_size": 4096,
        "intermediate_size": 14336, "max_position_embeddings": 131072, "num_attention_heads": 32,
        "num_hidden_layers": 32, "num_key_value_heads": 8, "rms_norm_eps": 1e-05,
        "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        "rope_theta": 500000.0, "tie_word_embeddings": False, "vocab_size": 128256},
    "qwen3-8b": {
        "architectures": ["Qwen3ForCausalLM"], "head_dim": 128, "hidden_act": "silu",
        "hidden_size": 4096, "intermediate_size": 12288, "max_position_embeddings": 40960,
        "max_window_layers": 36, "num_attention_heads": 32, "num_hidden_layers": 36,
        "num_key_value_heads": 8, "rms_norm_eps": 1e-06, "rope_scaling": None,
        "rope_theta": 1000000, "sliding_window": None, "tie_word_embeddings": False,
        "use_sliding_window": False, "vocab_size": 151936},
}


TINY = presets.get_preset("tiny")
TINY_NAMES = sharding.logical_names(sharding.abstract_params(TINY)) | sharding.logical_names(
    sharding.abstract_params(eagle3.Eagle3Config.from_target(TINY, 128)))


def _config(name: str, arg: str = "tpu_v5p"):
  return cli.load_config(os.path.join(REPO, "configs", f"{name}.py:{arg}"))


class PresetsTest(parameterized.TestCase):

  @parameterized.parameters(*HF_CONFIGS)
  def test_preset_equals_the_published_config(self, name):
    with tempfile.TemporaryDirectory() as d:
      with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(HF_CONFIGS[name], f)
      self.assertEqual(hf.load_config(d), presets.get_preset(name))

  def test_unknown_preset_lists_the_names(self):
    with self.assertRaisesRegex(UserError, r"'llama-9b'.*llama3\.1-8b.*tiny"):
      presets.get_preset("llama-9b")


class ShippedConfigsTest(parameterized.TestCase):

  @parameterized.product(name=CONFIGS, arg=("tpu_v5p", "gpu_8xh100", "runlocal"))
  def test_config_loads_and_its_meshes_divide_the_model(self, name, arg):
    config = _config(name, arg)
    target = settings.target_arch(config)
    drafter = settings.drafter_arch(config, target)
    sharding.rules_from_config(config, TINY_NAMES)
    counts = {"tpu_v5p": (8, 16, 32) if "70b" in name else (4, 8, 16),
              "gpu_8xh100": (8, 16, 32), "runlocal": (1, 2)}[arg]
    for n in counts:
      shape = sharding.mesh_shape(config.mesh, n)
      self.assertEqual(shape["data"] * shape["fsdp"] * shape["tensor"], n)
      for dim in (target.num_kv_heads, target.num_heads, target.intermediate_size,
                  target.vocab_size, drafter.draft_vocab_size):
        self.assertEqual(dim % shape["tensor"], 0, f"{dim} over tensor {shape['tensor']}")
      for batch in (config.ppow.batch_size, config.baseline.batch_size):
        self.assertEqual(batch % (shape["data"] * shape["fsdp"]), 0)


class MemoryPlanTest(absltest.TestCase):

  def test_llama31_8b_on_v5p_8(self):
    out = memory_plan.plan(_config("llama31_8b_eagle3"), num_devices=4)
    self.assertEqual(out["target_params"], LLAMA31_8B_PARAMS)
    self.assertEqual(out["mesh_shape"], {"data": 1, "fsdp": 1, "tensor": 4})
    want = LLAMA31_8B_PARAMS * 2 / 4  # bf16 over 4 tensor shards
    self.assertLess(abs(out["target_param_bytes_per_device"] / want - 1), 0.1)
    # AdamW: two float32 moments shaped like the (float32) drafter, plus the step count.
    self.assertEqual(out["opt_state_bytes_per_device"],
                     2 * out["drafter_param_bytes_per_device"] + 4)
    self.assertEqual(out["total_bytes_per_device"], sum(out[k] for k in KEYS[:5]))
    self.assertLess(out["total_bytes_per_device"], 0.75 * 95 * 2**30)  # fits a v5p chip

  def test_cli_prints_one_json_line(self):
    proc = subprocess.run(
        [sys.executable, "-m", "ppow_jax.tools.memory_plan",
         "--config=configs/llama31_8b_eagle3.py:tpu_v5p", "--num_devices=4"],
        capture_output=True, text=True, cwd=REPO, timeout=120,
        env={**os.environ, "JAX_PLATFORMS": "cpu"})
    self.assertEqual(proc.returncode, 0, proc.stderr)
    lines = proc.stdout.strip().splitlines()
    self.assertLen(lines, 1)
    out = json.loads(lines[0])
    for key in KEYS:
      self.assertIn(key, out)
    self.assertEqual(out["num_devices"], 4)
    self.assertEqual(out["mesh_shape"], {"data": 1, "fsdp": 1, "tensor": 4})
    self.assertLess(abs(out["target_param_bytes_per_device"] / (LLAMA31_8B_PARAMS / 2) - 1), 0.1)

  def test_cli_reports_a_bad_mesh_in_one_line(self):
    proc = subprocess.run(
        [sys.executable, "-m", "ppow_jax.tools.memory_plan",
         "--config=configs/llama31_8b_eagle3.py:runlocal", "--num_devices=6",
         "--config.mesh.ici_shape=(4, 1, -1)"],
        capture_output=True, text=True, cwd=REPO, timeout=120,
        env={**os.environ, "JAX_PLATFORMS": "cpu"})
    self.assertEqual(proc.returncode, 2, proc.stderr)
    self.assertEqual(proc.stdout, "")
    self.assertRegex(proc.stderr.strip().splitlines()[-1],
                     r"^error: mesh.ici_shape=\(4, 1, -1\).*6 devices are not a multiple")

  def test_lm_drafter_and_replicated_drafter_params(self):
    config = _config("llama31_8b_eagle3", "runlocal")
    config.drafter.kind, config.drafter.preset = "lm", "tiny"
    config.mesh.ici_shape = (1, 1, -1)
    config.sharding.drafter_params = "replicated"
    out = memory_plan.plan(config, num_devices=4)
    # The drafter is the tiny target itself, in float32: whole on every device.
    self.assertEqual(out["drafter_params"], out["target_params"])
    self.assertEqual(out["drafter_param_bytes_per_device"], 4 * out["drafter_params"])
    self.assertLess(out["target_param_bytes_per_device"], out["drafter_param_bytes_per_device"])
    config.drafter.preset = "qwen3-0.6b"
    with self.assertRaisesRegex(UserError, "drafter.preset='qwen3-0.6b' has vocab_size 151936"):
      memory_plan.plan(config, num_devices=4)
    config.drafter.preset = ""  # derived from the target, as training builds it
    self.assertLess(memory_plan.plan(config, num_devices=4)["drafter_params"],
                    out["drafter_params"])

  def test_plans_the_drafter_training_builds(self):
    """The default config (embedded target, EAGLE-3 drafter): the plan's drafter has exactly
    the parameters ``drafter_stages.build_drafter`` initialises."""
    config = _config("tiny", "smoke")
    config.drafter.draft_vocab_size = 0
    out = memory_plan.plan(config, num_devices=1)
    target = settings.target_arch(config)
    self.assertEqual(target.vocab_size, config.data.tokenizer_vocab_size)
    _, params = drafter_stages.build_drafter(config, target, data=None)
    self.assertEqual(out["drafter_params"], sum(x.size for x in jax.tree_util.tree_leaves(
        params["net"])))
    config.ppow.window += 4  # the run's own settings size the plan
    self.assertGreater(memory_plan.plan(config, num_devices=1)["activation_bytes_per_device"],
                       out["activation_bytes_per_device"])
    config.eval.max_new_tokens *= 8
    self.assertGreater(memory_plan.plan(config, num_devices=1)["breakdown_bytes_per_device"]
                       ["kv_cache_decode"], out["breakdown_bytes_per_device"]["kv_cache_decode"])
    config.target.hf_dir = "/somewhere"
    with self.assertRaisesRegex(UserError, "config.target.preset: name the target"):
      memory_plan.plan(config, num_devices=1)

  def test_uneven_shards_and_batches_are_user_errors(self):
    config = _config("llama31_8b_eagle3", "runlocal")
    config.mesh.ici_shape = (1, 1, -1)  # tensor 3: the tiny model's dims don't divide
    with self.assertRaisesRegex(UserError,
                                r"target parameter .* split over tensor \(3 shards\) and does"):
      memory_plan.plan(config, num_devices=3)
    config.mesh.ici_shape = (-1, 1, 1)
    config.ppow.batch_size = 6
    config.ppow.pool_size = 6 * 4  # the ADAW pool holds whole batches
    with self.assertRaisesRegex(UserError, r"config\.ppow\.batch_size=6 .* 4 shards"):
      memory_plan.plan(config, num_devices=4)
    self.assertEqual(memory_plan.plan(config, num_devices=2)["mesh_shape"]["data"], 2)


if __name__ == "__main__":
  absltest.main()
