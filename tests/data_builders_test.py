"""Local-file TFDS builders (no TensorFlow, no downloads), offline loading, prompt files."""

import json
import os
import shutil
import tempfile
import time
from unittest import mock

from absl.testing import absltest
import tensorflow_datasets as tfds

from ppow_jax.data import builders, corpus
from ppow_jax.data import prompts
from ppow_jax.errors import UserError


def _write(path, content, mode="w"):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, mode) as f:
    f.write(content)


def _tempdir(test):
  path = tempfile.mkdtemp()
  test.addCleanup(shutil.rmtree, path, ignore_errors=True)
  return path


def _read_split(source):
  return [{k: v.decode() if isinstance(v, bytes) else v for k, v in source[i].items()}
          for i in range(len(source))]


SHAREGPT = {"conversations": [{"from": "system", "value": "be nice"},
                              {"from": "human", "value": "hi"},
                              {"from": "gpt", "value": "hello!"}]}
OPENAI = {"messages": [{"role": "user", "content": "2+2?"},
                       {"role": "assistant", "content": [{"type": "text", "text": "4"}]}]}


class TextCorpusTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.tmp = _tempdir(self)
    self.corpus = os.path.join(self.tmp, "corpus")
    self.expected = {}
    for i in range(24):
      rel = f"pkg{i % 3}/mod_{i}.py" if i % 2 else f"file_{i}.py"
      self.expected[rel] = f"x_{i} = {i}  # é\n"
      _write(os.path.join(self.corpus, rel), self.expected[rel])
    _write(os.path.join(self.corpus, "notes.txt"), "not python\n")
    _write(os.path.join(self.corpus, ".hidden", "h.py"), "hidden = 1\n")
    _write(os.path.join(self.corpus, "__pycache__", "c.py"), "cached = 1\n")
    _write(os.path.join(self.corpus, "skip", "s.py"), "skipped = 1\n")
    _write(os.path.join(self.corpus, "binary.py"), b"\x00\x01", mode="wb")
    self.data_dir = os.path.join(self.tmp, "tfds")

  def _build(self, data_dir=None, **kwargs):
    kwargs = {"source": self.corpus, "include": "*.py", "exclude": ("skip",),
              "heldout_fraction": 0.25, **kwargs}
    builder = builders.TextCorpus(data_dir=data_dir or self.data_dir, **kwargs)
    return builder, builders.prepare(builder)

  def test_split_by_file_is_deterministic_and_complete(self):
    builder, sources = self._build()
    self.assertEqual(set(sources), {"train", "heldout"})
    splits = {name: _read_split(src) for name, src in sources.items()}
    paths = {name: [ex["path"] for ex in exs] for name, exs in splits.items()}
    self.assertEmpty(set(paths["train"]) & set(paths["heldout"]))
    self.assertCountEqual(paths["train"] + paths["heldout"], self.expected)  # binary skipped
    self.assertNotEmpty(paths["heldout"])
    for exs in splits.values():
      for ex in exs:
        self.assertEqual(ex["text"], self.expected[ex["path"]])
    expected_split = corpus.split_by_key(sorted(self.expected) + ["binary.py"], 0.25)
    self.assertEqual(paths["heldout"], [p for p in expected_split["heldout"] if p != "binary.py"])
    # Rebuilt elsewhere: the same assignment and order.
    _, again = self._build(data_dir=os.path.join(self.tmp, "other"))
    self.assertEqual([ex["path"] for ex in _read_split(again["heldout"])], paths["heldout"])
    self.assertEqual([ex["path"] for ex in _read_split(again["train"])], paths["train"])
    # Prepared once: a second builder on the same data_dir reuses the files.
    self.assertTrue(builders.TextCorpus(data_dir=self.data_dir, source=self.corpus,
                                        include="*.py", exclude=("skip",),
                                        heldout_fraction=0.25).is_prepared())

  def test_identity_includes_the_source(self):
    other = os.path.join(self.tmp, "other_corpus")
    _write(os.path.join(other, "a.py"), "a = 1\n")
    _write(os.path.join(other, "b.py"), "b = 1\n")
    first, _ = self._build()
    second, sources = self._build(source=other)
    self.assertNotEqual(first.data_dir, second.data_dir)
    self.assertEqual(len(sources["train"]) + len(sources["heldout"]), 2)  # never-empty splits
    _write(os.path.join(other, "c.py"), "c = 1\n")  # A changed corpus is a new dataset.
    self.assertNotEqual(builders.TextCorpus(source=other, data_dir=self.data_dir).data_dir,
                        builders.TextCorpus(source=other, include="*.py",
                                            data_dir=self.data_dir).data_dir)
    self.assertFalse(builders.TextCorpus(source=other, heldout_fraction=0.25, include="*.py",
                                         exclude=("skip",), data_dir=self.data_dir).is_prepared())

  def test_glob_source_and_config_object(self):
    config = builders.TextCorpusConfig(source=os.path.join(self.corpus, "pkg*", "*.py"),
                                       heldout_fraction=0.0, name="pkgs")
    self.assertTrue(config.name.startswith("pkgs-"))
    builder = builders.TextCorpus(config=config, data_dir=self.data_dir)
    sources = builders.prepare(builder)
    self.assertEqual(list(sources), ["train"])
    self.assertCountEqual([ex["path"] for ex in _read_split(sources["train"])],
                          [p for p in self.expected if p.startswith("pkg")])

  def test_bad_sources_name_the_path(self):
    missing = os.path.join(self.tmp, "missing")
    with self.assertRaisesRegex(UserError, f"does not exist: {missing}"):
      builders.TextCorpus(source=missing, data_dir=self.data_dir)
    with self.assertRaisesRegex(UserError, "matches no files: .*nothing_here"):
      builders.TextCorpus(source=os.path.join(self.corpus, "*.nothing_here"),
                          data_dir=self.data_dir)
    with self.assertRaisesRegex(UserError, f"no files matching '\\*.rs'.*{self.corpus}"):
      builders.TextCorpus(source=self.corpus, include="*.rs", data_dir=self.data_dir)
    with self.assertRaisesRegex(UserError, "heldout_fraction"):
      builders.TextCorpus(source=self.corpus, heldout_fraction=1.0, data_dir=self.data_dir)
    only_binary = os.path.join(self.tmp, "bin")
    _write(os.path.join(only_binary, "x.py"), b"\x00", mode="wb")
    with self.assertRaisesRegex(UserError, f"{only_binary} is empty"):
      builders.prepare(builders.TextCorpus(source=only_binary, heldout_fraction=0,
                                           data_dir=self.data_dir))


class ConversationsTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.tmp = _tempdir(self)
    self.data_dir = os.path.join(self.tmp, "tfds")
    self.path = os.path.join(self.tmp, "chats.jsonl")
    _write(self.path, "\n".join([json.dumps(SHAREGPT), "", json.dumps(OPENAI),
                                 '{"messages": [{"role": "user"', json.dumps({"oops": 1})]))

  def test_both_forms_with_skip_flag(self):
    builder = builders.Conversations(source=self.path, skip_bad_lines=True,
                                     data_dir=self.data_dir)
    with self.assertLogs(level="WARNING") as logs:
      sources = builders.prepare(builder)
    skipped = [line for line in logs.output if "skipping malformed line" in line]
    self.assertLen(skipped, 2)
    self.assertIn(f"{self.path}:4", skipped[0])
    self.assertIn(f"{self.path}:5", skipped[1])
    train = sources["train"]
    self.assertEqual([builders.example_turns(train[i]) for i in range(len(train))],
                     [[("system", "be nice"), ("user", "hi"), ("assistant", "hello!")],
                      [("user", "2+2?"), ("assistant", "4")]])
    self.assertEqual(train[1]["where"].decode(), f"{self.path}:3")

  def test_malformed_line_names_file_and_line(self):
    builder = builders.Conversations(source=self.path, data_dir=self.data_dir)
    with self.assertRaisesRegex(UserError, f"{self.path}:4: malformed line: invalid JSON"):
      builders.prepare(builder)

  def test_all_lines_bad_is_an_empty_dataset(self):
    bad = os.path.join(self.tmp, "bad.jsonl")
    _write(bad, '{"prompt": 3}\n')
    with self.assertRaisesRegex(UserError, f"{bad} is empty"):
      builders.prepare(builders.Conversations(source=bad, skip_bad_lines=True,
                                              data_dir=self.data_dir))


class LoadPreparedTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.data_dir = _tempdir(self)

  def test_unknown_and_unprepared_names_fail_fast_without_downloading(self):
    never = mock.Mock(side_effect=AssertionError("download_and_prepare must not be called"))
    with mock.patch.object(tfds.core.DatasetBuilder, "download_and_prepare", never):
      for name in ("no_such_dataset_xyz", "mnist", "mnist/foo:1.0.0", "huggingface:foo"):
        start = time.time()
        with self.assertRaisesRegex(UserError, f"'{name}' is not prepared under {self.data_dir}"):
          builders.load_prepared(name, self.data_dir)
        self.assertLess(time.time() - start, 5.0, name)
    never.assert_not_called()
    with self.assertRaisesRegex(UserError, "data_dir does not exist"):
      builders.load_prepared("mnist", os.path.join(self.data_dir, "nope"))

  def test_loads_a_prepared_dataset_by_name(self):
    corpus = os.path.join(self.data_dir, "src")
    for i in range(4):
      _write(os.path.join(corpus, f"f{i}.txt"), f"text {i}\n")
    builder = builders.TextCorpus(source=corpus, heldout_fraction=0, data_dir=self.data_dir)
    builders.prepare(builder)
    name = f"text_corpus/{builder.builder_config.name}"
    for query in (name, f"{name}:1.0.0"):
      loaded = builders.load_prepared(query, self.data_dir)
      self.assertEqual([ex["text"] for ex in _read_split(loaded.as_data_source("train"))],
                       [f"text {i}\n" for i in range(4)])
    with self.assertRaisesRegex(UserError, f"Prepared there: \\['{name}:1.0.0'\\]"):
      builders.load_prepared("text_corpus/other", self.data_dir)


class PromptsTest(absltest.TestCase):

  def test_three_shapes(self):
    path = os.path.join(_tempdir(self), "prompts.jsonl")
    _write(path, "\n".join(json.dumps(r) for r in [{"prompt": "Why?"}, SHAREGPT, OPENAI]) + "\n")
    self.assertEqual(prompts.read_prompts(path),
                     [[("user", "Why?")], [("system", "be nice"), ("user", "hi")],
                      [("user", "2+2?")]])

  def test_malformed_lines(self):
    path = os.path.join(_tempdir(self), "p.jsonl")
    _write(path, '{"prompt": "ok"}\n{"conversations": [{"from": "alien", "value": "x"}]}\n'
           '{"messages": [{"role": "assistant", "content": "only"}]}\n')
    with self.assertRaisesRegex(UserError, f"{path}:2: malformed line: .*unknown role 'alien'"):
      prompts.read_prompts(path)
    with self.assertLogs(level="WARNING") as logs:
      self.assertEqual(prompts.read_prompts(path, skip_bad_lines=True), [[("user", "ok")]])
    self.assertIn(f"{path}:2", logs.output[0])
    self.assertIn(f"{path}:3", logs.output[1])
    with self.assertRaisesRegex(UserError, "not found: .*missing.jsonl"):
      prompts.read_prompts(path.replace("p.jsonl", "missing.jsonl"))

  def test_truncate(self):
    self.assertEqual(prompts.truncate_prompt([1, 2, 3], 3), [1, 2, 3])
    with self.assertLogs(level="WARNING"):
      self.assertEqual(prompts.truncate_prompt([1, 2, 3, 4], 2, name="p.jsonl:7"), [3, 4])
    with self.assertRaisesRegex(UserError, "p.jsonl:7: 4 tokens exceed the limit of 2"):
      prompts.truncate_prompt([1, 2, 3, 4], 2, policy="reject", name="p.jsonl:7")
    with self.assertRaisesRegex(UserError, "unknown truncation policy"):
      prompts.truncate_prompt([1], 2, policy="middle")


if __name__ == "__main__":
  absltest.main()
