"""cpu_gemv: the C++ few-row matrix product against numpy, its use in jitted code, gradients,
concurrent callers and the build's errors."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import shutil
import tempfile
import threading
from unittest import mock

from absl.testing import absltest
import jax
import jax.numpy as jnp
import numpy as np

from ppow_jax import cpu_gemv

_COMPILER = shutil.which(os.environ.get("CXX") or "g++") is not None


def _reference_t(x_MxE: np.ndarray, w_NxE: np.ndarray) -> np.ndarray:
  return (x_MxE.astype(np.float64) @ w_NxE.astype(np.float64).T).astype(np.float32)


@absltest.skipUnless(_COMPILER, "no C++ compiler: matmul_t falls back to XLA's dot")
class KernelTest(absltest.TestCase):

  def test_builds_and_applies_to_few_float32_rows_only(self):
    self.assertTrue(cpu_gemv.available())
    self.assertTrue(cpu_gemv.applies(1, jnp.float32, jnp.float32))  # an AR step
    self.assertTrue(cpu_gemv.applies(cpu_gemv.MIN_ROWS, jnp.float32, jnp.float32))
    self.assertTrue(cpu_gemv.applies(cpu_gemv.MAX_ROWS, jnp.float32, jnp.float32))
    self.assertFalse(cpu_gemv.applies(cpu_gemv.MAX_ROWS + 1, jnp.float32, jnp.float32))
    self.assertFalse(cpu_gemv.applies(2, jnp.bfloat16, jnp.float32))

  def test_matches_numpy_for_every_row_count_and_ragged_shapes(self):
    rng = np.random.default_rng(0)
    # N: single-threaded (< 128), threaded with a ragged tail; E: with and without a vector
    # tail; M: one weight row at a time (1..6), blocks of weight rows (7, 8), two or more passes
    # of eight rows over cache-sized tiles of weight rows (9..17, 48; (389, 577) has tiles of
    # 48 rows and ragged ones)
    with cpu_gemv.rows_range(1, 48):
      fn = jax.jit(lambda x, w: cpu_gemv.matmul_t(x, w))
      outs = {}
      for n, e in ((37, 20), (1000, 64), (389, 577)):
        w = rng.standard_normal((n, e)).astype(np.float32)
        for m in (*range(1, 18), 48):
          x = rng.standard_normal((m, e)).astype(np.float32)
          self.assertIn(cpu_gemv._TARGET, fn.lower(x, w).as_text())
          outs[n, e, m] = x, w, np.asarray(fn(x, w))
    for (n, e, m), (x, w, y) in outs.items():
      with self.subTest(n=n, e=e, m=m):
        self.assertEqual(y.shape, (m, n))
        np.testing.assert_allclose(y, _reference_t(x, w), rtol=1e-4, atol=1e-4 * np.sqrt(e))

  def test_the_kernel_is_what_jit_runs(self):
    x, w = jnp.ones((2, 16)), jnp.ones((128, 16))
    hlo = jax.jit(cpu_gemv.matmul_t).lower(x, w).compile().as_text()
    self.assertIn(cpu_gemv._TARGET, hlo)
    self.assertNotIn(" dot(", hlo)
    one = jnp.ones((1, 16))  # an AR step's one row: the kernel too
    self.assertIn(cpu_gemv._TARGET, jax.jit(cpu_gemv.matmul_t).lower(one, w).as_text())
    many = jnp.ones((cpu_gemv.MAX_ROWS + 1, 16))
    hlo = jax.jit(cpu_gemv.matmul_t).lower(many, w).compile().as_text()
    self.assertNotIn(cpu_gemv._TARGET, hlo)

  def test_gradients_equal_xla_dots(self):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 40)).astype(np.float32)
    w = rng.standard_normal((200, 40)).astype(np.float32)
    c = rng.standard_normal((3, 200)).astype(np.float32)
    loss = lambda mm: (lambda x, w: jnp.sum(jnp.sin(mm(x, w)) * c))
    got = jax.grad(loss(cpu_gemv.matmul_t), argnums=(0, 1))(x, w)
    want = jax.grad(loss(lambda x, w: x @ w.T), argnums=(0, 1))(x, w)
    for g, r in zip(got, want):
      np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-4, atol=1e-4)

  def test_concurrent_callers_get_their_own_results(self):
    # calls from several threads share XLA's pool; each product's parts are its own
    rng = np.random.default_rng(2)
    w = jnp.asarray(rng.standard_normal((4096, 96)).astype(np.float32))
    xs = [jnp.asarray(rng.standard_normal((2, 96)).astype(np.float32)) for _ in range(4)]
    fn = jax.jit(lambda x, w: jax.lax.fori_loop(0, 20, lambda i, y: y + cpu_gemv.matmul_t(x, w),
                                                jnp.zeros((2, 4096))))
    want = [20 * _reference_t(np.asarray(x), np.asarray(w)) for x in xs]
    got = [None] * len(xs)

    def work(i):
      got[i] = np.asarray(fn(xs[i], w))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(xs))]
    for t in threads:
      t.start()
    for t in threads:
      t.join()
    for g, r in zip(got, want):
      np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-3)


class BuildTest(absltest.TestCase):

  def test_a_missing_compiler_is_named(self):
    with mock.patch.dict(os.environ, {"CXX": "no-such-c++-compiler"}):
      with self.assertRaisesRegex(RuntimeError, "no-such-c\\+\\+-compiler"):
        cpu_gemv.build(tempfile.mkdtemp())

  def test_a_failed_compile_leaves_no_library(self):
    out = tempfile.mkdtemp()
    with mock.patch.dict(os.environ, {"CXX": "false"}):  # exits 1 like a failed compile
      with self.assertRaisesRegex(RuntimeError, "false failed on .*cpu_gemv.cc"):
        cpu_gemv.build(out)
    self.assertEqual(os.listdir(out), [])

  def test_without_the_kernel_matmul_t_is_xlas_dot(self):
    x = np.arange(6, dtype=np.float32).reshape(1, 6)
    w = np.arange(18, dtype=np.float32).reshape(3, 6)
    with cpu_gemv.rows_range(1, 0):
      hlo = jax.jit(cpu_gemv.matmul_t).lower(x, w).compile().as_text()
      self.assertNotIn(cpu_gemv._TARGET, hlo)
      np.testing.assert_array_equal(np.asarray(jax.jit(cpu_gemv.matmul_t)(x, w)), x @ w.T)


if __name__ == "__main__":
  absltest.main()
