"""The token-level EAGLE-3 baseline step on precomputed target features (``feature_cache``).

Everything is done in the draft vocabulary: the target's logits on the kept tokens are
``final @ head[:, kept]`` and its log-probabilities there ``logits - lse`` (the whole
vocabulary's normaliser). Over the draft vocabulary the forward KL then has exactly the
gradient of the full-vocabulary loss of ``train_step.token_loss`` (whose out-of-vocabulary terms
are constants), at a fraction of the cost: no ``[B, T, V]`` tensor is ever built.
``support_only`` instead renormalises the target on the draft vocabulary and drops positions
whose target argmax is not drafted (EAGLE-3's own loss). ``feature_regression`` adds EAGLE-1's
loss on the drafter's normed output against the target's final hidden state (the cache holds it).
``feature_noise`` is EAGLE-1's augmentation: uniform noise on the target features the drafter
reads, drawn afresh every step, so a few hundred thousand cached tokens look less like a set to
memorise.
"""

from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp
import optax

from ppow_jax import divergences, feature_cache, teacher_forcing, train_step
from ppow_jax.drafters import Eagle3FeatureDrafter
from ppow_jax.models import eagle3, llama

Array = jax.Array


def constants(drafter: Eagle3FeatureDrafter, vocab: eagle3.DraftVocab, target_params) -> dict:
  """What the step needs besides the trainable net: the vocab maps and the target's head
  columns of the kept tokens ``[E, Vd]``."""
  kept_Vd = jnp.arange(vocab.d2t_Vd.shape[0]) + vocab.d2t_Vd
  head = feature_cache.target_head(drafter.target_cfg, target_params)
  return {"vocab": vocab, "head_ExVd": jnp.take(head, kept_Vd, axis=1).astype(jnp.float32)}


def augment_features(feats: tuple, key: Array, scale: float) -> tuple:
  """Each feature ``[B, T, E]`` plus ``U(-scale, scale)`` noise times that feature's RMS over
  its channels at that token: noise of ``scale`` in the units of the drafter's RMS-normed
  input, whatever the size of the target's hidden states (SmolLM2's reach 2.5e4)."""
  keys = jax.random.split(key, len(feats))
  out = []
  for k, f_BxTxE in zip(keys, feats):
    rms_BxTx1 = jnp.sqrt(jnp.mean(jnp.square(f_BxTxE), axis=-1, keepdims=True))
    u_BxTxE = jax.random.uniform(k, f_BxTxE.shape, f_BxTxE.dtype, -scale, scale)
    out.append(f_BxTxE + u_BxTxE * rms_BxTx1)
  return tuple(out)


