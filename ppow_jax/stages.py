"""The stages of a run, in order, as one table: what each trains, from what, on which settings.

``run.py`` walks this table; ``layout.py`` records each stage's settings next to its artifact so
that a rerun with different settings stops instead of silently reusing the old artifact. No
JAX here: the table is read while checking a config, before anything starts.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Callable, Optional

from ppow_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class Stage:
  name: str
  seed_offset: int  # the stage's initial rng and data order come from seed + seed_offset
  # (+ ppow.seed for PPOW and its control: ``stage_seed``)
  starts_from: Optional[str]  # the stage whose result it starts from (None: nothing)
  shaped_by: tuple[str, ...]  # config keys (or subtrees) that shape its artifact, besides
  # those of the stage it starts from
  # c -> (steps, batch, optim node, optimizer updates per batch)
  schedule: Optional[Callable[[Any], tuple[int, int, Any, int]]]


def _continued(c) -> tuple[int, int, Any, int]:
  """The budget-matched control: PPOW's batches (same size and, through the same seed offset,
  the same sequences in the same order), ``ppo_epochs`` updates on each as PPOW makes per
  rollout, and a schedule of PPOW's shape (``settings.validate`` checks ``continued.optim``)."""
  return c.ppow.steps, c.ppow.batch_size, c.continued.optim, c.ppow.ppo_epochs


TABLE: tuple[Stage, ...] = (
    Stage("target", 0, None, ("seed", "data", "target"),
          lambda c: (c.target.pretrain_steps, c.target.pretrain_batch_size, c.target.optim, 1)),
    Stage("baseline", 100, "target", ("drafter", "baseline"),
          lambda c: (c.baseline.steps, c.baseline.batch_size, c.baseline.optim, 1)),
    Stage("ppow", 200, "baseline", ("ppow",),
          lambda c: (c.ppow.steps, c.ppow.batch_size, c.ppow.optim, 1)),
    Stage("continued", 200, "baseline",  # PPOW's seed offset: PPOW's sequences, in order
          ("continued", "ppow.seed", "ppow.steps", "ppow.batch_size", "ppow.ppo_epochs"),
          _continued),
    Stage("eval", 0, None, (), None),
)
BY_NAME = {s.name: s for s in TABLE}
NAMES = tuple(BY_NAME)
DRAFTERS = ("baseline", "ppow", "continued")


def stage_seed(c, name: str) -> int:
  """The seed of a stage's rng and data order. PPOW and the continued control add
  ``ppow.seed`` (the study's seeds: the same baseline, other rollouts and batches), and share
  their offset, so the control reads PPOW's sequences in PPOW's order."""
  extra = c.ppow.seed if name in ("ppow", "continued") else 0
  return c.seed + BY_NAME[name].seed_offset + extra


def chosen(c) -> tuple[str, ...]:
  """The stages ``config.stages`` asks for, in table order."""
  asked = [s.strip() for s in c.stages.split(",") if s.strip()]
  unknown = [s for s in asked if s not in BY_NAME]
  if unknown:
    raise UserError(f"config.stages: unknown stage {unknown[0]!r}; expected some of {NAMES}")
  return tuple(n for n in NAMES if n in asked)


def trained(c) -> tuple[str, ...]:
  """Drafter stages that exist in this run's recipe (the continued control can be off)."""
  return tuple(n for n in DRAFTERS if n != "continued" or c.continued.enabled)


def _leaves(node: Any, prefix: str) -> dict:
  if hasattr(node, "items"):
    out = {}
    for k, v in node.items():
      out.update(_leaves(v, f"{prefix}.{k}" if prefix else k))
    return out
  return {prefix: node}


def settings(c, name: str) -> dict[str, Any]:
  """Flat ``{dotted key: value}`` of everything that shaped stage ``name``'s artifact (its own
  keys and those of the stages it starts from), JSON-normalised for comparison."""
  out, stage = {}, BY_NAME[name]
  while stage is not None:
    for key in stage.shaped_by:
      node = c
      for part in key.split("."):
        node = node[part]
      out.update(_leaves(node, key))
    stage = BY_NAME[stage.starts_from] if stage.starts_from else None
  return json.loads(json.dumps(out, sort_keys=True))


def differences(recorded: dict, current: dict) -> list[str]:
  """``key (recorded -> current)`` for every key whose value differs (or exists on one side)."""
  keys = sorted(set(recorded) | set(current))
  missing = object()
  return [f"{k} ({recorded.get(k, '<absent>')!r} -> {current.get(k, '<absent>')!r})"
          for k in keys if recorded.get(k, missing) != current.get(k, missing)]
