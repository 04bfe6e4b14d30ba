"""Alignment of PPOW's rollout against direct computations.

Each test recomputes one piece the slow, obvious way — a full target forward on prefix +
window, the engine's own prefill and drafting, an explicit self-fed drafting chain — so that
a distribution taken one position early or late fails here.
"""

import dataclasses
import os

from absl.testing import absltest
import jax
import jax.numpy as jnp
import numpy as np

from ppow_jax import (cli, drafters, engine, rollout, settings, teacher_forcing,
                      windowing)
from ppow_jax.models import eagle3, llama

BASE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
                    "tiny.py")

# (no rank_promotion="raise" here: the model code broadcasts RMSNorm scales implicitly)

TARGET = llama.ModelConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_layers=2,
                           num_heads=2, num_kv_heads=1, max_position_embeddings=128,
                           initializer_range=0.4)
ECFG = eagle3.Eagle3Config.from_target(TARGET, draft_vocab_size=24)
DRAFTER = drafters.Eagle3FeatureDrafter.create(ECFG, TARGET)
B, T, K = 2, 12, 3


def _setup():
  tp = llama.init_params(TARGET, jax.random.PRNGKey(0))
  vocab = eagle3.build_draft_vocab(np.arange(32)[::-1] + 1, 24)  # ids 24..31 out of vocab
  params = {"net": eagle3.init_eagle3(ECFG, jax.random.PRNGKey(2)), "vocab": vocab}
  tokens = np.asarray(jax.random.randint(jax.random.PRNGKey(1), (B, T), 0, 32), np.int32)
  return tp, params, tokens


TP, PARAMS, TOKENS = _setup()


@jax.jit
def _full_logp(tokens_BxT):
  """A plain teacher-forced target pass: index t is p for token t+1."""
  return teacher_forcing.target_pass(TARGET, TP, tokens_BxT, (), 0).logp_BxTxV


@jax.jit
def _chains(tokens_BxT, seq_N, start_N, forced_NxK):
  """Forced drafting of N chains after start_N with rollout's plumbing."""
  tpass = teacher_forcing.target_pass(TARGET, TP, tokens_BxT, DRAFTER.target_hidden_layers, 0)
  dpass = teacher_forcing.drafter_pass(DRAFTER, PARAMS, TP, tokens_BxT, tpass, K + 2)
  state, buffer, n_N = teacher_forcing.chain_states(DRAFTER, dpass, tokens_BxT, seq_N, start_N,
                                                    K + 2)
  _, logits, _ = DRAFTER.draft(PARAMS, TP, state, buffer, n_N, jax.random.PRNGKey(0),
                               forced_NxK.shape[1], 1.0, 1.0, forced_BxK=forced_NxK)
  return logits, tpass.logp_BxTxV


class VerifyWindowsTest(absltest.TestCase):

  def test_matches_a_full_forward_on_prefix_plus_window(self):
    start = np.array([[1, 4], [7, 3]], np.int32)
    windows = np.asarray(jax.random.randint(jax.random.PRNGKey(3), (B, 2, K), 0, 32), np.int32)

    @jax.jit
    def verify(tokens, windows, start):
      tpass = teacher_forcing.target_pass(TARGET, TP, tokens, (), 2 * K)
      return rollout.verify_windows(TARGET, TP, tpass, windows, start)

    got = np.asarray(verify(TOKENS, windows, start))
    self.assertEqual(got.shape, (B, 2, K + 1, TARGET.vocab_size))
    for b in range(B):
      for m in range(2):
        s = int(start[b, m])
        row = np.concatenate([TOKENS[b, :s + 1], windows[b, m]])
        row = np.pad(row, (0, T + K - len(row)))[None]  # one shape, one compile
        want = np.asarray(_full_logp(row))[0, s:s + K + 1]
        np.testing.assert_allclose(got[b, m], want, rtol=1e-4, atol=1e-5)


