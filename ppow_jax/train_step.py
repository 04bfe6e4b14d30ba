"""Jitted drafter train steps: the token-level baseline and PPOW, sharing state and optimizer.

The frozen target runs outside ``value_and_grad`` under ``stop_gradient`` and has no optimizer
state; only the drafter's trainable parameters are in ``TrainState`` (EAGLE-3's vocabulary maps
are constants passed beside them).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax

from ppow_jax import divergences, objectives, rollout, teacher_forcing
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

  def __post_init__(self):
    divergences.get_divergence(self.divergence)
    if self.ttt_steps < 1:
      raise UserError(f"baseline.ttt_steps must be >= 1, got {self.ttt_steps}")


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


def split_params(drafter: Drafter, draft_params) -> tuple[Any, Any]:
  """(trainable, constants): EAGLE-3's d2t/t2d maps are not trained."""
  if isinstance(drafter, Eagle3FeatureDrafter):
    return draft_params["net"], draft_params["vocab"]
  return draft_params, None


def join_params(drafter: Drafter, trainable, constants):
  if isinstance(drafter, Eagle3FeatureDrafter):
    return {"net": trainable, "vocab": constants}
  return trainable


def init_state(trainable, optimizer: optax.GradientTransformation, rng: Array) -> TrainState:
  return TrainState(jnp.zeros((), jnp.int32), trainable, optimizer.init(trainable), rng)


def _next_mask(loss_mask_BxT: Array) -> Array:
  """Index t predicts x_{t+1}: it counts when x_{t+1} is a training token."""
  return jnp.pad(loss_mask_BxT[:, 1:].astype(bool), ((0, 0), (0, 1)))


def token_loss(drafter: Drafter, cfg: BaselineConfig, draft_params, target_params,
               tokens_BxT: Array, loss_mask_BxT: Array, tpass: teacher_forcing.TargetPass
               ) -> tuple[Array, dict]:
  """EAGLE-3 TTT loss (S unrolled steps, weights decay**i), or plain TF for an LM drafter."""
  next_BxT = _next_mask(loss_mask_BxT)
  if isinstance(drafter, Eagle3FeatureDrafter) and cfg.ttt_steps > 1:
    logits_SxBxTxV, valid_SxT = teacher_forcing.eagle3_ttt_logits(
        drafter, draft_params, target_params, tokens_BxT, tpass, cfg.ttt_steps)
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
                       optimizer: optax.GradientTransformation) -> Callable:
  """(state, target_params, constants, batch) -> (state, metrics); jit it with shardings."""
  hidden_layers = drafter.target_hidden_layers

  def step(state: TrainState, target_params, constants, batch):
    tokens, mask = batch["tokens_BxT"], batch["loss_mask_BxT"]
    tpass = teacher_forcing.target_pass(target_cfg, target_params, tokens, hidden_layers, 0)

    def loss_fn(trainable):
      params = join_params(drafter, trainable, constants)
      return token_loss(drafter, cfg, params, target_params, tokens, mask, tpass)

    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    state, gnorm = _apply_update(optimizer, state, grads)
    metrics = dict(metrics, loss=loss, grad_norm=gnorm,
                   windows=jnp.asarray(tokens.shape[0] * tokens.shape[1], jnp.float32))
    return state.replace(step=state.step + 1), metrics

  return step


def make_ppow_step(target_cfg: llama.ModelConfig, drafter: Drafter, cfg: rollout.PPOWConfig,
                   optimizer: optax.GradientTransformation) -> Callable:
  """One rollout, then ``ppo_epochs`` clipped-surrogate + ω·anchor updates on it."""
  k = cfg.window
  hidden_layers = drafter.target_hidden_layers

  def step(state: TrainState, target_params, constants, batch):
    tokens, mask = batch["tokens_BxT"], batch["loss_mask_BxT"]
    rng, k_roll = jax.random.split(state.rng)
    n_windows = tokens.shape[0] * cfg.starts_per_seq * cfg.group_size
    # room after each sequence for its S*G windows, verified as one block (rollout.py)
    tpass = teacher_forcing.target_pass(target_cfg, target_params, tokens, hidden_layers,
                                        cfg.starts_per_seq * cfg.group_size * k)
    ro = rollout.rollout(target_cfg, drafter, cfg, target_params,
                         join_params(drafter, state.params, constants), tokens, mask, tpass,
                         k_roll)
    matter_NxK = objectives.tokens_that_mattered_mask(ro.accepted_N, k)
    next_BxT = _next_mask(mask)

    def loss_fn(trainable):
      params = join_params(drafter, trainable, constants)
      dpass = teacher_forcing.drafter_pass(drafter, params, target_params, tokens, tpass, k + 2)
      chain, buffer, n_N = teacher_forcing.chain_states(drafter, dpass, tokens, ro.seq_N,
                                                        ro.start_N, k + 2)
      _, logits_NxKxV, _ = drafter.draft(params, target_params, chain, buffer, n_N, rng, k,
                                         1.0, 1.0, forced_BxK=ro.tokens_NxK)
      logq_new = objectives.token_log_probs(jax.nn.log_softmax(logits_NxKxV, -1), ro.tokens_NxK)
      anchor_loss = divergences.token_loss(
          cfg.anchor_divergence, tpass.logp_BxTxV, jax.nn.log_softmax(dpass.logits_BxTxV, -1),
          next_BxT & dpass.valid_T[None])
      return objectives.ppow_loss(logq_new, ro.logq_old_NxK, ro.advantage_N, matter_NxK,
                                  omega=cfg.omega, clip_eps=cfg.clip_eps, ratio=cfg.ratio,
                                  anchor_loss=anchor_loss)

    def epoch(st, _):
      (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(st.params)
      st, gnorm = _apply_update(optimizer, st, grads)
      return st, dict(stats, grad_norm=gnorm)

    state, stats = jax.lax.scan(epoch, state, None, length=cfg.ppo_epochs)
    stats = jax.tree_util.tree_map(lambda x: x[-1], stats)
    metrics = dict(stats, **ro.metrics, windows=jnp.asarray(n_windows, jnp.float32))
    return state.replace(step=state.step + 1, rng=rng), metrics

  return step
