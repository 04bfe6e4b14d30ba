r"""Convert a GGUF model (llama.cpp's format) into a Hugging Face directory.

    python -m ppow_jax.tools.gguf_to_hf IN.gguf OUT_DIR [--overwrite]

OUT_DIR gets config.json, model.safetensors (float32, dequantized), tokenizer.json,
tokenizer_config.json (with the chat template) and generation_config.json; transformers and
``ppow_jax.models.hf.load`` both read it. The directory appears in one rename, or not at all.
Targets given as ``.gguf`` paths elsewhere are converted the same way into a cache.
"""

from __future__ import annotations

import time

from absl import app, flags

from ppow_jax import cli
from ppow_jax.errors import UserError
from ppow_jax.models import gguf_convert

_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace OUT_DIR if it holds files.")


def run(argv: list[str]) -> str:
  if len(argv) != 3:
    raise UserError("usage: python -m ppow_jax.tools.gguf_to_hf IN.gguf OUT_DIR [--overwrite]")
  t0 = time.perf_counter()
  out = gguf_convert.convert(argv[1], argv[2], overwrite=_OVERWRITE.value)
  print(f"wrote {out} in {time.perf_counter() - t0:.1f} s")
  return out


if __name__ == "__main__":
  app.run(cli.main_for(run))
