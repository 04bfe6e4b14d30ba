r"""PPOW for an EAGLE-3 drafter of LLaMA-3.3-70B-Instruct.

Run (one host; on a pod or cluster use launch/tpu_pod.sh or launch/gpu_slurm.sbatch):

  python -m ppow_jax.main --config=configs/llama33_70b_eagle3.py:tpu_v5p \
      --workdir=gs://BUCKET/ppow/llama33_70b_eagle3

Variants (after the colon):
  tpu_v5p     (default) v5p-32 = 16 chips x 95 GiB: tensor-parallel 8 x data 2
              (mesh.ici_shape=(-1, 1, 8)); v5p-16 gives data 1, v5p-64 data 4.
  gpu_8xh100  nodes of 8 x H100 80 GiB: tensor 8 per node (NVLink), nodes data-parallel.
  runlocal    the "tiny" model on whatever this machine has (smoke test).

Memory per device (see docs/scale_out.md):
  python -m ppow_jax.tools.memory_plan --config=configs/llama33_70b_eagle3.py:tpu_v5p \
      --num_devices=16
"""

import ml_collections

VARIANTS = ("tpu_v5p", "gpu_8xh100", "runlocal")


def get_config(arg=None):
  variant = arg or "tpu_v5p"
  if variant not in VARIANTS:
    raise ValueError(f"unknown variant {variant!r}; expected one of {VARIANTS}")
  config = ml_collections.ConfigDict()

  # --- Target (frozen) ---
  config.target = ml_collections.ConfigDict()
  config.target.preset = "llama3.3-70b"  # architecture in ppow_jax/models/presets.py (shapes)
  config.target.hf_dir = ""  # local HF directory with the real weights ("" for none)
  config.target.dtype = "bfloat16"  # compute dtype; logits are always float32
  config.target.param_dtype = "bfloat16"  # storage dtype of the frozen weights

  # --- Drafter (trained) ---
  config.drafter = ml_collections.ConfigDict()
  config.drafter.kind = "eagle3"  # "eagle3" (target-feature drafter) | "lm" (small LM)
  config.drafter.preset = ""  # kind="lm": the drafter's preset (e.g. "llama3.2-1b")
  config.drafter.draft_vocab_size = 32000  # kind="eagle3": reduced draft vocabulary (EAGLE-3's)
  config.drafter.dtype = "bfloat16"  # compute dtype; logits are always float32
  config.drafter.param_dtype = "float32"  # master weights, updated by AdamW in float32

  # --- Mesh: axes, per-slice (ICI) and across-slice (DCN) shapes; their product is used ---
  config.mesh = ml_collections.ConfigDict()
  config.mesh.axes = ("data", "fsdp", "tensor")  # names the sharding rules refer to
  config.mesh.ici_shape = (-1, 1, 8)  # chips within a slice/node; one -1 = the rest
  config.mesh.dcn_shape = (1, 1, 1)  # slices/nodes; (2, 1, 1) = 2 data-parallel slices

  # --- Sharding: logical axis -> mesh axis (or tuple of axes, or None = replicated) ---
  config.sharding = ml_collections.ConfigDict()
  config.sharding.weight_rules = (  # parameters (target and, with "fsdp", drafter)
      ("vocab", "tensor"),  # embedding rows / LM-head columns
      ("embed", "fsdp"),  # hidden size: FSDP-style split (no-op while fsdp is 1)
      ("mlp", "tensor"),  # MLP width: Megatron-style column/row split
      ("heads", "tensor"),  # query heads
      ("kv_heads", "tensor"),  # key/value heads (8: tensor size must divide it)
      ("head_dim", None),  # each head stays whole
  )
  config.sharding.activation_rules = (  # activations, KV caches and input batches
      ("batch", ("data", "fsdp")),  # rows split over every non-tensor axis
      ("length", None),  # sequence positions stay on one device
      ("embed", None),  # residual stream replicated across tensor shards
      ("heads", "tensor"),  # attention per head shard
      ("kv_heads", "tensor"),  # KV cache per head shard
      ("head_dim", None),  # each head stays whole
      ("mlp", "tensor"),  # MLP hidden per shard
      ("vocab", "tensor"),  # logits split over the vocabulary
  )
  config.sharding.drafter_params = "fsdp"  # "fsdp": weight rules | "replicated": whole copies

  # --- Training shapes ---
  config.train = ml_collections.ConfigDict()
  config.train.batch_size = 16  # sequences per step, global (a multiple of batch shards)
  config.train.seq_len = 2048  # tokens per training sequence

  # --- PPOW rollouts ---
  config.ppow = ml_collections.ConfigDict()
  config.ppow.group_size = 8  # G: windows sampled per start position
  config.ppow.window = 10  # K: tokens per sampled window

  # --- Decoding (evaluation) ---
  config.decode = ml_collections.ConfigDict()
  config.decode.window = 10  # K: tokens drafted per verification
  config.decode.max_new_tokens = 512  # new tokens per prompt
  config.decode.batch_size = 1  # prompts decoded together (1: the speedup protocol)

  # Train details, data and evaluation sections are added with ppow_jax/main.py.

  if variant == "gpu_8xh100":
    config.mesh.ici_shape = (1, 1, 8)  # per node: tensor 8 (NVLink)
    config.mesh.dcn_shape = (-1, 1, 1)  # nodes: data-parallel, as many as SLURM gives
  elif variant == "runlocal":
    config.target.preset = "tiny"
    config.target.dtype = config.target.param_dtype = "float32"
    config.drafter.draft_vocab_size = 128
    config.drafter.dtype = "float32"
    config.mesh.ici_shape = (-1, 1, 1)
    config.train.batch_size = 8
    config.train.seq_len = 64
    config.ppow.group_size = 4
    config.ppow.window = 4
    config.decode.window = 4
    config.decode.max_new_tokens = 16
  return config
