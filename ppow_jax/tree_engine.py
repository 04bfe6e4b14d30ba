"""Tree speculative decoding: draft an EAGLE-2 tree, verify it in one target call, commit a path.

Per round and row: the drafter grows a tree (``ppow_jax/tree.py``) below the pending token,
attending along each node's own path; the target scores all N + 1 nodes in one call with a
tree attention mask over its cache and explicit position ids (the pending token's position
plus the node's depth); acceptance picks one root path; the path's cache entries are moved
next to the committed context (compaction), and everything else written this round is
dropped by lowering the cache lengths. Accounting is the chain engine's (``engine.Stats``):
a round commits ``a + 1`` tokens, position statistics are by depth, and the analytic fields
(α, analytic τ), which are defined for chains, stay 0.

Cache layout during a round (n = committed tokens of the row, token n-1 pending):

* target: slots ``< n-1`` committed; node i written at slot ``n-1+i`` (root = pending);
* LM drafter: slots ``< n`` committed (a block of the last ``depth + 2`` tokens is re-fed
  each round, which also overwrites last round's tree entries); frontier slot f at ``n+f``;
* EAGLE-3 drafter: entries ``< n-1`` committed (see ``drafters.py``); frontier slot f at
  ``n-1+f``; ``sync`` after verification feeds the accepted path's target features.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from ppow_jax import decode_loop, engine, sampling, tree
from ppow_jax.drafters import Drafter, Eagle3FeatureDrafter, LMDrafter
from ppow_jax.engine import DecodeConfig, GenerateOutput, Stats
from ppow_jax.errors import UserError
from ppow_jax.models import eagle3, kv_cache, llama

Array = jax.Array


def tree_attention_mask(anc_BxTxF: Array, base_B: Array, num_slots: int) -> Array:
  """[B, T, S]: query t sees the committed slots ``< base`` and tree slot ``base + f`` iff
  ``anc[t, f]`` (f is t itself or one of its ancestors)."""
  f = anc_BxTxF.shape[2]
  b, t = anc_BxTxF.shape[:2]
  s_S = jnp.arange(num_slots, dtype=jnp.int32)
  rel_BxS = s_S[None, :] - base_B[:, None]
  in_tree_BxS = (rel_BxS >= 0) & (rel_BxS < f)
  idx_BxTxS = jnp.broadcast_to(jnp.clip(rel_BxS, 0, f - 1)[:, None, :], (b, t, num_slots))
  tree_BxTxS = jnp.take_along_axis(anc_BxTxF, idx_BxTxS, axis=2) & in_tree_BxS[:, None, :]
  return (s_S[None, None, :] < base_B[:, None, None]) | tree_BxTxS


def verify_tree(target: llama.Decoder, target_params, cache: kv_cache.KVCache, t: tree.Tree,
                n_B: Array, hidden_layers: tuple = ()) -> llama.DecoderOutput:
  """One target pass over all N + 1 nodes; logits[:, i] is p for the token after node i.

  The cache must hold the n - 1 committed tokens before the pending root.
  """
  base_B = n_B - 1
  positions_BxN1 = base_B[:, None] + t.depth_BxN1
  mask = tree_attention_mask(t.mask_BxN1xN1, base_B, cache.max_length)
  return target.apply({"params": target_params}, t.tokens_BxN1, positions_BxN1,
                      cache=cache.replace(lengths_B=base_B), hidden_layers=hidden_layers,
                      attn_mask_BxTxS=mask, method=llama.Decoder.forward)


def commit_path(cache: kv_cache.KVCache, path_BxD: Array, num_B: Array,
                base_B: Array) -> kv_cache.KVCache:
  """Move the entries of the first ``num`` path nodes (slots ``base + node``) to
  ``base + 1 + i``, right after the root; lengths are left to the caller."""
  b, d = path_BxD.shape
  s = cache.max_length
  kv = cache.k_BKxSxD[0].shape[0] // b
  src_BxD = base_B[:, None] + path_BxD
  dst_BxD = jnp.where(jnp.arange(d)[None] < num_B[:, None],
                      base_B[:, None] + 1 + jnp.arange(d)[None], s)  # s: dropped
  src_BKxD, dst_BKxD = (jnp.repeat(x, kv, axis=0) for x in (src_BxD, dst_BxD))
  rows_BKx1 = jnp.arange(b * kv)[:, None]
  move = lambda x: x.at[rows_BKx1, dst_BKxD].set(x[rows_BKx1, src_BKxD], mode="drop")
  return cache.replace(k_BKxSxD=tuple(map(move, cache.k_BKxSxD)),
                       v_BKxSxD=tuple(map(move, cache.v_BKxSxD)))


def draft_tree_lm(drafter: LMDrafter, params, state, buffer_BxN: Array, n_B: Array,
                  shape: tree.TreeShape):
  """Grow a tree with an independent LM drafter (its cache must hold slots < n - depth - 2)."""
  model = drafter.model
  w = shape.depth + 2
  start_B = jnp.maximum(n_B - w, 0)
  block_BxW = jnp.take_along_axis(buffer_BxN, start_B[:, None] + jnp.arange(w)[None], axis=1)
  out = model.apply({"params": params}, block_BxW, cache=state.cache.replace(lengths_B=start_B),
                    method=llama.Decoder.forward)
  root_logits_BxV = engine._gather_rows(out.logits_BxTxV, n_B - 1 - start_B)
  root_B = engine._gather_rows(buffer_BxN[:, :, None], n_B - 1)[:, 0]
  k = shape.top_k

  def step_fn(cache, tokens_BxK, parent_BxK, step, fed_BxKxF):
    del parent_BxK
    mask = tree_attention_mask(fed_BxKxF, n_B, cache.max_length)
    positions_BxK = jnp.broadcast_to((n_B - 1 + step)[:, None], tokens_BxK.shape)
    o = model.apply({"params": params}, tokens_BxK, positions_BxK,
                    cache=cache.replace(lengths_B=n_B + (step - 1) * k), attn_mask_BxTxS=mask,
                    method=llama.Decoder.forward)
    return o.cache, o.logits_BxTxV

  t, cache = tree.grow(root_B, root_logits_BxV, step_fn, out.cache, shape)
  return t, state.replace(cache=cache.replace(lengths_B=n_B))


def draft_tree_eagle3(drafter: Eagle3FeatureDrafter, params, target_params, state,
                      buffer_BxN: Array, n_B: Array, shape: tree.TreeShape):
  """Grow a tree with EAGLE-3: each node is fed with its parent's drafter hidden state."""
  model, net = drafter.model, params["net"]
  base_B = n_B - 1
  k = shape.top_k

  def step_fn(carry, tokens_BxK, parent_BxK, step, fed_BxKxF):
    cache, prev_h_BxMxE = carry
    h_par_BxKxE = jnp.take_along_axis(prev_h_BxMxE, parent_BxK[:, :, None], axis=1)
    embeds_BxKxE = drafter._embed(target_params, tokens_BxK)
    mask = tree_attention_mask(fed_BxKxF, base_B, cache.max_length)
    positions_BxK = jnp.broadcast_to((n_B - 2 + step)[:, None], tokens_BxK.shape)
    h_BxKxE, logits_BxKxVd, cache = model.apply(
        {"params": net}, embeds_BxKxE, h_par_BxKxE.astype(embeds_BxKxE.dtype), positions_BxK,
        cache=cache.replace(lengths_B=base_B + (step - 1) * k), attn_mask_BxTxS=mask,
        method=eagle3.Eagle3Drafter.step)
    return (cache, h_BxKxE.astype(jnp.float32)), drafter._target_logits(params, logits_BxKxVd)

  root_B = engine._gather_rows(buffer_BxN[:, :, None], n_B - 1)[:, 0]
  t, (cache, _) = tree.grow(root_B, state.logits_BxV, step_fn,
                            (state.cache, state.hidden_BxE[:, None]), shape)
  # the tree entries are provisional: sync overwrites them with the accepted path's features
  return t, state.replace(cache=cache.replace(lengths_B=base_B))


