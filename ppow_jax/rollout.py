"""PPOW rollouts: choose window starts (ADAW), sample G windows each, verify, score.

One frozen target pass per training sequence supplies its distributions, the EAGLE-3 features
and a prefix KV cache. All windows of a sequence are then verified in *one* more target call:
they are appended after the sequence as a block, each window attending to its own prefix
(cache slots <= its start) and to its own earlier tokens only — an explicit attention mask,
so the target's cache is never copied per window. The drafter, small by design, drafts each
window from its own copy of the prefix cache with the engine's ``draft``.
"""

from __future__ import annotations

import dataclasses

import flax
import jax
import jax.numpy as jnp

from ppow_jax import acceptance, rewards, teacher_forcing, windowing
from ppow_jax.drafters import Drafter
from ppow_jax.errors import UserError
from ppow_jax.models import llama

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class PPOWConfig:
  """PPOW's knobs (docs/protocol.md): ``settings.ppow(c, gamma)``, values from ``config.ppow``
  (configs/common.py; no defaults here, so the config is their one source)."""
  window: int  # K: draft tokens per window.
  group_size: int  # G: windows sampled per start (advantages are standardised within).
  starts_per_seq: int  # windows starts chosen per training sequence.
  gamma: float  # drafter step cost / verification cost (speed reward).
  speed_form: str  # or "paper_summary"
  use_speed: bool  # ablation switch: Cost-Aware Speedup Reward.
  use_prox: bool  # ablation switch: Distribution-Based Proximity Reward.
  prox_form: str  # or "indicator"
  lambda_prox: float  # weight of the proximity reward.
  prox_eta: float  # indicator form: reward value.
  prox_eps: float  # indicator form: threshold on the log-prob gap.
  selection: str  # ADAW selection: topk | softmax | uniform (ablation).
  selection_temperature: float  # softmax selection temperature τ_w.
  clip_eps: float  # PPO clip ε.
  ratio: str  # token | geometric_mean (GTO-style).
  omega: float  # weight of the target-anchored token loss.
  anchor_divergence: str  # divergence of the anchor term.
  ppo_epochs: int  # gradient steps per rollout (> 1 makes the clip matter).
  adv_delta: float  # δ in A = (R - mean) / (std + δ).

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
    if self.ppo_epochs < 1:
      raise UserError(f"ppow.ppo_epochs must be >= 1, got {self.ppo_epochs}")
    if not (self.use_speed or self.use_prox):
      raise UserError("ppow.use_speed and ppow.use_prox are both False: no reward left")


@flax.struct.dataclass
class Rollout:
  seq_N: Array  # chain n belongs to sequence seq_N[n]; N = B * S * G, ordered (B, S, G)
  start_N: Array  # drafting starts after this position
  tokens_NxK: Array  # sampled drafts
  logq_old_NxK: Array  # their log-probs under the rollout policy
  accepted_N: Array  # a, by lossless rejection sampling
  alpha_NxK: Array
  reward_N: Array
  advantage_N: Array
  metrics: dict


