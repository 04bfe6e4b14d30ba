"""Few-row matrix products on the CPU by a small C++ kernel (``cpu_gemv.cc``).

A decode step's matrix products have few rows (batch x new tokens): AR steps, drafting, and
the K + 1 tokens of a verification. XLA's CPU dot streams a one-row product's weights at
about 90% of the rate this kernel does, and 2-16 rows at half of it or less: the kernel reads
each weight row from memory once for all rows (``python -m ppow_jax.bench.matmul``,
BENCHMARKS.md). ``matmul_t(x_MxE, w_NxE)`` computes ``x @ w.T`` with the kernel when it
applies (CPU, float32, ``MIN_ROWS <= M <= MAX_ROWS``) and with XLA's dot otherwise, so the
same jitted code runs unchanged on accelerators. The kernel splits the weight rows over
XLA's intra-op thread pool.

This module also builds and loads the library that holds every CPU kernel of the package
(this one and ``cpu_attention.cc``'s, with the ``cpu_kernels.h`` they share). It is compiled on
first use with the system C++ compiler (``$CXX``, else ``g++``, ``-O3 -march=native``) into
``<cache root>/kernels`` (``$PPOW_JAX_CACHE``, else ``~/.cache/ppow_jax``). Without a compiler,
or with ``PPOW_JAX_CPU_GEMV=0``, XLA's ops are used (a warning says why, once).
"""

import contextlib
import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from typing import Iterator, Optional

import jax
import jaxlib
import jax.numpy as jnp
from absl import logging

from ppow_jax.user_cache import cache_root

# The rows the kernel takes (BENCHMARKS.md): from one row (an AR step) up to 48 (a batch-8
# verification of K + 1 = 6 tokens), where XLA's matrix product on SmolLM2's shapes is as fast.
MIN_ROWS = 1
MAX_ROWS = 48
DISABLE_ENV = "PPOW_JAX_CPU_GEMV"
_HERE = os.path.dirname(os.path.abspath(__file__))
_SOURCES = tuple(os.path.join(_HERE, f) for f in ("cpu_gemv.cc", "cpu_attention.cc"))
_HEADER = os.path.join(_HERE, "cpu_kernels.h")
_TARGET = "ppow_cpu_matmul_t_f32"
ATTENTION_TARGET = "ppow_cpu_attention_f32"  # cpu_attention's kernel
# XLA custom-call targets and the library's symbols that implement them
TARGETS = {_TARGET: "PpowCpuMatmulTF32", ATTENTION_TARGET: "PpowCpuAttentionF32"}


def _flags() -> list[str]:
  return ["-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-pthread", "-w",
          "-I", jax.ffi.include_dir()]


def _cpu_id() -> str:
  """The instruction sets ``-march=native`` compiles for (a cache shared by different machines,
  e.g. an NFS home on a cluster, keeps one library per kind of CPU)."""
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.split(":")[0].strip() in ("flags", "Features"):
          return line
  except OSError:
    pass
  return platform.machine() + platform.processor()


def build(out_dir: Optional[str] = None) -> str:
  """Compile the kernels (once per sources, compiler, flags and jaxlib); return the .so path.

  Raises ``RuntimeError`` naming the compiler and its message when it cannot be built."""
  cxx = os.environ.get("CXX") or "g++"
  if shutil.which(cxx) is None:
    raise RuntimeError(f"no C++ compiler {cxx!r} on PATH (set $CXX)")
  sources = []
  for path in (*_SOURCES, _HEADER):
    with open(path, "rb") as f:
      sources.append(f.read())
  key = hashlib.sha256(b"\0".join(
      [*sources, cxx.encode(), " ".join(_flags()).encode(), jax.ffi.include_dir().encode(),
       jaxlib.__version__.encode(), _cpu_id().encode()])
  ).hexdigest()[:16]
  out_dir = out_dir or os.path.join(cache_root(), "kernels")
  path = os.path.join(out_dir, f"cpu_gemv-{key}.so")
  if os.path.isfile(path):
    return path
  os.makedirs(out_dir, exist_ok=True)
  fd, tmp = tempfile.mkstemp(suffix=".so", dir=out_dir)  # concurrent builders each rename
  os.close(fd)
  try:
    proc = subprocess.run([cxx, *_flags(), *_SOURCES, "-o", tmp], capture_output=True, text=True)
    if proc.returncode != 0:
      names = ", ".join(os.path.basename(x) for x in _SOURCES)
      raise RuntimeError(f"{cxx} failed on {names}: {proc.stderr.strip()[-2000:]}")
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return path


@functools.cache
def available() -> bool:
  """Whether the kernels are built, loaded and registered with XLA (done once per process);
  False, with one warning, when that is switched off or fails."""
  if os.environ.get(DISABLE_ENV, "1") == "0":
    return False
  try:
    lib = ctypes.cdll.LoadLibrary(build())
    for target, symbol in TARGETS.items():
      jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)),
                                  platform="cpu")
  except (RuntimeError, OSError) as e:
    logging.warning("cpu_gemv: the C++ kernels are unavailable (%s); using XLA's ops", e)
    return False
  return True


def applies(rows: int, x_dtype, w_dtype) -> bool:
  """Whether ``matmul_t`` takes the kernel on a CPU for this many rows and these dtypes."""
  return (MIN_ROWS <= rows <= MAX_ROWS and jnp.dtype(x_dtype) == jnp.float32
          and jnp.dtype(w_dtype) == jnp.float32 and available())


@contextlib.contextmanager
def rows_range(low: int, high: int) -> Iterator[None]:
  """Within: the kernel takes ``low <= M <= high`` rows (``high < low``: never). The choice
  is made when tracing, so a function traced here keeps it (benchmarks and tests)."""
  global MIN_ROWS, MAX_ROWS
  saved = MIN_ROWS, MAX_ROWS
  MIN_ROWS, MAX_ROWS = low, high
  try:
    yield
  finally:
    MIN_ROWS, MAX_ROWS = saved


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
