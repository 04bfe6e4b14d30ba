"""Target features computed once per training token (EAGLE's data-generation step).

A token-level EAGLE-3 step spends most of its time in the frozen target when the target is
much larger than the drafter (SmolLM2-135M: 30 layers vs the drafter's one). Computing what
the drafter's loss needs from the target once, and reading it back every epoch, makes every
later step cost the drafter only. Per training row of ``seq_len`` tokens the cache holds:

* ``tokens``, ``loss_mask`` (the packed rows of the input pipeline, one epoch, in order);
* ``feats``: the 3 fused hidden states, concatenated ``[T, 3 * Et]``;
* ``final``: the target's final-normed hidden ``[T, Et]``, so the target's logits on any set
  of tokens are ``final @ head[:, ids]`` (the draft vocabulary: a few thousand columns);
* ``lse``: the full-vocabulary logsumexp of the target's logits, so those logits become
  log-probabilities of the whole vocabulary (the loss need not renormalise on the draft one);
* ``argmax``: the target's greedy token (EAGLE-3 drops positions whose argmax is not drafted).

Where the target's context comes from (``context``): with 0, each packed row is run alone, as
a live training step sees it (a conversation cut by a row boundary continues without its
prompt, and a row's first document is read after the previous one's tail). With N > 0, each
document is run alone from its own start (positions from 0, up to N tokens of context; a longer
document is cut into N-token pieces), so every cached feature is what the target computes at
inference, and the features are then laid out in the packed rows.

Files are ``.npy`` (memory-mapped on read) in a directory named by a digest of everything that
shaped them; it appears complete or not at all (temp dir + rename).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from typing import Any, Iterator, Sequence

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from ppow_jax import cli, sharding
from ppow_jax.data import pipeline
from ppow_jax.data import tokenizer as tokenizer_lib
from ppow_jax.errors import UserError
from ppow_jax.models import llama

Array = jax.Array
FIELDS = ("tokens", "loss_mask", "feats", "final", "lse", "argmax")
BATCH_KEYS = {"tokens": "tokens_BxT", "loss_mask": "loss_mask_BxT", "feats": "feats_BxTx3E",
              "final": "final_BxTxE", "lse": "lse_BxT", "argmax": "argmax_BxT",
              "segments": "segment_ids_BxT"}  # segments: from the rows, not stored


def target_features(target_cfg: llama.ModelConfig, target_params, tokens_BxT: Array,
                    hidden_layers: Sequence[int], dtype=jnp.float32) -> dict:
  """What the drafter's loss reads from the target, for one batch (the cache's contents)."""
  model = llama.Decoder(target_cfg)
  out = model.apply({"params": target_params}, tokens_BxT, hidden_layers=tuple(hidden_layers)
                    + (target_cfg.num_layers,), return_logits=False, method=llama.Decoder.forward)
  *hidden, last_BxTxE = out.hidden_states
  logits_BxTxV = model.apply({"params": target_params}, last_BxTxE,
                             method=llama.Decoder.logits_from_hidden)
  final = model.apply({"params": target_params}, last_BxTxE,
                      method=lambda m, x: m.norm(x))
  return {"feats": jnp.concatenate(hidden, axis=-1).astype(dtype),
          "final": final.astype(dtype),
          "lse": jax.nn.logsumexp(logits_BxTxV, axis=-1).astype(jnp.float32),
          "argmax": jnp.argmax(logits_BxTxV, axis=-1).astype(jnp.int32)}


def target_head(target_cfg: llama.ModelConfig, target_params) -> Array:
  """The target's LM head ``[E, V]`` (the embedding's transpose when tied)."""
  if target_cfg.tie_embeddings:
    return jnp.asarray(target_params["embed_tokens"]).T
  return jnp.asarray(target_params["lm_head"])


def digest(*parts: Any, target_params=None) -> str:
  """A short key of ``parts`` (JSON-able or numpy arrays) and a strided sample of the
  target's weights."""
  h = hashlib.sha256()
  for part in parts:
    h.update(np.ascontiguousarray(part).tobytes() if isinstance(part, np.ndarray)
             else json.dumps(part, sort_keys=True, default=str).encode())
  for leaf in jax.tree_util.tree_leaves(target_params):
    h.update(sharding.strided_sample(leaf).tobytes())
  return h.hexdigest()[:16]


