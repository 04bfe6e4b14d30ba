"""Packing, determinism, host shards, exact resume, target weights, response regeneration."""

import json

from absl.testing import absltest
import numpy as np

from ppow_jax.data import pipeline
from ppow_jax.data import tokenizer as tk
from ppow_jax.errors import UserError

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa".split()
DOCS = [f"doc{i}: " + " ".join(WORDS[(i * j) % 10] for j in range(1 + (i * 7) % 23))
        for i in range(30)]
T, B = 16, 3


def _flat_stream(batches):
  """All real (non-padding) tokens and loss-mask values, in stream order."""
  tokens = np.concatenate([b["tokens_BxT"].reshape(-1) for b in batches])
  mask = np.concatenate([b["loss_mask_BxT"].reshape(-1) for b in batches])
  segments = np.concatenate([b["segment_ids_BxT"].reshape(-1) for b in batches])
  return tokens[segments > 0], mask[segments > 0]


class PipelineTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.tok = tk.train_bpe(DOCS, 320)
    cls.info = tk.TokenizerInfo.from_tokenizer(cls.tok)

  def _iterator(self, source=DOCS, seed=0, **kwargs):
    kwargs = {"seq_len": T, "batch_size": B, "num_threads": 0, **kwargs}
    return pipeline.make_train_iterator(source, self.tok, seed=seed, **kwargs)

  def _docs_of(self, batches):
    """Documents recovered from the packed stream (split at bos, decoded)."""
    tokens, _ = _flat_stream(batches)
    starts = np.flatnonzero(tokens == self.info.bos_id).tolist() + [len(tokens)]
    return [self.info.decode(tokens[a:b]) for a, b in zip(starts[:-1], starts[1:])]

  def test_packing_loses_nothing_and_has_exact_shapes(self):
    batches = list(self._iterator(num_epochs=1, shuffle=False))
    features = [pipeline.example_features(d, self.info) for d in DOCS]
    expected_tokens = np.concatenate([f["tokens"] for f in features])
    tokens, mask = _flat_stream(batches)
    np.testing.assert_array_equal(tokens, expected_tokens)
    np.testing.assert_array_equal(mask, np.concatenate([f["loss_mask"] for f in features]))
    self.assertLen(batches, -(-(-(-len(expected_tokens) // T)) // B))
    for batch in batches:
      self.assertEqual(sorted(batch), sorted(pipeline.BATCH_KEYS))
      for value in batch.values():
        self.assertEqual((value.shape, value.dtype), ((B, T), np.int32))
    # Only the tail of the last batch is padding; padding is masked out.
    segments = np.concatenate([b["segment_ids_BxT"].reshape(-1) for b in batches])
    real = int((segments > 0).sum())
    self.assertTrue((segments[:real] > 0).all())
    self.assertEqual(int(batches[-1]["loss_mask_BxT"].reshape(-1)[segments[-B * T:] == 0].sum()),
                     0)
    # Every document begins with bos (mask 0) and ends with eos.
    self.assertEqual(int((tokens == self.info.bos_id).sum()), len(DOCS))
    self.assertEqual(int(mask[tokens == self.info.bos_id].sum()), 0)

  def test_shuffled_epoch_is_a_permutation(self):
    batches = list(self._iterator(num_epochs=1, seed=3))
    docs = self._docs_of(batches)
    self.assertCountEqual(docs, DOCS)
    self.assertNotEqual(docs, DOCS)

  def test_same_seed_same_batches_other_seed_different(self):
    def take(seed, n=6):
      it = self._iterator(seed=seed)
      return [next(it) for _ in range(n)]
    first, again, other = take(7), take(7), take(8)
    for a, b in zip(first, again):
      for key in pipeline.BATCH_KEYS:
        np.testing.assert_array_equal(a[key], b[key])
    self.assertFalse(all(np.array_equal(a["tokens_BxT"], c["tokens_BxT"])
                         for a, c in zip(first, other)))

  def test_host_shards_are_disjoint_and_cover(self):
    shards = [self._docs_of(list(self._iterator(num_epochs=1, process_index=i,
                                                process_count=4)))
              for i in range(4)]
    seen = [doc for shard in shards for doc in shard]
    self.assertCountEqual(seen, DOCS)  # Covering, and no document twice.
    self.assertLessEqual(max(map(len, shards)) - min(map(len, shards)), 1)

  def test_state_restore_continues_identically(self):
    for process_index, skip, threads in ((0, 0, 0), (0, 5, 2), (1, 9, 0)):
      kwargs = {"source": DOCS[:7], "process_index": process_index, "process_count": 2,
                "num_threads": threads}
      it = self._iterator(**kwargs)
      for _ in range(skip):  # 7 short docs: several epochs pass in these batches.
        next(it)
      state = json.loads(json.dumps(it.get_state()))
      expected = [next(it) for _ in range(8)]
      restored = self._iterator(**kwargs)
      next(restored)  # Its own position is overwritten.
      restored.set_state(state)
      for a, b in zip(expected, [next(restored) for _ in range(8)]):
        for key in pipeline.BATCH_KEYS:
          np.testing.assert_array_equal(a[key], b[key])

  def test_conversation_sources_train_on_assistant_tokens(self):
    turns = [("user", "alpha beta"), ("assistant", "gamma delta")]
    tfds_style = {"roles": [b"user", b"assistant"], "contents": [b"alpha beta", b"gamma delta"]}
    batch = next(self._iterator(source=[turns, tfds_style], num_epochs=1, shuffle=False,
                                seq_len=64, batch_size=1))
    expected = tk.apply_chat_template(turns, self.info)
    n = len(expected.ids)
    np.testing.assert_array_equal(batch["tokens_BxT"][0, :2 * n],
                                  np.concatenate([expected.ids] * 2))
    np.testing.assert_array_equal(batch["loss_mask_BxT"][0, :2 * n],
                                  np.concatenate([expected.assistant_mask] * 2))
    np.testing.assert_array_equal(batch["segment_ids_BxT"][0, :2 * n], [1] * n + [2] * n)

  def test_tfds_text_examples_read_as_bytes(self):
    as_bytes = [{"text": d.encode(), "path": b"f.py"} for d in DOCS[:4]]
    a = next(self._iterator(source=as_bytes, num_epochs=1, shuffle=False))
    b = next(self._iterator(source=DOCS[:4], num_epochs=1, shuffle=False))
    np.testing.assert_array_equal(a["tokens_BxT"], b["tokens_BxT"])

  def test_bad_arguments(self):
    with self.assertRaisesRegex(UserError, "process_index=2"):
      self._iterator(process_index=2, process_count=2)
    with self.assertRaisesRegex(UserError, "fewer than the 4 hosts"):
      self._iterator(source=DOCS[:3], process_count=4)
    with self.assertRaisesRegex(UserError, "expected 'text'"):
      next(self._iterator(source=[{"body": "x"}]))


class RegenerateTest(absltest.TestCase):

  def test_replaces_assistant_turns_in_rounds(self):
    tok = tk.train_bpe(DOCS, 320)
    info = tk.TokenizerInfo.from_tokenizer(tok)
    conversations = [
        [("user", "alpha"), ("assistant", "old 1"), ("user", "beta"), ("assistant", "old 2")],
        [("system", "gamma"), ("user", "delta"), ("assistant", "old 3")],
        [("user", "no answer yet")],
    ]
    calls = []

    def generate_fn(prompt_ids):
      calls.append(prompt_ids)
      # The reply names the last user turn; eos and junk after it must be dropped.
      last_user = [info.decode(p, skip_special_tokens=False).split("<|user|>")[-1]
                   .split("<eos>")[0] for p in prompt_ids]
      return [info.encode(f"re {u}") + [info.eos_id, 7, 7] for u in last_user]

    out = pipeline.regenerate_responses(conversations, generate_fn, tok, batch_size=1)
    self.assertEqual(out, [
        [("user", "alpha"), ("assistant", "re alpha"), ("user", "beta"),
         ("assistant", "re beta")],
        [("system", "gamma"), ("user", "delta"), ("assistant", "re delta")],
        [("user", "no answer yet")],
    ])
    self.assertLen(calls, 3)  # Round 0: two prompts one by one; round 1: one prompt.
    assistant_id = tok.token_to_id("<|assistant|>")
    self.assertTrue(all(batch[0][-1] == assistant_id for batch in calls))
    # The second-round prompt carries the regenerated first answer, not the original.
    self.assertIn("re alpha", info.decode(calls[2][0], skip_special_tokens=False))
    self.assertEqual(conversations[0][1], ("assistant", "old 1"))  # Input untouched.


if __name__ == "__main__":
  absltest.main()
