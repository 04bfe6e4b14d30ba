"""Attention of few query rows against a KV cache by a C++ kernel on the CPU (``cpu_attention.cc``).

A decode step attends with few query rows per KV head (T new tokens times the query heads
that share it). On XLA's CPU backend that is a score product with the cache, a mask and a
softmax of several small fusions, and a product with the values, which cost a batch-1 step of
the synthetic pair more than reading the cache does (BENCHMARKS.md). ``attend`` runs the whole
of it as one kernel call when it applies (CPU, float32 inputs, at most ``MAX_ROWS`` query rows
per head) and as XLA's ops (``reference``) otherwise, so the same jitted code runs unchanged on
accelerators. Gradients are XLA's, through ``reference``.

The kernel is built and loaded with the package's other CPU kernels (``cpu_gemv``).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from ppow_jax import cpu_gemv

# Query rows per KV head up to which the kernel runs: decode steps, drafting, verification and
# tree verification; a long prompt's chunk is a matrix product, XLA's.
MAX_ROWS = 128
_TARGET = cpu_gemv.ATTENTION_TARGET


def reference(q_BxTxHxD: jax.Array, k_BKxSxD: jax.Array, v_BKxSxD: jax.Array,
              mask_BxTxS: jax.Array, scale: float) -> jax.Array:
  """XLA's ops. Query head h = kv · G + g reads KV head kv (row b · KV + kv of the cache);
  ``mask_BxTxS[b, t, s]``: whether token t of row b sees slot s. Returns [B, T, H, D]."""
  b, t, h, d = q_BxTxHxD.shape
  kv, s = k_BKxSxD.shape[0] // b, k_BKxSxD.shape[1]
  g = h // kv
  # one batch axis (row, KV head) for both products: they read the cache arrays as they are
  q_BKxGTxD = q_BxTxHxD.reshape(b, t, kv, g, d).transpose(0, 2, 3, 1, 4).reshape(
      b * kv, g * t, d)
  mask_BKxGTxS = jnp.broadcast_to(mask_BxTxS[:, None, None], (b, kv, g, t, s)).reshape(
      b * kv, g * t, s)
  scores = jnp.einsum("nmd,nsd->nms", q_BKxGTxD, k_BKxSxD, preferred_element_type=jnp.float32)
  scores = scores * np.float32(scale)
  scores = jnp.where(mask_BKxGTxS, scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(v_BKxSxD.dtype)
  out_BKxGTxD = jnp.einsum("nms,nsd->nmd", probs, v_BKxSxD)
  return out_BKxGTxD.reshape(b, kv, g, t, d).transpose(0, 3, 1, 2, 4).reshape(b, t, h, d)


def applies(rows: int, *dtypes) -> bool:
  """Whether ``attend`` takes the kernel on a CPU for this many query rows per KV head
  (new tokens × query heads per KV head)."""
  return (rows <= MAX_ROWS and all(jnp.dtype(x) == jnp.float32 for x in dtypes)
          and cpu_gemv.available())


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _kernel(q_BxTxHxD, k_BKxSxD, v_BKxSxD, mask_BxTxS, scale):
  out = jax.ShapeDtypeStruct(q_BxTxHxD.shape, jnp.float32)
  return jax.ffi.ffi_call(_TARGET, out, vmap_method="sequential")(
      q_BxTxHxD, k_BKxSxD, v_BKxSxD, mask_BxTxS.astype(jnp.bool_), scale=np.float32(scale))


def _kernel_fwd(q, k, v, mask, scale):
  return _kernel(q, k, v, mask, scale), (q, k, v, mask)


def _kernel_bwd(scale, residuals, dy):  # gradients by XLA's ops
  q, k, v, mask = residuals
  _, vjp = jax.vjp(lambda q, k, v: reference(q, k, v, mask, scale), q, k, v)
  return (*vjp(dy), None)


_kernel.defvjp(_kernel_fwd, _kernel_bwd)


def attend(q_BxTxHxD: jax.Array, k_BKxSxD: jax.Array, v_BKxSxD: jax.Array,
           mask_BxTxS: jax.Array, scale: float) -> jax.Array:
  """``softmax(scale · q kᵀ, masked) v`` per query head, laid out as ``reference``'s: the
  kernel on a CPU when it applies (chosen when tracing; other platforms never see it), else
  XLA's ops."""
  ref = functools.partial(reference, scale=scale)
  b, t, h, _ = q_BxTxHxD.shape
  rows = t * h // (k_BKxSxD.shape[0] // b)
  if not applies(rows, q_BxTxHxD.dtype, k_BKxSxD.dtype, v_BKxSxD.dtype):
    return ref(q_BxTxHxD, k_BKxSxD, v_BKxSxD, mask_BxTxS)
  kernel = lambda q, k, v, mask: _kernel(q, k, v, mask, scale)
  return jax.lax.platform_dependent(q_BxTxHxD, k_BKxSxD, v_BKxSxD, mask_BxTxS, cpu=kernel,
                                    default=ref)
