"""Orbax checkpoints of a training stage: train state and data-iterator position, saved together.

Two managers share one directory: ``latest/`` keeps the last N steps (async saves, atomic
commits: an interrupted save leaves no half-written step behind) and ``best/`` keeps the
single step with the highest evaluation τ. Restoring always picks the newest committed step
of ``latest/``, so a run killed outright loses at most ``save_every`` steps and, because the
data position and the RNG are in the checkpoint, ends bit-identical to an uninterrupted run.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp


class Checkpointer:

  def __init__(self, directory: str, max_to_keep: int = 3, async_save: bool = True):
    directory = os.path.abspath(directory)
    opts = lambda keep: ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, enable_async_checkpointing=async_save)
    self.directory = directory
    self._latest = ocp.CheckpointManager(os.path.join(directory, "latest"),
                                         options=opts(max_to_keep))
    self._best = ocp.CheckpointManager(
        os.path.join(directory, "best"),
        options=ocp.CheckpointManagerOptions(
            max_to_keep=1, create=True, best_fn=lambda m: m["eval_tau"], best_mode="max",
            enable_async_checkpointing=False))

  @staticmethod
  def _args(state: Any, data_state: dict) -> ocp.args.Composite:
    return ocp.args.Composite(state=ocp.args.StandardSave(state),
                              data=ocp.args.JsonSave(data_state))

  def save(self, step: int, state: Any, data_state: dict, force: bool = False) -> None:
    self._latest.save(step, args=self._args(state, data_state), force=force)

  def save_best(self, step: int, state: Any, data_state: dict, eval_tau: float) -> None:
    self._best.save(step, args=self._args(state, data_state), metrics={"eval_tau": eval_tau},
                    force=True)

  def latest_step(self) -> Optional[int]:
    return self._latest.latest_step()

  def best_step(self) -> Optional[int]:
    return self._best.best_step()

  def restore(self, abstract_state: Any, step: Optional[int] = None, best: bool = False
              ) -> tuple[Any, dict]:
    """Restore ``(state, data_state)`` into the structure/shardings of ``abstract_state``."""
    mgr = self._best if best else self._latest
    step = (mgr.best_step() if best else mgr.latest_step()) if step is None else step
    abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, abstract_state)
    out = mgr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                    data=ocp.args.JsonRestore()))
    return out["state"], out["data"]

  def wait(self) -> None:
    self._latest.wait_until_finished()

  def close(self) -> None:
    self._latest.wait_until_finished()
    self._latest.close()
    self._best.close()
