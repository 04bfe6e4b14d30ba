"""PPOW's policy loss: a PPO clipped surrogate over the tokens that mattered, plus a target anchor.

Inputs are per window ``n`` and drafted position ``k``: the log-probability of the token the
drafter *sampled* there under the current parameters (``logq_new_NxK``, differentiated) and under
the rollout policy (``logq_old_NxK``, constant), a group-standardised advantage per window, and
the mask of tokens that decided the window's outcome: the accepted prefix plus the first
rejected token (``tokens_that_mattered_mask``). Tokens after the first rejection were never
verified, so they carry no credit.

Two ratios: ``"token"`` (standard PPO, one ratio per token) and ``"geometric_mean"`` (GTO: one
ratio per window, the geometric mean of its token ratios over the mask). Either way the
objective ``min(r·A, clip(r, 1−ε, 1+ε)·A)`` is averaged over the units the ratio lives on: all
masked tokens of the batch (token) or all windows with a masked token (geometric_mean).
"""

from __future__ import annotations

from typing import Optional, Union

import jax
import jax.numpy as jnp

from ppow_jax import divergences
from ppow_jax.errors import UserError

Array = jax.Array

RATIO_MODES = ("token", "geometric_mean")


def token_log_probs(logq_NxKxV: Array, tokens_NxK: Array) -> Array:
  """Log-probabilities ``[N, K]`` of the given tokens (the drafted ones) under ``logq``."""
  return jnp.take_along_axis(logq_NxKxV, tokens_NxK[..., None].astype(jnp.int32), axis=-1)[..., 0]


def tokens_that_mattered_mask(num_accepted_N: Array, K: int,
                              window_N: Optional[Array] = None) -> Array:
  """Boolean ``[N, K]``: positions ``i <= min(a, w − 1)`` with ``w`` the window (default K).

  That is the ``a`` accepted tokens plus the first rejected one; a fully accepted window has
  no rejected token, so the cap keeps the mask inside it. A window of length 0 is all false.
  """
  if K < 1:
    raise UserError(f"window length K must be >= 1, got {K}")
  a_N = jnp.asarray(num_accepted_N, jnp.int32)
  w_N = jnp.full_like(a_N, K) if window_N is None else jnp.minimum(
      jnp.asarray(window_N, jnp.int32), K)
  last_N = jnp.minimum(a_N, w_N - 1)
  return jnp.arange(K)[None, :] <= last_N[:, None]


def _clipped(ratio: Array, adv: Array, clip_eps: float) -> tuple[Array, Array]:
  """PPO's pessimistic objective and whether the clip is active (|r − 1| > ε)."""
  clipped = jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
  objective = jnp.minimum(ratio * adv, clipped * adv)
  return objective, (jnp.abs(ratio - 1.0) > clip_eps).astype(jnp.float32)


