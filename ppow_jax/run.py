"""The whole mission as one library call: data, target, drafters, evaluation, report.

Resume order (big_vision's): a stage whose export exists is skipped; a stage with checkpoints
resumes from them; otherwise it starts from its initialisation (PPOW and the continued
control start from the baseline drafter).
"""

from __future__ import annotations

import json
import os

from absl import logging
import jax

from ppow_jax import (config_lib, datasets, drafter_stages, evaluate, parallel, pretrain,
                      report)
from ppow_jax.errors import UserError


def _measure_gamma(c, target_cfg, target_params, drafter, params) -> float:
  if c.ppow.gamma >= 0:
    return float(c.ppow.gamma)
  from ppow_jax.bench import decode as bench_decode  # deferred: only when measuring
  g = bench_decode.measure_gamma(target_cfg, target_params, drafter, params, c.ppow.window,
                                 1, c.eval.prompt_len)
  logging.info("measured gamma %.4f on %s", g["gamma"], jax.devices()[0].device_kind)
  return float(g["gamma"])


def run(c, workdir: str) -> str:
  """Runs the configured stages into ``workdir``; returns the report path (or workdir)."""
  config_lib.validate(c)
  config_lib.check_runnable(c)
  stages = config_lib.stages(c)
  os.makedirs(workdir, exist_ok=True)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(c.to_json_best_effort(indent=1))
  print(f"[data] {c.data.corpus or c.data.conversations or c.data.tfds_name}", flush=True)
  data = datasets.load(c, workdir)
  print(f"[data] {data.description}: {len(data.train)} train / {len(data.heldout)} held-out "
        f"documents; vocab {data.tokenizer.vocab_size}", flush=True)
  devices = jax.devices() if c.mesh.num_devices < 0 else jax.devices()[:c.mesh.num_devices]
  par = parallel.Parallel.from_config(c, devices)
  target_cfg, target_params, target_info = pretrain.get_target(c, workdir, data,
                                                               "target" in stages, par)
  target_params = par.place_target(target_cfg, target_params)
  data = datasets.regenerate(c, data, target_cfg, target_params, workdir=workdir)
  drafter, init = drafter_stages.build_drafter(c, target_cfg, data, target_params)
  training = {}
  drafter_names = []

  base_dir = os.path.join(workdir, "drafters", "baseline")
  if "baseline" in stages:
    init, training["baseline"] = drafter_stages.run_stage(
        c, workdir, "baseline", target_cfg, target_params, drafter, init, data, 0.0, par)
  elif os.path.isdir(base_dir):
    drafter, init = drafter_stages.load_exported(base_dir, target_cfg)
  if os.path.isdir(base_dir) or "baseline" in stages:
    drafter_names.append("baseline")
  gamma = _measure_gamma(c, target_cfg, target_params, drafter, init)
  for name in ("ppow", "continued"):
    if name == "continued" and not c.continued.enabled:
      continue
    if name in stages:
      _, training[name] = drafter_stages.run_stage(c, workdir, name, target_cfg, target_params,
                                                   drafter, init, data, gamma, par)
    if os.path.isdir(os.path.join(workdir, "drafters", name)):
      drafter_names.append(name)

  if "eval" not in stages:
    return workdir
  if not drafter_names:
    raise UserError(f"{workdir}: no trained drafter to evaluate (run the drafter stages)")
  evaluated = {n: drafter_stages.load_exported(os.path.join(workdir, "drafters", n), target_cfg)
               for n in drafter_names}
  for n in drafter_names:
    info_path = os.path.join(workdir, "drafters", n, "ppow_stage_info.json")
    if n not in training and os.path.isfile(info_path):
      with open(info_path) as f:
        training[n] = json.load(f)
  prompts = datasets.eval_prompts(c, data)
  eos = (data.tokenizer.eos_id,) if (c.eval.eos and data.tokenizer.eos_id is not None) else ()
  rows = evaluate.evaluate(target_cfg, target_params, evaluated, prompts, c.eval.temperatures,
                           c.eval.batch_sizes, c.eval.window, c.eval.max_new_tokens,
                           c.eval.repeats, eos, c.seed)
  protocol = {"tau": "sum committed / sum verification calls, bonus token included",
              "speedup": f"tokens/s vs AR, median of {c.eval.repeats} interleaved runs",
              "window": c.eval.window, "max_new_tokens": c.eval.max_new_tokens,
              "num_prompts": len(prompts), "temperatures": list(c.eval.temperatures),
              "batch_sizes": list(c.eval.batch_sizes), "gamma": gamma,
              "prompts": c.eval.prompts_file or "held-out split"}
  if jax.process_index() != 0:
    return workdir
  path = report.write(workdir, protocol, evaluate.hardware(), target_info, rows, training)
  print(f"[report] {path}", flush=True)
  return path
