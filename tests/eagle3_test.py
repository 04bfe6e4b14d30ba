"""EAGLE-3 drafter: export layout against an independent torch forward, KV cache, vocab maps."""

import dataclasses
import json
import os
import shutil
import tempfile

from absl.testing import absltest
import jax
import jax.numpy as jnp
import numpy as np

from ppow_jax.errors import UserError
from ppow_jax.models import eagle3, eagle3_io
from ppow_jax.models import llama

# Every size differs (E=32, Et=24, H*D=64, M=48, Vd=40, V=64) so a transposed or swapped
# weight shows up as a shape error or a wrong number, not a silent match.
CFG = eagle3.Eagle3Config(hidden_size=32, intermediate_size=48, num_heads=4, num_kv_heads=2,
                          vocab_size=64, draft_vocab_size=40, target_hidden_size=24, head_dim=16)
MODEL = eagle3.Eagle3Drafter(CFG)
_forward = jax.jit(lambda p, emb, hs: MODEL.apply({"params": p}, emb, hs))
_step = jax.jit(lambda p, emb, hid, cache: MODEL.apply({"params": p}, emb, hid, cache=cache,
                                                       method="step"))
_step_masked = jax.jit(lambda p, emb, hid, mask: MODEL.apply(
    {"params": p}, emb, hid, attn_mask_BxTxS=mask, method="step"))


def _random_params(seed: int = 0) -> dict:
  """Random numpy-filled parameters of init_eagle3's tree (traced, never compiled: on CPU the
  threefry init costs seconds to compile). Norm scales are perturbed around 1 so that swapped
  norms change the output."""
  shapes = jax.eval_shape(lambda k: eagle3.init_eagle3(CFG, k), jax.random.key(0))
  rng = np.random.default_rng(seed)
  fill = lambda x: jnp.asarray((1.0 if x.ndim == 1 else 0.0)
                               + 0.15 * rng.standard_normal(x.shape), x.dtype)
  return jax.tree_util.tree_map(fill, shapes)


def _normal(seed: int, *shape: int) -> jax.Array:
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _vocab() -> eagle3.DraftVocab:
  counts = np.random.default_rng(0).permutation(CFG.vocab_size)
  return eagle3.build_draft_vocab(counts, CFG.draft_vocab_size)


