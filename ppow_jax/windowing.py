"""Adaptive Divergence-Aware Windowing (ADAW): which window starts PPOW trains on.

A candidate start is scored by the confidence-weighted divergence of the window it opens,
``v = mean_i (1 − H(p_i)/log|V|) · KL(p_i ‖ q_i)``: positions where the target is confident
(low entropy) yet the drafter disagrees are where rejections are cheap to fix. Scores come from
one teacher-forced pass of both models over a training sequence (``position_scores`` then
``sliding_window_scores``), or from the sampled windows themselves (``adaw_score``).

Selection (all return distinct indices; ``-inf`` scores mark invalid candidates):
``select_topk`` (the default), ``select_softmax`` (sampling without replacement ∝ exp(v/τ_w)
by Gumbel-top-k) and ``select_uniform`` (the ablation).

``CandidatePool`` keeps scored starts across steps so that selection is not limited to the
current batch; see its docstring for the life cycle.
"""

from __future__ import annotations

import math
from typing import Optional

import flax
import jax
import jax.numpy as jnp

from ppow_jax import divergences
from ppow_jax.errors import UserError

Array = jax.Array

SELECTION_METHODS = ("topk", "softmax", "uniform")


def position_scores(logp_xV: Array, logq_xV: Array) -> Array:
  """Per-position ``(1 − H(p)/log|V|) · KL(p ‖ q)``, ``|V|`` the (target) vocab size."""
  vocab = logp_xV.shape[-1]
  if vocab < 2:
    raise UserError(f"ADAW needs a vocabulary of at least 2 tokens, got {vocab}")
  confidence = 1.0 - divergences.entropy(logp_xV) / math.log(vocab)
  return confidence * divergences.forward_kl(logp_xV, logq_xV)


def adaw_score(logp_NxKxV: Array, logq_NxKxV: Array, valid_NxK: Optional[Array] = None) -> Array:
  """ADAW score ``[N]`` of each window: the mean position score over its valid positions.

  A window with no valid position scores 0. Scores are statistics, not losses: no gradient.
  """
  logp_NxKxV = jax.lax.stop_gradient(logp_NxKxV)
  logq_NxKxV = jax.lax.stop_gradient(logq_NxKxV)
  u_NxK = position_scores(logp_NxKxV, logq_NxKxV)
  if valid_NxK is None:
    return jnp.mean(u_NxK, axis=-1)
  return jax.vmap(divergences.masked_mean)(u_NxK, valid_NxK)


def sliding_window_scores(u_BxT: Array, valid_BxT: Array, window: int) -> Array:
  """Score ``[B, T]`` of the window starting at each index: mean of ``u`` over ``[t, t+window)``.

  Only valid positions count (a window running off the end is scored on its valid part);
  starts that are themselves invalid get ``-inf`` so no selection picks them. Index alignment
  (the prediction at index t is the draft of token t+1) is the caller's.
  """
  if window < 1:
    raise UserError(f"ADAW window must be >= 1, got {window}")
  length = u_BxT.shape[-1]
  idx_TxW = jnp.arange(length)[:, None] + jnp.arange(window)[None, :]
  inside_TxW = idx_TxW < length
  idx_TxW = jnp.minimum(idx_TxW, length - 1)
  u_BxTxW = u_BxT[:, idx_TxW]
  valid_BxTxW = valid_BxT[:, idx_TxW] & inside_TxW[None]
  mean_BxT = jax.vmap(jax.vmap(divergences.masked_mean))(u_BxTxW, valid_BxTxW)
  return jnp.where(valid_BxT, jax.lax.stop_gradient(mean_BxT), -jnp.inf)


def _check_k(k: int, n: int) -> None:
  if not 1 <= k <= n:
    raise UserError(f"ADAW: cannot select k={k} windows from {n} candidates")


def select_topk(scores_N: Array, k: int) -> Array:
  """Indices ``[k]`` of the k highest scores (ties go to the lower index)."""
  _check_k(k, scores_N.shape[-1])
  return jax.lax.top_k(scores_N, k)[1]


def select_softmax(rng: Array, scores_N: Array, k: int, temperature: float) -> Array:
  """k distinct indices sampled without replacement ∝ ``exp(score / temperature)``.

  Gumbel-top-k: the top k of ``score/τ + Gumbel`` are distributed as k successive softmax
  draws without replacement. ``-inf`` candidates are drawn only if fewer than k are finite.
  """
  _check_k(k, scores_N.shape[-1])
  if isinstance(temperature, (int, float)) and temperature <= 0:
    raise UserError(f"ADAW temperature must be > 0, got {temperature}")
  gumbel_N = jax.random.gumbel(rng, scores_N.shape, jnp.float32)
  return jax.lax.top_k(scores_N / temperature + gumbel_N, k)[1]


def select_uniform(rng: Array, n: int, k: int, valid_N: Optional[Array] = None) -> Array:
  """k distinct indices uniform over ``range(n)`` (over the valid ones when given)."""
  _check_k(k, n)
  base_N = jnp.zeros((n,), jnp.float32)
  if valid_N is not None:
    base_N = jnp.where(valid_N, base_N, -jnp.inf)
  return jax.lax.top_k(base_N + jax.random.gumbel(rng, (n,), jnp.float32), k)[1]


