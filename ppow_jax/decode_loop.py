"""The decoding loop shared by the AR, chain and tree engines, with batch compaction.

A batch's rows finish at different rounds (EOS, or fewer tokens per round). In a fixed-shape
loop a finished row still costs its share of every later round; with ``compact=True`` the
loop runs in phases of halving batch size: when at most half of the rows are still active,
they are gathered (with their caches and drafter state) into a batch of half the size, and
the finished rows' results are put aside. Sizes are static (each phase compiles its own
``lax.while_loop``): ``b, b/2, ...`` down to ``min_rows`` (4 by default). Every row's tokens,
length and per-row statistics come back in the original order; batch-wide sums (α by
position, ...) are carried through.

The loop state's per-row arrays are its fields with a leading batch axis (names ending in
``_B`` in ``Stats``, as ``evaluate`` merges them); KV caches hold a row's heads in adjacent
rows (``KVCache.take_rows``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp

from ppow_jax.models import kv_cache

Array = jax.Array


@flax.struct.dataclass
class LoopState:
  buffer_BxN: Array  # prompt then committed tokens
  n_B: Array  # committed tokens per row (the last one pending in the target cache)
  done_B: Array
  prompt_len_B: Array
  target_cache: kv_cache.KVCache
  draft_state: Any  # the drafter's (None for AR)
  rng: Array
  stats: Any  # engine.Stats: per-row fields end in _B, the others are batch-wide sums


def phase_sizes(batch: int, compact: bool, min_rows: int = 4) -> list[int]:
  """Batch sizes of the loop's phases: halving down to ``min_rows`` rows (one phase without
  compaction). Each size compiles its own loop."""
  sizes = [batch]
  while compact and sizes[-1] // 2 >= min_rows:
    sizes.append(sizes[-1] // 2)
  return sizes


def _per_row_fields(stats) -> list[str]:
  return [f.name for f in dataclasses.fields(stats) if f.name.endswith("_B")]


def take_rows(s: LoopState, rows_N: Array) -> LoopState:
  """The loop state of the given rows (in that order)."""
  take = lambda x: jnp.take(x, rows_N, axis=0)
  stats = s.stats.replace(**{f: take(getattr(s.stats, f)) for f in _per_row_fields(s.stats)})
  dstate = s.draft_state
  if dstate is not None:
    dstate = dstate.replace(**{
        f.name: (take(getattr(dstate, f.name)) if f.name != "cache" else
                 dstate.cache.take_rows(rows_N, take(dstate.cache.lengths_B)))
        for f in dataclasses.fields(dstate) if getattr(dstate, f.name) is not None})
  return s.replace(buffer_BxN=take(s.buffer_BxN), n_B=take(s.n_B), done_B=take(s.done_B),
                   prompt_len_B=take(s.prompt_len_B), draft_state=dstate,
                   target_cache=s.target_cache.take_rows(rows_N,
                                                         take(s.target_cache.lengths_B)),
                   stats=stats)


def run(body: Callable[[LoopState], LoopState], init: LoopState,
        compact: bool, min_rows: int = 4) -> tuple[Array, Array, Any]:
  """Rounds of ``body`` until every row is done: ``(buffer_BxN, n_B, stats)`` of every row in
  the original order. ``stats.row_slots`` counts the rows each round computed."""
  batch = init.n_B.shape[0]
  sizes = phase_sizes(batch, compact, min_rows)

  def counted(s: LoopState) -> LoopState:
    out = body(s)
    return out.replace(stats=out.stats.replace(
        row_slots=out.stats.row_slots + s.n_B.shape[0]))

  s, rows_N = init, jnp.arange(batch)
  buffer_BxN, n_B, stats = init.buffer_BxN, init.n_B, init.stats
  for i in range(len(sizes)):
    following = sizes[i + 1] if i + 1 < len(sizes) else 0
    s = jax.lax.while_loop(lambda s, f=following: jnp.sum(~s.done_B) > f, counted, s)
    if len(sizes) == 1:
      return s.buffer_BxN, s.n_B, s.stats
    # this phase's rows, finished or not, into their places; batch-wide sums carry on
    buffer_BxN = buffer_BxN.at[rows_N].set(s.buffer_BxN)
    n_B = n_B.at[rows_N].set(s.n_B)
    stats = s.stats.replace(**{f: getattr(stats, f).at[rows_N].set(getattr(s.stats, f))
                               for f in _per_row_fields(stats)})
    if following:
      keep_N = jnp.argsort(s.done_B, stable=True)[:following]  # the active rows first
      s, rows_N = take_rows(s, keep_N), rows_N[keep_N]
  return buffer_BxN, n_B, stats
