"""Train steps on a data 2 x fsdp 2 x tensor 2 mesh equal one device's."""

import dataclasses
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from absl.testing import absltest
import flax.linen as nn
import jax
from jax.sharding import PartitionSpec as P
import numpy as np
import optax

from ppow_jax import (cli, drafters, parallel, rollout, settings, sharding, train_step,
                      windowing)
from ppow_jax.errors import UserError
from ppow_jax.models import eagle3, llama

ENOUGH_DEVICES = jax.device_count() >= 8
BASE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
                    "tiny.py")
NEED_8 = ("needs 8 devices: run under pytest (tests/conftest.py) or set "
          "XLA_FLAGS=--xla_force_host_platform_device_count=8 before JAX starts")

# Every sharded dim divides by 2: vocab 64, hidden 32, mlp 64, 4 heads, 2 KV heads, draft 32.
TARGET = llama.ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
                           num_heads=4, num_kv_heads=2, max_position_embeddings=64)
DRAFT_CFG = eagle3.Eagle3Config.from_target(TARGET, draft_vocab_size=32)
DRAFTER = drafters.Eagle3FeatureDrafter.create(DRAFT_CFG, TARGET)
# Adam's eps large enough that a near-zero gradient entry, whose sign may flip with the float
# reduction order, moves its parameter by at most lr * noise / eps (~1e-9), not by lr.
OPTIMIZER = optax.chain(optax.clip_by_global_norm(0.5),
                        optax.adamw(optax.constant_schedule(1e-2), b1=0.9, b2=0.95, eps=1e-3))


def _random_params(cfg, seed: int, std: float) -> dict:
  """Host (numpy) params of the model's shapes: no init compile (slow on CPU)."""
  rng = np.random.default_rng(seed)
  fill = lambda path, x: (np.ones(x.shape, x.dtype) if jax.tree_util.keystr(path).endswith(
      "'scale']") else rng.normal(0.0, std, x.shape).astype(x.dtype))
  return jax.tree_util.tree_map_with_path(fill, nn.unbox(sharding.abstract_params(cfg)))


def _mesh_config():
  c = cli.load_config(BASE)
  c.mesh.ici_shape = (2, 2, 2)
  c.sharding.drafter_params = "fsdp"
  return c


def _assert_trees_close(test, got, want, rtol=1e-4):
  """Relative to each array's magnitude: float32 sums in another order differ in the last
  bits, whatever the size of the numbers."""
  flat_got = jax.tree_util.tree_flatten_with_path(got)[0]
  flat_want = jax.tree_util.tree_leaves(want)
  test.assertLen(flat_got, len(flat_want))
  for (path, g), w in zip(flat_got, flat_want):
    w = np.asarray(w)
    scale = float(np.abs(w).max()) if w.size else 0.0
    np.testing.assert_allclose(np.asarray(g), w, rtol=rtol, atol=rtol * 1e-2 * scale,
                               err_msg=jax.tree_util.keystr(path))


