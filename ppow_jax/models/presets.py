"""Named architectures, so that shapes (memory plans, shardings, AOT lowering) need no weights.

Each preset is the exact ``llama.ModelConfig`` that ``hf.load_config`` builds from the
published ``config.json`` (``head_dim=0`` where it equals ``hidden_size // num_heads``, which
is how ``hf.load_config`` canonicalises it), so a test can compare the two for equality.
Dtypes default to float32 here; a run config picks them (``get_preset(name, dtype=...)``).
"""

from __future__ import annotations

import dataclasses

from ppow_jax.errors import UserError
from ppow_jax.models import llama

_LLAMA31_ROPE = llama.RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                  original_max_position_embeddings=8192)

PRESETS: dict[str, llama.ModelConfig] = {
    # meta-llama/Llama-3.1-8B(-Instruct): 8.03e9 parameters.
    "llama3.1-8b": llama.ModelConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32,
        num_heads=32, num_kv_heads=8, rope_theta=500000.0, rope_scaling=_LLAMA31_ROPE,
        rms_norm_eps=1e-5, tie_embeddings=False, max_position_embeddings=131072),
    # meta-llama/Llama-3.3-70B-Instruct: 70.6e9 parameters.
    "llama3.3-70b": llama.ModelConfig(
        vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_layers=80,
        num_heads=64, num_kv_heads=8, rope_theta=500000.0, rope_scaling=_LLAMA31_ROPE,
        rms_norm_eps=1e-5, tie_embeddings=False, max_position_embeddings=131072),
    # meta-llama/Llama-3.2-1B(-Instruct): an independent LM drafter for the LLaMA-3 targets.
    "llama3.2-1b": llama.ModelConfig(
        vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_layers=16,
        num_heads=32, num_kv_heads=8, rope_theta=500000.0,
        rope_scaling=dataclasses.replace(_LLAMA31_ROPE, factor=32.0), rms_norm_eps=1e-5,
        tie_embeddings=True, max_position_embeddings=131072),
    # Qwen/Qwen3-8B: 8.19e9 parameters; head_dim 128 (= 4096 / 32), per-head q/k RMSNorm.
    "qwen3-8b": llama.ModelConfig(
        vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_layers=36,
        num_heads=32, num_kv_heads=8, head_dim=0, rope_theta=1000000.0, rms_norm_eps=1e-6,
        qk_norm=True, tie_embeddings=False, max_position_embeddings=40960),
    # Qwen/Qwen3-0.6B: an independent LM drafter for Qwen3 targets (head_dim 128 != 1024 / 16).
    "qwen3-0.6b": llama.ModelConfig(
        vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_layers=28,
        num_heads=16, num_kv_heads=8, head_dim=128, rope_theta=1000000.0, rms_norm_eps=1e-6,
        qk_norm=True, tie_embeddings=True, max_position_embeddings=40960),
    # Laptop-sized, for tests and smoke runs: every sharded dim divides 8 (fsdp 2 x tensor 4).
    "tiny": llama.ModelConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=8,
        num_kv_heads=4, head_dim=8, rope_theta=10000.0, rms_norm_eps=1e-5,
        max_position_embeddings=512),
}


def get_preset(name: str, **overrides) -> llama.ModelConfig:
  """The preset ``name``, with ``ModelConfig`` fields replaced (e.g. ``dtype="bfloat16"``)."""
  if name not in PRESETS:
    raise UserError(f"unknown model preset {name!r}; known presets: {', '.join(sorted(PRESETS))}")
  return dataclasses.replace(PRESETS[name], **overrides)
