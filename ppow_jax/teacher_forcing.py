"""Teacher-forced passes over training sequences, shared by the baseline and PPOW steps.

Alignment: ``pred_t`` denotes a distribution *for token x_t* (t >= 1). The target's logits at
position t-1 are ``p`` for x_t. The independent drafter's logits at position t-1 are ``q`` for
x_t. The EAGLE-3 drafter's entry j pairs the target feature of position j with token j+1 and
predicts x_{j+2}, so its ``q`` for x_t comes from entry t-2 (it lags one token behind).

EAGLE-3's training-time test (TTT) unrolls S steps: step i, entry j continues the chain that
left the ground-truth prefix at entry j-i, taking the previous step's output hidden state at
entry j-1 as its feature. It attends to the chain's teacher-forced prefix (step-0 entries
<= j-i) and to its own entries of steps 1..i — exactly what the drafter sees when it drafts
i tokens past position j-i, so training matches test time.
"""

from __future__ import annotations

from typing import Optional

import flax
import jax
import jax.numpy as jnp

from ppow_jax.drafters import DraftState, Drafter, Eagle3FeatureDrafter, LMDrafter
from ppow_jax.models import eagle3, kv_cache, llama

Array = jax.Array


def next_token_mask(loss_mask_BxT: Array) -> Array:
  """Index t predicts x_{t+1}: it counts when x_{t+1} is a training token."""
  return jnp.pad(loss_mask_BxT[:, 1:].astype(bool), ((0, 0), (0, 1)))


@flax.struct.dataclass
class TargetPass:
  logp_BxTxV: Array  # log p for token t+1 at index t (the target's shifted prediction)
  hidden: tuple  # EAGLE-3 feature layers, each [B, T, Et]
  cache: kv_cache.KVCache  # prefix cache, T valid entries per row, room for rollout blocks


def target_pass(target_cfg: llama.ModelConfig, target_params, tokens_BxT: Array,
                hidden_layers: tuple, extra_slots: int) -> TargetPass:
  """One frozen target pass (no gradient): distributions, EAGLE-3 features and a KV cache."""
  b, t = tokens_BxT.shape
  target_params = jax.lax.stop_gradient(target_params)
  cache = llama.init_cache(target_cfg, b, t + extra_slots)
  out = llama.Decoder(target_cfg).apply({"params": target_params}, tokens_BxT, cache=cache,
                                        hidden_layers=hidden_layers,
                                        method=llama.Decoder.forward)
  logp = jax.nn.log_softmax(out.logits_BxTxV, axis=-1)
  return jax.lax.stop_gradient(TargetPass(logp, out.hidden_states, out.cache))


@flax.struct.dataclass
class DrafterPass:
  """Step-0 teacher-forced drafter outputs, aligned like the target (index t -> x_{t+1})."""
  logits_BxTxV: Array  # target-vocab draft logits; rows with no prediction are junk
  valid_T: Array  # bool: index t has a drafter prediction for x_{t+1}
  cache: kv_cache.KVCache
  hidden_BxTxE: Optional[Array]  # EAGLE-3: output hidden at entry t-1 (feeds drafting)


def _shift_right(x_BxTx: Array) -> Array:
  """One zero entry in front along the time axis (the last entry is kept): EAGLE-3's entry j
  predicts x_{j+2}, so it moves to index j+1, where the target's prediction of that token is."""
  return jnp.concatenate([jnp.zeros_like(x_BxTx[:, :1]), x_BxTx], axis=1)


def _eagle_inputs(drafter: Eagle3FeatureDrafter, target_params, tokens_BxT, hidden):
  net_embed = drafter._embed(target_params, tokens_BxT[:, 1:])
  feats = tuple(h[:, :-1] for h in hidden)
  return net_embed, feats


