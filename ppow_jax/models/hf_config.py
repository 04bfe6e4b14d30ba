"""Hugging Face ``config.json`` <-> ``llama.ModelConfig``, in both directions.

Both transformers v4 (``rope_theta`` / ``rope_scaling`` at the top level) and v5
(``rope_parameters``) configs are read; ``to_hf_config`` writes both spellings so either version
loads the result. Other formats (GGUF) describe their model as an HF config dict and go through
``parse_config`` too, so there is one reading of every setting.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Optional

from ppow_jax.errors import UserError
from ppow_jax.models import llama

ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "MistralForCausalLM")
MODEL_TYPE = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2",
              "Qwen3ForCausalLM": "qwen3", "MistralForCausalLM": "mistral"}
_DEFAULT_MAX_POSITIONS = {"llama": 2048, "qwen2": 32768, "qwen3": 32768, "mistral": 131072}
CONFIG = "config.json"

# ----------------------------------------------------------------------------- config


def check_dir(hf_dir: str | os.PathLike) -> str:
  hf_dir = os.fspath(hf_dir)
  if not os.path.isdir(hf_dir):
    raise UserError(f"{hf_dir}: no such model directory")
  return hf_dir


def read_json(path: str) -> dict:
  if not os.path.isfile(path):
    raise UserError(f"{path}: file not found")
  try:
    with open(path, encoding="utf-8") as f:
      data = json.load(f)
  except (OSError, ValueError) as e:
    raise UserError(f"{path}: cannot read JSON ({e})") from None
  if not isinstance(data, dict):
    raise UserError(f"{path}: expected a JSON object")
  return data


def architecture(raw: dict, path: str) -> str:
  """The (one, built-in) architecture a config.json names."""
  if "auto_map" in raw:
    raise UserError(f"{path}: the model needs remote code (auto_map: {sorted(raw['auto_map'])}); "
                    f"only built-in {', '.join(ARCHITECTURES)} are supported")
  archs = raw.get("architectures")
  if not archs:  # Old configs may name only the model_type.
    by_type = {t: a for a, t in MODEL_TYPE.items()}
    if raw.get("model_type") in by_type:
      return by_type[raw["model_type"]]
    raise UserError(f"{path}: no 'architectures' and unsupported model_type "
                    f"{raw.get('model_type')!r}; supported: {', '.join(ARCHITECTURES)}")
  if not isinstance(archs, list) or len(archs) != 1 or archs[0] not in ARCHITECTURES:
    raise UserError(f"{path}: unsupported architectures {archs!r} (custom or remote-code models "
                    f"are not supported); supported: {', '.join(ARCHITECTURES)}")
  return archs[0]


def _rope(raw: dict, path: str) -> tuple[float, Optional[llama.RopeScaling]]:
  """(theta, scaling) from v5 ``rope_parameters`` or v4 ``rope_theta`` + ``rope_scaling``."""
  params = raw.get("rope_parameters")
  if params is None:
    params = raw.get("rope_scaling") or {}
  if not isinstance(params, dict) or any(isinstance(v, dict) for v in params.values()):
    raise UserError(f"{path}: unsupported rope_parameters/rope_scaling {params!r}")
  theta = float(params.get("rope_theta", raw.get("rope_theta", 10000.0)))
  if float(params.get("partial_rotary_factor", raw.get("partial_rotary_factor", 1.0))) != 1.0:
    raise UserError(f"{path}: partial_rotary_factor != 1 is not supported")
  rope_type = params.get("rope_type", params.get("type", "default"))
  if rope_type == "default":
    return theta, None
  if rope_type != "llama3":
    raise UserError(f"{path}: rope type {rope_type!r} is not supported (only 'default', 'llama3')")
  try:
    return theta, llama.RopeScaling(
        factor=float(params["factor"]), low_freq_factor=float(params["low_freq_factor"]),
        high_freq_factor=float(params["high_freq_factor"]),
        original_max_position_embeddings=int(params["original_max_position_embeddings"]))
  except KeyError as e:
    raise UserError(f"{path}: llama3 rope scaling lacks {e.args[0]!r}") from None


def _sliding_window(raw: dict, arch: str, num_layers: int, path: str) -> int:
  """One window for all layers, or 0. HF Qwen2/3 may window only some layers: refused."""
  window = raw.get("sliding_window")
  if arch == "MistralForCausalLM":
    return int(window or 0)
  if arch == "LlamaForCausalLM" or not raw.get("use_sliding_window") or not window:
    return 0
  first = raw.get("max_window_layers", 28)
  types = raw.get("layer_types") or [
      "sliding_attention" if i >= first else "full_attention" for i in range(num_layers)]
  sliding = {t == "sliding_attention" for t in types}
  if sliding == {True}:
    return int(window)
  if sliding == {False}:
    return 0
  raise UserError(f"{path}: a sliding window on only some layers (layer_types / "
                  f"max_window_layers) is not supported")


def parse_config(raw: dict, path: str, dtype: str, param_dtype: str) -> llama.ModelConfig:
  arch = architecture(raw, path)
  model_type = MODEL_TYPE[arch]

  def get_int(key: str, default: Optional[int] = None) -> int:
    value = raw.get(key, default)
    if value is None:
      raise UserError(f"{path}: missing key {key!r}")
    if isinstance(value, bool) or not isinstance(value, int):
      raise UserError(f"{path}: key {key!r} must be an integer, got {value!r}")
    return value

  def refuse(cond: bool, what: str):
    if cond:
      raise UserError(f"{path}: {what} is not supported for {arch}")

  refuse(raw.get("hidden_act", "silu") != "silu", f"hidden_act {raw.get('hidden_act')!r}")
  refuse(bool(raw.get("mlp_bias")), "mlp_bias=true")
  # Llama/Qwen3 attention_bias also adds an o_proj bias, which the decoder does not have.
  refuse(arch != "Qwen2ForCausalLM" and bool(raw.get("attention_bias")), "attention_bias=true")
  heads = get_int("num_attention_heads")
  hidden = get_int("hidden_size")
  num_layers = get_int("num_hidden_layers")
  head_dim = raw.get("head_dim") or (128 if model_type == "qwen3" else hidden // max(heads, 1))
  if heads and hidden % heads == 0 and head_dim == hidden // heads:
    head_dim = 0  # ModelConfig's canonical "derived", so configs round-trip equal.
  try:
    theta, scaling = _rope(raw, path)
  except (TypeError, ValueError) as e:  # e.g. a string where a number belongs
    if isinstance(e, UserError):
      raise
    raise UserError(f"{path}: bad rope settings ({e})") from None
  fields = dict(
      vocab_size=get_int("vocab_size"), hidden_size=hidden,
      intermediate_size=get_int("intermediate_size"), num_layers=num_layers, num_heads=heads,
      num_kv_heads=get_int("num_key_value_heads", heads), head_dim=int(head_dim),
      rope_theta=theta, rope_scaling=scaling, rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
      qkv_bias=arch == "Qwen2ForCausalLM", qk_norm=arch == "Qwen3ForCausalLM",
      tie_embeddings=bool(raw.get("tie_word_embeddings", False)),
      sliding_window=_sliding_window(raw, arch, num_layers, path),
      max_position_embeddings=get_int("max_position_embeddings",
                                      _DEFAULT_MAX_POSITIONS[model_type]),
      initializer_range=float(raw.get("initializer_range", 0.02)))
  try:
    return llama.ModelConfig(**fields, param_dtype=param_dtype, dtype=dtype)
  except ValueError as e:  # Inconsistent sizes, e.g. heads not a multiple of kv heads.
    raise UserError(f"{path}: {e}") from None


def check_dtypes(**names: Optional[str]) -> None:
  for arg, name in names.items():
    if name is not None:
      try:
        llama.to_dtype(name)
      except ValueError as e:
        raise UserError(f"{arg}={name!r}: {e}") from None


def load_config(hf_dir: str | os.PathLike, *, dtype: str = "float32",
                param_dtype: str = "float32") -> llama.ModelConfig:
  """The decoder config of an HF checkpoint directory (reads only config.json)."""
  check_dtypes(dtype=dtype, param_dtype=param_dtype)
  path = os.path.join(check_dir(hf_dir), CONFIG)
  return parse_config(read_json(path), path, dtype, param_dtype)


def check_same_vocab(target_cfg: llama.ModelConfig, drafter_cfg: llama.ModelConfig,
                     where: str) -> None:
  """Drafted token ids are fed to the target as-is, so both must share one vocabulary."""
  if target_cfg.vocab_size != drafter_cfg.vocab_size:
    raise UserError(f"{where}: target vocab_size {target_cfg.vocab_size} != drafter vocab_size "
                    f"{drafter_cfg.vocab_size}; the drafter must use the target's tokenizer")



def to_hf_config(cfg: llama.ModelConfig, arch: str) -> dict:
  def need(cond: bool, why: str):
    if not cond:
      raise UserError(f"cannot export as {arch}: {why}")

  need(arch in ARCHITECTURES, f"supported architectures are {', '.join(ARCHITECTURES)}")
  is_qwen2, is_qwen3 = arch == "Qwen2ForCausalLM", arch == "Qwen3ForCausalLM"
  need(cfg.qkv_bias or not is_qwen2, "Qwen2ForCausalLM always has q/k/v biases (qkv_bias=True)")
  need(is_qwen2 or not cfg.qkv_bias, "q/k/v biases (qkv_bias) exist only in Qwen2ForCausalLM")
  need(cfg.qk_norm or not is_qwen3, "Qwen3ForCausalLM always has q/k norms (qk_norm=True)")
  need(is_qwen3 or not cfg.qk_norm, "q/k norms (qk_norm) exist only in Qwen3ForCausalLM")
  need(not cfg.sliding_window or arch != "LlamaForCausalLM",
       "LlamaForCausalLM has no sliding window (use MistralForCausalLM)")
  rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
  if cfg.rope_scaling is not None:
    rope.update(rope_type="llama3", **dataclasses.asdict(cfg.rope_scaling))
  out: dict[str, Any] = {
      "architectures": [arch], "model_type": MODEL_TYPE[arch], "vocab_size": cfg.vocab_size,
      "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
      "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
      "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.resolved_head_dim,
      "hidden_act": "silu", "max_position_embeddings": cfg.max_position_embeddings,
      "rms_norm_eps": cfg.rms_norm_eps, "initializer_range": cfg.initializer_range,
      "tie_word_embeddings": cfg.tie_embeddings, "attention_dropout": 0.0, "use_cache": True,
      # v5 reads rope_parameters; v4 reads rope_theta and rope_scaling.
      "rope_parameters": rope, "rope_theta": cfg.rope_theta,
      "rope_scaling": rope if cfg.rope_scaling is not None else None,
  }
  if arch in ("LlamaForCausalLM", "Qwen3ForCausalLM"):
    out["attention_bias"] = False
  if arch == "LlamaForCausalLM":
    out["mlp_bias"] = False
  if arch == "MistralForCausalLM":
    out["sliding_window"] = cfg.sliding_window or None
  if arch in ("Qwen2ForCausalLM", "Qwen3ForCausalLM"):
    window = bool(cfg.sliding_window)
    out.update(use_sliding_window=window, sliding_window=cfg.sliding_window or None,
               max_window_layers=0 if window else cfg.num_layers,
               layer_types=[("sliding_attention" if window else "full_attention")] * cfg.num_layers)
  return out

