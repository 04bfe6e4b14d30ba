"""The data stage of a run: sources, tokenizer and iterators, from ``config.data``.

Sources, in order of precedence: synthesized instructions to be answered by the target
(``data.instructions``, self-distillation), a prepared TFDS dataset by name, a JSONL
conversations file, or a text corpus ("stdlib" = this Python's own standard library sources, read at run
time; nothing is copied into the repository). The tokenizer is the configured one, else the
HF target's, else a byte-level BPE trained here on the train split and cached in the workdir.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sysconfig
from typing import Any, Optional, Sequence

from absl import logging
import jax

from ppow_jax import feature_cache, layout, self_instruct, sharding
from ppow_jax.data import benchmarks, builders, instructions, pipeline, prompts
from ppow_jax.data import tokenizer as tokenizer_lib
from ppow_jax.errors import UserError
from ppow_jax.models import gguf_convert


@dataclasses.dataclass
class Data:
  train: Sequence[Any]  # random-access documents
  heldout: Sequence[Any]
  tokenizer: tokenizer_lib.TokenizerInfo
  kind: str  # "text" | "conversations"
  description: str


def _corpus_source(c) -> str:
  if c.data.corpus == "stdlib":
    return sysconfig.get_paths()["stdlib"]
  return c.data.corpus


def _instruction_sources(c) -> tuple[dict, str, str]:
  """User turns with empty answers; ``regenerate`` has the target answer them."""
  d = c.data
  if d.instructions == "stdlib":
    items = instructions.from_python_sources(sysconfig.get_paths()["stdlib"], tuple(d.exclude))
  else:
    items = instructions.from_jsonl(d.instructions, d.skip_bad_lines)
  train, heldout = instructions.select(items, d.num_instructions, d.heldout_fraction, c.seed,
                                       d.heldout_instructions)
  return ({"train": instructions.as_conversations(train),
           "heldout": instructions.as_conversations(heldout)}, "conversations",
          f"{len(train)} instructions from {d.instructions}")


def _sources(c, paths: layout.Layout) -> tuple[dict, str, str]:
  data_dir = paths.tfds
  if c.data.instructions:
    return _instruction_sources(c)
  if c.data.tfds_name:
    builder = builders.load_prepared(c.data.tfds_name, c.data.tfds_data_dir or data_dir)
    splits = dict(builder.as_data_source())
    kind = "conversations" if "contents" in builder.info.features else "text"
    return splits, kind, f"TFDS {c.data.tfds_name}"
  if c.data.conversations:
    builder = builders.Conversations(source=c.data.conversations,
                                     skip_bad_lines=c.data.skip_bad_lines,
                                     heldout_fraction=c.data.heldout_fraction,
                                     data_dir=data_dir)
    return builders.prepare(builder), "conversations", f"conversations {c.data.conversations}"
  source = _corpus_source(c)
  if not os.path.exists(source) and not any(ch in source for ch in "*?["):
    raise UserError(f"config.data.corpus: {source!r} does not exist")
  builder = builders.TextCorpus(source=source, include=c.data.include,
                                exclude=tuple(c.data.exclude),
                                heldout_fraction=c.data.heldout_fraction, data_dir=data_dir)
  return builders.prepare(builder), "text", f"corpus {source} ({c.data.include})"


def _turns(example: Any) -> list[prompts.Turn]:
  """Turns of a TFDS conversation example, or of a turn list (synthesized / regenerated)."""
  if isinstance(example, (list, tuple)):
    return [(str(r), str(t)) for r, t in example]
  return builders.example_turns(example)


def document_text(example: Any, kind: str) -> str:
  if kind == "conversations":
    return "\n".join(content for _, content in _turns(example))
  value = example["text"] if isinstance(example, dict) else example
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def given_tokenizer(c) -> Optional[tokenizer_lib.TokenizerInfo]:
  """``data.tokenizer``, else the target's (``target.hf_dir``); None when the run trains its
  own BPE."""
  if c.data.tokenizer:
    return tokenizer_lib.load(c.data.tokenizer)
  if c.target.hf_dir:
    return tokenizer_lib.load(gguf_convert.resolve(c.target.hf_dir))
  return None


def _tokenizer(c, paths: layout.Layout, train: Sequence[Any], kind: str
               ) -> tokenizer_lib.TokenizerInfo:
  given = given_tokenizer(c)
  if given is not None:
    return given
  tok_dir = paths.tokenizer
  if os.path.isfile(os.path.join(tok_dir, "tokenizer.json")):
    return tokenizer_lib.load(tok_dir)
  n = min(len(train), c.data.tokenizer_train_docs)
  stride = max(len(train) // max(n, 1), 1)
  texts = (document_text(train[i * stride], kind) for i in range(n))
  logging.info("training a %d-token BPE on %d documents", c.data.tokenizer_vocab_size, n)
  tok = tokenizer_lib.train_bpe(texts, c.data.tokenizer_vocab_size)
  tmp = tok_dir + ".tmp"  # only process 0 gets here (``load``: the others find its BPE)
  tokenizer_lib.save(tok, tmp)
  os.replace(tmp, tok_dir)
  return tokenizer_lib.load(tok_dir)


def load(c, paths: layout.Layout) -> Data:
  """The sources and the tokenizer. Process 0 prepares what is written to the workdir (TFDS
  files, the BPE) before the other processes read it."""
  with sharding.primary_first("data prepared"):
    splits, kind, description = _sources(c, paths)
    if "train" not in splits or len(splits["train"]) == 0:
      raise UserError(f"{description}: the train split is empty")
    heldout = splits.get("heldout") or splits.get("test") or splits.get("validation") or []
    tok = _tokenizer(c, paths, splits["train"], kind)
  return Data(splits["train"], heldout, tok, kind, description)


def train_iterator(data: Data, seq_len: int, global_batch: int, seed: int
                   ) -> pipeline.TrainIterator:
  """The global batches, the same on every host: tokenising and packing is cheap next to a
  step, and so the stream (hence the run) does not depend on the number of hosts, and one
  iterator state, saved by process 0, resumes every host. Each host places only its own rows
  on its devices (``Parallel.place_batch``)."""
  return pipeline.make_train_iterator(data.train, data.tokenizer, seq_len, global_batch, seed,
                                      num_threads=0)


def eval_prompt_sets(c, data: Data) -> dict[str, list[list[int]]]:
  """``{name: token-id prompts}``: each of ``eval.benchmarks`` (a fixed, evenly spread subset
  of ``eval.num_prompts``, under the target's chat template), else one set from
  ``eval.prompts_file`` or the held-out split."""
  if not c.eval.benchmarks.strip(", "):
    return {"prompts_file" if c.eval.prompts_file else "heldout": eval_prompts(c, data)}
  return benchmark_prompt_sets(c, data.tokenizer)


def benchmark_prompt_sets(c, tokenizer: tokenizer_lib.TokenizerInfo
                          ) -> dict[str, list[list[int]]]:
  """The prompt sets of ``eval.benchmarks``, sized and fitted by ``c.eval``."""
  return benchmarks.prompt_sets(c.eval.benchmarks, tokenizer, c.eval.num_prompts,
                                c.eval.prompt_len, c.eval.prompt_policy)


def file_prompts(c, info: tokenizer_lib.TokenizerInfo) -> list[list[int]]:
  """The first ``eval.num_prompts`` conversations of ``eval.prompts_file``, under the chat
  template and ending with the assistant header, fitted into ``eval.prompt_len`` tokens."""
  out = []
  records = prompts.read_prompts(c.eval.prompts_file, c.data.skip_bad_lines)
  for turns in records[:c.eval.num_prompts]:
    ids = tokenizer_lib.apply_chat_template(turns, info, add_generation_prompt=True).ids
    out.append(list(prompts.truncate_prompt([int(i) for i in ids], c.eval.prompt_len,
                                            c.eval.prompt_policy)))
  return out


def eval_prompts(c, data: Data) -> list[list[int]]:
  """Token-id prompts: from ``eval.prompts_file``, else the held-out split's documents."""
  info, n, max_len = data.tokenizer, c.eval.num_prompts, c.eval.prompt_len
  out = []
  if c.eval.prompts_file:
    return file_prompts(c, info)
  if data.kind == "conversations" and len(data.heldout):
    for i in range(min(n, len(data.heldout))):  # held-out chats: the prompt before the answer
      turns = [t for t in _turns(data.heldout[i]) if t[0] != "assistant"]
      ids = tokenizer_lib.apply_chat_template(turns, info, add_generation_prompt=True).ids
      out.append(list(prompts.truncate_prompt([int(i) for i in ids], max_len,
                                              c.eval.prompt_policy)))
  else:
    if not len(data.heldout):
      raise UserError(f"{data.description}: no held-out split for evaluation prompts; set "
                      "config.data.heldout_fraction > 0 or config.eval.prompts_file")
    bos = [info.bos_id] if info.bos_id is not None else []
    for i in range(len(data.heldout)):
      ids = info.encode(document_text(data.heldout[i], data.kind))
      # a window into the file, so that prompts are not all file headers
      start = (len(ids) // 3) if len(ids) > 3 * max_len else 0
      ids = bos + ids[start:start + max_len - len(bos)]
      if len(ids) >= max_len // 2:
        out.append(ids)
      if len(out) == n:
        break
  if not out:
    raise UserError("no evaluation prompts could be built (held-out documents too short?)")
  return out


def _answers_path(c, cache_dir: str, tokenizer, target_params) -> str:
  """The answer store of one target and decoding setting: named by the target's weights (a
  strided sample of every tensor), the tokenizer and the decoding settings."""
  key = feature_cache.digest({"max_new_tokens": c.data.regenerate_max_new_tokens,
                              "vocab": tokenizer.vocab_size, "eos": tokenizer.eos_id},
                             target_params=target_params)
  return os.path.join(cache_dir, f"answers-{key}.jsonl")


def _conversation_key(turns: Sequence[prompts.Turn]) -> str:
  return feature_cache.digest([list(t) for t in turns])


def _read_rows(path: str) -> list[dict]:
  """The rows of an append-only JSONL store; a torn line (an interrupted append) is skipped,
  so an interrupted run resumes where it stopped."""
  rows = []
  if os.path.isfile(path):
    with open(path) as f:
      for line in f:
        try:
          rows.append(json.loads(line))
        except json.JSONDecodeError:
          continue
  return rows


def _append_rows(path: str, rows: Sequence[dict]) -> None:
  """Appends whole lines and syncs them: what was written survives an interruption."""
  if not sharding.is_primary() or not rows:
    return
  os.makedirs(os.path.dirname(path), exist_ok=True)
  torn = False
  if os.path.isfile(path) and os.path.getsize(path):
    with open(path, "rb") as f:
      f.seek(-1, os.SEEK_END)
      torn = f.read(1) != b"\n"
  with open(path, "a") as f:
    f.write("\n" * torn + "".join(json.dumps(r) + "\n" for r in rows))
    f.flush()
    os.fsync(f.fileno())


def self_requests(c, data: Data, target_cfg, target_params, cache: str) -> list[str]:
  """``data.self_instructions`` requests written by the target (``self_instruct``), stored
  round by round under a key of the target, its template prefix and the sampling settings
  (not the count: a larger count, or an interrupted run, continues the same store)."""
  from ppow_jax import engine  # deferred: the data stage does not otherwise need JAX models
  d = c.data
  prefix = self_instruct.user_prefix(data.tokenizer)
  key = feature_cache.digest({"batch": d.regenerate_batch_size, "seed": c.seed, "prefix": prefix,
                              "temperature": d.self_instruct_temperature,
                              "max_tokens": d.self_instruct_max_tokens},
                             target_params=target_params)
  path = os.path.join(cache, f"self-instruct-{key}.jsonl")
  done = [(r["round"], r["request"]) for r in _read_rows(path)]
  if len(done) >= d.self_instructions:
    logging.info("reusing self-written requests from %s", path)
    return [text for _, text in done][:d.self_instructions]
  eng = engine.Engine(target_cfg, None, engine.DecodeConfig(
      max_new_tokens=d.self_instruct_max_tokens, temperature=d.self_instruct_temperature,
      eos_ids=(data.tokenizer.eos_id,)))
  base = jax.random.PRNGKey(c.seed + 7)
  decoding = engine.decoding_params(target_params)  # the store's key stays the params' own

  def generate_fn(prompt_ids: list[list[int]], round_index: int) -> list[list[int]]:
    padded, lens = engine.pad_prompts(prompt_ids)
    return eng.generate(decoding, None, padded, lens,
                        jax.random.fold_in(base, round_index)).new_tokens()

  def store(round_index: int, kept: list[str]) -> None:
    _append_rows(path, [{"round": round_index, "request": t} for t in kept])

  requests = self_instruct.sample_requests(generate_fn, data.tokenizer, d.self_instructions,
                                           d.regenerate_batch_size, done=done, on_round=store)
  return requests


def cache_dir(c, paths: layout.Layout) -> str:
  """Where derived data (regenerated answers, target features) is kept between runs."""
  return c.data.cache_dir or paths.cache


def regenerate(c, data: Data, target_cfg, target_params, batch_size: int = 0,
               paths: Optional[layout.Layout] = None) -> Data:
  """Replace the assistant turns of the training conversations with the target's own answers.

  Greedy, batched, with the engine's AR path on the decoding layout of the weights
  (``engine.decoding_params``). Drafters trained on the target's own outputs accept more (the
  EAGLE maintainers' first remedy). With ``paths`` every answered batch is
  appended to a store in ``cache_dir`` (one per target and decoding setting, keyed per
  conversation), so reruns, larger datasets and interrupted runs reuse what was answered.
  ``data.self_instructions`` adds requests the target writes itself (``self_requests``).
  """
  if not (c.data.regenerate or c.data.instructions or c.data.self_instructions):
    return data
  if data.kind != "conversations":
    key = "self_instructions" if c.data.self_instructions else "regenerate"
    raise UserError(f"config.data.{key} needs conversation data (config.data.instructions, "
                    "config.data.conversations or a conversations TFDS dataset), not a text "
                    "corpus")
  batch_size = batch_size or c.data.regenerate_batch_size
  conversations = [_turns(data.train[i]) for i in range(len(data.train))]
  cache = cache_dir(c, paths) if paths is not None else ""
  if c.data.self_instructions:
    if not cache:
      raise UserError("config.data.self_instructions needs a workdir (its requests are cached)")
    conversations += [[("user", r), ("assistant", "")]
                      for r in self_requests(c, data, target_cfg, target_params, cache)]
  keys = [_conversation_key(t) for t in conversations]
  path = _answers_path(c, cache, data.tokenizer, target_params) if cache else ""
  answers = {r["key"]: [tuple(t) for t in r["turns"]] for r in _read_rows(path)} if path else {}
  todo = [i for i, k in enumerate(keys) if k not in answers]
  if answers:
    logging.info("reusing %d regenerated conversations from %s", len(keys) - len(todo), path)
  if todo:
    _answer(c, data, target_cfg, target_params, batch_size,
            [conversations[i] for i in todo], [keys[i] for i in todo], answers, path)
  return dataclasses.replace(data, train=[answers[k] for k in keys],
                             description=data.description + " (answered by the target)")


def _answer(c, data: Data, target_cfg, target_params, batch_size: int, todo: list,
            keys: list[str], answers: dict, path: str) -> None:
  """Answers ``todo`` greedily in batches into ``answers``, appending each batch to ``path``."""
  from ppow_jax import engine  # deferred: the data stage does not otherwise need JAX models
  eos = (data.tokenizer.eos_id,) if data.tokenizer.eos_id is not None else ()
  eng = engine.Engine(target_cfg, None, engine.DecodeConfig(
      max_new_tokens=c.data.regenerate_max_new_tokens, eos_ids=eos))
  rng = jax.random.PRNGKey(c.seed)
  done = [0]
  decoding = engine.decoding_params(target_params)

  def generate_fn(prompt_ids: list[list[int]]) -> list[list[int]]:
    rows = len(prompt_ids)
    padded, lens = engine.pad_prompts(prompt_ids + [prompt_ids[-1]] * (batch_size - rows),
                                      multiple=64)
    out = eng.generate(decoding, None, padded, lens, rng).new_tokens()[:rows]
    done[0] += rows
    print(f"[data] answered {done[0]}/{len(todo)}", flush=True)
    return out

  logging.info("regenerating the assistant turns of %d conversations", len(todo))
  for start in range(0, len(todo), batch_size):
    answered = pipeline.regenerate_responses(todo[start:start + batch_size], generate_fn,
                                             data.tokenizer, batch_size)
    answers.update(zip(keys[start:start + batch_size], answered))
    if path:
      _append_rows(path, [{"key": k, "turns": t}
                          for k, t in zip(keys[start:start + batch_size], answered)])
