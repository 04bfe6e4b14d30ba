"""The TTT unroll's document mask: in a packed row, the drafter attends within a conversation."""

import dataclasses
import os

from absl.testing import absltest
import jax
import jax.numpy as jnp
import numpy as np

from ppow_jax import cli, settings, teacher_forcing, train_step
from ppow_jax.drafters import Eagle3FeatureDrafter
from ppow_jax.models import eagle3, llama

TARGET = llama.ModelConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_layers=3,
                           num_heads=2, num_kv_heads=1, max_position_embeddings=64,
                           initializer_range=0.3)
ECFG = eagle3.Eagle3Config.from_target(TARGET, 24, intermediate_size=32)
DRAFTER = Eagle3FeatureDrafter.create(ECFG, TARGET)
NET = eagle3.init_eagle3(ECFG, jax.random.PRNGKey(0))
S = 3
BASE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
                    "tiny.py")


def _reference_mask(segments_T1: np.ndarray, steps: int, step: int) -> np.ndarray:
  """Loop form of ``document_mask`` for one row."""
  t1 = len(segments_T1)
  out = np.zeros((t1, steps * t1), bool)
  for j in range(t1):
    anchor = segments_T1[max(j - step, 0)]
    for k in range(steps):
      for m in range(t1):
        out[j, k * t1 + m] = segments_T1[m] == anchor if k == 0 else True
  return out


@jax.jit
def _unroll(embeds, f0, f1, f2, segments):
  logits, _, _ = teacher_forcing.eagle3_ttt_draft_logits(DRAFTER, NET, embeds, (f0, f1, f2), S,
                                                          segments)
  return logits


@jax.jit
def _unroll_whole_row(embeds, f0, f1, f2):
  logits, _, _ = teacher_forcing.eagle3_ttt_draft_logits(DRAFTER, NET, embeds, (f0, f1, f2), S)
  return logits


class DocumentMaskTest(absltest.TestCase):

  def test_mask_matches_the_loop_form(self):
    segments = np.array([[1, 1, 1, 2, 2, 3, 3, 3, 0]], np.int32)
    for step in range(S):
      got = np.asarray(teacher_forcing.document_mask(jnp.asarray(segments), S, step))[0]
      np.testing.assert_array_equal(got, _reference_mask(segments[0], S, step),
                                    err_msg=f"step {step}")
    # the anchor is the entry the chain left from (j - step), not the entry itself
    got = np.asarray(teacher_forcing.document_mask(jnp.asarray(segments), S, 1))[0]
    self.assertTrue(got[3, 2])  # entry 3 at step 1 left from entry 2 (document 1)
    self.assertFalse(got[3, 3])

  def test_a_document_in_a_packed_row_drafts_as_it_does_alone(self):
    a, b, pad = 5, 8, 3  # document A, then B, then padding (segment 0)
    t1 = a + b + pad
    rng = np.random.default_rng(0)
    embeds = rng.normal(size=(1, t1, ECFG.hidden_size)).astype(np.float32)
    feats = [rng.normal(size=(1, t1, TARGET.hidden_size)).astype(np.float32) * 3
             for _ in range(3)]
    segments = np.array([[1] * a + [2] * b + [0] * pad], np.int32)
    packed = np.asarray(_unroll(embeds, *feats, segments))
    # B alone: its entries first, then filler (causal: never seen by B's entries)
    alone_in = lambda x: np.concatenate([x[:, a:a + b], x[:, :a + pad]], axis=1)
    alone = np.asarray(_unroll(alone_in(embeds), *map(alone_in, feats),
                               np.array([[1] * b + [2] * (a + pad)], np.int32)))
    whole_row = np.asarray(_unroll_whole_row(embeds, *feats))
    # entry j of step i predicts from a chain that left entry j - i; logits index j + 1
    for i in range(S):
      for j in range(a + i, a + b):
        np.testing.assert_allclose(packed[i, 0, j + 1], alone[i, 0, j - a + 1], rtol=2e-4,
                                   atol=2e-4, err_msg=f"step {i}, entry {j}")
      # without the mask, B's entries attend to A and draft differently
      self.assertGreater(float(np.abs(whole_row[i, 0, a + i + 1:a + b + 1]
                                      - alone[i, 0, i + 1:b + 1]).max()), 1e-3)
    # A's entries come first in the row: the mask changes nothing for them
    np.testing.assert_allclose(packed[0, 0, 1:a + 1], whole_row[0, 0, 1:a + 1], rtol=1e-5,
                               atol=1e-5)

  def test_the_live_baseline_step_reads_the_pipeline_segment_ids(self):
    tparams = llama.init_params(TARGET, jax.random.PRNGKey(3))
    vocab = eagle3.build_draft_vocab(np.arange(TARGET.vocab_size)[::-1] + 1, ECFG.draft_vocab_size)
    opt = train_step.make_optimizer(settings.optim(cli.load_config(BASE).baseline.optim))
    tokens = jax.random.randint(jax.random.PRNGKey(4), (2, 14), 0, TARGET.vocab_size)
    one = jnp.ones_like(tokens)
    batch = {"tokens_BxT": tokens, "loss_mask_BxT": one,
             "segment_ids_BxT": jnp.where(jnp.arange(14) < 6, 1, 2) * one}

    def loss(steps: int, mask: bool, b: dict) -> float:
      cfg = dataclasses.replace(settings.baseline(cli.load_config(BASE)), ttt_steps=steps,
                                ttt_from_step=0, document_mask=mask)
      step = jax.jit(train_step.make_baseline_step(TARGET, DRAFTER, cfg, opt))
      state = train_step.init_state(NET, opt, jax.random.PRNGKey(5))
      return float(step(state, tparams, vocab, b)[1]["token_loss"])

    for steps in (1, 2):  # S = 1 takes the unroll's path too when the mask is on
      across, within = loss(steps, False, batch), loss(steps, True, batch)
      self.assertGreater(abs(within - across), 1e-4)
      self.assertAlmostEqual(loss(steps, True, dict(batch, segment_ids_BxT=one)), across,
                             places=4)


if __name__ == "__main__":
  absltest.main()
