"""One Flax Linen decoder for the LLaMA family (LLaMA 2/3, Mistral, Qwen2/2.5, Qwen3).

The same class serves the frozen target and the independent small-LM drafter. It has two
entry points:

* ``__call__(tokens_BxT)`` -> logits ``[B, T, V]``: the plain full-sequence forward.
* ``forward(tokens_BxT, ..., cache=..., hidden_layers=...)`` -> ``DecoderOutput``: the
  incremental path used by the decoding engine. It writes the new keys/values of several new
  tokens per row into a preallocated ``KVCache`` at each row's own offset (rows may hold
  different lengths), and optionally returns hidden states of chosen layers (EAGLE-3 reads
  three of them).

Parameters and key activations carry logical axis names (``embed``, ``mlp``, ``heads``,
``kv_heads``, ``head_dim``, ``vocab``, ``batch``, ``length``) so that sharding is decided by
rules alone (see ``ppow_jax/sharding.py``).

Hidden-state indices follow Hugging Face's ``output_hidden_states`` convention: index ``i``
is the residual stream *entering* layer ``i`` (0 = the embeddings). Index ``num_layers`` is
the stream after the last layer, before the final norm (HF applies the norm there).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ppow_jax import cpu_attention, cpu_gemv
from ppow_jax.models.kv_cache import KVCache, write_rows

Array = jax.Array

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def to_dtype(name: str) -> jnp.dtype:
  if name not in _DTYPES:
    raise ValueError(f"unknown dtype {name!r}; expected one of {sorted(_DTYPES)}")
  return _DTYPES[name]


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """LLaMA-3 ("llama3") frequency-dependent RoPE scaling."""
  factor: float = 8.0
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Architecture of a LLaMA-family decoder (all fields map 1:1 to HF config keys)."""
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int = 0  # 0: hidden_size // num_heads (Qwen3 sets it explicitly).
  rope_theta: float = 10000.0
  rope_scaling: Optional[RopeScaling] = None
  rms_norm_eps: float = 1e-6
  qkv_bias: bool = False  # Qwen2/2.5.
  qk_norm: bool = False  # Qwen3: per-head RMSNorm on q and k before RoPE.
  tie_embeddings: bool = False
  sliding_window: int = 0  # 0: full attention (Mistral may set a window).
  max_position_embeddings: int = 2048
  initializer_range: float = 0.02
  param_dtype: str = "float32"
  dtype: str = "float32"  # compute dtype; logits and softmax are always float32.

  def __post_init__(self):
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                 "num_kv_heads"):
      if getattr(self, name) < 1:
        raise ValueError(f"ModelConfig.{name} must be >= 1, got {getattr(self, name)}")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"ModelConfig.num_heads={self.num_heads} is not a multiple of "
                       f"num_kv_heads={self.num_kv_heads}")
    if self.head_dim == 0 and self.hidden_size % self.num_heads:
      raise ValueError(f"ModelConfig.hidden_size={self.hidden_size} is not divisible by "
                       f"num_heads={self.num_heads}; set head_dim explicitly")
    if self.resolved_head_dim % 2:
      raise ValueError(f"ModelConfig.head_dim must be even for RoPE, got {self.resolved_head_dim}")
    to_dtype(self.param_dtype), to_dtype(self.dtype)

  @property
  def resolved_head_dim(self) -> int:
    return self.head_dim or self.hidden_size // self.num_heads

  def eagle3_layers(self) -> tuple[int, int, int]:
    """Hidden-state indices EAGLE-3 fuses: the inputs of layers {2, L//2, L-3}."""
    num_layers = self.num_layers
    return (min(2, num_layers), num_layers // 2, max(num_layers - 3, 0))


def init_cache(cfg: ModelConfig, batch: int, max_length: int, dtype=None) -> KVCache:
  shape = (batch * cfg.num_kv_heads, max_length, cfg.resolved_head_dim)
  dtype = dtype or to_dtype(cfg.dtype)
  zeros = lambda: tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers))
  return KVCache(zeros(), zeros(), jnp.zeros((batch,), jnp.int32))


@flax.struct.dataclass
class DecoderOutput:
  logits_BxTxV: Array
  hidden_states: tuple  # one [B, T, E] array per requested hidden-state index
  cache: Optional[KVCache]


