"""Jitted drafter train steps: the token-level baseline and PPOW, sharing state and optimizer.

The frozen target runs outside ``value_and_grad`` under ``stop_gradient`` and has no optimizer
state; only the drafter's trainable parameters are in ``TrainState`` (EAGLE-3's vocabulary maps
are constants passed beside them).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import flax
import jax
import jax.numpy as jnp
import optax

from ppow_jax import divergences, objectives, rollout, teacher_forcing, windowing
from ppow_jax.drafters import Drafter, Eagle3FeatureDrafter
from ppow_jax.errors import UserError
from ppow_jax.models import llama

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  learning_rate: float  # peak learning rate.
  warmup_steps: int  # linear warmup from 0.
  decay_steps: int  # cosine decay length after warmup (to end_lr_fraction * peak).
  end_lr_fraction: float
  b1: float
  b2: float  # EAGLE-3 uses (0.9, 0.95).
  weight_decay: float
  grad_clip: float  # global-norm clipping (EAGLE-3: 0.5).


@dataclasses.dataclass(frozen=True)
class BaselineConfig:
  divergence: str  # forward_kl | reverse_kl | jsd | tv | neg_log_alpha
  ttt_steps: int  # EAGLE-3 training-time-test unroll S (1 = plain teacher forcing).
  step_decay: float  # weight of unrolled step i is decay**i.
  ttt_from_step: int  # optimizer step from which the S-step unroll trains (before it: S = 1)
  # weight of EAGLE-1's feature regression (cached-feature training): smooth-L1 between the
  # drafter's final-normed output and the target's at the predicted position; 0 = off
  feature_regression: float
  # EAGLE-1's augmentation (cached-feature training): U(-a, a) noise, in units of each
  # feature's RMS at its token, on the target features the drafter reads; 0 = off
  feature_noise: float
  # the drafter's attention stays within each conversation of a packed row (the input
  # pipeline's segment ids), as when it decodes; False: across the whole row
  document_mask: bool

  def row_segments(self, batch: dict) -> Optional[Array]:
    """The batch's segment ids when ``document_mask`` is on, else None."""
    return batch["segment_ids_BxT"] if self.document_mask else None

  def __post_init__(self):
    divergences.get_divergence(self.divergence)
    if self.ttt_steps < 1:
      raise UserError(f"baseline.ttt_steps must be >= 1, got {self.ttt_steps}")
    if self.feature_regression < 0:
      raise UserError(f"baseline.feature_regression must be >= 0, got {self.feature_regression}")
    if self.feature_noise < 0:
      raise UserError(f"baseline.feature_noise must be >= 0, got {self.feature_noise}")
    if self.ttt_from_step < 0:
      raise UserError(f"baseline.ttt_from_step must be >= 0, got {self.ttt_from_step}")


def ttt_schedule(cfg: BaselineConfig, make: Callable[[BaselineConfig], Callable]) -> Callable:
  """The step ``make(cfg)`` builds, run with S = 1 while ``state.step < cfg.ttt_from_step``.

  A drafter's first draft step is learned fastest alone (a step costs a third of an S = 3
  unroll, and the later steps feed back a hidden state that is noise until step 0 works);
  the unroll then teaches the later steps. One jitted program: the branch follows the step
  counter, so a resumed run switches at the same step.
  """
  full = make(cfg)
  if cfg.ttt_from_step == 0 or cfg.ttt_steps == 1:
    return full
  warm = make(dataclasses.replace(cfg, ttt_steps=1))

  def step(state: TrainState, *args):
    return jax.lax.cond(state.step < cfg.ttt_from_step, warm, full, state, *args)

  return step


def make_optimizer(cfg: OptimConfig) -> optax.GradientTransformation:
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, cfg.learning_rate, max(cfg.warmup_steps, 1), cfg.warmup_steps + cfg.decay_steps,
      cfg.learning_rate * cfg.end_lr_fraction)
  return optax.chain(optax.clip_by_global_norm(cfg.grad_clip),
                     optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2,
                                 weight_decay=cfg.weight_decay))


@flax.struct.dataclass
class TrainState:
  step: Array
  params: Any  # trainable drafter parameters
  opt_state: Any
  rng: Array
  pool: Any = None  # PPOW: the ADAW ``windowing.SequencePool`` (None for the baseline)


