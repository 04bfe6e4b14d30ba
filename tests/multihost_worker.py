"""One process of tests/multihost_test.py: baseline and PPOW steps, checkpoints, generation.

  python tests/multihost_worker.py PHASE OUT_DIR

Run alone (8 devices) or as every process of a multi-process job (the environment of
``launch/local_multiprocess.sh``); the same global batches and parameters either way. PHASE:
``full`` trains the stages, then decodes; ``kill`` dies by SIGKILL (every process) before
PPOW's third step, once the checkpoint of its second step is committed; ``resume`` reruns
the stages from the checkpoints in OUT_DIR (the same as ``full``), then decodes. Process 0 writes
``OUT_DIR/result.npz`` (final drafter parameters) and ``OUT_DIR/result.json``.
"""

import json
import os
import signal
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from ppow_jax import sharding  # noqa: E402

sharding.maybe_initialize_distributed()  # before anything else touches JAX

from absl import logging  # noqa: E402
import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402

from ppow_jax import (cli, drafters, engine, parallel, settings, train_step,  # noqa: E402
                      trainer)
from ppow_jax.models import eagle3, llama  # noqa: E402

CONFIG = os.path.join(REPO, "configs", "tiny.py:smoke,sharded")  # data 2 x fsdp 2 x tensor 2
# every sharded dim divides by 2; a tiny model keeps the compiles short
TARGET = llama.ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
                           num_heads=4, num_kv_heads=2, max_position_embeddings=64)
DRAFT_CFG = eagle3.Eagle3Config.from_target(TARGET, draft_vocab_size=32)
DRAFTER = drafters.Eagle3FeatureDrafter.create(DRAFT_CFG, TARGET)
BATCH, SEQ = 4, 12
BASELINE_STEPS, PPOW_STEPS, KILL_BEFORE = 2, 4, 3


def _random_params(cfg, seed: int, std: float) -> dict:
  rng = np.random.default_rng(seed)
  fill = lambda path, x: (np.ones(x.shape, x.dtype) if jax.tree_util.keystr(path).endswith(
      "'scale']") else rng.normal(0.0, std, x.shape).astype(x.dtype))
  return jax.tree_util.tree_map_with_path(fill, nn.unbox(sharding.abstract_params(cfg)))


class Batches:
  """Global batches from a seed and their index: the same on every process; resumable."""

  def __init__(self, seed: int):
    self.seed, self.i = seed, 0

  def __next__(self) -> dict:
    rng = np.random.default_rng([self.seed, self.i])
    self.i += 1
    tokens = rng.integers(0, TARGET.vocab_size, (BATCH, SEQ)).astype(np.int32)
    mask = np.ones_like(tokens)
    mask[:, :3] = 0
    return {"tokens_BxT": tokens, "loss_mask_BxT": mask, "segment_ids_BxT": np.ones_like(tokens)}

  def get_state(self) -> dict:
    return {"i": self.i}

  def set_state(self, state: dict) -> None:
    self.i = int(state["i"])


def _killed_before(step_fn, step_no: int, ckpt_dir: str):
  """``step_fn`` that SIGKILLs this process before step ``step_no``, once the checkpoint of
  step ``step_no - 1`` is committed (every process waits for it: none dies mid-save)."""
  calls = [0]

  def step(*args):
    calls[0] += 1
    if calls[0] == step_no:
      committed = os.path.join(ckpt_dir, "latest", str(step_no - 1))
      deadline = time.time() + 120
      while not os.path.isdir(committed) and time.time() < deadline:
        time.sleep(0.05)
      os.kill(os.getpid(), signal.SIGKILL)
    return step_fn(*args)

  return step


def _train(c, par, name: str, make_step, init, target, consts, out_dir: str, steps: int,
           kill: bool):
  state = par.place_train_state(DRAFTER, init)
  jitted = par.jit_train_step(make_step, state, target, consts,
                              parallel.batch_structure(BATCH, SEQ))
  ckpt_dir = os.path.join(out_dir, name)
  if kill:
    jitted = _killed_before(jitted, KILL_BEFORE, ckpt_dir)
  loop = trainer.LoopConfig(steps, save_every=2, log_every=1, max_to_keep=2)
  return trainer.run(name, jitted, state, (target, consts), Batches(c.seed + len(name)),
                     ckpt_dir, loop)


def main(phase: str, out_dir: str) -> None:
  c = cli.load_config(CONFIG, [("ppow.window", "3"), ("ppow.group_size", "2"),
                               ("ppow.starts_per_seq", "2"), ("ppow.pool_size", "0"),
                               ("ppow.selection", "uniform"),  # no top-k ties to break
                               ("ppow.adaw_scoring", "teacher_forced")])  # a smaller compile
  par = parallel.Parallel.from_config(c)
  target = par.place_target(TARGET, _random_params(TARGET, 0, 0.3))
  vocab = eagle3.build_draft_vocab(np.random.default_rng(2).integers(0, 100, TARGET.vocab_size),
                                   DRAFT_CFG.draft_vocab_size)
  consts = par.place_replicated(jax.device_get(vocab))
  optimizer = train_step.make_optimizer(settings.optim(c.baseline.optim))
  net = _random_params(DRAFT_CFG, 1, 0.1)
  state = _train(c, par, "baseline", train_step.make_baseline_step(
      TARGET, DRAFTER, settings.baseline(c), optimizer), train_step.init_state(
          net, optimizer, jax.random.PRNGKey(3)), target, consts, out_dir, BASELINE_STEPS, False)
  pcfg = settings.ppow(c, gamma=0.1)
  init = train_step.init_ppow_state(sharding.to_host(state.params), optimizer,
                                    jax.random.PRNGKey(4), pcfg, BATCH, SEQ)
  state = _train(c, par, "ppow", train_step.make_ppow_step(TARGET, DRAFTER, pcfg, optimizer),
                 init, target, consts, out_dir, PPOW_STEPS, phase == "kill")
  params = train_step.join_params(DRAFTER, state.params, consts)
  prompts, lens = engine.pad_prompts([[1, 2, 3, 4, 5], [7, 8, 9], [10, 11, 12, 13], [3, 1]])
  eng = engine.Engine(TARGET, DRAFTER, engine.DecodeConfig(window=3, temperature=1.0,
                                                          max_new_tokens=8))
  out = eng.generate(target, params, prompts, lens, jax.random.PRNGKey(5))  # sampled: the rng
  decoded = {"tokens": out.new_tokens(), **out.stats.summary()}
  flat = {jax.tree_util.keystr(p): x for p, x in
          jax.tree_util.tree_flatten_with_path(sharding.to_host(state.params))[0]}
  if sharding.is_primary():
    np.savez(os.path.join(out_dir, "result.npz"), **flat)
    cli.write_json(os.path.join(out_dir, "result.json"), {
        "processes": jax.process_count(), "devices": jax.device_count(), "decoded": decoded})


if __name__ == "__main__":
  logging.set_verbosity(logging.INFO)  # the trainer says from which step it resumed
  main(sys.argv[1], sys.argv[2])
