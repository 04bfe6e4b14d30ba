"""The EAGLE-3 feature drafter: one decoder layer over fused target hidden states.

Layout follows SafeAILab/EAGLE (``cnets.py``) and SGLang/vLLM's ``LlamaForCausalLMEagle3`` so
that published checkpoints load here and exported ones serve there:

* ``fc``: Linear(3 * Et -> E, no bias) over concat(low, mid, high) target hidden states;
  with ``norm_before_fc`` an RMSNorm (``input_norm``, 3 * Et wide) first: targets whose hidden
  states reach ~1e4 in a few channels (SmolLM2) otherwise feed ``fc`` a badly scaled input.
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
from typing import Optional, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ppow_jax.errors import UserError
from ppow_jax.models import kv_cache, llama

Array = jax.Array

# Logit (and log-prob) of target ids outside the draft vocab. Finite on purpose: with -inf,
# p * log p is 0 * -inf = NaN (gradients too); finfo.min / 2 overflows to -inf at temperatures
# below 0.5. -1e30 stays finite divided by any temperature >= 1e-8, and exp(-1e30 - max) is
# exactly 0 in float32, so such ids get probability exactly 0 and can never be sampled.
OUT_OF_VOCAB_LOGIT = -1e30


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
  norm_before_fc: bool = False  # RMSNorm over the concatenated target features before fc
  aux_layer_ids: tuple = ()  # target hidden states fused (inputs of these layers); () = default

  def __post_init__(self):
    if not 1 <= self.draft_vocab_size <= self.vocab_size:
      raise ValueError(f"Eagle3Config.draft_vocab_size={self.draft_vocab_size} must be in "
                       f"[1, vocab_size={self.vocab_size}]")
    lcfg = self.layer_config()  # validates heads, dims and dtypes
    object.__setattr__(self, "head_dim", lcfg.resolved_head_dim)
    object.__setattr__(self, "target_hidden_size", self.target_hidden_size or self.hidden_size)
    object.__setattr__(self, "aux_layer_ids", tuple(int(i) for i in self.aux_layer_ids))
    if self.aux_layer_ids and len(self.aux_layer_ids) != 3:
      raise ValueError(f"Eagle3Config.aux_layer_ids must name 3 layers, got {self.aux_layer_ids}")

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
        initializer_range=t.initializer_range, param_dtype=t.param_dtype, dtype=t.dtype,
        aux_layer_ids=tuple(t.eagle3_layers()))
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
    if self.cfg.norm_before_fc:
      self.input_norm = llama.RMSNorm(3 * et, lcfg.rms_norm_eps, lcfg)
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
    if self.cfg.norm_before_fc:
      x_BxTx3Et = self.input_norm(x_BxTx3Et).astype(dt)
    return nn.with_logical_constraint(x_BxTx3Et @ self.fc.astype(dt), ("batch", "length", "embed"))

  def step(self, embeds_BxTxE: Array, hidden_BxTxE: Array, positions_BxT: Optional[Array] = None,
           *, cache: Optional[kv_cache.KVCache] = None, attn_mask_BxTxS: Optional[Array] = None
           ) -> tuple[Array, Array, Optional[kv_cache.KVCache]]:
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
    logits = self.head_input(out_BxTxE) @ self.lm_head.astype(jnp.float32)
    return out_BxTxE, nn.with_logical_constraint(logits, ("batch", "length", "vocab")), cache

  def head_input(self, out_BxTxE: Array) -> Array:
    """The final-normed output hidden (what ``lm_head`` reads), float32."""
    return self.norm(out_BxTxE).astype(jnp.float32)

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


def head_from_target(net: dict, vocab: DraftVocab, head_ExV: Array, norm_scale_E: Array
                     ) -> dict:
  """``net`` with ``lm_head`` = the target's head columns of the kept tokens and ``norm`` =
  the target's final norm: the drafter starts with its target's output map instead of a
  random one (the drafter's output hidden then only has to land where the target's would)."""
  kept_Vd = jnp.arange(vocab.d2t_Vd.shape[0]) + vocab.d2t_Vd
  head = jnp.take(jnp.asarray(head_ExV), kept_Vd, axis=1).astype(net["lm_head"].dtype)
  if head.shape != net["lm_head"].shape or norm_scale_E.shape != net["norm"]["scale"].shape:
    raise ValueError(f"target head {head.shape} / norm {norm_scale_E.shape} do not match the "
                     f"drafter's {net['lm_head'].shape} / {net['norm']['scale'].shape}")
  return dict(net, lm_head=head,
              norm={"scale": jnp.asarray(norm_scale_E, net["norm"]["scale"].dtype)})


def residual_start(net: dict, vocab: DraftVocab, head_ExV: Array, norm_scale_E: Array
                   ) -> dict:
  """``net`` that starts as the identity on its third fused feature (Medusa's initialisation).

  ``fc`` passes the third target feature through unchanged (the other two start at zero), the
  midlayer's output projections (``o_proj``, ``down_proj``) are zero, so the midlayer returns
  its hidden input, and ``norm``/``lm_head`` are the target's (``head_from_target``). With the
  target's last hidden state as the third feature, the untrained drafter's first draft token is
  the target's own prediction at the previous position; training learns the shift by one.
  """
  fc = net["fc"]
  e = fc.shape[1]
  if fc.shape[0] != 3 * e:
    raise ValueError(f"residual_start needs target features as wide as the drafter ({e}); "
                     f"fc is {fc.shape}")
  fc_3ExE = jnp.zeros_like(fc).at[2 * e:].set(jnp.eye(e, dtype=fc.dtype))
  mid = net["midlayer"]
  attn = dict(mid["self_attn"], o_proj=jnp.zeros_like(mid["self_attn"]["o_proj"]))
  mlp = dict(mid["mlp"], down_proj=jnp.zeros_like(mid["mlp"]["down_proj"]))
  net = dict(net, fc=fc_3ExE, midlayer=dict(mid, self_attn=attn, mlp=mlp))
  return head_from_target(net, vocab, head_ExV, norm_scale_E)


def init_eagle3(cfg: Eagle3Config, rng: Array) -> dict:
  """Random parameters (unboxed)."""
  return nn.unbox(jax.jit(functools.partial(_init_variables, cfg))(rng)["params"])


def _init_variables(cfg: Eagle3Config, rng: Array):
  embeds = jnp.zeros((1, 2, cfg.hidden_size), llama.to_dtype(cfg.dtype))
  hiddens = [jnp.zeros((1, 2, cfg.target_hidden_size), llama.to_dtype(cfg.dtype))] * 3
  return Eagle3Drafter(cfg).init(rng, embeds, hiddens)


