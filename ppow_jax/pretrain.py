"""The target: load a local HF model, or pretrain the embedded tiny one (cached in the workdir).

The embedded target is a small LLaMA-style decoder trained here with next-token cross-entropy
so that acceptance lengths mean something; it is exported in Hugging Face layout to
``<workdir>/target`` (with the tokenizer), which a second run reuses and which
``ppow_jax.generate`` and transformers load directly.
"""

from __future__ import annotations

import os
from typing import Any, Optional

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
import optax

from ppow_jax import (cli, datasets, engine, layout, parallel, settings, sharding, stages,
                      train_step, trainer)
from ppow_jax.data import tokenizer as tokenizer_lib
from ppow_jax.errors import UserError
from ppow_jax.metric_writer import MetricWriter
from ppow_jax.models import gguf_convert, hf, llama


def _lm_step(cfg: llama.ModelConfig, optimizer: optax.GradientTransformation):
  model = llama.Decoder(cfg)

  def loss_fn(params, batch):
    tokens, mask = batch["tokens_BxT"], batch["loss_mask_BxT"]
    logits = model.apply({"params": params}, tokens[:, :-1])
    logp = jax.nn.log_softmax(logits, -1)
    nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], -1)[..., 0]
    w = mask[:, 1:].astype(jnp.float32)
    return jnp.sum(nll * w) / jnp.maximum(w.sum(), 1.0)

  def step(state: train_step.TrainState, target_params, constants, batch):
    del target_params, constants  # the train-step signature shared with the drafters
    loss, grads = jax.value_and_grad(loss_fn)(state.params, batch)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    tokens = jnp.asarray(batch["tokens_BxT"].shape[0] * batch["tokens_BxT"].shape[1],
                         jnp.float32)
    return (state.replace(step=state.step + 1, params=params, opt_state=opt_state),
            {"loss": loss, "grad_norm": optax.tree.norm(grads), "windows": tokens})

  return step, loss_fn


def heldout_loss(cfg: llama.ModelConfig, params, data: datasets.Data, seq_len: int,
                 num_batches: int = 4) -> float:
  """Mean next-token NLL (nats) on held-out documents."""
  if not len(data.heldout):
    return float("nan")
  it = datasets.pipeline.make_train_iterator(data.heldout, data.tokenizer, seq_len, 8, 0,
                                             num_epochs=1, shuffle=False, num_threads=0)
  fn = jax.jit(_lm_step(cfg, optax.sgd(0.0))[1])
  losses = []
  for _, batch in zip(range(num_batches), it):
    losses.append(float(fn(params, batch)))
  return float(np.mean(losses)) if losses else float("nan")


def sample_text(cfg: llama.ModelConfig, params, data: datasets.Data, prompt: str,
                max_new_tokens: int = 48) -> str:
  info = data.tokenizer
  ids = ([info.bos_id] if info.bos_id is not None else []) + info.encode(prompt)
  eng = engine.Engine(cfg, None, engine.DecodeConfig(max_new_tokens=max_new_tokens))
  prompts, lens = engine.pad_prompts([ids])
  out = eng.generate(params, None, prompts, lens, jax.random.PRNGKey(0))
  return prompt + info.decode(out.new_tokens()[0])


SAMPLE_REQUEST = "Write a Python function that returns the n-th Fibonacci number."


def sample_chat(cfg: llama.ModelConfig, params, info, request: str,
                max_new_tokens: int) -> str:
  """The target's greedy answer to ``request`` under its chat template (shown in the report,
  so a reader sees what the model is)."""
  ids = tokenizer_lib.apply_chat_template([("user", request)], info,
                                          add_generation_prompt=True).ids
  eos = (info.eos_id,) if info.eos_id is not None else ()
  eng = engine.Engine(cfg, None, engine.DecodeConfig(max_new_tokens=max_new_tokens,
                                                     eos_ids=eos))
  prompts, lens = engine.pad_prompts([[int(i) for i in ids]])
  out = eng.generate(params, None, prompts, lens, jax.random.PRNGKey(0))
  return f"{request}\n---\n{info.decode(out.new_tokens()[0])}"