def ppo_clipped_surrogate(logq_new_NxK: Array, logq_old_NxK: Array, advantages_N: Array,
                          mask_NxK: Array, clip_eps: float = 0.2,
                          ratio: str = "token") -> tuple[Array, dict[str, Array]]:
  """PPO clipped surrogate loss (−objective) and stats.

  Args:
    logq_new_NxK: log q_θ of the sampled tokens (gradients flow here).
    logq_old_NxK: log q of the same tokens under the rollout policy (gradient stopped).
    advantages_N: one advantage per window (gradient stopped).
    mask_NxK: tokens that count (see ``tokens_that_mattered_mask``).
    clip_eps: PPO's ε.
    ratio: ``"token"`` or ``"geometric_mean"`` (GTO's per-window ratio).

  Returns:
    ``(loss, stats)``; stats (no gradient): ``clip_fraction`` (share of ratios with
    |r − 1| > ε), ``ratio_mean``, ``approx_kl`` (token-level ``r − 1 − log r``, an unbiased
    estimate of KL(old ‖ new)) and ``num_tokens``.
  """
  if ratio not in RATIO_MODES:
    raise UserError(f"unknown PPO ratio {ratio!r}; expected one of {RATIO_MODES}")
  if isinstance(clip_eps, (int, float)) and not 0 < clip_eps < 1:
    raise UserError(f"PPO clip_eps must be in (0, 1), got {clip_eps}")
  if logq_new_NxK.shape != logq_old_NxK.shape or logq_new_NxK.shape != mask_NxK.shape:
    raise UserError(f"PPO shapes differ: new {logq_new_NxK.shape}, old {logq_old_NxK.shape}, "
                    f"mask {mask_NxK.shape}")
  if advantages_N.shape != logq_new_NxK.shape[:1]:
    raise UserError(f"PPO advantages shape {advantages_N.shape} != windows "
                    f"{logq_new_NxK.shape[:1]}")
  mask = mask_NxK.astype(bool)
  adv_N = jax.lax.stop_gradient(advantages_N.astype(jnp.float32))
  # Sanitise masked-out entries first: padding may hold -inf, and -inf - -inf is NaN.
  new = jnp.where(mask, logq_new_NxK, 0.0)
  old = jnp.where(mask, jax.lax.stop_gradient(logq_old_NxK), 0.0)
  log_r_NxK = new - old
  r_NxK = jnp.exp(log_r_NxK)
  approx_kl = divergences.masked_mean(jax.lax.stop_gradient(r_NxK - 1.0 - log_r_NxK), mask)
  if ratio == "token":
    obj_NxK, clip_NxK = _clipped(r_NxK, adv_N[:, None], clip_eps)
    objective = divergences.masked_mean(obj_NxK, mask)
    clip_fraction = divergences.masked_mean(clip_NxK, mask)
    ratio_mean = divergences.masked_mean(r_NxK, mask)
  else:
    count_N = jnp.sum(mask, axis=-1)
    has_N = count_N > 0
    r_N = jnp.exp(jnp.sum(log_r_NxK, axis=-1) / jnp.maximum(count_N, 1))
    obj_N, clip_N = _clipped(r_N, adv_N, clip_eps)
    objective = divergences.masked_mean(obj_N, has_N)
    clip_fraction = divergences.masked_mean(clip_N, has_N)
    ratio_mean = divergences.masked_mean(r_N, has_N)
  stats = jax.lax.stop_gradient({
      "clip_fraction": clip_fraction,
      "ratio_mean": ratio_mean,
      "approx_kl": approx_kl,
      "num_tokens": jnp.sum(mask).astype(jnp.float32),
  })
  return -objective, stats


def ppow_loss(logq_new_NxK: Array, logq_old_NxK: Array, advantages_N: Array, mask_NxK: Array,
              anchor_logp: Optional[Array] = None, anchor_logq: Optional[Array] = None,
              anchor_mask: Optional[Array] = None, *, omega: float = 1.0,
              divergence: Union[str, divergences.Divergence] = "forward_kl",
              clip_eps: float = 0.2, ratio: str = "token",
              anchor_loss: Optional[Array] = None) -> tuple[Array, dict[str, Array]]:
  """PPOW's loss: ``surrogate + ω · anchor``, with the surrogate's stats and both terms.

  The anchor (target-anchored KL) keeps the drafter near the target. Either pass its inputs,
  ``anchor_logp``/``anchor_logq`` ``[..., V]`` and an optional ``anchor_mask`` ``[...]``
  (reduced with ``token_loss(divergence, ...)``), or a precomputed scalar ``anchor_loss``
  (e.g. ``eagle3_ttt_loss`` on the batch's data positions, as GTO adds its token loss).
  ``omega = 0`` disables it. For reference, GTO's "token loss + 0.5 × GTO loss" is ω = 2.
  """
  surrogate, stats = ppo_clipped_surrogate(logq_new_NxK, logq_old_NxK, advantages_N, mask_NxK,
                                           clip_eps=clip_eps, ratio=ratio)
  if isinstance(omega, (int, float)) and omega < 0:
    raise UserError(f"PPOW anchor weight omega must be >= 0, got {omega}")
  if anchor_loss is not None and anchor_logp is not None:
    raise UserError("ppow_loss: pass either anchor_loss or anchor_logp/anchor_logq, not both")
  if anchor_loss is None and (anchor_logp is None) != (anchor_logq is None):
    raise UserError("ppow_loss: anchor_logp and anchor_logq go together")
  if anchor_loss is None and anchor_logp is not None:
    anchor_loss = divergences.token_loss(divergence, anchor_logp, anchor_logq, anchor_mask)
  if anchor_loss is None:
    if not isinstance(omega, (int, float)) or omega != 0:
      raise UserError("ppow_loss: omega > 0 needs an anchor (anchor_logp/anchor_logq or "
                      "anchor_loss); set omega=0 to train on the surrogate alone")
    anchor_loss = jnp.zeros((), jnp.float32)
  loss = surrogate + omega * anchor_loss
  stats = dict(stats, surrogate_loss=jax.lax.stop_gradient(surrogate),
               anchor_loss=jax.lax.stop_gradient(anchor_loss),
               loss=jax.lax.stop_gradient(loss))
  return loss, stats
