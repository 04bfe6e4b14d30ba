"""Temperature, top-p and sampling against plain numpy."""

from absl.testing import absltest
import jax
import jax.numpy as jnp
import numpy as np

from ppow_jax import sampling
from ppow_jax.errors import UserError


def _np_probs(logits_BxV: np.ndarray, temperature: float, top_p: float) -> np.ndarray:
  """Reference with loops: softmax, then the nucleus grown token by token until mass >= top_p."""
  out = np.zeros(logits_BxV.shape, np.float64)
  for b, logits in enumerate(logits_BxV.astype(np.float64)):
    if temperature == 0:
      out[b, int(np.argmax(logits))] = 1.0
      continue
    z = logits / temperature
    probs = np.exp(z - z.max())
    probs /= probs.sum()
    mass, last = 0.0, None
    for v in np.argsort(-probs, kind="stable"):
      if last is not None and mass >= top_p:
        break
      mass += probs[v]
      last = probs[v]
    probs = np.where(probs >= last, probs, 0.0)  # ties with the last kept token stay
    out[b] = probs / probs.sum()
  return out


GRID = ((0.0, 1.0), (0.0, 0.5), (0.7, 1.0), (0.7, 0.9), (0.7, 0.5), (0.7, 0.05), (1.0, 1.0),
        (1.0, 0.9), (1.0, 0.5), (1.0, 0.05))


@jax.jit
def _grid(logits):
  """probs_from_logits at every (temperature, top_p) of GRID, in one compile."""
  return {tp: sampling.probs_from_logits(logits, *tp) for tp in GRID}


_sample = jax.jit(sampling.sample)


class SamplingTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.enterContext(jax.numpy_rank_promotion("raise"))
    rng = np.random.default_rng(0)
    self.logits_BxV = rng.normal(size=(16, 11)).astype(np.float32) * 2.0
    # Integer logits give ties, including at the argmax.
    self.tied_BxV = rng.integers(0, 3, size=(16, 11)).astype(np.float32)

  def test_greedy_is_one_hot_of_first_argmax(self):
    for logits in (self.logits_BxV, self.tied_BxV):
      grid = _grid(logits)
      probs = np.asarray(grid[0.0, 1.0])
      self.assertEqual(probs.dtype, np.float32)
      np.testing.assert_array_equal(probs, _np_probs(logits, 0, 1.0))
      np.testing.assert_array_equal(probs.argmax(-1), logits.argmax(-1))
      np.testing.assert_array_equal(grid[0.0, 0.5], probs)  # top_p is ignored at T=0

  def test_greedy_is_numpy_argmax_with_ties_to_the_lowest_index(self):
    greedy = jax.jit(sampling.greedy)
    # Ties everywhere (integer logits), including the max at index 0 and at the last index.
    edges_BxV = np.zeros((2, 11), np.float32)
    edges_BxV[0, 0] = edges_BxV[0, 5] = 1.0
    edges_BxV[1, -1] = 1.0
    for logits in (self.logits_BxV, self.tied_BxV, edges_BxV, self.tied_BxV.reshape(4, 4, 11)):
      got = np.asarray(greedy(logits))
      self.assertEqual(got.dtype, np.int32)
      np.testing.assert_array_equal(got, logits.argmax(-1))
    nan_1xV = np.array([[0.0, np.nan, 1.0]], np.float32)  # no maximum: still a valid index
    self.assertEqual(int(greedy(nan_1xV)[0]), 2)

  def test_temperature_and_top_p_match_numpy(self):
    for logits in (self.logits_BxV, self.tied_BxV):
      grid = _grid(logits)
      for temperature, top_p in GRID:
        with self.subTest(temperature=temperature, top_p=top_p):
          probs = np.asarray(grid[temperature, top_p])
          want = _np_probs(logits, temperature, top_p)
          np.testing.assert_allclose(probs, want, rtol=1e-5, atol=1e-6)
          np.testing.assert_array_equal(probs > 0, want > 0)
          if top_p == 0.05:  # only the top token (and its ties) survive
            np.testing.assert_array_equal(probs > 0, logits == logits.max(-1, keepdims=True))

  def test_top_p_keeps_boundary_ties(self):
    # The top token alone has mass 0.71 < 0.9, so the three tied tokens enter together,
    # although two of them would reach 0.9.
    logits = np.array([[3.0, 1.0, 1.0, 1.0, -5.0]], np.float32)
    probs = np.asarray(sampling.probs_from_logits(logits, 1.0, 0.9))
    np.testing.assert_array_equal(probs[0] > 0, [True, True, True, True, False])
    mass = np.exp(logits[0]) / np.exp(logits[0]).sum()
    self.assertGreaterEqual(mass[0] + 2 * mass[1], 0.9)  # two of the three ties would suffice

  def test_sample_one_hot_is_exact(self):
    probs = _grid(self.tied_BxV)[0.0, 1.0]
    for seed in range(3):
      tokens = _sample(jax.random.key(seed), probs)
      self.assertEqual(tokens.dtype, jnp.int32)
      np.testing.assert_array_equal(tokens, self.tied_BxV.argmax(-1))

  def test_sample_frequencies(self):
    probs_V = np.array([0.5, 0.3, 0.15, 0.05, 0.0], np.float32)
    n = 40_000
    tokens = _sample(jax.random.key(1), jnp.broadcast_to(probs_V, (n, 5)))
    freq = np.bincount(np.asarray(tokens), minlength=5) / n
    self.assertEqual(freq[4], 0.0)
    np.testing.assert_allclose(freq, probs_V, atol=0.01)  # ~4 standard errors

  def test_invalid_values_raise(self):
    logits = jnp.zeros((2, 3))
    for bad in (-0.5, float("nan"), float("inf"), True, jnp.float32(1.0), "1"):
      with self.subTest(temperature=bad):
        with self.assertRaisesRegex(UserError, "temperature"):
          sampling.probs_from_logits(logits, bad)
    for bad in (0.0, -0.1, 1.5, float("nan"), None):
      with self.subTest(top_p=bad):
        with self.assertRaisesRegex(UserError, "top_p.*" + repr(bad).replace("(", r"\(")):
          sampling.probs_from_logits(logits, 1.0, bad)


if __name__ == "__main__":
  absltest.main()
