"""EAGLE-3 recipe options and the export engines read: norm_before_fc, aux layer ids, the head
started from the target's, and config.json read back the way llama.cpp's converter reads it."""

import dataclasses
import json
import os
import tempfile

from absl.testing import absltest
import jax
import jax.numpy as jnp
import numpy as np

from ppow_jax import drafter_stages
from ppow_jax.data import tokenizer as tokenizer_lib
from ppow_jax.drafters import Eagle3FeatureDrafter
from ppow_jax.errors import UserError
from ppow_jax.models import eagle3, eagle3_io, llama

TARGET = llama.ModelConfig(vocab_size=300, hidden_size=24, intermediate_size=40, num_layers=7,
                           num_heads=2, num_kv_heads=1, max_position_embeddings=64)
CFG = eagle3.Eagle3Config.from_target(TARGET, 40, hidden_size=32, intermediate_size=48,
                                      num_heads=4, num_kv_heads=2, head_dim=16,
                                      norm_before_fc=True)


def _params(seed=0):
  shapes = jax.eval_shape(lambda k: eagle3.init_eagle3(CFG, k), jax.random.key(0))
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map(lambda x: jnp.asarray(
      (1.0 if x.ndim == 1 else 0.0) + 0.2 * rng.standard_normal(x.shape), x.dtype), shapes)


def _vocab():
  return eagle3.build_draft_vocab(np.random.default_rng(1).permutation(300), 40)


