r"""Per-device memory of a run, from abstract shapes only: choose a mesh before renting one.

  python -m ppow_jax.tools.memory_plan --config=configs/llama31_8b_eagle3.py:tpu_v5p \
      --num_devices=4

Prints one JSON line. Nothing is allocated and no devices are needed: parameter shapes come
from ``jax.eval_shape`` of the models' init, their shardings from the config's rules, and each
array's per-device bytes from its PartitionSpec and the mesh shape built from
``mesh.ici_shape`` x ``mesh.dcn_shape`` on ``--num_devices`` (ceil(dim / shards) per dim).

Every size is the run's own setting (B = ppow.batch_size, T = data.seq_len, G = ppow.group_size,
K = ppow.window; V = target vocab, H heads, E hidden, M mlp width), and the drafter is built by
``settings.drafter_arch``, the function training uses. Each term is split by the activation
rules' shards of its axes:

* target params (frozen, ``target.param_dtype``; no gradients, no optimizer state);
* drafter params (``drafter.param_dtype``) and AdamW state: mu and nu in float32 with the
  drafter's sharding, plus the int32 step count;
* KV caches, the larger of
  - training rollouts: target and drafter caches of G*B rows x (T + K + 1) slots (the prefix
    cache tiled per window: an upper bound; sharing the prefix would need B*T + G*B*(K + 1)),
  - decoding: max(eval.batch_sizes) rows x (eval.prompt_len + eval.max_new_tokens +
    eval.window + 2) slots (``engine.Engine.cache_length`` of the evaluation's prompts);
* rollout activations:
  - window logits, 5 float32 buffers of [G*B, K + 1, V] (target logits and log-probs, drafter
    logits mapped to the target vocab and their log-probs, the cotangent of the drafter's);
  - plus the peak of one target layer (the target runs without gradients, one layer's
    temporaries alive at a time), the larger of the prefix pass (B rows, T queries, T keys)
    and the verify pass (G*B rows, K + 1 queries, T + K + 1 keys): attention scores
    [rows, H, q, k] x (4 + 4 + dtype bytes) (float32 scores and softmax, probs in the compute
    dtype) + [rows, q] x (5 E + 3 M) x dtype bytes (residual in/out, three EAGLE-3 features;
    gate, up and their product).

Not counted: XLA's scratch and fragmentation, the drafter's token-level (baseline) training
over whole sequences, and data-pipeline buffers. Keep ~25% of HBM free for them.
"""

from __future__ import annotations

import json

from absl import flags
import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
import numpy as np

from ppow_jax import cli, settings, sharding
from ppow_jax.errors import UserError
from ppow_jax.models import eagle3, llama

FLAGS = flags.FLAGS


def define_flags() -> None:
  """This tool's flags (defined when it runs, so that importing it defines none)."""
  cli.define_config_flag()
  flags.DEFINE_integer("num_devices", None, "Devices of the planned mesh (default: this "
                       "host's).")

LOGIT_BUFFERS = 5  # see the module docstring
ADAMW_MOMENTS = 2  # mu and nu, float32


def _tree_bytes(abstract, specs, axis_sizes) -> int:
  """Per-device bytes of a tree of ShapeDtypeStructs sharded by a same-structured spec tree."""
  spec_leaves = jax.tree_util.tree_leaves(specs, is_leaf=lambda x: isinstance(x, P))
  return sum(sharding.bytes_per_device(x.shape, x.dtype, s, axis_sizes)
             for x, s in zip(jax.tree_util.tree_leaves(abstract), spec_leaves, strict=True))


def _cache_bytes(cfg, rows: int, slots: int, rules, axis_sizes) -> int:
  """Keys + values of a KVCache: L layers of [rows, kv_heads, slots, head_dim] each."""
  layer_cfg = cfg.layer_config() if isinstance(cfg, eagle3.Eagle3Config) else cfg
  shape = (rows, layer_cfg.num_kv_heads, slots, layer_cfg.resolved_head_dim)
  spec = sharding.spec_for(sharding.CACHE_AXES, rules)
  return 2 * layer_cfg.num_layers * sharding.bytes_per_device(
      shape, llama.to_dtype(layer_cfg.dtype), spec, axis_sizes)


def _layer_peak(cfg: llama.ModelConfig, rows: int, queries: int, keys: int, rules,
                axis_sizes) -> int:
  """Temporaries of one target layer without gradients (see the module docstring)."""
  dt = llama.to_dtype(cfg.dtype)
  size = lambda shape, axes, dtype: sharding.bytes_per_device(
      shape, dtype, sharding.spec_for(axes, rules), axis_sizes)
  scores = size((rows, cfg.num_heads, queries, keys), ("batch", "heads", None, None), jnp.float32)
  probs = size((rows, cfg.num_heads, queries, keys), ("batch", "heads", None, None), dt)
  stream = size((rows, queries, cfg.hidden_size), ("batch", "length", "embed"), dt)
  mlp = size((rows, queries, cfg.intermediate_size), ("batch", "length", "mlp"), dt)
  return 2 * scores + probs + 5 * stream + 3 * mlp


