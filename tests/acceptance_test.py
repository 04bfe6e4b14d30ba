"""Greedy and rejection acceptance against numpy loops, analytic τ, and losslessness."""

from absl.testing import absltest
import jax
import jax.numpy as jnp
import numpy as np

from ppow_jax import acceptance
from ppow_jax import sampling

B, V = 8, 11


# ---------------------------------------------------------------- numpy references (loops)


def _np_greedy(drafts, logits, draft_probs, max_accept):
  b, k = drafts.shape
  a_B = np.zeros(b, np.int32)
  next_B = np.zeros(b, np.int32)
  alpha = np.zeros((b, k), np.float32)
  for r in range(b):
    budget = k if max_accept is None else max_accept[r]
    target = [int(np.argmax(logits[r, i])) for i in range(k + 1)]
    a = 0
    while a < min(k, budget) and drafts[r, a] == target[a]:
      a += 1
    a_B[r], next_B[r] = a, target[a]
    for i in range(k):
      alpha[r, i] = (drafts[r, i] == target[i]) if draft_probs is None else draft_probs[r, i,
                                                                                         target[i]]
  return a_B, next_B, alpha


def _np_rejection(uniforms, gumbel, drafts, q, p, max_accept):
  b, k = drafts.shape
  a_B = np.zeros(b, np.int32)
  next_B = np.zeros(b, np.int32)
  for r in range(b):
    budget = k if max_accept is None else max_accept[r]
    a = 0
    while a < min(k, budget):
      x = drafts[r, a]
      if not uniforms[r, a] * q[r, a, x] < p[r, a, x]:
        break
      a += 1
    if a < min(k, budget):  # rejected: correction from the residual
      law = np.maximum(p[r, a] - q[r, a], 0.0)
      if law.sum() <= acceptance.RESIDUAL_EPS:
        law = p[r, a]
    else:  # bonus (all accepted, or the budget is spent)
      law = p[r, a]
    with np.errstate(divide="ignore"):
      next_B[r] = np.argmax(np.log(law) + gumbel[r])
    a_B[r] = a
  return a_B, next_B


def _np_alpha(p, q):
  return np.minimum(p, q).sum(-1)


def _np_tau(alpha, max_accept=None):
  out = []
  for r, row in enumerate(alpha):
    budget = len(row) if max_accept is None else max_accept[r]
    total, prod = 1.0, 1.0
    for i in range(min(budget, len(row))):
      prod *= float(row[i])
      total += prod
    out.append(total)
  return np.array(out)


def _np_committed(drafts, a_B, next_B):
  b, k = drafts.shape
  out = np.full((b, k + 1), acceptance.PAD_TOKEN, np.int32)
  for r in range(b):
    out[r, :a_B[r]] = drafts[r, :a_B[r]]
    out[r, a_B[r]] = next_B[r]
  return out


# ---------------------------------------------------------------- jitted functions under test

# Compiling dominates on CPU: each jitted function below runs every variant in one graph.
OPTIONAL = ((False, False), (False, True), (True, False), (True, True))


@jax.jit
def _greedy_variants(drafts, logits, draft_probs, max_accept):
  """greedy_accept with and without the optional draft_probs / max_accept (OPTIONAL order)."""
  return [acceptance.greedy_accept(drafts, logits, draft_probs if dp else None,
                                   max_accept if ma else None) for dp, ma in OPTIONAL]


@jax.jit
def _rejection_variants(uniforms, gumbel, drafts, q, p, max_accept):
  """rejection_accept_with_noise without and with max_accept."""
  return [acceptance.rejection_accept_with_noise(uniforms, gumbel, drafts, q, p, ma)
          for ma in (None, max_accept)]


@jax.jit
def _tau_variants(alpha, max_accept):
  return (acceptance.analytic_tau(alpha), acceptance.analytic_tau(alpha, max_accept),
          acceptance.expected_accepted(alpha))


_probs = jax.jit(sampling.probs_from_logits, static_argnames=("temperature", "top_p"))


