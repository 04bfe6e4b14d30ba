"""The EAGLE-3 feature drafter: one decoder layer over fused target hidden states.

Layout follows SafeAILab/EAGLE (``cnets.py``) and SGLang/vLLM's ``LlamaForCausalLMEagle3`` so
that published checkpoints load here and exported ones serve there:

* ``fc``: Linear(3 * Et -> E, no bias) over concat(low, mid, high) target hidden states.
* ``midlayer``: ``input_layernorm`` on the token embedding, ``hidden_norm`` on the hidden input,
  attention over concat(normed embeds, normed hidden) (so q/k/v read 2E features), residual =
  the *un-normed* hidden input; then ``post_attention_layernorm`` + SwiGLU ``mlp`` + residual.
* ``norm`` + ``lm_head`` over a reduced draft vocabulary; ``DraftVocab`` maps it to the target's.

Alignment of ``step`` (the caller's contract, as in EAGLE-3 training and SGLang): slot t pairs
the hidden state of target position p with the embedding of token x[p + 1], sits at RoPE
position p (default: ``cache.lengths_B + t``, or ``t`` without a cache) and predicts x[p + 2].
Later draft steps feed back ``out_hidden`` (pre-norm) in place of the fused target feature.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil
import tempfile
from typing import Any, Optional, Sequence

from absl import logging
import flax
import flax.linen as nn
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from ppow_jax.errors import UserError
from ppow_jax.models import llama

Array = jax.Array

# Logit (and log-prob) of target ids outside the draft vocab. Finite on purpose: with -inf,
# p * log p is 0 * -inf = NaN (gradients too); finfo.min / 2 overflows to -inf at temperatures
# below 0.5. -1e30 stays finite divided by any temperature >= 1e-8, and exp(-1e30 - max) is
# exactly 0 in float32, so such ids get probability exactly 0 and can never be sampled.
OUT_OF_VOCAB_LOGIT = -1e30
SAFETENSORS = "model.safetensors"
CONFIG = "config.json"
_IGNORED_KEYS = ("embed_tokens.weight",)  # published drafters may ship the target's embedding


@dataclasses.dataclass(frozen=True)
class Eagle3Config:
  """Drafter architecture. ``head_dim`` and ``target_hidden_size`` are resolved from 0 at
  construction, so equal configs compare equal whichever way they were written (hence
  ``dataclasses.replace(cfg, hidden_size=...)`` keeps the old resolved values: pass them too)."""
  hidden_size: int
  intermediate_size: int
  num_heads: int
  num_kv_heads: int
  vocab_size: int  # the TARGET vocab
  draft_vocab_size: int  # reduced draft vocab (== vocab_size allowed)
  target_hidden_size: int = 0  # 0: == hidden_size; fc maps 3 * target_hidden_size -> hidden_size
  head_dim: int = 0  # 0: hidden_size // num_heads
  rope_theta: float = 10000.0
  rope_scaling: Optional[llama.RopeScaling] = None
  rms_norm_eps: float = 1e-6
  max_position_embeddings: int = 2048
  initializer_range: float = 0.02
  param_dtype: str = "float32"
  dtype: str = "float32"  # compute dtype; logits are always float32

  def __post_init__(self):
    if not 1 <= self.draft_vocab_size <= self.vocab_size:
      raise ValueError(f"Eagle3Config.draft_vocab_size={self.draft_vocab_size} must be in "
                       f"[1, vocab_size={self.vocab_size}]")
    lcfg = self.layer_config()  # validates heads, dims and dtypes
    object.__setattr__(self, "head_dim", lcfg.resolved_head_dim)
    object.__setattr__(self, "target_hidden_size", self.target_hidden_size or self.hidden_size)

  def layer_config(self) -> llama.ModelConfig:
    """The midlayer's ModelConfig (one layer; its vocab is unused by the layer itself)."""
    return llama.ModelConfig(
        vocab_size=self.vocab_size, hidden_size=self.hidden_size,
        intermediate_size=self.intermediate_size, num_layers=1, num_heads=self.num_heads,
        num_kv_heads=self.num_kv_heads, head_dim=self.head_dim, rope_theta=self.rope_theta,
        rope_scaling=self.rope_scaling, rms_norm_eps=self.rms_norm_eps,
        max_position_embeddings=self.max_position_embeddings,
        initializer_range=self.initializer_range, param_dtype=self.param_dtype, dtype=self.dtype)

  @classmethod
  def from_target(cls, target_cfg: llama.ModelConfig, draft_vocab_size: int,
                  **overrides) -> "Eagle3Config":
    """The EAGLE-3 default: the midlayer copies the target's layer shape and RoPE."""
    t = target_cfg
    fields = dict(
        hidden_size=t.hidden_size, intermediate_size=t.intermediate_size, num_heads=t.num_heads,
        num_kv_heads=t.num_kv_heads, vocab_size=t.vocab_size, draft_vocab_size=draft_vocab_size,
        target_hidden_size=t.hidden_size, head_dim=t.head_dim, rope_theta=t.rope_theta,
        rope_scaling=t.rope_scaling, rms_norm_eps=t.rms_norm_eps,
        max_position_embeddings=t.max_position_embeddings,
        initializer_range=t.initializer_range, param_dtype=t.param_dtype, dtype=t.dtype)
    fields.update(overrides)
    return cls(**fields)


