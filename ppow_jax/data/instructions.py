"""Instruction prompts synthesized offline, for self-distilled drafter training data.

A drafter learns best from its target's own answers (EAGLE and HASS regenerate their training
responses with the target), which needs prompts, not answers. Without a download they come
from what every machine with Python has: the standard library's public functions, classes and
modules, read with ``ast`` (nothing is imported or executed), each turned into a coding or an
explanation request; each documented function also becomes a completion request in
HumanEval's form (its ``def`` line and docstring, nothing else), the form of code benchmarks.
A user JSONL of prompts (any ``prompts.py`` record form) can replace them.

Every item carries a ``key`` (its module) so train and held-out prompts never share a module.
The selection is a pure function of the source files and the arguments.
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import os
from typing import Iterator, Optional, Sequence

import numpy as np

from ppow_jax.data import corpus, prompts
from ppow_jax.errors import UserError

# Request forms: {q} is the qualified name, {sig} the signature, {doc} the docstring's first
# sentence. Coding and explanation requests alternate.
_FUNCTION_FORMS = (
    "Write a Python function `{sig}`. Specification: {doc}",
    "Explain what the Python function `{q}` does and give a short usage example.",
    "Implement `{sig}` in Python from scratch (documented as: \"{doc}\"), with a docstring.",
    "What are typical mistakes when using `{q}` in Python? Show correct code.",
)
_CLASS_FORMS = (
    "Write a small Python class in the spirit of `{q}` ({doc}) and show how to use it.",
    "Explain the Python class `{q}`: what it is for, and a short example of using it.",
)
_MODULE_FORMS = (
    "Give an overview of the Python `{q}` module ({doc}) with two short code examples.",
    "When would I use the Python module `{q}`? Answer briefly, then show one example.",
)


@dataclasses.dataclass(frozen=True)
class Instruction:
  key: str  # the module it came from (train/held-out split key)
  text: str


def _first_sentence(doc: str, limit: int = 200) -> str:
  line = " ".join(doc.strip().split("\n\n")[0].split())
  end = line.find(". ")
  line = line[:end + 1] if 0 <= end < limit else line[:limit]
  if sum(ch.isalpha() for ch in line) < 8:
    return ""
  return line if line.endswith((".", "?", "!")) else line + "."


def _docstring_head(doc: str, limit: int = 600) -> str:
  """The docstring's leading paragraphs, whole, up to ``limit`` characters (at least one)."""
  paragraphs = [p.strip("\n") for p in doc.strip().split("\n\n") if p.strip()]
  out = paragraphs[:1]
  for p in paragraphs[1:]:
    if len("\n\n".join(out + [p])) > limit:
      break
    out.append(p)
  return "\n\n".join(out)


def completion_stub(node: ast.FunctionDef, doc: str) -> str:
  """A HumanEval-style completion request: the function's ``def`` line (annotations and
  defaults kept, decorators dropped) and its docstring, indented, without a body."""
  stub = copy.copy(node)  # new lists below: ``node`` itself is left as it is
  stub.decorator_list, stub.body = [], [ast.Pass()]
  header = ast.unparse(stub).splitlines()[0]
  body = "\n".join(("    " + line).rstrip() for line in _docstring_head(doc).split("\n"))
  return f'{header}\n    """{body[4:]}\n    """\n'


def _signature(node: ast.FunctionDef) -> str:
  names = [a.arg for a in node.args.posonlyargs + node.args.args if a.arg not in ("self", "cls")]
  if node.args.vararg:
    names.append("*" + node.args.vararg.arg)
  names += [a.arg for a in node.args.kwonlyargs]
  if node.args.kwarg:
    names.append("**" + node.args.kwarg.arg)
  return f"{node.name}({', '.join(names)})"


def _module_name(rel: str) -> str:
  parts = rel[:-3].split("/")
  if parts[-1] == "__init__":
    parts = parts[:-1]
  return ".".join(parts)


def _from_source(module: str, source: str) -> Iterator[Instruction]:
  try:
    tree = ast.parse(source)
  except (SyntaxError, ValueError):
    return
  h = int(corpus.heldout_score(module) * 1e9)  # a stable per-module choice of forms
  doc = ast.get_docstring(tree)
  if doc and _first_sentence(doc):
    form = _MODULE_FORMS[h % len(_MODULE_FORMS)]
    yield Instruction(module, form.format(q=module, doc=_first_sentence(doc).rstrip(".:")))
  for i, node in enumerate(tree.body):
    name = getattr(node, "name", None)
    if name is None or name.startswith("_"):
      continue
    doc = ast.get_docstring(node)
    if not doc or not _first_sentence(doc):
      continue
    q, sentence = f"{module}.{node.name}", _first_sentence(doc)
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
      form = _FUNCTION_FORMS[(h + i) % len(_FUNCTION_FORMS)]
      yield Instruction(module, form.format(q=q, sig=_signature(node), doc=sentence))
      yield Instruction(module, completion_stub(node, doc))
    elif isinstance(node, ast.ClassDef):
      form = _CLASS_FORMS[(h + i) % len(_CLASS_FORMS)]
      yield Instruction(module, form.format(q=q, doc=sentence.rstrip(".:")))


def from_python_sources(root: str, exclude: Sequence[str] = ()) -> list[Instruction]:
  """Every request the public, documented top-level names under ``root`` yield (sorted)."""
  root, rels = corpus.list_files(root, "*.py", exclude)
  out = []
  for rel in rels:
    try:
      with open(os.path.join(root, rel), encoding="utf-8") as f:
        source = f.read()
    except (OSError, UnicodeDecodeError):
      continue
    module = _module_name(rel)
    if not any(part.startswith("_") for part in module.split(".")):
      out.extend(_from_source(module, source))
  return out


def from_jsonl(path: str, skip_bad_lines: bool = False) -> list[Instruction]:
  """A user's prompts (first user turn of each record), keyed by their line."""
  out = []
  for i, turns in enumerate(prompts.read_prompts(path, skip_bad_lines)):
    user = [content for role, content in turns if role == "user"]
    if user:
      out.append(Instruction(f"{os.path.basename(path)}:{i}", user[0]))
  if not out:
    raise UserError(f"{path}: no user prompts")
  return out


def select(items: Sequence[Instruction], n: int, heldout_fraction: float, seed: int,
           n_heldout: Optional[int] = None) -> tuple[list[Instruction], list[Instruction]]:
  """(train, held-out): split by module key, then ``n`` (and ``n_heldout``) drawn per split."""
  if n < 1:
    raise UserError(f"number of instructions must be >= 1, got {n}")
  keys = sorted({it.key for it in items})
  if len(keys) < 2:
    raise UserError(f"instructions come from {len(keys)} source(s); need >= 2 to hold out")
  split = corpus.split_by_key(keys, heldout_fraction, what="instruction sources")
  held = set(split.get(corpus.HELDOUT, []))
  rng = np.random.default_rng(seed)
  train = [it for it in items if it.key not in held]
  heldout = [it for it in items if it.key in held]
  pick = lambda xs, k: [xs[i] for i in sorted(rng.permutation(len(xs))[:k])]
  return pick(train, n), pick(heldout, n_heldout if n_heldout is not None else len(heldout))


def as_conversations(items: Sequence[Instruction]) -> list[list[prompts.Turn]]:
  """Each request as a user turn followed by an (empty) assistant turn to regenerate."""
  return [[("user", it.text), ("assistant", "")] for it in items]
