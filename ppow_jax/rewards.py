"""PPOW's window rewards and group-standardised advantages (docs/protocol.md, "PPOW").

A window is K tokens the drafter sampled from one start position; the target verified them and
accepted ``a`` leading tokens. Rewards are per window (shape ``[N]``) and are constants for the
policy gradient: callers never differentiate through them (``total_reward`` stops gradients).

* Cost-Aware Speedup Reward (the paper's, default ``"paper"``): ``a / (a·γ + 1)``, rising with
  ``a`` and saturating at ``1/γ``. Option ``"committed_per_cost"``: ``(a + 1) / (1 + γ·n_drafted)``;
  with a fixed window ``n_drafted = K`` its cost factor is the same for the whole group, so
  group standardisation removes γ from it entirely.
* Distribution-Based Proximity Reward (the paper's, default ``"indicator"``): ``η · 1[Δ < ε]``
  for windows with ``a = 0`` only, Δ from ``greedy_log_prob_gap``. Option ``"expected_length"``:
  ``E[a | ŷ] = Σ_k Π_{i<k} β_i`` with ``β_i = min(1, p_i(ŷ_i)/q_i(ŷ_i))`` the probability that
  rejection sampling accepts the *sampled* token — dense (no coin flips) and, unlike
  ``Σ_k Π α_i``, dependent on every sampled token (α₀ is the same for all windows of a group).
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from ppow_jax import acceptance
from ppow_jax.divergences import LOG_FLOOR
from ppow_jax.errors import UserError

Array = jax.Array

SPEED_FORMS = ("paper", "committed_per_cost")
PROX_FORMS = ("indicator", "expected_length")


def speed_reward(accepted_N: Array, n_drafted_N: Array, gamma: float, form: str) -> Array:
  """Cost-Aware Speedup Reward per window.

  Args:
    accepted_N: accepted draft tokens ``a`` per window.
    n_drafted_N: draft steps spent per window (K for a fixed window); broadcasts. Only the
      ``"committed_per_cost"`` form reads it.
    gamma: cost of one draft step relative to one target verification (>= 0).
    form: ``"paper"``: ``a / (a·γ + 1)``; ``"committed_per_cost"``: ``(a + 1) / (1 + γ·n)``.
  """
  if form not in SPEED_FORMS:
    raise UserError(f"unknown speed reward form {form!r}; expected one of {SPEED_FORMS}")
  if isinstance(gamma, (int, float)) and gamma < 0:
    raise UserError(f"reward gamma must be >= 0, got {gamma}")
  a = jnp.asarray(accepted_N, jnp.float32)
  if form == "committed_per_cost":
    return (a + 1.0) / (1.0 + gamma * jnp.asarray(n_drafted_N, jnp.float32))
  return a / (a * gamma + 1.0)


def sampled_accept_probs(logp_NxKxV: Array, logq_NxKxV: Array, tokens_NxK: Array) -> Array:
  """``β_i = min(1, p_i(ŷ_i) / q_i(ŷ_i))``: the chance rejection sampling keeps sampled ŷ_i."""
  pick = lambda x: jnp.take_along_axis(x, tokens_NxK[..., None].astype(jnp.int32), -1)[..., 0]
  logp_NxK = jnp.maximum(pick(logp_NxKxV), LOG_FLOOR)
  logq_NxK = jnp.maximum(pick(logq_NxKxV), LOG_FLOOR)
  return jnp.exp(jnp.minimum(logp_NxK - logq_NxK, 0.0))


def expected_length_reward(accept_NxK: Array, valid_NxK: Optional[Array] = None) -> Array:
  """``Σ_k Π_{i<k} β_i`` per window: its accepted length averaged over the accept coins.

  ``accept_NxK`` is ``sampled_accept_probs``; ``valid_NxK`` marks each window's drafted
  positions (a prefix mask); an invalid position counts as 0, so nothing after it contributes.
  """
  accept_NxK = jnp.clip(accept_NxK, 0.0, 1.0)
  if valid_NxK is not None:
    accept_NxK = jnp.where(valid_NxK, accept_NxK, 0.0)
  return acceptance.expected_accepted(accept_NxK)


def greedy_log_prob_gap(logp_NxKxV: Array, sampled_NxK: Array,
                        valid_NxK: Optional[Array] = None) -> Array:
  """Δ = Σ_i [log p_i(y_i) − log p_i(ŷ_i)] over each window's valid positions.

  ``p_i`` is the target's distribution after the *draft* prefix ŷ_<i (what verification
  computes, one target pass), ``y_i = argmax p_i`` the target's greedy token there and ŷ_i the
  drafted one. Δ >= 0, and Δ = 0 exactly when every drafted token is the target's greedy
  choice. Log-probs are floored at LOG_FLOOR (finite Δ).
  """
  logp_NxKxV = jnp.maximum(logp_NxKxV, LOG_FLOOR)
  best_NxK = jnp.max(logp_NxKxV, axis=-1)
  picked_NxK = jnp.take_along_axis(logp_NxKxV, sampled_NxK[..., None], axis=-1)[..., 0]
  gap_NxK = best_NxK - picked_NxK
  if valid_NxK is not None:
    gap_NxK = jnp.where(valid_NxK, gap_NxK, 0.0)
  return jnp.sum(gap_NxK, axis=-1)


def masked_median(x_N: Array, mask_N: Array) -> Array:
  """The lower median of ``x_N`` where ``mask_N``; 0 when the mask is empty."""
  n = jnp.sum(mask_N)
  sorted_N = jnp.sort(jnp.where(mask_N, x_N, jnp.inf))
  return jnp.where(n > 0, sorted_N[jnp.maximum((n - 1) // 2, 0)], 0.0)


def proximity_indicator(delta_N: Array, accepted_N: Array, eta: float, eps: float) -> Array:
  """The paper's proximity reward ``η · 1[Δ < ε]``, given only to windows with ``a = 0``."""
  hit_N = (delta_N < eps) & (jnp.asarray(accepted_N) == 0)
  return eta * hit_N.astype(jnp.float32)


