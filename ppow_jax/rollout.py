"""PPOW rollouts: score window starts (ADAW), sample G windows each, verify, reward.

A rollout works on R *rows*, one per chosen window start (rows may repeat a sequence). One
frozen target pass per row supplies its distributions, the EAGLE-3 features and a prefix KV
cache. All G windows of a row are then verified in *one* more target call: they are appended
after the sequence as a block, each window attending to its own prefix (cache slots <= its
start) and to its own earlier tokens only — an explicit attention mask, so the target's cache
is never copied per window. The drafter, small by design, drafts each window from its own copy
of the prefix cache with the engine's ``draft``.
"""

from __future__ import annotations

import dataclasses

import flax
import jax
import jax.numpy as jnp

from ppow_jax import acceptance, rewards, teacher_forcing, windowing
from ppow_jax.drafters import Drafter, Eagle3FeatureDrafter
from ppow_jax.errors import UserError
from ppow_jax.models import llama

Array = jax.Array

ADAW_SCORING = ("self_fed", "teacher_forced")


@dataclasses.dataclass(frozen=True)
class PPOWConfig:
  """PPOW's knobs (docs/protocol.md), ``settings.ppow(c, gamma)``, values from ``config.ppow``
  (configs/common.py; no defaults here, so the config is their one source)."""
  window: int
  group_size: int
  starts_per_seq: int  # windows per step = batch size × this, chosen across the pool
  gamma: float
  reward: flax.core.FrozenDict  # rewards.total_reward's knobs, by name (settings.knobs)
  selection: str
  selection_temperature: float
  pool_size: int  # sequences in the ADAW pool; 0 = the step's batch only
  pool_refresh_every: int
  adaw_warmup_steps: int
  adaw_scoring: str
  clip_eps: float
  ratio: str
  omega: float
  anchor_divergence: str
  anchor_ttt_weight: float
  ppo_epochs: int
  adv_delta: float
  adv_min_std: float

  def __post_init__(self):
    if self.window < 1:
      raise UserError(f"ppow.window must be >= 1, got {self.window}")
    if self.group_size < 2:
      raise UserError(f"ppow.group_size must be >= 2 (advantages are standardised within a "
                      f"group), got {self.group_size}")
    if self.starts_per_seq < 1:
      raise UserError(f"ppow.starts_per_seq must be >= 1, got {self.starts_per_seq}")
    if self.selection not in windowing.SELECTION_METHODS:
      raise UserError(f"ppow.selection must be one of {windowing.SELECTION_METHODS}, got "
                      f"{self.selection!r}")
    if self.adaw_scoring not in ADAW_SCORING:
      raise UserError(f"ppow.adaw_scoring must be one of {ADAW_SCORING}, got "
                      f"{self.adaw_scoring!r}")
    if self.pool_size < 0 or self.pool_refresh_every < 1 or self.adaw_warmup_steps < 0:
      raise UserError(f"ppow: pool_size and adaw_warmup_steps must be >= 0 and "
                      f"pool_refresh_every >= 1, got {self.pool_size}, "
                      f"{self.adaw_warmup_steps} and {self.pool_refresh_every}")
    if self.ppo_epochs < 1:
      raise UserError(f"ppow.ppo_epochs must be >= 1, got {self.ppo_epochs}")
    if self.anchor_ttt_weight < 0:
      raise UserError(f"ppow.anchor_ttt_weight must be >= 0, got {self.anchor_ttt_weight}")

  def pool_rows(self, batch: int) -> int:
    """Rows of the ADAW pool for a step batch of ``batch`` sequences (a multiple of it)."""
    rows = self.pool_size or batch
    if rows % batch:
      raise UserError(f"ppow.pool_size={self.pool_size} must be a multiple of the batch size "
                      f"{batch}")
    return rows


@flax.struct.dataclass
class Rollout:
  seq_N: Array  # window n belongs to row seq_N[n]; N = R * G, ordered (R, G)
  start_N: Array  # drafting starts after this position
  valid_N: Array  # false for rows whose start was not a real candidate (masked everywhere)
  tokens_NxK: Array  # sampled drafts
  logq_old_NxK: Array  # their log-probs under the rollout policy
  logp_NxKxV: Array  # the target at each drafted position, after the draft prefix (anchor)
  accepted_N: Array  # a, by lossless rejection sampling
  alpha_NxK: Array
  reward_N: Array
  advantage_N: Array
  metrics: dict


