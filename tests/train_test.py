"""Training: PPOW raises acceptance, resume is bit-identical, NaN stops cleanly, bad configs fail."""

import dataclasses
import functools
import json
import os
import signal
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")

from absl.testing import absltest
import jax
import jax.numpy as jnp
import numpy as np

from ppow_jax import (cli, drafters, rollout, settings, teacher_forcing, train_step, trainer,
                      windowing)
from ppow_jax.checkpoint import Checkpointer
from ppow_jax.data import pipeline
from ppow_jax.data import tokenizer as tokenizer_lib
from ppow_jax.errors import UserError
from ppow_jax.models import eagle3, llama
from ppow_jax import pretrain

from ppow_jax.metric_writer import MetricWriter

BASE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
                    "tiny.py")
REAL = os.path.join(os.path.dirname(BASE), "llama31_8b_eagle3.py")


def _optim(**overrides) -> train_step.OptimConfig:
  """The base config's optimizer settings with ``overrides`` (the config is their one source)."""
  return settings.optim(cli.load_config(BASE, [(f"ppow.optim.{k}", str(v))
                                               for k, v in overrides.items()]).ppow.optim)


def _ppow(**overrides) -> rollout.PPOWConfig:
  return settings.ppow(cli.load_config(BASE, [(f"ppow.{k}", str(v))
                                              for k, v in overrides.items()]), gamma=0.1)


def _ppow_cfg(**overrides) -> rollout.PPOWConfig:
  """The base config's PPOW view with typed ``overrides`` (no string round trip)."""
  return dataclasses.replace(_ppow(), **overrides)


