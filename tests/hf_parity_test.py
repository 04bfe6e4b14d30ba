"""Logit parity with transformers for every supported architecture, and save round trips.

Each case builds a tiny random HF model, saves it with ``save_pretrained``, loads it through
``hf.load`` and compares logits on random tokens; then ``hf.save`` exports our params and
transformers must load back the very same weights.
"""

import functools
import os
import shutil
import sys
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")

from absl.testing import absltest
import jax
import numpy as np
import torch
import transformers

from ppow_jax.models import hf
from ppow_jax.models import llama

TOL = 1e-4
_COMMON = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2,
               max_position_embeddings=128)


def _tokens(vocab: int, length: int, seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, vocab, size=(2, length), dtype=np.int32)


def _hf_model(config: transformers.PretrainedConfig) -> torch.nn.Module:
  """A random fp32 model whose norm scales and biases are not the init's ones and zeros."""
  torch.manual_seed(0)
  model = transformers.AutoModelForCausalLM.from_config(config).float().eval()
  with torch.no_grad():
    for _, p in model.named_parameters():
      if p.ndim == 1:  # RMSNorm scales (init 1) and q/k/v biases (init 0).
        p.add_(0.2 * torch.randn_like(p))
  return model


def _hf_logits(model: torch.nn.Module, tokens: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    return model(torch.from_numpy(tokens).long()).logits.float().numpy()


def _state(model: torch.nn.Module) -> dict:
  return {k: v.detach().clone() for k, v in model.state_dict().items()}


class ParityTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    torch.set_num_threads(1)

  def _tmpdir(self) -> str:
    # Not absltest's create_tempdir: it needs parsed absl flags, which pytest does not do.
    d = tempfile.mkdtemp()
    self.addCleanup(shutil.rmtree, d, ignore_errors=True)
    return d

  def _check(self, name: str, config: transformers.PretrainedConfig, length: int,
             hidden_layers: tuple = ()) -> tuple[llama.Decoder, dict]:
    """Parity of logits (and hidden states), then the hf.save round trip."""
    hf_model = _hf_model(config)
    src = self._tmpdir()
    hf_model.save_pretrained(src)
    model, params = hf.load(src)
    tokens = _tokens(config.vocab_size, length)

    forward = jax.jit(functools.partial(model.apply, hidden_layers=hidden_layers,
                                        method=model.forward))
    out = forward({"params": params}, tokens)
    with torch.no_grad():
      ref = hf_model(torch.from_numpy(tokens).long(), output_hidden_states=True)
    diff = float(np.max(np.abs(np.asarray(out.logits_BxTxV) - ref.logits.numpy())))
    print(f"[hf parity] {name}: max |logit diff| = {diff:.2e}", file=sys.stderr)
    self.assertLessEqual(diff, TOL, name)
    for i, ours in zip(hidden_layers, out.hidden_states):
      np.testing.assert_allclose(np.asarray(ours), ref.hidden_states[i].numpy(), atol=TOL,
                                 err_msg=f"{name}: hidden state {i}")

    dst = os.path.join(self._tmpdir(), "export")
    hf.save(dst, model.cfg, params, architecture=config.architectures[0])
    back = transformers.AutoModelForCausalLM.from_pretrained(dst, dtype=torch.float32).eval()
    want, got = _state(hf_model), _state(back)
    self.assertEqual(sorted(want), sorted(got))
    for k in want:
      self.assertTrue(torch.equal(want[k], got[k]), f"{name}: round trip changed {k}")
    np.testing.assert_allclose(_hf_logits(back, tokens), ref.logits.numpy(), atol=1e-6)
    return model, params

  def test_llama_gqa_tied_and_hidden_states(self):
    config = transformers.LlamaConfig(**{**_COMMON, "num_hidden_layers": 3},
                                      tie_word_embeddings=True,
                                      architectures=["LlamaForCausalLM"])
    model, params = self._check("llama gqa tied", config, 12, hidden_layers=(0, 1, 2))
    self.assertTrue(model.cfg.tie_embeddings)
    self.assertNotIn("lm_head", params)

  def test_llama3_rope_scaling_past_original_length(self):
    rope = dict(rope_type="llama3", rope_theta=5e5, factor=8.0, low_freq_factor=1.0,
                high_freq_factor=2.0, original_max_position_embeddings=16)
    config = transformers.LlamaConfig(**{**_COMMON, "hidden_size": 64, "num_attention_heads": 2,
                                         "num_key_value_heads": 1}, head_dim=32,
                                      rope_parameters=rope, tie_word_embeddings=False,
                                      architectures=["LlamaForCausalLM"])
    model, _ = self._check("llama3 rope", config, 48)
    self.assertEqual(model.cfg.rope_theta, 5e5)
    # The case must hit all three llama3 branches: kept, smoothed and divided by the factor.
    plain = llama.rope_inv_freq(llama.ModelConfig(**{
        **model.cfg.__dict__, "rope_scaling": None}))
    ratio = llama.rope_inv_freq(model.cfg) / plain
    self.assertTrue(np.any(ratio == 1.0) and np.any(np.isclose(ratio, 1 / 8)))
    self.assertTrue(np.any((ratio < 1.0) & (ratio > 1 / 8 + 1e-6)))

  def test_qwen2_bias_and_sliding_window(self):
    # max_window_layers=0: every layer slides (per-layer windows are refused by hf.load).
    config = transformers.Qwen2Config(**_COMMON, use_sliding_window=True, sliding_window=8,
                                      max_window_layers=0, architectures=["Qwen2ForCausalLM"])
    model, _ = self._check("qwen2 bias window 8", config, 24)
    self.assertTrue(model.cfg.qkv_bias)
    self.assertEqual(model.cfg.sliding_window, 8)

  def test_qwen3_head_dim_and_qk_norm(self):
    config = transformers.Qwen3Config(**_COMMON, head_dim=16, architectures=["Qwen3ForCausalLM"])
    model, _ = self._check("qwen3 head_dim 16", config, 12)
    self.assertEqual(model.cfg.resolved_head_dim, 16)
    self.assertTrue(model.cfg.qk_norm)

  def test_mistral_sliding_window(self):
    config = transformers.MistralConfig(**_COMMON, sliding_window=8,
                                        architectures=["MistralForCausalLM"])
    model, _ = self._check("mistral window 8", config, 24)
    self.assertEqual(model.cfg.sliding_window, 8)

  def test_bf16_round_trip(self):
    config = transformers.LlamaConfig(**_COMMON, tie_word_embeddings=True,
                                      architectures=["LlamaForCausalLM"])
    hf_model = _hf_model(config).to(torch.bfloat16)
    src = self._tmpdir()
    hf_model.save_pretrained(src)
    ref_state = _state(hf_model)

    model, params = hf.load(src)  # param_dtype=None keeps the stored bf16.
    self.assertEqual(model.cfg.param_dtype, "bfloat16")
    self.assertEqual(params["embed_tokens"].dtype, np.dtype(llama.to_dtype("bfloat16")))
    want = hf_model.model.embed_tokens.weight.detach().float().numpy()
    np.testing.assert_array_equal(params["embed_tokens"].astype(np.float32), want)

    # bf16 values are exact in fp32: upcast weights give fp32 parity. (The reference is
    # reloaded: hf_model.float() would keep RoPE's inv_freq buffer rounded to bf16.)
    model32, params32 = hf.load(src, param_dtype="float32")
    hf32 = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    tokens = _tokens(config.vocab_size, 8)
    ours = np.asarray(jax.jit(model32.apply)({"params": params32}, tokens))
    diff = float(np.max(np.abs(ours - _hf_logits(hf32, tokens))))
    print(f"[hf parity] bf16 weights (fp32 compute): max |logit diff| = {diff:.2e}",
          file=sys.stderr)
    self.assertLessEqual(diff, TOL)

    dst = os.path.join(self._tmpdir(), "export")
    hf.save(dst, model.cfg, params)
    back = transformers.AutoModelForCausalLM.from_pretrained(dst, dtype=torch.bfloat16)
    got = _state(back)
    self.assertEqual(sorted(got), sorted(ref_state))
    for k, v in got.items():
      self.assertEqual(v.dtype, torch.bfloat16, k)
      self.assertTrue(torch.equal(v, ref_state[k]), f"bf16 round trip changed {k}")


if __name__ == "__main__":
  absltest.main()