def drafter_pass(drafter: Drafter, draft_params, target_params, tokens_BxT: Array,
                 tpass: TargetPass, extra_slots: int) -> DrafterPass:
  """Teacher-forced drafter over the whole sequence (differentiable in draft_params)."""
  b, t = tokens_BxT.shape
  if isinstance(drafter, LMDrafter):
    cache = llama.init_cache(drafter.cfg, b, t + extra_slots)
    out = drafter.model.apply({"params": draft_params}, tokens_BxT, cache=cache,
                              method=llama.Decoder.forward)
    return DrafterPass(out.logits_BxTxV, jnp.ones((t,), bool), out.cache, None)
  model, net = drafter.model, draft_params["net"]
  embeds, feats = _eagle_inputs(drafter, target_params, tokens_BxT, tpass.hidden)
  fused = model.apply({"params": net}, feats, method=eagle3.Eagle3Drafter.fuse)
  cache = llama.init_cache(drafter.cfg.layer_config(), b, t + extra_slots)
  h_BxT1xE, logits_BxT1xVd, cache = model.apply(
      {"params": net}, embeds, fused, cache=cache, method=eagle3.Eagle3Drafter.step)
  logits = draft_params["vocab"].target_logits(logits_BxT1xVd, drafter.cfg.vocab_size)
  # entry j predicts x_{j+2}: shift right by one so index t predicts x_{t+1}
  logits_BxTxV, hidden_BxTxE = _shift_right(logits), _shift_right(h_BxT1xE)
  valid_T = (jnp.arange(t) >= 1) & (jnp.arange(t) <= t - 2)
  return DrafterPass(logits_BxTxV, valid_T, cache, hidden_BxTxE)


def chain_states(drafter: Drafter, dpass: DrafterPass, tokens_BxT: Array, seq_N: Array,
                 start_N: Array, extra_slots: int):
  """Drafter states for N chains, chain n drafting right after position ``start_N[n]``.

  Each chain gets its own copy of its sequence's drafter cache, cut to the prefix by the
  cache lengths, so the engine's ``draft`` runs on it unchanged. Returns
  ``(state, buffer_NxT, n_N)`` with ``n = start + 1`` committed tokens.
  """
  take = lambda x: jnp.take(x, seq_N, axis=0)
  cache = dpass.cache.take_rows(seq_N, start_N)
  buffer_NxT = jnp.pad(take(tokens_BxT), ((0, 0), (0, extra_slots)))
  n_N = start_N + 1
  if isinstance(drafter, LMDrafter):
    return DraftState(cache), buffer_NxT, n_N
  at = lambda x: jnp.take_along_axis(take(x), start_N[:, None, None], axis=1)[:, 0]
  return DraftState(cache, at(dpass.hidden_BxTxE).astype(jnp.float32),
                    at(dpass.logits_BxTxV)), buffer_NxT, n_N


def _ttt_mask(t1: int, steps: int, step: int) -> Array:
  """[T1, steps*T1]: step ``step`` entry j sees step-0 entries <= j-step and its chain."""
  j = jnp.arange(t1)[:, None]
  k = jnp.arange(steps)[None, :, None]
  m = jnp.arange(t1)[None, None, :]
  prefix = (k == 0) & (m <= j[:, :, None] - step)
  chain = (k >= 1) & (k <= step) & (m == j[:, :, None] - step + k)
  return (prefix | chain).reshape(t1, steps * t1)


def document_mask(segments_BxT1: Array, steps: int, step: int) -> Array:
  """[B, T1, steps*T1]: entry j of step ``step`` may see a step-0 entry m only when m is in
  the document of the entry its chain left from (j - step); its own chain entries always.

  In a packed row this keeps the drafter's attention inside one conversation, as it is when
  the drafter decodes (its context is the one conversation). Entries j < step have no
  prefix (``_ttt_mask``), so what this says about them does not matter.
  """
  t1 = segments_BxT1.shape[1]
  anchor_BxT1 = jnp.take(segments_BxT1, jnp.maximum(jnp.arange(t1) - step, 0), axis=1)
  same_BxT1xT1 = anchor_BxT1[:, :, None] == segments_BxT1[:, None, :]
  later = jnp.ones(same_BxT1xT1.shape[:2] + ((steps - 1) * t1,), bool)
  return jnp.concatenate([same_BxT1xT1, later], axis=-1)


def entry_segments(segments_BxT: Optional[Array]) -> Optional[Array]:
  """The document of each TTT entry (entry j reads the feature of position j): the row's
  segment ids without the last position; None (attention across the row) stays None."""
  return None if segments_BxT is None else segments_BxT[:, :-1]