def _converter_view(drafter_dir: str, target_config: dict) -> dict:
  """What llama.cpp's EAGLE-3 conversion reads from an export (its documented keys)."""
  with open(os.path.join(drafter_dir, "config.json")) as f:
    c = json.load(f)
  from safetensors.numpy import load_file
  tensors = load_file(os.path.join(drafter_dir, "model.safetensors"))
  assert "draft_vocab_size" in c and c["num_hidden_layers"] == 1  # its EAGLE-3 detection
  n = target_config["num_hidden_layers"]
  return {"target_layers": c.get("eagle_aux_hidden_state_layer_ids") or [2, n // 2, n - 3],
          "target_hidden_size": c.get("target_hidden_size") or target_config["hidden_size"],
          "norm_before_residual": c.get("norm_before_residual", False),
          "norm_before_fc": c.get("norm_before_fc", False),
          "n_embd_inp": tensors["fc.weight"].shape[1],
          "input_norm": tensors.get("input_norm.weight"),
          "d2t": tensors["d2t"], "draft_vocab": tensors["lm_head.weight"].shape[0]}


class Eagle3RecipeTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    # rank promotion stays allowed: the shared LLaMA layers broadcast norm scales by rank
    # (set per test, not globally, so that other test files are unaffected)

  def test_norm_before_fc_normalises_the_concatenated_features(self):
    params = _params()
    h = [np.random.default_rng(i).standard_normal((2, 5, 24)).astype(np.float32) * 1e3
         for i in range(3)]
    got = eagle3.Eagle3Drafter(CFG).apply({"params": params}, [jnp.asarray(x) for x in h],
                                          method=eagle3.Eagle3Drafter.fuse)
    x = np.concatenate(h, -1).astype(np.float64)
    x = x / np.sqrt((x * x).mean(-1, keepdims=True) + CFG.rms_norm_eps)
    want = (x * np.asarray(params["input_norm"]["scale"])) @ np.asarray(params["fc"])
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4)

  def test_export_carries_what_llama_cpp_reads(self):
    params, vocab = _params(), _vocab()
    drafter = Eagle3FeatureDrafter.create(CFG, TARGET)
    tok = tokenizer_lib.as_info(tokenizer_lib.train_bpe(["some text here"] * 5, 270))
    with tempfile.TemporaryDirectory() as d:
      out = os.path.join(d, "drafter")
      drafter_stages.export(drafter, {"net": params, "vocab": vocab}, out, tok)
      view = _converter_view(out, {"num_hidden_layers": 7, "hidden_size": 24})
      self.assertEqual(view["target_layers"], list(TARGET.eagle3_layers()))
      self.assertEqual(view["target_layers"], list(drafter.target_hidden_layers))
      self.assertEqual(view["target_hidden_size"], 24)
      self.assertEqual(view["n_embd_inp"], 3 * view["target_hidden_size"])
      self.assertTrue(view["norm_before_fc"])
      self.assertFalse(view["norm_before_residual"])
      np.testing.assert_array_equal(view["input_norm"], params["input_norm"]["scale"])
      self.assertEqual((view["d2t"].dtype, view["draft_vocab"]), (np.int64, 40))
      self.assertTrue(os.path.isfile(os.path.join(out, "tokenizer.json")))
      cfg2, params2, _ = eagle3_io.load_eagle3(out)
      self.assertEqual(cfg2, CFG)
      np.testing.assert_array_equal(params2["input_norm"]["scale"],
                                    params["input_norm"]["scale"])
      self.assertEqual(Eagle3FeatureDrafter.create(cfg2, TARGET).target_hidden_layers,
                       drafter.target_hidden_layers)

  def test_export_without_norm_has_no_input_norm_and_refuses_norm_before_residual(self):
    cfg = dataclasses.replace(CFG, norm_before_fc=False)
    params = eagle3.init_eagle3(cfg, jax.random.PRNGKey(0))
    with tempfile.TemporaryDirectory() as d:
      eagle3_io.save_eagle3(d, cfg, params, _vocab())
      view = _converter_view(d, {"num_hidden_layers": 7, "hidden_size": 24})
      self.assertFalse(view["norm_before_fc"])
      self.assertIsNone(view["input_norm"])
      with open(os.path.join(d, "config.json")) as f:
        c = json.load(f)
      c["norm_before_residual"] = True
      with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(c, f)
      with self.assertRaisesRegex(UserError, "norm_before_residual"):
        eagle3_io.load_eagle3(d)

  def test_head_from_target_takes_the_kept_columns_and_final_norm(self):
    cfg = eagle3.Eagle3Config.from_target(TARGET, 40)
    net, vocab = eagle3.init_eagle3(cfg, jax.random.PRNGKey(0)), _vocab()
    tparams = llama.init_params(TARGET, jax.random.PRNGKey(1))
    head = np.asarray(tparams["lm_head"])
    scale = np.linspace(0.5, 2.0, 24).astype(np.float32)
    new = eagle3.head_from_target(net, vocab, head, jnp.asarray(scale))
    kept = np.flatnonzero(np.asarray(vocab.t2d_V))
    np.testing.assert_array_equal(np.asarray(new["lm_head"]), head[:, kept])
    np.testing.assert_array_equal(np.asarray(new["norm"]["scale"]), scale)
    # the draft logits of an output hidden h are the target's logits of h on the kept tokens
    h = np.random.default_rng(2).standard_normal((1, 1, 24)).astype(np.float32)
    hn = h / np.sqrt((h * h).mean(-1, keepdims=True) + cfg.rms_norm_eps) * scale
    np.testing.assert_allclose((hn @ head)[..., kept], hn @ np.asarray(new["lm_head"]),
                               rtol=1e-5)
    with self.assertRaises(ValueError):
      eagle3.head_from_target(net, vocab, head, jnp.asarray(scale[:10]))

  def test_residual_start_proposes_the_targets_previous_prediction(self):
    # the untrained drafter, fed the target's last hidden state as its third feature, gives the
    # target's logits of that position on the kept tokens (one position off would not match)
    cfg = eagle3.Eagle3Config.from_target(TARGET, 40, norm_before_fc=True,
                                          aux_layer_ids=(2, 3, TARGET.num_layers))
    net, vocab = eagle3.init_eagle3(cfg, jax.random.PRNGKey(0)), _vocab()
    tparams = llama.init_params(TARGET, jax.random.PRNGKey(1))
    tparams = dict(tparams, norm={"scale": jnp.linspace(0.5, 2.0, 24)})
    net = eagle3.residual_start(net, vocab, np.asarray(tparams["lm_head"]),
                                tparams["norm"]["scale"])
    tokens = jnp.asarray(np.random.default_rng(3).integers(0, 300, (1, 9)), jnp.int32)
    model = llama.Decoder(TARGET)
    out = model.apply({"params": tparams}, tokens, hidden_layers=cfg.aux_layer_ids,
                      method=llama.Decoder.forward)
    kept = np.flatnonzero(np.asarray(vocab.t2d_V))
    want = np.asarray(out.logits_BxTxV)[..., kept]
    drafter = eagle3.Eagle3Drafter(cfg)
    fused = drafter.apply({"params": net}, out.hidden_states, method=eagle3.Eagle3Drafter.fuse)
    embeds = model.apply({"params": tparams}, jnp.roll(tokens, -1, 1), method=llama.Decoder.embed)
    _, got, _ = drafter.apply({"params": net}, embeds, fused, method=eagle3.Eagle3Drafter.step)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-2, atol=1e-3)  # two norms' eps
    self.assertGreater(np.abs(np.asarray(got)[:, 1:] - want[:, :-1]).max(), 1e-2)
    # the fused features' first two parts and the midlayer's residual branches start at zero
    self.assertEqual(float(jnp.abs(net["fc"][:48]).max()), 0.0)
    self.assertEqual(float(jnp.abs(net["midlayer"]["self_attn"]["o_proj"]).max()), 0.0)
    self.assertEqual(float(jnp.abs(net["midlayer"]["mlp"]["down_proj"]).max()), 0.0)
    with self.assertRaisesRegex(ValueError, "as wide as the drafter"):
      eagle3.residual_start(eagle3.init_eagle3(CFG, jax.random.PRNGKey(0)), vocab,
                            np.asarray(tparams["lm_head"]), tparams["norm"]["scale"])


if __name__ == "__main__":
  absltest.main()
