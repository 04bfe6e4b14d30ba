"""Token-level divergences between the target ``p`` and the drafter ``q`` (the baselines' losses).

Both distributions arrive as log-probabilities over the same (target) vocabulary ``V``. The
drafter may give ``-inf`` (or a huge negative number) to tokens outside its reduced draft vocab,
and the target may do the same where it was restricted, so every function here is written to be
NaN-free in value *and* gradient:

* ``0 · log 0 = 0``: terms whose weight is zero are dropped with a ``where`` whose *both* branches
  are finite (the "double where"), so no ``0 · inf`` reaches the backward pass.
* The log of the *other* distribution is floored at ``LOG_FLOOR`` (nats). Target mass where the
  drafter puts (almost) none is therefore charged ``LOG_FLOOR`` instead of ``+inf``: the loss
  stays finite and, for a fixed target, the charge is a constant that carries no gradient. If
  you want the exact KL on the draft vocab instead, renormalise the target there first with
  ``restrict_to_support`` (what EAGLE-3 does).

Each divergence maps ``[..., V]`` log-probabilities to ``[...]`` per-position values; the loss
helpers reduce them with a mask. ``token_loss`` and ``eagle3_ttt_loss`` treat the target as a
frozen teacher (``stop_gradient``); the raw divergences differentiate through both arguments.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Union

import jax
import jax.numpy as jnp

from ppow_jax.errors import UserError

Array = jax.Array
Divergence = Callable[[Array, Array], Array]

# Log-probability floor (nats) used wherever a log of a possibly-zero probability is needed.
# exp(-100) ~ 4e-44 is below any probability a float32 softmax produces for a live token, so
# only masked-out tokens hit it, and clamped entries get no gradient.
LOG_FLOOR = -100.0
# −log α is evaluated as −log(α + ALPHA_EPS): finite at α = 0 and, unlike a hard clamp, it keeps
# a gradient there (bounded by 1 / ALPHA_EPS).
ALPHA_EPS = 1e-6


def _weighted_log_ratio(logw: Array, loga: Array, logb: Array) -> Array:
  """Σ_x w(x)·(log a(x) − log b(x)) with 0 wherever w(x) = 0; logs floored at LOG_FLOOR."""
  w = jnp.exp(logw)
  live = w > 0
  loga = jnp.where(live, jnp.maximum(loga, LOG_FLOOR), 0.0)
  logb = jnp.where(live, jnp.maximum(logb, LOG_FLOOR), 0.0)
  return jnp.sum(jnp.where(live, w * (loga - logb), 0.0), axis=-1)


def entropy(logp: Array) -> Array:
  """Shannon entropy H(p) = −Σ p log p in nats over the last axis (0 · log 0 = 0)."""
  return -_weighted_log_ratio(logp, logp, jnp.zeros_like(logp))


def cross_entropy(logp: Array, logq: Array) -> Array:
  """Soft cross-entropy −Σ p log q (log q floored at LOG_FLOOR)."""
  return -_weighted_log_ratio(logp, logq, jnp.zeros_like(logq))


def alpha(logp: Array, logq: Array) -> Array:
  """α = Σ_x min(p(x), q(x)): the probability that rejection sampling accepts a draft from q."""
  return jnp.sum(jnp.minimum(jnp.exp(logp), jnp.exp(logq)), axis=-1)


def forward_kl(logp: Array, logq: Array) -> Array:
  """KL(p ‖ q) = CE(p, q) − H(p); for a fixed p its gradient wrt q is the soft CE's."""
  return _weighted_log_ratio(logp, logp, logq)


def reverse_kl(logp: Array, logq: Array) -> Array:
  """KL(q ‖ p): mode-seeking; the drafter is charged LOG_FLOOR where the target has no mass."""
  return _weighted_log_ratio(logq, logq, logp)


def jsd(logp: Array, logq: Array) -> Array:
  """Jensen–Shannon divergence ½KL(p‖m) + ½KL(q‖m), m = (p + q)/2; bounded by log 2."""
  # Inputs are floored before logaddexp: its gradient is NaN when both arguments are -inf.
  logm = jnp.logaddexp(jnp.maximum(logp, LOG_FLOOR), jnp.maximum(logq, LOG_FLOOR)) - math.log(2)
  return 0.5 * (_weighted_log_ratio(logp, logp, logm) + _weighted_log_ratio(logq, logq, logm))


def tv(logp: Array, logq: Array) -> Array:
  """Total variation ½Σ|p − q| = 1 − α: the per-position rejection probability."""
  return 1.0 - alpha(logp, logq)


def neg_log_alpha(logp: Array, logq: Array) -> Array:
  """−log(α + ALPHA_EPS): the per-position log-loss of acceptance."""
  return -jnp.log(alpha(logp, logq) + ALPHA_EPS)


DIVERGENCES: dict[str, Divergence] = {
    "forward_kl": forward_kl,
    "reverse_kl": reverse_kl,
    "jsd": jsd,
    "tv": tv,
    "neg_log_alpha": neg_log_alpha,
}