def score_starts(drafter: Drafter, cfg: PPOWConfig, draft_params, target_params,
                 tokens_BxT: Array, loss_mask_BxT: Array, tpass: teacher_forcing.TargetPass
                 ) -> Array:
  """ADAW score ``[B, T]`` of the window drafted after each index (``-inf``: not a start).

  ``adaw_scoring="self_fed"``: EAGLE-3's i-th drafted position is scored with the drafter's
  i-th *self-fed* prediction along the data (the training-time-test unroll, K steps); an LM
  drafter's teacher-forced prediction already is its self-fed one along the data. The
  ``"teacher_forced"`` option scores every position with the step-0 prediction (cheaper).
  """
  draft_params = jax.lax.stop_gradient(draft_params)
  t = tokens_BxT.shape[1]
  next_BxT = teacher_forcing.next_token_mask(loss_mask_BxT)
  if isinstance(drafter, Eagle3FeatureDrafter) and cfg.adaw_scoring == "self_fed":
    u_rows, valid_rows = [], []
    for logits_BxTxV, valid_T in teacher_forcing.eagle3_ttt_unroll(
        drafter, draft_params, target_params, tokens_BxT, tpass, cfg.window):
      u_rows.append(windowing.position_scores(tpass.logp_BxTxV,
                                              jax.nn.log_softmax(logits_BxTxV, axis=-1)))
      valid_rows.append(valid_T[None] & next_BxT)
    scores_BxT = windowing.chain_window_scores(jnp.stack(u_rows), jnp.stack(valid_rows))
  else:
    dpass = teacher_forcing.drafter_pass(drafter, draft_params, target_params, tokens_BxT,
                                         tpass, 0)
    u_BxT = windowing.position_scores(tpass.logp_BxTxV,
                                      jax.nn.log_softmax(dpass.logits_BxTxV, axis=-1))
    scores_BxT = windowing.sliding_window_scores(u_BxT, dpass.valid_T[None] & next_BxT,
                                                 cfg.window)
  # a window needs a prefix of >= 2 tokens (EAGLE-3's first entry pairs tokens 0 and 1)
  return jnp.where((jnp.arange(t) >= 1)[None], scores_BxT, -jnp.inf)


def window_block_mask(start_BxM: Array, seq_len: int, window: int) -> Array:
  """[B, M*K, T + M*K]: window m's token i sees prefix slots <= start and its tokens <= i."""
  b, m = start_BxM.shape
  slots = jnp.arange(seq_len + m * window)
  q_chain = jnp.repeat(jnp.arange(m), window)
  q_i = jnp.tile(jnp.arange(window), m)
  q_start_BxQ = jnp.repeat(start_BxM, window, axis=1)
  prefix = (slots[None, None] < seq_len) & (slots[None, None] <= q_start_BxQ[:, :, None])
  rel = slots - seq_len
  own = (rel >= 0)[None] & (rel // window == q_chain[:, None])[None] & (
      rel % window <= q_i[:, None])[None]
  return prefix | own


def verify_windows(target_cfg: llama.ModelConfig, target_params, tpass: teacher_forcing.TargetPass,
                   tokens_BxMxK: Array, start_BxM: Array) -> Array:
  """Target log-probs ``[B, M, K+1, V]`` for every window, in one call (see module doc).

  Entry i is the target's distribution for the window's token i (i = K: the bonus token)
  given the sequence up to ``start`` and the window's tokens before i.
  """
  b, m, k = tokens_BxMxK.shape
  t = tpass.logp_BxTxV.shape[1]
  positions = (start_BxM[:, :, None] + 1 + jnp.arange(k)).reshape(b, m * k)
  cache = tpass.cache.replace(lengths_B=jnp.full((b,), t, jnp.int32))
  out = llama.Decoder(target_cfg).apply(
      {"params": jax.lax.stop_gradient(target_params)}, tokens_BxMxK.reshape(b, m * k),
      positions, cache=cache, attn_mask_BxTxS=window_block_mask(start_BxM, t, k),
      method=llama.Decoder.forward)
  logp_BxMxKxV = jax.nn.log_softmax(out.logits_BxTxV, axis=-1).reshape(b, m, k, -1)
  first = jnp.take_along_axis(tpass.logp_BxTxV, start_BxM[:, :, None], axis=1)  # p_0
  return jax.lax.stop_gradient(jnp.concatenate([first[:, :, None], logp_BxMxKxV], axis=2))


