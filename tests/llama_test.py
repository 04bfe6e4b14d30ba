"""The decoder: KV-cache path = full forward (ragged rows, chunks of 1 and K+1), masks, dtypes."""

import dataclasses
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

from absl.testing import absltest
import jax
import jax.numpy as jnp
import numpy as np

from ppow_jax import cpu_gemv
from ppow_jax.models import decode_weights, llama

CFG = llama.ModelConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_layers=3,
                        num_heads=4, num_kv_heads=2, rope_theta=5e5, initializer_range=0.3,
                        qk_norm=True, qkv_bias=True, max_position_embeddings=64)


def _forward(cfg):
  model = llama.Decoder(cfg)

  @jax.jit
  def fwd(params, tokens, cache):
    return model.apply({"params": params}, tokens, cache=cache, method=llama.Decoder.forward)

  return fwd


class CacheTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.params = llama.init_params(CFG, jax.random.PRNGKey(0))
    cls.tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 20), 0, CFG.vocab_size)
    cls.full = jax.jit(lambda p, t: llama.Decoder(CFG).apply({"params": p}, t))(
        cls.params, cls.tokens)

  def test_prefix_then_chunks_of_1_and_k_plus_1_with_ragged_rows(self):
    fwd = _forward(CFG)
    cache = llama.init_cache(CFG, 2, 32)
    out = fwd(self.params, self.tokens[:, :6], cache)
    np.testing.assert_allclose(out.logits_BxTxV, self.full[:, :6], atol=1e-5)
    # Row 0 keeps 6 tokens, row 1 rolls back to 3: different lengths in one batch.
    cache = out.cache.replace(lengths_B=jnp.array([6, 3]))
    pos = np.array([6, 3])
    for chunk in (1, 5, 1, 5):  # 1 = AR step, 5 = a verification of K+1 = 5 tokens
      new = jnp.stack([self.tokens[b, pos[b]:pos[b] + chunk] for b in range(2)])
      out = fwd(self.params, new, cache)
      for b in range(2):
        np.testing.assert_allclose(out.logits_BxTxV[b], self.full[b, pos[b]:pos[b] + chunk],
                                   atol=1e-5, err_msg=f"row {b} chunk {chunk} at {pos[b]}")
      cache = out.cache
      pos += chunk
      np.testing.assert_array_equal(cache.lengths_B, pos)

  def test_single_row(self):
    # one row takes the dynamic-update-slice write, several rows the scatter
    fwd = _forward(CFG)
    out = fwd(self.params, self.tokens[1:, :7], llama.init_cache(CFG, 1, 32))
    for start, chunk in ((7, 1), (8, 5), (13, 1)):
      out = fwd(self.params, self.tokens[1:, start:start + chunk], out.cache)
      np.testing.assert_allclose(out.logits_BxTxV[0], self.full[1, start:start + chunk],
                                 atol=1e-5, err_msg=f"chunk {chunk} at {start}")
    np.testing.assert_array_equal(out.cache.lengths_B, [14])

  def test_take_rows(self):
    cache = _forward(CFG)(self.params, self.tokens[:, :5], llama.init_cache(CFG, 2, 8)).cache
    taken = cache.take_rows(jnp.array([1, 1, 0]), jnp.array([3, 4, 5]))
    kv = CFG.num_kv_heads
    for layer in range(CFG.num_layers):
      for new, old in enumerate([1, 1, 0]):
        for got, src in ((taken.k_BKxSxD, cache.k_BKxSxD), (taken.v_BKxSxD, cache.v_BKxSxD)):
          np.testing.assert_array_equal(got[layer][new * kv:(new + 1) * kv],
                                        src[layer][old * kv:(old + 1) * kv])
    np.testing.assert_array_equal(taken.lengths_B, [3, 4, 5])
    self.assertEqual(taken.max_length, 8)

  def test_cache_is_written_in_place_in_a_loop(self):
    # the engine's loops carry the cache: no step may copy a whole layer's keys or values
    model = llama.Decoder(CFG)
    for batch in (1, 2):
      def step(i, cache):
        tok = jnp.full((batch, 1), i % CFG.vocab_size)
        return model.apply({"params": self.params}, tok, cache=cache,
                           method=llama.Decoder.forward).cache
      loop = jax.jit(lambda c: jax.lax.fori_loop(0, 4, step, c), donate_argnums=0)
      cache = llama.init_cache(CFG, batch, 32)
      hlo = loop.lower(cache).compile().as_text()
      shape = f"f32[{batch * CFG.num_kv_heads},32,{CFG.resolved_head_dim}]"
      copies = [ln for ln in hlo.splitlines()
                if "copy(" in ln and ln.split("=", 1)[-1].strip().startswith(shape)]
      self.assertEmpty(copies, f"batch {batch}")

  def test_stale_entries_after_rollback_are_ignored(self):
    fwd = _forward(CFG)
    cache = llama.init_cache(CFG, 2, 32)
    junk = (self.tokens[:, :10] + 7) % CFG.vocab_size
    out = fwd(self.params, jnp.concatenate([self.tokens[:, :4], junk[:, 4:]], 1), cache)
    cache = out.cache.replace(lengths_B=jnp.array([4, 4]))  # reject the junk
    out = fwd(self.params, self.tokens[:, 4:9], cache)
    np.testing.assert_allclose(out.logits_BxTxV, self.full[:, 4:9], atol=1e-5)

  def test_hidden_states_and_explicit_mask(self):
    model = llama.Decoder(CFG)
    out = model.apply({"params": self.params}, self.tokens, hidden_layers=(0, 2, 3),
                      method=llama.Decoder.forward)
    self.assertLen(out.hidden_states, 3)
    emb = model.apply({"params": self.params}, self.tokens, method=llama.Decoder.embed)
    np.testing.assert_allclose(out.hidden_states[0], emb, atol=1e-6)
    causal = jnp.tril(jnp.ones((20, 20), bool))[None].repeat(2, 0)
    masked = model.apply({"params": self.params}, self.tokens, attn_mask_BxTxS=causal,
                         method=llama.Decoder.forward)
    np.testing.assert_allclose(masked.logits_BxTxV, self.full, atol=1e-5)
    self.assertEqual(CFG.eagle3_layers(), (2, 1, 0))
    with self.assertRaisesRegex(ValueError, "hidden layer index 9"):
      model.apply({"params": self.params}, self.tokens, hidden_layers=(9,),
                  method=llama.Decoder.forward)

  def test_bfloat16_compute_stays_close(self):
    cfg = llama.ModelConfig(**{**CFG.__dict__, "dtype": "bfloat16", "param_dtype": "bfloat16"})
    params = jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), self.params)
    logits = jax.jit(lambda p, t: llama.Decoder(cfg).apply({"params": p}, t))(params,
                                                                             self.tokens)
    self.assertEqual(logits.dtype, jnp.float32)
    self.assertLess(float(jnp.max(jnp.abs(logits - self.full))), 0.25)
    agree = np.mean(np.argmax(logits, -1) == np.argmax(self.full, -1))
    self.assertGreater(agree, 0.9)

  def test_fused_projections_compute_the_same_logits_and_cache(self):
    fused = decode_weights.fuse_projections(self.params)
    attn, mlp = fused["layers_0"]["self_attn"], fused["layers_0"]["mlp"]
    self.assertNotIn("q_proj", attn)
    self.assertNotIn("gate_proj", mlp)
    h, kv, d, e = CFG.num_heads, CFG.num_kv_heads, CFG.resolved_head_dim, CFG.hidden_size
    self.assertEqual(attn["qkv_proj_t"].shape, ((h + 2 * kv) * d, e))
    self.assertEqual(attn["o_proj_t"].shape, (e, h * d))
    self.assertEqual(mlp["gate_up_proj_t"].shape, (2 * CFG.intermediate_size, e))
    self.assertNotIn("down_proj", mlp)
    self.assertNotIn("o_proj", attn)
    self.assertEqual(mlp["down_proj_t"].shape, (e, CFG.intermediate_size))
    self.assertIn("q_bias", attn)  # biases and norms are left as they are
    full = jax.jit(lambda p, t: llama.Decoder(CFG).apply({"params": p}, t))(fused, self.tokens)
    np.testing.assert_allclose(np.asarray(full), np.asarray(self.full), rtol=1e-5, atol=1e-5)
    fwd = _forward(CFG)
    a = fwd(self.params, self.tokens, llama.init_cache(CFG, 2, 24))
    b = fwd(fused, self.tokens, llama.init_cache(CFG, 2, 24))
    np.testing.assert_allclose(np.asarray(b.cache.k_BKxSxD[2]), np.asarray(a.cache.k_BKxSxD[2]),
                               rtol=1e-5, atol=1e-5)
    # the column order matters: k and v (same shape) swapped is a different model
    bad = jax.tree_util.tree_map(lambda x: x, fused)
    qkv = bad["layers_1"]["self_attn"]["qkv_proj_t"]
    q, k, v = qkv[:h * d], qkv[h * d:(h + kv) * d], qkv[(h + kv) * d:]
    bad["layers_1"]["self_attn"]["qkv_proj_t"] = jnp.concatenate([q, v, k], 0)
    wrong = jax.jit(lambda p, t: llama.Decoder(CFG).apply({"params": p}, t))(bad, self.tokens)
    self.assertGreater(float(jnp.abs(wrong - self.full).max()), 1e-2)

  def test_fused_one_token_steps_take_the_cpu_kernel_and_match(self):
    # 2 rows x 1 token: the few-row products (cpu_gemv) of a decode step, against the
    # separate-projection model on XLA's dots; untied and tied (the [V, E] table as the head)
    tied = dataclasses.replace(CFG, tie_embeddings=True)
    for cfg, params in ((CFG, self.params), (tied, llama.init_params(tied, jax.random.PRNGKey(3)))):
      with self.subTest(tie_embeddings=cfg.tie_embeddings):
        fused = decode_weights.fuse_projections(params)
        fwd = _forward(cfg)
        prefix, step = self.tokens[:, :12], self.tokens[:, 12:13]
        full = jax.jit(lambda p, t: llama.Decoder(cfg).apply({"params": p}, t))(params,
                                                                                self.tokens)
        caches = [fwd(p, prefix, llama.init_cache(cfg, 2, 24)).cache for p in (params, fused)]
        want, got = (fwd(p, step, c).logits_BxTxV for p, c in zip((params, fused), caches))
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(np.asarray(got[:, 0]), np.asarray(full[:, 12]), rtol=1e-4,
                                   atol=1e-4)
        if cpu_gemv.applies(2, jnp.float32, jnp.float32):
          hlo = fwd.lower(fused, step, caches[1]).compile().as_text()
          # per layer q/k/v, o, gate/up and down; and the head (the embedding table when tied,
          # lm_head_t otherwise)
          self.assertEqual(hlo.count(f'custom_call_target="{cpu_gemv._TARGET}"'),
                           4 * cfg.num_layers + 1)
          self.assertEqual("lm_head_t" in fused, not cfg.tie_embeddings)

  def test_config_errors_name_the_field(self):
    with self.assertRaisesRegex(ValueError, "num_heads=6 is not a multiple of num_kv_heads=4"):
      llama.ModelConfig(vocab_size=5, hidden_size=12, intermediate_size=8, num_layers=1,
                        num_heads=6, num_kv_heads=4)
    with self.assertRaisesRegex(ValueError, "unknown dtype 'float8'"):
      llama.ModelConfig(vocab_size=5, hidden_size=8, intermediate_size=8, num_layers=1,
                        num_heads=2, num_kv_heads=1, dtype="float8")


if __name__ == "__main__":
  absltest.main()
