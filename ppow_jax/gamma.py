r"""γ, measured: the drafter's cost per drafted token over the target's verification call.

γ enters the PPOW speed reward (``ppow.gamma = -1`` measures it on the hardware at hand) and
the ideal speedup τ / (1 + γK) of the decode benchmark (``ppow_jax/bench/decode.py``). The
drafter's window call and the target's verification call are each jitted on their own and run
inside one compiled loop on a prefilled cache of the engine's size (so, as inside the engine,
there is no host dispatch between calls). A call's cost is the loop's marginal time per call:
loops of ``calls`` and ``3·calls`` calls are timed side by side and their difference is divided
by ``2·calls``, so the fixed cost of starting a loop (dispatch, waking threads, refilling caches:
several calls' worth on a CPU) is not charged to the calls. The verification cost curve times
target calls on 1..K+1 new tokens the same way.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from ppow_jax import engine, sampling, timing
from ppow_jax.drafters import Drafter
from ppow_jax.errors import UserError
from ppow_jax.models import kv_cache, llama


class Looped:
  """``loop(calls)`` runs ``step(carry, *consts)`` ``calls`` times in one compiled loop (one
  compile for any count); the carry is donated and threaded through successive calls, so
  caches are updated in place as in the engine."""

  def __init__(self, step: Callable, carry: Any, consts: tuple):
    def loop(carry, calls, *consts):
      return jax.lax.fori_loop(0, calls, lambda i, c: step(c, *consts), carry)

    self._fn = jax.jit(loop, donate_argnums=0)
    self._carry = jax.tree_util.tree_map(jnp.array, carry)  # own copies: they get donated
    self._consts = consts

  def __call__(self, calls: int):
    self._carry = self._fn(self._carry, jnp.int32(calls), *self._consts)
    return self._carry


def marginal_fns(loops: dict[str, Looped], calls: int) -> dict[str, Callable[[], Any]]:
  """The two timed runs of each loop: ``NAME/x1`` (``calls`` calls) and ``NAME/x3``
  (``3·calls``); ``per_call_seconds`` turns their timings into seconds per call."""
  fns = {}
  for name, loop in loops.items():
    fns[f"{name}/x1"] = lambda loop=loop: loop(calls)
    fns[f"{name}/x3"] = lambda loop=loop: loop(3 * calls)
  return fns


def paired_call_seconds(seconds: dict[str, list[float]], calls: int) -> dict[str, np.ndarray]:
  """Marginal seconds per call of each loop timed by ``marginal_fns`` in each round on its
  own (``seconds``: each run's time, the two runs of a round adjacent): ``(t(3c) - t(c)) /
  2c``, so a slow drift of the machine cancels within each pair; noise can leave it <= 0."""
  return {key[:-3]: (np.asarray(seconds[f"{key[:-3]}/x3"]) - np.asarray(seconds[key]))
                    / (2 * calls)
          for key in seconds if key.endswith("/x1")}


def per_call_seconds(seconds: dict[str, list[float]], calls: int) -> dict[str, float]:
  """Marginal seconds per call of each loop timed by ``marginal_fns``: the median over rounds
  of ``paired_call_seconds``. Where noise makes the longer run no slower, the longer run's
  median per call (an upper bound: it carries a third of the start-up cost) stands in."""
  out = {}
  for name, paired in paired_call_seconds(seconds, calls).items():
    per_call = float(np.median(paired))
    out[name] = (per_call if per_call > 0
                 else float(np.median(seconds[f"{name}/x3"])) / (3 * calls))
  return out


def random_prompts(vocab_size: int, batch: int, length: int, seed: int) -> np.ndarray:
  low = 3 if vocab_size > 3 else 0  # skip the synthetic tokenizer's specials
  return np.random.default_rng(seed).integers(low, vocab_size, (batch, length)).astype(np.int32)


@dataclasses.dataclass
class _Prefilled:
  target_cache: kv_cache.KVCache
  draft_state: Any
  buffer_BxN: Any
  n_B: Any  # committed tokens per row, the last one pending


def _prefill(target_cfg, target_params, drafter: Optional[Drafter], draft_params, batch: int,
             context_len: int, cache_len: int, seed: int) -> _Prefilled:
  """Caches as mid-generation with ``context_len`` committed tokens, the last one pending
  (the engine's convention: the target cache holds all committed tokens but the pending one)."""
  if context_len + 1 >= cache_len:
    raise UserError(f"context_len {context_len} + 1 must be < cache_len {cache_len}")
  prompts = jnp.asarray(random_prompts(target_cfg.vocab_size, batch, context_len, seed))
  lens_B = jnp.full((batch,), context_len, jnp.int32)
  hidden_layers = drafter.target_hidden_layers if drafter is not None else ()
  out = llama.Decoder(target_cfg).apply(
      {"params": target_params}, prompts, cache=llama.init_cache(target_cfg, batch, cache_len),
      hidden_layers=hidden_layers, return_logits=False, method=llama.Decoder.forward)
  buffer = jnp.zeros((batch, cache_len), jnp.int32).at[:, :context_len].set(prompts)
  state = None
  if drafter is not None:
    state = drafter.prefill(draft_params, target_params, drafter.init_state(batch, cache_len),
                            prompts, lens_B, out.hidden_states)
  return _Prefilled(out.cache.replace(lengths_B=lens_B - 1), state, buffer, lens_B)


def _verify_looped(target_cfg, target_params, pre: _Prefilled, tokens: int,
                   hidden_layers: tuple) -> Looped:
  """Target calls on ``tokens`` new tokens (the pending one + ``tokens - 1`` drafts)."""
  target = llama.Decoder(target_cfg)
  batch = pre.n_B.shape[0]
  drafts = jnp.asarray(random_prompts(target_cfg.vocab_size, batch, tokens - 1, 1))
  pending_B = pre.buffer_BxN[jnp.arange(batch), pre.n_B - 1]

  def step(carry, tp, n_B, drafts):
    cache, pending = carry
    out = engine.verify(target, tp, cache.replace(lengths_B=n_B - 1), pending, drafts,
                        hidden_layers)
    # the next call's input depends on this call's output: nothing can be hoisted
    return out.cache, sampling.greedy(out.logits_BxTxV[:, -1])

  return Looped(step, (pre.target_cache, pending_B), (target_params, pre.n_B, drafts))


def _sync_inputs(drafter: Drafter, target_cfg, pre: _Prefilled, window: int) -> tuple:
  """What a round's ``drafter.sync`` reads, for K+1 committed tokens: the tokens and the
  target's hidden states at the drafter's layers (zeros: the cost does not depend on them)."""
  batch = pre.n_B.shape[0]
  tokens = jnp.asarray(random_prompts(target_cfg.vocab_size, batch, window + 1, 2))
  hidden = tuple(jnp.zeros((batch, window + 1, target_cfg.hidden_size),
                           llama.to_dtype(target_cfg.dtype))
                 for _ in drafter.target_hidden_layers)
  return tokens, hidden


def _draft_looped(drafter: Drafter, draft_params, target_cfg, target_params, pre: _Prefilled,
                  window: int) -> Looped:
  """What one engine round spends on drafting ``window`` tokens (greedy): the drafter's sync
  with the round's K+1 committed tokens (EAGLE-3 drafts its first token from it; a no-op for
  an LM drafter), then its window call."""
  batch = pre.n_B.shape[0]
  rows = jnp.arange(batch)
  sync_tokens, sync_hidden = _sync_inputs(drafter, target_cfg, pre, window)
  full_B = jnp.full((batch,), window + 1, jnp.int32)

  def step(carry, dp, tp, n_B, sync_tokens, sync_hidden):
    state, buffer = carry
    state = drafter.sync(dp, tp, state, sync_tokens, n_B - 1, full_B, sync_hidden)
    toks, logits, state = drafter.draft(dp, tp, state, buffer, n_B, jax.random.PRNGKey(0),
                                        window, 0.0, 1.0)
    # feed the result back so that successive calls depend on each other
    buffer = buffer.at[rows, n_B - 1].set(toks[:, -1])
    if state.logits_BxV is not None:
      state = state.replace(logits_BxV=logits[:, -1])
    return state, buffer

  return Looped(step, (pre.draft_state, pre.buffer_BxN),
                (draft_params, target_params, pre.n_B, sync_tokens, sync_hidden))


def _round_looped(target_cfg, target_params, drafter: Drafter, draft_params, pre: _Prefilled,
                  window: int) -> Looped:
  """A round's calls back to back, without its bookkeeping: the drafter's window call, the
  K+1-token verification of its drafts and the drafter's sync with the verification's hidden
  states. Beside ``draft_window`` and ``verify`` timed apart, it tells what running them
  together costs (on a CPU whose last-level cache holds much of the target, the drafter's
  weights evict some of it each round) from the engine's own overhead."""
  target = llama.Decoder(target_cfg)
  rows = jnp.arange(pre.n_B.shape[0])
  full_B = jnp.full(rows.shape, window + 1, jnp.int32)

  def step(carry, dp, tp, n_B):
    state, buffer, cache = carry
    toks, logits, state = drafter.draft(dp, tp, state, buffer, n_B, jax.random.PRNGKey(0),
                                        window, 0.0, 1.0)
    out = engine.verify(target, tp, cache.replace(lengths_B=n_B - 1), buffer[rows, n_B - 1],
                        toks, drafter.target_hidden_layers)
    committed = jnp.concatenate([toks, sampling.greedy(out.logits_BxTxV[:, -1:])], axis=1)
    state = drafter.sync(dp, tp, state, committed, n_B - 1, full_B, out.hidden_states)
    buffer = buffer.at[rows, n_B - 1].set(committed[:, -1])
    return state, buffer, out.cache

  return Looped(step, (pre.draft_state, pre.buffer_BxN, pre.target_cache),
                (draft_params, target_params, pre.n_B))


def gamma_loops(target_cfg: llama.ModelConfig, target_params, drafter: Drafter, draft_params,
                window: int, batch: int, context_len: int, *, cache_len: int,
                seed: int = 0, with_round: bool = False) -> dict[str, Looped]:
  """The compiled loops that ``measure_gamma`` times: the drafter's window call and a
  one-token drafter call, a K+1-token verification and a one-token target call, on caches
  prefilled with ``context_len`` tokens and ``cache_len`` slots (the engine's
  ``cache_length`` matches its attention cost). A benchmark may time them beside other work
  (``marginal_fns``) and pass ``per_call_seconds`` to ``gamma_summary``. ``with_round`` adds
  ``round``: a window call and a verification back to back in one loop."""
  if cache_len < context_len + window + 1:
    raise UserError(f"cache_len {cache_len} cannot hold {context_len} tokens + a window of "
                    f"{window} + 1")
  pre = _prefill(target_cfg, target_params, drafter, draft_params, batch, context_len,
                 cache_len, seed)
  loops = {"draft_window": _draft_looped(drafter, draft_params, target_cfg, target_params, pre,
                                         window),
           "draft_one": _draft_looped(drafter, draft_params, target_cfg, target_params, pre, 1),
           "verify": _verify_looped(target_cfg, target_params, pre, window + 1,
                                    drafter.target_hidden_layers),
           "target_one": _verify_looped(target_cfg, target_params, pre, 1, ())}
  if with_round:
    loops["round"] = _round_looped(target_cfg, target_params, drafter, draft_params, pre, window)
  return loops


def gamma_summary(call_seconds: dict[str, float], window: int) -> dict:
  """γ and its parts from the seconds per call of each of ``gamma_loops``' loops.

  γ = (one drafter step) ÷ (one K+1-token verification); a drafter step is everything one
  engine round spends on drafting (the sync of the round's tokens and the window call)
  divided by K. Also: the marginal step
  ``(t_K - t_1) / (K - 1)`` and γ against a one-token target call."""
  t = call_seconds
  step = t["draft_window"] / window
  marginal = (t["draft_window"] - t["draft_one"]) / (window - 1) if window > 1 else step
  return {"gamma": step / t["verify"], "gamma_vs_one_token_call": step / t["target_one"],
          "gamma_marginal": marginal / t["verify"], "draft_window_s": t["draft_window"],
          "draft_step_s": step, "draft_one_s": t["draft_one"], "draft_marginal_step_s": marginal,
          "verify_s": t["verify"], "target_one_token_s": t["target_one"], "window": window}


def _timed_per_call(loops: dict, calls: int, repeats: int) -> dict:
  """Seconds per call of each loop: ``repeats`` interleaved rounds of ``calls`` and
  ``3·calls`` calls, differenced (``per_call_seconds``)."""
  return per_call_seconds(timing.interleaved(marginal_fns(loops, calls), repeats).seconds,
                          calls)


def measure_gamma(target_cfg: llama.ModelConfig, target_params, drafter: Drafter, draft_params,
                  window: int, batch: int, context_len: int, *, cache_len: Optional[int] = None,
                  calls: int = 20, repeats: int = 5, seed: int = 0) -> dict:
  """``gamma_summary`` of ``gamma_loops``, each call priced at its loop's marginal time
  (``calls`` vs ``3·calls`` calls, median over ``repeats``); ``cache_len`` defaults to
  ``context_len + window + 2``."""
  cache_len = cache_len or context_len + window + 2
  loops = gamma_loops(target_cfg, target_params, drafter, draft_params, window, batch,
                      context_len, cache_len=cache_len, seed=seed)
  out = gamma_summary(_timed_per_call(loops, calls, repeats), window)
  return {**out, "batch": batch, "context_len": context_len, "cache_len": cache_len,
          "calls": calls, "repeats": repeats}


def verify_cost_curve(target_cfg: llama.ModelConfig, target_params, batch: int, context_len: int,
                      max_tokens: int, *, cache_len: Optional[int] = None, calls: int = 20,
                      repeats: int = 5, seed: int = 0) -> list[dict]:
  """Seconds of one target call on 1..max_tokens new tokens per row (marginal, as γ's calls),
  and the ratio to 1."""
  cache_len = cache_len or context_len + max_tokens + 2
  if cache_len < context_len + max_tokens:
    raise UserError(f"cache_len {cache_len} cannot hold {context_len} + {max_tokens} tokens")
  pre = _prefill(target_cfg, target_params, None, None, batch, context_len, cache_len, seed)
  loops = {str(t): _verify_looped(target_cfg, target_params, pre, t, ())
           for t in range(1, max_tokens + 1)}
  secs = {int(t): v for t, v in _timed_per_call(loops, calls, repeats).items()}
  return [{"tokens": t, "seconds": s, "ratio": s / secs[1]} for t, s in sorted(secs.items())]