def plan(config, num_devices: int) -> dict:
  """Per-device bytes of the run ``config`` on ``num_devices`` devices (see the docstring)."""
  settings.validate(config)
  if not config.target.preset and config.target.hf_dir:
    raise UserError("config.target.preset: name the target's architecture (the plan reads no "
                    "weights, so it cannot use config.target.hf_dir)")
  target_cfg = settings.target_arch(config)
  drafter_cfg = settings.drafter_arch(config, target_cfg)
  axis_sizes = sharding.mesh_shape(config.mesh, num_devices)
  target_boxed = sharding.abstract_params(target_cfg)
  drafter_boxed = sharding.abstract_params(drafter_cfg)
  names = sharding.logical_names(target_boxed) | sharding.logical_names(drafter_boxed)
  weight_rules, act_rules = sharding.rules_from_config(config, sorted(names))

  target_specs = sharding.mesh_specs(target_boxed, weight_rules)
  drafter_specs = sharding.mesh_specs(
      drafter_boxed, weight_rules if config.sharding.drafter_params == "fsdp" else None)
  sharding.check_divisible(target_boxed, target_specs, axis_sizes, "target parameter")
  sharding.check_divisible(drafter_boxed, drafter_specs, axis_sizes, "drafter parameter")
  batch_shards = sharding.num_shards(sharding.batch_spec(act_rules, 1)[0], axis_sizes)
  for key in ("baseline.batch_size", "ppow.batch_size"):
    stage, field = key.split(".")
    if config[stage][field] % batch_shards:
      raise UserError(f"config.{key}={config[stage][field]} is not a multiple of the "
                      f"{batch_shards} shards of the batch axis")

  target_abstract, drafter_abstract = nn.unbox(target_boxed), nn.unbox(drafter_boxed)
  target_bytes = _tree_bytes(target_abstract, target_specs, axis_sizes)
  drafter_bytes = _tree_bytes(drafter_abstract, drafter_specs, axis_sizes)
  drafter_f32 = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32),
                                       drafter_abstract)
  opt_bytes = ADAMW_MOMENTS * _tree_bytes(drafter_f32, drafter_specs, axis_sizes)
  opt_bytes += np.dtype(np.int32).itemsize  # step count

  b, t = config.ppow.batch_size, config.data.seq_len
  g, k = config.ppow.group_size, config.ppow.window
  e = config.eval
  decode_rows = max(e.batch_sizes)
  rollout_slots, decode_slots = t + k + 1, e.prompt_len + e.max_new_tokens + e.window + 2
  kv_train = (_cache_bytes(target_cfg, g * b, rollout_slots, act_rules, axis_sizes) +
              _cache_bytes(drafter_cfg, g * b, rollout_slots, act_rules, axis_sizes))
  kv_decode = (_cache_bytes(target_cfg, decode_rows, decode_slots, act_rules, axis_sizes) +
               _cache_bytes(drafter_cfg, decode_rows, decode_slots, act_rules, axis_sizes))
  logits = LOGIT_BUFFERS * sharding.bytes_per_device(
      (g * b, k + 1, target_cfg.vocab_size), jnp.float32,
      sharding.spec_for(("batch", "length", "vocab"), act_rules), axis_sizes)
  prefix = _layer_peak(target_cfg, b, t, t, act_rules, axis_sizes)
  verify = _layer_peak(target_cfg, g * b, k + 1, rollout_slots, act_rules, axis_sizes)
  activations = logits + max(prefix, verify)
  kv = max(kv_train, kv_decode)
  total = target_bytes + drafter_bytes + opt_bytes + kv + activations
  return {
      "target_param_bytes_per_device": target_bytes,
      "drafter_param_bytes_per_device": drafter_bytes,
      "opt_state_bytes_per_device": opt_bytes,
      "kv_cache_bytes_per_device": kv,
      "activation_bytes_per_device": activations,
      "total_bytes_per_device": total,
      "total_gib_per_device": round(total / 2**30, 2),
      "num_devices": num_devices,
      "mesh_shape": axis_sizes,
      "target_params": llama.param_count(target_abstract),
      "drafter_params": llama.param_count(drafter_abstract),
      "breakdown_bytes_per_device": {
          "kv_cache_rollout": kv_train, "kv_cache_decode": kv_decode,
          "rollout_logits": logits, "target_layer_prefix": prefix,
          "target_layer_verify": verify},
  }


def run(argv) -> None:
  config = cli.config_from_flags()
  num_devices = FLAGS.num_devices or jax.device_count()
  if num_devices < 1:
    raise UserError(f"--num_devices must be >= 1, got {num_devices}")
  print(json.dumps(plan(config, num_devices), sort_keys=True), flush=True)


if __name__ == "__main__":
  define_flags()
  cli.run_main(run)
