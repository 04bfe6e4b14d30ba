"""The library's side of the config: every value checked before any work, the typed views the
code is built from, and the architectures a config names.

The config (``configs/common.py``) is the only source of values: a typed view is
``view(X, c.x)``, i.e. ``X(**c.x)`` restricted to ``X``'s fields, and those dataclasses have no
defaults of their own; a function's knobs are ``knobs(f, c.x)``, its keyword-only parameters
without a default read by name (the reward's: ``rewards.total_reward``), so that adding one
takes a config line and the parameter, and no field list in between. ``validate`` runs before any data is read: every numeric field has a rule
in ``RULES`` (a test sweeps each with 0 and a negative value), and each error names the key.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import inspect
import math
from typing import Any, Callable, Optional, Union

import flax

from ppow_jax import rewards, rollout, stages, train_step, tree
from ppow_jax.data import benchmarks
from ppow_jax.errors import UserError
from ppow_jax.models import eagle3, llama, presets


def view(cls: type, node, **overrides):
  """``cls(**node)`` for ``cls``'s fields (other keys of ``node`` belong to other readers)."""
  values = {}
  for f in dataclasses.fields(cls):
    if f.name not in overrides:
      if f.name not in node:
        raise KeyError(f"{cls.__name__}.{f.name} has no key in the config node")
      values[f.name] = node[f.name]
  return cls(**values, **overrides)


def knob_names(fn: Callable) -> tuple[str, ...]:
  """The keyword-only parameters of ``fn`` without a default: the config knobs it takes."""
  return tuple(p.name for p in inspect.signature(fn).parameters.values()
               if p.kind is p.KEYWORD_ONLY and p.default is p.empty)


def knobs(fn: Callable, node) -> flax.core.FrozenDict:
  """``fn``'s knobs (``knob_names``) with their values in ``node``, to pass as ``**knobs``."""
  for name in knob_names(fn):
    if name not in node:
      raise KeyError(f"{fn.__name__}'s knob {name} has no key in the config node")
  return flax.core.FrozenDict({name: node[name] for name in knob_names(fn)})


def optim(node) -> train_step.OptimConfig:
  return view(train_step.OptimConfig, node)


def baseline(c, warm_start: bool = True) -> train_step.BaselineConfig:
  """``warm_start=False`` drops the S = 1 start (``ttt_from_step``): for stages that continue a
  trained drafter."""
  overrides = {} if warm_start else {"ttt_from_step": 0}
  return view(train_step.BaselineConfig, c.baseline, **overrides)


def ppow(c, gamma: float) -> rollout.PPOWConfig:
  """``gamma``: the configured one, or the one measured when ``ppow.gamma = -1``."""
  reward = knobs(rewards.total_reward, c.ppow)
  rewards.check_knobs(**knobs(rewards.check_knobs, reward))
  return view(rollout.PPOWConfig, c.ppow, gamma=gamma, reward=reward)


def eval_window(c) -> int:
  """K at evaluation: ``eval.window``, or PPOW's training window when it is -1 (one K)."""
  return c.ppow.window if c.eval.window == -1 else c.eval.window


def eval_tree(c) -> Optional[tree.TreeShape]:
  """The tree evaluated beside the chain (``eval.tree``), or None when it is off."""
  t = tuple(c.eval.tree)
  if not any(t):
    return None
  if len(t) != 3:
    raise UserError(f"config.eval.tree={t}: expected (total_tokens, depth, top_k), or () for "
                    f"chain drafting only")
  try:
    return tree.TreeShape(*t)
  except UserError as e:
    raise UserError(f"config.eval.tree={t}: {e}") from None


# ---- Numeric rules -----------------------------------------------------------------------------

Rule = tuple[Callable[[float], bool], str]


def _at_least(lo: float) -> Rule:
  return (lambda x: x >= lo), f">= {lo:g}"


def _above(lo: float) -> Rule:
  return (lambda x: x > lo), f"> {lo:g}"


def _in(lo: float, hi: float, hi_open: bool = False) -> Rule:
  return ((lambda x: lo <= x < hi) if hi_open else (lambda x: lo <= x <= hi),
          f"in [{lo:g}, {hi:g}{')' if hi_open else ']'}")


