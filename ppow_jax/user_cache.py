"""The user's cache directory: converted GGUF models and compiled kernels live under it."""

from __future__ import annotations

import os

CACHE_ENV = "PPOW_JAX_CACHE"


def cache_root() -> str:
  """``$PPOW_JAX_CACHE``, else ``~/.cache/ppow_jax``."""
  return os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "ppow_jax")