def packed_rows(source: Sequence[Any], tokenizer, seq_len: int, max_rows: int,
                locate: bool = True) -> dict[str, np.ndarray]:
  """One unshuffled epoch of the input pipeline's packed rows (rows with no loss token are
  dropped), at most ``max_rows``: ``tokens``, ``loss_mask``, ``segments`` (the pipeline's
  segment ids: the conversations of a row numbered from 1, padding 0), and with ``locate`` (what
  ``build`` needs for ``context`` > 0; it tokenises the documents once more) for every token
  its document (``doc``, an index into ``documents``; -1 on padding) and position in it
  (``pos``); ``documents`` holds the token ids of every document."""
  it = pipeline.make_train_iterator(source, tokenizer, seq_len, 1, 0, num_epochs=1,
                                    shuffle=False, num_threads=0)
  tokens, masks, segments, kept = [], [], [], []
  for r, batch in enumerate(it):
    if batch["loss_mask_BxT"].sum():
      tokens.append(batch["tokens_BxT"][0])
      masks.append(batch["loss_mask_BxT"][0])
      segments.append(batch["segment_ids_BxT"][0])
      kept.append(r)
    if len(tokens) == max_rows:
      break
  if not tokens:
    raise UserError("no training rows with loss tokens to compute target features for")
  rows = {"tokens": np.stack(tokens), "loss_mask": np.stack(masks),
          "segments": np.stack(segments)}
  if not locate:
    return rows
  info, docs, covered = tokenizer_lib.as_info(tokenizer), [], 0
  for i in range(len(source)):  # the documents the kept rows come from, in pipeline order
    if covered >= (kept[-1] + 1) * seq_len:
      break
    ids = pipeline.example_features(source[i], info)["tokens"]
    if len(ids):
      docs.append(ids)
      covered += len(ids)
  lengths = np.asarray([len(d) for d in docs], np.int64)
  n = int(lengths.sum())
  doc = np.full(-(-n // seq_len) * seq_len, -1, np.int32)
  pos = np.full_like(doc, -1)
  doc[:n] = np.repeat(np.arange(len(docs), dtype=np.int32), lengths)
  pos[:n] = np.arange(n) - np.repeat(np.cumsum(lengths) - lengths, lengths)
  doc, pos = doc.reshape(-1, seq_len)[kept], pos.reshape(-1, seq_len)[kept]
  tokens, flat = rows["tokens"], np.concatenate(docs)
  if not np.array_equal(np.where(doc >= 0, flat[_flat_index(lengths, doc, pos)], tokens), tokens):
    raise AssertionError("packed rows do not follow the documents in order")
  if not np.array_equal(np.diff(doc, axis=1) != 0, np.diff(rows["segments"], axis=1) != 0):
    raise AssertionError("the pipeline's segment ids do not follow the documents")
  return dict(rows, doc=doc, pos=pos, documents=docs)


def _flat_index(lengths: np.ndarray, doc: np.ndarray, pos: np.ndarray) -> np.ndarray:
  """Index into the concatenated documents of (doc, pos) (0 where doc < 0)."""
  starts = np.cumsum(lengths) - lengths
  return np.where(doc >= 0, starts[np.maximum(doc, 0)] + pos, 0)


def _pieces(rows: dict, context: int) -> list[tuple[int, int, int]]:
  """(document, start, length): pieces of at most ``context`` tokens that cover every
  position of every document up to the last one the rows use."""
  doc, pos = rows["doc"], rows["pos"]
  last = np.full(len(rows["documents"]), -1)
  np.maximum.at(last, doc[doc >= 0], pos[doc >= 0])
  return [(d, s, min(context, int(last[d]) + 1 - s)) for d in np.flatnonzero(last >= 0)
          for s in range(0, int(last[d]) + 1, context)]


def build(path: str, rows: dict, target_cfg: llama.ModelConfig, target_params,
          hidden_layers: Sequence[int], dtype: str = "float16", batch_size: int = 8,
          context: int = 0) -> dict[str, np.ndarray]:
  """Runs the target over ``rows`` and writes the cache to ``path`` (unless it exists).

  ``context`` 0: each row alone (``rows`` needs ``tokens``, ``loss_mask``); N > 0: each
  document alone from its start (``rows`` as ``packed_rows`` returns them; see the module
  docstring). A call runs about ``batch_size`` rows' worth of tokens."""
  if os.path.isdir(path):
    return load(path)
  np_dtype = np.dtype(dtype)
  fn = jax.jit(lambda p, t: target_features(target_cfg, p, t, hidden_layers))
  store = lambda k, v: v.astype(np_dtype) if v.dtype.kind == "f" and k != "lse" else v
  n, t = rows["tokens"].shape
  t0 = time.perf_counter()
  if context:
    out = _by_document(fn, target_params, rows, context, batch_size * t, store, t0)
  else:
    parts = {k: [] for k in FIELDS[2:]}
    for start in range(0, n, batch_size):
      chunk = rows["tokens"][start:start + batch_size]
      pad = batch_size - len(chunk)
      feats = sharding.to_host(fn(target_params, np.pad(chunk, ((0, pad), (0, 0)))))
      for k, v in feats.items():
        parts[k].append(store(k, v[:len(chunk)]))
      print(f"[features] {min(start + batch_size, n)}/{n} rows "
            f"({(start + len(chunk)) * t / (time.perf_counter() - t0):.0f} tokens/s)", flush=True)
    out = {k: np.concatenate(v) for k, v in parts.items()}
  rows = {k: rows[k] for k in FIELDS[:2]}
  arrays = dict(rows, **out)
  big = max(float(np.abs(arrays["feats"]).max()), float(np.abs(arrays["final"]).max()))
  if not np.isfinite(big):
    raise UserError(f"target features overflow {dtype}; set the feature cache dtype to float32")
  print(f"[features] the target's greedy token is the data's next token on "
        f"{greedy_agreement(arrays):.4f} of the loss targets (1.0 for its own greedy answers "
        f"seen in full context)", flush=True)
  if sharding.is_primary():  # every process computed the features; process 0 writes them
    tmp = cli.staging_dir(path)
    try:
      for k in FIELDS:
        np.save(os.path.join(tmp, k + ".npy"), arrays[k])
      os.rename(tmp, path)
    except BaseException:
      shutil.rmtree(tmp, ignore_errors=True)
      raise
  sharding.sync("feature cache written")
  logging.info("target features of %d x %d tokens cached in %s", n, t, path)
  return load(path)


def _by_document(fn, target_params, rows: dict, context: int, budget: int, store,
                 t0: float) -> dict[str, np.ndarray]:
  """The cache's feature fields ``[N, T, ...]`` with each document run alone (padding rows
  stay zero). Pieces are grouped by length rounded up to a power of two (few compiles)."""
  n, t = rows["tokens"].shape
  docs = rows["documents"]
  lengths = np.asarray([len(d) for d in docs], np.int64)
  # where each (document, position) lands in the rows, -1 where no kept row holds it
  slot = np.full(int(lengths.sum()), -1, np.int64)
  used = rows["doc"] >= 0
  slot[_flat_index(lengths, rows["doc"], rows["pos"])[used]] = np.flatnonzero(used.ravel())
  starts = np.cumsum(lengths) - lengths
  pieces = _pieces(rows, context)
  out, done, total = {}, 0, sum(p[2] for p in pieces)
  by_len = {}
  for p in pieces:
    by_len.setdefault(min(context, 1 << max(int(p[2] - 1).bit_length(), 4)), []).append(p)
  for width, group in sorted(by_len.items()):
    per_call = max(1, budget // width)
    for i in range(0, len(group), per_call):
      batch = group[i:i + per_call]
      ids = np.zeros((per_call, width), np.int32)
      for j, (d, s, m) in enumerate(batch):
        ids[j, :m] = docs[d][s:s + m]
      feats = sharding.to_host(fn(target_params, ids))
      for k, v in feats.items():
        if k not in out:
          out[k] = np.zeros((n * t,) + v.shape[2:], store(k, v[:0]).dtype)
        for j, (d, s, m) in enumerate(batch):
          to = slot[starts[d] + s:starts[d] + s + m]
          out[k][to[to >= 0]] = store(k, v[j, :m][to >= 0])
      done += sum(p[2] for p in batch)
      print(f"[features] {done}/{total} document tokens "
            f"({done / (time.perf_counter() - t0):.0f} tokens/s)", flush=True)
  return {k: v.reshape((n, t) + v.shape[1:]) for k, v in out.items()}


def greedy_agreement(cache: dict[str, np.ndarray]) -> float:
  """Fraction of loss targets (token t+1 with loss mask 1) equal to the target's argmax at t."""
  targets = np.asarray(cache["loss_mask"])[:, 1:].astype(bool)
  hits = np.asarray(cache["argmax"])[:, :-1] == np.asarray(cache["tokens"])[:, 1:]
  return float(hits[targets].mean()) if targets.any() else float("nan")


def load(path: str) -> dict[str, np.ndarray]:
  missing = [k for k in FIELDS if not os.path.isfile(os.path.join(path, k + ".npy"))]
  if missing:
    raise UserError(f"{path}: feature cache is missing {missing[0]}.npy; delete the directory")
  return {k: np.load(os.path.join(path, k + ".npy"), mmap_mode="r") for k in FIELDS}


class Rows:
  """Rows of a (memory-mapped) array, read when indexed: placing a batch of them on the mesh
  (``sharding.global_batch``) reads only the rows of this host's devices."""

  def __init__(self, array: np.ndarray, rows: np.ndarray):
    self._array, self._rows = array, rows
    self.shape = (len(rows),) + tuple(array.shape[1:])
    self.dtype = array.dtype

  def __getitem__(self, index) -> np.ndarray:
    index = index if isinstance(index, tuple) else (index,)
    return np.asarray(self._array[self._rows[index[0]]])[(slice(None),) + index[1:]]

  def __array__(self, dtype=None, copy=None) -> np.ndarray:
    out = np.asarray(self._array[self._rows])
    return out if dtype is None else out.astype(dtype)


class CachedIterator:
  """Shuffled batches of cached rows (every field of ``BATCH_KEYS`` that ``cache`` holds),
  a fresh permutation each epoch (seeded); the state is
  two integers, so ``trainer.run`` resumes the exact stream. ``lazy``: batches of ``Rows``,
  read when placed, instead of numpy arrays."""

  def __init__(self, cache: dict[str, np.ndarray], batch_size: int, seed: int,
               lazy: bool = False):
    self._cache, self._batch, self._seed, self._lazy = cache, batch_size, seed, lazy
    self._fields = [k for k in BATCH_KEYS if k in cache]
    self._n = len(cache["tokens"])
    if self._n < 1:
      raise UserError("the feature cache holds no rows")
    self._epoch, self._pos = 0, 0

  def __iter__(self) -> Iterator[dict]:
    return self

  def _order(self, epoch: int) -> np.ndarray:
    return np.random.default_rng([self._seed, epoch]).permutation(self._n)

  def __next__(self) -> dict[str, np.ndarray]:
    idx = []
    while len(idx) < self._batch:
      take = self._order(self._epoch)[self._pos:self._pos + self._batch - len(idx)]
      idx.extend(take.tolist())
      self._pos += len(take)
      if self._pos >= self._n:
        self._epoch, self._pos = self._epoch + 1, 0
    idx = np.sort(np.asarray(idx))  # memory-mapped reads in file order
    if self._lazy:
      return {BATCH_KEYS[k]: Rows(self._cache[k], idx) for k in self._fields}
    return {BATCH_KEYS[k]: np.asarray(self._cache[k][idx]) for k in self._fields}

  def get_state(self) -> dict:
    return {"epoch": self._epoch, "pos": self._pos}

  def set_state(self, state: dict) -> None:
    self._epoch, self._pos = int(state["epoch"]), int(state["pos"])
