"""Tokenizers: training a byte-level BPE, saving/loading ``tokenizer.json``, chat templates.

Two kinds of tokenizer meet here and are handled the same way through ``TokenizerInfo``:

* the small byte-level BPE this project trains for its own toy targets (``train_bpe``), whose
  special tokens (``SPECIAL_TOKENS``) drive a built-in chat template; and
* a Hugging Face model's ``tokenizer.json`` with its ``tokenizer_config.json``, whose Jinja
  ``chat_template`` is rendered with jinja2 exactly as ``transformers`` would (same sandbox,
  ``trim_blocks``/``lstrip_blocks``, ``raise_exception``) -- a wrong chat template is one of the
  reasons users report for drafters that accept well in training and poorly in serving.

``apply_chat_template`` returns the ids together with an ``assistant_mask``: the drafter is
trained on the tokens the target would generate (assistant content and its end-of-turn
token), not on the prompt.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
from typing import Iterable, NamedTuple, Optional, Sequence

from absl import logging
import numpy as np
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from ppow_jax.data.prompts import Turn
from ppow_jax.errors import UserError

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<|user|>", "<|assistant|>", "<|system|>")
_ROLE_TOKENS = {"user": "<|user|>", "assistant": "<|assistant|>", "system": "<|system|>"}


@dataclasses.dataclass(frozen=True)
class TokenizerInfo:
  """A tokenizer plus what its ``tokenizer_config.json`` says about special tokens and chat.

  ``chat_template`` None selects the built-in template over ``SPECIAL_TOKENS``.
  """
  tokenizer: tokenizers.Tokenizer
  chat_template: Optional[str] = None
  bos_token: Optional[str] = None
  eos_token: Optional[str] = None
  pad_token: Optional[str] = None

  @classmethod
  def from_tokenizer(cls, tokenizer: tokenizers.Tokenizer) -> "TokenizerInfo":
    """Wraps a bare tokenizer, naming this project's special tokens when it has them."""
    def known(token):
      return token if tokenizer.token_to_id(token) is not None else None
    return cls(tokenizer, None, known("<bos>"), known("<eos>"), known("<pad>"))

  def _id(self, token: Optional[str]) -> Optional[int]:
    return None if token is None else self.tokenizer.token_to_id(token)

  @property
  def bos_id(self) -> Optional[int]:
    return self._id(self.bos_token)

  @property
  def eos_id(self) -> Optional[int]:
    return self._id(self.eos_token)

  @property
  def pad_id(self) -> Optional[int]:
    return self._id(self.pad_token)

  @property
  def vocab_size(self) -> int:
    return self.tokenizer.get_vocab_size(with_added_tokens=True)

  def encode(self, text: str) -> list[int]:
    """Plain text to ids, with no special tokens added by a post-processor."""
    return self.tokenizer.encode(text, add_special_tokens=False).ids

  def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
    return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)


def as_info(tokenizer: tokenizers.Tokenizer | TokenizerInfo) -> TokenizerInfo:
  return tokenizer if isinstance(tokenizer, TokenizerInfo) else TokenizerInfo.from_tokenizer(
      tokenizer)


# ---------------------------------------------------------------- training, saving, loading


def train_bpe(texts: Iterable[str], vocab_size: int,
              special_tokens: Sequence[str] = SPECIAL_TOKENS) -> tokenizers.Tokenizer:
  """Trains a byte-level BPE (GPT-2 style: no unknown tokens, exact round trip).

  Special tokens get the first ids in the given order (so ``<pad>`` is 0). The result depends
  only on the texts and their order (merge ties are broken by pair, not by hash order: the same
  ``tokenizer.json`` came out of separate processes in our checks).

  Args:
    texts: training texts (an iterator is consumed once).
    vocab_size: size including the 256 byte tokens and the special tokens.
    special_tokens: tokens never split or merged.
  """
  minimum = 256 + len(special_tokens)
  if vocab_size < minimum:
    raise UserError(f"BPE vocab_size={vocab_size} is below the {minimum} ids taken by the 256 "
                    f"bytes and {len(special_tokens)} special tokens")
  tokenizer = tokenizers.Tokenizer(models.BPE())
  tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tokenizer.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
      vocab_size=vocab_size, special_tokens=list(special_tokens), show_progress=False,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tokenizer.train_from_iterator(texts, trainer=trainer)
  return tokenizer


