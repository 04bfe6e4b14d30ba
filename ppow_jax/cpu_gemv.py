"""Few-row matrix products on the CPU by a small C++ kernel (``cpu_gemv.cc``).

A batch-1 decode step is a chain of matrix-vector products whose cost is the time to stream
the weights from memory; XLA's CPU dot runs these well below the bandwidth that llama.cpp's
hand-written kernels reach (BENCHMARKS.md). ``matmul_t(x_MxE, w_NxE)`` computes
``x @ w.T`` with that kernel when it applies (CPU, float32, at most ``MAX_ROWS`` rows) and
with XLA's dot otherwise, so the same jitted code runs unchanged on accelerators.

The kernel is compiled on first use with the system C++ compiler (``$CXX``, else ``g++``,
``-O3 -march=native``) into ``<cache root>/kernels`` (``$PPOW_JAX_CACHE``, else
``~/.cache/ppow_jax``). Without a compiler, or with ``PPOW_JAX_CPU_GEMV=0``, XLA's dot is
used (a warning says why, once).
"""

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from typing import Optional

import jax
import jaxlib
import jax.numpy as jnp
from absl import logging

from ppow_jax.models.gguf_convert import cache_root

MAX_ROWS = 8  # above this XLA's dot is as fast (BENCHMARKS.md)
DISABLE_ENV = "PPOW_JAX_CPU_GEMV"
_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cpu_gemv.cc")
_TARGET = "ppow_cpu_matmul_t_f32"
_SYMBOL = "PpowCpuMatmulTF32"


def _flags() -> list[str]:
  return ["-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-pthread", "-w",
          "-I", jax.ffi.include_dir()]


def build(out_dir: Optional[str] = None) -> str:
  """Compile the kernel (once per source, compiler, flags and jaxlib) and return the .so path.

  Raises ``RuntimeError`` naming the compiler and its message when it cannot be built."""
  cxx = os.environ.get("CXX") or "g++"
  if shutil.which(cxx) is None:
    raise RuntimeError(f"no C++ compiler {cxx!r} on PATH (set $CXX)")
  with open(_SOURCE, "rb") as f:
    source = f.read()
  key = hashlib.sha256(b"\0".join(
      [source, cxx.encode(), " ".join(_flags()).encode(), jax.ffi.include_dir().encode(),
       jaxlib.__version__.encode()])
  ).hexdigest()[:16]
  out_dir = out_dir or os.path.join(cache_root(), "kernels")
  path = os.path.join(out_dir, f"cpu_gemv-{key}.so")
  if os.path.isfile(path):
    return path
  os.makedirs(out_dir, exist_ok=True)
  fd, tmp = tempfile.mkstemp(suffix=".so", dir=out_dir)  # concurrent builders each rename
  os.close(fd)
  try:
    proc = subprocess.run([cxx, *_flags(), _SOURCE, "-o", tmp], capture_output=True, text=True)
    if proc.returncode != 0:
      raise RuntimeError(f"{cxx} failed on {_SOURCE}: {proc.stderr.strip()[-2000:]}")
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return path


@functools.cache
def _registered() -> bool:
  """Build, load and register the kernel with XLA once per process; False (and one warning)
  when that is switched off or fails."""
  if os.environ.get(DISABLE_ENV, "1") == "0":
    return False
  try:
    lib = ctypes.cdll.LoadLibrary(build())
    jax.ffi.register_ffi_target(_TARGET, jax.ffi.pycapsule(getattr(lib, _SYMBOL)),
                                platform="cpu")
  except (RuntimeError, OSError) as e:
    logging.warning("cpu_gemv: the C++ kernel is unavailable (%s); using XLA's dot", e)
    print(f"cpu_gemv: using XLA's dot ({e})", file=sys.stderr)
    return False
  return True


def applies(rows: int, x_dtype, w_dtype) -> bool:
  """Whether ``matmul_t`` takes the kernel on a CPU for this many rows and these dtypes."""
  return (rows <= MAX_ROWS and jnp.dtype(x_dtype) == jnp.float32
          and jnp.dtype(w_dtype) == jnp.float32 and _registered())


def _xla_t(x_MxE: jax.Array, w_NxE: jax.Array, preferred_element_type=None) -> jax.Array:
  return jax.lax.dot_general(x_MxE, w_NxE, (((1,), (1,)), ((), ())),
                             preferred_element_type=preferred_element_type)


@jax.custom_vjp
def _kernel_t(x_MxE: jax.Array, w_NxE: jax.Array) -> jax.Array:
  out = jax.ShapeDtypeStruct((x_MxE.shape[0], w_NxE.shape[0]), jnp.float32)
  return jax.ffi.ffi_call(_TARGET, out, vmap_method="sequential")(x_MxE, w_NxE)


def _kernel_t_fwd(x_MxE, w_NxE):
  return _kernel_t(x_MxE, w_NxE), (x_MxE, w_NxE)


def _kernel_t_bwd(residuals, dy_MxN):  # gradients by XLA's dots
  x_MxE, w_NxE = residuals
  return dy_MxN @ w_NxE, dy_MxN.T @ x_MxE


_kernel_t.defvjp(_kernel_t_fwd, _kernel_t_bwd)


def matmul_t(x_MxE: jax.Array, w_NxE: jax.Array, preferred_element_type=None) -> jax.Array:
  """``x @ w.T`` ([M, E] x [N, E] -> [M, N]): the kernel on a CPU when it applies, else XLA's
  dot (the choice is made when tracing; other platforms never see the kernel)."""
  xla = functools.partial(_xla_t, preferred_element_type=preferred_element_type)
  if not applies(x_MxE.shape[0], x_MxE.dtype, w_NxE.dtype):
    return xla(x_MxE, w_NxE)
  return jax.lax.platform_dependent(x_MxE, w_NxE, cpu=_kernel_t, default=xla)
