"""Which drafted tokens the target accepts, and what it commits, after one verification pass.

A row drafted ``K`` tokens ``x_0..x_{K-1}`` from drafter distributions ``q_0..q_{K-1}``; one
target pass over them gives ``p_0..p_K`` (``p_i`` predicts the token at draft position i,
``p_K`` the one after the last draft). The engine then commits ``a + 1`` tokens: the ``a``
accepted drafts and one token from the target (the correction, or the bonus when all K are
accepted). See docs/protocol.md for α, τ and acceptance.

* ``greedy_accept`` (T=0): accept while the draft equals the target's argmax.
* ``rejection_accept`` (T>0): lossless speculative sampling (Leviathan et al. 2023; Chen et
  al. 2023): accept ``x_i`` with probability ``min(1, p_i(x_i) / q_i(x_i))``; at the first
  rejection draw from ``norm(max(0, p_i - q_i))``; the committed tokens are then distributed
  exactly as sampling from ``p``. On one-hot ``p`` (T=0) it gives exactly the greedy result.

Everything is vectorised over rows and positions (no Python loops), and the per-position steps
(``alpha_from_probs``, ``accept_flags``, ``residual_probs``) work on any leading shape, so a
tree verifier can reuse them and replace only the chain-specific ``leading_ones``.

Budgets: a row that may not accept more than ``max_accept_B`` drafts (e.g. near the maximum
length, or when it drafted fewer than K tokens) passes ``max_accept_B``; positions at or past
the budget are never accepted, and a row that accepts its whole budget ``m`` gets a bonus
token drawn from ``p_m`` (the draft at m was never proposed, so there is no residual there).
"""

from __future__ import annotations

from typing import Optional

import flax
import jax
import jax.numpy as jnp

from ppow_jax import sampling

Array = jax.Array

# Padding of ``AcceptResult.committed_BxK1`` past the committed tokens.
PAD_TOKEN = -1
# Below this mass the residual max(0, p - q) is rounding noise (p == q up to float error, so a
# rejection is itself a ~1e-7 event): the correction is then drawn from p instead.
RESIDUAL_EPS = 1e-6


@flax.struct.dataclass
class AcceptResult:
  """Outcome of verifying one window of K drafts per row.

  Attributes:
    num_accepted_B: int32 ``a`` in [0, min(K, max_accept)]: leading drafts accepted.
    accepted_BxK: bool, position i accepted iff i < a.
    committed_BxK1: int32, the a + 1 committed tokens left-aligned (the accepted drafts, then
      ``next_token_B``); positions > a hold ``PAD_TOKEN`` (-1).
    next_token_B: int32, the target's token at position a (correction or bonus);
      equals ``committed_BxK1[b, a]``.
    alpha_BxK: float32 α_i = Σ_x min(p_i(x), q_i(x)) per drafted position, for every position
      (budgets are not applied; pass ``max_accept_B`` to ``analytic_tau`` for that).
  """
  num_accepted_B: Array
  accepted_BxK: Array
  committed_BxK1: Array
  next_token_B: Array
  alpha_BxK: Array

  @property
  def num_committed_B(self) -> Array:
    return self.num_accepted_B + 1


# ---------------------------------------------------------------- per-position building blocks


def alpha_from_probs(target_probs_xV: Array, draft_probs_xV: Array) -> Array:
  """α = Σ_x min(p(x), q(x)) = 1 − TV(p, q) [...] (float32): P(accept | prefix accepted)."""
  return jnp.sum(jnp.minimum(target_probs_xV.astype(jnp.float32),
                             draft_probs_xV.astype(jnp.float32)), axis=-1)


def _token_prob(probs_xV: Array, tokens_x: Array) -> Array:
  tokens_x = jnp.clip(tokens_x, 0, probs_xV.shape[-1] - 1)  # padding drafts read a real entry
  return jnp.take_along_axis(probs_xV, tokens_x[..., None], axis=-1)[..., 0].astype(jnp.float32)


def accept_flags(uniforms_x: Array, draft_tokens_x: Array, draft_probs_xV: Array,
                 target_probs_xV: Array) -> Array:
  """Per-position accept test ``u < p(x) / q(x)`` with u ~ U[0, 1), written ``u·q(x) < p(x)``.

  The product form needs no division: q(x) = 0 < p(x) accepts (ratio +inf), p(x) = 0 always
  rejects (the target never emits x), and one-hot p and q accept iff the tokens match.
  """
  p_x = _token_prob(target_probs_xV, draft_tokens_x)
  q_x = _token_prob(draft_probs_xV, draft_tokens_x)
  return uniforms_x * q_x < p_x


