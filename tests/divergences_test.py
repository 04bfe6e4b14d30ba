"""Token-level divergences against float64 numpy, plus -inf / gradient safety."""

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np

from ppow_jax import divergences
from ppow_jax.errors import UserError

V = 7
DRAFT_VOCAB = 5  # the drafter puts -inf on tokens >= DRAFT_VOCAB in the "reduced vocab" tests


def _log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _random_logp(seed, shape=(3, 4, V), scale=2.0):
  return _log_softmax(np.random.default_rng(seed).normal(size=shape) * scale).astype(np.float32)


def _np_xlog_ratio(logw, loga, logb):
  """Σ w (log a − log b) in float64, 0 where w == 0, logs floored like the library."""
  logw, loga, logb = (np.asarray(x, np.float64) for x in (logw, loga, logb))
  w = np.exp(logw)
  floor = divergences.LOG_FLOOR
  term = w * (np.maximum(loga, floor) - np.maximum(logb, floor))
  return np.where(w > 0, term, 0.0).sum(-1)


def _np_divergence(name, logp, logq):
  p, q = np.exp(np.float64(logp)), np.exp(np.float64(logq))
  if name == "forward_kl":
    return _np_xlog_ratio(logp, logp, logq)
  if name == "reverse_kl":
    return _np_xlog_ratio(logq, logq, logp)
  if name == "jsd":
    with np.errstate(divide="ignore"):
      logm = np.log((np.exp(np.maximum(np.float64(logp), divergences.LOG_FLOOR)) +
                     np.exp(np.maximum(np.float64(logq), divergences.LOG_FLOOR))) / 2)
    return 0.5 * (_np_xlog_ratio(logp, logp, logm) + _np_xlog_ratio(logq, logq, logm))
  alpha = np.minimum(p, q).sum(-1)
  if name == "tv":
    return 1.0 - alpha
  if name == "neg_log_alpha":
    return -np.log(alpha + divergences.ALPHA_EPS)
  raise ValueError(name)


def _reduced_vocab_logq(logits):
  """log_softmax with -inf outside the draft vocab, as an EAGLE-3 head mapped to V."""
  return jax.nn.log_softmax(jnp.where(jnp.arange(V) < DRAFT_VOCAB, logits, -jnp.inf))


class DivergencesTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    self.enterContext(jax.numpy_rank_promotion("raise"))

  @parameterized.parameters(*divergences.DIVERGENCES)
  def test_matches_numpy(self, name):
    logp, logq = _random_logp(0), _random_logp(1)
    got = jax.jit(divergences.DIVERGENCES[name])(logp, logq)
    np.testing.assert_allclose(got, _np_divergence(name, logp, logq), rtol=1e-5, atol=1e-6)

  @parameterized.parameters(*divergences.DIVERGENCES)
  def test_reduced_draft_vocab_matches_numpy(self, name):
    logp = _random_logp(2)
    logq = np.asarray(_reduced_vocab_logq(_random_logp(3)))
    self.assertTrue(np.isneginf(logq).any())
    got = jax.jit(divergences.DIVERGENCES[name])(logp, logq)
    self.assertTrue(np.isfinite(got).all())
    np.testing.assert_allclose(got, _np_divergence(name, logp, logq), rtol=1e-5, atol=1e-6)

  @parameterized.parameters(*divergences.DIVERGENCES)
  def test_gradients_finite_with_inf_and_huge_negative_entries(self, name):
    # Drafter: -inf outside the draft vocab. Target: one -inf and one float32-min entry.
    logp = _random_logp(4)
    logp[..., 0] = -np.inf
    logp[..., 1] = np.finfo(np.float32).min
    logp = _log_softmax(logp).astype(np.float32)
    logits = jnp.asarray(_random_logp(5))
    mask = np.random.default_rng(6).random(logp.shape[:-1]) < 0.7
    loss = lambda lg, lp: divergences.DIVERGENCES[name](lp, _reduced_vocab_logq(lg)).sum()
    token = lambda lg: divergences.token_loss(name, logp, _reduced_vocab_logq(lg), mask)
    (value, (g_logits, g_logp)), g_token = jax.jit(lambda lg, lp: (
        jax.value_and_grad(loss, argnums=(0, 1))(lg, lp), jax.grad(token)(lg)))(logits, logp)
    self.assertTrue(np.isfinite(value))
    self.assertTrue(np.isfinite(g_logits).all() and np.isfinite(g_logp).all())
    self.assertTrue(np.any(g_logits != 0))
    self.assertTrue(np.isfinite(g_token).all())
    # Logits outside the draft vocab cannot move the loss.
    np.testing.assert_array_equal(g_token[..., DRAFT_VOCAB:], 0.0)

  @parameterized.parameters(*divergences.DIVERGENCES)
  def test_zero_when_equal(self, name):
    logp = _random_logp(7)
    got = jax.jit(divergences.DIVERGENCES[name])(logp, logp)
    floor = -np.log1p(divergences.ALPHA_EPS) if name == "neg_log_alpha" else 0.0
    np.testing.assert_allclose(got, floor, atol=2e-6)

  def test_forward_kl_gradient_is_soft_cross_entropy_gradient(self):
    logp, logits = _random_logp(8), jnp.asarray(_random_logp(9))
    kl = lambda lg: divergences.forward_kl(logp, jax.nn.log_softmax(lg)).sum()
    ce = lambda lg: divergences.cross_entropy(logp, jax.nn.log_softmax(lg)).sum()
    logq = _log_softmax(np.asarray(logits))

    @jax.jit
    def run(logits):
      ce_minus_h = divergences.cross_entropy(logp, logq) - divergences.entropy(logp)
      return (jax.grad(kl)(logits), jax.grad(ce)(logits), divergences.forward_kl(logp, logq),
              ce_minus_h)

    g_kl, g_ce, kl_value, ce_minus_h = run(logits)
    np.testing.assert_allclose(g_kl, g_ce, atol=1e-6)
    # Closed form of the soft-CE gradient wrt logits: q − p.
    q_minus_p = np.exp(_log_softmax(np.float64(logits))) - np.exp(np.float64(logp))
    np.testing.assert_allclose(g_kl, q_minus_p, atol=1e-6)
    np.testing.assert_allclose(kl_value, ce_minus_h, rtol=1e-5, atol=1e-6)

  def test_entropy_and_alpha_match_numpy(self):
    logp, logq = _random_logp(10), _random_logp(11)
    logp[0, 0, :3] = -np.inf  # 0 log 0 = 0
    logp = _log_softmax(logp)
    p, q = np.exp(np.float64(logp)), np.exp(np.float64(logq))
    entropy, alpha, tv, jsd = jax.jit(lambda lp, lq: (
        divergences.entropy(lp), divergences.alpha(lp, lq), divergences.tv(lp, lq),
        divergences.jsd(lp, lq)))(logp, logq)
    np.testing.assert_allclose(entropy, -(p * np.log(np.where(p > 0, p, 1.0))).sum(-1),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(alpha, np.minimum(p, q).sum(-1), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(tv, 0.5 * np.abs(p - q).sum(-1), rtol=1e-5, atol=1e-6)
    self.assertTrue(np.all(np.asarray(jsd) <= np.log(2) + 1e-6))

  @parameterized.parameters("forward_kl", "tv")
  def test_token_loss_is_masked_mean(self, name):
    logp, logq = _random_logp(12), _random_logp(13)
    mask = np.random.default_rng(14).random(logp.shape[:-1]) < 0.5
    per_pos = _np_divergence(name, logp, logq)
    fn = jax.jit(divergences.token_loss, static_argnums=0)
    np.testing.assert_allclose(fn(name, logp, logq, mask), per_pos[mask].mean(), rtol=1e-5)
    np.testing.assert_allclose(fn(name, logp, logq), per_pos.mean(), rtol=1e-5)
    self.assertEqual(float(fn(name, logp, logq, np.zeros_like(mask))), 0.0)

  def test_token_loss_stops_target_gradient(self):
    logp, logq = _random_logp(15), _random_logp(16)
    g = jax.jit(jax.grad(lambda lp: divergences.token_loss("forward_kl", lp, logq)))(logp)
    np.testing.assert_array_equal(g, 0.0)

  def test_unknown_divergence_names_the_options(self):
    with self.assertRaisesRegex(UserError, "kl_forward.*forward_kl.*neg_log_alpha"):
      divergences.get_divergence("kl_forward")
    with self.assertRaisesRegex(UserError, "mask shape"):
      divergences.token_loss("tv", _random_logp(0), _random_logp(1), np.ones((3,), bool))

  @parameterized.parameters("forward_kl", "jsd")
  def test_eagle3_ttt_loss_matches_numpy(self, name):
    steps, decay = 3, 0.8
    logp = _random_logp(17, (steps, 2, 4, V))
    logq = np.asarray(_reduced_vocab_logq(_random_logp(18, (steps, 2, 4, V))))
    mask = np.random.default_rng(19).random((steps, 2, 4)) < 0.6
    mask[2] = False  # a step with nothing to learn contributes 0, not NaN
    per_pos = _np_divergence(name, logp, logq)
    want = sum(decay**i * (per_pos[i][mask[i]].mean() if mask[i].any() else 0.0)
               for i in range(steps))
    fn = jax.jit(divergences.eagle3_ttt_loss, static_argnames=("divergence", "decay"))
    np.testing.assert_allclose(fn(logp, logq, mask, divergence=name, decay=decay), want,
                               rtol=1e-5)
    g = jax.jit(jax.grad(lambda lg: divergences.eagle3_ttt_loss(
        logp, _reduced_vocab_logq(lg), mask, name)))(jnp.asarray(logp))
    self.assertTrue(np.isfinite(g).all())
    with self.assertRaisesRegex(UserError, "S, B, T, V"):
      divergences.eagle3_ttt_loss(logp[0], logq[0], mask[0], name)

  def test_restrict_to_support(self):
    logp = _random_logp(20)
    logq = np.asarray(_reduced_vocab_logq(_random_logp(21)))
    restricted, ok = jax.jit(divergences.restrict_to_support)(logp, logq)
    p = np.exp(np.float64(logp))
    want = np.where(np.arange(V) < DRAFT_VOCAB, p, 0.0)
    want /= want.sum(-1, keepdims=True)
    np.testing.assert_allclose(np.exp(restricted), want, rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(ok, p.argmax(-1) < DRAFT_VOCAB)
    # With the target restricted, forward KL is the exact in-vocab KL (no floor charge).
    q = np.exp(np.float64(logq))[..., :DRAFT_VOCAB]
    exact = (want[..., :DRAFT_VOCAB] * np.log(want[..., :DRAFT_VOCAB] / q)).sum(-1)
    np.testing.assert_allclose(jax.jit(divergences.forward_kl)(restricted, logq), exact,
                               rtol=1e-5, atol=1e-6)


if __name__ == "__main__":
  absltest.main()
