"""The unified decoding protocol (docs/protocol.md): every drafter against AR, same prompts/engine.

For each temperature and batch size, AR and every drafter decode the same prompts with the
same compiled engine code; timed repeats are interleaved (AR, drafter 1, drafter 2, ..., then
again: ``timing.interleaved``) so that machine noise hits all of them alike, and speedups use
the median of the repeats. τ counts the bonus token: Σ committed / Σ verification calls over
the whole set. With a tree shape, every drafter is also evaluated with EAGLE-2 tree drafting
(``tree_engine.TreeEngine``) in the same interleaved runs; each row says which drafting made it
(``"drafting": "chain"`` or ``"tree"``; AR's rows are ``"chain"``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
import numpy as np

from ppow_jax import engine, settings, sharding, timing, tree, tree_engine
from ppow_jax.models import llama


def batches(prompts: list[list[int]], batch_size: int, min_length: int):
  """Full batches only (one shape, one compile); a remainder is left out of that batch size."""
  usable = len(prompts) // batch_size * batch_size
  return [engine.pad_prompts(prompts[i:i + batch_size], min_length=min_length)
          for i in range(0, usable, batch_size)]


def _tokens_per_s(tokens: list, times: list) -> Optional[float]:
  """New tokens over the median timed run; None without timed runs (``repeats = 0``)."""
  return sum(len(t) for t in tokens) / float(np.median(times)) if times else None


def decode_all(eng: engine.Engine, tparams, dparams, batches, rng) -> list:
  """Every batch, dispatched back to back (the timed unit)."""
  return [eng.generate(tparams, dparams, p, l, rng) for p, l in batches]


def collect(outs: list) -> tuple[list, Any]:
  """(new tokens per prompt, summed stats) of ``decode_all``'s outputs."""
  tokens, stats = [], None
  for out in outs:
    tokens += out.new_tokens()
    st = sharding.to_host(out.stats)
    stats = st if stats is None else _merge(stats, st)
  return tokens, stats


def _merge(a: engine.Stats, b: engine.Stats) -> engine.Stats:
  """Per-row fields (``*_B``) are concatenated, rows being prompts; the others are sums."""
  merged = {f.name: (np.concatenate([getattr(a, f.name), getattr(b, f.name)])
                     if f.name.endswith("_B") else getattr(a, f.name) + getattr(b, f.name))
            for f in dataclasses.fields(engine.Stats)}
  return engine.Stats(**merged)


def evaluate(target_cfg: llama.ModelConfig, target_params, drafters: dict,
             prompts: list[list[int]], temperatures, batch_sizes, window: int,
             max_new_tokens: int, repeats: int, eos_ids: tuple = (), seed: int = 0,
             log: Optional[Any] = print,
             tree_shape: Optional[tree.TreeShape] = None) -> list[dict]:
  """Rows ``{temperature, drafter, drafting, batch_size, tau, ..., tokens_per_s, speedup}``.

  ``repeats = 0``: τ and α̂ only, from the one untimed run (tokens/s and speedup are None).

  ``drafters`` maps a name to ``(drafter, params)``; "ar" is added automatically. With
  ``tree_shape`` each drafter gets a second row, drafted as that tree.
  """
  min_len = max(len(p) for p in prompts)
  draftings = ("chain", "tree") if tree_shape else ("chain",)
  rows = []
  for temperature in temperatures:
    dcfg = engine.DecodeConfig(window=window, temperature=float(temperature),
                               max_new_tokens=max_new_tokens, eos_ids=tuple(eos_ids))
    for bs in batch_sizes:
      batched = batches(prompts, bs, min_len)
      # drafters of one architecture share an engine, hence one compiled program
      engines = {(None, "chain"): engine.Engine(target_cfg, None, dcfg)}
      runs = {("ar", "chain"): (engines[None, "chain"], None)}
      for drafting in draftings:
        for name, (drafter, params) in drafters.items():
          if (drafter, drafting) not in engines:
            engines[drafter, drafting] = (
                engine.Engine(target_cfg, drafter, dcfg) if drafting == "chain"
                else tree_engine.TreeEngine(target_cfg, drafter, dcfg, tree_shape))
          runs[name, drafting] = (engines[drafter, drafting], params)
      rng = jax.random.PRNGKey(seed)
      timed = timing.interleaved(
          {key: (lambda eng=eng, params=params: decode_all(eng, target_params, params,
                                                          batched, rng))
           for key, (eng, params) in runs.items()}, repeats)
      results = {}
      for key in runs:
        toks, stats = collect(timed.first[key])
        results[key] = {"times": timed.seconds[key], "tokens": toks, "stats": stats}
      ar = results["ar", "chain"]
      ar_tps = _tokens_per_s(ar["tokens"], ar["times"])
      for (name, drafting), res in results.items():
        n_tokens = sum(len(t) for t in res["tokens"])
        tps = _tokens_per_s(res["tokens"], res["times"])
        summary = res["stats"].summary()
        row = {"temperature": float(temperature), "drafter": name, "drafting": drafting,
               "batch_size": bs,
               "window": 0 if name == "ar" else (window if drafting == "chain"
                                                 else tree_shape.depth), **summary,
               "tokens_per_s": tps, "speedup": None if tps is None else tps / ar_tps,
               "seconds_median": float(np.median(res["times"])) if repeats else None,
               "seconds_all": res["times"], "new_tokens": n_tokens,
               "num_prompts": len(res["tokens"])}
        if drafting == "tree":  # α̂ is by depth; the analytic fields are defined for chains
          row["tree"] = [tree_shape.total_tokens, tree_shape.depth, tree_shape.top_k]
          row["tau_analytic"] = None
          row["alpha_expected"] = []
        if name == "ar":
          row["tau"] = row["tau_analytic"] = row["tau_per_prompt_mean"] = 1.0
          row["alpha"] = row["alpha_expected"] = []
        if temperature == 0:
          row["greedy_matches_ar"] = res["tokens"] == ar["tokens"]
        rows.append(row)
        if log:
          speed = f" tokens/s={tps:.1f} speedup={row['speedup']:.2f}x" if repeats else ""
          log(f"[eval] T={temperature} batch={bs} {name:>10} {drafting:>5}: "
              f"tau={row['tau']:.3f}{speed}")
  return rows


