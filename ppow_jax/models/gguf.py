"""GGUF (llama.cpp's file format) import: a quantized LLaMA-family model as our decoder.

A GGUF file carries the config as ``<arch>.*`` metadata keys, the tensors under llama.cpp's
names (``blk.N.attn_q.weight``), possibly quantized, and the tokenizer and chat template as
``tokenizer.*`` keys. Here the metadata becomes an HF ``config.json`` dict read by
``hf_config.parse_config``, and the tensors are dequantized (``gguf.quants.dequantize``, float32)
and renamed to HF names, then go through ``hf.params_from_checkpoint``: one reading of each
setting and one tensor table for both formats.

llama.cpp's converter reorders the rows of q_proj and k_proj of ``llama`` models from HF's
"rotate halves" RoPE layout to its interleaved one (each head's rows ``[2, D/2]`` become
``[D/2, 2]``, with the KV head count for k); loading undoes it. Qwen2/Qwen3 files are stored in
HF's layout. The tokenizer is in ``gguf_tokenizer``.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import numpy as np

from ppow_jax.errors import UserError
from ppow_jax.models import hf, hf_config, llama

# GGUF general.architecture -> HF architecture. Mistral-family models are written as "llama".
ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                 "qwen3": "Qwen3ForCausalLM"}
_PERMUTED_QK = ("llama",)  # llama.cpp's converter permutes q/k rows for these architectures
MAGIC = b"GGUF"

_GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight",
                 "output_norm.weight": "model.norm.weight", "output.weight": "lm_head.weight"}
_LAYER_NAMES = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
                "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
                "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
                "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
                "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}


def hf_name(name: str) -> str:
  """llama.cpp's tensor name -> HF's; an unknown name is kept (and reported as unexpected)."""
  if name in _GLOBAL_NAMES:
    return _GLOBAL_NAMES[name]
  parts = name.split(".")
  if (len(parts) == 4 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _LAYER_NAMES
      and parts[3] in ("weight", "bias")):
    return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.{parts[3]}"
  return name


def unpermute_qk(w_RxE: np.ndarray, n_head: int) -> np.ndarray:
  """Inverse of llama.cpp's q/k row order: per head, rows ``[D/2, 2]`` back to ``[2, D/2]``."""
  rows, cols = w_RxE.shape
  return (w_RxE.reshape(n_head, rows // n_head // 2, 2, cols).swapaxes(1, 2)
          .reshape(rows, cols))


# ----------------------------------------------------------------------------- reading


def open_reader(path: str | os.PathLike):
  """A ``gguf.GGUFReader`` with one-line errors for a missing, foreign or damaged file."""
  import gguf  # Only GGUF users pay for the import.

  path = os.fspath(path)
  if not os.path.isfile(path):
    raise UserError(f"{path}: GGUF file not found")
  with open(path, "rb") as f:
    magic = f.read(4)
  if magic != MAGIC:
    raise UserError(f"{path}: not a GGUF file (starts with {magic!r}, expected {MAGIC!r})")
  try:
    reader = gguf.GGUFReader(path)
  except (ValueError, IndexError, KeyError, OverflowError, UnicodeDecodeError) as e:
    if "GGMLQuantizationType" in str(e):
      raise UserError(f"{path}: unknown tensor type ({e})") from None
    raise UserError(f"{path}: truncated or corrupt GGUF file ({e})") from None
  size = os.path.getsize(path)
  for t in reader.tensors:
    if t.data_offset + t.n_bytes > size:
      raise UserError(f"{path}: truncated GGUF file (tensor {t.name!r} ends past the end)")
  return reader


_REQUIRED = object()


def field(reader, key: str, default: Any = _REQUIRED) -> Any:
  """A metadata value as Python (str, number, list); ``default`` when absent."""
  f = reader.fields.get(key)
  if f is None:
    if default is _REQUIRED:
      raise UserError(f"{reader.data.filename}: missing metadata key {key!r}")
    return default
  return f.contents()


def architecture(reader) -> str:
  arch = field(reader, "general.architecture")
  if arch not in ARCHITECTURES:
    raise UserError(f"{reader.data.filename}: unsupported architecture {arch!r}; supported: "
                    f"{', '.join(ARCHITECTURES)}")
  return arch


def hf_config_dict(reader) -> dict:
  """The model's config as an HF ``config.json`` dict (for ``hf_config.parse_config``)."""
  path = reader.data.filename
  arch = architecture(reader)
  names = {t.name: t for t in reader.tensors}

  def get(key, default=_REQUIRED):
    value = field(reader, f"{arch}.{key}", default)
    if isinstance(value, list):  # per-layer values; only uniform ones are supported
      if len(set(value)) != 1:
        raise UserError(f"{path}: per-layer {arch}.{key} {value[:8]!r} is not supported")
      value = value[0]
    return value

  for key in ("rope.scaling.type", "attention.sliding_window"):
    value = get(key, None)
    if value not in (None, "none", 0):
      raise UserError(f"{path}: {arch}.{key}={value!r} is not supported")
  if "rope_freqs.weight" in names:
    raise UserError(f"{path}: tensor 'rope_freqs.weight' (llama3 RoPE scaling) is not supported")
  if "token_embd.weight" not in names:
    raise UserError(f"{path}: missing tensor 'token_embd.weight'")
  hidden, heads = int(get("embedding_length")), int(get("attention.head_count"))
  head_dim = int(get("attention.key_length", hidden // max(heads, 1)))
  rotary = get("rope.dimension_count", None)
  if rotary is not None and int(rotary) != head_dim:
    raise UserError(f"{path}: {arch}.rope.dimension_count={rotary} != head_dim {head_dim} "
                    f"(partial rotary embeddings are not supported)")
  vocab = int(get("vocab_size", int(names["token_embd.weight"].shape[-1])))
  return {
      "architectures": [ARCHITECTURES[arch]], "vocab_size": vocab, "hidden_size": hidden,
      "intermediate_size": int(get("feed_forward_length")),
      "num_hidden_layers": int(get("block_count")), "num_attention_heads": heads,
      "num_key_value_heads": int(get("attention.head_count_kv", heads)),
      "head_dim": head_dim,
      "rope_theta": float(get("rope.freq_base", 10000.0)),
      "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon", 1e-6)),
      "max_position_embeddings": int(get("context_length", 2048)),
      "tie_word_embeddings": "output.weight" not in names,
  }


class _Checkpoint:
  """GGUF tensors under HF names, dequantized to float32 [out, in] on ``get``."""

  def __init__(self, reader, cfg: llama.ModelConfig):
    self._path = reader.data.filename
    self._tensors = {hf_name(t.name): t for t in reader.tensors}
    self.names = set(self._tensors)
    self._permute = {}
    if architecture(reader) in _PERMUTED_QK:
      for i in range(cfg.num_layers):
        self._permute[f"model.layers.{i}.self_attn.q_proj.weight"] = cfg.num_heads
        self._permute[f"model.layers.{i}.self_attn.k_proj.weight"] = cfg.num_kv_heads

  def describe(self, key: str) -> str:
    t = self._tensors.get(key)
    if t is not None:
      return t.name
    inverse = {v: k for k, v in _GLOBAL_NAMES.items()}
    if key in inverse:
      return inverse[key]
    parts = key.split(".")  # model.layers.N.<module>.<sub>.weight
    layer_names = {v: k for k, v in _LAYER_NAMES.items()}
    module = ".".join(parts[3:-1])
    if parts[:2] == ["model", "layers"] and module in layer_names:
      return f"blk.{parts[2]}.{layer_names[module]}.{parts[-1]}"
    return key

  def where(self, key: str) -> str:
    return self._path

  def shape(self, key: str) -> tuple[int, ...]:
    return tuple(int(n) for n in reversed(self._tensors[key].shape))  # GGUF lists dims inner-first

  def get(self, key: str) -> np.ndarray:
    import gguf

    t = self._tensors[key]
    try:
      x = gguf.quants.dequantize(t.data, t.tensor_type)
    except NotImplementedError:
      raise UserError(f"{self._path}: tensor {t.name!r} has type {t.tensor_type.name}, which the "
                      f"gguf package cannot dequantize") from None
    x = np.asarray(x, np.float32).reshape(self.shape(key))
    if key in self._permute:
      x = unpermute_qk(x, self._permute[key])
    return x


def load_config(path: str | os.PathLike, *, dtype: str = "float32",
                param_dtype: str = "float32") -> llama.ModelConfig:
  """The decoder config of a GGUF file (reads only the metadata)."""
  hf_config.check_dtypes(dtype=dtype, param_dtype=param_dtype)
  reader = open_reader(path)
  return hf_config.parse_config(hf_config_dict(reader), os.fspath(path), dtype, param_dtype)


def load(path: str | os.PathLike, *, dtype: str = "float32", param_dtype: Optional[str] = None,
         reader=None) -> tuple[llama.Decoder, dict]:
  """Decoder and params (host numpy) from a GGUF file; the contract of ``hf.load``.

  Quantized tensors are dequantized to float32; ``param_dtype`` (default float32) casts them.
  ``model.apply({"params": params}, tokens_BxT)`` -> logits. ``reader``: the file already open
  (``open_reader``; parsing a large vocabulary's metadata takes seconds).
  """
  param_dtype = param_dtype or "float32"
  hf_config.check_dtypes(dtype=dtype, param_dtype=param_dtype)
  path = os.fspath(path)
  reader = reader or open_reader(path)
  cfg = hf_config.parse_config(hf_config_dict(reader), path, dtype, param_dtype)
  params = hf.params_from_checkpoint(_Checkpoint(reader, cfg), cfg, path, "the GGUF metadata")
  return llama.Decoder(cfg), params


def is_gguf(path: str | os.PathLike) -> bool:
  """A ``.gguf`` name, or a file that starts with the GGUF magic."""
  path = os.fspath(path)
  if path.lower().endswith(".gguf"):
    return True
  if not os.path.isfile(path):
    return False
  with open(path, "rb") as f:
    return f.read(4) == MAGIC