def leading_ones(flags_BxK: Array, max_accept_B: Optional[Array] = None) -> Array:
  """Number of leading True per row [B] (int32), capped at ``max_accept_B``."""
  num_B = jnp.sum(jnp.cumprod(flags_BxK.astype(jnp.int32), axis=-1), axis=-1).astype(jnp.int32)
  if max_accept_B is not None:
    num_B = jnp.minimum(num_B, jnp.clip(max_accept_B.astype(jnp.int32), 0, flags_BxK.shape[-1]))
  return num_B


def residual_probs(target_probs_xV: Array, draft_probs_xV: Array) -> Array:
  """Unnormalised law of the correction, max(0, p − q) [..., V]; p where that mass is ~0.

  Pass q = 0 for a bonus token (the residual is then p itself).
  """
  p_xV = target_probs_xV.astype(jnp.float32)
  residual_xV = jnp.maximum(p_xV - draft_probs_xV.astype(jnp.float32), 0.0)
  mass_x1 = jnp.sum(residual_xV, axis=-1, keepdims=True)
  return jnp.where(mass_x1 > RESIDUAL_EPS, residual_xV, p_xV)


# ---------------------------------------------------------------- chain verification


def _check_shapes(draft_tokens_BxK: Array, target_BxK1xV: Array,
                  draft_probs_BxKxV: Optional[Array]) -> None:
  b, k = draft_tokens_BxK.shape
  if k < 1:
    raise ValueError("a window needs K >= 1 drafted tokens")
  if target_BxK1xV.ndim != 3 or target_BxK1xV.shape[:2] != (b, k + 1):
    raise ValueError(f"target distributions must be [B, K+1, V] = [{b}, {k + 1}, V], "
                     f"got {target_BxK1xV.shape}")
  if draft_probs_BxKxV is not None and draft_probs_BxKxV.shape != (b, k, target_BxK1xV.shape[2]):
    raise ValueError(f"draft_probs must be [B, K, V] = {(b, k, target_BxK1xV.shape[2])}, "
                     f"got {draft_probs_BxKxV.shape}")


def chain_result(draft_tokens_BxK: Array, num_accepted_B: Array, next_token_B: Array,
                 alpha_BxK: Array) -> AcceptResult:
  """Assembles an ``AcceptResult`` (masks, left-aligned committed tokens) from the decisions."""
  k = draft_tokens_BxK.shape[1]
  pos_1xK1 = jnp.arange(k + 1, dtype=jnp.int32)[None, :]
  a_Bx1 = num_accepted_B[:, None]
  drafts_BxK1 = jnp.concatenate(
      [draft_tokens_BxK.astype(jnp.int32), jnp.full_like(draft_tokens_BxK[:, :1], PAD_TOKEN,
                                                         dtype=jnp.int32)], axis=1)
  committed_BxK1 = jnp.where(pos_1xK1 < a_Bx1, drafts_BxK1,
                             jnp.where(pos_1xK1 == a_Bx1, next_token_B[:, None], PAD_TOKEN))
  return AcceptResult(num_accepted_B=num_accepted_B,
                      accepted_BxK=pos_1xK1[:, :k] < a_Bx1,
                      committed_BxK1=committed_BxK1.astype(jnp.int32),
                      next_token_B=next_token_B,
                      alpha_BxK=alpha_BxK.astype(jnp.float32))


def greedy_accept(draft_tokens_BxK: Array, target_logits_BxK1xV: Array,
                  draft_probs_BxKxV: Optional[Array] = None,
                  max_accept_B: Optional[Array] = None) -> AcceptResult:
  """Greedy (T=0) verification: accept while ``x_i == argmax p_i``; commit ``argmax p_a`` next.

  ``target_logits_BxK1xV`` may be logits or probabilities (only the argmax is used; ties go to
  the lowest index). α is computed against the greedy target, i.e. p_i = one-hot(argmax p_i):
  α_i = q_i(argmax p_i) when ``draft_probs_BxKxV`` is given, else the indicator that the draft
  matches. (For α against a tempered target, call ``alpha_from_probs`` directly.)
  """
  _check_shapes(draft_tokens_BxK, target_logits_BxK1xV, draft_probs_BxKxV)
  k = draft_tokens_BxK.shape[1]
  target_tokens_BxK1 = sampling.greedy(target_logits_BxK1xV)
  match_BxK = draft_tokens_BxK.astype(jnp.int32) == target_tokens_BxK1[:, :k]
  num_accepted_B = leading_ones(match_BxK, max_accept_B)
  next_token_B = jnp.take_along_axis(target_tokens_BxK1, num_accepted_B[:, None], axis=1)[:, 0]
  if draft_probs_BxKxV is None:
    alpha_BxK = match_BxK.astype(jnp.float32)
  else:
    alpha_BxK = _token_prob(draft_probs_BxKxV, target_tokens_BxK1[:, :k])
  return chain_result(draft_tokens_BxK, num_accepted_B, next_token_B, alpha_BxK)


