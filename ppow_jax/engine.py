"""Speculative decoding as one compiled call: draft, verify, accept, commit; and the AR baseline.

Everything per round is array ops on the whole batch: rows accept different numbers of
tokens, and each row's committed length, target-cache length and drafter state move by their
own amounts without a host round-trip. A row stops at EOS or at ``max_new_tokens``; the loop
(``decode_loop``: ``lax.while_loop``s) ends when every row has stopped; finished rows leave
the batch as it shrinks by halves (``DecodeConfig.compact_rows``, down to
``compact_min_rows``).

Accounting (docs/protocol.md): a verification round commits ``a + 1`` tokens (fewer only when EOS
or the token budget cuts it). τ = Σ committed / Σ verification rounds. The prompt pass only
fills the cache (its last token stays pending), so every new token, the first included, comes
from a counted verification round.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import flax
import jax
import jax.numpy as jnp
import numpy as np

from ppow_jax import acceptance, decode_loop, sampling, sharding
from ppow_jax.drafters import Drafter
from ppow_jax.errors import UserError
from ppow_jax.models import decode_weights, kv_cache, llama

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
  window: int = 4  # K: tokens drafted per verification.
  temperature: float = 0.0  # 0: greedy; > 0: lossless rejection sampling.
  top_p: float = 1.0  # nucleus filtering applied to both p and q (1.0: off).
  max_new_tokens: int = 64  # new tokens per row.
  eos_ids: tuple = ()  # stop a row after any of these tokens (empty: never).
  prefill_chunk: int = 512  # prompt tokens per target call in the prompt pass (0: all at once).
  # gather the active rows into a half-size batch whenever at most half are active
  # (decode_loop.py): finished rows stop costing
  compact_rows: bool = True
  compact_min_rows: int = 4  # the smallest batch it shrinks to (each size compiles a loop)

  def __post_init__(self):
    if self.window < 1:
      raise UserError(f"decode window K must be >= 1, got {self.window}")
    if self.temperature < 0:
      raise UserError(f"temperature must be >= 0, got {self.temperature}")
    if not 0 < self.top_p <= 1:
      raise UserError(f"top_p must be in (0, 1], got {self.top_p}")
    if self.max_new_tokens < 1:
      raise UserError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
    if self.compact_min_rows < 1:
      raise UserError(f"compact_min_rows must be >= 1, got {self.compact_min_rows}")
    if self.prefill_chunk < 0:
      raise UserError(f"prefill_chunk must be >= 0, got {self.prefill_chunk}")


@flax.struct.dataclass
class Stats:
  verify_calls_B: Array  # target calls after the prompt pass (rounds, or AR steps)
  drafted_B: Array
  accepted_B: Array  # accepted draft tokens
  committed_B: Array  # tokens committed by rounds (bonus/correction included)
  accepted_at_K: Array  # over rows and rounds: position i accepted
  reached_at_K: Array  # over rows and rounds: position i was judged (prefix accepted)
  alpha_sum_K: Array  # Σ α_i = Σ_x min(p_i, q_i) over rows and rounds
  tau_analytic_sum: Array  # Σ over row-rounds of 1 + Σ_k Π_{i<=k} α_i
  row_slots: Array  # Σ over the loop's rounds of the rows it computed (active or not)

  @classmethod
  def zeros(cls, batch: int, window: int) -> "Stats":
    zi = lambda *s: jnp.zeros(s, jnp.int32)
    return cls(zi(batch), zi(batch), zi(batch), zi(batch), zi(window), zi(window),
               jnp.zeros((window,), jnp.float32), jnp.zeros((), jnp.float32), zi())

  def summary(self) -> dict:
    """Host-side metrics of docs/protocol.md: τ, analytic τ, α̂ by position, per-prompt τ."""
    s = sharding.to_host(self)  # whole on every process, wherever the rows were
    calls = int(s.verify_calls_B.sum())
    per_row = s.committed_B / np.maximum(s.verify_calls_B, 1)
    return {
        "verify_calls": calls,
        "committed": int(s.committed_B.sum()),
        "drafted": int(s.drafted_B.sum()),
        "accepted": int(s.accepted_B.sum()),
        "tau": float(s.committed_B.sum() / max(calls, 1)),
        "tau_per_prompt_mean": float(per_row[s.verify_calls_B > 0].mean())
                               if (s.verify_calls_B > 0).any() else 0.0,
        "tau_analytic": float(s.tau_analytic_sum / max(calls, 1)),
        # active row-rounds over computed row-rounds (finished rows still computed: < 1)
        "batch_utilization": float(calls / max(int(s.row_slots), 1)),
        # conditional acceptance of position i given positions < i were accepted
        "alpha": (s.accepted_at_K / np.maximum(s.reached_at_K, 1)).round(6).tolist(),
        # mean of Σ min(p, q) at position i (the analytic α)
        "alpha_expected": (s.alpha_sum_K / max(calls, 1)).round(6).tolist(),
    }


@flax.struct.dataclass
class GenerateOutput:
  tokens_BxN: Array  # prompt then new tokens; only [:length_B] of each row is meaningful
  prompt_len_B: Array
  length_B: Array
  stats: Stats

  def new_tokens(self) -> list[list[int]]:
    toks, p, n = sharding.to_host((self.tokens_BxN, self.prompt_len_B, self.length_B))
    return [toks[b, p[b]:n[b]].tolist() for b in range(toks.shape[0])]


def _write_rows(buffer_BxN: Array, new_BxC: Array, start_B: Array) -> Array:
  write = lambda row, new, i: jax.lax.dynamic_update_slice(row, new, (i,))
  return jax.vmap(write)(buffer_BxN, new_BxC.astype(buffer_BxN.dtype), start_B)


def _gather_rows(x_BxTx_: Array, idx_B: Array) -> Array:
  return jnp.take_along_axis(x_BxTx_, idx_B.reshape((-1, 1) + (1,) * (x_BxTx_.ndim - 2)),
                             axis=1)[:, 0]


def _keep_count(committed_BxC: Array, count_B: Array, n_B: Array, prompt_len_B: Array,
                cfg: DecodeConfig) -> tuple[Array, Array]:
  """How many of the committed tokens a row keeps, and whether the row is now finished."""
  c = committed_BxC.shape[1]
  idx_C = jnp.arange(c)
  remaining_B = cfg.max_new_tokens - (n_B - prompt_len_B)
  keep_B = jnp.minimum(count_B, remaining_B)
  hit_eos_B = jnp.zeros_like(keep_B, dtype=bool)
  if cfg.eos_ids:
    is_eos_BxC = jnp.isin(committed_BxC, jnp.asarray(cfg.eos_ids, jnp.int32)) & (
        idx_C[None] < keep_B[:, None])
    hit_eos_B = jnp.any(is_eos_BxC, axis=1)
    first_B = jnp.argmax(is_eos_BxC, axis=1)
    keep_B = jnp.where(hit_eos_B, first_B + 1, keep_B)
  done_B = hit_eos_B | (keep_B >= remaining_B)
  return keep_B, done_B


def _prefill(target: llama.Decoder, target_params, prompts_BxP: Array, prompt_len_B: Array,
             cache_len: int, hidden_layers: tuple, chunk: int):
  """Cache the prompts; the last prompt token stays pending, as in every later round.

  So the first verification covers [last prompt token, d_1..d_K], exactly like Hugging Face's
  assisted generation, and every new token comes from a counted target call. Long prompts
  go through in chunks of ``chunk`` tokens (a scan, then the remainder), so the attention
  scores of the prompt pass are ``[chunk, S]`` per head instead of ``[P, S]``.
  """
  b, p = prompts_BxP.shape
  cache = llama.init_cache(target.cfg, b, cache_len)

  def call(cache, tokens_BxC):
    out = target.apply({"params": target_params}, tokens_BxC, cache=cache,
                       hidden_layers=hidden_layers, return_logits=False,
                       method=llama.Decoder.forward)
    return out.cache, out.hidden_states

  chunk = chunk if 0 < chunk < p else p
  n_full = p // chunk
  hidden = []
  if n_full > 1:
    chunks_NxBxC = prompts_BxP[:, :n_full * chunk].reshape(b, n_full, chunk).swapaxes(0, 1)
    cache, hidden_N = jax.lax.scan(call, cache, chunks_NxBxC)
    hidden.append(tuple(x.swapaxes(0, 1).reshape(b, n_full * chunk, -1) for x in hidden_N))
  else:
    cache, h = call(cache, prompts_BxP[:, :chunk])
    hidden.append(h)
  if n_full * chunk < p:
    cache, h = call(cache, prompts_BxP[:, n_full * chunk:])
    hidden.append(h)
  hidden = tuple(jnp.concatenate(parts, axis=1) for parts in zip(*hidden))
  buffer_BxN = jnp.zeros((b, cache_len), jnp.int32).at[:, :p].set(prompts_BxP)
  return buffer_BxN, cache.replace(lengths_B=prompt_len_B - 1), hidden


def prompt_pass(target_cfg: llama.ModelConfig, drafter: Optional[Drafter], cfg: DecodeConfig,
                cache_len: int, target_params, draft_params, prompts_BxP: Array,
                prompt_len_B: Array):
  """The prompt pass of a generation: the target's caches (``_prefill``) and, with a drafter,
  its state after reading the prompts. Returns ``(buffer_BxN, target_cache, draft_state)``."""
  layers = drafter.target_hidden_layers if drafter is not None else ()
  buffer_BxN, tcache, hidden = _prefill(llama.Decoder(target_cfg), target_params, prompts_BxP,
                                        prompt_len_B, cache_len, layers, cfg.prefill_chunk)
  dstate = None
  if drafter is not None:
    dstate = drafter.init_state(prompts_BxP.shape[0], cache_len)
    dstate = drafter.prefill(draft_params, target_params, dstate, prompts_BxP, prompt_len_B,
                             hidden)
  return buffer_BxN, tcache, dstate


def run_loop(body, buffer_BxN: Array, prompt_len_B: Array, target_cache: kv_cache.KVCache,
             draft_state, rng: Array, stats: Stats, cfg: DecodeConfig) -> GenerateOutput:
  """Rounds of ``body`` from the prompt pass's state until every row is done
  (``decode_loop.run``, compacting the batch when ``cfg.compact_rows``)."""
  b = prompt_len_B.shape[0]
  init = decode_loop.LoopState(buffer_BxN, prompt_len_B, jnp.zeros((b,), bool), prompt_len_B,
                               target_cache, draft_state, rng, stats)
  buffer_BxN, n_B, stats = decode_loop.run(body, init, cfg.compact_rows,
                                           cfg.compact_min_rows)
  return GenerateOutput(buffer_BxN, prompt_len_B, n_B, stats)


def verify(target: llama.Decoder, target_params, cache: kv_cache.KVCache, pending_B: Array,
           draft_BxK: Array, hidden_layers: tuple = ()) -> llama.DecoderOutput:
  """One target pass over [pending, d_1..d_K]; logits[:, i] is p for the token after input i.

  The cache must hold every committed token but the pending one; the returned cache holds
  K+1 more per row, and the caller lowers ``lengths_B`` to keep only the accepted ones.
  """
  tokens_BxK1 = jnp.concatenate([pending_B[:, None], draft_BxK], axis=1)
  return target.apply({"params": target_params}, tokens_BxK1, cache=cache,
                      hidden_layers=hidden_layers, method=llama.Decoder.forward)


def accept(rng: Array, draft_BxK: Array, draft_logits_BxKxV: Array, target_logits_BxK1xV: Array,
           cfg: DecodeConfig) -> acceptance.AcceptResult:
  """Greedy prefix match at T=0, lossless rejection sampling otherwise.

  At T=0 the drafts are the drafter's argmax tokens, so α_i = q_i(argmax p_i) is the match
  indicator itself: no distribution over the vocabulary is built.
  """
  if cfg.temperature == 0:
    return acceptance.greedy_accept(draft_BxK, target_logits_BxK1xV)
  q_BxKxV = sampling.probs_from_logits(draft_logits_BxKxV, cfg.temperature, cfg.top_p)
  p_BxK1xV = sampling.probs_from_logits(target_logits_BxK1xV, cfg.temperature, cfg.top_p)
  return acceptance.rejection_accept(rng, draft_BxK, q_BxKxV, p_BxK1xV)


def _speculative(target_cfg: llama.ModelConfig, drafter: Drafter, cfg: DecodeConfig,
                 cache_len: int, target_params, draft_params, prompts_BxP: Array,
                 prompt_len_B: Array, rng: Array) -> GenerateOutput:
  target = llama.Decoder(target_cfg)
  k = cfg.window
  b = prompts_BxP.shape[0]
  buffer_BxN, tcache, dstate = prompt_pass(target_cfg, drafter, cfg, cache_len, target_params,
                                           draft_params, prompts_BxP, prompt_len_B)

  def body(s: decode_loop.LoopState) -> decode_loop.LoopState:
    # greedy decoding draws nothing: no key splitting in the loop
    rng, k_draft, k_acc = (s.rng,) * 3 if cfg.temperature == 0 else jax.random.split(s.rng, 3)
    active_B = ~s.done_B
    draft_BxK, dlogits_BxKxV, dstate = drafter.draft(
        draft_params, target_params, s.draft_state, s.buffer_BxN, s.n_B, k_draft, k,
        cfg.temperature, cfg.top_p)
    pending_B = _gather_rows(s.buffer_BxN[:, :, None], s.n_B - 1)[:, 0]
    tcache = s.target_cache.replace(lengths_B=s.n_B - 1)
    vout = verify(target, target_params, tcache, pending_B, draft_BxK,
                  drafter.target_hidden_layers)
    res = accept(k_acc, draft_BxK, dlogits_BxKxV, vout.logits_BxTxV, cfg)
    committed_BxK1 = jnp.maximum(res.committed_BxK1, 0)
    a_B = res.num_accepted_B
    keep_B, finished_B = _keep_count(committed_BxK1, a_B + 1, s.n_B, s.prompt_len_B, cfg)
    keep_B = jnp.where(active_B, keep_B, 0)
    buffer_BxN = _write_rows(s.buffer_BxN, committed_BxK1, s.n_B)
    n_B = s.n_B + keep_B
    tcache = vout.cache.replace(lengths_B=n_B - 1)
    dstate = drafter.sync(draft_params, target_params, dstate, committed_BxK1, s.n_B - 1,
                          keep_B, vout.hidden_states)
    act = active_B.astype(jnp.int32)
    pos_K = jnp.arange(k)
    st = s.stats
    alpha_BxK = res.alpha_BxK * active_B[:, None]
    stats = st.replace(
        verify_calls_B=st.verify_calls_B + act,
        drafted_B=st.drafted_B + act * k,
        accepted_B=st.accepted_B + act * a_B,
        committed_B=st.committed_B + keep_B,
        accepted_at_K=st.accepted_at_K + jnp.sum(
            active_B[:, None] & (pos_K[None] < a_B[:, None]), axis=0),
        reached_at_K=st.reached_at_K + jnp.sum(
            active_B[:, None] & (pos_K[None] <= a_B[:, None]), axis=0),
        alpha_sum_K=st.alpha_sum_K + jnp.sum(alpha_BxK, axis=0),
        tau_analytic_sum=st.tau_analytic_sum + jnp.sum(
            jnp.where(active_B, acceptance.analytic_tau(res.alpha_BxK), 0.0)))
    return s.replace(buffer_BxN=buffer_BxN, n_B=n_B, done_B=s.done_B | finished_B,
                     target_cache=tcache, draft_state=dstate, rng=rng, stats=stats)

  return run_loop(body, buffer_BxN, prompt_len_B, tcache, dstate, rng, Stats.zeros(b, k), cfg)


def _autoregressive(target_cfg: llama.ModelConfig, cfg: DecodeConfig, cache_len: int,
                    target_params, prompts_BxP: Array, prompt_len_B: Array,
                    rng: Array) -> GenerateOutput:
  target = llama.Decoder(target_cfg)
  b = prompts_BxP.shape[0]
  buffer_BxN, tcache, _ = prompt_pass(target_cfg, None, cfg, cache_len, target_params, None,
                                      prompts_BxP, prompt_len_B)

  def body(s: decode_loop.LoopState) -> decode_loop.LoopState:
    rng, key = (s.rng,) * 2 if cfg.temperature == 0 else jax.random.split(s.rng)
    active_B = ~s.done_B
    pending_B = _gather_rows(s.buffer_BxN[:, :, None], s.n_B - 1)[:, 0]
    out = target.apply({"params": target_params}, pending_B[:, None],
                       cache=s.target_cache.replace(lengths_B=s.n_B - 1),
                       method=llama.Decoder.forward)
    if cfg.temperature == 0:
      tok_B = sampling.greedy(out.logits_BxTxV[:, 0])
    else:
      probs_BxV = sampling.probs_from_logits(out.logits_BxTxV[:, 0], cfg.temperature,
                                             cfg.top_p)
      tok_B = sampling.sample(key, probs_BxV).astype(jnp.int32)
    keep_B, finished_B = _keep_count(tok_B[:, None], jnp.ones_like(s.n_B), s.n_B,
                                     s.prompt_len_B, cfg)
    keep_B = jnp.where(active_B, keep_B, 0)
    buffer_BxN = _write_rows(s.buffer_BxN, tok_B[:, None], s.n_B)
    n_B = s.n_B + keep_B
    act = active_B.astype(jnp.int32)
    stats = s.stats.replace(verify_calls_B=s.stats.verify_calls_B + act,
                            committed_B=s.stats.committed_B + keep_B)
    return s.replace(buffer_BxN=buffer_BxN, n_B=n_B, done_B=s.done_B | finished_B,
                     target_cache=out.cache.replace(lengths_B=n_B - 1), rng=rng, stats=stats)

  return run_loop(body, buffer_BxN, prompt_len_B, tcache, None, rng, Stats.zeros(b, 1), cfg)


class Engine:
  """Compiles generation once per (batch, prompt length) and reuses it.

  ``drafter=None`` gives autoregressive decoding with the same target code path.
  """

  def __init__(self, target_cfg: llama.ModelConfig, drafter: Optional[Drafter],
               cfg: DecodeConfig):
    if drafter is not None:
      draft_vocab = getattr(drafter.cfg, "vocab_size")
      if draft_vocab != target_cfg.vocab_size:
        raise UserError(f"drafter vocab_size {draft_vocab} != target vocab_size "
                        f"{target_cfg.vocab_size}: the drafter must share the target's tokenizer")
    self.target_cfg, self.drafter, self.cfg = target_cfg, drafter, cfg
    self._compiled: dict = {}
    self._prompt_passes: dict = {}

  def cache_length(self, prompt_len: int) -> int:
    """Cache slots for a prompt of ``prompt_len``: it, the new tokens and a round's drafts."""
    return prompt_len + self.cfg.max_new_tokens + self.cfg.window + 2

  def _compile(self, cache_len: int):
    """The jitted generation for caches of ``cache_len`` slots (a subclass drafts otherwise)."""
    if self.drafter is None:
      fn = functools.partial(_autoregressive, self.target_cfg, self.cfg, cache_len)
      return jax.jit(lambda tp, dp, prompts, lens, rng: fn(tp, prompts, lens, rng))
    return jax.jit(functools.partial(_speculative, self.target_cfg, self.drafter, self.cfg,
                                     cache_len))

  def _fn(self, prompt_len: int):
    cache_len = self.cache_length(prompt_len)
    if cache_len > self.target_cfg.max_position_embeddings:
      room = cache_len - prompt_len - self.cfg.max_new_tokens
      raise UserError(
          f"prompt length {prompt_len} + max_new_tokens {self.cfg.max_new_tokens} + drafting "
          f"room {room} exceeds the target's max_position_embeddings "
          f"{self.target_cfg.max_position_embeddings}")
    if prompt_len not in self._compiled:
      self._compiled[prompt_len] = self._compile(cache_len)
    return self._compiled[prompt_len]

  def generate(self, target_params, draft_params, prompts_BxP, prompt_len_B,
               rng: Array) -> GenerateOutput:
    if not isinstance(prompt_len_B, jax.Array) or prompt_len_B.is_fully_addressable:
      lens = np.asarray(prompt_len_B)  # (a multi-host global array is checked by its host)
      if lens.min() < 1 or lens.max() > np.shape(prompts_BxP)[1]:
        raise UserError(f"prompt lengths must be in [1, {np.shape(prompts_BxP)[1]}], got {lens}")
    prompts_BxP = jnp.asarray(prompts_BxP, jnp.int32)
    prompt_len_B = jnp.asarray(prompt_len_B, jnp.int32)
    return self._fn(prompts_BxP.shape[1])(target_params, draft_params, prompts_BxP,
                                          prompt_len_B, rng)

  def prompt_pass(self, target_params, draft_params, prompts_BxP, prompt_len_B):
    """The prompt pass alone, as ``generate`` runs it (the same caches): the time that a
    decode-only rate leaves out. Returns ``prompt_pass``'s caches."""
    prompts_BxP = jnp.asarray(prompts_BxP, jnp.int32)
    cache_len = self.cache_length(prompts_BxP.shape[1])
    if cache_len not in self._prompt_passes:
      self._prompt_passes[cache_len] = jax.jit(functools.partial(
          prompt_pass, self.target_cfg, self.drafter, self.cfg, cache_len))
    return self._prompt_passes[cache_len](target_params, draft_params, prompts_BxP,
                                          jnp.asarray(prompt_len_B, jnp.int32))