def _at_least_or_minus_one(lo: float) -> Rule:
  return (lambda x: x >= lo or x == -1), f">= {lo:g}, or -1"


ANY: Rule = (lambda x: math.isfinite(x)), "finite"

# Every numeric field of the base config (a sequence: each element). Patterns use fnmatch.
RULES: dict[str, Rule] = {
    "seed": _at_least(0),
    "data.heldout_fraction": _in(0, 1, hi_open=True),
    "data.tokenizer_vocab_size": _at_least(262),  # 256 bytes + 6 special tokens
    "data.tokenizer_train_docs": _at_least(1),
    "data.seq_len": _at_least(8),
    "data.regenerate_max_new_tokens": _at_least(1),
    "target.hidden_size": _at_least(1),
    "target.intermediate_size": _at_least(1),
    "target.num_layers": _at_least(1),
    "target.num_heads": _at_least(1),
    "target.num_kv_heads": _at_least(1),
    "target.rope_theta": _above(0),
    "target.max_position_embeddings": _at_least(1),
    "target.pretrain_steps": _at_least(0),
    "target.pretrain_batch_size": _at_least(1),
    "target.sample_tokens": _at_least(0),
    "*.optim.learning_rate": _at_least(0),
    "*.optim.warmup_steps": _at_least(0),
    "*.optim.decay_steps": _at_least(1),
    "*.optim.end_lr_fraction": _in(0, 1),
    "*.optim.b1": _in(0, 1, hi_open=True),
    "*.optim.b2": _in(0, 1, hi_open=True),
    "*.optim.weight_decay": _at_least(0),
    "*.optim.grad_clip": _above(0),
    "drafter.draft_vocab_size": _at_least(0),
    "drafter.hidden_size": _at_least(0),
    "drafter.intermediate_size": _at_least(0),
    "drafter.num_layers": _at_least(1),
    "baseline.steps": _at_least(0),
    "baseline.batch_size": _at_least(1),
    "baseline.ttt_steps": _at_least(1),
    "baseline.ttt_from_step": _at_least(0),
    "baseline.step_decay": _at_least(0),
    "baseline.feature_regression": _at_least(0),
    "baseline.feature_noise": _at_least(0),
    "baseline.feature_rows": _at_least(0),
    "baseline.feature_context": _at_least(0),
    "data.regenerate_batch_size": _at_least(1),
    "data.num_instructions": _at_least(1),
    "data.heldout_instructions": _at_least(0),
    "data.self_instructions": _at_least(0),
    "data.self_instruct_max_tokens": _at_least(4),
    "data.self_instruct_temperature": _above(0),
    "ppow.steps": _at_least(0),
    "ppow.seed": _at_least(0),
    "ppow.batch_size": _at_least(1),
    "ppow.window": _at_least(1),
    "ppow.group_size": _at_least(2),
    "ppow.starts_per_seq": _at_least(1),
    "ppow.gamma": _at_least_or_minus_one(0),
    "ppow.lambda_prox": _at_least(0),
    "ppow.prox_eta": _at_least(0),
    "ppow.prox_eps": _at_least(0),
    "ppow.selection_temperature": _above(0),
    "ppow.clip_eps": _above(0),
    "ppow.omega": _at_least(0),
    "ppow.ppo_epochs": _at_least(1),
    "ppow.adv_delta": _above(0),
    "ppow.adv_min_std": _at_least(0),
    "ppow.pool_size": _at_least(0),
    "ppow.pool_refresh_every": _at_least(1),
    "ppow.adaw_warmup_steps": _at_least(0),
    "ppow.anchor_ttt_weight": _at_least(0),
    "eval.num_prompts": _at_least(1),
    "eval.prompt_len": _at_least(2),
    "eval.max_new_tokens": _at_least(1),
    "eval.temperatures": _at_least(0),
    "eval.window": _at_least_or_minus_one(1),
    "eval.tree": _at_least(0),
    "eval.batch_sizes": _at_least(1),
    "eval.repeats": _at_least(0),
    "mesh.ici_shape": _at_least_or_minus_one(1),
    "mesh.dcn_shape": _at_least_or_minus_one(1),
    "mesh.num_devices": _at_least_or_minus_one(1),
    "checkpoint.save_every": _at_least(1),
    "checkpoint.max_to_keep": _at_least(1),
    "checkpoint.eval_every": _at_least(0),
    "checkpoint.eval_prompts": _at_least(1),
    "log_every": _at_least(1),
}


