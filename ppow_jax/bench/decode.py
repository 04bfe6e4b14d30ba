r"""Decode-engine benchmark: AR vs speculative tokens/s, τ, γ, ideal vs measured speedup.

  python -m ppow_jax.bench.decode --batch_sizes=1,8 --window=5 --max_new_tokens=128 \
      --prompt_len=64 --repeats=3 --output_json=/tmp/decode.json          # synthetic pair
  python -m ppow_jax.bench.decode --target=HF_DIR --drafter=DIR ...       # real models
  python -m ppow_jax.bench.decode --save_pair=/tmp/pair                   # also write the pair

Per batch size, in one process: one compile run of each engine, then ``--repeats`` timed runs
alternating AR and speculative (order flipped every repeat); tokens/s is the median. Timings
include the prompt pass. The measured speedup is set against two ideals (docs/protocol.md):
``τ/(1+Kγ)`` and ``cost_curve_ideal``, which prices a round at its measured calls. Both are
decode-phase formulas, so the speedup is also reported without the prompt passes
(``decode``): each engine's prompt pass is timed on its own in the same rounds and taken out
of its time. The calls the ideals price (the drafter's window call, a K+1-token verification
and a one-token target call; ``gamma.gamma_loops``, each looped inside one compiled program)
are timed in the same alternating rounds, so a drift of the machine's speed moves both sides
of measured ÷ ideal alike; each is priced at its loop's marginal time per call (loops of
``--gamma_calls`` and 3× as many calls, differenced: a loop's start-up is not charged to its
calls; an engine pays one per generation, not one per round). Measured ÷ cost-curve ideal
is also computed round by round (``measured_over_ideal_cost_curve_per_round``): its spread is
what the machine's noise does to the headline ratio; every timed run's seconds, round by
round, are in ``timings_s`` (for other estimators). The verification cost curve (1..K+1
tokens) is measured after.
``--tree=TOTAL,DEPTH,TOPK`` also times EAGLE-2 tree drafting beside the chain (``results[i].tree``).
``--whole_batch`` also times AR and speculative decoding without batch compaction (every row
computed until the batch's longest row is done), side by side (``results[i].whole_batch``).
``--benchmarks=humaneval,chat`` decodes the evaluation's prompt sets (``--num_prompts`` each, in
full batches, stopping at EOS) instead of random prompts; each set has its own results.
"""

from __future__ import annotations

import dataclasses
import os
import sys

from absl import flags
import jax
import numpy as np

from ppow_jax import cli, engine, evaluate, timing, tree, tree_engine
from ppow_jax.bench import pairs
from ppow_jax.bench.decode_table import format_table
from ppow_jax.data import benchmarks
from ppow_jax.data import tokenizer as tokenizer_lib
from ppow_jax.drafters import Drafter
from ppow_jax.errors import UserError
from ppow_jax.gamma import (gamma_loops, gamma_summary, marginal_fns, paired_call_seconds,
                            per_call_seconds, random_prompts, verify_cost_curve)
from ppow_jax.models import decode_weights, gguf_convert

FLAGS = flags.FLAGS


def define_flags() -> None:
  """This tool's flags (defined when it runs, so that importing it defines none)."""
  flags.DEFINE_string("target", None, "Target: a Hugging Face model directory (--pair=hf).")
  flags.DEFINE_string("drafter", "none", "Drafter directory (HF LM or EAGLE-3) (--pair=hf).")
  flags.DEFINE_integer("window", 5, "K: draft tokens per verification.")
  flags.DEFINE_string("tree", None, "TOTAL,DEPTH,TOPK: also time EAGLE-2 tree drafting.")
  flags.DEFINE_integer("max_new_tokens", 128, "New tokens per row.")
  flags.DEFINE_integer("seed", 0, "PRNG seed (prompts, synthetic weights, sampling).")
  flags.DEFINE_string("dtype", "float32", "Compute dtype of --pair=hf models.")
  flags.DEFINE_string("output_json", None, "Write the numbers here.")
  flags.DEFINE_enum("pair", None, ["synthetic", "hf"],
                    "Models: 'synthetic' (built in-process, see bench/pairs.py) or 'hf' "
                    "(--target/--drafter). Default: hf when --target is given.")
  flags.DEFINE_string("save_pair", None, "Also write the synthetic pair here (HF layout).")
  flags.DEFINE_list("batch_sizes", ["1", "8"], "Batch sizes, measured side by side.")
  flags.DEFINE_integer("repeats", 3, "Timed runs per engine (after one compile run).")
  flags.DEFINE_integer("prompt_len", 64, "Prompt tokens per row (random ids, rows differ); "
                       "with --benchmarks the most per prompt (longer ones keep their end).")
  flags.DEFINE_string("benchmarks", "", "Comma-separated evaluation prompt sets (humaneval, "
                      "chat) instead of random prompts; needs --pair=hf; stops at EOS.")
  flags.DEFINE_integer("num_prompts", 6, "--benchmarks: prompts per set (evenly spread).")
  flags.DEFINE_bool("whole_batch", False, "Also time AR and speculative decoding without batch "
                    "compaction (finished rows computed until the longest row is done).")
  flags.DEFINE_float("peak_gbs", 0.0, "The device's memory bandwidth in GB/s (0: unknown): an AR "
                     "step is also reported against the time its weights take to read.")
  flags.DEFINE_integer("gamma_calls", 20, "Calls of the shorter timed loop when measuring γ and "
                       "costs (the longer has 3×).")
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
  benchmarks: str = ""  # comma-separated prompt sets (data/benchmarks.py); "": random prompts
  num_prompts: int = 6  # per benchmark, evenly spread
  whole_batch: bool = False  # also time AR and speculative without batch compaction
  peak_gbs: float = 0.0  # the device's memory bandwidth, GB/s (0: unknown)


