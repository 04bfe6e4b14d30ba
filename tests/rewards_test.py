"""Window rewards and group advantages against float64 numpy."""

from absl.testing import absltest
from absl.testing import parameterized
import os
import jax
import numpy as np

from ppow_jax import cli, rewards
from ppow_jax.errors import UserError

BASE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
                    "tiny.py")


N, K, V = 12, 5, 6
KW = dict(lambda_prox=1.0, use_speed=True, use_prox=True, speed_form="paper",
          prox_form="indicator", prox_eta=1.0, prox_eps=1.0)


def _np_expected_length(beta, valid=None):
  beta = np.float64(beta)
  out = np.zeros(beta.shape[0])
  for n in range(beta.shape[0]):
    run = 1.0
    for k in range(beta.shape[1]):
      if valid is not None and not valid[n, k]:
        break
      run *= beta[n, k]
      out[n] += run
  return out


def _np_gap(logp, sampled, valid):
  logp = np.float64(logp)
  out = np.zeros(logp.shape[0])
  for n in range(logp.shape[0]):
    for k in range(logp.shape[1]):
      if valid[n, k]:
        out[n] += logp[n, k].max() - logp[n, k, sampled[n, k]]
  return out


def _np_advantages(r, delta):
  r = np.float64(r)
  return (r - r.mean(-1, keepdims=True)) / (r.std(-1, keepdims=True) + delta)


def _log_softmax(x):
  x = np.float64(x)
  return x - np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True)) - x.max(
      -1, keepdims=True)


class RewardsTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    self.enterContext(jax.numpy_rank_promotion("raise"))
    rng = np.random.default_rng(0)
    self.accepted = rng.integers(0, K + 1, N)
    self.valid = np.arange(K)[None, :] < rng.integers(0, K + 1, N)[:, None]

  def test_speed_reward_forms(self):
    a, gamma = self.accepted, 0.15
    fn = jax.jit(rewards.speed_reward, static_argnames="form")
    np.testing.assert_allclose(fn(a, K, gamma, "paper"), a / (a * gamma + 1), rtol=1e-6)
    n_drafted = np.full(N, K) - (np.arange(N) % 2)
    np.testing.assert_allclose(fn(a, n_drafted, gamma, "committed_per_cost"),
                               (a + 1) / (1 + gamma * n_drafted), rtol=1e-6)
    # the paper's form: nothing for a = 0, saturating at 1/γ
    np.testing.assert_allclose(fn(np.array([0, 1000]), K, 0.5, "paper"), [0.0, 1.998],
                               rtol=1e-3)
    with self.assertRaisesRegex(UserError, "speed reward form 'fast'"):
      rewards.speed_reward(a, K, gamma, "fast")
    with self.assertRaisesRegex(UserError, "gamma"):
      rewards.speed_reward(a, K, -0.1, "paper")

  def test_default_speed_reward_keeps_gamma_after_standardisation(self):
    """With a fixed window, (a+1)/(1+γK) loses γ in the group standardisation; a/(aγ+1) not."""
    c = cli.load_config(BASE)
    self.assertEqual(c.ppow.speed_form, "paper")
    acc = np.array([[0, 1, 2, 5, 6, 6, 3, 0]])

    def adv(gamma, form):
      r = rewards.speed_reward(acc, c.ppow.window, gamma, form)
      return np.asarray(rewards.group_advantages(r, 1e-6, 0.0))

    spread = lambda form: max(np.abs(adv(g, form) - adv(0.1, form)).max() for g in (1.0, 10.0))
    self.assertLess(spread("committed_per_cost"), 1e-4)
    self.assertGreater(spread(c.ppow.speed_form), 0.1)

  def test_expected_length_depends_on_every_sampled_token(self):
    rng = np.random.default_rng(3)
    logp = _log_softmax(rng.normal(size=(N, K, V)) * 2).astype(np.float32)
    logq = _log_softmax(rng.normal(size=(N, K, V)) * 2).astype(np.float32)
    # one group: the same distributions at position 0, different sampled first tokens
    logp[:, 0], logq[:, 0] = logp[0, 0], logq[0, 0]
    tokens = rng.integers(0, V, (N, K))
    tokens[:V, 0] = np.arange(V)
    beta = np.asarray(jax.jit(rewards.sampled_accept_probs)(logp, logq, tokens))
    p = np.exp(np.float64(logp))
    q = np.exp(np.float64(logq))
    n_idx, k_idx = np.arange(N)[:, None], np.arange(K)[None, :]
    want = np.minimum(1.0, p[n_idx, k_idx, tokens] / q[n_idx, k_idx, tokens])
    np.testing.assert_allclose(beta, want, rtol=1e-5)
    fn = jax.jit(rewards.expected_length_reward)
    np.testing.assert_allclose(fn(beta), _np_expected_length(want), rtol=1e-5)
    np.testing.assert_allclose(fn(beta, self.valid), _np_expected_length(want, self.valid),
                               rtol=1e-5)
    # β₀ differs across the group (α₀ = Σ min(p₀, q₀) would be one number for all of it)
    self.assertGreater(np.ptp(beta[:V, 0]), 0.1)
    # E[a | ŷ] over the coins equals the mean accepted length of many replays
    u = rng.random((20000, K))
    flags = u < want[1][None]
    a = np.argmin(np.concatenate([flags, np.zeros((len(u), 1), bool)], 1), axis=1)
    np.testing.assert_allclose(fn(beta)[1], a.mean(), rtol=0.05, atol=0.02)
    ones, zeros = np.ones((2, K), np.float32), np.zeros((2, K), np.float32)
    np.testing.assert_allclose(fn(ones), [K, K])
    np.testing.assert_allclose(fn(zeros), [0, 0])

  def test_greedy_log_prob_gap_and_indicator(self):
    rng = np.random.default_rng(1)
    logp = _log_softmax(rng.normal(size=(N, K, V)) * 2).astype(np.float32)
    sampled = rng.integers(0, V, (N, K))
    sampled[0] = logp[0].argmax(-1)  # the greedy window itself: Δ = 0
    logp[1, 0, sampled[1, 0]] = -np.inf  # a token the target never emits: Δ large but finite
    valid = self.valid | (np.arange(N) < 2)[:, None]
    fn = jax.jit(rewards.greedy_log_prob_gap)
    delta = fn(logp, sampled, valid)
    want = _np_gap(np.maximum(logp, rewards.LOG_FLOOR), sampled, valid)
    np.testing.assert_allclose(delta, want, rtol=1e-5, atol=1e-5)
    self.assertEqual(float(delta[0]), 0.0)
    self.assertTrue(np.isfinite(delta[1]) and delta[1] > 90)
    # only rejected windows (a = 0) earn the proximity credit
    accepted = np.arange(N) % 3
    ind = rewards.proximity_indicator(delta, accepted, eta=0.5, eps=1.0)
    np.testing.assert_allclose(ind, 0.5 * ((want < 1.0) & (accepted == 0)))
    self.assertTrue(np.any((want < 1.0) & (accepted > 0)))  # the gate matters here

  def test_masked_median(self):
    rng = np.random.default_rng(2)
    fn = jax.jit(rewards.masked_median)
    for n in (7, 9):
      x = rng.normal(size=n).astype(np.float32)
      mask = np.arange(n) % 3 != 1
      want = np.sort(x[mask])[(mask.sum() - 1) // 2]  # the lower median of the masked values
      self.assertEqual(float(fn(x, mask)), float(want))
    self.assertEqual(float(fn(np.ones(4, np.float32), np.zeros(4, bool))), 0.0)

  def test_total_reward_components_and_switches(self):
    rng = np.random.default_rng(4)
    beta = rng.random((N, K)).astype(np.float32)
    delta = np.linspace(0, 3, N).astype(np.float32)
    kw = dict(KW, lambda_prox=0.3, prox_eta=2.0, prox_eps=1.5)
    fn = jax.jit(rewards.total_reward, static_argnames=tuple(kw) + ("gamma",))
    a = self.accepted
    speed = a / (a * 0.1 + 1)
    ind = 2.0 * ((delta < 1.5) & (a == 0))
    total, comp = fn(a, K, gamma=0.1, delta_N=delta, **kw)
    np.testing.assert_allclose(total, speed + 0.3 * ind, rtol=1e-5)
    np.testing.assert_allclose(comp["speed"], speed, rtol=1e-5)
    np.testing.assert_allclose(comp["prox"], ind, rtol=1e-5)
    total, comp = fn(a, K, gamma=0.1, delta_N=delta, **dict(kw, use_prox=False))
    np.testing.assert_allclose(total, speed, rtol=1e-5)
    np.testing.assert_array_equal(comp["prox"], 0.0)
    total, _ = fn(a, K, gamma=0.1, accept_NxK=beta, valid_NxK=self.valid,
                  **dict(kw, use_speed=False, prox_form="expected_length"))
    np.testing.assert_allclose(total, 0.3 * _np_expected_length(beta, self.valid), rtol=1e-5)
    g = jax.grad(lambda b: rewards.total_reward(
        a, K, gamma=0.1, accept_NxK=b, **dict(kw, prox_form="expected_length"))[0].sum())(beta)
    np.testing.assert_array_equal(g, 0.0)  # the reward is a constant for the policy gradient

  def test_total_reward_errors(self):
    a = self.accepted
    with self.assertRaisesRegex(UserError, "use_speed and use_prox"):
      rewards.total_reward(a, K, gamma=0.1, **dict(KW, use_speed=False, use_prox=False))
    with self.assertRaisesRegex(UserError, "needs accept_NxK"):
      rewards.total_reward(a, K, gamma=0.1, **dict(KW, prox_form="expected_length"))
    with self.assertRaisesRegex(UserError, "needs delta_N"):
      rewards.total_reward(a, K, gamma=0.1, **KW)
    with self.assertRaisesRegex(UserError, "proximity reward form 'dense'"):
      rewards.total_reward(a, K, gamma=0.1, **dict(KW, prox_form="dense"))

  def test_group_advantages(self):
    rng = np.random.default_rng(2)
    r = (rng.random((4, 8)) * 3).astype(np.float32)
    r[1] = 0.1  # a constant group: no signal, exactly 0 (not NaN, not round-off / delta)
    r[2, :4] = 7.0
    fn = jax.jit(rewards.group_advantages)
    adv = np.asarray(fn(r, 1e-6, 1e-3))
    np.testing.assert_allclose(adv, _np_advantages(r, 1e-6), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(adv[1], 0.0)
    np.testing.assert_allclose(adv[[0, 2, 3]].mean(-1), 0.0, atol=1e-6)
    np.testing.assert_allclose(adv[[0, 2, 3]].std(-1), 1.0, rtol=1e-4)  # population std
    np.testing.assert_allclose(fn(r.reshape(2, 2, 8), 1e-6, 1e-3).reshape(4, 8), adv, rtol=1e-6)

  def test_tiny_group_spread_gives_zero_advantage(self):
    """A reward spread of 3e-4 is noise: with only δ = 1e-6 it became advantages of O(1)."""
    r = np.array([[1.0, 1.0003, 1.0, 1.0, 1.0001, 1.0, 1.0, 1.0],
                  [0.0, 1.0, 0.0, 2.0, 0.0, 0.0, 1.0, 0.0]], np.float32)
    fn = jax.jit(rewards.group_advantages)
    unguarded = np.asarray(fn(r, 1e-6, 0.0))
    self.assertGreater(np.abs(unguarded[0]).max(), 0.5)
    c = cli.load_config(BASE).ppow
    adv = np.asarray(fn(r, c.adv_delta, c.adv_min_std))
    np.testing.assert_array_equal(adv[0], 0.0)
    np.testing.assert_allclose(adv[1], _np_advantages(r[1:], c.adv_delta)[0], rtol=1e-5)
    with self.assertRaisesRegex(UserError, "min_std"):
      rewards.group_advantages(r, 1e-6, -1.0)


if __name__ == "__main__":
  absltest.main()