def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
  """Inverse frequencies [D/2] in float32, with llama3 scaling when configured (as HF)."""
  dim = cfg.resolved_head_dim
  inv_freq = (1.0 / (np.float32(cfg.rope_theta) **
                     (np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim))))
  inv_freq = inv_freq.astype(np.float32)
  sc = cfg.rope_scaling
  if sc is None:
    return inv_freq
  old_len = sc.original_max_position_embeddings
  low_wavelen = old_len / sc.low_freq_factor
  high_wavelen = old_len / sc.high_freq_factor
  wavelen = 2 * math.pi / inv_freq
  scaled = np.where(wavelen > low_wavelen, inv_freq / sc.factor, inv_freq)
  smooth = (old_len / wavelen - sc.low_freq_factor) / (sc.high_freq_factor - sc.low_freq_factor)
  smoothed = (1 - smooth) * scaled / sc.factor + smooth * scaled
  medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
  return np.where(medium, smoothed, scaled).astype(np.float32)


def apply_rope(x_BxTxHxD: Array, positions_BxT: Array, inv_freq_F: np.ndarray) -> Array:
  """Rotate-half RoPE (HF layout: first half of head_dim paired with second half)."""
  angles_BxTxF = positions_BxT.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq_F)
  angles_BxTxD = jnp.concatenate([angles_BxTxF, angles_BxTxF], axis=-1)[:, :, None, :]
  cos, sin = jnp.cos(angles_BxTxD), jnp.sin(angles_BxTxD)
  half = x_BxTxHxD.shape[-1] // 2
  x1, x2 = x_BxTxHxD[..., :half], x_BxTxHxD[..., half:]
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  xf = x_BxTxHxD.astype(jnp.float32)
  return (xf * cos + rotated.astype(jnp.float32) * sin).astype(x_BxTxHxD.dtype)


def _param(module: nn.Module, name: str, shape: Sequence[int], axes: tuple, cfg: ModelConfig,
           init: Optional[nn.initializers.Initializer] = None):
  init = init or nn.initializers.normal(cfg.initializer_range)
  return module.param(name, nn.with_logical_partitioning(init, axes), tuple(shape),
                      to_dtype(cfg.param_dtype))


class RMSNorm(nn.Module):
  dim: int
  eps: float
  cfg: ModelConfig
  axis_name: str = "embed"

  @nn.compact
  def __call__(self, x: Array) -> Array:
    scale = _param(self, "scale", (self.dim,), (self.axis_name,), self.cfg, nn.initializers.ones)
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
    return (scale.astype(jnp.float32) * xf).astype(x.dtype)


def attention_mask(q_pos_BxT: Array, kv_len: int, sliding_window: int) -> Array:
  """Boolean mask [B, T, S]: the query at absolute position P sees key slot s iff s <= P.

  With a cache, keys live at slots 0..S-1 and the T new tokens were just written at slots
  ``lengths_B + t`` (= their positions), so this is the causal mask over the whole row.
  Callers that lay tokens out differently (tree drafting, PPOW rollout blocks, EAGLE-3's
  training-time test) pass an explicit ``attn_mask_BxTxS`` instead.
  """
  s_S = jnp.arange(kv_len)
  mask = s_S[None, None, :] <= q_pos_BxT[:, :, None]
  if sliding_window:
    mask &= s_S[None, None, :] > q_pos_BxT[:, :, None] - sliding_window
  return mask


def _matmul(x_BxTxE: Array, w_ExN: Array, preferred_element_type=None) -> Array:
  """``[B, T, E] @ [E, N]`` as one 2-D matmul (XLA's CPU backend fuses these best)."""
  b, t, e = x_BxTxE.shape
  y = jnp.dot(x_BxTxE.reshape(b * t, e), w_ExN, preferred_element_type=preferred_element_type)
  return y.reshape(b, t, w_ExN.shape[1])


def _matmul_t(x_BxTxE: Array, w_NxE: Array, preferred_element_type=None) -> Array:
  """``[B, T, E] @ [N, E]^T``: weights stored output-major (``fuse_projections``' layout and
  a tied embedding table); few-row products on a CPU take ``cpu_gemv``'s kernel."""
  b, t, e = x_BxTxE.shape
  y = cpu_gemv.matmul_t(x_BxTxE.reshape(b * t, e), w_NxE, preferred_element_type)
  return y.reshape(b, t, w_NxE.shape[0])


