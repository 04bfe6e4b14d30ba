r"""The first N layers of a Hugging Face LLaMA-family model, as a small LM of the same vocabulary.

    python -m ppow_jax.tools.truncate_lm IN_DIR OUT_DIR --layers=4

OUT_DIR gets the embedding, layers 0 .. N-1, the final norm and the head of IN_DIR (config.json,
model.safetensors) and its tokenizer files. The result is an untrained, crude drafter: it exists
so that engines can be compared running the *same* small LM drafter on a target that ships
without one (``ppow_jax.bench.peers`` on SmolLM2-135M-Instruct). OUT_DIR must not exist or be
empty; it appears in one rename, or not at all.
"""

from __future__ import annotations

import dataclasses
import os
import shutil

from absl import app, flags

from ppow_jax import cli
from ppow_jax.errors import UserError
from ppow_jax.models import hf, hf_config

_LAYERS = flags.DEFINE_integer("layers", 4, "Layers kept (the first N).")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json", "tokenizer.model")


def truncate(in_dir: str, out_dir: str, layers: int) -> str:
  """Writes the first ``layers`` layers of ``in_dir`` (with embedding, norm, head) to
  ``out_dir``; returns ``out_dir``."""
  model, params = hf.load(in_dir)
  cfg = model.cfg
  if not 1 <= layers < cfg.num_layers:
    raise UserError(f"--layers={layers}: {in_dir} has {cfg.num_layers} layers; keep 1 to "
                    f"{cfg.num_layers - 1}")
  if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
    raise UserError(f"{out_dir}: exists and is not an empty directory")
  config_path = os.path.join(in_dir, hf_config.CONFIG)
  arch = hf_config.architecture(hf_config.read_json(config_path), config_path)
  kept = {k: v for k, v in params.items()
          if not k.startswith("layers_") or int(k.split("_")[1]) < layers}
  tmp = cli.staging_dir(out_dir)
  try:
    staged = os.path.join(tmp, "model")
    hf.save(staged, dataclasses.replace(cfg, num_layers=layers), kept, architecture=arch)
    for name in TOKENIZER_FILES:
      if os.path.isfile(os.path.join(in_dir, name)):
        shutil.copy2(os.path.join(in_dir, name), os.path.join(staged, name))
    if os.path.isdir(out_dir):
      os.rmdir(out_dir)  # empty, checked above
    os.replace(staged, out_dir)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return out_dir


def run(argv: list[str]) -> str:
  if len(argv) != 3:
    raise UserError("usage: python -m ppow_jax.tools.truncate_lm IN_DIR OUT_DIR --layers=N")
  out = truncate(argv[1], argv[2], _LAYERS.value)
  print(f"wrote {out} ({_LAYERS.value} layers of {argv[1]})")
  return out


if __name__ == "__main__":
  app.run(cli.main_for(run))