def split_params(drafter: Drafter, draft_params) -> tuple[Any, Any]:
  """(trainable, constants): EAGLE-3's d2t/t2d maps are not trained."""
  if isinstance(drafter, Eagle3FeatureDrafter):
    return draft_params["net"], draft_params["vocab"]
  return draft_params, None


def join_params(drafter: Drafter, trainable, constants):
  if isinstance(drafter, Eagle3FeatureDrafter):
    return {"net": trainable, "vocab": constants}
  return trainable


def init_state(trainable, optimizer: optax.GradientTransformation, rng: Array,
               pool: Optional[windowing.SequencePool] = None) -> TrainState:
  return TrainState(jnp.zeros((), jnp.int32), trainable, optimizer.init(trainable), rng, pool)


def init_ppow_state(trainable, optimizer: optax.GradientTransformation, rng: Array,
                    cfg: rollout.PPOWConfig, batch: int, seq_len: int) -> TrainState:
  """A PPOW train state: the baseline's plus an empty ADAW pool sized for ``batch``."""
  return init_state(trainable, optimizer, rng,
                    windowing.init_pool(cfg.pool_rows(batch), seq_len))


def token_loss(drafter: Drafter, cfg: BaselineConfig, draft_params, target_params,
               tokens_BxT: Array, loss_mask_BxT: Array, tpass: teacher_forcing.TargetPass,
               segments_BxT: Optional[Array] = None) -> tuple[Array, dict]:
  """EAGLE-3 TTT loss (S unrolled steps, weights decay**i), or plain TF for an LM drafter
  (``segments_BxT``: the EAGLE-3 unroll attends within documents)."""
  next_BxT = teacher_forcing.next_token_mask(loss_mask_BxT)
  if isinstance(drafter, Eagle3FeatureDrafter) and (cfg.ttt_steps > 1 or
                                                    segments_BxT is not None):
    logits_SxBxTxV, valid_SxT = teacher_forcing.eagle3_ttt_logits(
        drafter, draft_params, target_params, tokens_BxT, tpass, cfg.ttt_steps, segments_BxT)
    logq = jax.nn.log_softmax(logits_SxBxTxV, axis=-1)
    logp = jnp.broadcast_to(tpass.logp_BxTxV, logq.shape)
    mask = valid_SxT[:, None, :] & next_BxT[None]
    loss = divergences.eagle3_ttt_loss(logp, logq, mask, cfg.divergence, cfg.step_decay)
    return loss, {"token_loss": loss}
  dpass = teacher_forcing.drafter_pass(drafter, draft_params, target_params, tokens_BxT, tpass, 0)
  logq = jax.nn.log_softmax(dpass.logits_BxTxV, axis=-1)
  loss = divergences.token_loss(cfg.divergence, tpass.logp_BxTxV, logq,
                                next_BxT & dpass.valid_T[None])
  return loss, {"token_loss": loss}


def _apply_update(optimizer, state: TrainState, grads) -> tuple[TrainState, Array]:
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  return state.replace(params=params, opt_state=opt_state), optax.tree.norm(grads)


def make_baseline_step(target_cfg: llama.ModelConfig, drafter: Drafter, cfg: BaselineConfig,
                       optimizer: optax.GradientTransformation,
                       updates_per_batch: int = 1) -> Callable:
  """(state, target_params, constants, batch) -> (state, metrics); jit it with shardings.

  ``updates_per_batch`` optimizer updates on each batch (one target pass): the budget-matched
  continued control mirrors PPOW's ``ppo_epochs`` updates per rollout with it.
  """
  hidden_layers = drafter.target_hidden_layers
  if updates_per_batch < 1:
    raise UserError(f"updates_per_batch must be >= 1, got {updates_per_batch}")
  return ttt_schedule(cfg, lambda cfg: _baseline_step(target_cfg, drafter, cfg, optimizer,
                                                      updates_per_batch, hidden_layers))