# ----------------------------------------------------------------------------- engine runs


def cost_curve_ideal(tau: float, t_one: float, t_verify: float, t_draft: float,
                     window: int) -> float:
  """Speedup of a round that costs what its calls cost alone: ``τ·t(1) / (t_verify(K+1) +
  K·t_draft)``, an AR token costing one 1-token target call ``t(1)``.

  Equals ``τ/(1+Kγ)`` (γ = t_draft / t_verify) when a (K+1)-token verification costs as much
  as a 1-token call, i.e. where verification is bandwidth-bound (a GPU); on a compute-bound
  CPU it accounts for the verification cost curve that ``τ/(1+Kγ)`` ignores.
  """
  return tau * t_one / (t_verify + window * t_draft)


def ratio_per_round(secs: dict[str, list[float]], paired_calls: dict[str, np.ndarray],
                    tau: float, window: int, new_tokens: dict[str, int]) -> dict[str, list[float]]:
  """Measured ÷ cost-curve ideal in each timed round on its own (the engines' runs and the
  isolated loops of one round are adjacent; ``paired_calls``: ``gamma.paired_call_seconds``
  of the loops): ``e2e`` and ``decode`` (prompt passes left out), the headline's formulas
  applied to one round. The headline takes medians over rounds; the spread of these shows how
  much the machine's noise moves it. A round where noise leaves a priced call's marginal time,
  or a decode-only time, non-positive gives no ratio. ``new_tokens``: each engine's ("ar",
  "spec") new tokens."""
  out = {"e2e": [], "decode": []}
  for r in range(len(secs["ar"])):
    t = {name: float(sec[r]) for name, sec in paired_calls.items()}
    if min(t["target_one"], t["verify"], t["draft_window"]) <= 0:
      continue
    g = gamma_summary(t, window)
    ideal = cost_curve_ideal(tau, g["target_one_token_s"], g["verify_s"], g["draft_step_s"],
                             window)
    rate = {name: n / secs[name][r] for name, n in new_tokens.items()}
    out["e2e"].append(rate["spec"] / rate["ar"] / ideal)
    dec = {name: timing.rate_beyond(n, secs[name][r], secs[f"{name}/prompt"][r])
           for name, n in new_tokens.items()}
    if dec["ar"] and dec["spec"]:
      out["decode"].append(dec["spec"] / dec["ar"] / ideal)
  return out


def _rounds_of_longest_rows(outs: list) -> int:
  """Loop iterations: each batch's loop runs until its longest row is done."""
  return sum(int(np.max(np.asarray(o.stats.verify_calls_B))) for o in outs)