def select_starts(rng: Array, tpass: teacher_forcing.TargetPass,
                  dpass: teacher_forcing.DrafterPass, loss_mask_BxT: Array, cfg: PPOWConfig
                  ) -> tuple[Array, Array, Array]:
  """ADAW: score every start by its window's confidence-weighted divergence, pick S per row."""
  b, t = loss_mask_BxT.shape
  logq = jax.nn.log_softmax(dpass.logits_BxTxV, axis=-1)
  u_BxT = windowing.position_scores(tpass.logp_BxTxV, logq)
  idx = jnp.arange(t)
  # index i predicts x_{i+1}: it needs a drafter prediction and x_{i+1} to be a training token
  next_mask_BxT = jnp.pad(loss_mask_BxT[:, 1:].astype(bool), ((0, 0), (0, 1)))
  valid_BxT = dpass.valid_T[None] & next_mask_BxT
  scores_BxT = windowing.sliding_window_scores(u_BxT, valid_BxT, cfg.window)
  scores_BxT = jnp.where((idx >= 1)[None] & valid_BxT, scores_BxT, -jnp.inf)
  keys = jax.random.split(rng, b)
  pick = lambda k, s: windowing.select(cfg.selection, k, s, cfg.starts_per_seq,
                                       cfg.selection_temperature)
  starts_BxS = jax.vmap(pick)(keys, scores_BxT)
  chosen = jnp.take_along_axis(scores_BxT, starts_BxS, axis=1)
  return starts_BxS.astype(jnp.int32), chosen, scores_BxT


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
  """Target log-probs ``[B, M, K+1, V]`` for every window, in one call (see module doc)."""
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
            draft_params, tokens_BxT: Array, loss_mask_BxT: Array,
            tpass: teacher_forcing.TargetPass, rng: Array) -> Rollout:
  """Sample and score B*S*G windows with the current drafter (no gradient)."""
  b, t = tokens_BxT.shape
  s, g, k = cfg.starts_per_seq, cfg.group_size, cfg.window
  draft_params = jax.lax.stop_gradient(draft_params)
  k_sel, k_draft, k_acc = jax.random.split(rng, 3)
  dpass = teacher_forcing.drafter_pass(drafter, draft_params, target_params, tokens_BxT, tpass,
                                       k + 2)
  starts_BxS, chosen_BxS, scores_BxT = select_starts(k_sel, tpass, dpass, loss_mask_BxT, cfg)
  seq_N = jnp.repeat(jnp.arange(b), s * g)
  start_N = jnp.repeat(starts_BxS.reshape(-1), g)
  state, buffer, n_N = teacher_forcing.chain_states(drafter, dpass, tokens_BxT, seq_N, start_N,
                                                    k + 2)
  tokens_NxK, dlogits_NxKxV, _ = drafter.draft(draft_params, target_params, state, buffer, n_N,
                                               k_draft, k, 1.0, 1.0)
  logq_NxKxV = jax.nn.log_softmax(dlogits_NxKxV, axis=-1)
  logp_BxMxK1xV = verify_windows(target_cfg, target_params, tpass,
                                 tokens_NxK.reshape(b, s * g, k), start_N.reshape(b, s * g))
  logp_NxK1xV = logp_BxMxK1xV.reshape(b * s * g, k + 1, -1)
  res = acceptance.rejection_accept(k_acc, tokens_NxK, jnp.exp(logq_NxKxV),
                                    jnp.exp(logp_NxK1xV))
  delta_N = rewards.greedy_log_prob_gap(logp_NxK1xV[:, :k], tokens_NxK)
  reward_N, parts = rewards.total_reward(
      res.num_accepted_B, jnp.full((b * s * g,), k), res.alpha_BxK, delta_N=delta_N,
      gamma=cfg.gamma, lambda_prox=cfg.lambda_prox, use_speed=cfg.use_speed,
      use_prox=cfg.use_prox, speed_form=cfg.speed_form, prox_form=cfg.prox_form,
      eta=cfg.prox_eta, eps=cfg.prox_eps)
  adv_N = rewards.group_advantages(reward_N.reshape(-1, g), cfg.adv_delta).reshape(-1)
  finite = jnp.isfinite(scores_BxT)
  metrics = {
      "reward": parts["total"].mean(), "reward_speed": parts["speed"].mean(),
      "reward_prox": parts["prox"].mean(),
      "tau_sim": acceptance.analytic_tau(res.alpha_BxK).mean(),
      "accepted_mean": res.num_accepted_B.mean(),
      "accepted_hist": jnp.bincount(res.num_accepted_B, length=k + 1),
      "adaw_selected_mean": chosen_BxS.mean(),
      "adaw_all_mean": jnp.sum(jnp.where(finite, scores_BxT, 0)) / jnp.maximum(finite.sum(), 1),
      "adaw_all_max": jnp.max(jnp.where(finite, scores_BxT, -1.0)),
  }
  return Rollout(seq_N, start_N, tokens_NxK,
                 jnp.take_along_axis(logq_NxKxV, tokens_NxK[..., None], -1)[..., 0],
                 res.num_accepted_B, res.alpha_BxK, reward_N, adv_N, metrics)