@jax.jit
def _t0_case(rng, drafts, target_logits, draft_logits, max_accept):
  """Greedy vs rejection on T=0 target probs, for a greedy and a sampling (T=1) drafter.

  Both drafters are stacked along the batch: rows [:B] greedy, rows [B:] sampling.
  """
  q = jnp.concatenate([sampling.probs_from_logits(draft_logits, t) for t in (0.0, 1.0)])
  target_logits = jnp.concatenate([target_logits, target_logits])
  max_accept = jnp.concatenate([max_accept, max_accept])
  p = sampling.probs_from_logits(target_logits, 0.0)
  greedy = acceptance.greedy_accept(drafts, target_logits, q, max_accept)
  rejection = acceptance.rejection_accept(rng, drafts, q, p, max_accept)
  return greedy, rejection


def _softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return (e / e.sum(-1, keepdims=True)).astype(np.float32)


def _rejection_inputs(k, seed):
  """Rows built to cover: all accepted, none accepted, one-hot, q(x) = 0, top-p zeros, random."""
  rng = np.random.default_rng(seed)
  p = _softmax(rng.normal(size=(B, k + 1, V)) * 2)
  q = _softmax(rng.normal(size=(B, k, V)) * 2)
  p[1, :, :V // 2] = 0.0  # row 1: p and q on disjoint halves -> nothing is accepted
  p[1] /= p[1].sum(-1, keepdims=True)
  q[1, :, V // 2:] = 0.0
  q[1] /= q[1].sum(-1, keepdims=True)
  p[2] = np.eye(V, dtype=np.float32)[rng.integers(0, V, k + 1)]  # row 2: one-hot p and q
  q[2] = np.eye(V, dtype=np.float32)[rng.integers(0, V, k)]
  q[2, 0] = p[2, 0]
  p[4, :, ::3] = 0.0  # row 4: target with zeros (as after top-p)
  p[4] /= p[4].sum(-1, keepdims=True)
  q[0] = p[0, :k]  # row 0: q == p -> everything is accepted, the bonus comes from p_K
  q64 = q.astype(np.float64) / q.astype(np.float64).sum(-1, keepdims=True)
  drafts = np.array([[rng.choice(V, p=q64[r, i]) for i in range(k)] for r in range(B)], np.int32)
  q[3, :, drafts[3, 0]] = 0.0  # row 3: q(x) = 0 at the first draft (it accepts iff p(x) > 0)
  q[3] /= q[3].sum(-1, keepdims=True)
  uniforms = rng.uniform(size=(B, k)).astype(np.float32)
  gumbel = rng.gumbel(size=(B, V)).astype(np.float32)
  max_accept = np.array([k, k, k, k, k, 0, max(k - 1, 0), k // 2], np.int32)
  return uniforms, gumbel, drafts, q, p, max_accept


class AcceptanceTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.enterContext(jax.numpy_rank_promotion("raise"))

  def _check_result(self, res, drafts, a_B, next_B, alpha):
    np.testing.assert_array_equal(res.num_accepted_B, a_B)
    np.testing.assert_array_equal(res.next_token_B, next_B)
    np.testing.assert_array_equal(res.committed_BxK1, _np_committed(drafts, a_B, next_B))
    k = drafts.shape[1]
    np.testing.assert_array_equal(res.accepted_BxK, np.arange(k)[None, :] < a_B[:, None])
    np.testing.assert_array_equal(np.take_along_axis(np.asarray(res.committed_BxK1),
                                                     a_B[:, None], 1)[:, 0], next_B)
    np.testing.assert_allclose(res.alpha_BxK, alpha, rtol=1e-6, atol=1e-6)
    for name in ("num_accepted_B", "committed_BxK1", "next_token_B"):
      self.assertEqual(getattr(res, name).dtype, jnp.int32)

  def test_greedy_matches_numpy(self):
    for k in (1, 4):
      rng = np.random.default_rng(k)
      logits = rng.integers(0, 3, size=(B, k + 1, V)).astype(np.float32)  # many argmax ties
      target = logits.argmax(-1)
      drafts = np.where(rng.uniform(size=(B, k)) < 0.7, target[:, :k],
                        rng.integers(0, V, (B, k))).astype(np.int32)
      drafts[0] = target[0, :k]  # all accepted
      drafts[1, 0] = (target[1, 0] + 1) % V  # none accepted
      draft_probs = _softmax(rng.normal(size=(B, k, V)))
      max_accept = np.array([k, k, 0, k, max(k - 1, 0), k, k // 2, k], np.int32)
      results = _greedy_variants(drafts, logits, draft_probs, max_accept)
      for res, (dp, ma) in zip(results, OPTIONAL):
        with self.subTest(k=k, draft_probs=dp, max_accept=ma):
          want = _np_greedy(drafts, logits, draft_probs if dp else None,
                            max_accept if ma else None)
          self._check_result(res, drafts, *want)
      self.assertEqual(int(results[0].num_accepted_B[0]), k)
      self.assertEqual(int(results[0].num_accepted_B[1]), 0)
      self.assertEqual(int(results[1].num_accepted_B[2]), 0)  # zero budget

  def test_rejection_matches_numpy(self):
    for k in (1, 4):
      for seed in range(3):
        uniforms, gumbel, drafts, q, p, max_accept = _rejection_inputs(k, seed)
        results = _rejection_variants(uniforms, gumbel, drafts, q, p, max_accept)
        for res, ma in zip(results, (None, max_accept)):
          with self.subTest(k=k, seed=seed, max_accept=ma is not None):
            a_B, next_B = _np_rejection(uniforms, gumbel, drafts, q, p, ma)
            self._check_result(res, drafts, a_B, next_B, _np_alpha(p[:, :k], q))
            self.assertEqual(a_B[0], k if ma is None else ma[0])  # q == p: all accepted
            self.assertEqual(a_B[1], 0)  # disjoint supports: none accepted
            if ma is not None:
              self.assertEqual(a_B[5], 0)  # zero budget: next token is a draw from p_0
              self.assertEqual(a_B[6], min(a_B[6], k - 1))

  def test_temperature_zero_rejection_is_greedy(self):
    rng = np.random.default_rng(3)
    k = 4
    target_logits = rng.integers(0, 3, size=(B, k + 1, V)).astype(np.float32)
    draft_logits = np.where(rng.uniform(size=(B, k, V)) < 0.6, target_logits[:, :k],
                            rng.integers(0, 3, size=(B, k, V))).astype(np.float32)
    max_accept = np.array([4, 4, 4, 3, 2, 1, 0, 4], np.int32)
    q1 = _softmax(draft_logits).astype(np.float64)
    for seed in range(3):
      sampled = np.array([[rng.choice(V, p=q1[r, i] / q1[r, i].sum()) for i in range(k)]
                          for r in range(B)])
      drafts = np.concatenate([draft_logits.argmax(-1), sampled]).astype(np.int32)
      greedy, rejection = _t0_case(jax.random.key(seed), drafts, target_logits, draft_logits,
                                   max_accept)
      with self.subTest(seed=seed):
        np.testing.assert_array_equal(rejection.num_accepted_B, greedy.num_accepted_B)
        np.testing.assert_array_equal(rejection.committed_BxK1, greedy.committed_BxK1)
        np.testing.assert_array_equal(rejection.next_token_B, greedy.next_token_B)
        np.testing.assert_allclose(rejection.alpha_BxK, greedy.alpha_BxK, atol=1e-6)
        self.assertTrue(np.all(np.asarray(greedy.num_accepted_B) <= np.tile(max_accept, 2)))
        self.assertGreater(int(np.sum(greedy.num_accepted_B)), 0)

  def test_analytic_tau_matches_numpy(self):
    rng = np.random.default_rng(5)
    alpha = rng.uniform(size=(B, 6)).astype(np.float32)
    alpha[0] = 1.0  # tau = K + 1
    alpha[1, 0] = 0.0  # tau = 1
    max_accept = np.array([6, 6, 0, 3, 6, 1, 5, 2], np.int32)
    tau, tau_budget, expected = _tau_variants(alpha, max_accept)
    np.testing.assert_allclose(tau, _np_tau(alpha), rtol=1e-6)
    np.testing.assert_allclose(tau_budget, _np_tau(alpha, max_accept), rtol=1e-6)
    np.testing.assert_allclose(expected, _np_tau(alpha) - 1, rtol=1e-5)
    self.assertEqual(float(tau[0]), 7.0)
    self.assertEqual(float(tau[1]), 1.0)
    self.assertEqual(float(tau_budget[2]), 1.0)


# ---------------------------------------------------------------- losslessness

K_STAT, V_STAT, ROUNDS = 3, 6, 200_000
# (temperature, target top_p) of the fixed position-wise distributions; top_p < 1 puts zeros in p.
CONFIGS = ((1.0, 1.0), (0.7, 1.0), (1.0, 0.95))


def _chain(uniforms, gumbel, drafts, q, p, rule):
  """The chain verifier assembled from the building blocks, optionally with a planted bug."""
  k = drafts.shape[1]
  if rule == "accept_q_over_p":  # bug: accept with prob min(1, q/p)
    flags = acceptance.accept_flags(uniforms, drafts, p[:, :k], q)
  else:
    flags = acceptance.accept_flags(uniforms, drafts, q, p[:, :k])
  a = acceptance.leading_ones(flags)
  p_a = jnp.take_along_axis(p, a[:, None, None], axis=1)[:, 0]
  q_pad = jnp.concatenate([q, jnp.zeros_like(q[:, :1])], axis=1)
  q_a = jnp.take_along_axis(q_pad, a[:, None, None], axis=1)[:, 0]
  if rule == "correction_from_p":  # bug: the correction ignores what q already covered
    q_a = jnp.zeros_like(q_a)
  nxt = sampling.sample_with_gumbel(gumbel, acceptance.residual_probs(p_a, q_a))
  return acceptance.chain_result(drafts, a, nxt, acceptance.alpha_from_probs(p[:, :k], q))


RULES = ("correct", "correction_from_p", "accept_q_over_p")


@jax.jit
def _simulate(rng, p_K1xV, q_KxV):
  """ROUNDS independent windows (position-wise p, q that ignore the prefix), for every rule.

  One compiled graph serves all rules and both temperatures (compiling dominates on CPU).
  Returns counts[rule, j, v] of committed token v at position j over the rounds that committed
  more than j tokens, and the mean committed length per rule.
  """
  d_rng, a_rng, u_rng, g_rng = jax.random.split(rng, 4)
  p = jnp.broadcast_to(p_K1xV, (ROUNDS,) + p_K1xV.shape)
  q = jnp.broadcast_to(q_KxV, (ROUNDS,) + q_KxV.shape)
  drafts = sampling.sample(d_rng, q)
  uniforms = jax.random.uniform(u_rng, (ROUNDS, K_STAT))
  gumbel = jax.random.gumbel(g_rng, (ROUNDS, V_STAT))
  results = [acceptance.rejection_accept(a_rng, drafts, q, p)]
  results += [_chain(uniforms, gumbel, drafts, q, p, rule) for rule in RULES[1:]]
  committed = jnp.stack([res.committed_BxK1[:, :K_STAT] for res in results])
  counts = jnp.sum(jax.nn.one_hot(committed, V_STAT, dtype=jnp.int32), axis=1)  # -1 -> zeros
  mean_committed = jnp.stack([jnp.mean(res.num_committed_B.astype(jnp.float32))
                              for res in results])
  return counts, mean_committed


def _chi_square(counts_V, probs_V):
  """(statistic, dof, p-value) of counts against probs over the bins with nonzero probability."""
  counts_V, probs_V = np.asarray(counts_V, np.float64), np.asarray(probs_V, np.float64)
  support = probs_V > 0
  expected = counts_V.sum() * probs_V[support] / probs_V[support].sum()
  stat = float(np.sum((counts_V[support] - expected) ** 2 / expected))
  dof = int(support.sum()) - 1
  return stat, dof, float(jax.scipy.special.gammaincc(dof / 2.0, stat / 2.0))


def _stat_distributions(temperature, target_top_p):
  rng = np.random.default_rng(11)
  logits_p = rng.normal(size=(K_STAT + 1, V_STAT)).astype(np.float32) * 1.5
  logits_q = logits_p[:K_STAT] + rng.normal(size=(K_STAT, V_STAT)).astype(np.float32)
  p = _probs(logits_p, temperature=temperature, top_p=target_top_p)
  q = _probs(logits_q, temperature=temperature, top_p=1.0)
  return p, q


class LosslessnessTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.enterContext(jax.numpy_rank_promotion("raise"))

  _cache = {}

  def _stats(self, temperature, top_p, rule):
    """Distributions, counts, mean committed length and chi-square per position, for a rule."""
    if (temperature, top_p) not in self._cache:
      p, q = _stat_distributions(temperature, top_p)
      # One fixed seed per config (near-identical configs must not share their noise). An
      # "rbg" key compiles ~3x faster than threefry on CPU; the math does not depend on it.
      seed = CONFIGS.index((temperature, top_p))
      counts, mean_committed = _simulate(jax.random.key(seed, impl="rbg"), p, q)
      self._cache[temperature, top_p] = p, q, np.asarray(counts), np.asarray(mean_committed)
    p, q, counts, mean_committed = self._cache[temperature, top_p]
    r = RULES.index(rule)
    results = [_chi_square(counts[r, j], p[j]) for j in range(K_STAT)]
    return p, q, counts[r], float(mean_committed[r]), results

  def test_committed_tokens_follow_target(self):
    for temperature, top_p in CONFIGS:
      p, q, counts, mean_committed, results = self._stats(temperature, top_p, "correct")
      alpha = np.asarray(acceptance.alpha_from_probs(p[:K_STAT], q))
      print(f"T={temperature} top_p={top_p} alpha={np.round(alpha, 3)} "
            f"rounds committing >j: {counts.sum(-1)} chi2 (stat, dof, p): {results}")
      for j, (_, _, pvalue) in enumerate(results):
        self.assertGreater(pvalue, 1e-3, (temperature, j, results))
        self.assertEqual(counts[j][np.asarray(p[j]) == 0].sum(), 0)  # never a token p forbids
      # E[a + 1] is the analytic tau when p and q do not depend on the prefix.
      tau = float(acceptance.analytic_tau(alpha[None])[0])
      self.assertAlmostEqual(mean_committed, tau, delta=4 * 1.5 / np.sqrt(ROUNDS))

  def test_planted_bugs_fail_the_same_check(self):
    for rule in ("correction_from_p", "accept_q_over_p"):
      for temperature, top_p in CONFIGS:
        _, _, _, _, results = self._stats(temperature, top_p, rule)
        print(f"{rule} T={temperature} top_p={top_p}: chi2 (stat, dof, p): {results}")
        self.assertLess(min(r[2] for r in results), 1e-6, (rule, temperature, results))

  def test_sample_size_detects_one_percent_bias(self):
    # At every position, 1% of mass moved between any two bins must fail the check.
    for temperature, top_p in CONFIGS:
      p, q = _stat_distributions(temperature, top_p)
      alpha = np.asarray(acceptance.alpha_from_probs(p[:K_STAT], q), np.float64)
      worst = 0.0  # the largest p-value over the planted biases
      for pos in range(K_STAT):
        n = ROUNDS * np.prod(alpha[:pos])  # expected rounds that commit a token at pos
        probs = np.asarray(p[pos], np.float64)
        support = np.flatnonzero(probs > 0)
        for i in support:
          for j in support:
            if i != j and probs[j] >= 0.01:
              biased = probs.copy()
              biased[i] += 0.01
              biased[j] -= 0.01
              worst = max(worst, _chi_square(n * biased, probs)[2])
      self.assertLess(worst, 1e-6, (temperature, top_p))

if __name__ == "__main__":
  absltest.main()
