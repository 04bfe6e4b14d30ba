"""The generate CLI, and acceptance parity with Hugging Face assisted generation (same K)."""

import json
import os
import subprocess
import sys
import tempfile
from unittest import mock

os.environ.setdefault("JAX_PLATFORMS", "cpu")

from absl import flags
from absl.testing import absltest
from absl.testing import flagsaver
import jax
import numpy as np
import torch
import transformers

from ppow_jax import engine, generate
from ppow_jax.errors import UserError
from ppow_jax.models import hf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
K = 4
MAX_NEW = 24
PROMPT = [3, 17, 42, 8, 11, 5]


def _make_pair(directory):
  """A tiny LLaMA target and a noisy copy of it as the drafter, in HF layout."""
  torch.manual_seed(0)
  cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                 num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, initializer_range=0.3,
                                 max_position_embeddings=128, eos_token_id=None,
                                 bos_token_id=None, pad_token_id=None)
  target = transformers.LlamaForCausalLM(cfg).eval()
  drafter = transformers.LlamaForCausalLM(cfg).eval()
  with torch.no_grad():
    for (_, p_t), (_, p_d) in zip(target.named_parameters(), drafter.named_parameters()):
      p_d.copy_(p_t + 0.03 * torch.randn_like(p_t))
  target.save_pretrained(os.path.join(directory, "target"))
  drafter.save_pretrained(os.path.join(directory, "drafter"))
  return target, drafter


class AssistedGenerationParityTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.tmp = tempfile.TemporaryDirectory()
    cls.hf_target, cls.hf_drafter = _make_pair(cls.tmp.name)

  @classmethod
  def tearDownClass(cls):
    cls.tmp.cleanup()
    super().tearDownClass()

  def _hf_assisted(self):
    """Greedy assisted generation; a streamer sees one put() per verification."""
    gen = self.hf_drafter.generation_config
    gen.num_assistant_tokens = K
    gen.num_assistant_tokens_schedule = "constant"
    gen.assistant_confidence_threshold = 0.0

    class Counter(transformers.generation.streamers.BaseStreamer):
      def __init__(self):
        self.puts = []

      def put(self, value):
        self.puts.append(int(np.asarray(value).size))

      def end(self):
        pass

    counter = Counter()
    ids = torch.tensor([PROMPT])
    out = self.hf_target.generate(ids, assistant_model=self.hf_drafter, do_sample=False,
                                  max_new_tokens=MAX_NEW, min_new_tokens=MAX_NEW,
                                  streamer=counter, pad_token_id=0)
    return out[0, len(PROMPT):].tolist(), counter.puts[1:]  # the first put is the prompt

  def test_same_tokens_and_same_acceptances_as_transformers(self):
    hf_tokens, hf_rounds = self._hf_assisted()
    model, tparams = hf.load(os.path.join(self.tmp.name, "target"))
    drafter, dparams = generate.load_drafter(os.path.join(self.tmp.name, "drafter"), model.cfg,
                                             "float32")
    eng = engine.Engine(model.cfg, drafter, engine.DecodeConfig(window=K,
                                                                max_new_tokens=MAX_NEW))
    prompts, lens = engine.pad_prompts([PROMPT])
    out = eng.generate(tparams, dparams, prompts, lens, jax.random.PRNGKey(0))
    stats = out.stats.summary()
    self.assertEqual(out.new_tokens()[0], hf_tokens)
    self.assertGreater(max(hf_rounds), 1)  # some drafts were accepted
    self.assertLess(min(hf_rounds), K + 1)  # and some rejected
    self.assertEqual(stats["verify_calls"], len(hf_rounds), hf_rounds)
    self.assertEqual(stats["committed"], sum(hf_rounds))

  def test_cli_writes_json_and_matches_greedy_target(self):
    out_json = os.path.join(self.tmp.name, "o.json")
    cmd = [sys.executable, "-m", "ppow_jax.generate",
           f"--target={os.path.join(self.tmp.name, 'target')}",
           f"--drafter={os.path.join(self.tmp.name, 'drafter')}",
           f"--prompt_ids={','.join(map(str, PROMPT))}", f"--max_new_tokens={MAX_NEW}",
           f"--window={K}", "--temperature=0", f"--output_json={out_json}"]
    env = dict(os.environ, PYTHONPATH=ROOT)
    subprocess.run(cmd, check=True, capture_output=True, env=env, cwd=ROOT, timeout=600)
    with open(out_json) as f:
      result = json.load(f)
    for key in ("tokens", "verify_calls", "tau", "alpha", "tokens_per_s"):
      self.assertIn(key, result)
    with torch.no_grad():
      ref = self.hf_target.generate(torch.tensor([PROMPT]), do_sample=False,
                                    max_new_tokens=MAX_NEW, min_new_tokens=MAX_NEW,
                                    pad_token_id=0)
    self.assertEqual(result["tokens"], ref[0, len(PROMPT):].tolist())
    self.assertLen(result["alpha"], K)
    self.assertGreaterEqual(result["tau"], 1.0)

    bad = subprocess.run(cmd[:4] + ["--drafter=/no/such/drafter", "--prompt_ids=1,2"],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    self.assertEqual(bad.returncode, 2)
    self.assertIn("/no/such/drafter", bad.stderr)

  def test_cli_tree_drafting_matches_greedy_target(self):
    out_json = os.path.join(self.tmp.name, "tree.json")
    cmd = [sys.executable, "-m", "ppow_jax.generate",
           f"--target={os.path.join(self.tmp.name, 'target')}",
           f"--drafter={os.path.join(self.tmp.name, 'drafter')}",
           f"--prompt_ids={','.join(map(str, PROMPT))}", f"--max_new_tokens={MAX_NEW}",
           "--tree=6,3,2", "--temperature=0", f"--output_json={out_json}"]
    env = dict(os.environ, PYTHONPATH=ROOT)
    subprocess.run(cmd, check=True, capture_output=True, env=env, cwd=ROOT, timeout=600)
    with open(out_json) as f:
      result = json.load(f)
    with torch.no_grad():
      ref = self.hf_target.generate(torch.tensor([PROMPT]), do_sample=False,
                                    max_new_tokens=MAX_NEW, min_new_tokens=MAX_NEW,
                                    pad_token_id=0)
    self.assertEqual(result["tokens"], ref[0, len(PROMPT):].tolist())
    self.assertEqual(result["drafting"], "tree")
    self.assertLen(result["alpha"], 3)  # by depth
    bad = subprocess.run(cmd[:-3] + ["--tree=6,3"], capture_output=True, text=True, env=env,
                         cwd=ROOT, timeout=600)
    self.assertEqual(bad.returncode, 2)
    self.assertIn("--tree expects TOTAL,DEPTH,TOPK", bad.stderr)

  def test_cli_decodes_on_the_decoding_layout_on_the_device(self):
    seen, generate_fn = [], engine.Engine.generate

    def spy(eng, target_params, draft_params, *args):
      seen.append([isinstance(x, jax.Array) for x in jax.tree_util.tree_leaves(
          (target_params, draft_params))] + [
              "qkv_proj_t" in p["layers_0"]["self_attn"] for p in (target_params, draft_params)])
      return generate_fn(eng, target_params, draft_params, *args)
    with flagsaver.flagsaver(), mock.patch.object(engine.Engine, "generate", spy):
      flags.FLAGS(["generate", f"--target={os.path.join(self.tmp.name, 'target')}",
                   f"--drafter={os.path.join(self.tmp.name, 'drafter')}",
                   f"--prompt_ids={','.join(map(str, PROMPT))}", "--max_new_tokens=4",
                   f"--window={K}"])
      generate.run()
    self.assertTrue(seen and all(all(s) for s in seen), seen)

  def test_load_drafter_errors(self):
    model, _ = hf.load(os.path.join(self.tmp.name, "target"))
    with self.assertRaisesRegex(UserError, "is not a directory"):
      generate.load_drafter("/no/such/dir", model.cfg, "float32")
    with self.assertRaisesRegex(UserError, "config.json not found"):
      generate.load_drafter(self.tmp.name, model.cfg, "float32")


if __name__ == "__main__":
  absltest.main()
