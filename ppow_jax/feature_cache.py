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
from ppow_jax.errors import UserError
from ppow_jax.models import llama

Array = jax.Array
FIELDS = ("tokens", "loss_mask", "feats", "final", "lse", "argmax")
BATCH_KEYS = {"tokens": "tokens_BxT", "loss_mask": "loss_mask_BxT", "feats": "feats_BxTx3E",
              "final": "final_BxTxE", "lse": "lse_BxT", "argmax": "argmax_BxT"}


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


def packed_rows(source: Sequence[Any], tokenizer, seq_len: int, max_rows: int
                ) -> dict[str, np.ndarray]:
  """One unshuffled epoch of the input pipeline's packed rows (rows with no loss token are
  dropped), at most ``max_rows``."""
  it = pipeline.make_train_iterator(source, tokenizer, seq_len, 1, 0, num_epochs=1,
                                    shuffle=False, num_threads=0)
  tokens, masks = [], []
  for batch in it:
    if batch["loss_mask_BxT"].sum():
      tokens.append(batch["tokens_BxT"][0])
      masks.append(batch["loss_mask_BxT"][0])
    if len(tokens) == max_rows:
      break
  if not tokens:
    raise UserError("no training rows with loss tokens to compute target features for")
  return {"tokens": np.stack(tokens), "loss_mask": np.stack(masks)}


def build(path: str, rows: dict[str, np.ndarray], target_cfg: llama.ModelConfig,
          target_params, hidden_layers: Sequence[int], dtype: str = "float16",
          batch_size: int = 8) -> dict[str, np.ndarray]:
  """Runs the target over ``rows`` and writes the cache to ``path`` (unless it exists)."""
  if os.path.isdir(path):
    return load(path)
  np_dtype = np.dtype(dtype)
  fn = jax.jit(lambda p, t: target_features(target_cfg, p, t, hidden_layers))
  n, t = rows["tokens"].shape
  out = {k: [] for k in FIELDS[2:]}
  t0 = time.perf_counter()
  for start in range(0, n, batch_size):
    chunk = rows["tokens"][start:start + batch_size]
    pad = batch_size - len(chunk)
    feats = sharding.to_host(fn(target_params, np.pad(chunk, ((0, pad), (0, 0)))))
    for k, v in feats.items():
      v = v[:len(chunk)]
      out[k].append(v.astype(np_dtype) if v.dtype.kind == "f" and k != "lse" else v)
    print(f"[features] {min(start + batch_size, n)}/{n} rows "
          f"({(start + len(chunk)) * t / (time.perf_counter() - t0):.0f} tokens/s)", flush=True)
  arrays = dict(rows, **{k: np.concatenate(v) for k, v in out.items()})
  big = max(float(np.abs(arrays["feats"]).max()), float(np.abs(arrays["final"]).max()))
  if not np.isfinite(big):
    raise UserError(f"target features overflow {dtype}; set the feature cache dtype to float32")
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
  """Shuffled batches of cached rows, a fresh permutation each epoch (seeded); the state is
  two integers, so ``trainer.run`` resumes the exact stream. ``lazy``: batches of ``Rows``,
  read when placed, instead of numpy arrays."""

  def __init__(self, cache: dict[str, np.ndarray], batch_size: int, seed: int,
               lazy: bool = False):
    self._cache, self._batch, self._seed, self._lazy = cache, batch_size, seed, lazy
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
      return {BATCH_KEYS[k]: Rows(self._cache[k], idx) for k in FIELDS}
    return {BATCH_KEYS[k]: np.asarray(self._cache[k][idx]) for k in FIELDS}

  def get_state(self) -> dict:
    return {"epoch": self._epoch, "pos": self._pos}

  def set_state(self, state: dict) -> None:
    self._epoch, self._pos = int(state["epoch"]), int(state["pos"])
