"""The two drafter kinds behind one small interface, as pure functions of their parameters.

The engine (``ppow_jax/engine.py``) keeps a committed-token buffer per row and calls:

* ``sync(...)`` after the prompt prefill and after every verification, with the tokens the
  target just committed (and, for EAGLE-3, the target's hidden states at those positions);
* ``draft(...)`` to propose a window of K tokens, returning the tokens, their draft logits
  (mapped into the *target* vocabulary) and the new drafter state.

Invariants (n = number of committed tokens in a row, the last one still "pending"):

* Independent LM drafter: its KV cache is valid for positions ``< n - 2`` at the start of a
  draft. A draft feeds ``[tok[n-2], tok[n-1]]`` at positions ``n-2, n-1`` (rewriting slot
  ``n-2`` with identical values when it was already there), so rows that accepted different
  numbers of tokens need no ragged feed.
* EAGLE-3 drafter: its entry j pairs the target feature of position j with token j+1 and
  predicts token j+2. ``sync`` feeds the newly committed entries at the row's offset and keeps
  the output (hidden state and logits) of the last one, which proposes the first draft token;
  the K-1 feedback steps of ``draft`` (the drafter's own hidden state) are rolled back after.
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct
from typing import Any, Optional, Union

import flax
import jax
import jax.numpy as jnp

from ppow_jax import sampling
from ppow_jax.errors import UserError
from ppow_jax.models import eagle3, eagle3_io, hf, kv_cache, llama

Array = jax.Array


@flax.struct.dataclass
class DraftState:
  cache: kv_cache.KVCache
  hidden_BxE: Optional[Array] = None  # EAGLE-3: output of the last synced entry
  logits_BxV: Optional[Array] = None  # EAGLE-3: target-vocab logits of that entry


def _gather_rows(x_BxTx_: Array, idx_B: Array) -> Array:
  return jnp.take_along_axis(x_BxTx_, idx_B[:, None, None], axis=1)[:, 0]


def _draft_chain(first_logits_BxV: Array, step_fn, carry: Any, rng: Array, window: int,
                 temperature: float, top_p: float, forced_BxK: Optional[Array] = None):
  """Sample token 1 from ``first_logits``, then K-1 times feed it back through ``step_fn``.

  With ``forced_BxK`` the chain follows those tokens instead of sampling: PPOW re-scores the
  windows of a rollout under the current parameters this way.
  """
  keys = jax.random.split(rng, window)
  if forced_BxK is None:
    forced_KxB = jnp.full((window, first_logits_BxV.shape[0]), -1, jnp.int32)
  else:
    forced_KxB = forced_BxK.T.astype(jnp.int32)

  def pick(logits_BxV, key, forced_B):
    if forced_BxK is not None:
      return forced_B
    if temperature == 0:  # no vocabulary-wide noise to draw (same token as sampling one-hot)
      return sampling.greedy(logits_BxV)
    probs_BxV = sampling.probs_from_logits(logits_BxV, temperature, top_p)
    return sampling.sample(key, probs_BxV).astype(jnp.int32)

  tok_B = pick(first_logits_BxV, keys[0], forced_KxB[0])

  def body(state, xs):
    carry, tok_B = state
    key, forced_B = xs
    carry, logits_BxV = step_fn(carry, tok_B)
    new_tok_B = pick(logits_BxV, key, forced_B)
    return (carry, new_tok_B), (new_tok_B, logits_BxV)

  (carry, _), (toks_KmxB, logits_KmxBxV) = jax.lax.scan(
      body, (carry, tok_B), (keys[1:], forced_KxB[1:]))
  tokens_BxK = jnp.concatenate([tok_B[:, None], toks_KmxB.T], axis=1)
  logits_BxKxV = jnp.concatenate([first_logits_BxV[:, None], logits_KmxBxV.swapaxes(0, 1)], 1)
  return tokens_BxK, logits_BxKxV, carry


@dataclasses.dataclass(frozen=True)
class LMDrafter:
  """An independent small LM with the target's tokenizer (the same decoder class)."""
  cfg: llama.ModelConfig
  target_hidden_layers: tuple = ()

  @property
  def model(self) -> llama.Decoder:
    return llama.Decoder(self.cfg)

  def init_state(self, batch: int, max_length: int) -> DraftState:
    return DraftState(llama.init_cache(self.cfg, batch, max_length))

  def prefill(self, params, target_params, state: DraftState, prompts_BxP: Array,
              prompt_len_B: Array, hidden: tuple) -> DraftState:
    """Write the prompts into the drafter's cache (the first draft re-feeds the last two)."""
    del target_params, prompt_len_B, hidden
    out = self.model.apply({"params": params}, prompts_BxP, cache=state.cache,
                           return_logits=False, method=llama.Decoder.forward)
    return state.replace(cache=out.cache)

  def sync(self, params, target_params, state: DraftState, tokens_BxC: Array, start_B: Array,
           count_B: Array, hidden: tuple) -> DraftState:
    """Nothing to do: the draft pass already cached every accepted token."""
    del params, target_params, tokens_BxC, start_B, count_B, hidden
    return state

  def draft(self, params, target_params, state: DraftState, buffer_BxN: Array, n_B: Array,
            rng: Array, window: int, temperature: float, top_p: float,
            forced_BxK: Optional[Array] = None):
    """K draft tokens after the n committed ones, their target-vocab logits, the new state."""
    del target_params
    model = self.model
    # feed tokens n-2, n-1; a one-token prompt (n=1) feeds token 0 and a junk slot 1 that the
    # first draft token overwrites
    start_B = jnp.maximum(n_B - 2, 0)
    last2_BxT = jnp.take_along_axis(buffer_BxN, start_B[:, None] + jnp.arange(2)[None], 1)
    out = model.apply({"params": params}, last2_BxT, cache=state.cache.replace(lengths_B=start_B),
                      method=llama.Decoder.forward)
    last_BxV = _gather_rows(out.logits_BxTxV, n_B - 1 - start_B)
    cache = out.cache.replace(lengths_B=n_B)

    def step(cache, tok_B):
      o = model.apply({"params": params}, tok_B[:, None], cache=cache,
                      method=llama.Decoder.forward)
      return o.cache, o.logits_BxTxV[:, -1]

    tokens_BxK, logits_BxKxV, cache = _draft_chain(
        last_BxV, step, cache, rng, window, temperature, top_p, forced_BxK)
    return tokens_BxK, logits_BxKxV, state.replace(cache=cache)


