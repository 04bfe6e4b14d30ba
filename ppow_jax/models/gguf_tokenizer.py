"""The tokenizer of a GGUF file, rebuilt as a ``tokenizers.Tokenizer`` with its chat template.

GGUF stores a byte-level BPE (``tokenizer.ggml.model == "gpt2"``) as its token strings (already
spelled in the GPT-2 byte alphabet), its merges, a type per token and the name of llama.cpp's
pre-tokenizer (``tokenizer.ggml.pre``), which says how text is split before the merges apply:

* ``smollm``: every digit on its own, then the GPT-2 regex (SmolLM/SmolLM2);
* ``gpt2`` / ``default``: the GPT-2 regex;
* ``llama-bpe`` (LLaMA-3) and ``qwen2``: their own split regexes, then byte-level mapping.

Control tokens (type 3) become special added tokens, user-defined ones (type 4) plain added
tokens, so both are matched whole in text (``<|im_start|>`` is one token). SentencePiece vocabularies
(``tokenizer.ggml.model == "llama"``) are not supported.
"""

from __future__ import annotations

from typing import Optional

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, processors

from ppow_jax.data import tokenizer as tokenizer_lib
from ppow_jax.errors import UserError
from ppow_jax.models import gguf, hf

_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp's token types
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_SPLITS = {"llama-bpe": _LLAMA3_SPLIT, "llama3": _LLAMA3_SPLIT, "qwen2": _QWEN2_SPLIT}


def _pre_tokenizer(pre: str, path: str):
  gpt2 = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  if pre in ("gpt2", "default"):
    return gpt2
  if pre == "smollm":
    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), gpt2])
  if pre in _SPLITS:
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(tokenizers.Regex(_SPLITS[pre]), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  raise UserError(f"{path}: unsupported pre-tokenizer tokenizer.ggml.pre={pre!r}; supported: "
                  f"{', '.join(['gpt2', 'default', 'smollm', *_SPLITS])}")


def _token(tokens: list[str], key: str, reader) -> Optional[str]:
  token_id = gguf.field(reader, f"tokenizer.ggml.{key}", None)
  if token_id is None:
    return None
  if not 0 <= int(token_id) < len(tokens):
    raise UserError(f"{reader.data.filename}: tokenizer.ggml.{key}={token_id} is not a token id")
  return tokens[int(token_id)]


def build(reader) -> tokenizer_lib.TokenizerInfo:
  """The tokenizer, special tokens and chat template of an open GGUF file."""
  path = reader.data.filename
  kind = gguf.field(reader, "tokenizer.ggml.model", None)
  if kind != "gpt2":
    raise UserError(f"{path}: tokenizer.ggml.model={kind!r} is not supported (only byte-level "
                    f"BPE, 'gpt2')")
  tokens = list(gguf.field(reader, "tokenizer.ggml.tokens"))
  merges = [tuple(m.split(" ", 1)) for m in gguf.field(reader, "tokenizer.ggml.merges")]
  types = list(gguf.field(reader, "tokenizer.ggml.token_type", [1] * len(tokens)))
  vocab = {}
  for i, token in enumerate(tokens):
    vocab.setdefault(token, i)
  tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
  tok.pre_tokenizer = _pre_tokenizer(gguf.field(reader, "tokenizer.ggml.pre", "default"), path)
  tok.decoder = decoders.ByteLevel()
  tok.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False)
                          for t, kind in zip(tokens, types) if kind == _CONTROL])
  tok.add_tokens([tokenizers.AddedToken(t, special=False, normalized=False)
                  for t, kind in zip(tokens, types) if kind == _USER_DEFINED])
  bos = _token(tokens, "bos_token_id", reader)
  if gguf.field(reader, "tokenizer.ggml.add_bos_token", False) and bos is not None:
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, vocab[bos])])
  return tokenizer_lib.TokenizerInfo(
      tok, chat_template=gguf.field(reader, "tokenizer.chat_template", None), bos_token=bos,
      eos_token=_token(tokens, "eos_token_id", reader),
      pad_token=_token(tokens, "padding_token_id", reader))


def generation_info(reader) -> hf.GenerationInfo:
  """bos/eos/pad ids; generation stops at eos and at the end-of-turn token when it differs."""
  ids = {k: gguf.field(reader, f"tokenizer.ggml.{k}_token_id", None)
         for k in ("bos", "eos", "eot", "padding")}
  eos = tuple(dict.fromkeys(int(ids[k]) for k in ("eos", "eot") if ids[k] is not None))
  as_int = lambda v: None if v is None else int(v)
  return hf.GenerationInfo(as_int(ids["bos"]), eos, as_int(ids["padding"]))


def load(path) -> tokenizer_lib.TokenizerInfo:
  """The tokenizer of a GGUF file (see ``build``)."""
  return build(gguf.open_reader(path))
