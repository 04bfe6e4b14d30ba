"""Adaptive Divergence-Aware Windowing (ADAW): which windows PPOW trains on.

A window opened after position ``s`` is scored by the confidence-weighted divergence of the
positions it drafts, ``v = mean_i C(p_i) · D(p_i, q_i)`` with ``C(p) = 1 − H(p)/log|V|``:
positions where the target is confident yet the drafter disagrees are where rejections are
cheap to fix. ``D`` measures only what the drafter *can* fix: with a reduced draft vocabulary
the target is renormalised on the drafter's support and the KL is weighted by the target's
mass there, so target mass on tokens the drafter cannot emit scores nothing (a floored log q
would charge ~100 nats per unit of it and rank unfixable positions first).

``q_i`` is the drafter's prediction at the i-th drafted position of the window — its *self-fed*
state along the data (``chain_window_scores``; the caller supplies one score row per chain
step), or the teacher-forced step-0 prediction when the caller repeats one row.

Selection is over a pool of sequences (``SequencePool``): every candidate start of every pooled
sequence competes, windows never overlap, and a window once trained on is spent until the pool
is re-scored. Keys: ``"topk"`` (the highest scores), ``"softmax"`` (sequential sampling without
replacement ∝ exp(v/τ_w), Gumbel-top-k) and ``"uniform"`` (the ablation and the warm-up).
"""

from __future__ import annotations

import math

import flax
import jax
import jax.numpy as jnp

from ppow_jax import divergences
from ppow_jax.errors import UserError

Array = jax.Array

SELECTION_METHODS = ("topk", "softmax", "uniform")


def position_scores(logp_xV: Array, logq_xV: Array) -> Array:
  """Per-position ``C(p) · m · KL(p̃ ‖ q)``: ``p̃`` the target on q's support, ``m`` its mass.

  ``C`` uses the full target (``|V|`` its vocab). With a full draft vocabulary ``m = 1`` and
  ``p̃ = p``: the paper's ``C(p) · KL(p ‖ q)``.
  """
  vocab = logp_xV.shape[-1]
  if vocab < 2:
    raise UserError(f"ADAW needs a vocabulary of at least 2 tokens, got {vocab}")
  confidence = 1.0 - divergences.entropy(logp_xV) / math.log(vocab)
  support = logq_xV > divergences.LOG_FLOOR
  log_mass = jax.nn.logsumexp(jnp.where(support, logp_xV, -jnp.inf), axis=-1)
  mass = jnp.exp(jnp.where(jnp.isfinite(log_mass), log_mass, -jnp.inf))
  logp_in, _ = divergences.restrict_to_support(logp_xV, logq_xV)
  kl = divergences.forward_kl(logp_in, jnp.where(support, logq_xV, -jnp.inf))
  return jax.lax.stop_gradient(confidence * mass * kl)


def chain_window_scores(u_KxBxT: Array, valid_KxBxT: Array) -> Array:
  """Score ``[B, T]`` of the window drafted after index ``s``: mean over i of ``u[i, s + i]``.

  ``u[i, t]`` scores the chain's i-th drafted position at index t (index t predicts x_{t+1}):
  the window after s drafts x_{s+1..s+K}, its i-th at index s+i. Only valid entries count
  (a window running off the end is scored on its valid part); starts with no valid step-0
  entry get ``-inf`` so no selection picks them.
  """
  k, _, t = u_KxBxT.shape
  shift = lambda x, i, fill: jnp.pad(x[:, i:], ((0, 0), (0, i)), constant_values=fill)
  total, count = jnp.zeros(u_KxBxT.shape[1:]), jnp.zeros(u_KxBxT.shape[1:])
  for i in range(min(k, t)):
    ok = shift(valid_KxBxT[i], i, False)
    total = total + jnp.where(ok, shift(u_KxBxT[i], i, 0.0), 0.0)
    count = count + ok
  mean = total / jnp.maximum(count, 1.0)
  return jnp.where(valid_KxBxT[0], jax.lax.stop_gradient(mean), -jnp.inf)


def sliding_window_scores(u_BxT: Array, valid_BxT: Array, window: int) -> Array:
  """``chain_window_scores`` with one (teacher-forced) score row for every chain step."""
  if window < 1:
    raise UserError(f"ADAW window must be >= 1, got {window}")
  rep = lambda x: jnp.broadcast_to(x[None], (window,) + x.shape)
  return chain_window_scores(rep(u_BxT), rep(valid_BxT))


