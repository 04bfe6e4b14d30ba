"""The run's report: ``report.json`` (for tools), ``report.md`` (for people) and PNG plots."""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from ppow_jax import cli, layout


def _table(rows: list[dict]) -> str:
  head = ("| prompts | T | batch | drafter | τ | τ analytic | α̂ by position | tokens/s | "
          "speedup | greedy = AR |\n|---|---|---|---|---|---|---|---|---|---|\n")
  lines = []
  for r in rows:
    alpha = ", ".join(f"{a:.2f}" for a in r.get("alpha", [])) or "–"
    same = r.get("greedy_matches_ar")
    lines.append(
        f"| {r.get('benchmark', '–')} | {r['temperature']:g} | {r['batch_size']} | "
        f"{r['drafter']} | {r['tau']:.3f} | "
        f"{r['tau_analytic']:.3f} | {alpha} | {r['tokens_per_s']:.1f} | "
        f"{r['speedup']:.2f}× | {'–' if same is None else ('yes' if same else 'NO')} |")
  return head + "\n".join(lines) + "\n"


def _read_jsonl(path: str) -> list[dict]:
  if not os.path.isfile(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


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
    names = list(dict.fromkeys(r["drafter"] for r in spec))
    width = 0.8 / len(temps)
    for i, t in enumerate(temps):
      vals = [next((r["tau"] for r in spec if r["drafter"] == n and r["temperature"] == t), 0)
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
                label=f"{r['drafter']} T={r['temperature']:g}")
    ax.set_xlabel("draft position")
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
         _table(rows), ""]
  for name, info in training.items():  # the settings are in report.json
    md.append(f"- {name}: {json.dumps({k: v for k, v in info.items() if k != 'settings'})}")
  md += [""] + [f"![{os.path.basename(p)}]({os.path.basename(p)})" for p in plots]
  cli.write_text(paths.report_md, "\n".join(md) + "\n")
  return paths.report_md