def _torch_eagle3_logits(model_dir: str, embeds: np.ndarray, hiddens: list) -> np.ndarray:
  """EAGLE-3 forward written from the HF key layout alone (float64, full causal sequence)."""
  import torch
  import torch.nn.functional as F
  from safetensors.torch import load_file
  with open(os.path.join(model_dir, "config.json")) as f:
    c = json.load(f)
  w = {k: v.to(torch.float64) for k, v in load_file(os.path.join(model_dir, "model.safetensors"))
       .items() if v.is_floating_point()}
  h_n, kv_n, d, eps = (c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"],
                       c["rms_norm_eps"])

  def rms(x, name):
    return w[name] * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))

  def rope(x, pos):  # x [B, heads, T, D]
    inv = 1.0 / (c["rope_theta"] ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    ang = pos[:, None].double() * inv[None, :]
    ang = torch.cat([ang, ang], -1)
    rot = torch.cat([-x[..., d // 2:], x[..., :d // 2]], -1)
    return x * ang.cos() + rot * ang.sin()

  emb = torch.from_numpy(np.asarray(embeds, np.float64))
  hid = torch.cat([torch.from_numpy(np.asarray(h, np.float64)) for h in hiddens], -1)
  b, t, _ = emb.shape
  hid = hid @ w["fc.weight"].T
  x = torch.cat([rms(emb, "midlayer.input_layernorm.weight"),
                 rms(hid, "midlayer.hidden_norm.weight")], -1)
  proj = lambda name, n: (x @ w[f"midlayer.self_attn.{name}_proj.weight"].T).view(
      b, t, n, d).transpose(1, 2)
  pos = torch.arange(t)
  q, k, v = rope(proj("q", h_n), pos), rope(proj("k", kv_n), pos), proj("v", kv_n)
  k, v = k.repeat_interleave(h_n // kv_n, 1), v.repeat_interleave(h_n // kv_n, 1)
  att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
  r = hid + att.transpose(1, 2).reshape(b, t, h_n * d) @ w["midlayer.self_attn.o_proj.weight"].T
  m = rms(r, "midlayer.post_attention_layernorm.weight")
  mlp = lambda name: w[f"midlayer.mlp.{name}_proj.weight"]
  r = r + (F.silu(m @ mlp("gate").T) * (m @ mlp("up").T)) @ mlp("down").T
  return (rms(r, "norm.weight") @ w["lm_head.weight"].T).numpy()


def _tempdir(test: absltest.TestCase) -> str:
  # absltest's create_tempdir needs parsed flags, which pytest does not provide.
  path = tempfile.mkdtemp(prefix="eagle3_test_")
  test.addCleanup(shutil.rmtree, path, ignore_errors=True)
  return path


class ExportTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.params, cls.vocab = _random_params(), _vocab()

  def test_exported_layout_matches_independent_torch_forward(self):
    embeds = _normal(3, 2, 7, CFG.hidden_size)
    hiddens = [_normal(4 + i, 2, 7, CFG.target_hidden_size) for i in range(3)]
    out = _tempdir(self) + "/drafter"
    eagle3_io.save_eagle3(out, CFG, self.params, self.vocab)
    want = _torch_eagle3_logits(out, np.asarray(embeds), [np.asarray(h) for h in hiddens])
    got = np.asarray(_forward(self.params, embeds, hiddens))
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
    with open(os.path.join(out, "config.json")) as f:
      c = json.load(f)
    self.assertEqual(c["architectures"], ["LlamaForCausalLMEagle3"])
    self.assertEqual((c["vocab_size"], c["draft_vocab_size"], c["target_hidden_size"]),
                     (64, 40, 24))

  def test_save_load_round_trip_is_exact(self):
    cfg = dataclasses.replace(CFG, rope_scaling=llama.RopeScaling(factor=4.0),
                              param_dtype="bfloat16", dtype="bfloat16", rms_norm_eps=1e-5)
    params = jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), self.params)
    out = _tempdir(self)
    with open(os.path.join(out, "tokenizer.json"), "w") as f:
      f.write("{}")  # an existing directory: files are replaced, others kept
    for _ in range(2):
      eagle3_io.save_eagle3(out, cfg, params, self.vocab)
    self.assertEqual(sorted(os.listdir(out)),
                     ["config.json", "model.safetensors", "tokenizer.json"])
    cfg2, params2, vocab2 = eagle3_io.load_eagle3(out)
    self.assertEqual(cfg2, cfg)
    self.assertEqual(jax.tree_util.tree_structure(params2), jax.tree_util.tree_structure(params))
    for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(params2)):
      self.assertEqual(a.dtype, b.dtype)
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(vocab2.d2t_Vd, self.vocab.d2t_Vd)
    np.testing.assert_array_equal(vocab2.t2d_V, self.vocab.t2d_V)

  def test_export_refuses_bad_trees_and_writes_nothing(self):
    root = _tempdir(self)
    out = os.path.join(root, "export")
    missing = jax.tree_util.tree_map(lambda x: x, self.params)
    del missing["midlayer"]["mlp"]["up_proj"]
    misshaped = jax.tree_util.tree_map(lambda x: x, self.params)
    misshaped["lm_head"] = jnp.zeros((CFG.hidden_size, CFG.vocab_size))
    extra = jax.tree_util.tree_map(lambda x: x, self.params)
    extra["midlayer"]["bonus"] = jnp.zeros(3)
    bad_vocab = eagle3.identity_draft_vocab(CFG.vocab_size)
    cases = [(missing, self.vocab, r"midlayer\.mlp\.up_proj\.weight.*missing"),
             (misshaped, self.vocab, r"lm_head\.weight.*shape \(32, 64\), expected \(32, 40\)"),
             (extra, self.vocab, r"unexpected key midlayer/bonus"),
             (self.params, bad_vocab, r"d2t has shape \(64,\)")]
    for params, vocab, pattern in cases:
      with self.assertRaisesRegex(UserError, pattern):
        eagle3_io.save_eagle3(out, CFG, params, vocab)
      self.assertFalse(os.path.exists(out))
      self.assertEqual(os.listdir(root), [])

  def test_load_refuses_pickles_and_names_missing_files_and_keys(self):
    from safetensors.numpy import load_file, save_file
    only_bin = _tempdir(self)
    with open(os.path.join(only_bin, "pytorch_model.bin"), "wb") as f:
      f.write(b"not unpickled")
    with self.assertRaisesRegex(UserError, r"pytorch_model\.bin.*pickle.*safetensors"):
      eagle3_io.load_eagle3(only_bin)

    out = _tempdir(self)
    eagle3_io.save_eagle3(out, CFG, self.params, self.vocab)
    st = os.path.join(out, "model.safetensors")
    tensors = load_file(st)
    # Published drafters may also carry the target's embedding: ignored.
    save_file({**tensors, "embed_tokens.weight": np.zeros((64, 32), np.float32)}, st)
    cfg, params, _ = eagle3_io.load_eagle3(out, param_dtype="float16")
    self.assertEqual(cfg.param_dtype, "float16")
    self.assertEqual(params["fc"].dtype, jnp.float16)
    save_file({k: v for k, v in tensors.items() if k != "midlayer.hidden_norm.weight"}, st)
    with self.assertRaisesRegex(UserError, r"midlayer\.hidden_norm\.weight is missing"):
      eagle3_io.load_eagle3(out)
    os.remove(os.path.join(out, "config.json"))
    with self.assertRaisesRegex(UserError, r"config\.json"):
      eagle3_io.load_eagle3(out)


class StepTest(absltest.TestCase):

  def test_cached_chunks_with_ragged_rows_match_full_step(self):
    params = _random_params(1)
    emb, hid = _normal(5, 2, 7, CFG.hidden_size), _normal(6, 2, 7, CFG.hidden_size)
    full_out, full_logits, none = _step(params, emb, hid, None)
    self.assertIsNone(none)
    # Prefix of 3, then row 1 rolls back 2 junk slots; chunks of 1 and 3 follow, so row 0
    # ends with 7 slots and row 1 with 5 (a chunk of 3 reuses the prefix's compilation).
    junk_e, junk_h = _normal(7, 2, CFG.hidden_size), _normal(8, 2, CFG.hidden_size)
    pre_e, pre_h = emb[:, :3].at[1, 1:].set(junk_e), hid[:, :3].at[1, 1:].set(junk_h)
    cache = llama.init_cache(CFG.layer_config(), 2, 10)
    o0, l0, cache = _step(params, pre_e, pre_h, cache)
    np.testing.assert_array_equal(cache.lengths_B, [3, 3])
    cache = cache.replace(lengths_B=jnp.array([3, 1], jnp.int32))
    rows = lambda x, a, n: jnp.stack([x[0, a:a + n], x[1, a - 2:a - 2 + n]])
    o1, l1, cache = _step(params, rows(emb, 3, 1), rows(hid, 3, 1), cache)
    o2, l2, cache = _step(params, rows(emb, 4, 3), rows(hid, 4, 3), cache)
    np.testing.assert_array_equal(cache.lengths_B, [7, 5])
    for name, parts, full in (("out", (o0, o1, o2), full_out),
                              ("logits", (l0, l1, l2), full_logits)):
      row0 = jnp.concatenate([parts[0][0], parts[1][0], parts[2][0]])
      row1 = jnp.concatenate([parts[0][1, :1], parts[1][1], parts[2][1]])
      np.testing.assert_allclose(row0, full[0], atol=1e-5, err_msg=name)
      np.testing.assert_allclose(row1, full[1, :5], atol=1e-5, err_msg=name)

  def test_explicit_attention_mask_replaces_causal_mask(self):
    params = _random_params(1)
    emb, hid = _normal(5, 2, 7, CFG.hidden_size), _normal(6, 2, 7, CFG.hidden_size)
    _, causal, _ = _step(params, emb, hid, None)
    _, self_only, _ = _step_masked(params, emb, hid, jnp.broadcast_to(jnp.eye(7, dtype=bool),
                                                                       (2, 7, 7)))
    np.testing.assert_allclose(self_only[:, 0], causal[:, 0], atol=1e-5)  # slot 0 sees itself
    self.assertGreater(float(jnp.abs(self_only[:, 1:] - causal[:, 1:]).min()), 0.0)

  def test_from_target_copies_the_target_layer(self):
    target = llama.ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=4,
                               num_heads=4, num_kv_heads=2, rope_theta=5e5)
    cfg = eagle3.Eagle3Config.from_target(target, 40, intermediate_size=16)
    self.assertEqual((cfg.hidden_size, cfg.target_hidden_size, cfg.head_dim, cfg.rope_theta,
                      cfg.intermediate_size, cfg.draft_vocab_size), (32, 32, 8, 5e5, 16, 40))
    self.assertEqual(cfg.layer_config().num_layers, 1)


class DraftVocabTest(absltest.TestCase):

  def test_build_keeps_most_frequent_ids_sorted(self):
    counts = np.random.default_rng(0).permutation(CFG.vocab_size)
    vocab = eagle3.build_draft_vocab(counts, CFG.draft_vocab_size)
    kept = np.sort(np.argsort(-counts)[:CFG.draft_vocab_size])
    np.testing.assert_array_equal(vocab.to_target_ids(jnp.arange(CFG.draft_vocab_size)), kept)
    np.testing.assert_array_equal(np.flatnonzero(vocab.t2d_V), kept)
    np.testing.assert_array_equal(vocab.d2t_Vd, kept - np.arange(CFG.draft_vocab_size))
    ties = eagle3.build_draft_vocab(np.array([5, 1, 5, 0]), 2)
    np.testing.assert_array_equal(ties.to_target_ids(jnp.arange(2)), [0, 2])
    with self.assertRaises(UserError):
      eagle3.build_draft_vocab(counts, CFG.vocab_size + 1)

  def test_target_logits_and_log_probs(self):
    vocab = _vocab()
    kept = np.flatnonzero(vocab.t2d_V)
    logits = _normal(9, 2, 3, CFG.draft_vocab_size)
    full = np.asarray(vocab.target_logits(logits, CFG.vocab_size))
    self.assertEqual(full.shape, (2, 3, CFG.vocab_size))
    np.testing.assert_array_equal(full[..., kept], logits)
    np.testing.assert_array_equal(full[..., ~np.asarray(vocab.t2d_V)],
                                  np.float32(eagle3.OUT_OF_VOCAB_LOGIT))
    logp = vocab.target_log_probs(logits)
    p = jnp.exp(logp)
    np.testing.assert_allclose(p.sum(-1), 1.0, rtol=1e-5)
    self.assertTrue(np.isfinite(np.asarray(p * logp)).all())
    np.testing.assert_array_equal(np.asarray(p)[..., ~np.asarray(vocab.t2d_V)], 0.0)
    ident = eagle3.identity_draft_vocab(5)
    np.testing.assert_array_equal(ident.to_target_ids(jnp.arange(5)), np.arange(5))


if __name__ == "__main__":
  absltest.main()