def evaluate_sets(c, target_cfg: llama.ModelConfig, target_params, drafters: dict,
                  prompt_sets: dict[str, list[list[int]]], eos_id: Optional[int]) -> list[dict]:
  """``evaluate`` on each prompt set with the settings of ``c.eval`` (rows carry
  ``"benchmark"``), plus the mean over the sets when there are several: the eval stage.
  Rows stop at the tokenizer's ``eos_id`` when ``eval.eos`` is set."""
  eos_ids = (eos_id,) if (c.eval.eos and eos_id is not None) else ()
  # the decoding layout of the weights, made once for every set
  target_params = engine.decoding_params(target_params)
  drafters = {name: (d, engine.decoding_params(p, share_with=target_params))
              for name, (d, p) in drafters.items()}
  rows = []
  for bench, prompts in prompt_sets.items():
    print(f"[eval] {bench}: {len(prompts)} prompts", flush=True)
    rows += [{"benchmark": bench, **row} for row in evaluate(
        target_cfg, target_params, drafters, prompts, c.eval.temperatures, c.eval.batch_sizes,
        settings.eval_window(c), c.eval.max_new_tokens, c.eval.repeats, eos_ids, c.seed,
        tree_shape=settings.eval_tree(c))]
  if len(prompt_sets) > 1:
    rows += mean_rows(rows)
  return rows


def mean_rows(rows: list[dict]) -> list[dict]:
  """Rows ``benchmark="mean"``: per (T, batch, drafter, drafting), the unweighted mean over
  benchmarks of τ, speedup, tokens/s and α̂ by position (the paper's tables average benchmarks
  this way)."""
  groups: dict[tuple, list[dict]] = {}
  for r in rows:
    key = (r["temperature"], r["batch_size"], r["drafter"], r.get("drafting", "chain"))
    groups.setdefault(key, []).append(r)
  out = []
  for (temperature, bs, name, drafting), group in groups.items():
    row = {"benchmark": "mean", "temperature": temperature, "batch_size": bs, "drafter": name,
           "drafting": drafting, "window": group[0]["window"], "num_benchmarks": len(group)}
    if "tree" in group[0]:
      row["tree"] = group[0]["tree"]
    for key in ("tau", "tau_analytic", "speedup", "tokens_per_s"):
      values = [g[key] for g in group]
      row[key] = None if None in values else float(np.mean(values))
    width = min(len(g["alpha"]) for g in group)
    row["alpha"] = [float(np.mean([g["alpha"][i] for g in group])) for i in range(width)]
    if all("greedy_matches_ar" in g for g in group):
      row["greedy_matches_ar"] = all(g["greedy_matches_ar"] for g in group)
    out.append(row)
  return out
