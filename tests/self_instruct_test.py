"""Requests written by the target itself: the user-turn prefix, the filter, the sampling loop,
and their place in the data stage (cached, answered like the other requests)."""

import os
import shutil
import tempfile
from unittest import mock

os.environ.setdefault("JAX_PLATFORMS", "cpu")

from absl.testing import absltest
import jax

from ppow_jax import cli, datasets, layout, self_instruct
from ppow_jax.data import tokenizer as tokenizer_lib
from ppow_jax.errors import UserError
from ppow_jax.models import llama

BASE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
                    "tiny.py")
# ChatML with a default system turn, as SmolLM2's template writes it.
_TEMPLATE = ("{% for m in messages %}{% if loop.first and m['role'] != 'system' %}"
             "{{ '<|im_start|>system\nBe helpful.<|im_end|>\n' }}{% endif %}"
             "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
             "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def _tokenizer() -> tokenizer_lib.TokenizerInfo:
  texts = [f"please explain topic {i} and write code for it" for i in range(40)]
  tok = tokenizer_lib.train_bpe(texts, 320, special_tokens=("<|im_start|>", "<|im_end|>"))
  return tokenizer_lib.TokenizerInfo(tok, chat_template=_TEMPLATE, eos_token="<|im_end|>")


class PureTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.info = _tokenizer()

  def test_prefix_is_the_template_up_to_the_users_text(self):
    ids = self_instruct.user_prefix(self.info)
    self.assertEqual(self.info.decode(ids, skip_special_tokens=False),
                     "<|im_start|>system\nBe helpful.<|im_end|>\n<|im_start|>user\n")
    # what follows the prefix in a real conversation is the user's text
    full = tokenizer_lib.apply_chat_template([("user", "explain topic 3")], self.info).ids
    self.assertEqual(list(full[:len(ids)]), ids)

  def test_keep_request(self):
    end = self.info.eos_id
    self.assertEqual(self_instruct.keep_request([5, 6, 7, 8, end, 9], end, 4), [5, 6, 7, 8])
    self.assertIsNone(self_instruct.keep_request([5, 6, 7, end], end, 4))  # too short
    self.assertIsNone(self_instruct.keep_request([5, 6, 7, 8, 9], end, 4))  # cut by the cap

  def test_sampling_dedupes_filters_and_stops_at_n(self):
    end = self.info.eos_id
    words = [self.info.encode(f"explain topic {i}") + [end] for i in range(6)]
    calls = []

    def generate_fn(prompts, r):
      calls.append((len(prompts), r))
      prefix = self_instruct.user_prefix(self.info)
      self.assertTrue(all(p == prefix for p in prompts))
      # round 0: a duplicate, an unfinished turn; round 1: new requests
      rows = ([words[0], words[0], words[1][:-1] + [9, 9]] if r == 0
              else [words[2], words[3], words[4]])
      return rows[:len(prompts)]

    got = self_instruct.sample_requests(generate_fn, self.info, 3, batch_size=3, min_tokens=2)
    self.assertEqual(got, ["explain topic 0", "explain topic 2", "explain topic 3"])
    self.assertEqual(calls, [(3, 0), (3, 1)])  # stops once n are kept

  def test_resumes_after_the_last_stored_round(self):
    end = self.info.eos_id
    rounds, stored = [], []

    def generate_fn(prompts, r):
      rounds.append(r)
      return [self.info.encode(f"explain topic {r}") + [end]] * len(prompts)

    got = self_instruct.sample_requests(
        generate_fn, self.info, 3, batch_size=2, min_tokens=2,
        done=[(0, "explain topic 0"), (1, "explain topic 1")],
        on_round=lambda r, kept: stored.append((r, kept)))
    self.assertEqual(rounds, [2])
    self.assertEqual(got, ["explain topic 0", "explain topic 1", "explain topic 2"])
    self.assertEqual(stored, [(2, ["explain topic 2"])])

  def test_too_few_requests_is_an_error(self):
    never = lambda prompts, r: [[5, 6]] * len(prompts)  # never closes the turn
    with self.assertRaisesRegex(UserError, r"only 0 of 2 requests after 3 rounds"):
      self_instruct.sample_requests(never, self.info, 2, batch_size=4, max_rounds=3)


class DataStageTest(absltest.TestCase):

  def test_requests_are_sampled_once_cached_and_answered(self):
    info = _tokenizer()
    cfg = llama.ModelConfig(vocab_size=info.vocab_size, hidden_size=16, intermediate_size=32,
                            num_layers=1, num_heads=2, num_kv_heads=1,
                            max_position_embeddings=256, initializer_range=0.5)
    params = llama.init_params(cfg, jax.random.PRNGKey(0))
    c = cli.load_config(BASE)
    c.data.self_instructions = 2
    c.data.self_instruct_max_tokens = 40
    c.data.regenerate_max_new_tokens = 4
    c.data.regenerate_batch_size = 8
    workdir = tempfile.mkdtemp()
    self.addCleanup(shutil.rmtree, workdir, True)
    given = [[("user", "explain topic 1"), ("assistant", "")]]
    data = datasets.Data(given, [], info, "conversations", "t")
    out = datasets.regenerate(c, data, cfg, params, paths=layout.Layout(workdir))
    self.assertLen(out.train, 3)
    self.assertEqual(out.train[0][0], ("user", "explain topic 1"))
    written = [t[0] for t in out.train[1:]]
    self.assertTrue(all(role == "user" and text for role, text in written))
    self.assertLen({text for _, text in written}, 2)
    self.assertTrue(all(t[1][0] == "assistant" for t in out.train))
    cached = sorted(os.listdir(os.path.join(workdir, "cache")))
    self.assertLen([f for f in cached if f.startswith("self-instruct-")], 1)
    # a rerun reads both stores: neither sampling nor answering runs again
    with mock.patch.object(self_instruct, "sample_requests", side_effect=AssertionError), \
         mock.patch.object(datasets.pipeline, "regenerate_responses",
                           side_effect=AssertionError):
      again = datasets.regenerate(c, data, cfg, params, paths=layout.Layout(workdir))
    self.assertEqual(again.train, out.train)

  def test_needs_conversations(self):
    c = cli.load_config(BASE)
    c.data.self_instructions = 4
    data = datasets.Data(["x"], [], None, "text", "corpus")
    with self.assertRaisesRegex(UserError, "config.data.self_instructions needs conversation data"):
      datasets.regenerate(c, data, None, None)


if __name__ == "__main__":
  absltest.main()