def check_knobs(*, use_speed: bool, use_prox: bool, speed_form: str, prox_form: str) -> None:
  """The knobs' choices, checked before any work (``settings.ppow``) and by ``total_reward``."""
  if not (use_speed or use_prox):
    raise UserError("reward: use_speed and use_prox are both off; the reward would be constant")
  if speed_form not in SPEED_FORMS:
    raise UserError(f"unknown speed reward form {speed_form!r}; expected one of {SPEED_FORMS}")
  if prox_form not in PROX_FORMS:
    raise UserError(f"unknown proximity reward form {prox_form!r}; expected one of {PROX_FORMS}")


def total_reward(accepted_N: Array, n_drafted_N: Array, gamma: float, *, use_speed: bool,
                 use_prox: bool, speed_form: str, prox_form: str, lambda_prox: float,
                 prox_eta: float, prox_eps: float, delta_N: Optional[Array] = None,
                 accept_NxK: Optional[Array] = None,
                 valid_NxK: Optional[Array] = None) -> tuple[Array, dict[str, Array]]:
  """``R = R_speed + λ_prox · R_prox`` per window, each term switchable for ablations.

  The keyword-only parameters without a default are the reward's knobs: each is read from
  ``config.ppow`` under its own name (``settings.knobs``), so a new knob is a config line and a
  parameter here. Needs ``delta_N`` for ``prox_form="indicator"`` and ``accept_NxK`` (β) for
  ``"expected_length"``. Returns ``(R_N, components)`` with components ``speed``, ``prox``
  (before λ) and ``total``, all ``[N]`` and gradient-free (a switched-off term is zeros).
  """
  check_knobs(use_speed=use_speed, use_prox=use_prox, speed_form=speed_form,
              prox_form=prox_form)
  zeros_N = jnp.zeros(jnp.shape(accepted_N), jnp.float32)
  speed_N = speed_reward(accepted_N, n_drafted_N, gamma, speed_form) if use_speed else zeros_N
  prox_N = zeros_N
  if use_prox and prox_form == "expected_length":
    if accept_NxK is None:
      raise UserError("reward: prox_form='expected_length' needs accept_NxK "
                      "(see sampled_accept_probs)")
    prox_N = expected_length_reward(accept_NxK, valid_NxK)
  elif use_prox:
    if delta_N is None:
      raise UserError("reward: prox_form='indicator' needs delta_N (see greedy_log_prob_gap)")
    prox_N = proximity_indicator(delta_N, accepted_N, prox_eta, prox_eps)
  components = jax.lax.stop_gradient(
      {"speed": speed_N, "prox": prox_N, "total": speed_N + lambda_prox * prox_N})
  return components["total"], components


def group_advantages(rewards_MxG: Array, delta: float, min_std: float) -> Array:
  """``A = (R − mean_G R) / (std_G R + δ)`` within each group along the last axis.

  A group is the G windows sampled from the same start. ``std`` is the population standard
  deviation (ddof = 0, our choice: the sample std of GRPO-style code is √(G/(G−1)) larger).
  A group whose std is below ``min_std`` gets zero advantages: its spread is round-off or a
  negligible difference that δ alone would blow up to O(1) advantages. The mean is taken of
  rewards shifted by the group's first reward, so a constant group is exactly zero even with
  ``min_std = 0``. Any leading shape works; pass ``rewards_N.reshape(-1, G)`` for a flat batch.
  """
  if isinstance(min_std, (int, float)) and isinstance(delta, (int, float)) and (
      min_std < 0 or delta < 0):
    raise UserError(f"advantages: delta and min_std must be >= 0, got {delta} and {min_std}")
  r = jnp.asarray(rewards_MxG, jnp.float32)
  shifted = r - jax.lax.stop_gradient(r[..., :1])
  centered = shifted - jnp.mean(shifted, axis=-1, keepdims=True)
  std = jnp.sqrt(jnp.mean(centered * centered, axis=-1, keepdims=True))
  adv = jnp.where(std >= min_std, centered / (std + delta), 0.0)
  return jax.lax.stop_gradient(adv)
