r"""Decode-engine benchmark: AR vs speculative tokens/s, τ, γ, ideal vs measured speedup.

  python -m ppow_jax.bench.decode --batch_sizes=1,8 --window=5 --max_new_tokens=128 \
      --prompt_len=64 --repeats=3 --output_json=/tmp/decode.json          # synthetic pair
  python -m ppow_jax.bench.decode --target=HF_DIR --drafter=DIR ...       # real models
  python -m ppow_jax.bench.decode --save_pair=/tmp/pair                   # also write the pair

Per batch size, in one process: one compile run of each engine, then ``--repeats`` timed runs
alternating AR and speculative (order flipped every repeat); tokens/s is the median. Timings
include the prompt pass. γ (PROTOCOL.md) is measured by ``measure_gamma``: the drafter's
window call and the target's verification call, each jitted on its own and run ``calls``
times inside one compiled loop on a prefilled cache of the engine's size (so, as inside the
engine, there is no host dispatch between calls). The verification cost curve times target
calls on 1..K+1 new tokens the same way.

``--tree=TOTAL,DEPTH,TOPK`` also times EAGLE-2 tree drafting beside the chain (``results[i].tree``).
The flags ``--target --drafter --window --tree --max_new_tokens --seed --dtype --output_json`` are
``ppow_jax.generate``'s (this module reuses its drafter loader and so its flag definitions).
"""

from __future__ import annotations

import dataclasses
import os
import platform
import sys
import time
from typing import Any, Callable, Optional

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np

from ppow_jax import cli, engine, generate, tree, tree_engine
from ppow_jax.bench import pairs
from ppow_jax.drafters import Drafter
from ppow_jax.errors import UserError
from ppow_jax.models import hf, llama

FLAGS = flags.FLAGS
flags.DEFINE_enum("pair", None, ["synthetic", "hf"],
                  "Models: 'synthetic' (built in-process, see bench/pairs.py) or 'hf' "
                  "(--target/--drafter). Default: hf when --target is given.")
flags.DEFINE_string("save_pair", None, "Also write the synthetic pair here (HF layout).")
flags.DEFINE_list("batch_sizes", ["1", "8"], "Batch sizes, measured side by side.")
flags.DEFINE_integer("repeats", 3, "Timed runs per engine (after one compile run).")
flags.DEFINE_integer("prompt_len", 64, "Prompt tokens per row (random ids, rows differ).")
flags.DEFINE_integer("gamma_calls", 20, "Calls per timed loop when measuring γ and costs.")
flags.DEFINE_integer("synthetic_layers", 8, "Synthetic target: layers.")
flags.DEFINE_integer("synthetic_hidden", 256, "Synthetic target: hidden size.")
flags.DEFINE_integer("synthetic_intermediate", 768, "Synthetic target: MLP size.")
flags.DEFINE_integer("synthetic_vocab", 2048, "Synthetic target: vocabulary size.")
flags.DEFINE_float("synthetic_residual_scale", 0.01,
                   "Synthetic target: o_proj/down_proj scale of layers 1..L-1.")


@dataclasses.dataclass(frozen=True)
class BenchOptions:
  batch_sizes: tuple = (1, 8)
  window: int = 5  # K
  max_new_tokens: int = 128  # per row, the prompt pass's token included
  prompt_len: int = 64
  repeats: int = 3
  gamma_calls: int = 20
  seed: int = 0
  tree: str = ""  # "TOTAL,DEPTH,TOPK": also time tree drafting ("": chain only)


# ----------------------------------------------------------------------------- timing


