"""Byte-level BPE training and I/O, built-in and Jinja chat templates with assistant masks."""

import dataclasses
import json
import os
import tempfile

from absl.testing import absltest
import numpy as np

from ppow_jax.data import tokenizer as tk
from ppow_jax.errors import UserError

TEXTS = ["def add(a, b):\n    return a + b\n", "the quick brown fox jumps over the lazy dog",
         "what is 2+2? it is 4.", "hello there, how are you? I am fine, thanks."] * 4
CHATML_TOKENS = ("<|im_start|>", "<|im_end|>")
CHATML = ("{{ bos_token }}{% for m in messages %}"
          "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
TURNS = [("system", "be brief"), ("user", "what is 2+2?"), ("assistant", "it is 4."),
         ("user", "how are you?"), ("assistant", "I am fine, thanks.")]


class BpeTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.tok = tk.train_bpe(TEXTS, 400, special_tokens=tk.SPECIAL_TOKENS + CHATML_TOKENS)

  def test_deterministic(self):
    again = tk.train_bpe(iter(TEXTS), 400, special_tokens=tk.SPECIAL_TOKENS + CHATML_TOKENS)
    self.assertEqual(self.tok.to_str(), again.to_str())

  def test_special_tokens_first(self):
    for i, token in enumerate(tk.SPECIAL_TOKENS + CHATML_TOKENS):
      self.assertEqual(self.tok.token_to_id(token), i)

  def test_round_trip_including_unseen_text(self):
    info = tk.TokenizerInfo.from_tokenizer(self.tok)
    for text in TEXTS[:4] + ["héllo wörld ✓ 🙂\n\tx = {'k': [1, 2]}  # unseen", " lead space"]:
      ids = info.encode(text)
      self.assertEqual(info.decode(ids), text)
    self.assertLess(len(info.encode(TEXTS[1])), len(TEXTS[1].encode()))  # merges happened

  def test_vocab_too_small(self):
    with self.assertRaisesRegex(UserError, "vocab_size=100"):
      tk.train_bpe(TEXTS, 100)

  def test_save_load(self):
    with tempfile.TemporaryDirectory() as d:
      info = tk.TokenizerInfo.from_tokenizer(self.tok)
      info = dataclasses.replace(info, chat_template=CHATML)
      tk.save(info, d)
      loaded = tk.load(d)
      self.assertEqual(loaded.chat_template, CHATML)
      self.assertEqual((loaded.bos_id, loaded.eos_id, loaded.pad_id), (1, 2, 0))
      self.assertEqual(loaded.encode(TEXTS[0]), info.encode(TEXTS[0]))
      # A bare tokenizer.json path works too; an HF config with AddedToken dicts is understood.
      self.assertEqual(tk.load(os.path.join(d, "tokenizer.json")).vocab_size, info.vocab_size)
      with open(os.path.join(d, "tokenizer_config.json"), "w") as f:
        json.dump({"eos_token": {"content": "<|im_end|>"}}, f)
      self.assertEqual(tk.load(d).eos_id, self.tok.token_to_id("<|im_end|>"))

  def test_load_errors_name_the_file(self):
    with tempfile.TemporaryDirectory() as d:
      with self.assertRaisesRegex(UserError, "tokenizer.json"):
        tk.load(d)
      path = os.path.join(d, "tokenizer.json")
      with open(path, "w") as f:
        f.write("{not json")
      with self.assertRaisesRegex(UserError, path):
        tk.load(path)


class ChatTemplateTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.tok = tk.train_bpe(TEXTS, 400, special_tokens=tk.SPECIAL_TOKENS + CHATML_TOKENS)

  def _decode(self, ids):
    return self.tok.decode([int(i) for i in ids], skip_special_tokens=False)

  def test_builtin(self):
    enc = tk.apply_chat_template(TURNS, self.tok)
    self.assertEqual(enc.ids.dtype, np.int32)
    self.assertEqual(enc.ids.shape, enc.assistant_mask.shape)
    self.assertEqual(self._decode(enc.ids),
                     "<bos><|system|>be brief<eos><|user|>what is 2+2?<eos><|assistant|>it is 4."
                     "<eos><|user|>how are you?<eos><|assistant|>I am fine, thanks.<eos>")
    self.assertEqual(self._decode(enc.ids[enc.assistant_mask]),
                     "it is 4.<eos>I am fine, thanks.<eos>")

  def test_builtin_generation_prompt(self):
    enc = tk.apply_chat_template(TURNS[:2], self.tok, add_generation_prompt=True)
    self.assertEqual(int(enc.ids[-1]), self.tok.token_to_id("<|assistant|>"))
    self.assertFalse(enc.assistant_mask.any())

  def test_jinja(self):
    info = dataclasses.replace(tk.TokenizerInfo.from_tokenizer(self.tok), chat_template=CHATML)
    enc = tk.apply_chat_template(TURNS, info)
    self.assertEqual(self._decode(enc.ids),
                     "<bos><|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nwhat is 2+2?"
                     "<|im_end|>\n<|im_start|>assistant\nit is 4.<|im_end|>\n<|im_start|>user\n"
                     "how are you?<|im_end|>\n<|im_start|>assistant\nI am fine, thanks."
                     "<|im_end|>\n")
    self.assertEqual(self._decode(enc.ids[enc.assistant_mask]),
                     "it is 4.<|im_end|>\nI am fine, thanks.<|im_end|>\n")
    gen = tk.apply_chat_template(TURNS[:2], info, add_generation_prompt=True)
    self.assertTrue(self._decode(gen.ids).endswith("<|im_start|>assistant\n"))
    # The same text through the template equals the one-shot encoding of the rendered string.
    rendered = tk.render_chat_template(TURNS, info)
    self.assertEqual(enc.ids.tolist(), info.encode(rendered))

  def test_jinja_not_prefix_stable_falls_back_to_content(self):
    template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}"
                "{% if loop.last %} (n={{ messages|length }}){% endif %}\n{% endfor %}")
    info = dataclasses.replace(tk.TokenizerInfo.from_tokenizer(self.tok), chat_template=template)
    enc = tk.apply_chat_template(TURNS[1:3], info)
    self.assertEqual(self._decode(enc.ids[enc.assistant_mask]).strip(), "it is 4.")

  def test_jinja_raise_exception_is_user_error(self):
    template = "{{ raise_exception('roles must alternate') }}"
    info = dataclasses.replace(tk.TokenizerInfo.from_tokenizer(self.tok), chat_template=template)
    with self.assertRaisesRegex(UserError, "roles must alternate"):
      tk.apply_chat_template(TURNS, info)

  def test_bad_role(self):
    with self.assertRaisesRegex(UserError, "turn 0"):
      tk.apply_chat_template([("robot", "hi")], self.tok)


if __name__ == "__main__":
  absltest.main()
