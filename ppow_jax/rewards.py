"""PPOW's window rewards and group-standardised advantages (docs/protocol.md, "PPOW").

A window is K tokens the drafter sampled from one start position; the target verified them and
accepted ``a`` leading tokens. Rewards are per window (shape ``[N]``) and are constants for the
policy gradient: callers never differentiate through them (``total_reward`` stops gradients).

* Cost-Aware Speedup Reward: tokens committed per unit of cost, ``(a + 1) / (1 + γ·n_drafted)``
  (a verification costs 1, a draft step γ). The published summary's ``a / (a·γ + 1)`` is the
  ``"paper_summary"`` form.
* Distribution-Based Proximity Reward: the expected accepted length of the sampled window under
  the target, ``Σ_k Π_{i≤k} α_i``, where ``α_i = Σ_x min(p_i, q_i)`` along the sampled prefix. It
  is dense (distributions, not the accept/reject coin flips). Option: the indicator
  ``η · 1[Δ < ε]`` with Δ from ``greedy_log_prob_gap``.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from ppow_jax import acceptance
from ppow_jax.divergences import LOG_FLOOR
from ppow_jax.errors import UserError

Array = jax.Array

SPEED_FORMS = ("committed_per_cost", "paper_summary")
PROX_FORMS = ("expected_length", "indicator")


def speed_reward(accepted_N: Array, n_drafted_N: Array, gamma: float,
                 form: str = "committed_per_cost") -> Array:
  """Cost-Aware Speedup Reward per window.

  Args:
    accepted_N: accepted draft tokens ``a`` per window.
    n_drafted_N: draft steps spent per window (K for a fixed window); broadcasts.
    gamma: cost of one draft step relative to one target verification (>= 0).
    form: ``"committed_per_cost"``: ``(a + 1) / (1 + γ·n_drafted)`` (default; docs/protocol.md);
      ``"paper_summary"``: ``a / (a·γ + 1)`` (ignores ``n_drafted``).
  """
  if form not in SPEED_FORMS:
    raise UserError(f"unknown speed reward form {form!r}; expected one of {SPEED_FORMS}")
  if isinstance(gamma, (int, float)) and gamma < 0:
    raise UserError(f"reward gamma must be >= 0, got {gamma}")
  a = jnp.asarray(accepted_N, jnp.float32)
  if form == "committed_per_cost":
    return (a + 1.0) / (1.0 + gamma * jnp.asarray(n_drafted_N, jnp.float32))
  return a / (a * gamma + 1.0)


def proximity_reward(alpha_NxK: Array, valid_NxK: Optional[Array] = None) -> Array:
  """Distribution-Based Proximity Reward ``Σ_k Π_{i≤k} α_i`` per window.

  ``valid_NxK`` marks each window's drafted positions (a prefix mask for windows shorter than
  K); an invalid position counts as α = 0, so nothing after it contributes.
  """
  alpha_NxK = jnp.clip(alpha_NxK, 0.0, 1.0)
  if valid_NxK is not None:
    alpha_NxK = jnp.where(valid_NxK, alpha_NxK, 0.0)
  return acceptance.expected_accepted(alpha_NxK)


def greedy_log_prob_gap(logp_NxKxV: Array, sampled_NxK: Array,
                        valid_NxK: Optional[Array] = None) -> Array:
  """Δ = Σ_i [log p_i(greedy_i) − log p_i(sampled_i)] over each window's valid positions.

  Our reading of "the cumulative log-probability gap between the sampled window and the
  target's greedy window": ``p_i`` is the target's distribution after the *sampled* prefix
  (teacher-forced, so one target pass suffices) and ``greedy_i = argmax p_i``. Δ >= 0, and
  Δ = 0 exactly when every sampled token is the target's greedy choice, i.e. when the sampled
  window *is* the target's greedy window. Log-probs are floored at LOG_FLOOR (finite Δ).
  """
  logp_NxKxV = jnp.maximum(logp_NxKxV, LOG_FLOOR)
  best_NxK = jnp.max(logp_NxKxV, axis=-1)
  picked_NxK = jnp.take_along_axis(logp_NxKxV, sampled_NxK[..., None], axis=-1)[..., 0]
  gap_NxK = best_NxK - picked_NxK
  if valid_NxK is not None:
    gap_NxK = jnp.where(valid_NxK, gap_NxK, 0.0)
  return jnp.sum(gap_NxK, axis=-1)


def proximity_indicator(delta_N: Array, eta: float, eps: float) -> Array:
  """Sparse proximity reward ``η · 1[Δ < ε]``."""
  return eta * (delta_N < eps).astype(jnp.float32)


def total_reward(accepted_N: Array, n_drafted_N: Array, alpha_NxK: Optional[Array] = None,
                 valid_NxK: Optional[Array] = None, delta_N: Optional[Array] = None, *,
                 gamma: float, lambda_prox: float = 1.0, use_speed: bool = True,
                 use_prox: bool = True, speed_form: str = "committed_per_cost",
                 prox_form: str = "expected_length", eta: float = 1.0,
                 eps: float = 1.0) -> tuple[Array, dict[str, Array]]:
  """``R = R_speed + λ_prox · R_prox`` per window, each term switchable for ablations.

  Needs ``alpha_NxK`` for ``prox_form="expected_length"`` and ``delta_N`` for ``"indicator"``.
  Returns ``(R_N, components)`` with components ``speed``, ``prox`` (before λ) and ``total``,
  all ``[N]`` and gradient-free (a switched-off term is zeros).
  """
  if not (use_speed or use_prox):
    raise UserError("reward: use_speed and use_prox are both off; the reward would be constant")
  if prox_form not in PROX_FORMS:
    raise UserError(f"unknown proximity reward form {prox_form!r}; expected one of {PROX_FORMS}")
  zeros_N = jnp.zeros(jnp.shape(accepted_N), jnp.float32)
  speed_N = speed_reward(accepted_N, n_drafted_N, gamma, speed_form) if use_speed else zeros_N
  prox_N = zeros_N
  if use_prox and prox_form == "expected_length":
    if alpha_NxK is None:
      raise UserError("reward: prox_form='expected_length' needs alpha_NxK")
    prox_N = proximity_reward(alpha_NxK, valid_NxK)
  elif use_prox:
    if delta_N is None:
      raise UserError("reward: prox_form='indicator' needs delta_N (see greedy_log_prob_gap)")
    prox_N = proximity_indicator(delta_N, eta, eps)
  components = jax.lax.stop_gradient(
      {"speed": speed_N, "prox": prox_N, "total": speed_N + lambda_prox * prox_N})
  return components["total"], components


def group_advantages(rewards_MxG: Array, delta: float = 1e-6) -> Array:
  """``A = (R − mean_G R) / (std_G R + δ)`` within each group along the last axis.

  A group is the G windows sampled from the same start. ``std`` is the population standard
  deviation (ddof = 0, our choice: the sample std of GRPO-style code is √(G/(G−1)) larger). The mean
  is taken of rewards shifted by the group's first reward, so a constant group gives exactly
  zero advantages (not float round-off divided by δ). Any leading shape works; pass
  ``rewards_N.reshape(-1, G)`` for a flat batch.
  """
  r = jnp.asarray(rewards_MxG, jnp.float32)
  shifted = r - jax.lax.stop_gradient(r[..., :1])
  centered = shifted - jnp.mean(shifted, axis=-1, keepdims=True)
  std = jnp.sqrt(jnp.mean(centered * centered, axis=-1, keepdims=True))
  return jax.lax.stop_gradient(centered / (std + delta))
