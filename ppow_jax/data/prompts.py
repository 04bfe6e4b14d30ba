"""Conversation records from JSONL files: parsing, evaluation prompts, prompt truncation.

One record shape is shared by training conversations (``builders.Conversations``) and
evaluation prompt files (``read_prompts``), so both accept the same three forms
(see ``docs/protocol.md``):

* ``{"prompt": "text"}`` -- a single user turn;
* ``{"conversations": [{"from": "human"|"gpt"|"system", "value": ...}, ...]}`` (ShareGPT);
* ``{"messages": [{"role": "user"|"assistant"|"system", "content": ...}, ...]}`` (OpenAI).

All of them become a list of ``(role, content)`` turns with role in ``ROLES``. A record that
holds several forms (UltraChat ships ``prompt`` *and* ``messages``) is read by the first of
``conversations``, ``messages``, ``prompt``: the structured forms carry the answers.

Bad input names its place as ``file:line``; with ``skip_bad_lines=True`` the line is skipped
with a warning instead, because one broken line in a 500k-line scrape should not cost a run.
This module imports neither TensorFlow Datasets nor JAX so evaluation tools stay light.
"""

from __future__ import annotations

import json
from absl import logging
import os
from typing import Any, Iterator, Sequence

from ppow_jax.errors import UserError

Turn = tuple[str, str]  # (role, content); role in ROLES.
ROLES = ("system", "user", "assistant")

# Aliases seen in the wild; anything else is an error rather than a silent guess.
_ROLE_ALIASES = {
    "human": "user", "user": "user",
    "gpt": "assistant", "chatgpt": "assistant", "assistant": "assistant", "model": "assistant",
    "system": "system", "developer": "system",
}
_TRUNCATION_POLICIES = ("truncate_left", "reject")


def _content_text(content: Any) -> str:
  """Message content as text; OpenAI's list-of-parts form keeps its text parts only."""
  if isinstance(content, str):
    return content
  if isinstance(content, list) and all(isinstance(p, dict) for p in content):
    texts = [p.get("text") for p in content if p.get("type", "text") == "text"]
    if all(isinstance(t, str) for t in texts):
      return "".join(texts)
  raise ValueError(f"content must be a string, got {type(content).__name__}: {content!r:.80}")


def _turns_from_list(items: Any, key: str, role_key: str, content_key: str) -> list[Turn]:
  if not isinstance(items, list) or not items:
    raise ValueError(f"'{key}' must be a non-empty list of turns")
  turns = []
  for i, item in enumerate(items):
    if not isinstance(item, dict):
      raise ValueError(f"{key}[{i}] must be an object, got {type(item).__name__}")
    # ShareGPT dumps occasionally use OpenAI's keys and vice versa; accept either spelling.
    role = item.get(role_key, item.get("role" if role_key == "from" else "from"))
    content = item.get(content_key, item.get("content" if content_key == "value" else "value"))
    if role is None or content is None:
      raise ValueError(f"{key}[{i}] needs '{role_key}' and '{content_key}', has {sorted(item)}")
    if not isinstance(role, str) or role.lower() not in _ROLE_ALIASES:
      raise ValueError(f"{key}[{i}] has unknown role {role!r}; expected one of "
                       f"{sorted(_ROLE_ALIASES)}")
    try:
      text = _content_text(content)
    except ValueError as e:
      raise ValueError(f"{key}[{i}]: {e}") from None
    turns.append((_ROLE_ALIASES[role.lower()], text))
  return turns


