"""EAGLE-3 drafters on disk, in the Hugging Face layout SGLang, vLLM and llama.cpp read.

``config.json`` carries what engines need without guessing: ``draft_vocab_size``,
``target_hidden_size``, ``eagle_aux_hidden_state_layer_ids`` (the target hidden states fused,
as inputs of those layers) and ``norm_before_fc`` (then ``input_norm.weight`` holds the RMSNorm
over the concatenated features); ``model.safetensors`` the weights plus ``d2t``/``t2d``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil
import tempfile
from typing import Any, Optional

from absl import logging
import flax.linen as nn
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from ppow_jax.errors import UserError
from ppow_jax.models import llama
from ppow_jax.models.eagle3 import (DraftVocab, Eagle3Config, _init_variables,
                                    identity_draft_vocab)

SAFETENSORS = "model.safetensors"
CONFIG = "config.json"
_IGNORED_KEYS = ("embed_tokens.weight",)  # published drafters may ship the target's embedding

# ---- Hugging Face layout -------------------------------------------------------------------
# (HF key, Flax path, kind). Kinds: "t" 2-D transpose; "in_heads" [in, H, D] <-> [H*D, in];
# "heads_out" [H, D, E] <-> [E, H*D]; "vec" unchanged.
_SPECS = (
    ("fc.weight", ("fc",), "t"),
    ("midlayer.hidden_norm.weight", ("midlayer", "hidden_norm", "scale"), "vec"),
    ("midlayer.input_layernorm.weight", ("midlayer", "input_layernorm", "scale"), "vec"),
    ("midlayer.self_attn.q_proj.weight", ("midlayer", "self_attn", "q_proj"), "in_heads"),
    ("midlayer.self_attn.k_proj.weight", ("midlayer", "self_attn", "k_proj"), "in_heads"),
    ("midlayer.self_attn.v_proj.weight", ("midlayer", "self_attn", "v_proj"), "in_heads"),
    ("midlayer.self_attn.o_proj.weight", ("midlayer", "self_attn", "o_proj"), "heads_out"),
    ("midlayer.post_attention_layernorm.weight",
     ("midlayer", "post_attention_layernorm", "scale"), "vec"),
    ("midlayer.mlp.gate_proj.weight", ("midlayer", "mlp", "gate_proj"), "t"),
    ("midlayer.mlp.up_proj.weight", ("midlayer", "mlp", "up_proj"), "t"),
    ("midlayer.mlp.down_proj.weight", ("midlayer", "mlp", "down_proj"), "t"),
    ("norm.weight", ("norm", "scale"), "vec"),
    ("lm_head.weight", ("lm_head",), "t"),
)


_INPUT_NORM = ("input_norm.weight", ("input_norm", "scale"), "vec")  # with norm_before_fc


def _specs(cfg: Eagle3Config) -> tuple:
  return _SPECS + ((_INPUT_NORM,) if cfg.norm_before_fc else ())


def _hf_shape(shape: tuple, kind: str) -> tuple:
  if kind == "t":
    return tuple(reversed(shape))
  if kind == "in_heads":
    return (shape[1] * shape[2], shape[0])
  if kind == "heads_out":
    return (shape[2], shape[0] * shape[1])
  return tuple(shape)


def _to_hf(x: np.ndarray, kind: str) -> np.ndarray:
  if kind in ("in_heads", "heads_out"):
    x = x.reshape(x.shape[0], -1) if kind == "in_heads" else x.reshape(-1, x.shape[-1])
  return np.ascontiguousarray(x.T) if kind != "vec" else x


def _from_hf(w: np.ndarray, kind: str, shape: tuple) -> np.ndarray:
  return w if kind == "vec" else np.ascontiguousarray(w.T).reshape(shape)


@functools.lru_cache(maxsize=16)
def _expected_shapes(cfg: Eagle3Config) -> dict:
  abstract = jax.eval_shape(functools.partial(_init_variables, cfg), jax.random.key(0))
  flat = traverse_util.flatten_dict(nn.unbox(abstract["params"]))
  return {path: tuple(x.shape) for path, x in flat.items()}


def validate_eagle3_tree(cfg: Eagle3Config, params: Any, vocab: DraftVocab) -> None:
  """Raises UserError naming the first missing, misshaped or extra key (HF name first),
  because a wrong layout loads silently in serving engines and drafts garbage."""
  expected = _expected_shapes(cfg)
  got = traverse_util.flatten_dict(nn.unbox(params))
  for hf_key, path, kind in _specs(cfg):
    where = f"{hf_key} (params path {'/'.join(path)})"
    if path not in got:
      raise UserError(f"EAGLE-3 parameter {where} is missing")
    shape = tuple(np.shape(got[path]))
    if shape != expected[path]:
      raise UserError(f"EAGLE-3 parameter {where} has shape {shape}, expected "
                      f"{expected[path]} (HF shape {_hf_shape(expected[path], kind)})")
  extra = sorted(set(got) - set(expected), key=str)
  if extra:
    raise UserError(f"EAGLE-3 params hold an unexpected key {'/'.join(map(str, extra[0]))}")
  d2t, t2d = np.asarray(vocab.d2t_Vd), np.asarray(vocab.t2d_V)
  vd, v = cfg.draft_vocab_size, cfg.vocab_size
  if d2t.shape != (vd,) or not np.issubdtype(d2t.dtype, np.integer):
    raise UserError(f"EAGLE-3 d2t has shape {d2t.shape} dtype {d2t.dtype}, expected int ({vd},)")
  if t2d.shape != (v,) or t2d.dtype != bool:
    raise UserError(f"EAGLE-3 t2d has shape {t2d.shape} dtype {t2d.dtype}, expected bool ({v},)")
  tgt = np.arange(vd) + d2t
  if (tgt.min() < 0 or tgt.max() >= v or len(np.unique(tgt)) != vd or not t2d[tgt].all()
      or t2d.sum() != vd):
    raise UserError("EAGLE-3 d2t and t2d disagree: draft ids must map to distinct target ids "
                    "in [0, vocab_size) that are exactly the ids t2d marks")


def _config_json(cfg: Eagle3Config, param_dtype: str) -> dict:
  out = {
      "architectures": ["LlamaForCausalLMEagle3"], "model_type": "llama",
      "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
      "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads,
      "head_dim": cfg.head_dim, "hidden_act": "silu", "rms_norm_eps": cfg.rms_norm_eps,
      "rope_theta": cfg.rope_theta, "vocab_size": cfg.vocab_size,
      "draft_vocab_size": cfg.draft_vocab_size, "target_hidden_size": cfg.target_hidden_size,
      "max_position_embeddings": cfg.max_position_embeddings, "num_hidden_layers": 1,
      "tie_word_embeddings": False, "initializer_range": cfg.initializer_range,
      "torch_dtype": param_dtype, "ppow_jax_compute_dtype": cfg.dtype,
      "norm_before_fc": cfg.norm_before_fc, "norm_before_residual": False,
  }
  if cfg.aux_layer_ids:
    out["eagle_aux_hidden_state_layer_ids"] = list(cfg.aux_layer_ids)
  if cfg.rope_scaling is not None:
    out["rope_scaling"] = {"rope_type": "llama3", **dataclasses.asdict(cfg.rope_scaling)}
  return out


def _config_from_json(c: dict, path: str) -> Eagle3Config:
  try:
    rope = c.get("rope_scaling") or c.get("rope_parameters") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "llama3"):
      raise UserError(f"{path}: rope type {rope_type!r} is not supported (only llama3)")
    scaling = None
    if rope_type == "llama3":
      names = [f.name for f in dataclasses.fields(llama.RopeScaling)]
      scaling = llama.RopeScaling(**{k: rope[k] for k in names if k in rope})
    if c.get("norm_before_residual"):
      raise UserError(f"{path}: norm_before_residual=true is not supported")
    if c.get("num_hidden_layers", 1) != 1:
      raise UserError(f"{path}: num_hidden_layers={c['num_hidden_layers']}; only 1 is supported")
    torch_dtype = str(c.get("torch_dtype", c.get("dtype", "float32"))).replace("torch.", "")
    param_dtype = torch_dtype if torch_dtype in ("float32", "bfloat16", "float16") else "float32"
    return Eagle3Config(
        hidden_size=c["hidden_size"], intermediate_size=c["intermediate_size"],
        num_heads=c["num_attention_heads"],
        num_kv_heads=c.get("num_key_value_heads") or c["num_attention_heads"],
        vocab_size=c["vocab_size"], draft_vocab_size=c.get("draft_vocab_size") or c["vocab_size"],
        target_hidden_size=c.get("target_hidden_size") or 0, head_dim=c.get("head_dim") or 0,
        rope_theta=float(c.get("rope_theta", rope.get("rope_theta", 10000.0))),
        rope_scaling=scaling, rms_norm_eps=float(c.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=c.get("max_position_embeddings", 2048),
        initializer_range=c.get("initializer_range", 0.02), param_dtype=param_dtype,
        dtype=c.get("ppow_jax_compute_dtype", param_dtype),
        norm_before_fc=bool(c.get("norm_before_fc", False)),
        aux_layer_ids=tuple(c.get("eagle_aux_hidden_state_layer_ids") or ()))
  except UserError:
    raise
  except KeyError as e:
    raise UserError(f"{path}: missing key {e.args[0]!r}") from None
  except (TypeError, ValueError) as e:
    raise UserError(f"{path}: {e}") from None


def save_eagle3(out_dir: str, cfg: Eagle3Config, params: Any, vocab: DraftVocab, *,
                dtype: Optional[str] = None) -> None:
  """Export in the HF/SGLang/vLLM layout: ``config.json`` + ``model.safetensors``.

  Every key and shape is validated before anything touches the disk. A new directory appears
  at once (temp dir + rename); into an existing directory each file is replaced atomically,
  other files there (e.g. a tokenizer) are kept. ``dtype`` casts the weights (default
  ``cfg.param_dtype``).
  """
  from safetensors.numpy import save_file
  validate_eagle3_tree(cfg, params, vocab)
  dtype = dtype or cfg.param_dtype
  np_dtype = llama.to_dtype(dtype)
  flat = traverse_util.flatten_dict(nn.unbox(params))
  tensors = {hf: _to_hf(np.asarray(flat[path]).astype(np_dtype), kind)
             for hf, path, kind in _specs(cfg)}
  tensors["d2t"] = np.asarray(vocab.d2t_Vd).astype(np.int64)
  tensors["t2d"] = np.asarray(vocab.t2d_V).astype(bool)
  config_text = json.dumps(_config_json(cfg, dtype), indent=2, sort_keys=True) + "\n"

  out_dir = os.path.abspath(out_dir)
  if os.path.exists(out_dir) and not os.path.isdir(out_dir):
    raise UserError(f"{out_dir} exists and is not a directory")
  parent, name = os.path.split(out_dir)
  os.makedirs(parent, exist_ok=True)
  exists = os.path.isdir(out_dir)
  tmp = tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=out_dir if exists else parent)
  try:
    save_file(tensors, os.path.join(tmp, SAFETENSORS), metadata={"format": "pt"})
    with open(os.path.join(tmp, CONFIG), "w") as f:
      f.write(config_text)
    if exists:
      for fname in (SAFETENSORS, CONFIG):  # weights first: config.json marks a complete export
        os.replace(os.path.join(tmp, fname), os.path.join(out_dir, fname))
      shutil.rmtree(tmp)
    else:
      os.rename(tmp, out_dir)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  logging.info("Saved EAGLE-3 drafter (%s, %d tensors) to %s", dtype, len(tensors), out_dir)


def _weight_files(in_dir: str) -> list[str]:
  """The safetensors files of a checkpoint (single or sharded); pickles are refused."""
  single = os.path.join(in_dir, SAFETENSORS)
  index = single + ".index.json"
  if os.path.isfile(single):
    return [single]
  if os.path.isfile(index):
    with open(index) as f:
      shards = sorted(set(json.load(f)["weight_map"].values()))
    return [os.path.join(in_dir, s) for s in shards]
  pickles = sorted(f for f in os.listdir(in_dir) if f.endswith((".bin", ".pt", ".pth")))
  if pickles:
    p = os.path.join(in_dir, pickles[0])
    raise UserError(
        f"{p}: refusing to load a pickled checkpoint (we never unpickle). Convert it once with "
        f"python -c \"import torch; from safetensors.torch import save_file; save_file(torch.load("
        f"'{p}', weights_only=True), '{single}')\"")
  raise UserError(f"{in_dir}: no {SAFETENSORS} found")


def load_eagle3(in_dir: str, *, param_dtype: Optional[str] = None, dtype: Optional[str] = None
                ) -> tuple[Eagle3Config, dict, DraftVocab]:
  """Load an EAGLE-3 drafter in the HF layout (ours or published); ``param_dtype``/``dtype``
  override the config's (published checkpoints are often float16)."""
  if not os.path.isdir(in_dir):
    raise UserError(f"{in_dir}: no such directory")
  from safetensors.numpy import load_file
  files = _weight_files(in_dir)
  config_path = os.path.join(in_dir, CONFIG)
  if not os.path.isfile(config_path):
    raise UserError(f"{config_path}: missing (an EAGLE-3 export needs config.json)")
  with open(config_path) as f:
    raw = json.load(f)
  if "eagle3" not in " ".join(raw.get("architectures") or []).lower():
    logging.warning("%s: architectures=%s does not name EAGLE-3", config_path,
                    raw.get("architectures"))
  cfg = _config_from_json(raw, config_path)
  overrides = {k: v for k, v in (("param_dtype", param_dtype), ("dtype", dtype)) if v}
  cfg = dataclasses.replace(cfg, **overrides)
  tensors = {k: v for fname in files for k, v in load_file(fname).items()}
  for key in _IGNORED_KEYS:
    if tensors.pop(key, None) is not None:
      logging.info("%s: ignoring %s (the drafter uses the target's embedding)", in_dir, key)
  expected, np_dtype, flat = _expected_shapes(cfg), llama.to_dtype(cfg.param_dtype), {}
  for hf_key, path, kind in _specs(cfg):
    if hf_key not in tensors:
      raise UserError(f"{in_dir}: EAGLE-3 tensor {hf_key} is missing")
    w, want = tensors.pop(hf_key), _hf_shape(expected[path], kind)
    if tuple(w.shape) != want:
      raise UserError(f"{in_dir}: EAGLE-3 tensor {hf_key} has shape {tuple(w.shape)}, "
                      f"expected {want}")
    flat[path] = jnp.asarray(_from_hf(w, kind, expected[path]).astype(np_dtype))
  if "d2t" in tensors or "t2d" in tensors:
    if "d2t" not in tensors or "t2d" not in tensors:
      raise UserError(f"{in_dir}: EAGLE-3 tensor {'t2d' if 'd2t' in tensors else 'd2t'} missing")
    vocab = DraftVocab(jnp.asarray(tensors.pop("d2t").astype(np.int32)),
                       jnp.asarray(tensors.pop("t2d").astype(bool)))
  elif cfg.draft_vocab_size == cfg.vocab_size:
    vocab = identity_draft_vocab(cfg.vocab_size)
  else:
    raise UserError(f"{in_dir}: draft_vocab_size < vocab_size but no d2t/t2d tensors")
  if tensors:
    raise UserError(f"{in_dir}: unexpected EAGLE-3 tensor {sorted(tensors)[0]}")
  params = traverse_util.unflatten_dict(flat)
  validate_eagle3_tree(cfg, params, vocab)
  return cfg, params, vocab