def bench_batch(target_cfg, target_params, drafter: Drafter, draft_params, batch: int,
                opts: BenchOptions, prompts: list[list[int]] | None = None,
                eos_ids: tuple = ()) -> dict:
  """AR and speculative tokens/s at one batch size, γ, the cost curve, and the speedups.

  ``prompts``: token-id prompts decoded in full batches of ``batch`` (a remainder is left out);
  None: one batch of random prompts of ``opts.prompt_len`` tokens.
  """
  k = opts.window
  cfg = engine.DecodeConfig(window=k, max_new_tokens=opts.max_new_tokens, eos_ids=eos_ids)
  engines = {"ar": engine.Engine(target_cfg, None, cfg),
             "spec": engine.Engine(target_cfg, drafter, cfg)}
  params = {"ar": None, "spec": draft_params}
  if opts.tree:
    engines["tree"] = tree_engine.TreeEngine(target_cfg, drafter, cfg,
                                             tree.TreeShape.parse(opts.tree))
    params["tree"] = draft_params
  timed_prompt = list(engines)  # the engines whose prompt pass is also timed alone
  if opts.whole_batch:  # the same engines computing every row until the longest is done
    whole = dataclasses.replace(cfg, compact_rows=False)
    engines["ar/whole"] = engine.Engine(target_cfg, None, whole)
    engines["spec/whole"] = engine.Engine(target_cfg, drafter, whole)
    params.update({"ar/whole": None, "spec/whole": draft_params})
  if prompts is None:
    batches = [(random_prompts(target_cfg.vocab_size, batch, opts.prompt_len, opts.seed + batch),
                np.full((batch,), opts.prompt_len, np.int32))]
  else:
    batches = evaluate.batches(prompts, batch, max(map(len, prompts)))
    if not batches:
      raise UserError(f"batch size {batch} exceeds the {len(prompts)} prompts")
  prompt_len = batches[0][0].shape[1]
  rng = jax.random.PRNGKey(opts.seed)
  fns = {name: (lambda name=name: evaluate.decode_all(engines[name], target_params, params[name],
                                                     batches, rng)) for name in engines}
  # each engine's prompt pass on its own (the same caches): decode-only rates leave it out
  fns.update({f"{name}/prompt": (lambda name=name: [
      engines[name].prompt_pass(target_params, params[name], p, l) for p, l in batches])
              for name in timed_prompt})
  # the calls the ideals price, timed alone in the same rounds (machine drift hits both alike)
  cache_len = engines["spec"].cache_length(prompt_len)
  context_len = prompt_len + opts.max_new_tokens // 2
  loops = gamma_loops(target_cfg, target_params, drafter, draft_params, k, batch, context_len,
                      cache_len=cache_len, seed=opts.seed, with_round=True)
  fns.update({f"isolated/{name}": fn
              for name, fn in marginal_fns(loops, opts.gamma_calls).items()})
  timed = timing.interleaved(fns, opts.repeats, alternate=True)
  compile_s, outs, secs = timed.first_seconds, timed.last or timed.first, timed.seconds
  med = {name: float(np.median(s)) for name, s in secs.items()}
  collected = {name: evaluate.collect(outs[name]) for name in engines}
  new = {name: toks for name, (toks, _) in collected.items()}
  n_new = {name: sum(map(len, toks)) for name, toks in new.items()}
  tps = {name: n_new[name] / med[name] for name in engines}
  decode_tps = {name: timing.rate_beyond(n_new[name], med[name], med[f"{name}/prompt"])
                for name in timed_prompt}
  stats = collected["spec"][1].summary()

  isolated = {name[len("isolated/"):]: sec for name, sec in secs.items()
              if name.startswith("isolated/")}
  per_call = per_call_seconds(isolated, opts.gamma_calls)
  gamma = {**gamma_summary(per_call, k),
           "batch": batch, "context_len": context_len, "cache_len": cache_len,
           "calls": opts.gamma_calls, "repeats": opts.repeats,
           # what the shorter loop took beyond its calls: the start-up a loop's mean would
           # have charged to them
           "loop_start_s": {name: float(np.median(isolated[f"{name}/x1"]))
                            - opts.gamma_calls * sec for name, sec in per_call.items()}}
  curve = verify_cost_curve(target_cfg, target_params, batch, context_len, k + 1,
                            cache_len=cache_len, calls=opts.gamma_calls, seed=opts.seed)
  tau, g = stats["tau"], gamma["gamma"]
  ideal = tau / (1 + k * g)
  ideal_cc = cost_curve_ideal(tau, gamma["target_one_token_s"], gamma["verify_s"],
                              gamma["draft_step_s"], k)
  measured = tps["spec"] / tps["ar"]
  measured_dec = (decode_tps["spec"] / decode_tps["ar"]
                  if decode_tps["spec"] and decode_tps["ar"] else None)
  rows = len(new["spec"])
  rounds = stats["verify_calls"] / rows  # mean rounds per row; the loop runs the longest
  rounds_max = _rounds_of_longest_rows(outs["spec"])
  ar_steps = _rounds_of_longest_rows(outs["ar"])
  # what the isolated calls predict, relative to the engine's own AR step
  round_s = gamma["draft_window_s"] + gamma["verify_s"]
  ar_step_engine_s = (med["ar"] - med["ar/prompt"]) / ar_steps  # without the prompt pass
  extra = {}
  if opts.tree:
    tstats = collected["tree"][1].summary()
    extra["tree"] = {
        "shape": opts.tree, "tokens_per_s": tps["tree"], "seconds": secs["tree"],
        "tau": tstats["tau"], "verify_calls": tstats["verify_calls"],
        "alpha_by_depth": tstats["alpha"], "greedy_identical": new["ar"] == new["tree"],
        "speedup_vs_ar": tps["tree"] / tps["ar"], "speedup_vs_chain": tps["tree"] / tps["spec"]}
  if opts.whole_batch:
    extra["whole_batch"] = {
        "ar_tokens_per_s": tps["ar/whole"], "spec_tokens_per_s": tps["spec/whole"],
        "compaction_speedup_ar": tps["ar"] / tps["ar/whole"],
        "compaction_speedup_spec": tps["spec"] / tps["spec/whole"],
        "greedy_identical": new["ar/whole"] == new["ar"] and new["spec/whole"] == new["spec"]}
  return {**extra,
      "batch": batch, "num_prompts": rows, "prompt_len": prompt_len, "new_tokens": n_new["spec"],
      "ar_tokens_per_s": tps["ar"], "spec_tokens_per_s": tps["spec"],
      "ar_seconds": secs["ar"], "spec_seconds": secs["spec"],
      "compile_and_first_run_s": {name: compile_s[name] for name in engines},
      "greedy_identical": new["ar"] == new["spec"],
      "tau": tau, "tau_analytic": stats["tau_analytic"], "tau_per_prompt_mean":
      stats["tau_per_prompt_mean"], "alpha": stats["alpha"],
      "alpha_expected": stats["alpha_expected"], "verify_calls": stats["verify_calls"],
      "rounds_longest_row": rounds_max,
      "gamma": g, "gamma_detail": gamma,
      "ideal_speedup": ideal, "measured_speedup": measured,
      "measured_over_ideal": measured / ideal,
      "ideal_cost_curve_speedup": ideal_cc, "measured_over_ideal_cost_curve": measured / ideal_cc,
      # without the prompt passes, which the ideals (decode-phase formulas) do not price
      "prompt_pass_s": {name: med[f"{name}/prompt"] for name in timed_prompt},
      # active row-rounds / computed row-rounds (finished rows leave the batch by halves)
      "batch_utilization": {name: st.summary()["batch_utilization"]
                            for name, (_, st) in collected.items()},
      "ar_decode_tokens_per_s": decode_tps["ar"], "spec_decode_tokens_per_s": decode_tps["spec"],
      "measured_decode_speedup": measured_dec,
      "measured_decode_over_ideal_cost_curve":
          measured_dec / ideal_cc if measured_dec is not None else None,
      # the same ratios round by round (the noise of the machine; the above are of medians)
      "measured_over_ideal_cost_curve_per_round": ratio_per_round(
          secs, paired_call_seconds(isolated, opts.gamma_calls), tau, k,
          {name: n_new[name] for name in ("ar", "spec")}),
      "verify_cost_curve": curve,
      # every timed run, round by round (engines, prompt passes, isolated loops): the raw data
      "timings_s": {name: [float(x) for x in sec] for name, sec in secs.items()},
      # an AR step's weight traffic: on a bandwidth-bound device, how close it runs to the peak
      "ar_step_bandwidth": timing.bandwidth_summary(
          decode_weights.weight_bytes_per_step(target_cfg, target_params),
          {"engine": ar_step_engine_s,
           "isolated": gamma["target_one_token_s"]}, opts.peak_gbs),
      "breakdown": {  # engine times without the prompt pass
          "ar_step_in_engine_s": ar_step_engine_s,
          "ar_step_isolated_s": gamma["target_one_token_s"],
          "spec_round_in_engine_s": (med["spec"] - med["spec/prompt"]) / rounds_max,
          "spec_round_isolated_s": round_s,
          # the window call and the verification back to back in one loop
          "spec_round_isolated_one_loop_s": per_call["round"],
          # the loop runs until its longest row is done: tokens per round of the batch
          "tau_effective_longest_row": ar_steps / rounds_max,
          "predicted_speedup_from_isolated_calls":
              ar_steps / rounds_max * gamma["target_one_token_s"] / round_s,
          "rounds_mean_per_row": rounds},
  }