def save(tokenizer: tokenizers.Tokenizer | TokenizerInfo, directory: str | os.PathLike) -> str:
  """Writes ``tokenizer.json`` and a ``tokenizer_config.json`` that Hugging Face also reads.

  Returns:
    The directory written.
  """
  info = as_info(tokenizer)
  directory = os.fspath(directory)
  os.makedirs(directory, exist_ok=True)
  info.tokenizer.save(os.path.join(directory, "tokenizer.json"))
  config = {"tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": info.bos_token, "eos_token": info.eos_token,
            "pad_token": info.pad_token}
  if info.chat_template is not None:
    config["chat_template"] = info.chat_template
  with open(os.path.join(directory, "tokenizer_config.json"), "w", encoding="utf-8") as f:
    json.dump(config, f, indent=2, ensure_ascii=False)
  return directory


def _token_content(value, path: str, key: str) -> Optional[str]:
  """A special token as written in tokenizer_config.json: a string or an AddedToken dict."""
  if value is None or isinstance(value, str):
    return value
  if isinstance(value, dict) and isinstance(value.get("content"), str):
    return value["content"]
  raise UserError(f"{path}: '{key}' must be a string or an object with 'content', got {value!r}")


def load(path: str | os.PathLike) -> TokenizerInfo:
  """Loads a ``tokenizer.json`` file, or a directory holding one (a Hugging Face model dir).

  The directory's ``tokenizer_config.json`` supplies bos/eos/pad and ``chat_template`` (a
  string, or ``chat_template.jinja`` beside it as newer ``transformers`` versions write). A
  list of named templates uses the one named ``default``.
  """
  path = os.fspath(path)
  if os.path.isdir(path):
    directory, file = path, os.path.join(path, "tokenizer.json")
  else:
    directory, file = os.path.dirname(path) or ".", path
  if not os.path.isfile(file):
    raise UserError(f"tokenizer file not found: {file}")
  try:
    tokenizer = tokenizers.Tokenizer.from_file(file)
  except Exception as e:  # The Rust loader raises a plain Exception on bad JSON.
    raise UserError(f"{file}: not a valid tokenizer.json ({e})") from None
  info = TokenizerInfo.from_tokenizer(tokenizer)
  config_path = os.path.join(directory, "tokenizer_config.json")
  if os.path.isfile(config_path):
    try:
      with open(config_path, encoding="utf-8") as f:
        config = json.load(f)
    except json.JSONDecodeError as e:
      raise UserError(f"{config_path}: invalid JSON ({e})") from None
    template = config.get("chat_template")
    if isinstance(template, list):
      named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
      template = named.get("default")
    if template is not None and not isinstance(template, str):
      raise UserError(f"{config_path}: 'chat_template' must be a string, got {template!r:.80}")
    info = dataclasses.replace(
        info, chat_template=template,
        **{k: _token_content(config[k], config_path, k)
           for k in ("bos_token", "eos_token", "pad_token") if k in config})
  jinja_path = os.path.join(directory, "chat_template.jinja")
  if info.chat_template is None and os.path.isfile(jinja_path):
    with open(jinja_path, encoding="utf-8") as f:
      info = dataclasses.replace(info, chat_template=f.read())
  return info


# ---------------------------------------------------------------- chat templates


class ChatEncoding(NamedTuple):
  ids: np.ndarray  # [T] int32
  assistant_mask: np.ndarray  # [T] bool: tokens the target generates in assistant turns


def _check_turns(turns: Sequence[Turn]) -> None:
  for i, turn in enumerate(turns):
    if len(turn) != 2 or turn[0] not in _ROLE_TOKENS or not isinstance(turn[1], str):
      raise UserError(f"turn {i} must be (role, text) with role in {sorted(_ROLE_TOKENS)}, "
                      f"got {turn!r:.80}")


def _builtin_template(turns: Sequence[Turn], info: TokenizerInfo,
                      add_generation_prompt: bool) -> ChatEncoding:
  """``<bos>`` then ``<|role|>content<eos>`` per turn; ``<|assistant|>`` as generation prompt.

  Pieces are encoded one by one (special tokens bound every piece, so this equals encoding the
  joined text) which gives the mask without character offsets.
  """
  ids: list[int] = []
  mask: list[bool] = []

  def special(token: str) -> int:
    token_id = info.tokenizer.token_to_id(token)
    if token_id is None:
      raise UserError(f"the tokenizer has no {token!r} token and no chat_template; the "
                      f"built-in template needs {list(SPECIAL_TOKENS[1:])}")
    return token_id

  ids.append(special(info.bos_token or "<bos>"))
  mask.append(False)
  eos = special(info.eos_token or "<eos>")
  for role, content in turns:
    body = info.encode(content) + [eos]
    ids.append(special(_ROLE_TOKENS[role]))
    ids.extend(body)
    mask.append(False)
    mask.extend([role == "assistant"] * len(body))
  if add_generation_prompt:
    ids.append(special(_ROLE_TOKENS["assistant"]))
    mask.append(False)
  return ChatEncoding(np.asarray(ids, np.int32), np.asarray(mask, bool))


