r"""The PPOW study: seeds, the paper's ablations and group sizes, each against the budget-matched
continued control, all from one baseline drafter, evaluated side by side (docs/protocol.md).

  python -m ppow_jax.study --config=configs/default.py --workdir=W --seeds=0,1,2 \
      --arms=ppow,no_rdist,no_adaw,no_rdist_no_adaw,no_rspeed,G2,G8,G16,prox_eps=20

Layout of ``W``:
  base/                  the main job's workdir up to its baseline drafter (run here, unless
                         ``--base`` names an existing workdir of the same config whose
                         baseline is done)
  runs/<arm>-s<seed>/    one main-job workdir per arm and seed: the base's finished artifacts
                         (target, tokenizer, prepared data, cache, baseline drafter) are links,
                         so every run starts from the same drafter on the same data; arm
                         ``ppow`` also trains the continued control of its seed (the same
                         batches in the same order, the same number of updates)
  study.json  study.md  study_tau.png

A run is ``run.run`` with ``ppow.seed`` = its seed and the arm's PPOW settings; rerunning the
command resumes (finished runs are skipped; settings that differ from a run's record stop it).
The evaluation decodes the baseline and every trained drafter on the same prompts at the
config's K and temperatures, in the largest batches that leave no prompt out, untimed (``eval.repeats = 0``: τ and
α̂ do not depend on timing) unless ``--timed`` (then the config's batch sizes and repeats).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import re

from absl import flags
import numpy as np

from ppow_jax import cli, layout
from ppow_jax.errors import UserError

FLAGS = flags.FLAGS

# arm -> (what it is, its PPOW settings); "G<n>" arms set the group size
ARMS = {
    "ppow": ("PPOW as configured (the paper's rewards and ADAW)", {}),
    "no_rdist": ("without the proximity reward", {"use_prox": False}),
    "no_adaw": ("without ADAW (uniform window starts)", {"selection": "uniform"}),
    "no_rdist_no_adaw": ("without both", {"use_prox": False, "selection": "uniform"}),
    "no_rspeed": ("without the speed reward", {"use_speed": False}),
}
CONTROL = "continued"
SHARED = ("target", "tokenizer", "tfds", "cache")  # base artifacts every run links to


def define_flags() -> None:
  cli.define_config_flag()
  flags.DEFINE_string("workdir", None, "The study's directory (runs, study.json/md/png).")
  flags.DEFINE_list("seeds", ["0", "1", "2"], "PPOW seeds (ppow.seed) of every arm.")
  flags.DEFINE_list("arms", ["ppow", "no_rdist", "no_adaw", "no_rdist_no_adaw", "no_rspeed",
                             "G2", "G8", "G16"],
                    f"Arms: {', '.join(ARMS)}, G<n> (group size n), or KEY=VALUE[+KEY=VALUE] "
                    "(ppow.* settings); ppow is always run.")
  flags.DEFINE_string("base", None, "An existing workdir of this config whose baseline is done "
                      "(default: <workdir>/base, trained here).")
  flags.DEFINE_bool("timed", False, "Evaluate with the config's batch sizes and timed repeats "
                    "(speedups) instead of τ and α̂ from one batched run.")


def arm_settings(arm: str, ppow) -> dict:
  """The PPOW settings of an arm: a named one, ``G<n>`` (group size n), or ``KEY=VALUE`` pairs
  of ``ppow.*`` joined by ``+`` (``prox_eps=20+prox_eta=0.5``), typed like the config's values
  (``ppow``: the config's PPOW node). UserError for anything else."""
  if arm in ARMS:
    return dict(ARMS[arm][1])
  match = re.fullmatch(r"G(\d+)", arm)
  if match and int(match.group(1)) >= 2:
    return {"group_size": int(match.group(1))}
  if "=" in arm:
    node, out = copy.deepcopy(ppow), {}
    for pair in arm.split("+"):
      key, _, raw = pair.partition("=")
      if key == "seed" or "." in key:
        raise UserError(f"--arms: {arm!r}: {key!r} is not a PPOW setting an arm may change")
      try:
        cli.override(node, key, raw)
      except UserError as e:
        raise UserError(f"--arms: {arm!r}: {str(e).replace('--config.', 'ppow.')}") from None
      out[key] = node[key]
    return out
  raise UserError(f"--arms: unknown arm {arm!r}; expected some of {', '.join(ARMS)}, G<n> "
                  f"(a group size n >= 2) or KEY=VALUE[+KEY=VALUE] (ppow settings)")


@dataclasses.dataclass(frozen=True)
class Run:
  arm: str
  seed: int
  settings: dict  # ppow.* overrides
  stages: str  # "ppow,continued" for the ppow arm (its seed's control), else "ppow"

  @property
  def name(self) -> str:
    return f"{self.arm}-s{self.seed}"


def plan(arms: list[str], seeds: list[int], ppow: dict) -> list[Run]:
  """Every (arm, seed), ``ppow`` first; an arm whose settings are the config's own (``ppow``:
  the config's PPOW node), e.g. ``G4`` when the group size is 4, is the ppow arm: dropped."""
  if not seeds or any(s < 0 for s in seeds) or len(set(seeds)) < len(seeds):
    raise UserError(f"--seeds: {seeds}: give distinct seeds >= 0")
  runs, seen = [], set()
  for arm in ["ppow"] + [a for a in arms if a != "ppow"]:
    changes = {k: v for k, v in arm_settings(arm, ppow).items() if ppow[k] != v}
    key = tuple(sorted(changes.items()))
    if key in seen:
      continue
    seen.add(key)
    stages = "ppow,continued" if arm == "ppow" else "ppow"
    runs += [Run(arm, s, changes, stages) for s in seeds]
  return runs


def run_config(c, one: Run):
  """The config of one run: ``c`` with the run's stages, seed and PPOW settings."""
  rc = copy.deepcopy(c)
  rc.stages = one.stages
  rc.ppow.seed = one.seed
  for key, value in one.settings.items():
    rc.ppow[key] = value
  return rc


def link_base(base: layout.Layout, target: layout.Layout) -> None:
  """Links the base's finished artifacts (and its baseline drafter) into a run's workdir."""
  target.prepare()
  for name in SHARED:
    src, dst = base.path(name), target.path(name)
    if os.path.exists(src) and not os.path.lexists(dst):
      os.symlink(os.path.abspath(src), dst)
  dst = target.export("baseline")
  if not os.path.lexists(dst):
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    os.symlink(os.path.abspath(base.export("baseline")), dst)


def _label(arm: str, seed: int) -> str:
  return f"{arm}@s{seed}"


def summarize(rows: list[dict], arms: list[str], seeds: list[int]) -> list[dict]:
  """Per (benchmark, temperature) and arm: τ per seed, its mean and std, α̂₀'s mean, and each
  seed's τ over the continued control's of the same seed (and the ratio of the means)."""
  by = {(r["benchmark"], r["temperature"], r["drafter"]): r for r in rows
        if r.get("drafting", "chain") == "chain"}
  out = []
  for bench, temp in dict.fromkeys((r["benchmark"], r["temperature"]) for r in rows):
    control = [by[bench, temp, _label(CONTROL, s)]["tau"] for s in seeds]
    for arm in ["baseline", CONTROL] + list(arms):
      names = ["baseline"] if arm == "baseline" else [_label(arm, s) for s in seeds]
      got = [by[bench, temp, n] for n in names if (bench, temp, n) in by]
      if not got:
        continue
      taus = [g["tau"] for g in got]
      row = {"benchmark": bench, "temperature": temp, "arm": arm, "tau_per_seed": taus,
             "tau_mean": float(np.mean(taus)),
             "tau_std": float(np.std(taus, ddof=1)) if len(taus) > 1 else 0.0,
             "alpha0_mean": float(np.mean([g["alpha"][0] if g["alpha"] else 0.0 for g in got]))}
      if arm not in ("baseline", CONTROL):
        row["over_control_per_seed"] = [t / c for t, c in zip(taus, control)]
        row["over_control_of_means"] = float(np.mean(taus) / np.mean(control))
      out.append(row)
  return out


def markdown(summary: list[dict]) -> str:
  fmt = lambda xs: ", ".join(f"{x:.3f}" for x in xs) if xs else "–"
  lines = ["| prompts | T | arm | τ mean ± std | τ per seed | ÷ control, per seed | "
           "÷ control, of means | α̂₀ mean |", "|---|---|---|---|---|---|---|---|"]
  for r in summary:
    of_means = r.get("over_control_of_means")
    lines.append(
        f"| {r['benchmark']} | {r['temperature']:g} | {r['arm']} | {r['tau_mean']:.3f} ± "
        f"{r['tau_std']:.3f} | {fmt(r['tau_per_seed'])} | "
        f"{fmt(r.get('over_control_per_seed'))} | "
        f"{'–' if of_means is None else f'{of_means:.3f}'} | {r['alpha0_mean']:.2f} |")
  return "\n".join(lines) + "\n"


def plot(summary: list[dict], path: str) -> None:
  """Mean τ per arm (one panel per temperature) with each seed as a dot."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  shown = "mean" if any(r["benchmark"] == "mean" for r in summary) else summary[0]["benchmark"]
  temps = sorted({r["temperature"] for r in summary})
  fig, axes = plt.subplots(1, len(temps), figsize=(4.5 * len(temps), 3.5), squeeze=False)
  for ax, temp in zip(axes[0], temps):
    rows = [r for r in summary if r["benchmark"] == shown and r["temperature"] == temp]
    x = np.arange(len(rows))
    ax.bar(x, [r["tau_mean"] for r in rows], color="lightsteelblue")
    for i, r in enumerate(rows):
      ax.plot([i] * len(r["tau_per_seed"]), r["tau_per_seed"], "k.")
    ax.set_xticks(x, [r["arm"] for r in rows], rotation=40, ha="right", fontsize=8)
    low = min(min(r["tau_per_seed"]) for r in rows)
    ax.set_ylim(max(1.0, low - 0.1), None)
    ax.set_title(f"{shown}, T={temp:g}")
    ax.set_ylabel("τ")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def study(c, workdir: str, arms: list[str], seeds: list[int], base_dir: str | None,
          timed: bool) -> dict:
  """Trains what is missing, evaluates everything, writes study.json / .md / _tau.png."""
  from ppow_jax import datasets, drafters, evaluate, run, settings, timing  # pylint: disable=g-import-not-at-top
  runs = plan(arms, seeds, c.ppow)
  arm_names = list(dict.fromkeys(r.arm for r in runs))
  settings.validate(c)
  root = layout.Layout(workdir)
  root.prepare()
  with root.lock():
    base = layout.Layout(base_dir or root.path("base"))
    if base_dir is None:
      bc = copy.deepcopy(c)
      bc.stages = ",".join(s for s in ("target", "baseline") if s in c.stages.split(","))
      print(f"[study] base: {bc.stages} -> {base.root}", flush=True)
      run.run(bc, base.root)
    if not base.done("baseline"):
      raise UserError(f"--base {base.root}: its baseline drafter is not done "
                      f"({base.info('baseline')} is missing)")
    base.check_settings(c, ("target", "baseline"))
    for i, r in enumerate(runs):
      paths = layout.Layout(root.path("runs", r.name))
      print(f"[study] run {i + 1}/{len(runs)}: {r.name} ({r.stages}) -> {paths.root}",
            flush=True)
      link_base(base, paths)
      run.run(run_config(c, r), paths.root)

    ec = copy.deepcopy(c)
    ec.eval.tree = ()
    par = run.mesh(ec)
    data, target_cfg, target_params, _ = run.data_and_target(ec, base, par, False)
    prompt_sets = datasets.eval_prompt_sets(ec, data)
    if not timed:
      ec.eval.repeats = 0
      # the largest batch that splits every set into full batches (no prompt left out)
      ec.eval.batch_sizes = (math.gcd(*(len(p) for p in prompt_sets.values())),)
    exports = {"baseline": base.export("baseline")}
    training = {}
    for r in runs:
      paths = layout.Layout(root.path("runs", r.name))
      for stage in r.stages.split(","):
        arm = CONTROL if stage == CONTROL else r.arm
        exports[_label(arm, r.seed)] = paths.export(stage)
        info = paths.read_info(stage) or {}
        training[_label(arm, r.seed)] = {k: v for k, v in info.items() if k != "settings"}
    loaded = {name: drafters.load(path, target_cfg) for name, path in exports.items()}
    rows = evaluate.evaluate_sets(ec, target_cfg, target_params, loaded, prompt_sets,
                                  data.tokenizer.eos_id)
    summary = summarize(rows, arm_names, seeds)
    result = {"arms": {r.arm: ARMS[r.arm][0] if r.arm in ARMS else f"ppow: {r.settings}"
                       for r in runs},
              "seeds": seeds, "base": base.root, "timed": timed,
              "window": settings.eval_window(ec), "max_new_tokens": ec.eval.max_new_tokens,
              "temperatures": list(ec.eval.temperatures), "machine": timing.machine_info(),
              "summary": summary, "rows": rows, "training": training,
              "config": json.loads(c.to_json_best_effort())}
    cli.write_json(root.path("study.json"), result)
    plot(summary, root.path("study_tau.png"))
    text = markdown(summary)
    cli.write_text(root.path("study.md"), "# PPOW study\n\n" + text +
                   "\n![τ per arm](study_tau.png)\n")
    print(text, flush=True)
    return result


def main(argv: list[str]) -> dict:
  if not FLAGS.workdir:
    raise UserError("--workdir is required (the study's directory)")
  c = cli.config_from_flags()
  try:
    seeds = [int(s) for s in FLAGS.seeds]
  except ValueError:
    raise UserError(f"--seeds: {FLAGS.seeds}: give integers, e.g. --seeds=0,1,2") from None
  plan(FLAGS.arms, seeds, c.ppow)  # bad arms or seeds fail before JAX starts
  return study(c, FLAGS.workdir, FLAGS.arms, seeds, FLAGS.base, FLAGS.timed)


if __name__ == "__main__":
  define_flags()
  cli.run_main(main)