def run_benchmark(target_cfg, target_params, drafter: Drafter, draft_params,
                  opts: BenchOptions, pair: str, description: str,
                  prompt_sets: dict[str, list[list[int]]] | None = None,
                  eos_ids: tuple = ()) -> dict:
  """Everything for every prompt set (``{name: token-id prompts}``; None: random prompts) and
  batch size; the load average is recorded before and after."""
  if opts.window < 1 or opts.repeats < 1 or opts.max_new_tokens < 2:
    raise UserError("need window >= 1, repeats >= 1, max_new_tokens >= 2")
  if opts.tree:
    tree.TreeShape.parse(opts.tree)
  target_params, draft_params = engine.decoding_pair(target_params, draft_params)
  result = {"pair": pair, "pair_description": description, "options": dataclasses.asdict(opts),
            "temperature": 0.0, "machine": timing.machine_info(),
            "target": dataclasses.asdict(target_cfg), "drafter": type(drafter).__name__,
            "eos_ids": list(eos_ids), "results": []}
  for name, prompts in (prompt_sets or {"random": None}).items():
    for batch in opts.batch_sizes:
      r = bench_batch(target_cfg, target_params, drafter, draft_params, batch, opts, prompts,
                      eos_ids)
      result["results"].append({"prompts": name, **r})
  result["load_avg_end_1_5_15"] = list(os.getloadavg())
  return result


