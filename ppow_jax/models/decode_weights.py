"""Inference copies of a decoder's weights: fused, output-major projections for decoding
(``engine.decoding_params``), and the bytes one decode step reads."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def fuse_projections(params: dict) -> dict:
  """The same weights for decoding with fewer, larger matmuls, stored output-major (``[out,
  in]``, each output a dot product of one contiguous row, as ``cpu_gemv``'s kernel reads
  them): in every attention block ``q_proj``/``k_proj``/``v_proj`` become one ``qkv_proj_t``
  ``[(H + 2 KV) * D, E]`` and ``o_proj`` becomes ``o_proj_t`` ``[E, H * D]``; in every MLP
  ``gate_proj``/``up_proj`` become one ``gate_up_proj_t`` ``[2 M, E]`` (rows in that order)
  and ``down_proj`` becomes ``down_proj_t`` ``[E, M]``; a decoder's untied ``lm_head``
  becomes ``lm_head_t`` ``[V, E]`` (a tied head reads the embedding table, already
  ``[V, E]``). The modules read either layout; a
  batch-1 decode step streams every weight once, and on a CPU fewer, contiguous products
  stream them faster (BENCHMARKS.md). Concatenates once, outside any jitted step: meant for
  unsharded inference copies of the weights (training keeps the separate layout)."""
  def walk(node):
    if not isinstance(node, dict):
      return node
    out = {k: walk(v) for k, v in node.items()}
    if all(k in out for k in ("q_proj", "k_proj", "v_proj", "o_proj")):
      q, k, v = (out.pop(n) for n in ("q_proj", "k_proj", "v_proj"))
      qkv = jnp.concatenate([w.reshape(w.shape[0], -1) for w in (q, k, v)], axis=1)
      out["qkv_proj_t"] = jnp.transpose(qkv)
      o = out.pop("o_proj")
      out["o_proj_t"] = jnp.transpose(o.reshape(-1, o.shape[-1]))
    if all(k in out for k in ("gate_proj", "up_proj", "down_proj")):
      gate_up = jnp.concatenate([out.pop("gate_proj"), out.pop("up_proj")], axis=1)
      out["gate_up_proj_t"] = jnp.transpose(gate_up)
      out["down_proj_t"] = jnp.transpose(out.pop("down_proj"))
    return out
  out = walk(params)
  if isinstance(out, dict) and all(k in out for k in ("embed_tokens", "layers_0", "lm_head")):
    out["lm_head_t"] = jnp.transpose(out.pop("lm_head"))  # a Decoder's own head only
  return out


def weight_bytes_per_step(target_cfg, target_params) -> int:
  """Bytes of target weights that one decode step reads: every parameter but the embedding
  table, of which a step gathers a few rows (unless the LM head is tied to it)."""
  total = sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(target_params))
  if not target_cfg.tie_embeddings:
    table = target_params["embed_tokens"]
    total -= table.size * table.dtype.itemsize
  return int(total)
