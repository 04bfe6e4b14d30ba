"""Cached target features: training on them equals training on live ones, and the draft-vocab
loss has the gradient of the full-vocabulary EAGLE-3 loss."""

import dataclasses
import os
import tempfile

from absl.testing import absltest
import jax
import jax.numpy as jnp
import numpy as np

from ppow_jax import (cli, feature_cache, feature_training, settings, teacher_forcing,
                      train_step)
from ppow_jax.data import tokenizer as tokenizer_lib
from ppow_jax.drafters import Eagle3FeatureDrafter
from ppow_jax.models import eagle3, llama

TARGET = llama.ModelConfig(vocab_size=48, hidden_size=24, intermediate_size=40, num_layers=5,
                           num_heads=2, num_kv_heads=1, max_position_embeddings=64,
                           initializer_range=0.3)
B, T, VD = 3, 12, 20


BASE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
                    "tiny.py")


def _baseline(**overrides) -> train_step.BaselineConfig:
  """The shipped baseline settings (forward KL, decay 0.8) with ``overrides``."""
  return dataclasses.replace(settings.baseline(cli.load_config(BASE)), **overrides)


def _setup(norm_before_fc: bool = False):
  tparams = llama.init_params(TARGET, jax.random.PRNGKey(0))
  ecfg = eagle3.Eagle3Config.from_target(TARGET, VD, intermediate_size=32,
                                         norm_before_fc=norm_before_fc)
  drafter = Eagle3FeatureDrafter.create(ecfg, TARGET)
  counts = np.random.default_rng(1).permutation(TARGET.vocab_size)
  vocab = eagle3.build_draft_vocab(counts, VD)
  net = eagle3.init_eagle3(ecfg, jax.random.PRNGKey(2))
  rng = np.random.default_rng(3)
  tokens = rng.integers(0, TARGET.vocab_size, (B, T)).astype(np.int32)
  mask = (rng.random((B, T)) < 0.8).astype(np.int32)
  return tparams, drafter, vocab, net, tokens, mask


def _target_pass(drafter, tparams, tokens) -> teacher_forcing.TargetPass:
  """The target's teacher-forced pass over ``tokens``, compiled (not op by op)."""
  return jax.jit(lambda p, t: teacher_forcing.target_pass(TARGET, p, t,
                                                          drafter.target_hidden_layers, 0))(
                                                              tparams, jnp.asarray(tokens))


class FeatureCacheTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    # rank promotion stays allowed here: the shared LLaMA layers broadcast norm scales and
    # RoPE tables by rank (the pure iterator test below raises on it)

  def test_training_on_cached_features_equals_live_training(self):
    tparams, drafter, vocab, net, tokens, mask = _setup(norm_before_fc=True)
    cfg = _baseline(ttt_steps=2)
    opt = train_step.make_optimizer(dataclasses.replace(
        settings.optim(cli.load_config(BASE).baseline.optim), learning_rate=1e-2, warmup_steps=1))
    consts = feature_training.constants(drafter, vocab, tparams)
    with tempfile.TemporaryDirectory() as d:
      cache = feature_cache.build(os.path.join(d, "f"), {"tokens": tokens, "loss_mask": mask},
                                  TARGET, tparams, drafter.target_hidden_layers,
                                  dtype="float32", batch_size=2)
      it = feature_cache.CachedIterator(cache, B, seed=0)
      cached_step = jax.jit(feature_training.make_step(drafter, cfg, opt, False))
      live_step = jax.jit(feature_training.make_live_step(TARGET, drafter, cfg, opt, False))
      s1 = s2 = train_step.init_state(net, opt, jax.random.PRNGKey(0))
      for _ in range(2):
        batch = next(it)
        s1, m1 = cached_step(s1, tparams, consts, batch)
        s2, m2 = live_step(s2, tparams, consts, {"tokens_BxT": batch["tokens_BxT"],
                                                 "loss_mask_BxT": batch["loss_mask_BxT"]})
      np.testing.assert_allclose(m1["loss"], m2["loss"], rtol=1e-5)
      for a, b in zip(jax.tree_util.tree_leaves(s1.params), jax.tree_util.tree_leaves(s2.params)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
      self.assertGreater(float(jnp.abs(s1.params["fc"] - net["fc"]).max()), 1e-4)

  def test_ttt_from_step_trains_step_zero_alone_before_it(self):
    tparams, drafter, vocab, net, tokens, mask = _setup()
    feats = feature_cache.target_features(TARGET, tparams, tokens, drafter.target_hidden_layers)
    batch = {"tokens_BxT": tokens, "loss_mask_BxT": mask,
             **{feature_cache.BATCH_KEYS[k]: v for k, v in feats.items()}}
    consts = feature_training.constants(drafter, vocab, tparams)
    opt = train_step.make_optimizer(dataclasses.replace(
        settings.optim(cli.load_config(BASE).baseline.optim), learning_rate=1e-2, warmup_steps=1))
    make = lambda **kw: jax.jit(feature_training.make_step(drafter, _baseline(**kw), opt, False))
    scheduled = make(ttt_steps=2, ttt_from_step=1)
    one, two = make(ttt_steps=1, ttt_from_step=0), make(ttt_steps=2, ttt_from_step=0)
    s0 = train_step.init_state(net, opt, jax.random.PRNGKey(0))
    leaves = lambda s: jax.tree_util.tree_leaves(s.params)
    s1, want1 = scheduled(s0, tparams, consts, batch)[0], one(s0, tparams, consts, batch)[0]
    for a, b in zip(leaves(s1), leaves(want1)):  # state.step 0 < 1: S = 1
      np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    s2, want2 = scheduled(s1, tparams, consts, batch)[0], two(s1, tparams, consts, batch)[0]
    for a, b in zip(leaves(s2), leaves(want2)):  # state.step 1: the unroll
      np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    other = one(s1, tparams, consts, batch)[0]  # the two branches do differ here
    self.assertGreater(max(float(jnp.abs(a - b).max()) for a, b in zip(leaves(s2), leaves(other))),
                       1e-6)

  def test_draft_vocab_loss_has_the_full_vocab_gradient(self):
    tparams, drafter, vocab, net, tokens, mask = _setup()
    cfg = _baseline(ttt_steps=3)
    feats = feature_cache.target_features(TARGET, tparams, tokens, drafter.target_hidden_layers)
    batch = {"tokens_BxT": tokens, "loss_mask_BxT": mask,
             **{feature_cache.BATCH_KEYS[k]: v for k, v in feats.items()}}
    consts = feature_training.constants(drafter, vocab, tparams)
    g_new = jax.jit(jax.grad(lambda n: feature_training.feature_loss(
        drafter, cfg, n, consts, tparams, batch, False)[0]))(net)
    tpass = _target_pass(drafter, tparams, tokens)
    g_ref = jax.jit(jax.grad(lambda n: train_step.token_loss(
        drafter, cfg, {"net": n, "vocab": vocab}, tparams, tokens, mask, tpass)[0]))(net)
    for a, b in zip(jax.tree_util.tree_leaves(g_new), jax.tree_util.tree_leaves(g_ref)):
      scale = float(jnp.abs(b).max()) + 1e-12
      np.testing.assert_allclose(np.asarray(a) / scale, np.asarray(b) / scale, atol=1e-4)

  def test_support_only_renormalises_and_drops_undrafted_argmax(self):
    tparams, drafter, vocab, net, tokens, mask = _setup()
    cfg = _baseline(ttt_steps=1)
    feats = feature_cache.target_features(TARGET, tparams, tokens, drafter.target_hidden_layers)
    batch = {"tokens_BxT": tokens, "loss_mask_BxT": mask,
             **{feature_cache.BATCH_KEYS[k]: v for k, v in feats.items()}}
    consts = feature_training.constants(drafter, vocab, tparams)
    loss = jax.jit(lambda n: feature_training.feature_loss(drafter, cfg, n, consts, tparams,
                                                           batch, True)[0])(net)
    # numpy reference: KL(p restricted to the draft vocab || q) at positions 1..T-2 whose next
    # token is a training token and whose target argmax is drafted
    tpass = _target_pass(drafter, tparams, tokens)
    logits = jax.jit(lambda n: teacher_forcing.eagle3_ttt_logits(
        drafter, {"net": n, "vocab": vocab}, tparams, jnp.asarray(tokens), tpass, 1)[0][0])(net)
    kept = np.flatnonzero(np.asarray(vocab.t2d_V))
    p = np.exp(np.asarray(tpass.logp_BxTxV, np.float64))
    q = np.asarray(logits, np.float64)[..., kept]
    logq = q - np.log(np.exp(q - q.max(-1, keepdims=True)).sum(-1, keepdims=True)) - q.max(
        -1, keepdims=True)
    total, count = 0.0, 0
    for b in range(B):
      for t in range(1, T - 1):
        if not mask[b, t + 1] or not np.asarray(vocab.t2d_V)[p[b, t].argmax()]:
          continue
        pr = p[b, t, kept] / p[b, t, kept].sum()
        total += float(np.sum(pr * (np.log(pr) - logq[b, t])))
        count += 1
    self.assertGreater(count, 0)
    np.testing.assert_allclose(float(loss), total / count, rtol=1e-4)

  def test_feature_regression_is_eagle1_smooth_l1_on_the_next_position(self):
    tparams, drafter, vocab, net, tokens, mask = _setup()
    feats = feature_cache.target_features(TARGET, tparams, tokens, drafter.target_hidden_layers)
    batch = {"tokens_BxT": tokens, "loss_mask_BxT": mask,
             **{feature_cache.BATCH_KEYS[k]: v for k, v in feats.items()}}
    consts = feature_training.constants(drafter, vocab, tparams)
    loss = lambda w: jax.jit(lambda n: feature_training.feature_loss(
        drafter, _baseline(ttt_steps=1, feature_regression=w), n, consts, tparams, batch,
        False))(net)
    (plain, _), (weighted, metrics) = loss(0.0), loss(2.0)
    self.assertNotIn("regression_loss", loss(0.0)[1])
    np.testing.assert_allclose(float(weighted - plain), 2.0 * float(metrics["regression_loss"]),
                               rtol=1e-5)
    # numpy reference from the plain teacher-forced pass: the drafter's output hidden at index
    # t (entry t-1, predicting x_{t+1}), RMS-normed with its norm, against the target's final
    # hidden at t; positions 1..T-2 whose next token trains
    dpass = teacher_forcing.drafter_pass(drafter, {"net": net, "vocab": vocab}, tparams,
                                         jnp.asarray(tokens), _target_pass(drafter, tparams,
                                                                           tokens), 0)
    h = np.asarray(dpass.hidden_BxTxE, np.float64)
    normed = (h / np.sqrt((h ** 2).mean(-1, keepdims=True) + drafter.cfg.rms_norm_eps)
              * np.asarray(net["norm"]["scale"], np.float64))
    final = np.asarray(feats["final"], np.float64)

    def reference(shift: int) -> float:
      total, count = 0.0, 0
      for b in range(B):
        for t in range(1, T - 1):
          if mask[b, t + 1] and 0 <= t + shift < T:
            d = np.abs(normed[b, t] - final[b, t + shift])
            total += float(np.where(d < 1, 0.5 * d ** 2, d - 0.5).mean())
            count += 1
      return total / count

    np.testing.assert_allclose(float(metrics["regression_loss"]), reference(0), rtol=1e-4)
    for shift in (-1, 1):  # a target one position off is a different loss
      self.assertGreater(abs(float(metrics["regression_loss"]) - reference(shift)), 1e-3)

  def test_feature_noise_is_uniform_in_units_of_each_tokens_feature_rms(self):
    rng = np.random.default_rng(5)
    # per-token scales six orders of magnitude apart: noise follows each token's own RMS
    scale_BxTx1 = 10.0 ** rng.integers(-2, 5, (4, 50, 1))
    feats = tuple(jnp.asarray(rng.normal(size=(4, 50, 64)) * scale_BxTx1 * (i + 1), jnp.float32)
                  for i in range(3))
    noisy = feature_training.augment_features(feats, jax.random.PRNGKey(0), 0.3)
    for f, g in zip(feats, noisy):
      f, g = np.asarray(f, np.float64), np.asarray(g, np.float64)
      rel = (g - f) / np.sqrt((f ** 2).mean(-1, keepdims=True))
      self.assertLessEqual(np.abs(rel).max(), 0.3 + 1e-4)
      self.assertGreater(np.abs(rel).max(), 0.29)  # fills the interval
      self.assertLess(abs(rel.mean()), 0.01)
      np.testing.assert_allclose(rel.std(), 0.3 / np.sqrt(3), rtol=0.03)
    self.assertFalse(np.allclose(np.asarray(noisy[0]) - np.asarray(feats[0]),
                                 np.asarray(noisy[1]) - np.asarray(feats[1])))  # own draws
    same = feature_training.augment_features(feats, jax.random.PRNGKey(0), 0.0)
    for f, g in zip(feats, same):
      np.testing.assert_array_equal(np.asarray(f), np.asarray(g))

  def test_feature_noise_reaches_the_features_the_loss_reads(self):
    tparams, drafter, vocab, net, tokens, mask = _setup(norm_before_fc=True)
    feats = feature_cache.target_features(TARGET, tparams, tokens, drafter.target_hidden_layers)
    batch = {"tokens_BxT": tokens, "loss_mask_BxT": mask,
             **{feature_cache.BATCH_KEYS[k]: v for k, v in feats.items()}}
    consts = feature_training.constants(drafter, vocab, tparams)
    key = jax.random.PRNGKey(7)
    loss = lambda cfg, b: float(jax.jit(lambda n: feature_training.feature_loss(
        drafter, cfg, n, consts, tparams, b, False, key))(net)[0])
    noisy = loss(_baseline(ttt_steps=2, feature_noise=0.5), batch)
    plain = loss(_baseline(ttt_steps=2, feature_noise=0.0), batch)
    self.assertGreater(abs(noisy - plain), 1e-4)
    # the same loss without noise on features augmented by hand (entries 0..T-2 are read)
    e = TARGET.hidden_size
    f_BxTx3E = np.asarray(batch["feats_BxTx3E"], np.float32)
    parts = tuple(jnp.asarray(f_BxTx3E[:, :-1, i * e:(i + 1) * e]) for i in range(3))
    by_hand = f_BxTx3E.copy()
    by_hand[:, :-1] = np.concatenate(
        [np.asarray(p) for p in feature_training.augment_features(parts, key, 0.5)], -1)
    np.testing.assert_allclose(
        loss(_baseline(ttt_steps=2, feature_noise=0.0), dict(batch, feats_BxTx3E=by_hand)),
        noisy, rtol=1e-5)

  def test_document_mask_reads_the_batch_segment_ids(self):
    tparams, drafter, vocab, net, tokens, mask = _setup()
    feats = feature_cache.target_features(TARGET, tparams, tokens, drafter.target_hidden_layers)
    one = np.ones_like(tokens)
    cache = {"tokens": tokens, "loss_mask": mask, "segments": np.where(np.arange(T) < 5, 1, 2)
             * one, **{k: np.asarray(v) for k, v in feats.items()}}
    batch = next(feature_cache.CachedIterator(cache, B, 0))  # all rows, in order
    np.testing.assert_array_equal(batch["segment_ids_BxT"], cache["segments"])
    consts = feature_training.constants(drafter, vocab, tparams)
    loss = lambda cfg, b: float(jax.jit(lambda n: feature_training.feature_loss(
        drafter, cfg, n, consts, tparams, b, False))(net)[0])
    for steps in (1, 3):
      across = loss(_baseline(ttt_steps=steps, document_mask=False), batch)
      within = loss(_baseline(ttt_steps=steps, document_mask=True), batch)
      one_doc = loss(_baseline(ttt_steps=steps, document_mask=True),
                     dict(batch, segment_ids_BxT=one))
      self.assertAlmostEqual(one_doc, across, places=5)  # one document: nothing to mask
      self.assertGreater(abs(within - across), 1e-4)

  def test_document_context_gives_each_token_its_whole_document_pass(self):
    docs = [f"item {k}: " + "alpha beta gamma delta " * k for k in (3, 6, 2, 5)]
    tok = tokenizer_lib.train_bpe(docs, 300)
    cfg = dataclasses.replace(TARGET, vocab_size=tok.get_vocab_size())
    params = llama.init_params(cfg, jax.random.PRNGKey(0))
    layers, seq_len = (1, 2, 3), 16
    rows = feature_cache.packed_rows(docs, tok, seq_len, 100)
    doc, pos = rows["doc"], rows["pos"]
    self.assertGreater(int((pos[:, 0] > 0).sum()), 1)  # documents continue across rows
    for r, t in zip(*np.nonzero(doc >= 0)):
      self.assertEqual(rows["tokens"][r, t], rows["documents"][doc[r, t]][pos[r, t]])
    fn = jax.jit(lambda p, t: feature_cache.target_features(cfg, p, t, layers))
    with tempfile.TemporaryDirectory() as d:
      build = lambda name, context: feature_cache.build(
          os.path.join(d, name), rows, cfg, params, layers, "float32", batch_size=2,
          context=context)
      whole, pieces, alone = build("whole", 64), build("pieces", 8), build("rows", 0)
      cont = (doc >= 0) & (pos > np.arange(seq_len))  # the row does not hold the doc's start
      width = 64  # one compiled shape: documents right-padded (causal, so padding is unseen)
      pad = lambda ids: jnp.asarray(np.pad(ids, (0, width - len(ids)))[None])
      ref = [fn(params, pad(ids)) for ids in rows["documents"]]
      ref8 = {(d, s): fn(params, pad(ids[s:s + 8]))  # 8-token pieces, each from its own start
              for d, ids in enumerate(rows["documents"]) for s in range(0, len(ids), 8)}
      for k in ("feats", "final", "lse", "argmax"):
        for r, t in zip(*np.nonzero(doc >= 0)):
          d, p = doc[r, t], pos[r, t]
          np.testing.assert_allclose(whole[k][r, t], ref[d][k][0, p], rtol=1e-4, atol=1e-4)
          np.testing.assert_allclose(pieces[k][r, t], ref8[d, p // 8 * 8][k][0, p % 8],
                                     rtol=1e-4, atol=1e-4)
      # a row run alone loses the context of a document that began in an earlier row
      self.assertGreater(float(np.abs(alone["final"][cont] - whole["final"][cont]).max()), 1e-2)
      np.testing.assert_allclose(alone["final"][pos == np.arange(seq_len)],
                                 whole["final"][pos == np.arange(seq_len)], atol=1e-4)

  def test_greedy_agreement_compares_the_argmax_with_the_next_token(self):
    cache = {"tokens": np.array([[1, 2, 3, 4, 5]]), "loss_mask": np.array([[0, 1, 1, 1, 0]]),
             "argmax": np.array([[2, 3, 9, 5, 5]])}
    # loss targets are tokens 1..3; the argmax before them is 2, 3, 9: two of three agree
    self.assertAlmostEqual(feature_cache.greedy_agreement(cache), 2 / 3)

  def test_iterator_resumes_the_same_stream(self):
    self.enterContext(jax.numpy_rank_promotion("raise"))
    cache = {k: np.arange(7 * 2).reshape(7, 2) for k in feature_cache.FIELDS}
    a = feature_cache.CachedIterator(cache, 3, seed=5)
    for _ in range(3):
      next(a)
    b = feature_cache.CachedIterator(cache, 3, seed=5)
    b.set_state(a.get_state())
    np.testing.assert_array_equal(next(a)["tokens_BxT"], next(b)["tokens_BxT"])
    seen = np.concatenate([next(a)["tokens_BxT"][:, 0] for _ in range(7)])
    self.assertEqual(len(np.unique(seen)), 7)  # every row comes back


if __name__ == "__main__":
  absltest.main()
