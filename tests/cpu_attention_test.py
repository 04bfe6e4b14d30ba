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


def _numpy_attention(q_BxTxHxD, k_BKxSxD, v_BKxSxD, mask_BxTxS, scale):
  """Float64 loops over rows, tokens and heads, written from the definition."""
  b, t, h, d = q_BxTxHxD.shape
  kv = k_BKxSxD.shape[0] // b
  out = np.zeros((b, t, h, d))
  for i in range(b):
    for j in range(t):
      seen = mask_BxTxS[i, j]
      for head in range(h):
        n = i * kv + head // (h // kv)  # the cache row of this query head's KV head
        k, v = k_BKxSxD[n].astype(np.float64), v_BKxSxD[n].astype(np.float64)
        if not seen.any():  # a softmax over scores that are all the lowest float
          out[i, j, head] = v.mean(0)
          continue
        sc = np.where(seen, scale * (k @ q_BxTxHxD[i, j, head].astype(np.float64)), -np.inf)
        p = np.exp(sc - sc.max())
        out[i, j, head] = (p / p.sum()) @ v
  return out.astype(np.float32)


def _case(rng, b, t, h, kv, s, d, mask_kind):
  q = rng.standard_normal((b, t, h, d)).astype(np.float32)
  k = rng.standard_normal((b * kv, s, d)).astype(np.float32)
  v = rng.standard_normal((b * kv, s, d)).astype(np.float32)
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
    # (B, T, H, KV, S, D): an AR step of SmolLM2's shapes (3 KV heads of 3 query heads, D 64),
    # a batch-2 verification of 3 tokens (6 rows per KV head) and one of 2 tokens with D 128
    # (rows held in registers, blocks of rows with a ragged end), a batch-1 verification of 6
    # tokens with the synthetic pair's heads (12 rows: key rows transposed), a batch of 2 with
    # T = 5 and no grouping, heads whose D has a vector tail (20) or is below one vector (8),
    # and the most rows per KV head the kernel takes (G T = 128: a 32-node tree)
    cases = [(1, 1, 9, 3, 97, 64), (2, 3, 4, 2, 50, 32), (1, 2, 2, 1, 30, 128),
             (1, 6, 8, 4, 70, 32), (2, 5, 4, 4, 33, 20), (3, 2, 4, 2, 17, 8),
             (1, 32, 8, 2, 40, 16)]
    self.assertEqual(32 * 8 // 2, cpu_attention.MAX_ROWS)
    for b, t, h, kv, s, d in cases:
      for kind in ("causal", "any"):
        with self.subTest(shape=(b, t, h, kv, s, d), mask=kind):
          q, k, v, mask = _case(rng, b, t, h, kv, s, d, kind)
          self.assertIn(cpu_attention._TARGET, fn.lower(q, k, v, mask).as_text())
          got = np.asarray(fn(q, k, v, mask))
          np.testing.assert_allclose(got, _numpy_attention(q, k, v, mask, 0.37),
                                     rtol=2e-5, atol=2e-5)

  def test_reference_matches_numpy(self):
    rng = np.random.default_rng(1)
    q, k, v, mask = _case(rng, 2, 5, 6, 3, 33, 20, "any")
    got = np.asarray(jax.jit(lambda *a: cpu_attention.reference(*a, 0.37))(q, k, v, mask))
    np.testing.assert_allclose(got, _numpy_attention(q, k, v, mask, 0.37), rtol=2e-5,
                               atol=2e-5)

  def test_applies_to_few_float32_rows_only(self):
    q, k = jnp.ones((1, 2, 4, 16)), jnp.ones((2, 9, 16))  # 2 tokens x 2 query heads per KV
    mask = jnp.ones((1, 2, 9), bool)
    lower = lambda *a: jax.jit(lambda *x: cpu_attention.attend(*x, 0.25)).lower(*a).as_text()
    self.assertIn(cpu_attention._TARGET, lower(q, k, k, mask))
    self.assertNotIn(cpu_attention._TARGET, lower(q.astype(jnp.bfloat16), k, k, mask))
    t = cpu_attention.MAX_ROWS // 2 + 1  # 2 query heads per KV head: one row too many
    many, many_mask = jnp.ones((1, t, 4, 16)), jnp.ones((1, t, 9), bool)
    self.assertNotIn(cpu_attention._TARGET, lower(many, k, k, many_mask))
    fewer = jnp.ones((1, t - 1, 4, 16)), jnp.ones((1, t - 1, 9), bool)
    self.assertIn(cpu_attention._TARGET, lower(fewer[0], k, k, fewer[1]))

  def test_gradients_equal_xla_ops(self):
    rng = np.random.default_rng(2)
    q, k, v, mask = _case(rng, 2, 3, 4, 2, 21, 16, "causal")
    c = rng.standard_normal(q.shape).astype(np.float32)
    loss = lambda f: (lambda q, k, v: jnp.sum(jnp.sin(f(q, k, v, mask, 0.5)) * c))
    got = jax.grad(loss(cpu_attention.attend), argnums=(0, 1, 2))(q, k, v)
    want = jax.grad(loss(cpu_attention.reference), argnums=(0, 1, 2))(q, k, v)
    for g, r in zip(got, want):
      np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-4, atol=1e-5)

  def test_without_the_kernel_attend_is_xlas_ops(self):
    rng = np.random.default_rng(3)
    q, k, v, mask = _case(rng, 1, 1, 4, 2, 9, 16, "causal")
    with mock.patch.object(cpu_attention, "MAX_ROWS", 0):
      fn = jax.jit(lambda *a: cpu_attention.attend(*a, 0.25))
      self.assertNotIn(cpu_attention._TARGET, fn.lower(q, k, v, mask).as_text())
      np.testing.assert_allclose(np.asarray(fn(q, k, v, mask)),
                                 _numpy_attention(q, k, v, mask, 0.25), rtol=2e-5, atol=2e-5)


if __name__ == "__main__":
  absltest.main()