def is_number(x: Any) -> bool:
  return isinstance(x, (int, float)) and not isinstance(x, bool)


def numeric_leaves(c, prefix: str = "") -> dict[str, Any]:
  """``{dotted key: value}`` of every number or sequence of numbers in the config."""
  out = {}
  for k, v in c.items():
    key = f"{prefix}{k}"
    if hasattr(v, "items"):
      out.update(numeric_leaves(v, key + "."))
    elif is_number(v) or (isinstance(v, (tuple, list)) and v and all(map(is_number, v))):
      out[key] = v
  return out


def rule_for(key: str) -> Optional[Rule]:
  return next((r for pattern, r in RULES.items() if fnmatch.fnmatchcase(key, pattern)), None)


def _check_numbers(c) -> None:
  for key, value in numeric_leaves(c).items():
    rule = rule_for(key)
    if rule is None:
      continue  # tests/settings_test.py fails for a numeric field without a rule
    ok, text = rule
    for x in (value if isinstance(value, (tuple, list)) else (value,)):
      if not ok(x):
        raise UserError(f"config.{key}={value!r}: {'each entry ' if value is not x else ''}"
                        f"must be {text}")


def _one_of(key: str, value: Any, allowed: tuple) -> None:
  if value not in allowed:
    raise UserError(f"config.{key}={value!r}: expected one of {allowed}")


