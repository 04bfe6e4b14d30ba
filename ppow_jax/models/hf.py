"""Hugging Face interop: read and write LLaMA-family checkpoints without importing torch.

A checkpoint directory holds ``config.json`` and ``model.safetensors`` (or a sharded
``model.safetensors.index.json``). HF stores linear weights as ``[out, in]``; our decoder keeps
``[in, out]`` with heads split out (``q_proj [E, H, D]``, ``o_proj [H, D, E]``), so every
tensor goes through one table (``_spec``) that both directions share. Both transformers v4
(``rope_theta`` / ``rope_scaling`` at the top level) and v5 (``rope_parameters``) configs are
read; ``save`` writes both spellings so either version loads the result.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from typing import Any, Optional

import flax.linen as nn
import jax
import numpy as np
from flax import traverse_util
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from ppow_jax.errors import UserError
from ppow_jax.models import llama

ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "MistralForCausalLM")
_MODEL_TYPE = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2",
               "Qwen3ForCausalLM": "qwen3", "MistralForCausalLM": "mistral"}
_DEFAULT_MAX_POSITIONS = {"llama": 2048, "qwen2": 32768, "qwen3": 32768, "mistral": 131072}
CONFIG, WEIGHTS, INDEX = "config.json", "model.safetensors", "model.safetensors.index.json"
_ST_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}
# Files that describe weights; everything else (tokenizer, generation config) survives overwrite.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".msgpack", ".h5", ".ckpt",
                    ".index.json")


# ----------------------------------------------------------------------------- config


def _check_dir(hf_dir: str | os.PathLike) -> str:
  hf_dir = os.fspath(hf_dir)
  if not os.path.isdir(hf_dir):
    raise UserError(f"{hf_dir}: no such model directory")
  return hf_dir


def _read_json(path: str) -> dict:
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


def _architecture(raw: dict, path: str) -> str:
  if "auto_map" in raw:
    raise UserError(f"{path}: the model needs remote code (auto_map: {sorted(raw['auto_map'])}); "
                    f"only built-in {', '.join(ARCHITECTURES)} are supported")
  archs = raw.get("architectures")
  if not archs:  # Old configs may name only the model_type.
    by_type = {t: a for a, t in _MODEL_TYPE.items()}
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


def _parse_config(raw: dict, path: str, dtype: str, param_dtype: str) -> llama.ModelConfig:
  arch = _architecture(raw, path)
  model_type = _MODEL_TYPE[arch]

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


def _check_dtypes(**names: Optional[str]) -> None:
  for arg, name in names.items():
    if name is not None:
      try:
        llama.to_dtype(name)
      except ValueError as e:
        raise UserError(f"{arg}={name!r}: {e}") from None


def load_config(hf_dir: str | os.PathLike, *, dtype: str = "float32",
                param_dtype: str = "float32") -> llama.ModelConfig:
  """The decoder config of an HF checkpoint directory (reads only config.json)."""
  _check_dtypes(dtype=dtype, param_dtype=param_dtype)
  path = os.path.join(_check_dir(hf_dir), CONFIG)
  return _parse_config(_read_json(path), path, dtype, param_dtype)


def check_same_vocab(target_cfg: llama.ModelConfig, drafter_cfg: llama.ModelConfig,
                     where: str) -> None:
  """Drafted token ids are fed to the target as-is, so both must share one vocabulary."""
  if target_cfg.vocab_size != drafter_cfg.vocab_size:
    raise UserError(f"{where}: target vocab_size {target_cfg.vocab_size} != drafter vocab_size "
                    f"{drafter_cfg.vocab_size}; the drafter must use the target's tokenizer")


# ----------------------------------------------------------------------------- tensor table


@dataclasses.dataclass(frozen=True)
class _Entry:
  hf_key: str
  path: tuple[str, ...]  # in our param tree
  hf_shape: tuple[int, ...]
  flax_shape: tuple[int, ...]
  transpose: bool  # HF [out, in] linear: transpose, then split heads by reshape


def _spec(cfg: llama.ModelConfig) -> list[_Entry]:
  e, m, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
  h, kv, d = cfg.num_heads, cfg.num_kv_heads, cfg.resolved_head_dim
  out = [_Entry("model.embed_tokens.weight", ("embed_tokens",), (v, e), (v, e), False)]
  for i in range(cfg.num_layers):
    def add(key, path, hf_shape, flax_shape, transpose, i=i):
      out.append(_Entry(f"model.layers.{i}.{key}", (f"layers_{i}",) + path, hf_shape, flax_shape,
                        transpose))
    add("self_attn.q_proj.weight", ("self_attn", "q_proj"), (h * d, e), (e, h, d), True)
    add("self_attn.k_proj.weight", ("self_attn", "k_proj"), (kv * d, e), (e, kv, d), True)
    add("self_attn.v_proj.weight", ("self_attn", "v_proj"), (kv * d, e), (e, kv, d), True)
    add("self_attn.o_proj.weight", ("self_attn", "o_proj"), (e, h * d), (h, d, e), True)
    if cfg.qkv_bias:
      add("self_attn.q_proj.bias", ("self_attn", "q_bias"), (h * d,), (h, d), False)
      add("self_attn.k_proj.bias", ("self_attn", "k_bias"), (kv * d,), (kv, d), False)
      add("self_attn.v_proj.bias", ("self_attn", "v_bias"), (kv * d,), (kv, d), False)
    if cfg.qk_norm:
      add("self_attn.q_norm.weight", ("self_attn", "q_norm", "scale"), (d,), (d,), False)
      add("self_attn.k_norm.weight", ("self_attn", "k_norm", "scale"), (d,), (d,), False)
    add("mlp.gate_proj.weight", ("mlp", "gate_proj"), (m, e), (e, m), True)
    add("mlp.up_proj.weight", ("mlp", "up_proj"), (m, e), (e, m), True)
    add("mlp.down_proj.weight", ("mlp", "down_proj"), (e, m), (m, e), True)
    add("input_layernorm.weight", ("input_layernorm", "scale"), (e,), (e,), False)
    add("post_attention_layernorm.weight", ("post_attention_layernorm", "scale"), (e,), (e,), False)
  out.append(_Entry("model.norm.weight", ("norm", "scale"), (e,), (e,), False))
  if not cfg.tie_embeddings:
    out.append(_Entry("lm_head.weight", ("lm_head",), (v, e), (e, v), True))
  return out


def _names(keys: list[str], limit: int = 6) -> str:
  shown = ", ".join(repr(k) for k in keys[:limit])
  return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


# ----------------------------------------------------------------------------- load


class _Checkpoint:
  """Tensor name -> the safetensors file holding it (one file, or the shards of an index)."""

  def __init__(self, hf_dir: str):
    single, index = os.path.join(hf_dir, WEIGHTS), os.path.join(hf_dir, INDEX)
    if os.path.isfile(single):
      files = [single]
    elif os.path.isfile(index):
      weight_map = _read_json(index).get("weight_map")
      if not isinstance(weight_map, dict):
        raise UserError(f"{index}: no 'weight_map' object")
      files = [os.path.join(hf_dir, f) for f in sorted(set(weight_map.values()))]
      for f in files:
        if not os.path.isfile(f):
          raise UserError(f"{f}: shard listed in {index} not found")
    else:
      other = [f for f in sorted(os.listdir(hf_dir)) if f.endswith((".bin", ".pt", ".pth"))]
      hint = f" (found {other[0]}: convert it to safetensors)" if other else ""
      raise UserError(f"{hf_dir}: no {WEIGHTS} or {INDEX}{hint}")
    self.file_of: dict[str, str] = {}
    self._handles = {}
    for f in files:
      try:
        self._handles[f] = safe_open(f, framework="numpy")
      except (SafetensorError, OSError) as e:
        raise UserError(f"{f}: cannot read safetensors ({e})") from None
      self.file_of.update({k: f for k in self._handles[f].keys()})

  def shape(self, key: str) -> tuple[int, ...]:
    return tuple(self._handles[self.file_of[key]].get_slice(key).get_shape())

  def dtype(self, key: str) -> str:
    return self._handles[self.file_of[key]].get_slice(key).get_dtype()

  def get(self, key: str) -> np.ndarray:
    return self._handles[self.file_of[key]].get_tensor(key)


def _check_tensors(ckpt: _Checkpoint, spec: list[_Entry], cfg: llama.ModelConfig, where: str):
  """Every tensor the config needs, with its shape, and nothing else (before reading data)."""
  names = set(ckpt.file_of)
  missing = [e.hf_key for e in spec if e.hf_key not in names]
  if missing:
    raise UserError(f"{where}: missing tensor(s) {_names(missing)} required by config.json")
  ignored = {n for n in names if n.endswith("rotary_emb.inv_freq")}
  if cfg.tie_embeddings:
    ignored.add("lm_head.weight")  # HF ties it to embed_tokens anyway.
  extra = sorted(names - {e.hf_key for e in spec} - ignored)
  if extra:
    raise UserError(f"{where}: unexpected tensor(s) {_names(extra)} not used by this config.json")
  for e in spec:
    got = ckpt.shape(e.hf_key)
    if got != e.hf_shape:
      raise UserError(f"{ckpt.file_of[e.hf_key]}: tensor {e.hf_key!r} has shape {list(got)}, "
                      f"expected {list(e.hf_shape)} from config.json")


def load(hf_dir: str | os.PathLike, *, dtype: str = "float32",
         param_dtype: Optional[str] = None) -> tuple[llama.Decoder, dict]:
  """Decoder and params (host numpy arrays; shard them with ``jax.device_put`` as needed).

  ``param_dtype=None`` keeps the dtype the weights are stored in (f32/bf16/f16), so a bf16
  target is not doubled in memory. ``model.apply({"params": params}, tokens_BxT)`` -> logits.
  """
  _check_dtypes(dtype=dtype, param_dtype=param_dtype)
  hf_dir = _check_dir(hf_dir)
  path = os.path.join(hf_dir, CONFIG)
  # The config is checked before the weights are opened (remote code is refused first).
  cfg = _parse_config(_read_json(path), path, dtype, param_dtype or "float32")
  ckpt = _Checkpoint(hf_dir)
  embed = "model.embed_tokens.weight"
  if param_dtype is None and embed in ckpt.file_of:
    cfg = dataclasses.replace(cfg, param_dtype=_ST_DTYPES.get(ckpt.dtype(embed), "float32"))
  spec = _spec(cfg)
  _check_tensors(ckpt, spec, cfg, hf_dir)
  np_dtype = np.dtype(llama.to_dtype(cfg.param_dtype))
  flat = {}
  for e in spec:
    x = ckpt.get(e.hf_key)
    x = (x.T if e.transpose else x).reshape(e.flax_shape)
    flat[e.path] = np.ascontiguousarray(x.astype(np_dtype, copy=False))
  return llama.Decoder(cfg), traverse_util.unflatten_dict(flat)


# ----------------------------------------------------------------------------- save


def _hf_config(cfg: llama.ModelConfig, arch: str) -> dict:
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
      "architectures": [arch], "model_type": _MODEL_TYPE[arch], "vocab_size": cfg.vocab_size,
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


def _hf_tensors(cfg: llama.ModelConfig, params: Any) -> dict[str, np.ndarray]:
  """HF-layout tensors; every key and shape is checked before any conversion."""
  flat = traverse_util.flatten_dict(nn.unbox(dict(params)))
  spec = _spec(cfg)
  show = lambda paths: _names(["/".join(p) for p in paths])
  missing = [e.path for e in spec if e.path not in flat]
  if missing:
    raise UserError(f"params: missing {show(missing)} required by the config")
  extra = sorted(set(flat) - {e.path for e in spec})
  if extra:
    raise UserError(f"params: unexpected {show(extra)} not in the config")
  for e in spec:
    got = tuple(flat[e.path].shape)
    if got != e.flax_shape:
      raise UserError(f"params: {'/'.join(e.path)} has shape {list(got)}, "
                      f"expected {list(e.flax_shape)} from the config")
  out = {}
  for e in spec:
    x = np.asarray(jax.device_get(flat[e.path]))
    x = x.reshape(e.hf_shape[::-1]).T if e.transpose else x.reshape(e.hf_shape)
    out[e.hf_key] = np.ascontiguousarray(x)
  return out


def _write_atomically(hf_dir: str, config: dict, tensors: dict, overwrite: bool) -> None:
  """Write into a sibling temp dir, then rename it into place: never a half-written model."""
  hf_dir = os.path.abspath(os.fspath(hf_dir))
  if os.path.exists(hf_dir) and not os.path.isdir(hf_dir):
    raise UserError(f"{hf_dir}: exists and is not a directory")
  existing = sorted(os.listdir(hf_dir)) if os.path.isdir(hf_dir) else []
  if existing and not overwrite:
    raise UserError(f"{hf_dir}: directory is not empty; pass overwrite=True to replace the model")
  parent, name = os.path.split(hf_dir)
  try:
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=parent)
  except OSError as e:
    raise UserError(f"{hf_dir}: cannot create a directory next to it ({e})") from None
  try:
    save_file(tensors, os.path.join(tmp, WEIGHTS), metadata={"format": "pt"})
    with open(os.path.join(tmp, CONFIG), "w", encoding="utf-8") as f:
      json.dump(config, f, indent=2, sort_keys=True)
      f.write("\n")
    for entry in existing:  # Keep the tokenizer etc. of a model being replaced.
      src = os.path.join(hf_dir, entry)
      if entry == CONFIG or entry.endswith(_WEIGHT_SUFFIXES):
        continue
      (shutil.copytree if os.path.isdir(src) else shutil.copy2)(src, os.path.join(tmp, entry))
    if not existing:
      os.replace(tmp, hf_dir)  # Also replaces an empty directory.
      return
    old = tempfile.mkdtemp(prefix=f".{name}.old-", dir=parent)
    try:
      os.replace(hf_dir, old)
    except OSError:
      os.rmdir(old)
      raise
    try:
      os.replace(tmp, hf_dir)
    except OSError:
      os.replace(old, hf_dir)  # Put the previous model back.
      raise
    shutil.rmtree(old, ignore_errors=True)
  except OSError as e:
    raise UserError(f"{hf_dir}: cannot write the model ({e}); nothing was changed") from None
  finally:
    if os.path.isdir(tmp):
      shutil.rmtree(tmp, ignore_errors=True)


def save(hf_dir: str | os.PathLike, cfg: llama.ModelConfig, params: Any, *,
         architecture: str = "LlamaForCausalLM", overwrite: bool = False) -> None:
  """Export to an HF directory (config.json + model.safetensors) that transformers loads.

  Tensors keep their dtype. Everything is validated before anything is written, and the
  directory appears (or is replaced, with ``overwrite``) in one rename.
  """
  config = _hf_config(cfg, architecture)
  tensors = _hf_tensors(cfg, params)
  config["dtype"] = config["torch_dtype"] = str(tensors["model.embed_tokens.weight"].dtype)
  _write_atomically(os.fspath(hf_dir), config, tensors, overwrite)


# ----------------------------------------------------------------------------- tokenizer


def load_tokenizer(hf_dir: str | os.PathLike):
  """The fast tokenizer (``tokenizers.Tokenizer``) from tokenizer.json."""
  import tokenizers  # Only callers that tokenize pay for the import.

  path = os.path.join(_check_dir(hf_dir), "tokenizer.json")
  if not os.path.isfile(path):
    raise UserError(f"{path}: not found (a fast tokenizer saved as tokenizer.json is required)")
  try:
    return tokenizers.Tokenizer.from_file(path)
  except Exception as e:  # The Rust parser raises a bare Exception.
    raise UserError(f"{path}: cannot parse the tokenizer ({e})") from None


@dataclasses.dataclass(frozen=True)
class GenerationInfo:
  bos_token_id: Optional[int]
  eos_token_ids: tuple[int, ...]  # generation stops at any of them
  pad_token_id: Optional[int]


def read_generation_info(hf_dir: str | os.PathLike) -> GenerationInfo:
  """Special token ids; generation_config.json overrides config.json, as in ``generate``."""
  hf_dir = _check_dir(hf_dir)
  merged: dict[str, Any] = {}
  for name in (CONFIG, "generation_config.json"):
    path = os.path.join(hf_dir, name)
    if os.path.isfile(path):
      raw = _read_json(path)
      for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if raw.get(key) is not None:
          merged[key] = (raw[key], path)

  def ids(key: str) -> tuple[int, ...]:
    if key not in merged:
      return ()
    value, path = merged[key]
    value = value if isinstance(value, list) else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
      raise UserError(f"{path}: {key} must be an integer or a list of integers, got {value!r}")
    return tuple(value)

  first = lambda key: (ids(key) or (None,))[0]
  return GenerationInfo(first("bos_token_id"), ids("eos_token_id"), first("pad_token_id"))
