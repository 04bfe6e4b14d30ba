"""Tree decoding: one-call tree verification equals per-path forwards; T=0 equals AR."""

import dataclasses
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

from absl.testing import absltest, parameterized
import jax
import jax.numpy as jnp
import numpy as np

import engine_test  # the chain engine's tiny models, prompts and noisy drafter
from ppow_jax import drafters, engine, tree, tree_engine
from ppow_jax.errors import UserError
from ppow_jax.models import eagle3, llama

# the chain engine's test models, with room for a tree's provisional entries
TARGET = dataclasses.replace(engine_test.TARGET, max_position_embeddings=160)
SMALL = dataclasses.replace(engine_test.SMALL, max_position_embeddings=160)
PROMPTS, MAX_NEW, _noisy_copy = engine_test.PROMPTS, engine_test.MAX_NEW, engine_test._noisy_copy


def _tree_of(parents, tokens_BxN1, top_k):
  b = len(tokens_BxN1)
  parent = jnp.asarray([parents] * b, jnp.int32)
  depth = np.zeros(len(parents), np.int32)
  for i, p in enumerate(parents[1:], 1):
    depth[i] = depth[p] + 1
  return tree.Tree(jnp.asarray(tokens_BxN1, jnp.int32), parent, jnp.asarray([depth] * b),
                   tree.ancestor_mask(parent, int(depth.max())),
                   tree.children_table(parent, top_k))


class VerifyTreeTest(absltest.TestCase):

  def test_node_logits_equal_full_forward_of_its_path(self):
    tp = llama.init_params(TARGET, jax.random.PRNGKey(0))
    model = llama.Decoder(TARGET)
    prompts, lens = engine.pad_prompts([[4, 5, 6, 7, 8, 9], [11, 12, 13]], multiple=8)
    _, cache, _ = engine._prefill(model, tp, jnp.asarray(prompts), jnp.asarray(lens), 32, (), 0)
    parents = [-1, 0, 0, 1, 1, 2, 4, 6]
    rng = np.random.default_rng(0)
    toks = rng.integers(0, 64, size=(2, len(parents)))
    toks[:, 0] = [p[n - 1] for p, n in zip(prompts, lens)]  # the root is the pending token
    t = _tree_of(parents, toks, 2)
    out = tree_engine.verify_tree(model, tp, cache, t, jnp.asarray(lens))
    seqs = []  # each node's prompt + root path, right-padded into one causal forward
    for b in range(2):
      for i in range(len(parents)):
        path, u = [], i
        while u > 0:
          path.append(int(toks[b, u]))
          u = parents[u]
        seqs.append(list(prompts[b][:lens[b]]) + path[::-1])
    padded = np.zeros((len(seqs), max(map(len, seqs))), np.int32)
    for r, seq in enumerate(seqs):
      padded[r, :len(seq)] = seq
    logits = jax.jit(model.apply)({"params": tp}, jnp.asarray(padded))
    ref = np.stack([logits[r, len(seq) - 1] for r, seq in enumerate(seqs)])
    got = np.asarray(out.logits_BxTxV).reshape(len(seqs), -1)
    np.testing.assert_allclose(got, ref, rtol=2e-4, atol=2e-4 * float(np.abs(ref).max()))

  def test_commit_path_moves_entries(self):
    self.enterContext(jax.numpy_rank_promotion("raise"))  # (the models themselves promote)
    cfg = llama.ModelConfig(vocab_size=8, hidden_size=4, intermediate_size=8, num_layers=1,
                            num_heads=1, num_kv_heads=1)
    cache = llama.init_cache(cfg, 2, 12)
    vals = jnp.arange(2 * 12, dtype=jnp.float32).reshape(2, 12, 1) * jnp.ones((1, 1, 4))
    cache = cache.replace(k_BKxSxD=(vals,), v_BKxSxD=(-vals,))
    path = jnp.asarray([[2, 5, 0], [3, 0, 0]])
    out = tree_engine.commit_path(cache, path, jnp.asarray([2, 1]), jnp.asarray([3, 1]))
    k = np.asarray(out.k_BKxSxD[0][:, :, 0])
    np.testing.assert_array_equal(k[0, :6], [0, 1, 2, 3, 5, 8])
    np.testing.assert_array_equal(k[1, :4], [12, 13, 16, 15])
    np.testing.assert_array_equal(np.asarray(out.v_BKxSxD[0][:, :, 0]), -k)


