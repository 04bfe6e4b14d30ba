"""Drafter stages: token-level baseline, PPOW (from the baseline), continued-baseline control.

Each stage checkpoints under ``<workdir>/checkpoints/<stage>`` (and resumes from there), then
exports the drafter to ``<workdir>/drafters/<stage>`` in Hugging Face layout (EAGLE-3 keys,
or a plain LM directory), which ``ppow_jax.generate``, SGLang and vLLM load. What each stage
trains (steps, batch, optimizer, seed) is its row of ``stages.TABLE``.
"""

from __future__ import annotations

import os
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from ppow_jax import (cli, datasets, drafters, engine, feature_cache, feature_training, layout,
                      parallel, settings, sharding, stages, train_step, trainer)
from ppow_jax.data import pipeline
from ppow_jax.data import tokenizer as tokenizer_lib
from ppow_jax.errors import UserError
from ppow_jax.metric_writer import MetricWriter
from ppow_jax.models import eagle3, eagle3_io, hf, llama


def build_drafter(c, target_cfg: llama.ModelConfig, data: datasets.Data, target_params=None):
  """(drafter, initial params) from ``config.drafter``: loaded from ``init_from``, or the
  architecture of ``settings.drafter_arch`` (the one the memory plan sizes) at random
  (``head_from_target`` needs ``target_params``)."""
  d = c.drafter
  if d.init_from:
    drafters.check_drafter_dir(d.init_from, "config.drafter.init_from")
  if d.kind == "eagle3":
    if d.init_from:
      ecfg, net, vocab = eagle3_io.load_eagle3(d.init_from, param_dtype=d.param_dtype,
                                               dtype=d.dtype)
      if ecfg.vocab_size != target_cfg.vocab_size:
        raise UserError(f"config.drafter.init_from {d.init_from}: vocab_size "
                        f"{ecfg.vocab_size} != target's {target_cfg.vocab_size}")
      return drafters.Eagle3FeatureDrafter.create(ecfg, target_cfg), {"net": net,
                                                                      "vocab": vocab}
    ecfg = settings.drafter_arch(c, target_cfg)
    vd = ecfg.draft_vocab_size
    vocab = (eagle3.identity_draft_vocab(target_cfg.vocab_size) if vd == target_cfg.vocab_size
             else eagle3.build_draft_vocab(_token_counts(data, target_cfg.vocab_size), vd))
    net = eagle3.init_eagle3(ecfg, jax.random.PRNGKey(c.seed + 10))
    if (d.head_from_target or d.residual_start) and target_params is not None:
      start = eagle3.residual_start if d.residual_start else eagle3.head_from_target
      try:
        net = start(net, vocab, feature_cache.target_head(target_cfg, target_params),
                    jnp.asarray(target_params["norm"]["scale"]))
      except ValueError as e:
        raise UserError(f"config.drafter.residual_start/head_from_target: {e}") from None
    return drafters.Eagle3FeatureDrafter.create(ecfg, target_cfg), {"net": net, "vocab": vocab}
  if d.init_from:
    model, params = hf.load(d.init_from, dtype=d.dtype, param_dtype=d.param_dtype)
    hf.check_same_vocab(target_cfg, model.cfg, where=d.init_from)
    return drafters.LMDrafter(model.cfg), jax.tree_util.tree_map(jnp.asarray, params)
  cfg = settings.drafter_arch(c, target_cfg)
  return drafters.LMDrafter(cfg), llama.init_params(cfg, jax.random.PRNGKey(c.seed + 10))


def _token_counts(data: datasets.Data, vocab_size: int, docs: int = 2000) -> np.ndarray:
  """Frequencies of the tokens the drafter is trained to predict (the loss-masked ones: the
  answers of conversations, every token of text), over the first ``docs`` documents."""
  counts = np.zeros(vocab_size, np.float64)
  for i in range(min(docs, len(data.train))):
    f = pipeline.example_features(data.train[i], data.tokenizer)
    np.add.at(counts, f["tokens"][f["loss_mask"] > 0].astype(np.int64), 1)
  return counts


def export(drafter, params, out_dir: str, tokenizer: tokenizer_lib.TokenizerInfo) -> None:
  """Atomic export (each writer validates keys/shapes before writing anything). Every process
  calls it (the parameters may be split over all of them); process 0 writes."""
  params = sharding.to_host(params)
  if not sharding.is_primary():
    return
  if isinstance(drafter, drafters.Eagle3FeatureDrafter):
    eagle3_io.save_eagle3(out_dir, drafter.cfg, params["net"], params["vocab"])
  else:
    hf.save(out_dir, drafter.cfg, params, overwrite=True)
  tokenizer_lib.save(tokenizer, out_dir)
  layout.make_readable(out_dir)


def load_exported(out_dir: str, target_cfg: llama.ModelConfig):
  return drafters.load(out_dir, target_cfg)


def _greedy_tau_fn(c, target_cfg: llama.ModelConfig, target_params, drafter, constants,
                   data: datasets.Data):
  """τ of greedy decoding on a few held-out prompts: the 'evaluation τ' of best checkpoints."""
  if not c.checkpoint.eval_every or not len(data.heldout):
    return None
  prompts = datasets.eval_prompts(c, data)[:c.checkpoint.eval_prompts]
  padded, lens = engine.pad_prompts(prompts)
  eng = engine.Engine(target_cfg, drafter, engine.DecodeConfig(
      window=settings.eval_window(c), max_new_tokens=min(c.eval.max_new_tokens, 32)))

  def evaluate(state) -> float:
    params = train_step.join_params(drafter, state.params, constants)
    out = eng.generate(target_params, params, padded, lens, jax.random.PRNGKey(0))
    return out.stats.summary()["tau"]

  return evaluate