def selection_keys(method: str, rng: Array, scores: Array, temperature: float) -> Array:
  """Keys whose descending order is the pick order; ``-inf`` (invalid) stays ``-inf``."""
  valid = scores > -jnp.inf
  if method == "topk":
    return scores
  if isinstance(temperature, (int, float)) and temperature <= 0:
    raise UserError(f"ADAW temperature must be > 0, got {temperature}")
  gumbel = jax.random.gumbel(rng, scores.shape, jnp.float32)
  if method == "softmax":
    return jnp.where(valid, scores / temperature + gumbel, -jnp.inf)
  if method == "uniform":
    return jnp.where(valid, gumbel, -jnp.inf)
  raise UserError(f"unknown ADAW selection {method!r}; expected one of {SELECTION_METHODS}")


def select_nonoverlapping(keys_PxT: Array, n: int, window: int
                          ) -> tuple[Array, Array, Array]:
  """``n`` starts ``(row_n, start_n, valid_n)`` in descending key order, across all rows.

  After each pick the starts whose windows would overlap it (same row, ``|s − s'| < window``)
  are removed. ``valid_n`` is false for picks made after the valid candidates ran out (their
  row/start are junk the caller must mask). Greedy over the pool: O(n · P · T).
  """
  if window < 1 or n < 1:
    raise UserError(f"ADAW: need window >= 1 and n >= 1, got {window} and {n}")
  p, t = keys_PxT.shape
  cols = jnp.arange(t)

  def pick(keys, _):
    flat = jnp.argmax(keys.reshape(-1))
    row, start = flat // t, flat % t
    ok = keys[row, start] > -jnp.inf
    near = (jnp.arange(p)[:, None] == row) & (jnp.abs(cols[None] - start) < window)
    return jnp.where(near, -jnp.inf, keys), (row, start, ok)

  _, (row_n, start_n, valid_n) = jax.lax.scan(pick, keys_PxT.astype(jnp.float32), None,
                                              length=n)
  return row_n.astype(jnp.int32), start_n.astype(jnp.int32), valid_n


@flax.struct.dataclass
class SequencePool:
  """Training sequences kept across steps with the ADAW score of every window start.

  Life cycle (``train_step.make_ppow_step``): each step the new batch replaces the oldest
  ``B`` rows (a ring), scored by the current drafter; every few steps all rows are re-scored;
  windows are chosen across all rows with ``select_nonoverlapping``; a chosen start is spent
  (``-inf``) until its row is scored again. Empty rows have no valid start.
  """
  tokens_PxT: Array
  mask_PxT: Array
  scores_PxT: Array  # -inf: not a candidate

  @property
  def capacity(self) -> int:
    return self.tokens_PxT.shape[0]


def init_pool(capacity: int, seq_len: int) -> SequencePool:
  if capacity < 1 or seq_len < 1:
    raise UserError(f"ADAW pool needs capacity >= 1 and seq_len >= 1, got {capacity} and "
                    f"{seq_len}")
  return SequencePool(jnp.zeros((capacity, seq_len), jnp.int32),
                      jnp.zeros((capacity, seq_len), jnp.int32),
                      jnp.full((capacity, seq_len), -jnp.inf, jnp.float32))


def insert(pool: SequencePool, first_row: Array, tokens_BxT: Array, mask_BxT: Array,
           scores_BxT: Array) -> SequencePool:
  """Writes a scored batch into rows ``[first_row, first_row + B)`` (B must divide P)."""
  put = lambda x, new: jax.lax.dynamic_update_slice(x, new.astype(x.dtype), (first_row, 0))
  return SequencePool(put(pool.tokens_PxT, tokens_BxT), put(pool.mask_PxT, mask_BxT),
                      put(pool.scores_PxT, scores_BxT))


def spend(pool: SequencePool, row_n: Array, start_n: Array, valid_n: Array) -> SequencePool:
  """Marks the chosen starts as used (``-inf``) until the pool is re-scored."""
  row_n = jnp.where(valid_n, row_n, pool.capacity)  # out of range: dropped
  return pool.replace(scores_PxT=pool.scores_PxT.at[row_n, start_n].set(-jnp.inf, mode="drop"))