@dataclasses.dataclass(frozen=True)
class Eagle3FeatureDrafter:
  """EAGLE-3: fuses three target hidden states, drafts with its own hidden state fed back."""
  cfg: eagle3.Eagle3Config
  target_cfg: llama.ModelConfig
  target_hidden_layers: tuple = ()

  @classmethod
  def create(cls, cfg: eagle3.Eagle3Config, target_cfg: llama.ModelConfig):
    """Params for this drafter are ``{"net": Eagle3Drafter params, "vocab": DraftVocab}``."""
    return cls(cfg, target_cfg, tuple(cfg.aux_layer_ids or target_cfg.eagle3_layers()))

  @property
  def model(self) -> eagle3.Eagle3Drafter:
    return eagle3.Eagle3Drafter(self.cfg)

  def init_state(self, batch: int, max_length: int) -> DraftState:
    return DraftState(llama.init_cache(self.cfg.layer_config(), batch, max_length),
                      jnp.zeros((batch, self.cfg.hidden_size), jnp.float32),
                      jnp.zeros((batch, self.cfg.vocab_size), jnp.float32))

  def _embed(self, target_params, tokens):
    return llama.Decoder(self.target_cfg).apply({"params": target_params}, tokens,
                                                method=llama.Decoder.embed)

  def _target_logits(self, params, logits_Vd):
    return params["vocab"].target_logits(logits_Vd, self.cfg.vocab_size)

  def prefill(self, params, target_params, state: DraftState, prompts_BxP: Array,
              prompt_len_B: Array, hidden: tuple) -> DraftState:
    """Entries 0..P-2: feature j with token j+1; the last proposes the first draft token.

    (A one-token prompt has no entry: its first window is drafted from junk, which costs
    acceptance, never correctness.)
    """
    next_BxP = jnp.concatenate([prompts_BxP[:, 1:], prompts_BxP[:, :1]], axis=1)
    return self.sync(params, target_params, state, next_BxP, jnp.zeros_like(prompt_len_B),
                     prompt_len_B - 1, hidden)

  def sync(self, params, target_params, state: DraftState, tokens_BxC: Array, start_B: Array,
           count_B: Array, hidden: tuple) -> DraftState:
    """Feed entries (feature of position start+c, token start+c+1) for c < count."""
    model = self.model
    net = params["net"]
    fused_BxCxE = model.apply({"params": net}, hidden, method=eagle3.Eagle3Drafter.fuse)
    embeds_BxCxE = self._embed(target_params, tokens_BxC)
    cache = state.cache.replace(lengths_B=start_B)
    h_BxCxE, logits_BxCxVd, cache = model.apply(
        {"params": net}, embeds_BxCxE, fused_BxCxE, cache=cache,
        method=eagle3.Eagle3Drafter.step)
    last_B = jnp.maximum(count_B, 1) - 1
    cache = cache.replace(lengths_B=start_B + count_B)
    logits_BxV = self._target_logits(params, _gather_rows(logits_BxCxVd, last_B))
    return DraftState(cache, _gather_rows(h_BxCxE, last_B).astype(jnp.float32), logits_BxV)

  def draft(self, params, target_params, state: DraftState, buffer_BxN: Array, n_B: Array,
            rng: Array, window: int, temperature: float, top_p: float,
            forced_BxK: Optional[Array] = None):
    del buffer_BxN
    model, net = self.model, params["net"]

    def step(carry, tok_B):
      cache, h_BxE = carry
      embeds = self._embed(target_params, tok_B[:, None])
      h_Bx1xE, logits_Bx1xVd, cache = model.apply(
          {"params": net}, embeds, h_BxE[:, None].astype(embeds.dtype), cache=cache,
          method=eagle3.Eagle3Drafter.step)
      return (cache, h_Bx1xE[:, 0].astype(jnp.float32)), self._target_logits(
          params, logits_Bx1xVd[:, 0])

    tokens_BxK, logits_BxKxV, _ = _draft_chain(
        state.logits_BxV, step, (state.cache, state.hidden_BxE), rng, window, temperature,
        top_p, forced_BxK)
    # The feedback entries are provisional: the next sync overwrites them with target features.
    return tokens_BxK, logits_BxKxV, state.replace(
        cache=state.cache.replace(lengths_B=n_B - 1))


