r"""γ, measured: the drafter's cost per drafted token over the target's verification call.

γ enters the PPOW speed reward (``ppow.gamma = -1`` measures it on the hardware at hand) and
the ideal speedup τ / (1 + γK) of the decode benchmark (``ppow_jax/bench/decode.py``). The
drafter's window call and the target's verification call are each jitted on their own and run
``calls`` times inside one compiled loop on a prefilled cache of the engine's size (so, as
inside the engine, there is no host dispatch between calls). The verification cost curve times
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
from ppow_jax.models import llama


class _Looped:
  """Runs ``step(carry, *consts)`` ``calls`` times in one compiled loop; the carry is donated
  and threaded through successive calls, so caches are updated in place as in the engine."""

  def __init__(self, step: Callable, carry: Any, consts: tuple, calls: int):
    def loop(carry, *consts):
      return jax.lax.fori_loop(0, calls, lambda i, c: step(c, *consts), carry)

    self._fn = jax.jit(loop, donate_argnums=0)
    self._carry = jax.tree_util.tree_map(jnp.array, carry)  # own copies: they get donated
    self._consts = consts

  def __call__(self):
    self._carry = self._fn(self._carry, *self._consts)
    return self._carry


def random_prompts(vocab_size: int, batch: int, length: int, seed: int) -> np.ndarray:
  low = 3 if vocab_size > 3 else 0  # skip the synthetic tokenizer's specials
  return np.random.default_rng(seed).integers(low, vocab_size, (batch, length)).astype(np.int32)


@dataclasses.dataclass
class _Prefilled:
  target_cache: llama.KVCache
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
                   hidden_layers: tuple, calls: int) -> _Looped:
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

  return _Looped(step, (pre.target_cache, pending_B), (target_params, pre.n_B, drafts), calls)


def _draft_looped(drafter: Drafter, draft_params, target_params, pre: _Prefilled, window: int,
                  calls: int) -> _Looped:
  """Drafter calls proposing ``window`` tokens each (greedy), as one engine round does."""
  batch = pre.n_B.shape[0]
  rows = jnp.arange(batch)

  def step(carry, dp, tp, n_B):
    state, buffer = carry
    toks, logits, state = drafter.draft(dp, tp, state, buffer, n_B, jax.random.PRNGKey(0),
                                        window, 0.0, 1.0)
    # feed the result back so that successive calls depend on each other
    buffer = buffer.at[rows, n_B - 1].set(toks[:, -1])
    if state.logits_BxV is not None:
      state = state.replace(logits_BxV=logits[:, -1])
    return state, buffer

  return _Looped(step, (pre.draft_state, pre.buffer_BxN), (draft_params, target_params, pre.n_B),
                 calls)


def gamma_loops(target_cfg: llama.ModelConfig, target_params, drafter: Drafter, draft_params,
                window: int, batch: int, context_len: int, *, cache_len: int, calls: int = 20,
                seed: int = 0) -> dict:
  """The compiled loops that ``measure_gamma`` times (each runs ``calls`` calls): the drafter's
  window call and a one-token drafter call, a K+1-token verification and a one-token target
  call, on caches prefilled with ``context_len`` tokens and ``cache_len`` slots (the
  engine's ``cache_length`` matches its attention cost). A benchmark may time them beside
  other work and pass the medians to ``gamma_summary``."""
  if cache_len < context_len + window + 1:
    raise UserError(f"cache_len {cache_len} cannot hold {context_len} tokens + a window of "
                    f"{window} + 1")
  pre = _prefill(target_cfg, target_params, drafter, draft_params, batch, context_len,
                 cache_len, seed)
  return {"draft_window": _draft_looped(drafter, draft_params, target_params, pre, window, calls),
          "draft_one": _draft_looped(drafter, draft_params, target_params, pre, 1, calls),
          "verify": _verify_looped(target_cfg, target_params, pre, window + 1,
                                   drafter.target_hidden_layers, calls),
          "target_one": _verify_looped(target_cfg, target_params, pre, 1, (), calls)}


def gamma_summary(loop_seconds: dict, window: int, calls: int) -> dict:
  """γ and its parts from the median seconds of each of ``gamma_loops``' loops.

  γ = (one drafter step) ÷ (one K+1-token verification); a drafter step is the window call
  (everything one engine round spends on drafting) divided by K. Also: the marginal step
  ``(t_K - t_1) / (K - 1)`` and γ against a one-token target call."""
  t = {k: v / calls for k, v in loop_seconds.items()}
  step = t["draft_window"] / window
  marginal = (t["draft_window"] - t["draft_one"]) / (window - 1) if window > 1 else step
  return {"gamma": step / t["verify"], "gamma_vs_one_token_call": step / t["target_one"],
          "gamma_marginal": marginal / t["verify"], "draft_window_s": t["draft_window"],
          "draft_step_s": step, "draft_one_s": t["draft_one"], "draft_marginal_step_s": marginal,
          "verify_s": t["verify"], "target_one_token_s": t["target_one"], "window": window,
          "calls": calls}


def measure_gamma(target_cfg: llama.ModelConfig, target_params, drafter: Drafter, draft_params,
                  window: int, batch: int, context_len: int, *, cache_len: Optional[int] = None,
                  calls: int = 20, repeats: int = 5, seed: int = 0) -> dict:
  """``gamma_summary`` of ``gamma_loops``, each timed as the median over ``repeats`` of its
  loop of ``calls`` calls (the loops interleaved); ``cache_len`` defaults to
  ``context_len + window + 2``."""
  cache_len = cache_len or context_len + window + 2
  fns = gamma_loops(target_cfg, target_params, drafter, draft_params, window, batch,
                    context_len, cache_len=cache_len, calls=calls, seed=seed)
  out = gamma_summary(timing.median_seconds(fns, repeats), window, calls)
  return {**out, "batch": batch, "context_len": context_len, "cache_len": cache_len,
          "repeats": repeats}


def verify_cost_curve(target_cfg: llama.ModelConfig, target_params, batch: int, context_len: int,
                      max_tokens: int, *, cache_len: Optional[int] = None, calls: int = 20,
                      repeats: int = 5, seed: int = 0) -> list[dict]:
  """Seconds of one target call on 1..max_tokens new tokens per row, and the ratio to 1."""
  cache_len = cache_len or context_len + max_tokens + 2
  if cache_len < context_len + max_tokens:
    raise UserError(f"cache_len {cache_len} cannot hold {context_len} + {max_tokens} tokens")
  pre = _prefill(target_cfg, target_params, None, None, batch, context_len, cache_len, seed)
  fns = {t: _verify_looped(target_cfg, target_params, pre, t, (), calls)
         for t in range(1, max_tokens + 1)}
  secs = {t: v / calls for t, v in timing.median_seconds(fns, repeats).items()}
  return [{"tokens": t, "seconds": s, "ratio": s / secs[1]} for t, s in secs.items()]
