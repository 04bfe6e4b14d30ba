"""The decoder's key/value cache: one preallocated array per layer, written in place at each
row's own offset (``models/llama.py`` reads and writes it)."""

from __future__ import annotations

import flax
import jax
import jax.numpy as jnp

Array = jax.Array


@flax.struct.dataclass
class KVCache:
  """Preallocated keys and values, one ``[B·KV, S, D]`` array per layer (row b's KV heads
  are rows ``b·KV .. b·KV + KV - 1``), and each row's number of valid positions.

  This layout lets XLA write each layer's new entries in place and feed the attention dots
  without copies: a stacked ``[L, ...]`` array is copied whole when a slice of it is
  updated inside a loop, and a ``[B, KV, S, D]`` array is copied when the dot merges its
  batch and head axes. Rolling back a row after a rejected draft is just lowering
  ``lengths_B``: stale entries past a row's length are masked out and overwritten later.
  """
  k_BKxSxD: tuple  # one [B * KV, S, D] array per layer
  v_BKxSxD: tuple
  lengths_B: Array  # int32

  @property
  def max_length(self) -> int:
    return self.k_BKxSxD[0].shape[1]

  def take_rows(self, rows_N: Array, lengths_N: Array) -> "KVCache":
    """A cache of the given batch rows (with new lengths), e.g. one copy per rollout chain."""
    b = self.lengths_B.shape[0]

    def take(x_BKxSxD):
      _, s, d = x_BKxSxD.shape
      x_BxKxSxD = x_BKxSxD.reshape(b, -1, s, d)
      return jnp.take(x_BxKxSxD, rows_N, axis=0).reshape(-1, s, d)

    return KVCache(tuple(map(take, self.k_BKxSxD)), tuple(map(take, self.v_BKxSxD)), lengths_N)



def write_rows(cache_BKxSxD: Array, new_BxTxKxD: Array, start_B: Array) -> Array:
  """Row b's T new entries into slots ``start_B[b] .. + T`` (no host round-trip).

  One scatter (a dynamic-update-slice for a single row), which XLA performs in place when
  the cache is a loop carry or a donated argument. Slots past the end are dropped.
  """
  b, t, kv, _ = new_BxTxKxD.shape
  new_BxKxTxD = new_BxTxKxD.astype(cache_BKxSxD.dtype).transpose(0, 2, 1, 3)
  if b == 1:
    start = jnp.minimum(start_B[0], cache_BKxSxD.shape[1] - t)
    return jax.lax.dynamic_update_slice(cache_BKxSxD, new_BxKxTxD[0], (0, start, 0))
  rows_BxKx1 = (jnp.arange(b)[:, None] * kv + jnp.arange(kv)[None, :])[:, :, None]
  slots_Bx1xT = (start_B[:, None] + jnp.arange(t, dtype=start_B.dtype)[None, :])[:, None, :]
  return cache_BKxSxD.at[rows_BxKx1, slots_Bx1xT].set(new_BxKxTxD, mode="drop")