def eagle3_ttt_draft_unroll(drafter: Eagle3FeatureDrafter, net, embeds_BxT1xE: Array,
                            feats: tuple, steps: int, segments_BxT1: Optional[Array] = None):
  """Yields ``(logits_BxTxVd, valid_T, out_BxTxE)`` for each step of the TTT unroll, in the
  draft vocabulary (index t -> x_{t+1}; ``out`` the pre-norm output hidden that made the
  logits), from the embeddings of x_1.. and the target features of x_0.. (``[B, T-1, *]``
  each: live or from the feature cache).

  One step at a time, so a caller that reduces each step (ADAW's scores) never holds all
  ``S`` steps' logits at once. ``segments_BxT1`` (the document of each entry's feature
  position, as the input pipeline numbers them): attention stays within a document
  (``document_mask``); None: across the whole row.
  """
  b, t1 = embeds_BxT1xE.shape[:2]
  t = t1 + 1
  model = drafter.model
  hidden = model.apply({"params": net}, feats, method=eagle3.Eagle3Drafter.fuse)
  cache = llama.init_cache(drafter.cfg.layer_config(), b, steps * t1)
  positions = jnp.broadcast_to(jnp.arange(t1, dtype=jnp.int32), (b, t1))
  idx = jnp.arange(t)
  for i in range(steps):
    mask = jnp.broadcast_to(_ttt_mask(t1, steps, i), (b, t1, steps * t1))
    if segments_BxT1 is not None:
      mask = mask & document_mask(segments_BxT1, steps, i)
    cache = cache.replace(lengths_B=jnp.full((b,), i * t1, jnp.int32))
    h, logits, cache = model.apply({"params": net}, embeds_BxT1xE, hidden, positions,
                                   cache=cache, attn_mask_BxTxS=mask,
                                   method=eagle3.Eagle3Drafter.step)
    # entry j predicts x_{j+2} -> index j+1; entries j < i have no chain yet
    out_BxTxE = _shift_right(h)
    yield _shift_right(logits), (idx >= i + 1) & (idx <= t - 2), out_BxTxE
    hidden = out_BxTxE[:, :-1]  # entry j continues from entry j-1's output


def eagle3_ttt_draft_logits(drafter: Eagle3FeatureDrafter, net, embeds_BxT1xE: Array,
                            feats: tuple, steps: int, segments_BxT1: Optional[Array] = None
                            ) -> tuple[Array, Array, Array]:
  """Draft-vocabulary logits ``[S, B, T, Vd]``, validity ``[S, T]`` and the pre-norm output
  hidden states ``[S, B, T, E]`` of the TTT unroll."""
  logits, valid, out = zip(*eagle3_ttt_draft_unroll(drafter, net, embeds_BxT1xE, feats, steps,
                                                     segments_BxT1))
  return jnp.stack(logits), jnp.stack(valid), jnp.stack(out)


def eagle3_ttt_unroll(drafter: Eagle3FeatureDrafter, draft_params, target_params,
                      tokens_BxT: Array, tpass: TargetPass, steps: int,
                      segments_BxT: Optional[Array] = None):
  """Yields ``(logits_BxTxV, valid_T)`` of the TTT unroll in the target vocabulary
  (``segments_BxT``: attention within documents, as in ``eagle3_ttt_draft_unroll``)."""
  embeds, feats = _eagle_inputs(drafter, target_params, tokens_BxT, tpass.hidden)
  for logits, valid, _ in eagle3_ttt_draft_unroll(drafter, draft_params["net"], embeds, feats,
                                                  steps, entry_segments(segments_BxT)):
    yield draft_params["vocab"].target_logits(logits, drafter.cfg.vocab_size), valid


def eagle3_ttt_logits(drafter: Eagle3FeatureDrafter, draft_params, target_params,
                      tokens_BxT: Array, tpass: TargetPass, steps: int,
                      segments_BxT: Optional[Array] = None) -> tuple[Array, Array]:
  """Logits ``[S, B, T, V]`` (index t -> x_{t+1}) and validity ``[S, T]`` of the TTT unroll."""
  logits, valid = zip(*eagle3_ttt_unroll(drafter, draft_params, target_params, tokens_BxT,
                                         tpass, steps, segments_BxT))
  return jnp.stack(logits), jnp.stack(valid)