def _median_times(fns: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
  """Median seconds of each callable, after one untimed (compiling) call; runs interleaved."""
  for fn in fns.values():
    jax.block_until_ready(fn())
  times = {k: [] for k in fns}
  for _ in range(repeats):
    for k, fn in fns.items():
      t0 = time.perf_counter()
      jax.block_until_ready(fn())
      times[k].append(time.perf_counter() - t0)
  return {k: float(np.median(v)) for k, v in times.items()}


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


def _random_prompts(vocab_size: int, batch: int, length: int, seed: int) -> np.ndarray:
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
  prompts = jnp.asarray(_random_prompts(target_cfg.vocab_size, batch, context_len, seed))
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
  drafts = jnp.asarray(_random_prompts(target_cfg.vocab_size, batch, tokens - 1, 1))
  pending_B = pre.buffer_BxN[jnp.arange(batch), pre.n_B - 1]

  def step(carry, tp, n_B, drafts):
    cache, pending = carry
    out = engine.verify(target, tp, cache.replace(lengths_B=n_B - 1), pending, drafts,
                        hidden_layers)
    # the next call's input depends on this call's output: nothing can be hoisted
    return out.cache, jnp.argmax(out.logits_BxTxV[:, -1], -1).astype(jnp.int32)

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


def measure_gamma(target_cfg: llama.ModelConfig, target_params, drafter: Drafter, draft_params,
                  window: int, batch: int, context_len: int, *, cache_len: Optional[int] = None,
                  calls: int = 20, repeats: int = 5, seed: int = 0) -> dict:
  """γ = (one drafter step) ÷ (one target verification call of K+1 tokens), measured.

  A drafter step is the drafter's window call (K tokens, everything one engine round spends
  on drafting) divided by K. Both calls run on caches prefilled with ``context_len`` tokens,
  preallocated to ``cache_len`` slots (default ``context_len + window + 2``; pass the
  engine's ``cache_length`` to match its attention cost). Each timing is the median over
  ``repeats`` of a compiled loop of ``calls`` calls, divided by ``calls``. The returned dict
  also has the marginal step (``(t_K - t_1) / (K - 1)``) and γ against a 1-token call.
  """
  cache_len = cache_len or context_len + window + 2
  if cache_len < context_len + window + 1:
    raise UserError(f"cache_len {cache_len} cannot hold {context_len} tokens + a window of "
                    f"{window} + 1")
  pre = _prefill(target_cfg, target_params, drafter, draft_params, batch, context_len,
                 cache_len, seed)
  fns = {"draft_window": _draft_looped(drafter, draft_params, target_params, pre, window, calls),
         "draft_one": _draft_looped(drafter, draft_params, target_params, pre, 1, calls),
         "verify": _verify_looped(target_cfg, target_params, pre, window + 1,
                                  drafter.target_hidden_layers, calls),
         "target_one": _verify_looped(target_cfg, target_params, pre, 1, (), calls)}
  t = {k: v / calls for k, v in _median_times(fns, repeats).items()}
  step = t["draft_window"] / window
  marginal = (t["draft_window"] - t["draft_one"]) / (window - 1) if window > 1 else step
  return {"gamma": step / t["verify"], "gamma_vs_one_token_call": step / t["target_one"],
          "gamma_marginal": marginal / t["verify"], "draft_window_s": t["draft_window"],
          "draft_step_s": step, "draft_one_s": t["draft_one"], "draft_marginal_step_s": marginal,
          "verify_s": t["verify"], "target_one_token_s": t["target_one"], "window": window,
          "batch": batch, "context_len": context_len, "cache_len": cache_len, "calls": calls,
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
  secs = {t: v / calls for t, v in _median_times(fns, repeats).items()}
  return [{"tokens": t, "seconds": s, "ratio": s / secs[1]} for t, s in secs.items()]


# ----------------------------------------------------------------------------- engine runs


def bench_batch(target_cfg, target_params, drafter: Drafter, draft_params, batch: int,
                opts: BenchOptions) -> dict:
  """AR and speculative tokens/s at one batch size, γ, the cost curve, and the speedups."""
  k = opts.window
  cfg = engine.DecodeConfig(window=k, max_new_tokens=opts.max_new_tokens, eos_ids=())
  engines = {"ar": engine.Engine(target_cfg, None, cfg),
             "spec": engine.Engine(target_cfg, drafter, cfg)}
  params = {"ar": None, "spec": draft_params}
  if opts.tree:
    engines["tree"] = tree_engine.TreeEngine(target_cfg, drafter, cfg,
                                             tree.TreeShape.parse(opts.tree))
    params["tree"] = draft_params
  names = tuple(engines)
  prompts = _random_prompts(target_cfg.vocab_size, batch, opts.prompt_len, opts.seed + batch)
  lens = np.full((batch,), opts.prompt_len, np.int32)
  rng = jax.random.PRNGKey(opts.seed)
  run = lambda name: jax.block_until_ready(
      engines[name].generate(target_params, params[name], prompts, lens, rng))
  compile_s, outs, secs = {}, {}, {name: [] for name in names}
  for name in names:
    t0 = time.perf_counter()
    outs[name] = run(name)
    compile_s[name] = time.perf_counter() - t0
  for r in range(opts.repeats):
    for name in (names if r % 2 == 0 else names[::-1]):
      t0 = time.perf_counter()
      outs[name] = run(name)
      secs[name].append(time.perf_counter() - t0)
  new = {name: out.new_tokens() for name, out in outs.items()}
  n_tokens = sum(map(len, new["spec"]))
  tps = {name: sum(map(len, new[name])) / float(np.median(s)) for name, s in secs.items()}
  stats = outs["spec"].stats.summary()

  cache_len = engines["spec"].cache_length(opts.prompt_len)
  context_len = opts.prompt_len + opts.max_new_tokens // 2
  gamma = measure_gamma(target_cfg, target_params, drafter, draft_params, k, batch, context_len,
                        cache_len=cache_len, calls=opts.gamma_calls, seed=opts.seed)
  curve = verify_cost_curve(target_cfg, target_params, batch, context_len, k + 1,
                            cache_len=cache_len, calls=opts.gamma_calls, seed=opts.seed)
  tau, g = stats["tau"], gamma["gamma"]
  ideal = tau / (1 + k * g)
  measured = tps["spec"] / tps["ar"]
  rounds = stats["verify_calls"] / batch  # mean rounds per row; the loop runs the longest
  rounds_max = int(np.max(np.asarray(outs["spec"].stats.verify_calls_B)))
  ar_steps = int(np.max(np.asarray(outs["ar"].stats.verify_calls_B)))
  # what the isolated calls predict, relative to the engine's own AR step
  round_s = gamma["draft_window_s"] + gamma["verify_s"]
  tree_result = {}
  if opts.tree:
    tstats = outs["tree"].stats.summary()
    tree_result = {"tree": {
        "shape": opts.tree, "tokens_per_s": tps["tree"], "seconds": secs["tree"],
        "tau": tstats["tau"], "verify_calls": tstats["verify_calls"],
        "alpha_by_depth": tstats["alpha"], "greedy_identical": new["ar"] == new["tree"],
        "speedup_vs_ar": tps["tree"] / tps["ar"], "speedup_vs_chain": tps["tree"] / tps["spec"]}}
  return {**tree_result,
      "batch": batch, "new_tokens": n_tokens,
      "ar_tokens_per_s": tps["ar"], "spec_tokens_per_s": tps["spec"],
      "ar_seconds": secs["ar"], "spec_seconds": secs["spec"], "compile_and_first_run_s": compile_s,
      "greedy_identical": new["ar"] == new["spec"],
      "tau": tau, "tau_analytic": stats["tau_analytic"], "tau_per_prompt_mean":
      stats["tau_per_prompt_mean"], "alpha": stats["alpha"],
      "alpha_expected": stats["alpha_expected"], "verify_calls": stats["verify_calls"],
      "rounds_longest_row": rounds_max,
      "gamma": g, "gamma_detail": gamma,
      "ideal_speedup": ideal, "measured_speedup": measured,
      "measured_over_ideal": measured / ideal,
      "verify_cost_curve": curve,
      "breakdown": {
          "ar_step_in_engine_s": float(np.median(secs["ar"])) / ar_steps,
          "ar_step_isolated_s": curve[0]["seconds"],
          "spec_round_in_engine_s": float(np.median(secs["spec"])) / rounds_max,
          "spec_round_isolated_s": round_s,
          # the loop runs until its longest row is done: tokens per round of the batch
          "tau_effective_longest_row": ar_steps / rounds_max,
          "predicted_speedup_from_isolated_calls":
              ar_steps / rounds_max * curve[0]["seconds"] / round_s,
          "rounds_mean_per_row": rounds},
  }


def machine_info() -> dict:
  cpu = platform.processor() or ""
  try:
    with open("/proc/cpuinfo") as f:
      cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
  except OSError:
    pass
  return {"cpu": cpu, "cpu_count": os.cpu_count(), "platform": platform.platform(),
          "python": platform.python_version(), "jax": jax.__version__,
          "jax_devices": [str(d) for d in jax.devices()],
          "load_avg_1_5_15": list(os.getloadavg())}


def run_benchmark(target_cfg, target_params, drafter: Drafter, draft_params,
                  opts: BenchOptions, pair: str, description: str) -> dict:
  """Everything for all batch sizes; the load average is recorded before and after."""
  if opts.window < 1 or opts.repeats < 1 or opts.max_new_tokens < 2:
    raise UserError("need window >= 1, repeats >= 1, max_new_tokens >= 2")
  if opts.tree:
    tree.TreeShape.parse(opts.tree)
  result = {"pair": pair, "pair_description": description, "options": dataclasses.asdict(opts),
            "temperature": 0.0, "machine": machine_info(),
            "target": dataclasses.asdict(target_cfg), "drafter": type(drafter).__name__,
            "results": []}
  for batch in opts.batch_sizes:
    result["results"].append(bench_batch(target_cfg, target_params, drafter, draft_params,
                                         batch, opts))
  result["load_avg_end_1_5_15"] = list(os.getloadavg())
  return result


def format_table(result: dict) -> str:
  rows = [("batch", "AR tok/s", "spec tok/s", "τ", "τ_an", "γ", "ideal", "measured", "meas/ideal",
           "same")]
  for r in result["results"]:
    rows.append((str(r["batch"]), f"{r['ar_tokens_per_s']:.1f}", f"{r['spec_tokens_per_s']:.1f}",
                 f"{r['tau']:.2f}", f"{r['tau_analytic']:.2f}", f"{r['gamma']:.3f}",
                 f"{r['ideal_speedup']:.2f}x", f"{r['measured_speedup']:.2f}x",
                 f"{r['measured_over_ideal']:.2f}", str(r["greedy_identical"])))
  widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
  lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in rows]
  for r in result["results"]:
    g = r["gamma_detail"]
    lines.append(f"batch {r['batch']}: α by position {r['alpha']}")
    lines.append(f"  drafter step {g['draft_step_s'] * 1e3:.3f} ms (window call "
                 f"{g['draft_window_s'] * 1e3:.3f} ms, 1-token call {g['draft_one_s'] * 1e3:.3f} "
                 f"ms); verify(K+1) {g['verify_s'] * 1e3:.3f} ms; target 1-token "
                 f"{g['target_one_token_s'] * 1e3:.3f} ms")
    lines.append("  verify cost curve (tokens: ms, ×1-token): " + ", ".join(
        f"{c['tokens']}: {c['seconds'] * 1e3:.3f} ({c['ratio']:.2f}x)"
        for c in r["verify_cost_curve"]))
    b = r["breakdown"]
    lines.append(f"  engine AR step {b['ar_step_in_engine_s'] * 1e3:.3f} ms vs isolated "
                 f"{b['ar_step_isolated_s'] * 1e3:.3f} ms; engine round "
                 f"{b['spec_round_in_engine_s'] * 1e3:.3f} ms vs isolated draft+verify "
                 f"{b['spec_round_isolated_s'] * 1e3:.3f} ms; speedup predicted by isolated "
                 f"calls {b['predicted_speedup_from_isolated_calls']:.2f}x")
    if "tree" in r:
      t = r["tree"]
      lines.append(f"  tree {t['shape']}: {t['tokens_per_s']:.1f} tok/s, τ {t['tau']:.2f}, "
                   f"{t['speedup_vs_ar']:.2f}x AR, {t['speedup_vs_chain']:.2f}x chain, same "
                   f"{t['greedy_identical']}")
  m = result["machine"]
  lines.append(f"pair: {result['pair']}; machine: {m['cpu']} ({m['cpu_count']} cores), load "
               f"{m['load_avg_1_5_15'][0]:.2f} -> {result['load_avg_end_1_5_15'][0]:.2f}")
  return "\n".join(lines)


# ----------------------------------------------------------------------------- main


def _synthetic_spec() -> pairs.SyntheticSpec:
  return pairs.SyntheticSpec(
      num_layers=FLAGS.synthetic_layers, hidden_size=FLAGS.synthetic_hidden,
      intermediate_size=FLAGS.synthetic_intermediate, vocab_size=FLAGS.synthetic_vocab,
      residual_scale=FLAGS.synthetic_residual_scale, seed=FLAGS.seed)


def run(argv_unused=None) -> dict:
  kind = FLAGS.pair or ("hf" if FLAGS.target else "synthetic")
  if kind == "hf":
    if not FLAGS.target or FLAGS.drafter.lower() == "none":
      raise UserError("--pair=hf needs --target and --drafter")
    target, target_params = hf.load(FLAGS.target, dtype=FLAGS.dtype)
    target_cfg = target.cfg
    drafter, draft_params = generate.load_drafter(FLAGS.drafter, target_cfg, FLAGS.dtype)
    description = f"target {FLAGS.target}, drafter {FLAGS.drafter}"
  else:
    p = pairs.synthetic_pair(_synthetic_spec())
    target_cfg, target_params, drafter, draft_params = (p.target_cfg, p.target_params,
                                                        p.drafter, p.draft_params)
    description = p.description
    if FLAGS.save_pair:
      paths = pairs.save_pair(p, FLAGS.save_pair, overwrite=True)
      print(f"saved the pair to {paths}", file=sys.stderr)
  try:
    batch_sizes = tuple(int(b) for b in FLAGS.batch_sizes)
  except ValueError:
    raise UserError(f"--batch_sizes must be integers, got {FLAGS.batch_sizes}") from None
  opts = BenchOptions(batch_sizes=batch_sizes, window=FLAGS.window,
                      max_new_tokens=FLAGS.max_new_tokens, prompt_len=FLAGS.prompt_len,
                      repeats=FLAGS.repeats, gamma_calls=FLAGS.gamma_calls, seed=FLAGS.seed,
                      tree=FLAGS.tree or "")
  result = run_benchmark(target_cfg, target_params, drafter, draft_params, opts, kind,
                         description)
  result["command"] = " ".join(["python -m ppow_jax.bench.decode"] + sys.argv[1:])
  print(format_table(result))
  if FLAGS.output_json:
    cli.write_json(FLAGS.output_json, result)
  return result


if __name__ == "__main__":
  app.run(cli.main_for(run))