def feature_loss(drafter: Eagle3FeatureDrafter, cfg: train_step.BaselineConfig, net, consts: dict,
                 target_params, batch: dict, support_only: bool,
                 noise_key: Optional[Array] = None) -> tuple[Array, dict]:
  """EAGLE-3 TTT loss over the draft vocabulary from one batch of cached features
  (``noise_key``: the draw of ``cfg.feature_noise``; required when it is above 0)."""
  tokens, e3 = batch["tokens_BxT"], drafter.target_cfg.hidden_size
  feats_BxTx3E = batch["feats_BxTx3E"].astype(jnp.float32)
  feats = tuple(feats_BxTx3E[:, :-1, i * e3:(i + 1) * e3] for i in range(3))
  if cfg.feature_noise > 0:
    feats = augment_features(feats, noise_key, cfg.feature_noise)
  embeds = drafter._embed(target_params, tokens[:, 1:])
  logits_SxBxTxVd, valid_SxT, out_SxBxTxE = teacher_forcing.eagle3_ttt_draft_logits(
      drafter, net, embeds, feats, cfg.ttt_steps,
      teacher_forcing.entry_segments(cfg.row_segments(batch)))
  tl_BxTxVd = batch["final_BxTxE"].astype(jnp.float32) @ consts["head_ExVd"]
  next_BxT = teacher_forcing.next_token_mask(batch["loss_mask_BxT"])
  if support_only:
    logp_BxTxVd = jax.nn.log_softmax(tl_BxTxVd, axis=-1)
    next_BxT = next_BxT & jnp.take(consts["vocab"].t2d_V, batch["argmax_BxT"])
  else:
    logp_BxTxVd = tl_BxTxVd - batch["lse_BxT"][..., None]
  logq = jax.nn.log_softmax(logits_SxBxTxVd, axis=-1)
  mask_SxBxT = valid_SxT[:, None, :] & next_BxT[None]
  logp = jnp.broadcast_to(logp_BxTxVd, logq.shape)
  token_loss = divergences.eagle3_ttt_loss(logp, logq, mask_SxBxT, cfg.divergence,
                                           cfg.step_decay)
  hit_BxT = jnp.argmax(logq[0], -1) == jnp.argmax(logp_BxTxVd, -1)
  acc0 = divergences.masked_mean(hit_BxT.astype(jnp.float32), mask_SxBxT[0])
  metrics = {"token_loss": token_loss, "top1_step0": acc0}
  loss = token_loss
  if cfg.feature_regression > 0:
    normed_SxBxTxE = drafter.model.apply({"params": net}, out_SxBxTxE,
                                         method=eagle3.Eagle3Drafter.head_input)
    reg = feature_regression_loss(normed_SxBxTxE, batch["final_BxTxE"].astype(jnp.float32),
                                  mask_SxBxT, cfg.step_decay)
    metrics["regression_loss"] = reg
    loss = loss + cfg.feature_regression * reg
  return loss, metrics


def feature_regression_loss(pred_SxBxTxE: Array, final_BxTxE: Array, mask_SxBxT: Array,
                            decay: float) -> Array:
  """EAGLE-1's feature loss: Σ_i decay**i · masked mean over positions of the smooth-L1
  distance (mean over channels) between the drafter's normed output at step i and the
  target's final-normed hidden state of the same position (index t: what predicts x_{t+1})."""
  err_SxBxT = jnp.mean(optax.huber_loss(pred_SxBxTxE, final_BxTxE[None]), axis=-1)
  return divergences.decayed_sum(jax.vmap(divergences.masked_mean)(err_SxBxT, mask_SxBxT), decay)


def make_step(drafter: Eagle3FeatureDrafter, cfg: train_step.BaselineConfig,
              optimizer: optax.GradientTransformation, support_only: bool) -> Callable:
  """(state, target_params, constants, batch of cached features) -> (state, metrics)."""
  return train_step.ttt_schedule(cfg, lambda cfg: _step(drafter, cfg, optimizer, support_only))


def _step(drafter: Eagle3FeatureDrafter, cfg: train_step.BaselineConfig,
          optimizer: optax.GradientTransformation, support_only: bool) -> Callable:

  def step(state: train_step.TrainState, target_params, consts, batch):
    rng, noise_key = jax.random.split(state.rng)
    (loss, metrics), grads = jax.value_and_grad(feature_loss, argnums=2, has_aux=True)(
        drafter, cfg, state.params, consts, target_params, batch, support_only, noise_key)
    state, gnorm = train_step._apply_update(optimizer, state, grads)
    metrics = dict(metrics, loss=loss, grad_norm=gnorm, updates=jnp.float32(1.0),
                   windows=jnp.asarray(batch["tokens_BxT"].size, jnp.float32))
    return state.replace(step=state.step + 1, rng=rng), metrics

  return step


def make_live_step(target_cfg: llama.ModelConfig, drafter: Eagle3FeatureDrafter,
                   cfg: train_step.BaselineConfig, optimizer: optax.GradientTransformation,
                   support_only: bool) -> Callable:
  """The same step with the features computed by the target on the fly (token batches)."""
  inner = make_step(drafter, cfg, optimizer, support_only)

  def step(state, target_params, consts, batch):
    feats = feature_cache.target_features(target_cfg, jax.lax.stop_gradient(target_params),
                                          batch["tokens_BxT"], drafter.target_hidden_layers)
    full = {feature_cache.BATCH_KEYS[k]: v for k, v in feats.items()}
    return inner(state, target_params, consts, dict(batch, **full))

  return step