class Eagle3Layer(nn.Module):
  """The EAGLE-3 midlayer (see the module docstring)."""
  cfg: llama.ModelConfig

  @nn.compact
  def __call__(self, embeds_BxTxE, hidden_BxTxE, positions_BxT, cache, attn_mask_BxTxS):
    cfg = self.cfg
    e, dt = cfg.hidden_size, llama.to_dtype(cfg.dtype)
    norm = lambda name: llama.RMSNorm(e, cfg.rms_norm_eps, cfg, name=name)
    hidden_BxTxE = hidden_BxTxE.astype(dt)
    x_BxTx2E = jnp.concatenate([norm("input_layernorm")(embeds_BxTxE.astype(dt)),
                                norm("hidden_norm")(hidden_BxTxE)], axis=-1)
    attn_BxTxE, cache = llama.Attention(cfg, in_features=2 * e, name="self_attn")(
        x_BxTx2E, positions_BxT, 0, cache, attn_mask_BxTxS)
    x_BxTxE = hidden_BxTxE + attn_BxTxE
    x_BxTxE = x_BxTxE + llama.Mlp(cfg, name="mlp")(norm("post_attention_layernorm")(x_BxTxE))
    return nn.with_logical_constraint(x_BxTxE, ("batch", "length", "embed")), cache