def _tree_speculative(target_cfg: llama.ModelConfig, drafter: Drafter, cfg: DecodeConfig,
                      shape: tree.TreeShape, cache_len: int, target_params, draft_params,
                      prompts_BxP: Array, prompt_len_B: Array, rng: Array) -> GenerateOutput:
  target = llama.Decoder(target_cfg)
  b = prompts_BxP.shape[0]
  d = shape.depth
  layers = drafter.target_hidden_layers
  buffer_BxN, tcache, dstate = engine.prompt_pass(target_cfg, drafter, cfg, cache_len,
                                                  target_params, draft_params, prompts_BxP,
                                                  prompt_len_B)

  def body(s: decode_loop.LoopState) -> decode_loop.LoopState:
    rng, k_acc = jax.random.split(s.rng)
    active_B = ~s.done_B
    if isinstance(drafter, LMDrafter):
      t, dstate = draft_tree_lm(drafter, draft_params, s.draft_state, s.buffer_BxN, s.n_B, shape)
    else:
      t, dstate = draft_tree_eagle3(drafter, draft_params, target_params, s.draft_state,
                                    s.buffer_BxN, s.n_B, shape)
    vout = verify_tree(target, target_params, s.target_cache, t, s.n_B, layers)
    if cfg.temperature == 0:
      res = tree.greedy_accept(t, vout.logits_BxTxV, d)
    else:
      p_BxN1xV = sampling.probs_from_logits(vout.logits_BxTxV, cfg.temperature, cfg.top_p)
      res = tree.rejection_accept(k_acc, t, p_BxN1xV, d)
    committed_BxD1 = jnp.maximum(res.committed_BxD1, 0)
    a_B = res.num_accepted_B
    keep_B, finished_B = engine._keep_count(committed_BxD1, a_B + 1, s.n_B, s.prompt_len_B,
                                            cfg)
    keep_B = jnp.where(active_B, keep_B, 0)
    buffer_BxN = engine._write_rows(s.buffer_BxN, committed_BxD1, s.n_B)
    n_B = s.n_B + keep_B
    tcache = commit_path(vout.cache, res.path_BxD, a_B, s.n_B - 1)
    tcache = tcache.replace(lengths_B=n_B - 1)
    if layers:  # the target features along [root, path] feed the EAGLE-3 drafter
      nodes_BxD1 = jnp.concatenate([jnp.zeros_like(res.path_BxD[:, :1]), res.path_BxD], 1)
      path_hidden = tuple(jnp.take_along_axis(h, nodes_BxD1[:, :, None], axis=1)
                          for h in vout.hidden_states)
      dstate = drafter.sync(draft_params, target_params, dstate, committed_BxD1, s.n_B - 1,
                            keep_B, path_hidden)
    act = active_B.astype(jnp.int32)
    pos_D = jnp.arange(d)
    st = s.stats
    stats = st.replace(
        verify_calls_B=st.verify_calls_B + act,
        drafted_B=st.drafted_B + act * shape.total_tokens,
        accepted_B=st.accepted_B + act * a_B,
        committed_B=st.committed_B + keep_B,
        accepted_at_K=st.accepted_at_K + jnp.sum(
            active_B[:, None] & (pos_D[None] < a_B[:, None]), axis=0),
        reached_at_K=st.reached_at_K + jnp.sum(
            active_B[:, None] & (pos_D[None] <= a_B[:, None]), axis=0))
    return s.replace(buffer_BxN=buffer_BxN, n_B=n_B, done_B=s.done_B | finished_B,
                     target_cache=tcache, draft_state=dstate, rng=rng, stats=stats)

  return engine.run_loop(body, buffer_BxN, prompt_len_B, tcache, dstate, rng, Stats.zeros(b, d),
                         cfg)


class TreeEngine(engine.Engine):
  """The chain engine's interface (``generate``) with tree drafting; ``cfg.window`` is unused."""

  def __init__(self, target_cfg: llama.ModelConfig, drafter: Drafter, cfg: DecodeConfig,
               shape: tree.TreeShape):
    if drafter is None:
      raise UserError("tree drafting needs a drafter")
    for name, c in (("target", target_cfg), ("drafter", getattr(drafter, "cfg", None))):
      if getattr(c, "sliding_window", 0):
        raise UserError(f"tree drafting does not support a sliding-window {name} "
                        f"(sliding_window={c.sliding_window})")
    super().__init__(target_cfg, drafter, cfg)
    self.shape = shape

  def cache_length(self, prompt_len: int) -> int:
    sh = self.shape
    room = max(sh.total_tokens, (sh.depth - 1) * sh.top_k + 1, sh.depth + 2)
    return prompt_len + self.cfg.max_new_tokens + room + 2

  def _compile(self, cache_len: int):
    return jax.jit(functools.partial(_tree_speculative, self.target_cfg, self.drafter, self.cfg,
                                     self.shape, cache_len))
