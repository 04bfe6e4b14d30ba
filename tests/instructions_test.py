"""Instruction prompts synthesized from Python sources (self-distillation data)."""

import json
import os
import shutil
import tempfile

from absl.testing import absltest

from ppow_jax.data import instructions
from ppow_jax.errors import UserError

_MODULE = '''"""Tools for counting sheep at night."""

def count(flock, start=0, *rest, limit=None, **opts):
    """Return how many sheep jumped. Extra detail here."""

class Pen:
    """A place where the counted sheep wait for morning."""

def _private():
    """Hidden helper that should never become a prompt."""

def undocumented():
    pass
'''


class InstructionsTest(absltest.TestCase):

  def _tmp(self) -> str:
    d = tempfile.mkdtemp()
    self.addCleanup(shutil.rmtree, d, True)
    return d

  def _tree(self, n_modules: int) -> str:
    root = self._tmp()
    for i in range(n_modules):
      with open(os.path.join(root, f"sheep{i}.py"), "w") as f:
        f.write(_MODULE)
    os.makedirs(os.path.join(root, "_internal"))
    with open(os.path.join(root, "_internal", "x.py"), "w") as f:
      f.write(_MODULE)
    return root

  def test_documented_public_names_become_requests(self):
    items = instructions.from_python_sources(self._tree(1))
    self.assertEqual({it.key for it in items}, {"sheep0"})
    # module, count (a request and a completion), Pen; not _private, undocumented, _internal
    self.assertLen(items, 4)
    text = "\n".join(it.text for it in items)
    self.assertIn("sheep0", text)
    self.assertTrue("count(flock, start, *rest, limit, **opts)" in text
                    or "sheep0.count" in text)
    self.assertIn("sheep0.Pen", text)
    self.assertNotIn("_private", text)
    requests = [it.text for it in items if not it.text.startswith("def ")]
    self.assertNotIn("Extra detail", "\n".join(requests))  # first sentence only

  def test_completion_stub_is_humaneval_shaped(self):
    source = ('def f(xs: list[int], k=2, *, key=None) -> int:\n'
              '    """Sum the k largest.\n\n    >>> f([1, 5, 3])\n    8\n    """\n'
              '    return sum(sorted(xs)[-k:])\n')
    node = __import__("ast").parse(source).body[0]
    doc = "Sum the k largest.\n\n>>> f([1, 5, 3])\n8"
    self.assertEqual(instructions.completion_stub(node, doc),
                     'def f(xs: list[int], k=2, *, key=None) -> int:\n'
                     '    """Sum the k largest.\n\n    >>> f([1, 5, 3])\n    8\n    """\n')
    long_doc = "Head.\n\n" + "x" * 700
    self.assertNotIn("xxx", instructions.completion_stub(node, long_doc))
    items = instructions.from_python_sources(self._tree(1))
    stubs = [it.text for it in items if it.text.startswith("def ")]
    self.assertEqual(stubs, ['def count(flock, start=0, *rest, limit=None, **opts):\n'
                             '    """Return how many sheep jumped. Extra detail here.\n    """\n'])

  def test_selection_holds_out_whole_modules_and_is_deterministic(self):
    items = instructions.from_python_sources(self._tree(12))
    train, held = instructions.select(items, 10, 0.3, seed=0)
    again = instructions.select(items, 10, 0.3, seed=0)
    self.assertEqual((train, held), again)
    self.assertLen(train, 10)
    self.assertTrue(held)
    self.assertFalse({it.key for it in train} & {it.key for it in held})
    convs = instructions.as_conversations(train[:2])
    self.assertEqual(convs[0], [("user", train[0].text), ("assistant", "")])

  def test_user_jsonl_and_bad_input(self):
    path = os.path.join(self._tmp(), "p.jsonl")
    with open(path, "w") as f:
      f.write(json.dumps({"prompt": "Write a haiku."}) + "\n")
      f.write(json.dumps({"messages": [{"role": "user", "content": "Add 2 and 3."},
                                       {"role": "assistant", "content": "5"}]}) + "\n")
    items = instructions.from_jsonl(path)
    self.assertEqual([it.text for it in items], ["Write a haiku.", "Add 2 and 3."])
    with self.assertRaisesRegex(UserError, "need >= 2"):
      instructions.select(items[:1], 1, 0.5, 0)
    with self.assertRaisesRegex(UserError, ">= 1"):
      instructions.select(items, 0, 0.5, 0)


if __name__ == "__main__":
  absltest.main()
