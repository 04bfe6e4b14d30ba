"""A synthetic target/drafter pair with high acceptance, for measuring the engine before
trained models exist.

The target is a LLaMA decoder of L layers whose layers after the first have their output
projections (``o_proj``, ``down_proj``) scaled down by ``residual_scale``: they cost as much as
ordinary layers but barely move the residual stream. The drafter is an *independent* 1-layer
LM made of copies of the target's embedding, first layer, final norm and head. So the drafter
predicts what the target predicts most of the time, at roughly 1/L of the target's layer
compute (plus a full-size LM head). Nothing about this pair is trained: it exercises speed and
accounting, not draft quality, and every report that uses it says ``"pair": "synthetic"``.

``load_pair`` loads a converted model pair instead (a target directory or GGUF name and a
drafter directory), for the tools that take either. ``save_pair`` writes both models in the
Hugging Face layout (``target/``, ``drafter/``) with a tokenizer that transformers and
llama.cpp's ``convert_hf_to_gguf.py`` both accept (see ``build_tokenizer``).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Optional

import jax
import numpy as np

from ppow_jax import drafters
from ppow_jax.errors import UserError
from ppow_jax.models import gguf_convert, hf, llama

UNK, BOS, EOS = "<unk>", "<s>", "</s>"
SPACE = "\u2581"  # SentencePiece's word-boundary mark


@dataclasses.dataclass(frozen=True)
class SyntheticSpec:
  num_layers: int = 8
  hidden_size: int = 256
  intermediate_size: int = 768
  vocab_size: int = 2048
  num_heads: int = 8
  num_kv_heads: int = 4
  max_position_embeddings: int = 2048
  residual_scale: float = 0.05  # multiplies o_proj/down_proj of layers 1..L-1
  lm_head_scale: float = 8.0  # sharper target/draft distributions than the 0.02 init gives
  seed: int = 0
  dtype: str = "float32"  # parameters and compute (float32, bfloat16)


@dataclasses.dataclass(frozen=True)
class Pair:
  target_cfg: llama.ModelConfig
  target_params: Any
  drafter: Optional[drafters.Drafter]  # None: a target alone (load_pair without a drafter)
  draft_params: Any
  description: str


def load_pair(target: str, drafter: str = "", dtype: str = "float32") -> Pair:
  """A converted target (a directory or a GGUF name: ``gguf_convert.load``) and, unless
  ``drafter`` is empty, a drafter for it (``drafters.load``: an HF LM or EAGLE-3 directory)."""
  model, target_params = gguf_convert.load(target, dtype=dtype)
  draft, draft_params = (drafters.load(drafter, model.cfg, dtype) if drafter
                         else (None, None))
  description = f"target {target}" + (f", drafter {drafter}" if drafter else "")
  return Pair(model.cfg, target_params, draft, draft_params, description)


def synthetic_pair(spec: SyntheticSpec = SyntheticSpec()) -> Pair:
  """Target of ``spec.num_layers`` layers and its 1-layer copy as an independent LM drafter.

  The weights are drawn and scaled in float32 and then cast to ``spec.dtype``, so pairs of
  different dtypes hold the same weights up to rounding.
  """
  try:
    dtype = llama.to_dtype(spec.dtype)
  except ValueError as e:
    raise UserError(f"synthetic pair: {e}") from None
  tcfg = llama.ModelConfig(
      vocab_size=spec.vocab_size, hidden_size=spec.hidden_size,
      intermediate_size=spec.intermediate_size, num_layers=spec.num_layers,
      num_heads=spec.num_heads, num_kv_heads=spec.num_kv_heads,
      max_position_embeddings=spec.max_position_embeddings)
  params = jax.tree_util.tree_map(np.asarray,
                                  llama.init_params(tcfg, jax.random.PRNGKey(spec.seed)))
  params = dict(params)
  params["lm_head"] = params["lm_head"] * np.float32(spec.lm_head_scale)
  for i in range(1, spec.num_layers):
    layer = params[f"layers_{i}"]
    attn, mlp = dict(layer["self_attn"]), dict(layer["mlp"])
    attn["o_proj"] = attn["o_proj"] * np.float32(spec.residual_scale)
    mlp["down_proj"] = mlp["down_proj"] * np.float32(spec.residual_scale)
    params[f"layers_{i}"] = {**layer, "self_attn": attn, "mlp": mlp}
  tcfg = dataclasses.replace(tcfg, dtype=spec.dtype, param_dtype=spec.dtype)
  params = jax.tree_util.tree_map(lambda x: np.asarray(x.astype(dtype)), params)
  dcfg = dataclasses.replace(tcfg, num_layers=1)
  dparams = {k: params[k] for k in ("embed_tokens", "layers_0", "norm", "lm_head")}
  desc = (f"synthetic ({spec.dtype}): target = {spec.num_layers}-layer LLaMA "
          f"(hidden {spec.hidden_size}, "
          f"mlp {spec.intermediate_size}, vocab {spec.vocab_size}, heads {spec.num_heads}/"
          f"{spec.num_kv_heads} kv) with o_proj/down_proj of layers 1..{spec.num_layers - 1} "
          f"scaled by {spec.residual_scale}; drafter = an independent 1-layer LM copying the "
          f"target's embedding, layer 0, norm and head. Random weights, not trained.")
  return Pair(tcfg, params, drafters.LMDrafter(dcfg), dparams, desc)


def vocab_pieces(vocab_size: int) -> list[str]:
  """``vocab_size`` distinct one-character pieces: 3 specials, ``▁``, printable ASCII, then CJK.

  One character per token and no merges make text <-> ids a bijection (for non-special ids),
  so token ids can be compared across engines that only print text (llama.cpp).
  """
  ascii_ = [chr(c) for c in range(0x21, 0x7F)]
  pieces = [UNK, BOS, EOS, SPACE] + ascii_
  if vocab_size < len(pieces):
    raise ValueError(f"vocab_size must be >= {len(pieces)}, got {vocab_size}")
  pieces += [chr(0x4E00 + i) for i in range(vocab_size - len(pieces))]
  return pieces


def build_tokenizer(vocab_size: int):
  """A LLaMA-2-style fast tokenizer (BPE with byte fallback) of exactly ``vocab_size`` ids.

  llama.cpp's converter accepts a ``tokenizer.json`` without ``tokenizer.model`` only in this
  shape (``LlamaHfVocab``: BPE, ``byte_fallback``, a ``Sequence`` decoder). There are no byte
  tokens and no merges: characters outside the vocab become ``<unk>``.
  """
  from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers

  vocab = {p: i for i, p in enumerate(vocab_pieces(vocab_size))}
  tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK, byte_fallback=True,
                             fuse_unk=True))
  tok.normalizer = normalizers.Sequence([normalizers.Prepend(SPACE),
                                         normalizers.Replace(" ", SPACE)])
  tok.decoder = decoders.Sequence([decoders.Replace(SPACE, " "), decoders.ByteFallback(),
                                   decoders.Fuse(), decoders.Strip(" ", 1, 0)])
  tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                          for t in (UNK, BOS, EOS)])
  return tok


def _write_tokenizer(hf_dir: str, vocab_size: int) -> None:
  build_tokenizer(vocab_size).save(os.path.join(hf_dir, "tokenizer.json"))
  config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS, "eos_token": EOS,
            "unk_token": UNK, "add_bos_token": True, "add_eos_token": False,
            "model_max_length": 1 << 20}
  with open(os.path.join(hf_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
    json.dump(config, f, indent=1)


def save_pair(pair: Pair, out_dir: str, overwrite: bool = False) -> dict:
  """``out_dir/target`` and ``out_dir/drafter`` as HF LLaMA checkpoints, each with a tokenizer.

  No EOS id is written into the model configs, so every engine decodes the full budget.
  """
  paths = {"target": os.path.join(out_dir, "target"),
           "drafter": os.path.join(out_dir, "drafter")}
  hf.save(paths["target"], pair.target_cfg, pair.target_params, overwrite=overwrite)
  hf.save(paths["drafter"], pair.drafter.cfg, pair.draft_params, overwrite=overwrite)
  for path in paths.values():
    _write_tokenizer(path, pair.target_cfg.vocab_size)
  with open(os.path.join(out_dir, "PAIR.txt"), "w", encoding="utf-8") as f:
    f.write(pair.description + "\n")
  return paths
