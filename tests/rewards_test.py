"""Window rewards and group advantages against float64 numpy."""

from absl.testing import absltest
from absl.testing import parameterized
import jax
import numpy as np

from ppow_jax import rewards
from ppow_jax.errors import UserError

N, K, V = 12, 5, 6


def _np_prox(alpha, valid=None):
  alpha = np.float64(alpha)
  out = np.zeros(alpha.shape[0])
  for n in range(alpha.shape[0]):
    run = 1.0
    for k in range(alpha.shape[1]):
      if valid is not None and not valid[n, k]:
        break
      run *= alpha[n, k]
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


class RewardsTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    rng = np.random.default_rng(0)
    self.accepted = rng.integers(0, K + 1, N)
    self.alpha = rng.random((N, K)).astype(np.float32)
    self.valid = np.arange(K)[None, :] < rng.integers(0, K + 1, N)[:, None]

  def test_speed_reward_forms(self):
    a, gamma = self.accepted, 0.15
    fn = jax.jit(rewards.speed_reward, static_argnames="form")
    np.testing.assert_allclose(fn(a, K, gamma), (a + 1) / (1 + gamma * K), rtol=1e-6)
    n_drafted = np.full(N, K) - (np.arange(N) % 2)
    np.testing.assert_allclose(fn(a, n_drafted, gamma), (a + 1) / (1 + gamma * n_drafted),
                               rtol=1e-6)
    np.testing.assert_allclose(fn(a, K, gamma, form="paper_summary"), a / (a * gamma + 1),
                               rtol=1e-6)
    # None accepted still commits the target's one token; all accepted commits K + 1.
    np.testing.assert_allclose(fn(np.array([0, K]), K, 0.0), [1.0, K + 1.0])
    with self.assertRaisesRegex(UserError, "speed reward form 'fast'"):
      rewards.speed_reward(a, K, gamma, form="fast")
    with self.assertRaisesRegex(UserError, "gamma"):
      rewards.speed_reward(a, K, -0.1)

  def test_proximity_reward(self):
    fn = jax.jit(rewards.proximity_reward)
    np.testing.assert_allclose(fn(self.alpha), _np_prox(self.alpha), rtol=1e-5)
    np.testing.assert_allclose(fn(self.alpha, self.valid), _np_prox(self.alpha, self.valid),
                               rtol=1e-5)
    ones, zeros = np.ones((2, K), np.float32), np.zeros((2, K), np.float32)
    np.testing.assert_allclose(fn(ones), [K, K])  # every position surely accepted
    np.testing.assert_allclose(fn(zeros), [0, 0])  # the first position surely rejected

  def test_greedy_log_prob_gap_and_indicator(self):
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(N, K, V)) * 2
    logp = (logits - np.log(np.exp(logits).sum(-1, keepdims=True))).astype(np.float32)
    sampled = rng.integers(0, V, (N, K))
    sampled[0] = logp[0].argmax(-1)  # the greedy window itself: Δ = 0
    logp[1, 0, sampled[1, 0]] = -np.inf  # a token the target never emits: Δ large but finite
    fn = jax.jit(rewards.greedy_log_prob_gap)
    delta = fn(logp, sampled, self.valid | (np.arange(N) < 2)[:, None])
    want = _np_gap(np.maximum(logp, rewards.LOG_FLOOR), sampled,
                   self.valid | (np.arange(N) < 2)[:, None])
    np.testing.assert_allclose(delta, want, rtol=1e-5, atol=1e-5)
    self.assertEqual(float(delta[0]), 0.0)
    self.assertTrue(np.isfinite(delta[1]) and delta[1] > 90)
    np.testing.assert_allclose(fn(logp, sampled), _np_gap(logp.clip(-100), sampled,
                                                          np.ones((N, K), bool)), rtol=1e-5)
    ind = rewards.proximity_indicator(delta, eta=0.5, eps=1.0)
    np.testing.assert_allclose(ind, 0.5 * (want < 1.0))

  def test_total_reward_components_and_switches(self):
    kw = dict(gamma=0.1, lambda_prox=0.3)
    fn = jax.jit(rewards.total_reward, static_argnames=(
        "gamma", "lambda_prox", "use_speed", "use_prox", "prox_form", "eta", "eps"))
    speed = (self.accepted + 1) / (1 + 0.1 * K)
    prox = _np_prox(self.alpha, self.valid)
    total, comp = fn(self.accepted, K, self.alpha, self.valid, **kw)
    np.testing.assert_allclose(total, speed + 0.3 * prox, rtol=1e-5)
    np.testing.assert_allclose(comp["speed"], speed, rtol=1e-5)
    np.testing.assert_allclose(comp["prox"], prox, rtol=1e-5)
    np.testing.assert_allclose(comp["total"], total)
    total, comp = fn(self.accepted, K, self.alpha, self.valid, use_prox=False, **kw)
    np.testing.assert_allclose(total, speed, rtol=1e-5)
    np.testing.assert_array_equal(comp["prox"], 0.0)
    total, _ = fn(self.accepted, K, self.alpha, self.valid, use_speed=False, **kw)
    np.testing.assert_allclose(total, 0.3 * prox, rtol=1e-5)
    delta = np.linspace(0, 3, N).astype(np.float32)
    total, _ = fn(self.accepted, K, delta_N=delta, prox_form="indicator", eta=2.0, eps=1.5, **kw)
    np.testing.assert_allclose(total, speed + 0.3 * 2.0 * (delta < 1.5), rtol=1e-5)
    # The reward is a constant for the policy gradient.
    g = jax.grad(lambda al: rewards.total_reward(self.accepted, K, al, **kw)[0].sum())(self.alpha)
    np.testing.assert_array_equal(g, 0.0)

  def test_total_reward_errors(self):
    with self.assertRaisesRegex(UserError, "use_speed and use_prox"):
      rewards.total_reward(self.accepted, K, self.alpha, gamma=0.1, use_speed=False,
                           use_prox=False)
    with self.assertRaisesRegex(UserError, "needs alpha_NxK"):
      rewards.total_reward(self.accepted, K, gamma=0.1)
    with self.assertRaisesRegex(UserError, "needs delta_N"):
      rewards.total_reward(self.accepted, K, self.alpha, gamma=0.1, prox_form="indicator")
    with self.assertRaisesRegex(UserError, "proximity reward form 'dense'"):
      rewards.total_reward(self.accepted, K, self.alpha, gamma=0.1, prox_form="dense")

  def test_group_advantages(self):
    rng = np.random.default_rng(2)
    r = (rng.random((4, 8)) * 3).astype(np.float32)
    r[1] = 0.1  # a constant group: no signal, exactly 0 (not NaN, not round-off / delta)
    r[2, :4] = 7.0
    fn = jax.jit(rewards.group_advantages)
    adv = np.asarray(fn(r))
    np.testing.assert_allclose(adv, _np_advantages(r, 1e-6), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(adv[1], 0.0)
    np.testing.assert_allclose(adv[[0, 2, 3]].mean(-1), 0.0, atol=1e-6)
    np.testing.assert_allclose(adv[[0, 2, 3]].std(-1), 1.0, rtol=1e-4)  # population std
    # Leading axes are groups too; a flat batch is reshaped by the caller.
    np.testing.assert_allclose(fn(r.reshape(2, 2, 8)).reshape(4, 8), adv, rtol=1e-6)


if __name__ == "__main__":
  absltest.main()
