r"""PPOW for an EAGLE-3 drafter of LLaMA-3.1-8B-Instruct (target weights and data from local paths).

Run (one host; on a pod or cluster use launch/tpu_pod.sh or launch/gpu_slurm.sbatch):

  python -m ppow_jax.main --config=configs/llama31_8b_eagle3.py:tpu_v5p \
      --config.target.hf_dir=/models/llama3.1-8b \
      --config.data.conversations=/data/sharegpt.jsonl \
      --config.eval.prompts_file=/data/mt_bench.jsonl \
      --workdir=gs://BUCKET/ppow/llama31_8b_eagle3

Start from a published EAGLE-3 checkpoint with --config.drafter.init_from=/models/eagle3 and
--config.stages=ppow,continued,eval (the baseline stage is then that checkpoint).

Variants (after the colon):
  tpu_v5p     (default) v5p-8 = 4 chips x 95 GiB: tensor-parallel 4; larger slices add
              data-parallel replicas.
  gpu_8xh100  nodes of 8 x H100 80 GiB: tensor 4 x data 2 per node, nodes data-parallel.
  runlocal    the "tiny" preset on whatever this machine has (smoke test).

Memory per device (see docs/scale_out.md):
  python -m ppow_jax.tools.memory_plan --config=configs/llama31_8b_eagle3.py:tpu_v5p --num_devices=4
"""

import importlib.util
import os

_spec = importlib.util.spec_from_file_location(  # configs/common.py, wherever this file is
    "ppow_configs_common", os.path.join(os.path.dirname(os.path.abspath(__file__)), "common.py"))
common = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(common)


def get_config(arg=None):
  return common.real_run("llama3.1-8b", arg, tensor=4)