class Eagle3Drafter(nn.Module):
  """setup()-style so that ``fuse`` and ``step`` can each be applied on their own."""
  cfg: Eagle3Config

  def setup(self):
    lcfg = self.cfg.layer_config()
    e, et = self.cfg.hidden_size, self.cfg.target_hidden_size
    self.fc = llama._param(self, "fc", (3 * et, e), (None, "embed"), lcfg)
    self.midlayer = Eagle3Layer(lcfg)
    self.norm = llama.RMSNorm(e, lcfg.rms_norm_eps, lcfg)
    self.lm_head = llama._param(self, "lm_head", (e, self.cfg.draft_vocab_size),
                                ("embed", "vocab"), lcfg)

  def fuse(self, hiddens: Sequence[Array]) -> Array:
    """3 x [B, T, Et] target hidden states (low, mid, high) -> the fused feature [B, T, E]."""
    et = self.cfg.target_hidden_size
    if len(hiddens) != 3 or any(h.shape[-1] != et for h in hiddens):
      raise ValueError(f"fuse expects 3 hidden states of width {et}, got "
                       f"{[tuple(h.shape) for h in hiddens]}")
    dt = llama.to_dtype(self.cfg.dtype)
    x_BxTx3Et = jnp.concatenate([h.astype(dt) for h in hiddens], axis=-1)
    return nn.with_logical_constraint(x_BxTx3Et @ self.fc.astype(dt), ("batch", "length", "embed"))

  def step(self, embeds_BxTxE: Array, hidden_BxTxE: Array, positions_BxT: Optional[Array] = None,
           *, cache: Optional[llama.KVCache] = None, attn_mask_BxTxS: Optional[Array] = None
           ) -> tuple[Array, Array, Optional[llama.KVCache]]:
    """One midlayer pass over T slots per row -> (out_hidden pre-norm, draft logits f32, cache).

    Cache semantics are llama.py's: row b's slots are written at ``cache.lengths_B[b] + t`` and
    the returned cache has ``lengths_B + T``; roll back by lowering the lengths.
    ``attn_mask_BxTxS`` (S = cache slots, or T without a cache) replaces the causal mask
    (tree drafting, EAGLE-3's training-time test).
    """
    b, t = embeds_BxTxE.shape[:2]
    if positions_BxT is None:
      start_B = cache.lengths_B if cache is not None else jnp.zeros((b,), jnp.int32)
      positions_BxT = start_B[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
    out_BxTxE, cache = self.midlayer(embeds_BxTxE, hidden_BxTxE, positions_BxT, cache,
                                     attn_mask_BxTxS)
    if cache is not None:
      cache = cache.replace(lengths_B=cache.lengths_B + t)
    logits = self.norm(out_BxTxE).astype(jnp.float32) @ self.lm_head.astype(jnp.float32)
    return out_BxTxE, nn.with_logical_constraint(logits, ("batch", "length", "vocab")), cache

  def __call__(self, embeds_BxTxE: Array, hiddens: Sequence[Array]) -> Array:
    return self.step(embeds_BxTxE, self.fuse(hiddens))[1]


@flax.struct.dataclass
class DraftVocab:
  """Draft <-> target vocab maps, in EAGLE-3's convention (stored as-is in checkpoints)."""
  d2t_Vd: Array  # int32: target_id = draft_id + d2t[draft_id]
  t2d_V: Array  # bool: target ids present in the draft vocab

  def to_target_ids(self, draft_ids: Array) -> Array:
    draft_ids = jnp.asarray(draft_ids, jnp.int32)
    return draft_ids + jnp.take(self.d2t_Vd, draft_ids).astype(jnp.int32)

  def target_logits(self, logits_xVd: Array, vocab_size: Optional[int] = None) -> Array:
    """Scatter draft logits into [..., V]; other target ids get ``OUT_OF_VOCAB_LOGIT``.

    ``vocab_size`` defaults to len(t2d); a larger one pads (e.g. a target's padded vocab).
    """
    v = vocab_size or self.t2d_V.shape[0]
    tgt_Vd = jnp.arange(self.d2t_Vd.shape[0], dtype=jnp.int32) + self.d2t_Vd.astype(jnp.int32)
    logits_xVd = logits_xVd.astype(jnp.float32)
    full = jnp.full(logits_xVd.shape[:-1] + (v,), OUT_OF_VOCAB_LOGIT, jnp.float32)
    return full.at[..., tgt_Vd].set(logits_xVd)

  def target_log_probs(self, logits_xVd: Array, vocab_size: Optional[int] = None) -> Array:
    """log_softmax over the draft vocab, in target ids; outside ids get ``OUT_OF_VOCAB_LOGIT``
    (so exp() is exactly 0 and p * log p is 0, never NaN)."""
    return self.target_logits(jax.nn.log_softmax(logits_xVd.astype(jnp.float32), axis=-1),
                              vocab_size)


def identity_draft_vocab(vocab_size: int) -> DraftVocab:
  return DraftVocab(jnp.zeros((vocab_size,), jnp.int32), jnp.ones((vocab_size,), bool))


def build_draft_vocab(token_counts_V: np.ndarray, draft_vocab_size: int) -> DraftVocab:
  """Keep the ``draft_vocab_size`` most frequent target ids (ties: lower id), sorted by id."""
  counts_V = np.asarray(token_counts_V).astype(np.int64)  # signed: negation must not wrap
  if counts_V.ndim != 1 or not 1 <= draft_vocab_size <= counts_V.size:
    raise UserError(f"draft_vocab_size={draft_vocab_size} must be in [1, {counts_V.size}] "
                    f"for token counts of shape {counts_V.shape}")
  kept_Vd = np.sort(np.argsort(-counts_V, kind="stable")[:draft_vocab_size])
  t2d_V = np.zeros(counts_V.shape, bool)
  t2d_V[kept_Vd] = True
  return DraftVocab(jnp.asarray(kept_Vd - np.arange(draft_vocab_size), jnp.int32),
                    jnp.asarray(t2d_V))


def init_eagle3(cfg: Eagle3Config, rng: Array) -> dict:
  """Random parameters (unboxed)."""
  return nn.unbox(jax.jit(functools.partial(_init_variables, cfg))(rng)["params"])


def _init_variables(cfg: Eagle3Config, rng: Array):
  embeds = jnp.zeros((1, 2, cfg.hidden_size), llama.to_dtype(cfg.dtype))
  hiddens = [jnp.zeros((1, 2, cfg.target_hidden_size), llama.to_dtype(cfg.dtype))] * 3
  return Eagle3Drafter(cfg).init(rng, embeds, hiddens)


# ---- Hugging Face layout -------------------------------------------------------------------
# (HF key, Flax path, kind). Kinds: "t" 2-D transpose; "in_heads" [in, H, D] <-> [H*D, in];
# "heads_out" [H, D, E] <-> [E, H*D]; "vec" unchanged.
_SPECS = (
    ("fc.weight", ("fc",), "t"),
    ("midlayer.hidden_norm.weight", ("midlayer", "hidden_norm", "scale"), "vec"),
    ("midlayer.input_layernorm.weight", ("midlayer", "input_layernorm", "scale"), "vec"),
    ("midlayer.self_attn.q_proj.weight", ("midlayer", "self_attn", "q_proj"), "in_heads"),
    ("midlayer.self_attn.k_proj.weight", ("midlayer", "self_attn", "k_proj"), "in_heads"),
    ("midlayer.self_attn.v_proj.weight", ("midlayer", "self_attn", "v_proj"), "in_heads"),
    ("midlayer.self_attn.o_proj.weight", ("midlayer", "self_attn", "o_proj"), "heads_out"),
    ("midlayer.post_attention_layernorm.weight",
     ("midlayer", "post_attention_layernorm", "scale"), "vec"),
    ("midlayer.mlp.gate_proj.weight", ("midlayer", "mlp", "gate_proj"), "t"),
    ("midlayer.mlp.up_proj.weight", ("midlayer", "mlp", "up_proj"), "t"),
    ("midlayer.mlp.down_proj.weight", ("midlayer", "mlp", "down_proj"), "t"),
    ("norm.weight", ("norm", "scale"), "vec"),
    ("lm_head.weight", ("lm_head",), "t"),
)


def _hf_shape(shape: tuple, kind: str) -> tuple:
  if kind == "t":
    return tuple(reversed(shape))
  if kind == "in_heads":
    return (shape[1] * shape[2], shape[0])
  if kind == "heads_out":
    return (shape[2], shape[0] * shape[1])
  return tuple(shape)


def _to_hf(x: np.ndarray, kind: str) -> np.ndarray:
  if kind in ("in_heads", "heads_out"):
    x = x.reshape(x.shape[0], -1) if kind == "in_heads" else x.reshape(-1, x.shape[-1])
  return np.ascontiguousarray(x.T) if kind != "vec" else x


def _from_hf(w: np.ndarray, kind: str, shape: tuple) -> np.ndarray:
  return w if kind == "vec" else np.ascontiguousarray(w.T).reshape(shape)


@functools.lru_cache(maxsize=16)
def _expected_shapes(cfg: Eagle3Config) -> dict:
  abstract = jax.eval_shape(functools.partial(_init_variables, cfg), jax.random.key(0))
  flat = traverse_util.flatten_dict(nn.unbox(abstract["params"]))
  return {path: tuple(x.shape) for path, x in flat.items()}


def validate_eagle3_tree(cfg: Eagle3Config, params: Any, vocab: DraftVocab) -> None:
  """Raises UserError naming the first missing, misshaped or extra key (HF name first),
  because a wrong layout loads silently in serving engines and drafts garbage."""
  expected = _expected_shapes(cfg)
  got = traverse_util.flatten_dict(nn.unbox(params))
  for hf_key, path, kind in _SPECS:
    where = f"{hf_key} (params path {'/'.join(path)})"
    if path not in got:
      raise UserError(f"EAGLE-3 parameter {where} is missing")
    shape = tuple(np.shape(got[path]))
    if shape != expected[path]:
      raise UserError(f"EAGLE-3 parameter {where} has shape {shape}, expected "
                      f"{expected[path]} (HF shape {_hf_shape(expected[path], kind)})")
  extra = sorted(set(got) - set(expected), key=str)
  if extra:
    raise UserError(f"EAGLE-3 params hold an unexpected key {'/'.join(map(str, extra[0]))}")
  d2t, t2d = np.asarray(vocab.d2t_Vd), np.asarray(vocab.t2d_V)
  vd, v = cfg.draft_vocab_size, cfg.vocab_size
  if d2t.shape != (vd,) or not np.issubdtype(d2t.dtype, np.integer):
    raise UserError(f"EAGLE-3 d2t has shape {d2t.shape} dtype {d2t.dtype}, expected int ({vd},)")
  if t2d.shape != (v,) or t2d.dtype != bool:
    raise UserError(f"EAGLE-3 t2d has shape {t2d.shape} dtype {t2d.dtype}, expected bool ({v},)")
  tgt = np.arange(vd) + d2t
  if (tgt.min() < 0 or tgt.max() >= v or len(np.unique(tgt)) != vd or not t2d[tgt].all()
      or t2d.sum() != vd):
    raise UserError("EAGLE-3 d2t and t2d disagree: draft ids must map to distinct target ids "
                    "in [0, vocab_size) that are exactly the ids t2d marks")


def _config_json(cfg: Eagle3Config, param_dtype: str) -> dict:
  out = {
      "architectures": ["LlamaForCausalLMEagle3"], "model_type": "llama",
      "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
      "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads,
      "head_dim": cfg.head_dim, "hidden_act": "silu", "rms_norm_eps": cfg.rms_norm_eps,
      "rope_theta": cfg.rope_theta, "vocab_size": cfg.vocab_size,
      "draft_vocab_size": cfg.draft_vocab_size, "target_hidden_size": cfg.target_hidden_size,
      "max_position_embeddings": cfg.max_position_embeddings, "num_hidden_layers": 1,
      "tie_word_embeddings": False, "initializer_range": cfg.initializer_range,
      "torch_dtype": param_dtype, "ppow_jax_compute_dtype": cfg.dtype,
  }
  if cfg.rope_scaling is not None:
    out["rope_scaling"] = {"rope_type": "llama3", **dataclasses.asdict(cfg.rope_scaling)}
  return out


def _config_from_json(c: dict, path: str) -> Eagle3Config:
  try:
    rope = c.get("rope_scaling") or c.get("rope_parameters") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "llama3"):
      raise UserError(f"{path}: rope type {rope_type!r} is not supported (only llama3)")
    scaling = None
    if rope_type == "llama3":
      names = [f.name for f in dataclasses.fields(llama.RopeScaling)]
      scaling = llama.RopeScaling(**{k: rope[k] for k in names if k in rope})
    if c.get("num_hidden_layers", 1) != 1:
      raise UserError(f"{path}: num_hidden_layers={c['num_hidden_layers']}; only 1 is supported")
    torch_dtype = str(c.get("torch_dtype", c.get("dtype", "float32"))).replace("torch.", "")
    param_dtype = torch_dtype if torch_dtype in ("float32", "bfloat16", "float16") else "float32"
    return Eagle3Config(
        hidden_size=c["hidden_size"], intermediate_size=c["intermediate_size"],
        num_heads=c["num_attention_heads"],
        num_kv_heads=c.get("num_key_value_heads") or c["num_attention_heads"],
        vocab_size=c["vocab_size"], draft_vocab_size=c.get("draft_vocab_size") or c["vocab_size"],
        target_hidden_size=c.get("target_hidden_size") or 0, head_dim=c.get("head_dim") or 0,
        rope_theta=float(c.get("rope_theta", rope.get("rope_theta", 10000.0))),
        rope_scaling=scaling, rms_norm_eps=float(c.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=c.get("max_position_embeddings", 2048),
        initializer_range=c.get("initializer_range", 0.02), param_dtype=param_dtype,
        dtype=c.get("ppow_jax_compute_dtype", param_dtype))
  except UserError:
    raise
  except KeyError as e:
    raise UserError(f"{path}: missing key {e.args[0]!r}") from None
  except (TypeError, ValueError) as e:
    raise UserError(f"{path}: {e}") from None


def save_eagle3(out_dir: str, cfg: Eagle3Config, params: Any, vocab: DraftVocab, *,
                dtype: Optional[str] = None) -> None:
  """Export in the HF/SGLang/vLLM layout: ``config.json`` + ``model.safetensors``.

  Every key and shape is validated before anything touches the disk. A new directory appears
  at once (temp dir + rename); into an existing directory each file is replaced atomically,
  other files there (e.g. a tokenizer) are kept. ``dtype`` casts the weights (default
  ``cfg.param_dtype``).
  """
  from safetensors.numpy import save_file
  validate_eagle3_tree(cfg, params, vocab)
  dtype = dtype or cfg.param_dtype
  np_dtype = llama.to_dtype(dtype)
  flat = traverse_util.flatten_dict(nn.unbox(params))
  tensors = {hf: _to_hf(np.asarray(flat[path]).astype(np_dtype), kind) for hf, path, kind in _SPECS}
  tensors["d2t"] = np.asarray(vocab.d2t_Vd).astype(np.int64)
  tensors["t2d"] = np.asarray(vocab.t2d_V).astype(bool)
  config_text = json.dumps(_config_json(cfg, dtype), indent=2, sort_keys=True) + "\n"

  out_dir = os.path.abspath(out_dir)
  if os.path.exists(out_dir) and not os.path.isdir(out_dir):
    raise UserError(f"{out_dir} exists and is not a directory")
  parent, name = os.path.split(out_dir)
  os.makedirs(parent, exist_ok=True)
  exists = os.path.isdir(out_dir)
  tmp = tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=out_dir if exists else parent)
  try:
    save_file(tensors, os.path.join(tmp, SAFETENSORS), metadata={"format": "pt"})
    with open(os.path.join(tmp, CONFIG), "w") as f:
      f.write(config_text)
    if exists:
      for fname in (SAFETENSORS, CONFIG):  # weights first: config.json marks a complete export
        os.replace(os.path.join(tmp, fname), os.path.join(out_dir, fname))
      shutil.rmtree(tmp)
    else:
      os.rename(tmp, out_dir)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  logging.info("Saved EAGLE-3 drafter (%s, %d tensors) to %s", dtype, len(tensors), out_dir)


