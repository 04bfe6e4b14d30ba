"""ADAW scores, selection and the candidate pool against numpy."""

from absl.testing import absltest
import jax
import jax.numpy as jnp
import numpy as np

from ppow_jax import windowing
from ppow_jax.errors import UserError

N, K, V = 6, 4, 9


def _log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _np_position_scores(logp, logq):
  p = np.exp(np.float64(logp))
  logp64 = np.log(np.where(p > 0, p, 1.0))
  logq64 = np.maximum(np.float64(logq), -100.0)
  entropy = -(p * logp64).sum(-1)
  kl = np.where(p > 0, p * (logp64 - logq64), 0.0).sum(-1)
  return (1 - entropy / np.log(logp.shape[-1])) * kl


class ScoresTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    rng = np.random.default_rng(0)
    self.logp = _log_softmax(rng.normal(size=(N, K, V)) * 3).astype(np.float32)
    logq = rng.normal(size=(N, K, V))
    logq[..., 6:] = -np.inf  # reduced draft vocab
    self.logq = _log_softmax(logq).astype(np.float32)
    self.valid = np.arange(K)[None, :] < np.array([4, 3, 1, 0, 4, 2])[:, None]

  def test_adaw_score_matches_numpy(self):
    u = _np_position_scores(self.logp, self.logq)
    fn = jax.jit(windowing.adaw_score)
    np.testing.assert_allclose(fn(self.logp, self.logq), u.mean(-1), rtol=1e-5)
    want = np.array([u[n][self.valid[n]].mean() if self.valid[n].any() else 0.0
                     for n in range(N)])
    got = fn(self.logp, self.logq, self.valid)
    self.assertTrue(np.isfinite(got).all())
    np.testing.assert_allclose(got, want, rtol=1e-5)
    # A confident target the drafter disagrees with outranks an uncertain one.
    uniform = np.full((1, 1, V), -np.log(V), np.float32)
    peaked = _log_softmax(np.eye(V)[None, :1] * 8).astype(np.float32)
    drafter = _log_softmax(np.eye(V)[None, 1:2] * 8).astype(np.float32)
    self.assertAlmostEqual(float(fn(uniform, drafter)[0]), 0.0, places=6)
    self.assertGreater(float(fn(peaked, drafter)[0]), 1.0)

  def test_sliding_window_scores(self):
    rng = np.random.default_rng(1)
    u = rng.random((2, 7)).astype(np.float32)
    valid = np.arange(7)[None, :] < np.array([[7], [4]])
    got = np.asarray(jax.jit(windowing.sliding_window_scores, static_argnums=2)(u, valid, 3))
    for b in range(2):
      for t in range(7):
        if not valid[b, t]:
          self.assertEqual(got[b, t], -np.inf)
          continue
        span = [i for i in range(t, min(t + 3, 7)) if valid[b, i]]
        np.testing.assert_allclose(got[b, t], u[b, span].mean(), rtol=1e-6)
    with self.assertRaisesRegex(UserError, "window must be >= 1"):
      windowing.sliding_window_scores(u, valid, 0)


