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
MAX_ROWS = 64
_TARGET = "ppow_cpu_attention_f32"


def reference(q_NxMxD: jax.Array, k_NxSxD: jax.Array, v_NxSxD: jax.Array,
              mask_BxTxS: jax.Array, scale: float) -> jax.Array:
  """XLA's ops: head n = (batch row b, KV head), query row m = (group g, token t), token
  fastest; ``mask_BxTxS[b, t, s]``: whether token t of row b sees slot s."""
  n, m, d = q_NxMxD.shape
  b, t, s = mask_BxTxS.shape
  mask_NxMxS = jnp.broadcast_to(mask_BxTxS[:, None, None], (b, n // b, m // t, t, s)).reshape(
      n, m, s)
  scores = jnp.einsum("nmd,nsd->nms", q_NxMxD, k_NxSxD, preferred_element_type=jnp.float32)
  scores = scores * np.float32(scale)
  scores = jnp.where(mask_NxMxS, scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(v_NxSxD.dtype)
  return jnp.einsum("nms,nsd->nmd", probs, v_NxSxD)


def applies(rows: int, *dtypes) -> bool:
  """Whether ``attend`` takes the kernel on a CPU for this many query rows per head."""
  return (rows <= MAX_ROWS and all(jnp.dtype(x) == jnp.float32 for x in dtypes)
          and cpu_gemv.available())


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _kernel(q_NxMxD, k_NxSxD, v_NxSxD, mask_BxTxS, scale):
  out = jax.ShapeDtypeStruct(q_NxMxD.shape, jnp.float32)
  return jax.ffi.ffi_call(_TARGET, out, vmap_method="sequential")(
      q_NxMxD, k_NxSxD, v_NxSxD, mask_BxTxS.astype(jnp.bool_), scale=np.float32(scale))


def _kernel_fwd(q, k, v, mask, scale):
  return _kernel(q, k, v, mask, scale), (q, k, v, mask)


def _kernel_bwd(scale, residuals, dy):  # gradients by XLA's ops
  q, k, v, mask = residuals
  _, vjp = jax.vjp(lambda q, k, v: reference(q, k, v, mask, scale), q, k, v)
  return (*vjp(dy), None)


_kernel.defvjp(_kernel_fwd, _kernel_bwd)


def attend(q_NxMxD: jax.Array, k_NxSxD: jax.Array, v_NxSxD: jax.Array, mask_BxTxS: jax.Array,
           scale: float) -> jax.Array:
  """``softmax(scale · q kᵀ, masked) v`` per head, as ``reference`` lays it out: the kernel on
  a CPU when it applies (chosen when tracing; other platforms never see it), else XLA's ops."""
  ref = functools.partial(reference, scale=scale)
  if not applies(q_NxMxD.shape[1], q_NxMxD.dtype, k_NxSxD.dtype, v_NxSxD.dtype):
    return ref(q_NxMxD, k_NxSxD, v_NxSxD, mask_BxTxS)
  kernel = lambda q, k, v, mask: _kernel(q, k, v, mask, scale)
  return jax.lax.platform_dependent(q_NxMxD, k_NxSxD, v_NxSxD, mask_BxTxS, cpu=kernel,
                                    default=ref)