def _raise_exception(message):
  raise UserError(f"chat template: {message}")


def _jinja_environment():
  import jinja2.ext  # pylint: disable=g-import-not-at-top
  import jinja2.sandbox  # pylint: disable=g-import-not-at-top
  env = jinja2.sandbox.ImmutableSandboxedEnvironment(
      trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
  env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False, **_: json.dumps(
      x, indent=indent, ensure_ascii=ensure_ascii)
  env.globals["raise_exception"] = _raise_exception
  env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
  return env


_TEMPLATE_CACHE: dict[str, object] = {}


def render_chat_template(turns: Sequence[Turn], info: TokenizerInfo,
                         add_generation_prompt: bool = False) -> str:
  """The template's text for ``turns``, as ``transformers``' ``apply_chat_template`` renders it."""
  template = _TEMPLATE_CACHE.get(info.chat_template)
  if template is None:
    import jinja2  # pylint: disable=g-import-not-at-top
    try:
      template = _jinja_environment().from_string(info.chat_template)
    except jinja2.TemplateSyntaxError as e:
      raise UserError(f"chat_template: syntax error at line {e.lineno}: {e.message}") from None
    _TEMPLATE_CACHE[info.chat_template] = template
  messages = [{"role": role, "content": content} for role, content in turns]
  return template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                         bos_token=info.bos_token or "", eos_token=info.eos_token or "",
                         pad_token=info.pad_token or "")


def _assistant_spans(turns: Sequence[Turn], info: TokenizerInfo, text: str) -> list[tuple]:
  """Character spans of the assistant turns in ``text`` (content plus end-of-turn markers).

  Turn i's span runs from the end of the rendered prefix ``turns[:i]`` *with* the generation
  prompt to the end of the rendered ``turns[:i+1]``: exactly what the target would generate
  there. Templates that rewrite earlier turns (e.g. dropping past reasoning) break that prefix
  property; the span then falls back to the turn's content found in order in the text.
  """
  spans = []
  cursor = 0
  for i, (role, content) in enumerate(turns):
    if role != "assistant":
      continue
    try:
      before = render_chat_template(turns[:i], info, add_generation_prompt=True)
      upto = render_chat_template(turns[:i + 1], info)
      exact = text.startswith(upto) and upto.startswith(before) and len(before) >= cursor
    except Exception:  # pylint: disable=broad-except
      exact = False  # Templates may refuse a partial conversation.
    if exact:
      spans.append((len(before), len(upto)))
      cursor = len(upto)
      continue
    start = text.find(content, cursor) if content else -1
    if start < 0:
      logging.warning("chat template: cannot locate assistant turn %d in the rendered text; it "
                      "is left out of the assistant mask", i)
      continue
    logging.log_first_n(logging.WARNING, "chat template is not prefix-stable; assistant mask "
                        "covers the assistant content only", 1)
    spans.append((start, start + len(content)))
    cursor = start + len(content)
  return spans


def apply_chat_template(turns: Sequence[Turn], tokenizer_info: tokenizers.Tokenizer | TokenizerInfo,
                        add_generation_prompt: bool = False) -> ChatEncoding:
  """Token ids of a conversation and which of them belong to assistant turns.

  Args:
    turns: ``(role, content)`` pairs, role in system/user/assistant.
    tokenizer_info: a ``TokenizerInfo`` (its ``chat_template`` is used when set) or a bare
      tokenizer (built-in template).
    add_generation_prompt: end with the assistant header, ready for the model to answer.

  Returns:
    ``ChatEncoding(ids [T] int32, assistant_mask [T] bool)``. With a Jinja template a token is
    an assistant token when any of its characters lies in an assistant span (byte-level BPE
    glues a leading space to the word after it).
  """
  info = as_info(tokenizer_info)
  _check_turns(turns)
  if info.chat_template is None:
    return _builtin_template(turns, info, add_generation_prompt)
  text = render_chat_template(turns, info, add_generation_prompt)
  # The template writes bos itself; a post-processor must not add a second one.
  encoding = info.tokenizer.encode(text, add_special_tokens=False)
  offsets = np.asarray(encoding.offsets, np.int64).reshape(-1, 2)
  mask = np.zeros(len(encoding.ids), bool)
  for begin, end in _assistant_spans(turns, info, text):
    mask |= (offsets[:, 0] < end) & (offsets[:, 1] > begin)
  return ChatEncoding(np.asarray(encoding.ids, np.int32), mask)
