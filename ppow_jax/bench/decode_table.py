"""The text table that ``ppow_jax.bench.decode`` prints from its result (the JSON's fields)."""

from __future__ import annotations


def _fmt(value, spec: str) -> str:
  return "n/a" if value is None else spec.format(value)


def format_table(result: dict) -> str:
  rows = [("prompts", "batch", "AR tok/s", "spec tok/s", "τ", "τ_an", "γ", "τ/(1+Kγ)",
           "ideal_cc", "measured", "meas/ideal", "meas/ideal_cc", "decode", "dec/ideal_cc",
           "same")]
  for r in result["results"]:
    rows.append((r["prompts"], str(r["batch"]), f"{r['ar_tokens_per_s']:.1f}",
                 f"{r['spec_tokens_per_s']:.1f}",
                 f"{r['tau']:.2f}", f"{r['tau_analytic']:.2f}", f"{r['gamma']:.3f}",
                 f"{r['ideal_speedup']:.2f}x", f"{r['ideal_cost_curve_speedup']:.2f}x",
                 f"{r['measured_speedup']:.2f}x", f"{r['measured_over_ideal']:.2f}",
                 f"{r['measured_over_ideal_cost_curve']:.2f}",
                 _fmt(r["measured_decode_speedup"], "{:.2f}x"),
                 _fmt(r["measured_decode_over_ideal_cost_curve"], "{:.2f}"),
                 str(r["greedy_identical"])))
  widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
  lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in rows]
  for r in result["results"]:
    g = r["gamma_detail"]
    lines.append(f"{r['prompts']}, batch {r['batch']}: α by position {r['alpha']}")
    lines.append(f"  drafter step {g['draft_step_s'] * 1e3:.3f} ms (window call "
                 f"{g['draft_window_s'] * 1e3:.3f} ms, 1-token call {g['draft_one_s'] * 1e3:.3f} "
                 f"ms); verify(K+1) {g['verify_s'] * 1e3:.3f} ms; target 1-token "
                 f"{g['target_one_token_s'] * 1e3:.3f} ms (marginal, per call); a loop's "
                 f"start-up {g['loop_start_s']['target_one'] * 1e3:.2f} ms (one-token loop)")
    lines.append("  verify cost curve (tokens: ms, ×1-token): " + ", ".join(
        f"{c['tokens']}: {c['seconds'] * 1e3:.3f} ({c['ratio']:.2f}x)"
        for c in r["verify_cost_curve"]))
    lines.append("  prompt pass " + ", ".join(
        f"{name} {sec * 1e3:.1f} ms" for name, sec in r["prompt_pass_s"].items()) +
        "; without it AR " + _fmt(r["ar_decode_tokens_per_s"], "{:.1f}") + " tok/s, spec " +
        _fmt(r["spec_decode_tokens_per_s"], "{:.1f}") + " tok/s")
    spread = r["measured_over_ideal_cost_curve_per_round"]
    lines.append("  measured ÷ ideal_cc round by round (min–max): " + ", ".join(
        f"{name} {min(v):.2f}–{max(v):.2f} ({len(v)} rounds)" if v else f"{name} n/a"
        for name, v in spread.items()))
    b = r["breakdown"]
    lines.append(f"  engine AR step {b['ar_step_in_engine_s'] * 1e3:.3f} ms vs isolated "
                 f"{b['ar_step_isolated_s'] * 1e3:.3f} ms; engine round "
                 f"{b['spec_round_in_engine_s'] * 1e3:.3f} ms vs isolated draft+verify "
                 f"{b['spec_round_isolated_s'] * 1e3:.3f} ms apart, "
                 f"{b['spec_round_isolated_one_loop_s'] * 1e3:.3f} ms in one loop; speedup "
                 f"predicted by isolated calls {b['predicted_speedup_from_isolated_calls']:.2f}x")
    bw = r["ar_step_bandwidth"]
    lines.append(f"  AR step: {bw['weight_bytes_per_step'] / 1e6:.1f} MB of weights, "
                 + _fmt(bw["engine_gbs"], "{:.1f}") + " GB/s in the engine, "
                 + _fmt(bw["isolated_gbs"], "{:.1f}") + " GB/s isolated"
                 + ("" if not bw["peak_gbs"] else
                    "; " + _fmt(bw["engine_over_bandwidth_time"], "{:.2f}")
                    + f"x the time at {bw['peak_gbs']:.0f} GB/s"))
    if "whole_batch" in r:
      w = r["whole_batch"]
      lines.append(f"  without compaction AR {w['ar_tokens_per_s']:.1f} tok/s, spec "
                   f"{w['spec_tokens_per_s']:.1f} tok/s: compaction {w['compaction_speedup_ar']:.2f}x"
                   f" AR, {w['compaction_speedup_spec']:.2f}x spec (utilization "
                   f"{r['batch_utilization']['ar']:.2f} AR, {r['batch_utilization']['spec']:.2f} "
                   f"spec), same {w['greedy_identical']}")
    if "tree" in r:
      t = r["tree"]
      lines.append(f"  tree {t['shape']}: {t['tokens_per_s']:.1f} tok/s, τ {t['tau']:.2f}, "
                   f"{t['speedup_vs_ar']:.2f}x AR, {t['speedup_vs_chain']:.2f}x chain, same "
                   f"{t['greedy_identical']}")
  m = result["machine"]
  lines.append(f"pair: {result['pair']}; machine: {m['cpu']} ({m['cpu_count']} cores), load "
               f"{m['load_average'][0]:.2f} -> {result['load_avg_end_1_5_15'][0]:.2f}")
  return "\n".join(lines)