class Attention(nn.Module):
  cfg: ModelConfig
  in_features: int = 0  # 0: hidden_size (the EAGLE-3 midlayer reads 2 * hidden_size)

  @nn.compact
  def __call__(self, x_BxTxE: Array, positions_BxT: Array, layer: int,
               cache: Optional[KVCache], attn_mask_BxTxS: Optional[Array]):
    cfg = self.cfg
    h, kv, d = cfg.num_heads, cfg.num_kv_heads, cfg.resolved_head_dim
    e_in = self.in_features or cfg.hidden_size
    dt = to_dtype(cfg.dtype)
    x = x_BxTxE.astype(dt)
    b, t = x.shape[:2]
    fused = self.has_variable("params", "qkv_proj_t")  # fuse_projections' layout
    if fused:  # one matmul for q, k and v
      qkv_BxTxN = _matmul_t(x, self.get_variable("params", "qkv_proj_t").astype(dt))
      q_BxTxHxD = qkv_BxTxN[..., :h * d].reshape(b, t, h, d)
      k_BxTxKxD = qkv_BxTxN[..., h * d:(h + kv) * d].reshape(b, t, kv, d)
      v_BxTxKxD = qkv_BxTxN[..., (h + kv) * d:].reshape(b, t, kv, d)
    else:
      wq = _param(self, "q_proj", (e_in, h, d), ("embed", "heads", "head_dim"), cfg)
      wk = _param(self, "k_proj", (e_in, kv, d), ("embed", "kv_heads", "head_dim"), cfg)
      wv = _param(self, "v_proj", (e_in, kv, d), ("embed", "kv_heads", "head_dim"), cfg)
      # [E, H, D] -> [E, H*D] is a free reshape; the 2-D form avoids per-call weight transposes
      q_BxTxHxD = _matmul(x, wq.astype(dt).reshape(e_in, h * d)).reshape(b, t, h, d)
      k_BxTxKxD = _matmul(x, wk.astype(dt).reshape(e_in, kv * d)).reshape(b, t, kv, d)
      v_BxTxKxD = _matmul(x, wv.astype(dt).reshape(e_in, kv * d)).reshape(b, t, kv, d)
    if cfg.qkv_bias:
      zeros = nn.initializers.zeros
      q_BxTxHxD += _param(self, "q_bias", (h, d), ("heads", "head_dim"), cfg, zeros).astype(dt)
      k_BxTxKxD += _param(self, "k_bias", (kv, d), ("kv_heads", "head_dim"), cfg, zeros).astype(dt)
      v_BxTxKxD += _param(self, "v_bias", (kv, d), ("kv_heads", "head_dim"), cfg, zeros).astype(dt)
    if cfg.qk_norm:
      q_BxTxHxD = RMSNorm(d, cfg.rms_norm_eps, cfg, "head_dim", name="q_norm")(q_BxTxHxD)
      k_BxTxKxD = RMSNorm(d, cfg.rms_norm_eps, cfg, "head_dim", name="k_norm")(k_BxTxKxD)
    inv_freq = rope_inv_freq(cfg)
    q_BxTxHxD = apply_rope(q_BxTxHxD, positions_BxT, inv_freq)
    k_BxTxKxD = apply_rope(k_BxTxKxD, positions_BxT, inv_freq)
    q_BxTxHxD = nn.with_logical_constraint(q_BxTxHxD, ("batch", "length", "heads", "head_dim"))

    new_cache = None
    if cache is not None:
      lengths_B = cache.lengths_B
      k_all = write_rows(cache.k_BKxSxD[layer], k_BxTxKxD, lengths_B)
      v_all = write_rows(cache.v_BKxSxD[layer], v_BxTxKxD, lengths_B)
      replace = lambda xs, x: xs[:layer] + (x,) + xs[layer + 1:]
      new_cache = cache.replace(k_BKxSxD=replace(cache.k_BKxSxD, k_all),
                                v_BKxSxD=replace(cache.v_BKxSxD, v_all))
      k_BKxSxD, v_BKxSxD = k_all.astype(dt), v_all.astype(dt)
    else:
      k_BKxSxD = k_BxTxKxD.transpose(0, 2, 1, 3).reshape(b * kv, t, d)
      v_BKxSxD = v_BxTxKxD.transpose(0, 2, 1, 3).reshape(b * kv, t, d)
    mask_BxTxS = attn_mask_BxTxS
    if mask_BxTxS is None:
      mask_BxTxS = attention_mask(positions_BxT, k_BKxSxD.shape[1], cfg.sliding_window)
    out_BxTxHxD = cpu_attention.attend(q_BxTxHxD, k_BKxSxD, v_BKxSxD, mask_BxTxS,
                                       1.0 / math.sqrt(d))
    out_BxTxHD = out_BxTxHxD.reshape(b, t, h * d)
    if fused:
      out_BxTxE = _matmul_t(out_BxTxHD, self.get_variable("params", "o_proj_t").astype(dt))
    else:
      wo = _param(self, "o_proj", (h, d, cfg.hidden_size), ("heads", "head_dim", "embed"), cfg)
      out_BxTxE = _matmul(out_BxTxHD, wo.astype(dt).reshape(h * d, cfg.hidden_size))
    return nn.with_logical_constraint(out_BxTxE, ("batch", "length", "embed")), new_cache


