"""ADAW scores, selection across a pool, and the pool, against numpy."""

from absl.testing import absltest
import jax
import jax.numpy as jnp
import numpy as np

from ppow_jax import divergences, windowing
from ppow_jax.errors import UserError


V = 8
OOV = -1e30  # what a reduced draft vocabulary gives tokens it cannot emit


def _log(p):
  p = np.asarray(p, np.float64)
  return np.where(p > 0, np.log(np.where(p > 0, p, 1.0)), OOV)


def _np_scores(p, q):
  """C(p) · m · KL(p̃ ‖ q) in float64, p̃ = p renormalised on q's support."""
  p, q = np.float64(p), np.float64(q)
  support = q > 0
  m = (p * support).sum(-1)
  pt = np.where(support, p, 0.0) / m[..., None]
  kl = np.where(pt > 0, pt * (np.log(np.where(pt > 0, pt, 1)) - np.log(np.where(q > 0, q, 1))),
                0).sum(-1)
  ent = -np.where(p > 0, p * np.log(np.where(p > 0, p, 1)), 0).sum(-1)
  return (1 - ent / np.log(p.shape[-1])) * m * kl


class _StrictTest(absltest.TestCase):
  """Implicit rank promotion raises (scoped to each test, so other modules are unaffected)."""

  def setUp(self):
    super().setUp()
    self.enterContext(jax.numpy_rank_promotion("raise"))


class ScoresTest(_StrictTest):

  def test_unfixable_out_of_vocab_mass_does_not_outrank_a_fixable_position(self):
    # tokens 6, 7 are outside the draft vocabulary
    p_oov = [0.90, 0.05, 0, 0, 0, 0, 0.05, 0]  # 5 % out of vocabulary
    q_oov = [0.90 / 0.95, 0.05 / 0.95, 0, 0, 0, 0, 0, 0]  # the best the drafter can do
    p_fix = [0.90, 0.05, 0.05, 0, 0, 0, 0, 0]
    q_fix = [0.36, 0.54, 0.05, 0.05, 0, 0, 0, 0]  # fixable disagreement
    logp = _log([p_oov, p_fix]).astype(np.float32)
    logq = _log([q_oov, q_fix]).astype(np.float32)
    alpha = np.asarray(divergences.alpha(logp, logq))
    np.testing.assert_allclose(alpha, [0.95, 0.46], rtol=1e-5)
    fn = jax.jit(windowing.position_scores)
    got = np.asarray(fn(logp, logq))
    np.testing.assert_allclose(got, _np_scores([p_oov, p_fix], [q_oov, q_fix]), rtol=1e-4,
                               atol=1e-6)
    self.assertLess(got[0], 1e-5)  # nothing left to fix
    self.assertGreater(got[1], 0.3)
    # the plain floored KL (the old score) ranked them the other way round
    conf = 1 - divergences.entropy(logp) / np.log(V)
    floored = np.asarray(conf * divergences.forward_kl(logp, logq))
    self.assertGreater(floored[0], 3.0 * floored[1])

  def test_full_vocab_is_the_papers_score(self):
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(5, V)) * 3
    logp = (logits - np.log(np.exp(logits).sum(-1, keepdims=True))).astype(np.float32)
    logits = rng.normal(size=(5, V))
    logq = (logits - np.log(np.exp(logits).sum(-1, keepdims=True))).astype(np.float32)
    conf = 1 - divergences.entropy(logp) / np.log(V)
    np.testing.assert_allclose(windowing.position_scores(logp, logq),
                               conf * divergences.forward_kl(logp, logq), rtol=1e-5)
    np.testing.assert_allclose(windowing.position_scores(logp, logq),
                               _np_scores(np.exp(np.float64(logp)), np.exp(np.float64(logq))),
                               rtol=1e-4)

  def test_chain_window_scores_use_step_i_at_position_s_plus_i(self):
    rng = np.random.default_rng(1)
    k, b, t = 3, 2, 9
    u = rng.random((k, b, t)).astype(np.float32)
    valid = rng.random((k, b, t)) > 0.2
    got = np.asarray(jax.jit(windowing.chain_window_scores)(u, valid))
    for r in range(b):
      for s in range(t):
        if not valid[0, r, s]:
          self.assertEqual(got[r, s], -np.inf)
          continue
        vals = [u[i, r, s + i] for i in range(k) if s + i < t and valid[i, r, s + i]]
        np.testing.assert_allclose(got[r, s], np.mean(vals), rtol=1e-6)
    # the teacher-forced special case is a sliding mean of one row
    flat = np.asarray(windowing.sliding_window_scores(u[0], valid[0], k))
    np.testing.assert_allclose(
        flat, windowing.chain_window_scores(np.repeat(u[:1], k, 0), np.repeat(valid[:1], k, 0)))
    with self.assertRaisesRegex(UserError, "window must be >= 1"):
      windowing.sliding_window_scores(u[0], valid[0], 0)


