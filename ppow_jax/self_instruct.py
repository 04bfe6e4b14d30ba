"""Requests written by the target itself (Magpie-style self-instruction), offline.

An instruction-tuned model that is given only the start of a user turn under its own chat
template (system prompt, then the user header) continues with a plausible user request: the
kind of request its fine-tuning data held. Sampled at temperature ~1 these are varied (advice,
writing, code, maths, explanations) and, answered by the same model, give drafter training data
from the distribution a chat deployment sees, without a dataset download. The method is
Magpie's (Xu et al., 2024); nothing here depends on a particular model beyond its template.

Pure parts (the user-turn prefix, the filter) are separate from sampling so they can be tested
without a model.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

from ppow_jax.data import tokenizer as tokenizer_lib
from ppow_jax.errors import UserError

_MARK = "\x00"  # a character no template writes: where the user's text would start


def user_prefix(info: tokenizer_lib.TokenizerInfo) -> list[int]:
  """Token ids of a conversation up to where the user's first request begins."""
  text = tokenizer_lib.render_chat_template([("user", _MARK)], info, False)
  if _MARK not in text:
    raise UserError("the chat template dropped the user's text; cannot self-instruct")
  prefix = text[:text.index(_MARK)]
  return list(info.tokenizer.encode(prefix, add_special_tokens=False).ids)


def keep_request(ids: Sequence[int], end_id: int, min_tokens: int) -> Optional[list[int]]:
  """The request's ids when the model closed the turn itself after ``min_tokens`` or more
  tokens; ``None`` for an unfinished (cut at the length cap) or too short turn."""
  ids = [int(t) for t in ids]
  if end_id not in ids:
    return None
  ids = ids[:ids.index(end_id)]
  return ids if len(ids) >= min_tokens else None


def sample_requests(generate_fn: Callable[[list[list[int]], int], list[list[int]]],
                    info: tokenizer_lib.TokenizerInfo, n: int, batch_size: int,
                    min_tokens: int = 4, max_rounds: int = 0,
                    done: Sequence[tuple[int, str]] = (),
                    on_round: Optional[Callable[[int, list[str]], None]] = None) -> list[str]:
  """``n`` distinct requests: batches of the user prefix continued by ``generate_fn(prompts,
  round)`` (sampling; the round number seeds it), filtered by ``keep_request``, in order.

  ``done`` holds ``(round, request)`` pairs of an earlier, interrupted call: sampling resumes
  after their last round. ``on_round(round, kept)`` sees each round's new requests (to store).
  """
  if info.eos_id is None:
    raise UserError("self-instruction needs the tokenizer's end-of-turn id (eos)")
  prefix = user_prefix(info)
  out = [text for _, text in done][:n]
  seen = set(out)
  max_rounds = max_rounds or 4 * (-(-n // batch_size))
  start = max((r for r, _ in done), default=-1) + 1
  for r in range(start, max_rounds):
    if len(out) >= n:
      break
    kept = []
    for ids in generate_fn([prefix] * batch_size, r):
      ids = keep_request(ids, info.eos_id, min_tokens)
      text = "" if ids is None else info.decode(ids, skip_special_tokens=True).strip()
      if text and text not in seen and len(out) + len(kept) < n:
        seen.add(text)
        kept.append(text)
    out += kept
    if on_round is not None:
      on_round(r, kept)
    print(f"[data] self-instruct: {len(out)}/{n} requests", flush=True)
  if len(out) < n:
    raise UserError(f"self-instruction: only {len(out)} of {n} requests after {max_rounds} "
                    "rounds (raise config.data.self_instruct_max_tokens?)")
  return out