def get_divergence(divergence: Union[str, Divergence]) -> Divergence:
  """Looks a divergence up by name (callables pass through); unknown names raise UserError."""
  if callable(divergence):
    return divergence
  if divergence not in DIVERGENCES:
    raise UserError(f"unknown divergence {divergence!r}; expected one of {sorted(DIVERGENCES)}")
  return DIVERGENCES[divergence]


def masked_mean(values: Array, mask: Optional[Array] = None) -> Array:
  """Mean of ``values`` over entries where ``mask`` is true (0 when none are); NaN-safe."""
  if mask is None:
    return jnp.mean(values)
  mask = jnp.broadcast_to(mask, values.shape).astype(values.dtype)
  total = jnp.sum(jnp.where(mask > 0, values * mask, 0.0))
  return total / jnp.maximum(jnp.sum(mask), 1.0)


def restrict_to_support(logp: Array, logq: Array) -> tuple[Array, Array]:
  """Renormalises the target on the drafter's support (tokens with log q > LOG_FLOOR).

  Returns the restricted log-probabilities and a ``[...]`` mask that is false where the
  target's argmax falls outside the support: EAGLE-3 masks those positions out of its loss.
  """
  support = logq > LOG_FLOOR
  logp_in = jnp.where(support, logp, -jnp.inf)
  log_mass = jax.nn.logsumexp(logp_in, axis=-1, keepdims=True)
  ok = jnp.take_along_axis(support, jnp.argmax(logp, axis=-1)[..., None], axis=-1)[..., 0]
  # A position with no target mass on the support comes back all -inf (every divergence
  # treats it as zero mass, so it stays finite) with ok false: the caller masks it out.
  log_mass = jnp.where(jnp.isfinite(log_mass), log_mass, 0.0)
  restricted = jnp.where(support, logp_in - log_mass, -jnp.inf)
  return restricted, ok & jnp.isfinite(jnp.max(restricted, axis=-1))


def token_loss(divergence: Union[str, Divergence], logp: Array, logq: Array,
               mask: Optional[Array] = None) -> Array:
  """Masked mean over positions of ``divergence(p_i, q_i)``; the target is a frozen teacher.

  Args:
    divergence: a name in ``DIVERGENCES`` or a callable ``(logp, logq) -> [...]``.
    logp: target log-probabilities ``[..., V]`` (gradient stopped).
    logq: drafter log-probabilities ``[..., V]``.
    mask: ``[...]`` positions that count (bool or 0/1); None counts all.
  """
  fn = get_divergence(divergence)
  if logp.shape != logq.shape:
    raise UserError(f"token_loss: logp shape {logp.shape} != logq shape {logq.shape}")
  if mask is not None and mask.shape != logp.shape[:-1]:
    raise UserError(f"token_loss: mask shape {mask.shape} != positions shape {logp.shape[:-1]}")
  return masked_mean(fn(jax.lax.stop_gradient(logp), logq), mask)


def eagle3_step_losses(logp_SxBxTxV: Array, logq_SxBxTxV: Array, mask_SxBxT: Array,
                       divergence: Union[str, Divergence] = "forward_kl") -> Array:
  """Per-step masked-mean losses ``[S]`` of an EAGLE-3 training-time-test unroll."""
  if logp_SxBxTxV.ndim != 4 or logp_SxBxTxV.shape != logq_SxBxTxV.shape:
    raise UserError(f"eagle3 loss: expected equal [S, B, T, V] shapes, got logp "
                    f"{logp_SxBxTxV.shape} and logq {logq_SxBxTxV.shape}")
  if mask_SxBxT.shape != logp_SxBxTxV.shape[:-1]:
    raise UserError(f"eagle3 loss: mask shape {mask_SxBxT.shape} != {logp_SxBxTxV.shape[:-1]}")
  fn = get_divergence(divergence)
  d_SxBxT = fn(jax.lax.stop_gradient(logp_SxBxTxV), logq_SxBxTxV)
  return jax.vmap(masked_mean)(d_SxBxT, mask_SxBxT)


def eagle3_ttt_loss(logp_SxBxTxV: Array, logq_SxBxTxV: Array, mask_SxBxT: Array,
                    divergence: Union[str, Divergence] = "forward_kl",
                    decay: float = 0.8) -> Array:
  """EAGLE-3 "training-time test" loss: Σ_i decay**i · (masked mean of step i).

  Step ``i`` of the unroll compares the drafter's i-th self-fed prediction with the target's
  distribution at the same position. As in EAGLE-3 the weights are not normalised (their sum
  is ≈ 4.19 for S = 7), but each step is a *masked* mean (EAGLE-3 divides by all positions).
  """
  return decayed_sum(eagle3_step_losses(logp_SxBxTxV, logq_SxBxTxV, mask_SxBxT, divergence),
                     decay)


def decayed_sum(steps_S: Array, decay: float) -> Array:
  """Σ_i decay**i · steps_S[i]: how the training-time test weighs its unrolled steps."""
  weights_S = jnp.asarray(decay, steps_S.dtype) ** jnp.arange(steps_S.shape[0])
  return jnp.sum(weights_S * steps_S)