class ChainStatesTest(absltest.TestCase):

  def test_chain_drafting_matches_the_engine(self):
    """chain_states + draft from a training sequence == engine prefill + draft on its prefix."""
    starts = np.array([2, 6], np.int32)
    forced = np.asarray(jax.random.randint(jax.random.PRNGKey(4), (B, K), 0, 24), np.int32)
    got, _ = _chains(TOKENS, jnp.arange(B), jnp.asarray(starts), forced)
    prompts, lens = engine.pad_prompts([TOKENS[b, :s + 1].tolist() for b, s in enumerate(starts)])

    @jax.jit
    def engine_draft(prompts, lens, forced):
      cache_len = prompts.shape[1] + K + 2
      buffer, _, hidden = engine._prefill(llama.Decoder(TARGET), TP, prompts, lens, cache_len,
                                          DRAFTER.target_hidden_layers, 0)
      state = DRAFTER.prefill(PARAMS, TP, DRAFTER.init_state(B, cache_len), prompts, lens,
                              hidden)
      return DRAFTER.draft(PARAMS, TP, state, buffer, lens, jax.random.PRNGKey(0), K, 1.0, 1.0,
                           forced_BxK=forced)[1]

    want = np.asarray(engine_draft(prompts, lens, forced))
    live = want > -1e29  # draft-vocabulary ids
    np.testing.assert_array_equal(np.asarray(got) > -1e29, live)
    np.testing.assert_allclose(np.asarray(got)[live], want[live], rtol=1e-4, atol=1e-4)


class TTTAndScoresTest(absltest.TestCase):
  """The TTT unroll and ADAW's self-fed scores against explicit ground-truth chains."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.starts = [(b, s) for b in range(B) for s in range(1, T - K)]
    seq = jnp.asarray([b for b, _ in cls.starts])
    start = jnp.asarray([s for _, s in cls.starts])
    forced = np.stack([TOKENS[b, s + 1:s + 1 + K] for b, s in cls.starts])
    logits, cls.logp = _chains(TOKENS, seq, start, forced)
    cls.chain_logits = np.asarray(logits)

  def test_ttt_step_i_is_the_chain_that_left_the_data_i_steps_earlier(self):
    @jax.jit
    def ttt(tokens):
      tpass = teacher_forcing.target_pass(TARGET, TP, tokens, DRAFTER.target_hidden_layers, 0)
      return teacher_forcing.eagle3_ttt_logits(DRAFTER, PARAMS, TP, tokens, tpass, K)

    logits, valid = (np.asarray(x) for x in ttt(TOKENS))
    checked = 0
    for n, (b, s) in enumerate(self.starts):
      for i in range(K):
        if not valid[i, s + i]:
          continue
        live = self.chain_logits[n, i] > -1e29
        np.testing.assert_allclose(logits[i, b, s + i][live], self.chain_logits[n, i][live],
                                   rtol=1e-4, atol=1e-4, err_msg=f"step {i}, start {s}")
        checked += 1
    self.assertGreater(checked, len(self.starts) * (K - 1))

  def test_adaw_self_fed_scores_average_the_chain_positions(self):
    cfg = dataclasses.replace(settings.ppow(cli.load_config(BASE), gamma=0.1), window=K,
                              adaw_scoring="self_fed")

    @jax.jit
    def scores(tokens, mask):
      tpass = teacher_forcing.target_pass(TARGET, TP, tokens, DRAFTER.target_hidden_layers, 0)
      return rollout.score_starts(DRAFTER, cfg, PARAMS, TP, tokens, mask, tpass)

    got = np.asarray(scores(TOKENS, np.ones_like(TOKENS)))
    logp = np.asarray(self.logp)
    for n, (b, s) in enumerate(self.starts):
      logq = jax.nn.log_softmax(self.chain_logits[n], axis=-1)
      u = np.asarray(windowing.position_scores(logp[b, s:s + K], logq))
      np.testing.assert_allclose(got[b, s], u.mean(), rtol=1e-3, atol=1e-5,
                                 err_msg=f"start {s}")
    self.assertTrue(np.all(np.isneginf(got[:, 0])))  # no window after a one-token prefix


if __name__ == "__main__":
  absltest.main()