class SelectionTest(absltest.TestCase):

  def test_topk_picks_the_max_and_is_distinct(self):
    scores = jnp.asarray([0.3, -jnp.inf, 2.0, 1.0, 2.0, -1.0])
    idx = np.asarray(jax.jit(windowing.select_topk, static_argnums=1)(scores, 3))
    np.testing.assert_array_equal(idx, [2, 4, 3])
    np.testing.assert_array_equal(windowing.select("topk", None, scores, 1), [2])

  def test_softmax_and_uniform_are_distinct_and_skip_invalid(self):
    scores = jnp.asarray([0.0, 1.0, -jnp.inf, 0.5, 2.0, -jnp.inf, 0.1, 0.2])
    keys = jax.random.split(jax.random.key(0), 200)
    soft = jax.jit(jax.vmap(lambda k: windowing.select("softmax", k, scores, 5, 0.5)))(keys)
    uni = jax.jit(jax.vmap(lambda k: windowing.select("uniform", k, scores, 6)))(keys)
    for draws in (np.asarray(soft), np.asarray(uni)):
      for row in draws:
        self.assertLen(set(row.tolist()), len(row))
        self.assertFalse({2, 5} & set(row.tolist()))
    # With k = n everything is drawn once: a permutation.
    perm = windowing.select_uniform(jax.random.key(1), 8, 8)
    np.testing.assert_array_equal(np.sort(perm), np.arange(8))

  def test_softmax_frequencies_follow_softmax_for_k1(self):
    scores = jnp.asarray([0.0, 1.0, -0.5, 2.0, 0.5])
    temperature, draws = 0.7, 20000
    keys = jax.random.split(jax.random.key(42), draws)
    idx = jax.jit(jax.vmap(lambda k: windowing.select_softmax(k, scores, 1, temperature)))(keys)
    freq = np.bincount(np.asarray(idx)[:, 0], minlength=5) / draws
    logits = np.float64(scores) / temperature
    want = np.exp(logits - logits.max())
    want /= want.sum()
    # 5 binomial standard errors (<= 0.0035 at n = 20000) per bin.
    np.testing.assert_allclose(freq, want, atol=5 * np.sqrt(want * (1 - want) / draws).max())

  def test_selection_errors(self):
    scores = jnp.zeros(4)
    with self.assertRaisesRegex(UserError, "k=5 windows from 4"):
      windowing.select_topk(scores, 5)
    with self.assertRaisesRegex(UserError, "temperature must be > 0"):
      windowing.select_softmax(jax.random.key(0), scores, 1, 0.0)
    with self.assertRaisesRegex(UserError, "unknown ADAW selection 'best'.*topk"):
      windowing.select("best", jax.random.key(0), scores, 1)


class CandidatePoolTest(absltest.TestCase):

  def test_pool_life_cycle(self):
    refresh = jax.jit(windowing.refresh, static_argnames="max_age")
    update_scores = jax.jit(windowing.update_scores)
    pool = windowing.init_pool(4)
    self.assertFalse(np.asarray(pool.valid_P).any())
    pos = np.array([[0, 1], [0, 5], [1, 2]], np.int32)
    pool = refresh(pool, pos, jnp.asarray([0.5, 2.0, 1.0]), max_age=2)
    self.assertEqual(int(pool.valid_P.sum()), 3)
    # Better candidates push out worse ones; a re-offered coordinate replaces its old entry.
    pos2 = np.array([[2, 0], [0, 5], [3, 3]], np.int32)
    pool = refresh(pool, pos2, jnp.asarray([3.0, 0.1, jnp.nan]), max_age=2)
    entries = {tuple(p): (float(s), int(a)) for p, s, a, v in zip(
        np.asarray(pool.positions_PxC), np.asarray(pool.scores_P), np.asarray(pool.age_P),
        np.asarray(pool.valid_P)) if v}
    self.assertEqual(entries, {(2, 0): (3.0, 0), (1, 2): (1.0, 1), (0, 1): (0.5, 1),
                               (0, 5): (np.float32(0.1), 0)})
    # Re-score the oldest entries: their age resets.
    old = np.asarray(jax.jit(windowing.oldest, static_argnums=1)(pool, 2))
    self.assertEqual({tuple(p) for p in np.asarray(pool.positions_PxC)[old]}, {(1, 2), (0, 1)})
    pool = update_scores(pool, old, jnp.asarray([0.2, 0.3]))
    np.testing.assert_array_equal(np.asarray(pool.age_P)[old], 0)
    # Entries not re-scored for more than max_age refreshes are evicted.
    empty = np.zeros((1, 2), np.int32)
    for _ in range(3):
      pool = refresh(pool, empty, jnp.asarray([-jnp.inf]), max_age=2)
    self.assertFalse(np.asarray(pool.valid_P).any())
    # Updating an empty slot leaves it empty.
    pool = update_scores(pool, jnp.asarray([0, 1]), jnp.asarray([5.0, 6.0]))
    self.assertFalse(np.asarray(pool.valid_P).any())
    with self.assertRaisesRegex(UserError, "3 fields, the pool 2"):
      windowing.refresh(pool, np.zeros((1, 3), np.int32), jnp.zeros(1))


if __name__ == "__main__":
  absltest.main()