class TreeGreedyEqualsAutoregressiveTest(parameterized.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.tp = llama.init_params(TARGET, jax.random.PRNGKey(0))
    cls.prompts, cls.lens = engine.pad_prompts(PROMPTS)
    cfg = engine.DecodeConfig(max_new_tokens=MAX_NEW)
    ar = engine.Engine(TARGET, None, cfg).generate(cls.tp, None, cls.prompts, cls.lens,
                                                    jax.random.PRNGKey(0))
    cls.ar_tokens = ar.new_tokens()

  @parameterized.parameters(("lm_noisy", (10, 4, 3)), ("lm_random", (6, 3, 2)),
                            ("eagle3", (8, 3, 3)))
  def test_tree_equals_autoregressive(self, kind, shape):
    drafter, dparams = engine_test.make_drafter(kind, TARGET, SMALL, self.tp)
    shape = tree.TreeShape(*shape)
    cfg = engine.DecodeConfig(max_new_tokens=MAX_NEW)
    out = tree_engine.TreeEngine(TARGET, drafter, cfg, shape).generate(
        self.tp, dparams, self.prompts, self.lens, jax.random.PRNGKey(0))
    self.assertEqual(out.new_tokens(), self.ar_tokens)
    s = out.stats.summary()
    self.assertEqual(s["committed"], len(PROMPTS) * MAX_NEW)
    self.assertGreaterEqual(s["tau"], 1.0)
    self.assertLessEqual(s["tau"], shape.depth + 1)
    if kind == "lm_noisy":  # a near-copy of the target is accepted deep into the tree
      self.assertGreater(s["tau"], 2.0)

  def test_refuses_sliding_window(self):
    cfg = dataclasses.replace(TARGET, sliding_window=8)
    with self.assertRaisesRegex(UserError, "sliding"):
      tree_engine.TreeEngine(cfg, drafters.LMDrafter(SMALL), engine.DecodeConfig(),
                             tree.TreeShape(4, 2, 2))


class TreeLosslessSamplingTest(absltest.TestCase):
  """At T > 0 tree decoding samples the target's distribution (joint of three tokens)."""

  V = 6
  CFG = llama.ModelConfig(vocab_size=V, hidden_size=16, intermediate_size=32, num_layers=1,
                          num_heads=2, num_kv_heads=1, max_position_embeddings=32,
                          initializer_range=0.5)

  def test_joint_distribution_of_three_tokens(self):
    tp = llama.init_params(self.CFG, jax.random.PRNGKey(3))
    dp = _noisy_copy(tp, 0.4, 4)  # a drafter that often disagrees
    prompt, rows, reps = [1, 4, 2], 8192, 4
    cfg = engine.DecodeConfig(temperature=1.0, max_new_tokens=3)
    eng = tree_engine.TreeEngine(self.CFG, drafters.LMDrafter(self.CFG), cfg,
                                 tree.TreeShape(4, 2, 2))
    prompts, lens = engine.pad_prompts([prompt] * rows, multiple=1)
    counts, accepted = engine_test.sample_joint(eng, tp, dp, prompts, lens, reps, self.V)
    self.assertGreater(accepted, 0.2 * rows * reps)
    expected = engine_test.exact_joint(self.CFG, tp, prompt) * rows * reps
    chi2, dof, pval = engine_test.chi2_test(counts, expected)
    self.assertGreater(pval, 1e-3, f"chi2={chi2:.1f} dof={dof}")


if __name__ == "__main__":
  absltest.main()
