"""Hugging Face interop: read and write LLaMA-family checkpoints without importing torch.

A checkpoint directory holds ``config.json`` and ``model.safetensors`` (or a sharded
``model.safetensors.index.json``). HF stores linear weights as ``[out, in]``; our decoder keeps
``[in, out]`` with heads split out (``q_proj [E, H, D]``, ``o_proj [H, D, E]``), so every
tensor goes through one table (``_spec``) that both directions share. The config side lives in
``hf_config``; other formats (GGUF) reuse ``params_from_checkpoint`` with their own reader.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from typing import Any, Optional, Protocol

import flax.linen as nn
import jax
import numpy as np
from flax import traverse_util
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from ppow_jax import cli
from ppow_jax.errors import UserError
from ppow_jax.models import llama
from ppow_jax.models.hf_config import (ARCHITECTURES, CONFIG, check_dir, check_dtypes,  # noqa: F401
                                       check_same_vocab, load_config, parse_config, read_json,
                                       to_hf_config)

WEIGHTS, INDEX = "model.safetensors", "model.safetensors.index.json"
_ST_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}
# Files that describe weights; everything else (tokenizer, generation config) survives overwrite.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".msgpack", ".h5", ".ckpt",
                    ".index.json")


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
      weight_map = read_json(index).get("weight_map")
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

    self.names = set(self.file_of)

  def describe(self, key: str) -> str:
    return key

  def where(self, key: str) -> str:
    return self.file_of[key]

  def shape(self, key: str) -> tuple[int, ...]:
    return tuple(self._handles[self.file_of[key]].get_slice(key).get_shape())

  def dtype(self, key: str) -> str:
    return self._handles[self.file_of[key]].get_slice(key).get_dtype()

  def get(self, key: str) -> np.ndarray:
    return self._handles[self.file_of[key]].get_tensor(key)


class Checkpoint(Protocol):
  """Tensors by HF name: what ``params_from_checkpoint`` needs from a file format."""
  names: set[str]

  def shape(self, key: str) -> tuple[int, ...]: ...

  def get(self, key: str) -> np.ndarray: ...

  def describe(self, key: str) -> str:
    """The tensor's name in the file (for messages)."""

  def where(self, key: str) -> str:
    """The file holding the tensor (for messages)."""


def _check_tensors(ckpt: Checkpoint, spec: list[_Entry], cfg: llama.ModelConfig, where: str,
                   source: str) -> None:
  """Every tensor the config needs, with its shape, and nothing else (before reading data)."""
  names = ckpt.names
  missing = [e.hf_key for e in spec if e.hf_key not in names]
  if missing:
    raise UserError(f"{where}: missing tensor(s) {_names([ckpt.describe(k) for k in missing])} "
                    f"required by {source}")
  ignored = {n for n in names if n.endswith("rotary_emb.inv_freq")}
  if cfg.tie_embeddings:
    ignored.add("lm_head.weight")  # HF ties it to embed_tokens anyway.
  extra = sorted(names - {e.hf_key for e in spec} - ignored)
  if extra:
    raise UserError(f"{where}: unexpected tensor(s) {_names([ckpt.describe(k) for k in extra])} "
                    f"not used by this {source}")
  for e in spec:
    got = ckpt.shape(e.hf_key)
    if got != e.hf_shape:
      raise UserError(f"{ckpt.where(e.hf_key)}: tensor {ckpt.describe(e.hf_key)!r} has shape "
                      f"{list(got)}, "
                      f"expected {list(e.hf_shape)} from {source}")


def params_from_checkpoint(ckpt: Checkpoint, cfg: llama.ModelConfig, where: str,
                           source: str = CONFIG) -> dict:
  """Our param tree (host numpy, ``cfg.param_dtype``) from HF-named ``[out, in]`` tensors."""
  spec = _spec(cfg)
  _check_tensors(ckpt, spec, cfg, where, source)
  np_dtype = np.dtype(llama.to_dtype(cfg.param_dtype))
  flat = {}
  for e in spec:
    x = ckpt.get(e.hf_key)
    x = (x.T if e.transpose else x).reshape(e.flax_shape)
    flat[e.path] = np.ascontiguousarray(x.astype(np_dtype, copy=False))
  return traverse_util.unflatten_dict(flat)


def load(hf_dir: str | os.PathLike, *, dtype: str = "float32",
         param_dtype: Optional[str] = None) -> tuple[llama.Decoder, dict]:
  """Decoder and params (host numpy arrays; shard them with ``jax.device_put`` as needed).

  ``param_dtype=None`` keeps the dtype the weights are stored in (f32/bf16/f16), so a bf16
  target is not doubled in memory. ``model.apply({"params": params}, tokens_BxT)`` -> logits.
  """
  check_dtypes(dtype=dtype, param_dtype=param_dtype)
  hf_dir = check_dir(hf_dir)
  path = os.path.join(hf_dir, CONFIG)
  # The config is checked before the weights are opened (remote code is refused first).
  cfg = parse_config(read_json(path), path, dtype, param_dtype or "float32")
  ckpt = _Checkpoint(hf_dir)
  embed = "model.embed_tokens.weight"
  if param_dtype is None and embed in ckpt.names:
    cfg = dataclasses.replace(cfg, param_dtype=_ST_DTYPES.get(ckpt.dtype(embed), "float32"))
  return llama.Decoder(cfg), params_from_checkpoint(ckpt, cfg, hf_dir)


# ----------------------------------------------------------------------------- save



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
  tmp = cli.staging_dir(hf_dir)
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
  config = to_hf_config(cfg, architecture)
  tensors = _hf_tensors(cfg, params)
  config["dtype"] = config["torch_dtype"] = str(tensors["model.embed_tokens.weight"].dtype)
  _write_atomically(os.fspath(hf_dir), config, tensors, overwrite)


# ----------------------------------------------------------------------------- tokenizer


def load_tokenizer(hf_dir: str | os.PathLike):
  """The fast tokenizer (``tokenizers.Tokenizer``) from tokenizer.json."""
  import tokenizers  # Only callers that tokenize pay for the import.

  path = os.path.join(check_dir(hf_dir), "tokenizer.json")
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
  hf_dir = check_dir(hf_dir)
  merged: dict[str, Any] = {}
  for name in (CONFIG, "generation_config.json"):
    path = os.path.join(hf_dir, name)
    if os.path.isfile(path):
      raw = read_json(path)
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