def rejection_accept_with_noise(uniforms_BxK: Array, gumbel_BxV: Array, draft_tokens_BxK: Array,
                                draft_probs_BxKxV: Array, target_probs_BxK1xV: Array,
                                max_accept_B: Optional[Array] = None) -> AcceptResult:
  """``rejection_accept`` with its randomness given: U[0, 1) per draft, Gumbel(0, 1) per row.

  Lets a test replay the exact draws, and lets callers share noise across variants.
  """
  _check_shapes(draft_tokens_BxK, target_probs_BxK1xV, draft_probs_BxKxV)
  b, k = draft_tokens_BxK.shape
  flags_BxK = accept_flags(uniforms_BxK, draft_tokens_BxK, draft_probs_BxKxV,
                           target_probs_BxK1xV[:, :k])
  num_accepted_B = leading_ones(flags_BxK, max_accept_B)
  # One residual per row, at position a. q is 0 where the draft at a was never proposed:
  # a == K (all accepted) or a == the row's budget; the residual there is the bonus law p_a.
  a_Bx1x1 = num_accepted_B[:, None, None]
  p_a_BxV = jnp.take_along_axis(target_probs_BxK1xV, a_Bx1x1, axis=1)[:, 0]
  q_a_BxV = jnp.take_along_axis(draft_probs_BxKxV, jnp.minimum(a_Bx1x1, k - 1), axis=1)[:, 0]
  budget_B = jnp.full((b,), k, jnp.int32) if max_accept_B is None else jnp.clip(max_accept_B, 0, k)
  proposed_Bx1 = (num_accepted_B < budget_B)[:, None]  # False whenever a == K
  q_a_BxV = jnp.where(proposed_Bx1, q_a_BxV, 0.0)
  next_token_B = sampling.sample_with_gumbel(gumbel_BxV, residual_probs(p_a_BxV, q_a_BxV))
  alpha_BxK = alpha_from_probs(target_probs_BxK1xV[:, :k], draft_probs_BxKxV)
  return chain_result(draft_tokens_BxK, num_accepted_B, next_token_B, alpha_BxK)


def rejection_accept(rng: Array, draft_tokens_BxK: Array, draft_probs_BxKxV: Array,
                     target_probs_BxK1xV: Array,
                     max_accept_B: Optional[Array] = None) -> AcceptResult:
  """Lossless speculative sampling of one window per row (see the module docstring).

  ``draft_probs_BxKxV`` must be the distributions the drafts were sampled from, and
  ``target_probs_BxK1xV`` the target's sampling distributions (``sampling.probs_from_logits``
  at the decoding temperature / top-p); both in the target's vocabulary.
  """
  b, k = draft_tokens_BxK.shape
  u_rng, g_rng = jax.random.split(rng)
  uniforms_BxK = jax.random.uniform(u_rng, (b, k), jnp.float32)
  gumbel_BxV = jax.random.gumbel(g_rng, (b, target_probs_BxK1xV.shape[-1]), jnp.float32)
  return rejection_accept_with_noise(uniforms_BxK, gumbel_BxV, draft_tokens_BxK,
                                     draft_probs_BxKxV, target_probs_BxK1xV, max_accept_B)


# ---------------------------------------------------------------- expected lengths from α


def expected_accepted(alpha_BxK: Array, max_accept_B: Optional[Array] = None) -> Array:
  """Σ_{k=1..K} Π_{i≤k} α_i [B] (float32): expected accepted drafts (PPOW's R_prox).

  With ``max_accept_B``, positions at or past a row's budget contribute nothing.
  """
  alpha_BxK = alpha_BxK.astype(jnp.float32)
  if max_accept_B is not None:
    pos_1xK = jnp.arange(alpha_BxK.shape[1], dtype=jnp.int32)[None, :]
    alpha_BxK = jnp.where(pos_1xK < max_accept_B[:, None], alpha_BxK, 0.0)
  return jnp.sum(jnp.cumprod(alpha_BxK, axis=-1), axis=-1)


def analytic_tau(alpha_BxK: Array, max_accept_B: Optional[Array] = None) -> Array:
  """1 + Σ_{k=1..K} Π_{i≤k} α_i [B] (float32): docs/protocol.md's analytic τ, bonus included."""
  return 1.0 + expected_accepted(alpha_BxK, max_accept_B)
