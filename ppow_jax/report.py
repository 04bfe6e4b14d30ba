"""The run's report: ``report.json`` (for tools), ``report.md`` (for people) and PNG plots."""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from ppow_jax import cli, layout


def _num(x, fmt: str = ".3f") -> str:
  return "–" if x is None else format(x, fmt)


def _speedup(x) -> str:
  return "–" if x is None else f"{x:.2f}×"


def _ratio(a, b):
  return None if a is None or b is None else a / b


def _drafting(r: dict) -> str:
  """"chain", or "tree" with its (total_tokens, depth, top_k)."""
  return "tree " + "/".join(map(str, r["tree"])) if "tree" in r else r.get("drafting", "chain")


def table(rows: list[dict]) -> str:
  """The evaluation rows as a Markdown table (report.md's main table)."""
  head = ("| prompts | T | batch | drafter | drafting | τ | τ analytic | "
          "α̂ by position (depth) | tokens/s | speedup | greedy = AR |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|\n")
  lines = []
  for r in rows:
    alpha = ", ".join(f"{a:.2f}" for a in r.get("alpha", [])) or "–"
    same = r.get("greedy_matches_ar")
    lines.append(
        f"| {r.get('benchmark', '–')} | {r['temperature']:g} | {r['batch_size']} | "
        f"{r['drafter']} | {_drafting(r)} | {r['tau']:.3f} | "
        f"{_num(r['tau_analytic'])} | {alpha} | {_num(r['tokens_per_s'], '.1f')} | "
        f"{_speedup(r['speedup'])} | {'–' if same is None else ('yes' if same else 'NO')} |")
  return head + "\n".join(lines) + "\n"


def _chain_vs_tree(rows: list[dict]) -> str:
  """Each drafter's chain and tree rows side by side ("" when no tree was evaluated)."""
  key = lambda r: (r.get("benchmark"), r["temperature"], r["batch_size"], r["drafter"])
  chain = {key(r): r for r in rows if r.get("drafting", "chain") == "chain"}
  lines = []
  for t in rows:
    c = chain.get(key(t)) if t.get("drafting") == "tree" else None
    if c is not None:
      lines.append(
          f"| {t.get('benchmark', '–')} | {t['temperature']:g} | {t['batch_size']} | "
          f"{t['drafter']} | {_drafting(t)} | {c['tau']:.3f} | {t['tau']:.3f} | "
          f"{t['tau'] / c['tau']:.2f} | {_speedup(c['speedup'])} | {_speedup(t['speedup'])} | "
          f"{_num(_ratio(t['tokens_per_s'], c['tokens_per_s']), '.2f')} |")
  if not lines:
    return ""
  return ("| prompts | T | batch | drafter | tree | chain τ | tree τ | tree ÷ chain τ | "
          "chain speedup | tree speedup | tree ÷ chain tokens/s |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|\n" + "\n".join(lines) + "\n")


def _read_jsonl(path: str) -> list[dict]:
  if not os.path.isfile(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def _label(r: dict) -> str:
  return r["drafter"] + (" (tree)" if r.get("drafting") == "tree" else "")


def _plots(paths: layout.Layout, rows: list[dict]) -> list[str]:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  written = []
  # one benchmark's rows (the mean when there are several), at the smallest batch
  shown = "mean" if any(r.get("benchmark") == "mean" for r in rows) else rows[0].get("benchmark")
  spec = [r for r in rows if r["drafter"] != "ar" and r.get("benchmark") == shown
          and r["batch_size"] == min(x["batch_size"] for x in rows)]
  if spec:
    fig, ax = plt.subplots(figsize=(6, 3.5))
    temps = sorted({r["temperature"] for r in spec})
    names = list(dict.fromkeys(_label(r) for r in spec))
    width = 0.8 / len(temps)
    for i, t in enumerate(temps):
      vals = [next((r["tau"] for r in spec if _label(r) == n and r["temperature"] == t), 0)
              for n in names]
      ax.bar(np.arange(len(names)) + i * width, vals, width, label=f"T={t:g}")
    ax.set_xticks(np.arange(len(names)) + width * (len(temps) - 1) / 2, names)
    ax.set_ylabel("τ (tokens per verification)")
    ax.legend()
    ax.set_title("Acceptance length per drafter")
    fig.tight_layout()
    path = paths.path("tau.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for r in spec:
      if r["alpha"]:
        ax.plot(np.arange(1, len(r["alpha"]) + 1), r["alpha"], marker="o",
                label=f"{_label(r)} T={r['temperature']:g}")
    ax.set_xlabel("draft position (tree: depth)")
    ax.set_ylabel("conditional acceptance α̂")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = paths.path("alpha_by_position.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)
  curves = _read_jsonl(paths.metrics("ppow"))
  if curves:
    fig, axes = plt.subplots(1, 2, figsize=(8, 3))
    steps = [m["step"] for m in curves]
    for ax, key in zip(axes, ("tau_sim", "reward")):
      ax.plot(steps, [m.get(key, np.nan) for m in curves])
      ax.set_xlabel("PPOW step")
      ax.set_title(key)
    fig.tight_layout()
    path = paths.path("ppow_training.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)
  return written


def write(paths: layout.Layout, protocol: dict, hardware: dict, target: dict, rows: list[dict],
          training: dict[str, Any]) -> str:
  """report.json, report.md and the plots; ``training``: each stage's info (its counts cover
  every run of the stage, resumed ones included, and its ``settings``)."""
  report = {"protocol": protocol, "hardware": hardware, "target": target, "results": rows,
            "training": training}
  cli.write_json(paths.report_json, report)
  plots = _plots(paths, rows)
  loss = target.get("heldout_loss_nats")
  md = ["# ppow_jax run report", "",
        f"Target: {target.get('source')} ({target.get('params', '?')} parameters)"
        + (f"; held-out loss {loss:.3f} nats." if loss is not None else "."), ""]
  if target.get("sample"):
    md += ["Target sample (greedy):", "", "````", target["sample"], "````", ""]  # may hold ```
  md += [f"Protocol: {json.dumps(protocol)}", "",
         f"Hardware: {hardware.get('device_kind')} × {hardware.get('num_devices')}, "
         f"{hardware.get('cpu_count')} CPUs, load {hardware.get('load_average')}", "",
         table(rows), ""]
  side_by_side = _chain_vs_tree(rows)
  if side_by_side:
    md += ["Chain and tree drafting, side by side (speedups vs AR):", "", side_by_side, ""]
  for name, info in training.items():  # the settings are in report.json
    md.append(f"- {name}: {json.dumps({k: v for k, v in info.items() if k != 'settings'})}")
  md += [""] + [f"![{os.path.basename(p)}]({os.path.basename(p)})" for p in plots]
  cli.write_text(paths.report_md, "\n".join(md) + "\n")
  return paths.report_md
