"""cpu_attention: the C++ attention kernel against numpy (masks of every kind, ragged head
sizes, rows that see nothing), its use in jitted code, gradients and the XLA fallback."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import shutil
from unittest import mock

from absl.testing import absltest
import jax
import jax.numpy as jnp
import numpy as np

from ppow_jax import cpu_attention

_COMPILER = shutil.which(os.environ.get("CXX") or "g++") is not None


def _numpy_attention(q_NxMxD, k_NxSxD, v_NxSxD, mask_BxTxS, scale):
  """Float64 loops over heads and rows, written from the definition."""
  n, m, d = q_NxMxD.shape
  b, t, s = mask_BxTxS.shape
  out = np.zeros((n, m, d))
  for i in range(n):
    for r in range(m):
      seen = mask_BxTxS[i // (n // b), r % t]
      if not seen.any():  # a softmax over scores that are all the lowest float
        out[i, r] = v_NxSxD[i].astype(np.float64).mean(0)
        continue
      sc = scale * (k_NxSxD[i].astype(np.float64) @ q_NxMxD[i, r].astype(np.float64))
      sc = np.where(seen, sc, -np.inf)
      p = np.exp(sc - sc.max())
      out[i, r] = (p / p.sum()) @ v_NxSxD[i].astype(np.float64)
  return out.astype(np.float32)


def _case(rng, n, m, s, d, b, t, mask_kind):
  q = rng.standard_normal((n, m, d)).astype(np.float32)
  k = rng.standard_normal((n, s, d)).astype(np.float32)
  v = rng.standard_normal((n, s, d)).astype(np.float32)
  if mask_kind == "causal":  # the cache's rows: token t of row b at slot lengths[b] + t
    lengths = rng.integers(0, s - t + 1, size=b)
    mask = np.arange(s)[None, None, :] <= (lengths[:, None] + np.arange(t))[:, :, None]
  else:  # a tree's or a rollout block's: any pattern, one token that sees nothing
    mask = rng.random((b, t, s)) < 0.5
    mask[-1, t // 2] = False
  return q, k, v, mask


@absltest.skipUnless(_COMPILER, "no C++ compiler: attend is XLA's ops")
class KernelTest(absltest.TestCase):

  def test_matches_numpy_and_runs_the_kernel(self):
    rng = np.random.default_rng(0)
    fn = jax.jit(lambda q, k, v, mask: cpu_attention.attend(q, k, v, mask, 0.37))
    # (N, M, S, D, B, T): an AR step of SmolLM2's shapes (3 KV heads of 3 query heads, D 64),
    # a batch-1 verification of 6 tokens, a batch of 2 with T = 5 (ragged slots), heads
    # whose D has a vector tail (20) or is below one vector (8), and the longest M taken
    cases = [(3, 3, 97, 64, 1, 1), (4, 12, 70, 32, 1, 6), (8, 10, 33, 20, 2, 5),
             (6, 4, 17, 8, 3, 2), (2, cpu_attention.MAX_ROWS, 40, 16, 1, 16)]
    for n, m, s, d, b, t in cases:
      for kind in ("causal", "any"):
        with self.subTest(shape=(n, m, s, d, b, t), mask=kind):
          q, k, v, mask = _case(rng, n, m, s, d, b, t, kind)
          self.assertIn(cpu_attention._TARGET, fn.lower(q, k, v, mask).as_text())
          got = np.asarray(fn(q, k, v, mask))
          np.testing.assert_allclose(got, _numpy_attention(q, k, v, mask, 0.37),
                                     rtol=2e-5, atol=2e-5)

  def test_reference_matches_numpy(self):
    rng = np.random.default_rng(1)
    q, k, v, mask = _case(rng, 8, 10, 33, 20, 2, 5, "any")
    got = np.asarray(jax.jit(lambda *a: cpu_attention.reference(*a, 0.37))(q, k, v, mask))
    np.testing.assert_allclose(got, _numpy_attention(q, k, v, mask, 0.37), rtol=2e-5,
                               atol=2e-5)

  def test_applies_to_few_float32_rows_only(self):
    q, k = jnp.ones((2, 4, 16)), jnp.ones((2, 9, 16))
    mask = jnp.ones((1, 4, 9), bool)
    lower = lambda *a: jax.jit(lambda *x: cpu_attention.attend(*x, 0.25)).lower(*a).as_text()
    self.assertIn(cpu_attention._TARGET, lower(q, k, k, mask))
    self.assertNotIn(cpu_attention._TARGET, lower(q.astype(jnp.bfloat16), k, k, mask))
    many = jnp.ones((2, cpu_attention.MAX_ROWS + 1, 16))
    many_mask = jnp.ones((1, cpu_attention.MAX_ROWS + 1, 9), bool)
    self.assertNotIn(cpu_attention._TARGET, lower(many, k, k, many_mask))

  def test_gradients_equal_xla_ops(self):
    rng = np.random.default_rng(2)
    q, k, v, mask = _case(rng, 4, 6, 21, 16, 2, 3, "causal")
    c = rng.standard_normal(q.shape).astype(np.float32)
    loss = lambda f: (lambda q, k, v: jnp.sum(jnp.sin(f(q, k, v, mask, 0.5)) * c))
    got = jax.grad(loss(cpu_attention.attend), argnums=(0, 1, 2))(q, k, v)
    want = jax.grad(loss(cpu_attention.reference), argnums=(0, 1, 2))(q, k, v)
    for g, r in zip(got, want):
      np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-4, atol=1e-5)

  def test_without_the_kernel_attend_is_xlas_ops(self):
    rng = np.random.default_rng(3)
    q, k, v, mask = _case(rng, 2, 2, 9, 16, 1, 1, "causal")
    with mock.patch.object(cpu_attention, "MAX_ROWS", 0):
      fn = jax.jit(lambda *a: cpu_attention.attend(*a, 0.25))
      self.assertNotIn(cpu_attention._TARGET, fn.lower(q, k, v, mask).as_text())
      np.testing.assert_allclose(np.asarray(fn(q, k, v, mask)),
                                 _numpy_attention(q, k, v, mask, 0.25), rtol=2e-5, atol=2e-5)


if __name__ == "__main__":
  absltest.main()