def validate(c) -> None:
  """Every check that needs no files: numbers, choices, and fields that must agree."""
  chosen = stages.chosen(c)
  _check_numbers(c)
  _one_of("drafter.kind", c.drafter.kind, ("eagle3", "lm"))
  _one_of("eval.prompt_policy", c.eval.prompt_policy, ("truncate_left", "reject"))
  _one_of("sharding.drafter_params", c.sharding.drafter_params, ("fsdp", "replicated"))
  per_seq = -(-(c.data.seq_len - 2) // c.ppow.window)  # non-overlapping windows per sequence
  if c.ppow.starts_per_seq > per_seq:  # the first step's pool holds only its own batch
    raise UserError(f"config.ppow.starts_per_seq={c.ppow.starts_per_seq} exceeds the "
                    f"non-overlapping windows of a sequence ({per_seq} at "
                    f"data.seq_len={c.data.seq_len}, ppow.window={c.ppow.window})")
  if c.ppow.pool_size % c.ppow.batch_size:
    raise UserError(f"config.ppow.pool_size={c.ppow.pool_size} must be a multiple of "
                    f"config.ppow.batch_size={c.ppow.batch_size}")
  for key in ("warmup_steps", "decay_steps", "end_lr_fraction"):
    if c.continued.optim[key] != c.ppow.optim[key]:
      raise UserError(f"config.continued.optim.{key}={c.continued.optim[key]} differs from "
                      f"config.ppow.optim.{key}={c.ppow.optim[key]}: the budget-matched "
                      f"control needs PPOW's schedule shape")
  if not c.target.hf_dir and not c.target.preset:
    t = c.target
    if t.hidden_size % t.num_heads:
      raise UserError(f"config.target.hidden_size={t.hidden_size} must be divisible by "
                      f"config.target.num_heads={t.num_heads}")
    if t.num_heads % t.num_kv_heads:
      raise UserError(f"config.target.num_heads={t.num_heads} must be divisible by "
                      f"config.target.num_kv_heads={t.num_kv_heads}")
  if "eval" in chosen and not c.eval.prompts_file and not c.data.heldout_fraction:
    raise UserError("config.data.heldout_fraction=0 leaves no held-out prompts for the eval "
                    "stage; set it > 0 or set config.eval.prompts_file")
  if "eval" in chosen and max(c.eval.batch_sizes) > c.eval.num_prompts:
    raise UserError(f"config.eval.batch_sizes={tuple(c.eval.batch_sizes)}: a batch larger than "
                    f"config.eval.num_prompts={c.eval.num_prompts} would hold no prompts")
  for name in filter(None, (n.strip() for n in c.eval.benchmarks.split(","))):
    _one_of("eval.benchmarks", name, benchmarks.BENCHMARKS)
  if not c.eval.temperatures:
    raise UserError("config.eval.temperatures is empty")
  eval_tree(c)
  # the typed views check their own choices (divergences, forms, selection, ...)
  baseline(c)
  ppow(c, max(c.ppow.gamma, 0.0))
  for node in (c.target.optim, c.baseline.optim, c.ppow.optim, c.continued.optim):
    optim(node)


def check_runnable(c) -> None:
  """Checks that need the user's paths (a shipped real-run config fails here until set)."""
  if c.target.preset and not c.target.hf_dir and "target" not in stages.chosen(c):
    raise UserError(f"config.target.hf_dir: set it to the local Hugging Face directory of "
                    f"{c.target.preset} (nothing is downloaded)")
  if not (c.data.corpus or c.data.conversations or c.data.tfds_name):
    raise UserError("config.data: set one of corpus, conversations (JSONL) or tfds_name")


# ---- Architectures ---------------------------------------------------------------------------

DrafterArch = Union[eagle3.Eagle3Config, llama.ModelConfig]


def target_arch(c, vocab_size: Optional[int] = None) -> llama.ModelConfig:
  """The target a config names without weights: ``target.preset``, else the embedded one
  (``vocab_size``: its tokenizer's; default ``data.tokenizer_vocab_size``)."""
  t = c.target
  if t.preset:
    return presets.get_preset(t.preset, dtype=t.dtype, param_dtype=t.param_dtype)
  return llama.ModelConfig(
      vocab_size=vocab_size or c.data.tokenizer_vocab_size, hidden_size=t.hidden_size,
      intermediate_size=t.intermediate_size, num_layers=t.num_layers, num_heads=t.num_heads,
      num_kv_heads=t.num_kv_heads, rope_theta=t.rope_theta,
      max_position_embeddings=t.max_position_embeddings, tie_embeddings=False, dtype=t.dtype,
      param_dtype=t.param_dtype)


def drafter_arch(c, target_cfg: llama.ModelConfig) -> DrafterArch:
  """The drafter ``config.drafter`` describes for ``target_cfg`` (training and the memory plan
  both build it here). ``eagle3``: one layer shaped like the target's unless sizes are given;
  ``lm``: ``drafter.preset``, else a smaller copy of the target (half width, ``num_layers``)."""
  d = c.drafter
  if d.kind == "eagle3":
    sizes = {"hidden_size": d.hidden_size, "intermediate_size": d.intermediate_size}
    sizes = {k: v for k, v in sizes.items() if v}  # 0: the target's
    aux = tuple(int(i) for i in d.aux_layers)
    if aux:
      if len(aux) != 3 or not all(0 <= i <= target_cfg.num_layers for i in aux):
        raise UserError(f"config.drafter.aux_layers={aux}: three layer indices in "
                        f"[0, {target_cfg.num_layers}] (the target's num_layers = its output)")
      sizes["aux_layer_ids"] = aux
    try:
      return eagle3.Eagle3Config.from_target(
          target_cfg, draft_vocab_size=d.draft_vocab_size or target_cfg.vocab_size,
          dtype=d.dtype, param_dtype=d.param_dtype, norm_before_fc=d.norm_before_fc, **sizes)
    except ValueError as e:
      raise UserError(f"config.drafter (kind eagle3): {e}") from None
  if d.preset:
    cfg = presets.get_preset(d.preset, dtype=d.dtype, param_dtype=d.param_dtype)
    if cfg.vocab_size != target_cfg.vocab_size:
      raise UserError(f"config.drafter.preset={d.preset!r} has vocab_size {cfg.vocab_size}, but "
                      f"the target's is {target_cfg.vocab_size}: an LM drafter must share the "
                      f"target's tokenizer")
    return cfg
  return dataclasses.replace(
      target_cfg, hidden_size=d.hidden_size or max(target_cfg.hidden_size // 2, 32),
      num_layers=d.num_layers, num_heads=max(target_cfg.num_heads // 2, 1), num_kv_heads=1,
      head_dim=0, intermediate_size=d.intermediate_size or target_cfg.intermediate_size // 2,
      dtype=d.dtype, param_dtype=d.param_dtype)