def _np_greedy(keys, n, window):
  keys = np.array(keys, np.float64)
  out = []
  for _ in range(n):
    r, s = np.unravel_index(np.argmax(keys), keys.shape)
    out.append((int(r), int(s), bool(keys[r, s] > -np.inf)))
    lo, hi = max(0, s - window + 1), s + window
    keys[r, lo:hi] = -np.inf
  return out


class SelectionTest(_StrictTest):

  def test_topk_across_rows_without_overlap(self):
    rng = np.random.default_rng(2)
    scores = rng.random((3, 12)).astype(np.float32)
    scores[0] += 1.0  # a hard sequence: it should host most windows
    scores[2, :] = -np.inf  # an empty row
    scores[1, 7] = 5.0
    fn = jax.jit(windowing.select_nonoverlapping, static_argnums=(1, 2))
    row, start, ok = (np.asarray(x) for x in fn(windowing.selection_keys(
        "topk", None, jnp.asarray(scores), 1.0), 4, 4))
    self.assertEqual(list(zip(row.tolist(), start.tolist(), ok.tolist())),
                     _np_greedy(scores, 4, 4))
    self.assertEqual((row[0], start[0]), (1, 7))
    self.assertGreaterEqual((row == 0).sum(), 2)  # not one window per sequence
    for i in range(4):
      for j in range(i):
        if row[i] == row[j]:
          self.assertGreaterEqual(abs(int(start[i]) - int(start[j])), 4)  # windows [s+1, s+K]
    # the candidates run out: later picks are flagged invalid
    _, _, ok = fn(jnp.asarray(scores), 12, 4)
    self.assertEqual(int(np.sum(ok)), len([x for x in _np_greedy(scores, 12, 4) if x[2]]))
    self.assertFalse(bool(ok[-1]))

  def test_softmax_and_uniform_skip_invalid(self):
    scores = jnp.asarray([[0.0, 1.0, -jnp.inf, 0.5, 2.0, -jnp.inf, 0.1, 0.2]])
    keys = jax.random.split(jax.random.key(0), 64)
    for method in ("softmax", "uniform"):
      pick = jax.jit(jax.vmap(lambda k: windowing.select_nonoverlapping(
          windowing.selection_keys(method, k, scores, 0.5), 6, 1)))
      _, start, ok = pick(keys)
      self.assertTrue(np.all(ok))
      for row in np.asarray(start):
        self.assertLen(set(row.tolist()), 6)
        self.assertFalse({2, 5} & set(row.tolist()))

  def test_softmax_frequencies_follow_softmax(self):
    scores = jnp.asarray([[0.0, 1.0, -0.5, 2.0, 0.5]])
    temperature, draws = 0.7, 20000
    keys = jax.random.split(jax.random.key(42), draws)
    first = jax.jit(jax.vmap(lambda k: jnp.argmax(
        windowing.selection_keys("softmax", k, scores, temperature)[0])))(keys)
    freq = np.bincount(np.asarray(first), minlength=5) / draws
    logits = np.float64(scores[0]) / temperature
    want = np.exp(logits - logits.max())
    want /= want.sum()
    np.testing.assert_allclose(freq, want, atol=5 * np.sqrt(want * (1 - want) / draws).max())

  def test_selection_errors(self):
    with self.assertRaisesRegex(UserError, "temperature must be > 0"):
      windowing.selection_keys("softmax", jax.random.key(0), jnp.zeros((1, 4)), 0.0)
    with self.assertRaisesRegex(UserError, "unknown ADAW selection 'best'.*topk"):
      windowing.selection_keys("best", jax.random.key(0), jnp.zeros((1, 4)), 1.0)
    with self.assertRaisesRegex(UserError, "window >= 1"):
      windowing.select_nonoverlapping(jnp.zeros((1, 4)), 1, 0)


class PoolTest(_StrictTest):

  def test_insert_ring_and_spend(self):
    pool = windowing.init_pool(4, 5)
    self.assertEqual(pool.capacity, 4)
    self.assertTrue(np.all(np.isneginf(pool.scores_PxT)))
    toks = np.arange(10, dtype=np.int32).reshape(2, 5)
    scores = np.arange(10, dtype=np.float32).reshape(2, 5)
    pool = jax.jit(windowing.insert)(pool, 2, toks, np.ones_like(toks), scores)
    np.testing.assert_array_equal(pool.tokens_PxT[2:], toks)
    np.testing.assert_array_equal(pool.mask_PxT[:2], 0)
    np.testing.assert_array_equal(pool.scores_PxT[2:], scores)
    self.assertTrue(np.all(np.isneginf(pool.scores_PxT[:2])))
    spent = windowing.spend(pool, jnp.asarray([3, 0]), jnp.asarray([1, 4]),
                            jnp.asarray([True, False]))
    self.assertEqual(float(spent.scores_PxT[3, 1]), -np.inf)
    want = np.asarray(pool.scores_PxT).copy()
    want[3, 1] = -np.inf
    np.testing.assert_array_equal(spent.scores_PxT, want)  # the invalid pick changed nothing
    with self.assertRaisesRegex(UserError, "capacity >= 1"):
      windowing.init_pool(0, 5)


if __name__ == "__main__":
  absltest.main()