def _baseline_step(target_cfg, drafter, cfg: BaselineConfig, optimizer, updates_per_batch: int,
                   hidden_layers) -> Callable:

  def step(state: TrainState, target_params, constants, batch):
    tokens, mask = batch["tokens_BxT"], batch["loss_mask_BxT"]
    tpass = teacher_forcing.target_pass(target_cfg, target_params, tokens, hidden_layers, 0)

    def loss_fn(trainable):
      params = join_params(drafter, trainable, constants)
      return token_loss(drafter, cfg, params, target_params, tokens, mask, tpass,
                        cfg.row_segments(batch))

    def update(st, _):
      (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(st.params)
      st, gnorm = _apply_update(optimizer, st, grads)
      return st, dict(metrics, loss=loss, grad_norm=gnorm)

    state, metrics = jax.lax.scan(update, state, None, length=updates_per_batch)
    metrics = jax.tree_util.tree_map(lambda x: x[-1], metrics)
    metrics = dict(metrics, windows=jnp.asarray(tokens.shape[0] * tokens.shape[1], jnp.float32),
                   updates=jnp.asarray(updates_per_batch, jnp.float32),
                   target_calls=jnp.ones((), jnp.float32),
                   target_tokens=jnp.asarray(tokens.size, jnp.float32))
    return state.replace(step=state.step + 1), metrics

  return step


def _select_windows(cfg: rollout.PPOWConfig, step: Array, rng: Array,
                    pool: windowing.SequencePool, n: int):
  """ADAW across the pool (uniform during the warm-up); the chosen starts are spent."""
  k_uni, k_adaw = jax.random.split(rng)
  keys = windowing.selection_keys(cfg.selection, k_adaw, pool.scores_PxT,
                                  cfg.selection_temperature)
  uniform = windowing.selection_keys("uniform", k_uni, pool.scores_PxT, 1.0)
  keys = jnp.where(step < cfg.adaw_warmup_steps, uniform, keys)
  row_R, start_R, valid_R = windowing.select_nonoverlapping(keys, n, cfg.window)
  chosen_R = pool.scores_PxT[row_R, start_R]
  return row_R, start_R, valid_R, chosen_R, windowing.spend(pool, row_R, start_R, valid_R)


def trained_positions(ro: rollout.Rollout, window: int) -> Array:
  """``[N, K]``: the accepted prefix and the first rejected token of each real window."""
  return objectives.tokens_that_mattered_mask(ro.accepted_N, window) & ro.valid_N[:, None]


def ppow_window_loss(drafter: Drafter, cfg: rollout.PPOWConfig, params, target_params,
                     tokens_RxT: Array, tpass: teacher_forcing.TargetPass, ro: rollout.Rollout,
                     ttt_loss: Optional[Array] = None) -> tuple[Array, dict]:
  """Clipped surrogate + ω · anchor on the rollout's windows, re-drafted under ``params``.

  The anchor is ``D(p ‖ q)`` at the trained window positions: ``q`` the drafter's self-fed
  prediction there (forced along the sampled window), ``p`` the target after the same draft
  prefix; ``ttt_loss`` (weighted by ``anchor_ttt_weight``) is added to it when given.
  """
  k = cfg.window
  trained_NxK = trained_positions(ro, k)
  dpass = teacher_forcing.drafter_pass(drafter, params, target_params, tokens_RxT, tpass, k + 2)
  chain, buffer, n_N = teacher_forcing.chain_states(drafter, dpass, tokens_RxT, ro.seq_N,
                                                    ro.start_N, k + 2)
  _, logits_NxKxV, _ = drafter.draft(params, target_params, chain, buffer, n_N,
                                     jax.random.PRNGKey(0), k, 1.0, 1.0,
                                     forced_BxK=ro.tokens_NxK)  # forced: the key is unused
  logq_NxKxV = jax.nn.log_softmax(logits_NxKxV, -1)
  logq_new = objectives.token_log_probs(logq_NxKxV, ro.tokens_NxK)
  anchor = divergences.token_loss(cfg.anchor_divergence, ro.logp_NxKxV, logq_NxKxV, trained_NxK)
  if ttt_loss is not None:
    anchor = anchor + cfg.anchor_ttt_weight * ttt_loss
  return objectives.ppow_loss(logq_new, ro.logq_old_NxK, ro.advantage_N, trained_NxK,
                              omega=cfg.omega, clip_eps=cfg.clip_eps, ratio=cfg.ratio,
                              anchor_loss=anchor)


def make_ppow_step(target_cfg: llama.ModelConfig, drafter: Drafter, cfg: rollout.PPOWConfig,
                   optimizer: optax.GradientTransformation,
                   baseline_cfg: Optional[BaselineConfig] = None) -> Callable:
  """One PPOW step: pool the batch, pick windows (ADAW), roll out, ``ppo_epochs`` updates.

  The state must come from ``init_ppow_state`` (it carries the pool). The loss is the clipped
  surrogate plus ``ω · D(p ‖ q)`` at the window positions being trained (the accepted prefix
  and the first rejected token, the target conditioned on the draft prefix), plus, when
  ``anchor_ttt_weight > 0``, that weight times the baseline's token loss on the batch.
  """
  k, g = cfg.window, cfg.group_size
  hidden_layers = drafter.target_hidden_layers
  if cfg.anchor_ttt_weight > 0 and baseline_cfg is None:
    raise UserError("ppow.anchor_ttt_weight > 0 needs the baseline config (its TTT loss)")

  def step(state: TrainState, target_params, constants, batch):
    tokens, mask = batch["tokens_BxT"], batch["loss_mask_BxT"]
    b = tokens.shape[0]
    r = b * cfg.starts_per_seq
    rng, k_sel, k_roll = jax.random.split(state.rng, 3)
    params_now = join_params(drafter, state.params, constants)
    target_pass = lambda x, extra: teacher_forcing.target_pass(target_cfg, target_params, x,
                                                               hidden_layers, extra)
    score = lambda x, m, tp: rollout.score_starts(drafter, cfg, params_now, target_params, x,
                                                  m, tp)
    # 1. the batch joins the pool (oldest rows out), scored by the current drafter
    tpass_b = target_pass(tokens, 0)
    pool = state.pool
    rows = pool.capacity
    pool = windowing.insert(pool, (state.step * b) % rows, tokens, mask,
                            score(tokens, mask, tpass_b))

    def rescore(p):  # every pool_refresh_every steps: the whole pool, B rows at a time
      chunk = lambda x: x.reshape((rows // b, b) + x.shape[1:])
      scores = jax.lax.map(lambda tm: score(tm[0], tm[1], target_pass(tm[0], 0)),
                           (chunk(p.tokens_PxT), chunk(p.mask_PxT)))
      return p.replace(scores_PxT=scores.reshape(p.scores_PxT.shape))

    refresh = jnp.asarray(False)
    if rows > b:  # a pool of one batch is scored as it joins: nothing to refresh or compile
      refresh = (state.step > 0) & (state.step % cfg.pool_refresh_every == 0)
      pool = jax.lax.cond(refresh, rescore, lambda p: p, pool)
    # 2. R windows across the pool, then their rows' target pass (room for G·K window slots)
    row_R, start_R, valid_R, chosen_R, pool = _select_windows(cfg, state.step, k_sel, pool, r)
    tokens_R = pool.tokens_PxT[row_R]
    tpass_r = target_pass(tokens_R, g * k)
    ro = rollout.rollout(target_cfg, drafter, cfg, target_params, params_now, tokens_R, start_R,
                         valid_R, tpass_r, k_roll)

    def loss_fn(trainable):
      params = join_params(drafter, trainable, constants)
      ttt = None
      if cfg.anchor_ttt_weight > 0:
        ttt = token_loss(drafter, baseline_cfg, params, target_params, tokens, mask, tpass_b,
                         baseline_cfg.row_segments(batch))[0]
      return ppow_window_loss(drafter, cfg, params, target_params, tokens_R, tpass_r, ro, ttt)

    def epoch(st, _):
      (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(st.params)
      st, gnorm = _apply_update(optimizer, st, grads)
      return st, dict(stats, grad_norm=gnorm)

    state, stats = jax.lax.scan(epoch, state, None, length=cfg.ppo_epochs)
    stats = jax.tree_util.tree_map(lambda x: x[-1], stats)
    finite = pool.scores_PxT > -jnp.inf
    metrics = dict(
        stats, **ro.metrics, windows=jnp.asarray(r * g, jnp.float32),
        updates=jnp.asarray(cfg.ppo_epochs, jnp.float32),
        # batch scoring, the rows' pass, verification; a refresh adds one call per B rows
        target_calls=3.0 + refresh * (rows // b),
        target_tokens=jnp.asarray(tokens.size + tokens_R.size + r * g * k, jnp.float32)
        + refresh * pool.tokens_PxT.size,
        adaw_selected_mean=jnp.sum(jnp.where(valid_R, chosen_R, 0)) / jnp.maximum(
            valid_R.sum(), 1),
        adaw_pool_mean=jnp.sum(jnp.where(finite, pool.scores_PxT, 0)) / jnp.maximum(
            finite.sum(), 1),
        adaw_distinct_rows=jnp.sum(jnp.any(
            (row_R[:, None] == jnp.arange(rows)[None]) & valid_R[:, None], axis=0)))
    return state.replace(step=state.step + 1, rng=rng, pool=pool), metrics

  return step