def select(method: str, rng: Array, scores_N: Array, k: int, temperature: float = 1.0) -> Array:
  """Dispatches on ``method`` in ``SELECTION_METHODS``; uniform skips ``-inf`` candidates."""
  if method == "topk":
    return select_topk(scores_N, k)
  if method == "softmax":
    return select_softmax(rng, scores_N, k, temperature)
  if method == "uniform":
    return select_uniform(rng, scores_N.shape[-1], k, scores_N > -jnp.inf)
  raise UserError(f"unknown ADAW selection {method!r}; expected one of {SELECTION_METHODS}")


@flax.struct.dataclass
class CandidatePool:
  """A fixed-capacity pool of scored window starts, carried through the jitted train step.

  Life cycle: each step the trainer scores the starts of its current batch and ``refresh``-es
  the pool with them (the best ``capacity`` survive; entries older than ``max_age`` refreshes
  are evicted, so a stale high score cannot dominate forever); it ``select``-s from
  ``scores_P`` and reads the chosen ``positions_PxC``; every few steps it re-scores the
  ``oldest`` entries with the current drafter and writes them back with ``update_scores``.

  Attributes:
    positions_PxC: int32 coordinates of each start, opaque to the pool (e.g. record index and
      token offset, enough for the trainer to fetch the sequence again).
    scores_P: float32 last ADAW score; ``-inf`` marks an empty slot.
    age_P: int32 refreshes since the entry was last scored.
  """
  positions_PxC: Array
  scores_P: Array
  age_P: Array

  @property
  def capacity(self) -> int:
    return self.scores_P.shape[0]

  @property
  def valid_P(self) -> Array:
    return self.scores_P > -jnp.inf


def init_pool(capacity: int, coord_dim: int = 2) -> CandidatePool:
  """An empty pool (every slot invalid)."""
  if capacity < 1 or coord_dim < 1:
    raise UserError(f"candidate pool needs capacity >= 1 and coord_dim >= 1, got "
                    f"{capacity} and {coord_dim}")
  return CandidatePool(positions_PxC=jnp.zeros((capacity, coord_dim), jnp.int32),
                       scores_P=jnp.full((capacity,), -jnp.inf, jnp.float32),
                       age_P=jnp.zeros((capacity,), jnp.int32))


def refresh(pool: CandidatePool, positions_MxC: Array, scores_M: Array,
            valid_M: Optional[Array] = None, max_age: Optional[int] = None) -> CandidatePool:
  """Ages the pool by one refresh and merges freshly scored candidates into it.

  A new candidate replaces a pooled entry with the same coordinates (its score is newer);
  entries older than ``max_age`` are dropped; then the ``capacity`` highest scores are kept
  (on ties, new before old). NaN scores count as invalid. Duplicates *within* the new batch
  are not merged. Cost is O(P·M) comparisons.
  """
  if positions_MxC.shape[-1] != pool.positions_PxC.shape[-1]:
    raise UserError(f"candidate coordinates have {positions_MxC.shape[-1]} fields, the pool "
                    f"{pool.positions_PxC.shape[-1]}")
  new_valid_M = scores_M > -jnp.inf  # false for NaN too
  if valid_M is not None:
    new_valid_M &= valid_M
  new_scores_M = jnp.where(new_valid_M, scores_M, -jnp.inf).astype(jnp.float32)
  age_P = pool.age_P + 1
  keep_P = pool.valid_P
  if max_age is not None:
    keep_P &= age_P <= max_age
  same_PxM = jnp.all(pool.positions_PxC[:, None, :] == positions_MxC[None, :, :], axis=-1)
  keep_P &= ~jnp.any(same_PxM & new_valid_M[None, :], axis=-1)
  old_scores_P = jnp.where(keep_P, pool.scores_P, -jnp.inf)
  scores = jnp.concatenate([new_scores_M, old_scores_P])
  positions = jnp.concatenate([positions_MxC.astype(jnp.int32), pool.positions_PxC])
  ages = jnp.concatenate([jnp.zeros_like(new_scores_M, jnp.int32), age_P])
  _, top_P = jax.lax.top_k(scores, pool.capacity)
  return CandidatePool(positions_PxC=positions[top_P], scores_P=scores[top_P],
                       age_P=jnp.where(scores[top_P] > -jnp.inf, ages[top_P], 0))


def update_scores(pool: CandidatePool, indices_J: Array, scores_J: Array) -> CandidatePool:
  """Writes re-computed scores of pool entries ``indices_J`` and resets their age.

  Indices of empty slots (``oldest`` returns them last) are ignored: they stay empty.
  """
  live_J = pool.valid_P[indices_J] & ~jnp.isnan(scores_J)  # store -inf, never NaN
  scores_J = jnp.where(live_J, scores_J, -jnp.inf).astype(jnp.float32)
  return pool.replace(scores_P=pool.scores_P.at[indices_J].set(scores_J),
                      age_P=pool.age_P.at[indices_J].set(0))


def oldest(pool: CandidatePool, n: int) -> Array:
  """Indices ``[n]`` of the n entries scored longest ago (empty slots last): re-score these."""
  _check_k(n, pool.capacity)
  return jax.lax.top_k(jnp.where(pool.valid_P, pool.age_P, -1), n)[1]