class PPOWImprovesAcceptanceTest(absltest.TestCase):
  """A toy target with a known (computable) distribution; the policy-gradient part alone."""

  def test_ppow_steps_raise_expected_acceptance(self):
    tc = llama.ModelConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_layers=2,
                           num_heads=2, num_kv_heads=1, max_position_embeddings=512,
                           initializer_range=0.4)
    tp = llama.init_params(tc, jax.random.PRNGKey(0))
    ecfg = eagle3.Eagle3Config.from_target(tc, draft_vocab_size=32)
    dr = drafters.Eagle3FeatureDrafter.create(ecfg, tc)
    net = eagle3.init_eagle3(ecfg, jax.random.PRNGKey(2))
    vocab = eagle3.identity_draft_vocab(32)
    opt = train_step.make_optimizer(_optim(learning_rate=1e-2, warmup_steps=1, decay_steps=1000))
    toks = jax.random.randint(jax.random.PRNGKey(1), (4, 24), 0, 32)
    batch = {"tokens_BxT": toks, "loss_mask_BxT": jnp.ones_like(toks)}
    # omega=0: no anchor, so any gain comes from the windowed reward alone; a pool of two
    # batches re-scored every 5 steps (teacher-forced scores: one compile less; the self-fed
    # ones are checked in rollout_test)
    cfg = _ppow_cfg(window=4, group_size=8, starts_per_seq=4, omega=0.0, ppo_epochs=2,
                    selection="uniform", pool_size=8, pool_refresh_every=5,
                    adaw_scoring="teacher_forced")
    state = train_step.init_ppow_state(net, opt, jax.random.PRNGKey(5), cfg, 4, 24)
    rows = jnp.repeat(toks, 4, axis=0)  # fixed evaluation windows: 4 starts per sequence
    starts = jnp.tile(jnp.asarray([3, 8, 13, 18]), 4)

    @jax.jit
    def evaluate(net_params):
      tpass = teacher_forcing.target_pass(tc, tp, rows, dr.target_hidden_layers, 8 * 4)
      return rollout.rollout(tc, dr, cfg, tp, {"net": net_params, "vocab": vocab}, rows,
                             starts, jnp.ones((16,), bool), tpass, jax.random.PRNGKey(9))

    ro = evaluate(state.params)
    before = ro.metrics["tau_sim"]
    self.assertEqual(ro.reward_N.shape, (16 * 8,))
    np.testing.assert_allclose(ro.advantage_N.reshape(-1, 8).mean(-1), 0.0, atol=1e-5)
    # Δ of the rejected (a = 0) windows: Σ_k [max log p - log p(draft token)], from the fields
    lp = np.asarray(ro.logp_NxKxV, np.float64)
    picked = np.take_along_axis(lp, np.asarray(ro.tokens_NxK)[..., None], -1)[..., 0]
    gap = (lp.max(-1) - picked).sum(-1)
    rejected = np.asarray(ro.accepted_N) == 0
    self.assertTrue(rejected.any())
    np.testing.assert_allclose(float(ro.metrics["prox_gap_rejected"]), gap[rejected].mean(),
                               rtol=1e-4)
    np.testing.assert_allclose(float(ro.metrics["prox_gap_rejected_median"]),
                               np.sort(gap[rejected])[(rejected.sum() - 1) // 2], rtol=1e-4)
    np.testing.assert_allclose(float(ro.metrics["prox_hit_rejected"]),
                               np.mean(gap[rejected] < cfg.reward["prox_eps"]), atol=1e-6)
    # the anchor is the KL to the rollout's target distributions at the trained positions
    anchored = dataclasses.replace(cfg, omega=1.0)
    _, stats = jax.jit(lambda p: train_step.ppow_window_loss(
        dr, anchored, {"net": p, "vocab": vocab}, tp, rows,
        teacher_forcing.target_pass(tc, tp, rows, dr.target_hidden_layers, 8 * 4), ro))(
            state.params)
    trained = np.asarray(train_step.trained_positions(ro, 4))
    logq = np.asarray(jax.nn.log_softmax(_forced_logits(dr, tc, tp, net, vocab, rows, ro), -1))
    logp = np.asarray(ro.logp_NxKxV, np.float64)
    kl = (np.exp(logp) * (logp - np.maximum(logq, -100.0))).sum(-1)
    np.testing.assert_allclose(float(stats["anchor_loss"]), kl[trained].mean(), rtol=1e-4)

    step = jax.jit(train_step.make_ppow_step(tc, dr, cfg, opt))
    calls = []
    for _ in range(70):
      state, metrics = step(state, tp, vocab, batch)
      calls.append(float(metrics["target_calls"]))
    after = evaluate(state.params).metrics["tau_sim"]
    self.assertTrue(np.isfinite(float(metrics["loss"])))
    self.assertGreater(float(after), float(before) + 0.15,
                       f"expected acceptance length {float(before):.3f} -> {float(after):.3f}")
    # the pool holds the last two batches; a refresh every 5 steps re-scores its 2 chunks
    np.testing.assert_array_equal(state.pool.tokens_PxT, np.concatenate([toks, toks]))
    self.assertEqual(calls[:6], [3.0, 3.0, 3.0, 3.0, 3.0, 5.0])
    # batch (4×24) + 16 window rows (16×24) + 16×8 windows of 4 tokens
    self.assertEqual(float(metrics["target_tokens"]), 4 * 24 + 16 * 24 + 16 * 8 * 4)
    self.assertEqual(float(metrics["updates"]), 2.0)
    self.assertEqual(float(metrics["windows"]), 16 * 8)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _forced_logits(dr, tc, tp, net, vocab, rows, ro):
  """Drafter logits along the rollout's windows, drafted again from their chain states."""
  params = {"net": net, "vocab": vocab}
  tpass = teacher_forcing.target_pass(tc, tp, rows, dr.target_hidden_layers, 0)
  dpass = teacher_forcing.drafter_pass(dr, params, tp, rows, tpass, 6)
  state, buffer, n_N = teacher_forcing.chain_states(dr, dpass, rows, ro.seq_N, ro.start_N, 6)
  return dr.draft(params, tp, state, buffer, n_N, jax.random.PRNGKey(0), 4, 1.0, 1.0,
                  forced_BxK=ro.tokens_NxK)[1]


def _tiny_lm_setup():
  texts = [f"def f{i}(x):\n    return x * {i} + {i % 7}\n" for i in range(60)]
  tok = tokenizer_lib.train_bpe(texts, 300)
  cfg = llama.ModelConfig(vocab_size=300, hidden_size=16, intermediate_size=32, num_layers=1,
                          num_heads=2, num_kv_heads=1)
  opt = train_step.make_optimizer(_optim(learning_rate=1e-2, warmup_steps=2, decay_steps=1000))
  step, _ = pretrain._lm_step(cfg, opt)
  return texts, tok, cfg, opt, jax.jit(step)


class ResumeTest(absltest.TestCase):
  """Interrupted runs resume from the last checkpoint and end bit-identical."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.texts, cls.tok, cls.cfg, cls.opt, step = _tiny_lm_setup()
    cls.step = staticmethod(step)

  def _initial_state(self):
    return train_step.init_state(llama.init_params(self.cfg, jax.random.PRNGKey(0)), self.opt,
                                 jax.random.PRNGKey(1))

  def _run(self, workdir, step_fn, num_steps=6, totals=None):
    it = pipeline.make_train_iterator(self.texts, self.tok, 17, 2, seed=3, num_threads=0)
    loop = trainer.LoopConfig(num_steps=num_steps, save_every=2, log_every=1)
    writer = MetricWriter(os.path.join(workdir, "tb"))
    try:
      return trainer.run("t", step_fn, self._initial_state(), (None, None), it,
                         os.path.join(workdir, "ckpt"), loop, writer, totals=totals)
    finally:
      writer.close()

  def _logged_steps(self, workdir):
    with open(os.path.join(workdir, "tb", "metrics.jsonl")) as f:
      return [json.loads(line)["step"] for line in f]

  def _assert_same(self, a, b):
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y))

  def test_killed_and_sigtermed_runs_resume_bit_identical(self):
    with tempfile.TemporaryDirectory() as d:
      reference = self._run(os.path.join(d, "ref"), self.step)
      calls = {"n": 0}

      def dies_at_5(state, tp, const, batch):  # an abrupt kill at step 5's dispatch
        calls["n"] += 1
        if calls["n"] == 5:
          raise KeyboardInterrupt("simulated kill")
        return self.step(state, tp, const, batch)

      with self.assertRaises(KeyboardInterrupt):
        self._run(os.path.join(d, "kill"), dies_at_5)
      self.assertEqual(self._logged_steps(os.path.join(d, "kill")), [1, 2, 3, 4])
      totals = {}
      resumed = self._run(os.path.join(d, "kill"), self.step, totals=totals)
      self._assert_same(reference.params, resumed.params)
      self._assert_same(reference.opt_state, resumed.opt_state)
      # each step once in the metrics, and counted once in the totals (2 x 17 tokens a step)
      self.assertEqual(self._logged_steps(os.path.join(d, "kill")), [1, 2, 3, 4, 5, 6])
      self.assertEqual(totals["windows"], 6 * 2 * 17)
      self.assertGreater(totals["seconds"], 0.0)

      sent = {"n": 0}

      def sigterm_at_3(state, tp, const, batch):
        sent["n"] += 1
        if sent["n"] == 3:
          os.kill(os.getpid(), signal.SIGTERM)
        return self.step(state, tp, const, batch)

      with self.assertRaises(SystemExit) as cm:
        self._run(os.path.join(d, "term"), sigterm_at_3)
      self.assertEqual(cm.exception.code, 143)
      resumed = self._run(os.path.join(d, "term"), self.step)
      self._assert_same(reference.params, resumed.params)

  def test_metrics_rewind_to_the_resumed_step(self):
    with tempfile.TemporaryDirectory() as d:
      writer = MetricWriter(d)
      for step in range(1, 6):
        writer.write(step, {"loss": float(step)})
      writer.close()
      with open(os.path.join(d, "metrics.jsonl"), "a") as f:
        f.write('{"step": 6, "lo')  # cut short by a kill
      writer = MetricWriter(d)
      writer.rewind(3)
      writer.write(4, {"loss": 40.0})
      writer.close()
      with open(os.path.join(d, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
      self.assertEqual([(r["step"], r["loss"]) for r in rows],
                       [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0)])

  def test_a_damaged_newest_checkpoint_falls_back_to_the_one_before(self):
    with tempfile.TemporaryDirectory() as d:
      self._run(d, self.step)
      ckpt_dir = os.path.join(d, "ckpt")
      self.assertEqual(Checkpointer(ckpt_dir).latest_step(), 6)
      damaged = []
      for step in (6, 4):
        for root, _, files in os.walk(os.path.join(ckpt_dir, "latest", str(step), "state")):
          for name in files:
            with open(os.path.join(root, name), "wb") as f:
              f.write(b"garbage")
        damaged.append(step)
        if step == 6:
          _, data_state, totals = Checkpointer(ckpt_dir).restore(self._initial_state())
          self.assertEqual(Checkpointer(ckpt_dir).latest_step(), 4)  # 6 was dropped
          self.assertEqual(totals["windows"], 4 * 2 * 17)
      with open(os.path.join(ckpt_dir, "latest", "2", "state", "_METADATA"), "wb") as f:
        f.write(b"garbage")
      with self.assertRaisesRegex(UserError, r"ckpt: no checkpoint reads back \(step 4: "):
        Checkpointer(ckpt_dir).restore(self._initial_state())

  def test_nan_stops_with_step_and_keeps_last_good_checkpoint(self):
    with tempfile.TemporaryDirectory() as d:
      calls = {"n": 0}

      def nan_at_4(state, tp, const, batch):
        calls["n"] += 1
        state, metrics = self.step(state, tp, const, batch)
        if calls["n"] == 4:
          metrics = dict(metrics, loss=jnp.float32(np.nan))
        return state, metrics

      with self.assertRaisesRegex(trainer.NonFiniteError,
                                  r"loss is nan at step 4.*Last good checkpoint: step 2"):
        self._run(d, nan_at_4)
      self.assertEqual(Checkpointer(os.path.join(d, "ckpt")).latest_step(), 2)


class ConfigValidationTest(absltest.TestCase):

  def test_ppow_config_rejects_bad_fields(self):
    cfg = _ppow()
    with self.assertRaisesRegex(UserError, "ppow.group_size must be >= 2"):
      _ppow_cfg(group_size=1)
    with self.assertRaisesRegex(UserError, "ppow.window must be >= 1"):
      _ppow_cfg(window=0)
    with self.assertRaisesRegex(UserError, "use_speed and use_prox are both off"):
      _ppow(use_speed=False, use_prox=False)
    with self.assertRaisesRegex(UserError, "speed reward form 'fast'"):
      _ppow(speed_form="fast")
    with self.assertRaisesRegex(UserError, "adaw_scoring"):
      _ppow_cfg(adaw_scoring="exact")
    with self.assertRaisesRegex(UserError, "pool_size=6 must be a multiple of the batch"):
      _ppow_cfg(pool_size=6).pool_rows(4)
    with self.assertRaises(TypeError):  # the view has no defaults of its own
      rollout.PPOWConfig(window=4)

  def test_run_config_cross_field_checks(self):
    c = cli.load_config(BASE)
    c.ppow.starts_per_seq = 500
    with self.assertRaisesRegex(UserError, "config.ppow.starts_per_seq=500"):
      settings.validate(c)
    c = cli.load_config(BASE)
    c.stages = "target,bogus"
    with self.assertRaisesRegex(UserError, "unknown stage 'bogus'"):
      settings.validate(c)
    c = cli.load_config(BASE)
    c.ppow.group_size = 1
    with self.assertRaisesRegex(UserError, "group_size"):
      settings.validate(c)
    c = cli.load_config(BASE)
    c.continued.optim.decay_steps = c.ppow.optim.decay_steps + 1
    with self.assertRaisesRegex(UserError, "continued.optim.decay_steps.*schedule shape"):
      settings.validate(c)

  def test_one_window_for_training_and_evaluation(self):
    for c in (cli.load_config(BASE), cli.load_config(REAL + ":runlocal")):
      settings.validate(c)
      self.assertEqual(settings.eval_window(c), c.ppow.window)
    c = cli.load_config(BASE)
    c.eval.window = 3  # on purpose
    self.assertEqual(settings.eval_window(c), 3)
    c.eval.window = 0
    with self.assertRaisesRegex(UserError, r"config.eval.window=0: must be >= 1, or -1"):
      settings.validate(c)


class WindowSelectionTest(absltest.TestCase):

  def test_uniform_warmup_then_adaw_and_spent_starts(self):
    cfg = _ppow_cfg(window=2, selection="topk", adaw_warmup_steps=3)
    pool = windowing.init_pool(2, 10)
    scores = np.zeros((2, 10), np.float32)
    scores[1, 6] = 9.0  # ADAW's clear favourite
    scores[0, 0] = -np.inf
    pool = pool.replace(scores_PxT=jnp.asarray(scores))
    select = jax.jit(lambda step, key: train_step._select_windows(cfg, step, key, pool, 1))
    picks = {step: {tuple(int(x[0]) for x in select(step, jax.random.PRNGKey(i))[:2])
                    for i in range(20)} for step in (0, 2, 3, 7)}
    self.assertEqual(picks[3], {(1, 6)})
    self.assertEqual(picks[7], {(1, 6)})
    self.assertGreater(len(picks[0]), 5)  # uniform during the warm-up
    self.assertNotIn((0, 0), picks[0] | picks[2])
    *_, spent = select(5, jax.random.PRNGKey(0))
    self.assertEqual(float(spent.scores_PxT[1, 6]), -np.inf)  # trained: out until re-scored
    self.assertEqual(float(spent.scores_PxT[1, 5]), 0.0)


class BudgetMatchedControlTest(absltest.TestCase):

  def test_updates_per_batch_repeats_the_update_on_one_batch(self):
    cfg = llama.ModelConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_layers=1,
                            num_heads=2, num_kv_heads=1)
    opt = train_step.make_optimizer(_optim(learning_rate=1e-2, warmup_steps=2))
    dr = drafters.LMDrafter(cfg)
    bcfg = dataclasses.replace(settings.baseline(cli.load_config(BASE)), ttt_steps=1)
    params = llama.init_params(cfg, jax.random.PRNGKey(0))
    toks = jax.random.randint(jax.random.PRNGKey(1), (2, 9), 0, cfg.vocab_size)
    batch = {"tokens_BxT": toks, "loss_mask_BxT": jnp.ones_like(toks)}
    one = jax.jit(train_step.make_baseline_step(cfg, dr, bcfg, opt, 1))
    two = jax.jit(train_step.make_baseline_step(cfg, dr, bcfg, opt, 2))
    state = train_step.init_state(params, opt, jax.random.PRNGKey(2))
    want, _ = one(one(state, params, None, batch)[0], params, None, batch)
    got, metrics = two(state, params, None, batch)
    self.assertEqual(int(got.step), 1)
    self.assertEqual(float(metrics["updates"]), 2.0)
    self.assertEqual(float(metrics["target_tokens"]), 2 * 9)  # one pass for both updates
    for x, y in zip(jax.tree_util.tree_leaves(got.params), jax.tree_util.tree_leaves(want.params)):
      np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7)


if __name__ == "__main__":
  absltest.main()