def _weight_files(in_dir: str) -> list[str]:
  """The safetensors files of a checkpoint (single or sharded); pickles are refused."""
  single = os.path.join(in_dir, SAFETENSORS)
  index = single + ".index.json"
  if os.path.isfile(single):
    return [single]
  if os.path.isfile(index):
    with open(index) as f:
      shards = sorted(set(json.load(f)["weight_map"].values()))
    return [os.path.join(in_dir, s) for s in shards]
  pickles = sorted(f for f in os.listdir(in_dir) if f.endswith((".bin", ".pt", ".pth")))
  if pickles:
    p = os.path.join(in_dir, pickles[0])
    raise UserError(
        f"{p}: refusing to load a pickled checkpoint (we never unpickle). Convert it once with "
        f"python -c \"import torch; from safetensors.torch import save_file; save_file(torch.load("
        f"'{p}', weights_only=True), '{single}')\"")
  raise UserError(f"{in_dir}: no {SAFETENSORS} found")


def load_eagle3(in_dir: str, *, param_dtype: Optional[str] = None, dtype: Optional[str] = None
                ) -> tuple[Eagle3Config, dict, DraftVocab]:
  """Load an EAGLE-3 drafter in the HF layout (ours or published); ``param_dtype``/``dtype``
  override the config's (published checkpoints are often float16)."""
  if not os.path.isdir(in_dir):
    raise UserError(f"{in_dir}: no such directory")
  from safetensors.numpy import load_file
  files = _weight_files(in_dir)
  config_path = os.path.join(in_dir, CONFIG)
  if not os.path.isfile(config_path):
    raise UserError(f"{config_path}: missing (an EAGLE-3 export needs config.json)")
  with open(config_path) as f:
    raw = json.load(f)
  if "eagle3" not in " ".join(raw.get("architectures") or []).lower():
    logging.warning("%s: architectures=%s does not name EAGLE-3", config_path,
                    raw.get("architectures"))
  cfg = _config_from_json(raw, config_path)
  overrides = {k: v for k, v in (("param_dtype", param_dtype), ("dtype", dtype)) if v}
  cfg = dataclasses.replace(cfg, **overrides)
  tensors = {k: v for fname in files for k, v in load_file(fname).items()}
  for key in _IGNORED_KEYS:
    if tensors.pop(key, None) is not None:
      logging.info("%s: ignoring %s (the drafter uses the target's embedding)", in_dir, key)
  expected, np_dtype, flat = _expected_shapes(cfg), llama.to_dtype(cfg.param_dtype), {}
  for hf_key, path, kind in _SPECS:
    if hf_key not in tensors:
      raise UserError(f"{in_dir}: EAGLE-3 tensor {hf_key} is missing")
    w, want = tensors.pop(hf_key), _hf_shape(expected[path], kind)
    if tuple(w.shape) != want:
      raise UserError(f"{in_dir}: EAGLE-3 tensor {hf_key} has shape {tuple(w.shape)}, "
                      f"expected {want}")
    flat[path] = jnp.asarray(_from_hf(w, kind, expected[path]).astype(np_dtype))
  if "d2t" in tensors or "t2d" in tensors:
    if "d2t" not in tensors or "t2d" not in tensors:
      raise UserError(f"{in_dir}: EAGLE-3 tensor {'t2d' if 'd2t' in tensors else 'd2t'} missing")
    vocab = DraftVocab(jnp.asarray(tensors.pop("d2t").astype(np.int32)),
                       jnp.asarray(tensors.pop("t2d").astype(bool)))
  elif cfg.draft_vocab_size == cfg.vocab_size:
    vocab = identity_draft_vocab(cfg.vocab_size)
  else:
    raise UserError(f"{in_dir}: draft_vocab_size < vocab_size but no d2t/t2d tensors")
  if tensors:
    raise UserError(f"{in_dir}: unexpected EAGLE-3 tensor {sorted(tensors)[0]}")
  params = traverse_util.unflatten_dict(flat)
  validate_eagle3_tree(cfg, params, vocab)
  return cfg, params, vocab
