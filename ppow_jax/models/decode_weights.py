"""Inference copies of a decoder's weights: fused, output-major projections for decoding
(``engine.decoding_params``), one buffer for the arrays a drafter shares with its target, and
the bytes one decode step reads."""

from __future__ import annotations

from typing import Any

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


@jax.jit
def _same_values(a, b) -> jax.Array:
  """``a == b`` everywhere; arrays that differ in their first elements cost no full pass."""
  head = lambda x: x.reshape(-1)[:64]
  return jax.lax.cond(jnp.array_equal(head(a), head(b)), lambda: jnp.array_equal(a, b),
                      lambda: jnp.array(False))


def share_equal_arrays(source: Any, params: Any) -> Any:
  """``params`` with each array that equals an array of ``source`` (same shape, dtype,
  placement and values) replaced by ``source``'s, so that both trees read one buffer. A
  drafter made of its target's layers (or holding copies of its embedding, norm or head)
  then adds no weights to the device's memory nor to the caches it competes for with the
  target in every round. An array at the same path in both trees is compared first; NaNs
  never compare equal (such an array keeps its own buffer)."""
  if source is None or params is None:
    return params
  by_path = dict(jax.tree_util.tree_leaves_with_path(source))
  by_kind: dict[tuple, list] = {}
  for x in by_path.values():
    if isinstance(x, jax.Array):
      by_kind.setdefault((x.shape, x.dtype, x.sharding), []).append(x)

  def pick(path, x):
    if not isinstance(x, jax.Array):
      return x
    candidates = by_kind.get((x.shape, x.dtype, x.sharding), [])
    first = by_path.get(path)
    if any(a is first for a in candidates):  # the same path first, then the others
      candidates = [first] + [a for a in candidates if a is not first]
    for a in candidates:
      if a is x or bool(_same_values(a, x)):
        return a
    return x
  return jax.tree_util.tree_map_with_path(pick, params)


def weight_bytes_per_step(target_cfg, target_params) -> int:
  """Bytes of target weights that one decode step reads: every parameter but the embedding
  table, of which a step gathers a few rows (unless the LM head is tied to it)."""
  total = sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(target_params))
  if not target_cfg.tie_embeddings:
    table = target_params["embed_tokens"]
    total -= table.size * table.dtype.itemsize
  return int(total)