Drafter = Union[LMDrafter, Eagle3FeatureDrafter]


def _check_safetensors(path: str) -> None:
  """The file's header parses and the file is as long as the header says (not truncated)."""
  try:
    size = os.path.getsize(path)
    with open(path, "rb") as f:
      head = f.read(8)
      if len(head) < 8:
        raise ValueError("shorter than its 8-byte header length")
      (n,) = struct.unpack("<Q", head)
      if n > size - 8:
        raise ValueError(f"header of {n} bytes in a file of {size}")
      header = json.loads(f.read(n))
  except (OSError, ValueError, UnicodeDecodeError) as e:
    raise UserError(f"{path}: not a readable safetensors file ({e})") from None
  ends = [v["data_offsets"][1] for k, v in header.items()
          if k != "__metadata__" and isinstance(v, dict) and "data_offsets" in v]
  if ends and 8 + n + max(ends) > size:
    raise UserError(f"{path}: truncated ({size} bytes; its header needs {8 + n + max(ends)})")


def _read_json(path: str, what: str) -> dict:
  try:
    with open(path) as f:
      obj = json.load(f)
  except (OSError, ValueError, UnicodeDecodeError) as e:
    raise UserError(f"{path}: not valid JSON ({e})") from None
  if not isinstance(obj, dict):
    raise UserError(f"{path}: {what} must be a JSON object, got a {type(obj).__name__}")
  return obj


def check_drafter_dir(path: str, where: str = "drafter") -> dict:
  """Checks a model directory before any loader reads it; returns its config.json.

  A directory with a JSON-object config.json and safetensors weights (one file, or an index
  whose ``weight_map`` names files that exist), none truncated. Each failure is a UserError
  naming the file.
  """
  if not os.path.isdir(path):
    raise UserError(f"{where} {path!r} is not a directory")
  cfg_path = os.path.join(path, "config.json")
  if not os.path.isfile(cfg_path):
    raise UserError(f"{where}: {cfg_path} not found")
  cfg = _read_json(cfg_path, "config.json")
  index_path = os.path.join(path, "model.safetensors.index.json")
  if os.path.isfile(os.path.join(path, "model.safetensors")):
    files = ["model.safetensors"]
  elif os.path.isfile(index_path):
    weight_map = _read_json(index_path, "the index").get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
      raise UserError(f"{index_path}: no weight_map (tensor name -> file)")
    files = sorted(set(map(str, weight_map.values())))
  else:
    files = []  # the loaders name what is missing (and refuse pickles)
  for name in files:
    file = os.path.join(path, name)
    if not os.path.isfile(file):
      raise UserError(f"{index_path}: lists {name}, which does not exist")
    _check_safetensors(file)
  return cfg


def load(path: str, target_cfg: llama.ModelConfig, dtype: str = "float32"):
  """(drafter, params) from an exported directory; the kind is read from its config.json.

  An EAGLE-3 directory (``architectures: ["LlamaForCausalLMEagle3"]``) gives an
  ``Eagle3FeatureDrafter``; a Hugging Face LM directory gives an ``LMDrafter``. The drafter's
  vocabulary must be the target's.
  """
  archs = check_drafter_dir(path).get("architectures") or []
  cfg_path = os.path.join(path, "config.json")
  if any("Eagle3" in str(a) for a in archs):
    cfg, params, vocab = eagle3_io.load_eagle3(path)
    if cfg.vocab_size != target_cfg.vocab_size:
      raise UserError(f"{cfg_path}: vocab_size {cfg.vocab_size} != target vocab_size "
                      f"{target_cfg.vocab_size}")
    return Eagle3FeatureDrafter.create(cfg, target_cfg), {
        "net": jax.tree_util.tree_map(jnp.asarray, params), "vocab": vocab}
  model, params = hf.load(path, dtype=dtype)
  hf.check_same_vocab(target_cfg, model.cfg, where=cfg_path)
  return LMDrafter(model.cfg), jax.tree_util.tree_map(jnp.asarray, params)
