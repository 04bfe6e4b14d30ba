"""Training: PPOW raises acceptance, resume is bit-identical, NaN stops cleanly, bad configs fail."""

import json
import os
import signal
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")

from absl.testing import absltest
import jax
import jax.numpy as jnp
import numpy as np

from ppow_jax import cli, drafters, rollout, settings, teacher_forcing, train_step, trainer
from ppow_jax.checkpoint import Checkpointer
from ppow_jax.data import pipeline
from ppow_jax.data import tokenizer as tokenizer_lib
from ppow_jax.errors import UserError
from ppow_jax.models import eagle3, llama
from ppow_jax import pretrain

from ppow_jax.metric_writer import MetricWriter

BASE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
                    "default.py")


def _optim(**overrides) -> train_step.OptimConfig:
  """The base config's optimizer settings with ``overrides`` (the config is their one source)."""
  return settings.optim(cli.load_config(BASE, [(f"ppow.optim.{k}", str(v))
                                               for k, v in overrides.items()]).ppow.optim)


def _ppow(**overrides) -> rollout.PPOWConfig:
  return settings.ppow(cli.load_config(BASE, [(f"ppow.{k}", str(v))
                                              for k, v in overrides.items()]), gamma=0.1)


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
    state = train_step.init_state(net, opt, jax.random.PRNGKey(5))
    toks = jax.random.randint(jax.random.PRNGKey(1), (4, 24), 0, 32)
    batch = {"tokens_BxT": toks, "loss_mask_BxT": jnp.ones_like(toks)}
    # omega=0: no token-level anchor, so any gain comes from the windowed reward alone
    cfg = _ppow(window=4, group_size=8, starts_per_seq=4, omega=0.0, ppo_epochs=2,
                selection="uniform")

    @jax.jit
    def expected_tau(net_params):
      tpass = teacher_forcing.target_pass(tc, tp, toks, dr.target_hidden_layers, 4 * 8 * 4)
      ro = rollout.rollout(tc, dr, cfg, tp, {"net": net_params, "vocab": vocab}, toks,
                           batch["loss_mask_BxT"], tpass, jax.random.PRNGKey(9))
      return ro.metrics["tau_sim"], ro.reward_N, ro.advantage_N

    before, reward, adv = expected_tau(state.params)
    self.assertEqual(reward.shape, (4 * 4 * 8,))
    np.testing.assert_allclose(adv.reshape(-1, 8).mean(-1), 0.0, atol=1e-5)
    step = jax.jit(train_step.make_ppow_step(tc, dr, cfg, opt))
    for _ in range(80):
      state, metrics = step(state, tp, vocab, batch)
    after, _, _ = expected_tau(state.params)
    self.assertTrue(np.isfinite(float(metrics["loss"])))
    self.assertGreater(float(after), float(before) + 0.15,
                       f"expected acceptance length {float(before):.3f} -> {float(after):.3f}")


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
    import dataclasses
    cfg = _ppow()
    with self.assertRaisesRegex(UserError, "ppow.group_size must be >= 2"):
      dataclasses.replace(cfg, group_size=1)
    with self.assertRaisesRegex(UserError, "ppow.window must be >= 1"):
      dataclasses.replace(cfg, window=0)
    with self.assertRaisesRegex(UserError, "use_speed and ppow.use_prox are both False"):
      dataclasses.replace(cfg, use_speed=False, use_prox=False)

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


if __name__ == "__main__":
  absltest.main()