def decoding_params(params, share_with=None):
  """``params`` with fused projections (``decode_weights.fuse_projections``) when every array is
  a host array or lives on one device: about 3–4% more batch-1 tokens/s for SmolLM2-135M on a
  2-core CPU (BENCHMARKS.md), placed on the device (host arrays would be copied in at every
  call). ``share_with``: the target's decoding params, when ``params`` are a drafter's; the
  drafter's arrays equal to the target's become the target's
  (``decode_weights.share_equal_arrays``).
  Sharded params come back as they are, their sharding rules naming the separate
  projections."""
  leaves = jax.tree_util.tree_leaves(params)
  local = lambda x: isinstance(x, np.ndarray) or (isinstance(x, jax.Array)
                                                  and len(x.sharding.device_set) == 1)
  if params is None or not all(local(x) for x in leaves):
    return params
  out = jax.device_put(decode_weights.fuse_projections(params))
  return decode_weights.share_equal_arrays(share_with, out)


def decoding_pair(target_params, draft_params) -> tuple:
  """``(target, drafter)`` params as decoding reads them: ``decoding_params`` of each, the
  drafter sharing the target's equal arrays (``draft_params`` may be None: AR alone)."""
  target_params = decoding_params(target_params)
  return target_params, decoding_params(draft_params, share_with=target_params)


def pad_prompts(prompts: list[list[int]], pad_id: int = 0, multiple: int = 16,
                min_length: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Right-pad token lists to one length (rounded up to ``multiple`` to limit recompiles)."""
  if not prompts or any(len(p) == 0 for p in prompts):
    raise UserError("every prompt needs at least one token")
  p = max(max(len(x) for x in prompts), min_length)
  p = -(-p // multiple) * multiple
  out = np.full((len(prompts), p), pad_id, np.int32)
  for i, x in enumerate(prompts):
    out[i, :len(x)] = x
  return out, np.array([len(x) for x in prompts], np.int32)