def turns_from_record(record: Any) -> list[Turn]:
  """Normalises one decoded JSON record into turns.

  Raises:
    ValueError: with a short reason; callers add the file:line.
  """
  if not isinstance(record, dict):
    raise ValueError(f"expected a JSON object, got {type(record).__name__}")
  if "conversations" in record:
    return _turns_from_list(record["conversations"], "conversations", "from", "value")
  if "messages" in record:
    return _turns_from_list(record["messages"], "messages", "role", "content")
  if "prompt" in record:
    prompt = record["prompt"]
    if not isinstance(prompt, str) or not prompt:
      raise ValueError(f"'prompt' must be a non-empty string, got {prompt!r:.80}")
    return [("user", prompt)]
  raise ValueError(f"needs one of 'conversations', 'messages', 'prompt'; has keys {sorted(record)}")


def iter_jsonl_turns(path: str | os.PathLike,
                     skip_bad_lines: bool = False) -> Iterator[tuple[str, list[Turn]]]:
  """Yields ``("file:line", turns)`` for every non-blank line of a JSONL file.

  Raises:
    UserError: the file is missing, or a line is malformed and ``skip_bad_lines`` is False.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise UserError(f"JSONL file not found: {path}")
  with open(path, "rb") as f:
    for lineno, raw in enumerate(f, start=1):
      if not raw.strip():
        continue
      try:
        yield f"{path}:{lineno}", turns_from_record(json.loads(raw.decode("utf-8").rstrip("\r\n")))
        continue
      except UnicodeDecodeError as e:
        reason = f"not valid UTF-8 ({e.reason} at byte {e.start})"
      except json.JSONDecodeError as e:
        reason = f"invalid JSON ({e.msg} at column {e.colno})"
      except ValueError as e:
        reason = str(e)
      if not skip_bad_lines:
        raise UserError(f"{path}:{lineno}: malformed line: {reason}")
      logging.warning("%s:%d: skipping malformed line: %s", path, lineno, reason)


def read_prompts(path: str | os.PathLike, skip_bad_lines: bool = False) -> list[list[Turn]]:
  """Reads an evaluation prompt file: one conversation prefix per line.

  A trailing assistant turn (the reference answer of a ShareGPT/OpenAI record) is dropped,
  so every prompt ends where the model is to speak.

  Raises:
    UserError: missing file, malformed line (``file:line``), a record left without turns, or a
      file with no prompts at all.
  """
  prompts = []
  for where, turns in iter_jsonl_turns(path, skip_bad_lines):
    if turns[-1][0] == "assistant":
      turns = turns[:-1]
    if not turns:
      if not skip_bad_lines:
        raise UserError(f"{where}: malformed line: no prompt turns before the assistant turn")
      logging.warning("%s: skipping line with no prompt turns", where)
      continue
    prompts.append(turns)
  if not prompts:
    raise UserError(f"no prompts in {os.fspath(path)}")
  return prompts


def truncate_prompt(ids: Sequence[int], max_len: int, policy: str = "truncate_left",
                    name: str = "prompt") -> list[int]:
  """Fits a tokenised prompt into ``max_len`` tokens.

  ``truncate_left`` keeps the *last* tokens: the end of a prompt (the question, the generation
  header) is what the answer depends on. ``reject`` refuses instead, for benchmarks whose
  numbers would silently change.

  Args:
    ids: token ids.
    max_len: the most tokens allowed (>= 1).
    policy: ``truncate_left`` (warn and cut) or ``reject`` (UserError).
    name: what to call the prompt in messages, e.g. ``prompts.jsonl:12``.
  """
  if policy not in _TRUNCATION_POLICIES:
    raise UserError(f"unknown truncation policy {policy!r}; expected one of "
                    f"{list(_TRUNCATION_POLICIES)}")
  if max_len < 1:
    raise UserError(f"max prompt length must be >= 1, got {max_len}")
  ids = list(ids)
  if len(ids) <= max_len:
    return ids
  if policy == "reject":
    raise UserError(f"{name}: {len(ids)} tokens exceed the limit of {max_len} "
                    f"(truncation policy 'reject')")
  logging.warning("%s: %d tokens exceed the limit of %d; keeping the last %d", name, len(ids),
                  max_len, max_len)
  return ids[-max_len:]