def _feature_training(c, paths: layout.Layout, target_cfg: llama.ModelConfig, target_params, drafter,
                      vocab, data: datasets.Data, optimizer, steps: int, batch: int, seed: int):
  """(step, iterator, step constants, batch structure) of a token-level stage on cached
  target features: at most ``feature_rows`` rows (default: what the stage would read)."""
  context = c.baseline.feature_context
  rows = feature_cache.packed_rows(data.train, data.tokenizer, c.data.seq_len,
                                   c.baseline.feature_rows or steps * batch, locate=context > 0)
  key = feature_cache.digest(rows["tokens"], rows["loss_mask"], drafter.target_hidden_layers,
                             c.baseline.feature_dtype, context,
                             *(rows["documents"] if context else ()), target_params=target_params)
  path = os.path.join(datasets.cache_dir(c, paths), f"features-{key}")
  print(f"[features] {rows['tokens'].shape[0]} rows x {c.data.seq_len} tokens -> {path}",
        flush=True)
  cache = feature_cache.build(path, rows, target_cfg, target_params,
                              drafter.target_hidden_layers, c.baseline.feature_dtype,
                              context=context)
  cache = dict(cache, segments=rows["segments"])  # not stored: the rows give them
  step = feature_training.make_step(drafter, settings.baseline(c), optimizer,
                                    c.baseline.support_only)
  structure = next(feature_cache.CachedIterator(cache, batch, 0))
  return (step, feature_cache.CachedIterator(cache, batch, seed, lazy=True),
          feature_training.constants(drafter, vocab, target_params), structure)


def run_stage(c, paths: layout.Layout, name: str, target_cfg: llama.ModelConfig,
              target_params, drafter, init_params, data: datasets.Data, gamma: float,
              par: parallel.Parallel) -> tuple[Any, dict]:
  """Train one drafter stage on the mesh (resuming if checkpoints exist) and export it."""
  out_dir = paths.export(name)
  info = paths.read_info(name)
  if info is not None:
    _, params = load_exported(out_dir, target_cfg)
    logging.info("[%s] already trained (%s); --retrain=%s trains it again", name, out_dir, name)
    return params, info
  stage = stages.BY_NAME[name]
  recorded = stages.settings(c, name)
  if sharding.is_primary():
    os.makedirs(paths.checkpoints(name), exist_ok=True)
    cli.write_json(paths.settings_file(name), recorded)
  trainable, constants = train_step.split_params(drafter, init_params)
  # a private copy: the jitted step donates its state, and other stages start from init_params
  trainable = jax.tree_util.tree_map(lambda x: jnp.array(x, copy=True), trainable)
  steps, batch, optim_node, updates_per_batch = stage.schedule(c)
  optimizer = train_step.make_optimizer(settings.optim(optim_node))
  seed = stages.stage_seed(c, name)
  if name == "ppow":
    pcfg = settings.ppow(c, gamma)
    step = train_step.make_ppow_step(target_cfg, drafter, pcfg, optimizer,
                                     settings.baseline(c, warm_start=False))
    init = train_step.init_ppow_state(trainable, optimizer, jax.random.PRNGKey(seed), pcfg,
                                      batch, c.data.seq_len)
  else:
    step = train_step.make_baseline_step(target_cfg, drafter,
                                         settings.baseline(c, warm_start=name == "baseline"),
                                         optimizer,
                                         updates_per_batch)
    init = train_step.init_state(trainable, optimizer, jax.random.PRNGKey(seed))
  state = par.place_train_state(drafter, init)
  constants = par.place_replicated(constants)
  step_constants = constants
  # the baseline trains on cached target features; the continued control reads PPOW's
  # sequences in PPOW's order (its budget match), so it runs the target live like PPOW
  if (name == "baseline" and c.baseline.feature_cache
      and isinstance(drafter, drafters.Eagle3FeatureDrafter)):
    step, it, step_constants, structure = _feature_training(
        c, paths, target_cfg, target_params, drafter, constants, data, optimizer, steps, batch,
        seed)
    step_constants = par.place_replicated(step_constants)
  else:
    it = datasets.train_iterator(data, c.data.seq_len, batch, seed)
    structure = parallel.batch_structure(batch, c.data.seq_len)
  jitted = par.jit_train_step(step, state, target_params, step_constants, structure)
  writer = MetricWriter(paths.tensorboard(name))
  loop = trainer.LoopConfig(steps, c.checkpoint.save_every, c.log_every,
                            c.checkpoint.max_to_keep, c.checkpoint.eval_every)
  totals = {}
  state = trainer.run(name, jitted, state, (target_params, step_constants), it,
                      paths.checkpoints(name), loop, writer, totals=totals,
                      evaluate=_greedy_tau_fn(c, target_cfg, target_params, drafter, constants,
                                              data))
  writer.close()
  params = train_step.join_params(drafter, state.params, constants)
  info = {"stage": name, "steps": steps, "batch_size": batch, "sequences": steps * batch,
          "iterator_seed": seed, **{key: totals[key] for key in trainer.COUNTED},
          "train_seconds": totals["seconds"], "gamma": gamma, "settings": recorded}
  export(drafter, params, out_dir, data.tokenizer)
  if sharding.is_primary():
    cli.write_json(paths.info(name), info)
  sharding.sync(f"{name} exported")  # the others may read the export next
  return params, info