def rollout(target_cfg: llama.ModelConfig, drafter: Drafter, cfg: PPOWConfig, target_params,
            draft_params, tokens_RxT: Array, start_R: Array, valid_R: Array,
            tpass: teacher_forcing.TargetPass, rng: Array) -> Rollout:
  """Sample and score G windows after ``start_R[r]`` of each row ``r`` (no gradient).

  ``tpass`` is the target pass over ``tokens_RxT`` with room for ``G·K`` more slots per row.
  """
  r = tokens_RxT.shape[0]
  g, k = cfg.group_size, cfg.window
  n = r * g
  draft_params = jax.lax.stop_gradient(draft_params)
  k_draft, k_acc = jax.random.split(rng)
  dpass = teacher_forcing.drafter_pass(drafter, draft_params, target_params, tokens_RxT, tpass,
                                       k + 2)
  seq_N = jnp.repeat(jnp.arange(r), g)
  start_N = jnp.repeat(start_R, g)
  valid_N = jnp.repeat(valid_R, g)
  state, buffer, n_N = teacher_forcing.chain_states(drafter, dpass, tokens_RxT, seq_N, start_N,
                                                    k + 2)
  tokens_NxK, dlogits_NxKxV, _ = drafter.draft(draft_params, target_params, state, buffer, n_N,
                                               k_draft, k, 1.0, 1.0)
  logq_NxKxV = jax.nn.log_softmax(dlogits_NxKxV, axis=-1)
  logp_RxGxK1xV = verify_windows(target_cfg, target_params, tpass,
                                 tokens_NxK.reshape(r, g, k), start_N.reshape(r, g))
  logp_NxK1xV = logp_RxGxK1xV.reshape(n, k + 1, -1)
  res = acceptance.rejection_accept(k_acc, tokens_NxK, jnp.exp(logq_NxKxV),
                                    jnp.exp(logp_NxK1xV))
  delta_N = rewards.greedy_log_prob_gap(logp_NxK1xV[:, :k], tokens_NxK)
  beta_NxK = rewards.sampled_accept_probs(logp_NxK1xV[:, :k], logq_NxKxV, tokens_NxK)
  reward_N, parts = rewards.total_reward(res.num_accepted_B, jnp.full((n,), k), cfg.gamma,
                                         **cfg.reward, delta_N=delta_N, accept_NxK=beta_NxK)
  adv_N = rewards.group_advantages(reward_N.reshape(-1, g), cfg.adv_delta,
                                   cfg.adv_min_std).reshape(-1)
  adv_N = jnp.where(valid_N, adv_N, 0.0)
  mean = lambda x: jnp.sum(jnp.where(valid_N, x, 0.0)) / jnp.maximum(valid_N.sum(), 1)
  rejected_N = valid_N & (res.num_accepted_B == 0)
  n_rejected = jnp.maximum(jnp.sum(rejected_N), 1)
  metrics = {
      "reward": mean(parts["total"]), "reward_speed": mean(parts["speed"]),
      "reward_prox": mean(parts["prox"]),
      "tau_sim": mean(acceptance.analytic_tau(res.alpha_BxK)),
      "accepted_mean": mean(res.num_accepted_B),
      "accepted_hist": jnp.bincount(jnp.where(valid_N, res.num_accepted_B, k + 1),
                                    length=k + 2)[:k + 1],
      "zero_advantage_groups": jnp.mean(jnp.all(adv_N.reshape(-1, g) == 0, axis=-1)),
      # Δ of the windows the proximity reward is for (a = 0), what ppow.prox_eps compares with:
      # mean, median and the share under ε (≈ 0 means the indicator reward never fires)
      "prox_gap_rejected": jnp.sum(jnp.where(rejected_N, delta_N, 0.0)) / n_rejected,
      "prox_gap_rejected_median": rewards.masked_median(delta_N, rejected_N),
      "prox_hit_rejected": jnp.sum(rejected_N & (delta_N < cfg.reward["prox_eps"])) / n_rejected,
      "valid_windows": valid_R.mean(),
  }
  return Rollout(seq_N, start_N, valid_N, tokens_NxK,
                 jnp.take_along_axis(logq_NxKxV, tokens_NxK[..., None], -1)[..., 0],
                 logp_NxK1xV[:, :k], res.num_accepted_B, res.alpha_BxK, reward_N, adv_N,
                 metrics)