def given_target(c) -> tuple[llama.ModelConfig, Any]:
  """(config, params) of ``target.hf_dir``: a Hugging Face directory, a GGUF file or
  ``smollm2``."""
  model, params = hf.load(gguf_convert.resolve(c.target.hf_dir), dtype=c.target.dtype,
                          param_dtype=c.target.param_dtype)
  hf.check_same_vocab(model.cfg, model.cfg, where=c.target.hf_dir)
  return model.cfg, jax.tree_util.tree_map(jnp.asarray, params)


def get_target(c, paths: layout.Layout, data: datasets.Data, train: bool,
               par: Optional[parallel.Parallel] = None) -> tuple[llama.ModelConfig, Any, dict]:
  """(config, params, info) of the target; pretrains the embedded one if needed and allowed."""
  if c.target.hf_dir:
    cfg, params = given_target(c)
    info = {"source": c.target.hf_dir, "params": llama.param_count(params)}
    if c.target.sample_tokens and data.tokenizer.chat_template:
      info["sample"] = sample_chat(cfg, params, data.tokenizer, SAMPLE_REQUEST,
                                   c.target.sample_tokens)
      print(f"[target] sample:\n{info['sample']}", flush=True)
    return cfg, params, info
  out_dir = paths.export("target")
  info = paths.read_info("target")
  if info is not None:
    model, params = hf.load(out_dir)
    return model.cfg, jax.tree_util.tree_map(jnp.asarray, params), info
  if not train:
    raise UserError(f"{out_dir} has no pretrained target; run the 'target' stage")
  stage = stages.BY_NAME["target"]
  recorded = stages.settings(c, "target")
  if sharding.is_primary():
    os.makedirs(paths.checkpoints("target"), exist_ok=True)
    cli.write_json(paths.settings_file("target"), recorded)
  cfg = settings.target_arch(c, data.tokenizer.vocab_size)
  steps, batch, optim_node, _ = stage.schedule(c)
  optimizer = train_step.make_optimizer(settings.optim(optim_node))
  par = par or parallel.Parallel.single_device(c)
  params = llama.init_params(cfg, jax.random.PRNGKey(c.seed))
  state = par.place_target_state(cfg, train_step.init_state(params, optimizer,
                                                            jax.random.PRNGKey(c.seed + 1)))
  step, _ = _lm_step(cfg, optimizer)
  it = datasets.train_iterator(data, c.data.seq_len + 1, batch, stages.stage_seed(c, "target"))
  jitted = par.jit_train_step(step, state, None, None, parallel.batch_structure(
      batch, c.data.seq_len + 1))
  writer = MetricWriter(paths.tensorboard("target"))
  loop = trainer.LoopConfig(steps, c.checkpoint.save_every, c.log_every,
                            c.checkpoint.max_to_keep)
  totals = {}
  state = trainer.run("target", jitted, state, (None, None), it, paths.checkpoints("target"),
                      loop, writer, totals=totals)
  writer.close()
  loss = heldout_loss(cfg, state.params, data, c.data.seq_len + 1)
  sample = (sample_text(cfg, state.params, data, "def ", c.target.sample_tokens)
            if c.target.sample_tokens else "")
  info = {"source": "embedded", "params": llama.param_count(state.params),
          "heldout_loss_nats": loss, "heldout_perplexity": float(np.exp(loss)),
          "sample": sample, "steps": steps, "train_seconds": totals["seconds"],
          "config": {k: getattr(cfg, k) for k in ("vocab_size", "hidden_size", "num_layers",
                                                  "num_heads", "num_kv_heads",
                                                  "intermediate_size")},
          "settings": recorded}
  logging.info("target: held-out loss %.3f nats; sample: %r", loss, sample)
  host_params = sharding.to_host(state.params)  # every process: they may be split over all
  if sharding.is_primary():
    hf.save(out_dir, cfg, host_params, overwrite=True)
    tokenizer_lib.save(data.tokenizer, out_dir)
    layout.make_readable(out_dir)
    cli.write_json(paths.info("target"), info)
  sharding.sync("target exported")
  return cfg, state.params, info