# ----------------------------------------------------------------------------- main


def benchmark(kind: str, opts: BenchOptions, target: str = "", drafter: str = "none",
              dtype: str = "float32", spec: pairs.SyntheticSpec = pairs.SyntheticSpec(),
              save_pair: str = "", output_json: str = "") -> dict:
  """The whole benchmark of ``kind`` "hf" (``target``/``drafter`` directories) or "synthetic"
  (``spec``); prints the table, optionally writes the pair and the JSON."""
  prompt_sets, eos_ids = None, ()
  if kind == "hf":
    if not target or drafter.lower() == "none":
      raise UserError("--pair=hf needs --target and --drafter")
    p = pairs.load_pair(target, drafter, dtype)
    if opts.benchmarks:  # the evaluation's prompt sets, under the target's chat template
      tok = tokenizer_lib.load(gguf_convert.resolve(target))
      prompt_sets = benchmarks.prompt_sets(opts.benchmarks, tok, opts.num_prompts,
                                           opts.prompt_len)
      eos_ids = () if tok.eos_id is None else (tok.eos_id,)
  else:
    if opts.benchmarks:
      raise UserError("--benchmarks needs --pair=hf (a target with a chat template)")
    p = pairs.synthetic_pair(spec)
    if save_pair:
      paths = pairs.save_pair(p, save_pair, overwrite=True)
      print(f"saved the pair to {paths}", file=sys.stderr)
  result = run_benchmark(p.target_cfg, p.target_params, p.drafter, p.draft_params, opts, kind,
                         p.description, prompt_sets, eos_ids)
  return cli.emit(result, "ppow_jax.bench.decode", format_table(result), output_json)


def run(argv) -> dict:
  opts = BenchOptions(batch_sizes=tuple(cli.int_list_flag("batch_sizes")), window=FLAGS.window,
                      max_new_tokens=FLAGS.max_new_tokens, prompt_len=FLAGS.prompt_len,
                      repeats=FLAGS.repeats, gamma_calls=FLAGS.gamma_calls, seed=FLAGS.seed,
                      tree=FLAGS.tree or "", benchmarks=FLAGS.benchmarks,
                      num_prompts=FLAGS.num_prompts, whole_batch=FLAGS.whole_batch,
                      peak_gbs=FLAGS.peak_gbs)
  spec = pairs.SyntheticSpec(
      num_layers=FLAGS.synthetic_layers, hidden_size=FLAGS.synthetic_hidden,
      intermediate_size=FLAGS.synthetic_intermediate, vocab_size=FLAGS.synthetic_vocab,
      residual_scale=FLAGS.synthetic_residual_scale, seed=FLAGS.seed, dtype=FLAGS.dtype)
  return benchmark(FLAGS.pair or ("hf" if FLAGS.target else "synthetic"), opts, FLAGS.target,
                   FLAGS.drafter, FLAGS.dtype, spec, FLAGS.save_pair, FLAGS.output_json)


if __name__ == "__main__":
  define_flags()
  cli.run_main(run)
