"""The main job as one library call: data, target, drafters, evaluation, report.

The stages and their order are ``stages.TABLE``; every path is ``layout.Layout``'s. Resume
order (big_vision's): a stage whose export exists is skipped; a stage with checkpoints resumes
from them; otherwise it starts from its initialisation (PPOW and the continued control start
from the baseline drafter). Before any work: every setting is checked, the workdir is locked,
and a stage whose recorded settings differ from the config stops the run (``--retrain``).
"""

from __future__ import annotations

from absl import logging
import jax

from ppow_jax import (datasets, drafter_stages, drafters, engine, evaluate, gamma as gamma_lib,
                      layout, parallel, pretrain, report, settings, sharding, stages, timing)
from ppow_jax.errors import UserError


def mesh(c) -> parallel.Parallel:
  """The run's mesh over ``config.mesh.num_devices`` devices (one that does not fit: UserError)."""
  available = jax.devices()
  if c.mesh.num_devices > len(available):
    raise UserError(f"config.mesh.num_devices={c.mesh.num_devices}: only {len(available)} "
                    f"devices are available")
  chosen = available if c.mesh.num_devices < 0 else available[:c.mesh.num_devices]
  return parallel.Parallel.from_config(c, chosen)


def data_and_target(c, paths: layout.Layout, par: parallel.Parallel, train_target: bool):
  """(data, target config, target params placed on the mesh, target info) of a workdir:
  the target pretrained there when ``train_target``, else loaded (given or pretrained before)."""
  print(f"[data] {c.data.corpus or c.data.conversations or c.data.tfds_name}", flush=True)
  data = datasets.load(c, paths)
  print(f"[data] {data.description}: {len(data.train)} train / {len(data.heldout)} held-out "
        f"documents; vocab {data.tokenizer.vocab_size}", flush=True)
  target_cfg, target_params, target_info = pretrain.get_target(c, paths, data, train_target,
                                                               par)
  return data, target_cfg, par.place_target(target_cfg, target_params), target_info


def _gamma(c, target_cfg, target_params, drafter, params) -> float:
  """The configured γ, or (``ppow.gamma = -1``) the one measured here for the PPOW window."""
  if c.ppow.gamma >= 0:
    return float(c.ppow.gamma)
  # priced as the eval stage decodes: the decoding layout of both models' weights
  target_params, params = engine.decoding_pair(target_params, params)
  g = gamma_lib.measure_gamma(target_cfg, target_params, drafter, params, c.ppow.window, 1,
                              c.eval.prompt_len)["gamma"]
  g = sharding.broadcast_from_primary(g)  # every process trains with process 0's measurement
  logging.info("measured gamma %.4f on %s", g, jax.devices()[0].device_kind)
  return float(g)


def run(c, workdir: str, retrain: tuple[str, ...] = ()) -> str:
  """Runs the configured stages into ``workdir``; returns the report path (or workdir).

  ``retrain``: stages whose checkpoints, export and metrics are discarded first.
  """
  settings.validate(c)
  settings.check_runnable(c)
  bad = [s for s in retrain if s not in stages.NAMES or s == "eval"]
  if bad:
    raise UserError(f"--retrain: unknown stage {bad[0]!r}; expected some of "
                    f"{stages.NAMES[:-1]}")
  par = mesh(c)  # a mesh that does not fit fails here
  paths = layout.Layout(workdir)
  primary = sharding.is_primary()
  if primary:
    paths.prepare()
  with paths.lock(primary):
    with sharding.primary_first("workdir prepared"):  # the others read what it left
      if primary:
        for name in retrain:
          paths.discard(name)
        paths.remove_leftovers()
      paths.check_settings(c, tuple(n for n in stages.NAMES[:-1] if n not in retrain))
    if primary:
      paths.append_history(c)
    return _run(c, paths, par)


def _run(c, paths: layout.Layout, par: parallel.Parallel) -> str:
  chosen = stages.chosen(c)
  logging.info("process %d/%d, mesh: %s", jax.process_index(), jax.process_count(),
               dict(par.mesh.shape))
  data, target_cfg, target_params, target_info = data_and_target(c, paths, par,
                                                                 "target" in chosen)
  data = datasets.regenerate(c, data, target_cfg, target_params, paths=paths)
  drafter, init = drafter_stages.build_drafter(c, target_cfg, data, target_params)
  training = {}
  if "baseline" in chosen:
    init, training["baseline"] = drafter_stages.run_stage(
        c, paths, "baseline", target_cfg, target_params, drafter, init, data, 0.0, par)
  elif paths.done("baseline"):
    drafter, init = drafters.load(paths.export("baseline"), target_cfg)
  gamma = None
  for name in ("ppow", "continued"):
    if name in chosen and name in stages.trained(c):
      if gamma is None:
        gamma = _gamma(c, target_cfg, target_params, drafter, init)
      _, training[name] = drafter_stages.run_stage(c, paths, name, target_cfg, target_params,
                                                   drafter, init, data, gamma, par)

  if "eval" not in chosen:
    return paths.root
  names = [n for n in stages.trained(c) if paths.done(n) or n in training]
  if not names:
    raise UserError(f"{paths.root}: no trained drafter to evaluate (run the drafter stages)")
  evaluated = {n: drafters.load(paths.export(n), target_cfg) for n in names}
  for n in names:
    training.setdefault(n, paths.read_info(n))
  prompt_sets = datasets.eval_prompt_sets(c, data)
  tree_shape = settings.eval_tree(c)
  rows = evaluate.evaluate_sets(c, target_cfg, target_params, evaluated, prompt_sets,
                                data.tokenizer.eos_id)
  ppow_gamma = (training.get("ppow") or {}).get("gamma", c.ppow.gamma)
  protocol = {"tau": "sum committed / sum verification calls, bonus token included",
              "speedup": (f"tokens/s vs AR, median of {c.eval.repeats} interleaved runs"
                          if c.eval.repeats else "not timed (eval.repeats = 0)"),
              "window": settings.eval_window(c), "max_new_tokens": c.eval.max_new_tokens,
              "drafting": ["chain", "tree"] if tree_shape else ["chain"],
              "tree": list(c.eval.tree) if tree_shape else [],
              "num_prompts": {b: len(p) for b, p in prompt_sets.items()},
              "temperatures": list(c.eval.temperatures),
              "batch_sizes": list(c.eval.batch_sizes), "gamma": ppow_gamma,
              "prompts": c.eval.benchmarks or c.eval.prompts_file or "held-out split"}
  if not sharding.is_primary():
    return paths.root
  path = report.write(paths, protocol, timing.machine_info(), target_info, rows, training)
  print(f"[report] {path}", flush=True)
  return path