class Mlp(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BxTxE: Array) -> Array:
    cfg = self.cfg
    dt = to_dtype(cfg.dtype)
    e, m = cfg.hidden_size, cfg.intermediate_size
    x = x_BxTxE.astype(dt)
    fused = self.has_variable("params", "gate_up_proj_t")  # fuse_projections' layout
    if fused:
      gu_BxTx2M = _matmul_t(x, self.get_variable("params", "gate_up_proj_t").astype(dt))
      gate_BxTxM, up_BxTxM = gu_BxTx2M[..., :m], gu_BxTx2M[..., m:]
    else:
      gate = _param(self, "gate_proj", (e, m), ("embed", "mlp"), cfg)
      up = _param(self, "up_proj", (e, m), ("embed", "mlp"), cfg)
      gate_BxTxM, up_BxTxM = _matmul(x, gate.astype(dt)), _matmul(x, up.astype(dt))
    h_BxTxM = jax.nn.silu(gate_BxTxM) * up_BxTxM
    h_BxTxM = nn.with_logical_constraint(h_BxTxM, ("batch", "length", "mlp"))
    if fused:
      return _matmul_t(h_BxTxM, self.get_variable("params", "down_proj_t").astype(dt))
    down = _param(self, "down_proj", (m, e), ("mlp", "embed"), cfg)
    return _matmul(h_BxTxM, down.astype(dt))


class DecoderLayer(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BxTxE, positions_BxT, layer, cache, attn_mask_BxTxS):
    cfg = self.cfg
    norm = lambda name: RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg, name=name)
    attn_out, cache = Attention(cfg, name="self_attn")(
        norm("input_layernorm")(x_BxTxE), positions_BxT, layer, cache, attn_mask_BxTxS)
    x_BxTxE = x_BxTxE + attn_out
    x_BxTxE = x_BxTxE + Mlp(cfg, name="mlp")(norm("post_attention_layernorm")(x_BxTxE))
    return nn.with_logical_constraint(x_BxTxE, ("batch", "length", "embed")), cache


