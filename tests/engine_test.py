"""The speculative engine: greedy output equals AR, sampling is lossless, bad input is refused."""

import dataclasses
import functools
import itertools
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

from absl.testing import absltest, parameterized
import jax
import jax.numpy as jnp
import numpy as np
from scipy import stats as scipy_stats

from ppow_jax import drafters, engine
from ppow_jax.errors import UserError
from ppow_jax.models import decode_weights, eagle3, llama

TARGET = llama.ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=3,
                           num_heads=4, num_kv_heads=2, max_position_embeddings=128,
                           initializer_range=0.3)
SMALL = llama.ModelConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_layers=1,
                          num_heads=2, num_kv_heads=1, max_position_embeddings=128)
PROMPTS = [[1, 2, 3, 4, 5], [7, 8], [9, 10, 11, 12, 13, 14, 15, 16, 17, 18], [3]]
MAX_NEW = 14


@functools.partial(jax.jit, static_argnums=(1, 2))
def _noisy_copy(params, scale, seed):
  """A drafter that mostly agrees with the target: its weights plus noise."""
  leaves, tree = jax.tree_util.tree_flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
  return jax.tree_util.tree_unflatten(
      tree, [x + scale * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


def sample_joint(eng, tp, dp, prompts, lens, reps: int, vocab: int) -> tuple[np.ndarray, float]:
  """Counts of the first three generated tokens (as one index in ``vocab**3``) over ``reps``
  keyed runs, and the accepted draft tokens summed over them."""
  counts, accepted = np.zeros(vocab ** 3), 0.0
  for r in range(reps):
    out = eng.generate(tp, dp, prompts, lens, jax.random.PRNGKey(100 + r))
    toks = np.array(out.new_tokens())
    np.add.at(counts, toks @ (vocab ** np.arange(2, -1, -1)), 1)
    accepted += out.stats.summary()["accepted"]
  return counts, accepted


def exact_joint(cfg: llama.ModelConfig, params, prompt: list[int],
                temperature: float = 1.0) -> np.ndarray:
  """p(x1, x2, x3 | prompt) at ``temperature``, by enumerating all V^3 continuations (in the
  index order of ``sample_joint``'s counts)."""
  model = llama.Decoder(cfg)
  seqs = np.array([prompt + list(c) for c in itertools.product(range(cfg.vocab_size), repeat=3)])
  logp = jax.jit(lambda p, x: jax.nn.log_softmax(model.apply({"params": p}, x) / temperature))(
      params, jnp.asarray(seqs))
  p = len(prompt)
  logp = np.asarray(logp, np.float64)
  return np.exp(sum(logp[np.arange(len(seqs)), p - 1 + i, seqs[:, p + i]] for i in range(3)))


def chi2_test(counts: np.ndarray, expected: np.ndarray) -> tuple[float, int, float]:
  """(χ², degrees of freedom, p-value); cells expecting < 5 are pooled into one."""
  big = expected >= 5
  obs = np.append(counts[big], counts[~big].sum())
  exp = np.append(expected[big], expected[~big].sum())
  chi2 = float(((obs - exp) ** 2 / exp).sum())
  return chi2, len(obs) - 1, float(scipy_stats.chi2.sf(chi2, len(obs) - 1))


def make_drafter(kind: str, target: llama.ModelConfig, small: llama.ModelConfig, tp):
  """(drafter, params): a random small LM, a noisy copy of the target, or a random EAGLE-3
  drafter with a 48-token draft vocabulary."""
  if kind == "lm_random":
    return drafters.LMDrafter(small), llama.init_params(small, jax.random.PRNGKey(1))
  if kind == "lm_noisy":
    return drafters.LMDrafter(target), _noisy_copy(tp, 0.005, 1)
  ecfg = eagle3.Eagle3Config.from_target(target, draft_vocab_size=48)
  counts = np.arange(target.vocab_size)[::-1].astype(np.float64)
  return (drafters.Eagle3FeatureDrafter.create(ecfg, target),
          {"net": eagle3.init_eagle3(ecfg, jax.random.PRNGKey(2)),
           "vocab": eagle3.build_draft_vocab(counts, 48)})


class GreedyEqualsAutoregressiveTest(parameterized.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.tp = llama.init_params(TARGET, jax.random.PRNGKey(0))
    cls.prompts, cls.lens = engine.pad_prompts(PROMPTS)
    cfg = engine.DecodeConfig(window=4, max_new_tokens=MAX_NEW)
    ar = engine.Engine(TARGET, None, cfg).generate(cls.tp, None, cls.prompts, cls.lens,
                                                    jax.random.PRNGKey(0))
    cls.ar_tokens = ar.new_tokens()
    cls.ar_stats = ar.stats.summary()

  def test_autoregressive_matches_full_forward_argmax(self):
    forward = jax.jit(llama.Decoder(TARGET).apply)
    for prompt, new in zip(PROMPTS, self.ar_tokens):
      seq = jnp.asarray([prompt + new[:-1]])
      logits = forward({"params": self.tp}, seq)
      np.testing.assert_array_equal(np.argmax(logits[0, len(prompt) - 1:], -1), new)
    self.assertEqual(self.ar_stats["tau"], 1.0)

  @parameterized.parameters(
      ("lm_random", 1), ("lm_noisy", 4), ("lm_noisy", 10),
      ("eagle3", 1), ("eagle3", 4), ("eagle3", 10))
  def test_speculative_equals_autoregressive(self, kind, window):
    drafter, dparams = make_drafter(kind, TARGET, SMALL, self.tp)
    cfg = engine.DecodeConfig(window=window, max_new_tokens=MAX_NEW)
    out = engine.Engine(TARGET, drafter, cfg).generate(self.tp, dparams, self.prompts,
                                                       self.lens, jax.random.PRNGKey(0))
    self.assertEqual(out.new_tokens(), self.ar_tokens)
    s = out.stats.summary()
    self.assertEqual(s["committed"], len(PROMPTS) * MAX_NEW)
    self.assertGreaterEqual(s["tau"], 1.0)
    self.assertLessEqual(s["tau"], window + 1)
    self.assertLess(s["verify_calls"], self.ar_stats["verify_calls"] + 1)
    if kind == "lm_noisy":  # a near-copy accepts most drafts; ragged rows are exercised
      self.assertGreater(s["tau"], 2.0)
    # greedy: α of one-hot distributions is the match indicator, so analytic τ = 1 + a
    self.assertAlmostEqual(s["tau_analytic"] * s["verify_calls"],
                           s["accepted"] + s["verify_calls"], delta=1e-3)

  def test_fused_projections_decode_the_same_tokens(self):
    drafter, dparams = make_drafter("eagle3", TARGET, SMALL, self.tp)
    cfg = engine.DecodeConfig(window=4, max_new_tokens=MAX_NEW)
    fused = decode_weights.fuse_projections(self.tp)
    ar = engine.Engine(TARGET, None, cfg).generate(fused, None, self.prompts, self.lens,
                                                  jax.random.PRNGKey(0))
    self.assertEqual(ar.new_tokens(), self.ar_tokens)
    spec = engine.Engine(TARGET, drafter, cfg).generate(
        fused, decode_weights.fuse_projections(dparams), self.prompts, self.lens,
        jax.random.PRNGKey(0))
    self.assertEqual(spec.new_tokens(), self.ar_tokens)

  def test_decoding_params_fuse_local_weights_and_leave_sharded_ones(self):
    host = jax.tree_util.tree_map(np.asarray, self.tp)
    for params in (self.tp, host):
      out = engine.decoding_params(params)
      self.assertIn("qkv_proj_t", out["layers_0"]["self_attn"])
      # every leaf on the device, the unfused ones too (no host copy at every call)
      self.assertTrue(all(isinstance(x, jax.Array) for x in jax.tree_util.tree_leaves(out)))
    self.assertIsNone(engine.decoding_params(None))
    if len(jax.devices()) < 2:
      self.skipTest("needs 2 devices (the suite fakes 8)")
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:2]), ("x",))
    spread = jax.device_put(self.tp, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
    self.assertIs(engine.decoding_params(spread), spread)

  def test_a_drafter_of_the_targets_own_layers_reads_the_targets_buffers(self):
    # an LM drafter made of a copy of the target's embedding, first layer, norm and head
    dparams = {k: jax.tree_util.tree_map(lambda x: jnp.array(np.asarray(x)), self.tp[k])
               for k in self.tp if k not in ("layers_1", "layers_2")}
    tp, dp = engine.decoding_pair(self.tp, dparams)
    target_ids = {id(x) for x in jax.tree_util.tree_leaves(tp)}
    self.assertTrue(all(id(x) in target_ids for x in jax.tree_util.tree_leaves(dp)))
    self.assertIs(dp["layers_0"]["self_attn"]["qkv_proj_t"],
                  tp["layers_0"]["self_attn"]["qkv_proj_t"])
    apart = engine.decoding_params(dparams)
    self.assertFalse(any(id(x) in target_ids for x in jax.tree_util.tree_leaves(apart)))
    drafter = drafters.LMDrafter(dataclasses.replace(TARGET, num_layers=1))
    cfg = engine.DecodeConfig(window=4, max_new_tokens=MAX_NEW)
    eng = engine.Engine(TARGET, drafter, cfg)
    outs = [eng.generate(tp, d, self.prompts, self.lens, jax.random.PRNGKey(0))
            for d in (dp, apart)]
    for out in outs:
      self.assertEqual(out.new_tokens(), self.ar_tokens)
    self.assertEqual(outs[0].stats.summary(), outs[1].stats.summary())

  def test_chunked_prompt_pass(self):
    # chunks of 3 over the 16 padded prompt slots: a scan of 5 chunks and a remainder of 1;
    # EAGLE-3 reads the target's hidden states of every prompt position across the chunks
    cfg = engine.DecodeConfig(window=4, max_new_tokens=MAX_NEW, prefill_chunk=3)
    ar = engine.Engine(TARGET, None, cfg).generate(self.tp, None, self.prompts, self.lens,
                                                   jax.random.PRNGKey(0))
    self.assertEqual(ar.new_tokens(), self.ar_tokens)
    ecfg = eagle3.Eagle3Config.from_target(TARGET, draft_vocab_size=48)
    drafter = drafters.Eagle3FeatureDrafter.create(ecfg, TARGET)
    dparams = {"net": eagle3.init_eagle3(ecfg, jax.random.PRNGKey(2)),
               "vocab": eagle3.build_draft_vocab(np.arange(64)[::-1].astype(np.float64), 48)}
    whole, chunked = (engine.Engine(TARGET, drafter, engine.DecodeConfig(
        window=3, max_new_tokens=MAX_NEW, prefill_chunk=c)).generate(
            self.tp, dparams, self.prompts, self.lens, jax.random.PRNGKey(0)) for c in (0, 4))
    self.assertEqual(chunked.new_tokens(), self.ar_tokens)
    # the drafter saw the same prompt features: the same drafts were accepted
    self.assertEqual(chunked.stats.summary(), whole.stats.summary())

  def test_prompt_pass_alone_fills_the_caches_generate_starts_from(self):
    # the pass that decode-only benchmark rates leave out: each row's prompt in both caches,
    # the target's last prompt token still pending
    dp = _noisy_copy(self.tp, 0.005, 1)
    eng = engine.Engine(TARGET, drafters.LMDrafter(TARGET), engine.DecodeConfig(
        window=4, max_new_tokens=MAX_NEW))
    buffer, tcache, dstate = eng.prompt_pass(self.tp, dp, self.prompts, self.lens)
    p = self.prompts.shape[1]
    self.assertEqual(buffer.shape, (len(PROMPTS), eng.cache_length(p)))
    np.testing.assert_array_equal(buffer[:, :p], self.prompts)
    np.testing.assert_array_equal(tcache.lengths_B, self.lens - 1)
    for params, cache in ((self.tp, tcache), (dp, dstate.cache)):
      ref = llama.Decoder(TARGET).apply(
          {"params": params}, jnp.asarray(self.prompts),
          cache=llama.init_cache(TARGET, len(PROMPTS), eng.cache_length(p)),
          return_logits=False, method=llama.Decoder.forward).cache
      for got, want in zip(cache.k_BKxSxD + cache.v_BKxSxD, ref.k_BKxSxD + ref.v_BKxSxD):
        np.testing.assert_allclose(got[:, :p], want[:, :p], rtol=1e-5, atol=1e-5)
    self.assertIsNone(engine.Engine(TARGET, None, eng.cfg).prompt_pass(
        self.tp, None, self.prompts, self.lens)[2])

  def test_eos_stops_rows(self):
    eos = self.ar_tokens[0][3]
    cfg = engine.DecodeConfig(window=4, max_new_tokens=MAX_NEW, eos_ids=(eos,))
    out = engine.Engine(TARGET, drafters.LMDrafter(TARGET), cfg).generate(
        self.tp, _noisy_copy(self.tp, 0.005, 1), self.prompts, self.lens, jax.random.PRNGKey(0))
    for ref, got in zip(self.ar_tokens, out.new_tokens()):
      cut = ref.index(eos) + 1 if eos in ref else len(ref)
      self.assertEqual(got, ref[:cut])


class LosslessSamplingTest(parameterized.TestCase):
  """At T > 0 speculative samples follow the target's distribution exactly."""

  V = 6
  CFG = llama.ModelConfig(vocab_size=V, hidden_size=16, intermediate_size=32, num_layers=1,
                          num_heads=2, num_kv_heads=1, max_position_embeddings=32,
                          initializer_range=0.5)

  @parameterized.parameters(1.0, 0.7)
  def test_joint_distribution_of_three_tokens(self, temperature):
    tp = llama.init_params(self.CFG, jax.random.PRNGKey(3))
    dp = _noisy_copy(tp, 0.4, 4)  # a drafter that often disagrees
    prompt = [1, 4, 2]
    rows, reps = 8192, 8
    cfg = engine.DecodeConfig(window=2, temperature=temperature, max_new_tokens=3)
    eng = engine.Engine(self.CFG, drafters.LMDrafter(self.CFG), cfg)
    prompts, lens = engine.pad_prompts([prompt] * rows, multiple=1)
    counts, accepted = sample_joint(eng, tp, dp, prompts, lens, reps, self.V)
    self.assertGreater(accepted, 0.2 * rows * reps)  # rejections and acceptances both occur
    self.assertLess(accepted, 1.8 * rows * reps)
    expected = exact_joint(self.CFG, tp, prompt, temperature) * rows * reps
    chi2, dof, pval = chi2_test(counts, expected)
    self.assertGreater(pval, 1e-3, f"chi2={chi2:.1f} dof={dof}")


class BadInputTest(absltest.TestCase):

  def test_window_and_temperature(self):
    with self.assertRaisesRegex(UserError, "window K must be >= 1"):
      engine.DecodeConfig(window=0)
    with self.assertRaisesRegex(UserError, "temperature must be >= 0"):
      engine.DecodeConfig(temperature=-0.5)
    with self.assertRaisesRegex(UserError, "prefill_chunk must be >= 0, got -1"):
      engine.DecodeConfig(prefill_chunk=-1)
    with self.assertRaisesRegex(UserError, "compact_min_rows must be >= 1, got 0"):
      engine.DecodeConfig(compact_min_rows=0)

  def test_vocab_mismatch(self):
    other = llama.ModelConfig(vocab_size=65, hidden_size=16, intermediate_size=32, num_layers=1,
                              num_heads=2, num_kv_heads=1)
    with self.assertRaisesRegex(UserError, "vocab_size 65 != target vocab_size 64"):
      engine.Engine(TARGET, drafters.LMDrafter(other), engine.DecodeConfig())

  def test_prompt_longer_than_cache(self):
    eng = engine.Engine(TARGET, None, engine.DecodeConfig(max_new_tokens=100))
    prompts, lens = engine.pad_prompts([[1] * 40])
    with self.assertRaisesRegex(UserError, "exceeds the target's max_position_embeddings 128"):
      eng.generate(None, None, prompts, lens, jax.random.PRNGKey(0))

  def test_empty_prompt(self):
    with self.assertRaisesRegex(UserError, "at least one token"):
      engine.pad_prompts([[1, 2], []])


if __name__ == "__main__":
  absltest.main()