@absltest.skipUnless(ENOUGH_DEVICES, NEED_8)
class ParallelTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    fast = {"compiler_options": {"xla_backend_optimization_level": 0}}  # ~3x faster compiles
    cls.par = dataclasses.replace(parallel.Parallel.from_config(_mesh_config()), **fast)
    cls.one = dataclasses.replace(parallel.Parallel.single_device(_mesh_config()), **fast)
    cls.target = _random_params(TARGET, 0, 0.3)
    cls.net = _random_params(DRAFT_CFG, 1, 0.1)
    counts = np.random.default_rng(2).integers(0, 100, TARGET.vocab_size)
    cls.vocab = jax.device_get(eagle3.build_draft_vocab(counts, DRAFT_CFG.draft_vocab_size))
    # host copy of the initial state: each run places its own (the step donates the state)
    cls.state = jax.device_get(train_step.init_state(cls.net, OPTIMIZER, jax.random.PRNGKey(3)))
    rng = np.random.default_rng(4)
    tokens = rng.integers(0, TARGET.vocab_size, (4, 12)).astype(np.int32)
    mask = np.ones_like(tokens)
    mask[:, :3] = 0  # a "prompt" that is not trained on
    cls.batch = {"tokens_BxT": tokens, "loss_mask_BxT": mask}

  def _step_on(self, par: parallel.Parallel, make_step, cfg):
    state = self.state
    if isinstance(cfg, rollout.PPOWConfig):  # PPOW's state carries the ADAW pool
      state = state.replace(pool=windowing.init_pool(cfg.pool_rows(4), 12))
    state = par.place_train_state(DRAFTER, state)
    target = par.place_target(TARGET, self.target)
    vocab = par.place_replicated(self.vocab)
    step = par.jit_train_step(make_step(TARGET, DRAFTER, cfg, OPTIMIZER), state, target, vocab,
                              self.batch)
    out = step(state, target, vocab, self.batch)  # a host batch: the step places it
    self.assertTrue(state.params["fc"].is_deleted(), "the state was not donated")
    return out

  def _check_same_step(self, make_step, cfg):
    want_state, want = self._step_on(self.one, make_step, cfg)
    got_state, got = self._step_on(self.par, make_step, cfg)
    self.assertGreater(float(got["loss"]), 0.0)
    np.testing.assert_allclose(float(got["loss"]), float(want["loss"]), rtol=1e-5)
    _assert_trees_close(self, got_state.params, want_state.params)
    _assert_trees_close(self, got_state.opt_state, want_state.opt_state)
    moved = max(float(np.abs(np.asarray(a) - b).max()) for a, b in zip(
        jax.tree_util.tree_leaves(got_state.params), jax.tree_util.tree_leaves(self.net)))
    self.assertGreater(moved, 1e-3, "the step did not change the params")
    # the state kept its placement: FSDP params and their Adam moments, replicated counts
    fc = got_state.params["fc"]
    self.assertEqual(fc.sharding.spec, P(None, "fsdp"))
    adam = got_state.opt_state[1][0]
    self.assertEqual(adam.mu["fc"].sharding.spec, P(None, "fsdp"))
    self.assertEqual(adam.count.sharding.spec, P())
    return got

  def test_baseline_step_matches_one_device(self):
    c = _mesh_config()
    c.baseline.ttt_steps = 2
    self._check_same_step(train_step.make_baseline_step, settings.baseline(c))

  def test_ppow_step_matches_one_device(self):
    got = self._check_same_step(
        train_step.make_ppow_step,
        # uniform selection: ADAW's top-k could flip on last-bit score differences; hence
        # teacher-forced scores, a smaller compile (the sharded TTT unroll is the baseline's)
        settings.ppow(cli.load_config(BASE, [("ppow.window", "3"), ("ppow.group_size", "2"),
                                             ("ppow.starts_per_seq", "2"), ("ppow.pool_size", "0"),
                                             ("ppow.selection", "uniform"),
                                             ("ppow.adaw_scoring", "teacher_forced")]),
                      gamma=0.1))
    self.assertEqual(got["accepted_hist"].shape, (4,))

  def test_target_is_sharded(self):
    target = self.par.place_target(TARGET, self.target)
    self.assertEqual(target["embed_tokens"].sharding.spec, P("tensor", "fsdp"))
    self.assertEqual(target["layers_0"]["mlp"]["gate_proj"].sharding.spec, P("fsdp", "tensor"))
    self.assertEqual(target["layers_1"]["self_attn"]["k_proj"].sharding.spec,
                     P("fsdp", "tensor", None))
    leaves = jax.tree_util.tree_leaves(target)
    total = sum(x.nbytes for x in leaves)
    device0 = sum(x.addressable_shards[0].data.nbytes for x in leaves)
    self.assertLess(device0, 0.3 * total)  # fsdp 2 x tensor 2: ~1/4 (norm scales aside)

  def test_state_shardings_of_an_abstract_state(self):
    """What a checkpoint restore needs, from ``eval_shape`` alone: Adam's moments mirror the
    params; counts and the rng are replicated; ``replicated`` mode replicates everything."""
    abstract = jax.eval_shape(
        lambda: train_step.init_state(self.net, OPTIMIZER, jax.random.PRNGKey(0)))
    for mode in ("fsdp", "replicated"):
      sh = dataclasses.replace(self.par, drafter_params=mode).train_state_shardings(
          DRAFTER, abstract)
      adam = sh.opt_state[1][0]
      want_fc = P(None, "fsdp") if mode == "fsdp" else P()
      self.assertEqual(sh.params["fc"].spec, want_fc, mode)
      self.assertEqual(adam.mu["fc"].spec, want_fc, mode)
      self.assertEqual(adam.nu["midlayer"]["mlp"]["down_proj"].spec,
                       P("tensor", "fsdp") if mode == "fsdp" else P(), mode)
      self.assertEqual((adam.count.spec, sh.step.spec, sh.rng.spec), (P(), P(), P()))

  def test_indivisible_shapes_raise_naming_what(self):
    self.assertEqual(self.par.batch_shards, 4)
    with self.assertRaisesRegex(UserError, "6 rows does not divide over the 4 devices"):
      self.par.place_batch({"tokens_BxT": np.zeros((6, 4), np.int32)})
    one_kv_head = dataclasses.replace(TARGET, num_kv_heads=1)
    with self.assertRaisesRegex(UserError, r"target parameter .*k_proj.*\(32, 1, 8\)"):
      self.par.place_target(one_kv_head, _random_params(one_kv_head, 0, 0.1))


if __name__ == "__main__":
  absltest.main()