class Decoder(nn.Module):
  """The LLaMA-family decoder. See the module docstring for the two entry points."""
  cfg: ModelConfig

  def setup(self):
    cfg = self.cfg
    self.embed_tokens = self.param(
        "embed_tokens",
        nn.with_logical_partitioning(nn.initializers.normal(cfg.initializer_range),
                                     ("vocab", "embed")),
        (cfg.vocab_size, cfg.hidden_size), to_dtype(cfg.param_dtype))
    self.layers = [DecoderLayer(cfg, name=f"layers_{i}") for i in range(cfg.num_layers)]
    self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg)
    if not cfg.tie_embeddings and not self.has_variable("params", "lm_head_t"):
      self.lm_head = self.param(
          "lm_head",
          nn.with_logical_partitioning(nn.initializers.normal(cfg.initializer_range),
                                       ("embed", "vocab")),
          (cfg.hidden_size, cfg.vocab_size), to_dtype(cfg.param_dtype))

  def embed(self, tokens_BxT: Array) -> Array:
    # Under FSDP this is the table's all-gather; without it XLA re-materialises [B, T, E].
    table_VxE = nn.with_logical_constraint(self.embed_tokens, ("vocab", "embed"))
    x = jnp.take(table_VxE, tokens_BxT, axis=0).astype(to_dtype(self.cfg.dtype))
    return nn.with_logical_constraint(x, ("batch", "length", "embed"))

  def _fused(self) -> bool:
    """Whether these are ``fuse_projections``' unsharded decoding weights (the tied head then
    takes ``cpu_gemv`` too; sharded training weights keep XLA's dot)."""
    layer = self.variables.get("params", {}).get("layers_0", {})
    return "qkv_proj_t" in layer.get("self_attn", {})

  def logits_from_hidden(self, x_BxTxE: Array) -> Array:
    """Final norm and LM head; logits in float32."""
    dt = to_dtype(self.cfg.dtype)
    x = self.norm(x_BxTxE).astype(dt)
    # accumulate in float32 without materialising a float32 copy of a large bf16 head
    if self.cfg.tie_embeddings and self._fused():  # the [V, E] table is output-major already
      logits = _matmul_t(x, self.embed_tokens.astype(dt), preferred_element_type=jnp.float32)
    elif self.has_variable("params", "lm_head_t"):  # fuse_projections' untied head
      logits = _matmul_t(x, self.get_variable("params", "lm_head_t").astype(dt),
                         preferred_element_type=jnp.float32)
    else:
      w_ExV = self.embed_tokens.T if self.cfg.tie_embeddings else self.lm_head
      logits = _matmul(x, w_ExV.astype(dt), preferred_element_type=jnp.float32)
    return nn.with_logical_constraint(logits, ("batch", "length", "vocab"))

  def forward(self, tokens_BxT: Array, positions_BxT: Optional[Array] = None, *,
              cache: Optional[KVCache] = None, hidden_layers: Sequence[int] = (),
              attn_mask_BxTxS: Optional[Array] = None, return_logits: bool = True
              ) -> DecoderOutput:
    """Forward over T new tokens per row.

    Without a cache the T tokens are a whole causal sequence. With one, row b's tokens sit at
    absolute positions ``cache.lengths_B[b] + t`` (unless ``positions_BxT`` says otherwise),
    are written into the cache there, and the returned cache has ``lengths_B + T``; the
    caller lowers the lengths again to roll back rejected tokens. ``attn_mask_BxTxS``
    (S = cache slots, or T without a cache) replaces the default causal mask.
    """
    b, t = tokens_BxT.shape
    if positions_BxT is None:
      start_B = cache.lengths_B if cache is not None else jnp.zeros((b,), jnp.int32)
      positions_BxT = start_B[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
    x_BxTxE = self.embed(tokens_BxT)
    hidden = {}
    for i, layer in enumerate(self.layers):
      if i in hidden_layers:
        hidden[i] = x_BxTxE
      x_BxTxE, cache = layer(x_BxTxE, positions_BxT, i, cache, attn_mask_BxTxS)
    hidden[self.cfg.num_layers] = x_BxTxE
    for i in hidden_layers:
      if i not in hidden:
        raise ValueError(f"hidden layer index {i} outside [0, {self.cfg.num_layers}]")
    if cache is not None:
      cache = cache.replace(lengths_B=cache.lengths_B + t)
    logits = self.logits_from_hidden(x_BxTxE) if return_logits else None
    return DecoderOutput(logits, tuple(hidden[i] for i in hidden_layers), cache)

  def __call__(self, tokens_BxT: Array, positions_BxT: Optional[Array] = None) -> Array:
    return self.forward(tokens_BxT, positions_BxT).logits_BxTxV


def init_params(cfg: ModelConfig, rng: Array) -> dict:
  """Random parameters (unboxed), e.g. for tests and for the embedded default."""
  # one compiled program (an eager init compiles each of its hundreds of ops on its own)
  init = jax.jit(lambda key: Decoder(cfg).init(key, jnp.zeros((1, 2), jnp.int32)))
  return nn.unbox(init(rng)["params"])


def param_count(params) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(params)))
