r"""A tiny target trained here: the whole main job in minutes, for tests and for the plumbing.

  python -m ppow_jax.main --config=configs/tiny.py --workdir=workdir/tiny

Corpus: this Python's standard library sources (read at run time, split by file). A 1k-token
BPE and a ~1M-parameter LLaMA-style target are trained here and cached in the workdir; then an
EAGLE-3 drafter is trained token-level (the baseline), PPOW continues from it, a budget-matched
continued-baseline control trains on, and all are evaluated against AR. The tiny target's text is
degenerate, so its τ and speedups exercise the code, not the method: the real-model run is
``configs/default.py``.

Variants (``configs/tiny.py:<variant>``):
  (none)  about 15 minutes on 2 CPU cores;
  smoke   the same pipeline at toy sizes, for the end-to-end test (seconds to a minute);
  sharded (with smoke) on 8 devices, data 2 x fsdp 2 x tensor 2, the drafter split too: one
          process with 8 fake CPU devices, or launch/local_multiprocess.sh 2 (4 each);
  lm      an independent small-LM drafter instead of EAGLE-3.
"""

import importlib.util
import os

_spec = importlib.util.spec_from_file_location(  # configs/common.py, wherever this file is
    "ppow_configs_common", os.path.join(os.path.dirname(os.path.abspath(__file__)), "common.py"))
common = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(common)


def get_config(arg=None):
  v = common.parse_arg(arg, smoke=False, lm=False, sharded=False)
  c = common.base_config()
  if v.lm:
    c.drafter.kind = "lm"
  if v.smoke:
    c.data.tokenizer_vocab_size = 300  # just above the 256 bytes + specials
    c.data.tokenizer_train_docs = 40
    c.data.seq_len = 32
    c.target.hidden_size = 32
    c.target.intermediate_size = 64
    c.target.num_layers = 2
    c.target.num_heads = 2
    c.target.num_kv_heads = 1
    c.target.pretrain_steps = 6
    c.target.pretrain_batch_size = 4
    c.baseline.steps = 4
    c.baseline.batch_size = 2
    c.baseline.ttt_steps = 2
    c.ppow.steps = 3
    c.ppow.batch_size = 2
    c.ppow.window = 3
    c.ppow.group_size = 2
    c.ppow.starts_per_seq = 2
    c.ppow.ppo_epochs = 1
    c.eval.num_prompts = 2
    c.eval.prompt_len = 12
    c.eval.max_new_tokens = 8
    c.eval.window = 3
    c.eval.batch_sizes = (2,)  # batched only: each batch size is another compile
    c.target.sample_tokens = 0  # no sample text (one compile less)
    c.eval.repeats = 1
    c.checkpoint.save_every = 2
    c.checkpoint.eval_every = 3  # exercises the held-out τ check
    c.checkpoint.eval_prompts = 2
    c.mesh.num_devices = 1  # toy batches do not divide a fake 8-device mesh
    c.log_every = 1
  if v.sharded:
    if not v.smoke:
      raise ValueError("config variant 'sharded' goes with 'smoke' (configs/tiny.py:smoke,sharded)")
    c.mesh.num_devices = -1
    c.mesh.ici_shape = (2, 2, 2)  # batches split over data x fsdp = 4, weights over tensor
    c.sharding.drafter_params = "fsdp"
    c.target.num_kv_heads = 2  # KV heads split over tensor
    c.target.pretrain_batch_size = c.baseline.batch_size = c.ppow.batch_size = 4
  return c
