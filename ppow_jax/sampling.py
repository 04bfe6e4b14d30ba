"""Token distributions from logits (temperature, top-p) and sampling from them.

The decoding engine, the verifier and the PPOW rollouts all turn logits into probabilities
here, so that the target's distribution used for acceptance is exactly the one that plain
autoregressive decoding would sample from (the losslessness of speculative sampling is only
with respect to *that* distribution).

Conventions:

* ``temperature`` and ``top_p`` are static Python numbers (they choose the code path), checked
  with ``UserError``. ``temperature == 0`` means greedy: a one-hot of the argmax (ties go to the
  lowest index, like ``jnp.argmax``), so that rejection sampling on these probabilities
  reproduces greedy decoding exactly.
* Probabilities are float32 whatever the logits' dtype.
* Sampling is the Gumbel-max trick, ``argmax(log p + g)``: a token of probability 0 is never
  drawn, a one-hot distribution returns its token exactly, and the noise ``g`` can be supplied
  (``sample_with_gumbel``) so that a test can replay a draw.
"""

from __future__ import annotations

import math
import numbers

import jax
import jax.numpy as jnp

from ppow_jax.errors import UserError

Array = jax.Array


def check_temperature(temperature: float) -> float:
  """Returns ``temperature`` as a float; it must be a static, finite number >= 0."""
  if (isinstance(temperature, bool) or not isinstance(temperature, numbers.Real)
      or not math.isfinite(temperature) or temperature < 0):
    raise UserError(f"temperature must be a finite Python number >= 0, got {temperature!r}")
  return float(temperature)


def check_top_p(top_p: float) -> float:
  """Returns ``top_p`` as a float; it must be a static number in (0, 1]."""
  if (isinstance(top_p, bool) or not isinstance(top_p, numbers.Real)
      or not 0.0 < top_p <= 1.0):
    raise UserError(f"top_p must be a Python number in (0, 1], got {top_p!r}")
  return float(top_p)


def top_p_mask(probs_xV: Array, top_p: float) -> Array:
  """Boolean mask of the nucleus: the fewest most-probable tokens with mass >= ``top_p``.

  The top token is always kept. Tokens tied with the least probable kept token are all kept,
  so the result does not depend on how a sort orders equal values (the set can then be
  slightly larger than the smallest one).
  """
  top_p = check_top_p(top_p)
  sorted_xV = -jnp.sort(-probs_xV, axis=-1)  # descending
  mass_before_xV = jnp.cumsum(sorted_xV, axis=-1) - sorted_xV
  num_keep_x1 = jnp.maximum(jnp.sum(mass_before_xV < top_p, axis=-1, keepdims=True), 1)
  threshold_x1 = jnp.take_along_axis(sorted_xV, num_keep_x1 - 1, axis=-1)
  return probs_xV >= threshold_x1


def _scaled_logits(logits_xV: Array, temperature: float) -> Array:
  return logits_xV.astype(jnp.float32) / jnp.float32(temperature)


def greedy(logits_xV: Array) -> Array:
  """``argmax`` over the last axis (int32; ties go to the lowest index), as two plain reductions.

  The maximum, then the lowest index holding it: XLA's CPU backend vectorises both, while its
  variadic (value, index) reduction behind ``jnp.argmax`` took 5-12x longer over a vocabulary
  (BENCHMARKS.md), and decoding takes one per AR step, draft token and verification. A row
  without a maximum (NaN) gives the last index rather than an out-of-range one.
  """
  v = logits_xV.shape[-1]
  max_x1 = jnp.max(logits_xV, axis=-1, keepdims=True)
  index_V = jnp.arange(v, dtype=jnp.int32)
  first_x = jnp.min(jnp.where(logits_xV == max_x1, index_V, v), axis=-1)
  return jnp.minimum(first_x, v - 1)


def _greedy_one_hot(logits_xV: Array) -> Array:
  return jax.nn.one_hot(greedy(logits_xV), logits_xV.shape[-1], dtype=jnp.float32)


def probs_from_logits(logits_xV: Array, temperature: float, top_p: float = 1.0) -> Array:
  """Sampling distribution [..., V] (float32) at ``temperature`` with optional nucleus filter.

  T=0 gives the one-hot of the argmax (``top_p`` is then irrelevant); otherwise
  softmax(logits / T), restricted to the top-p nucleus and renormalised.
  """
  temperature, top_p = check_temperature(temperature), check_top_p(top_p)
  if temperature == 0.0:
    return _greedy_one_hot(logits_xV)
  probs_xV = jax.nn.softmax(_scaled_logits(logits_xV, temperature), axis=-1)
  if top_p < 1.0:
    probs_xV = jnp.where(top_p_mask(probs_xV, top_p), probs_xV, 0.0)
    probs_xV = probs_xV / jnp.sum(probs_xV, axis=-1, keepdims=True)
  return probs_xV


def sample_with_gumbel(gumbel_xV: Array, probs_xV: Array) -> Array:
  """argmax(log p + g) [...] (int32): a draw from ``p`` given Gumbel(0, 1) noise ``g``.

  ``probs_xV`` need not be normalised (the argmax ignores a common factor); zero entries are
  never chosen. A row of all zeros returns 0.
  """
  logp_xV = jnp.log(probs_xV.astype(jnp.float32))
  return greedy(logp_xV + gumbel_xV)


def sample(rng: Array, probs_xV: Array) -> Array:
  """One token per row [...] (int32) drawn from ``probs_xV`` (one-hot rows return their argmax)."""
  gumbel_xV = jax.random.gumbel(rng, probs_xV.shape, jnp.float32)
  return sample_with_gumbel(gumbel_xV, probs_xV)
