"""Orbax checkpoints of a training stage: train state, data-iterator position and running
totals, saved together.

The manager keeps the last N steps (async saves, atomic commits: an interrupted save leaves no
half-written step behind). Restoring picks the newest committed step that reads back; a step
that does not (a corrupted file) is reported, deleted, and the next older one is tried. A run
killed outright thus loses at most ``save_every`` steps and, because the data position and the
RNG are in the checkpoint, ends bit-identical to an uninterrupted run.
"""

from __future__ import annotations

import os
from typing import Any, Optional

from absl import logging
import jax
import orbax.checkpoint as ocp

from ppow_jax.errors import UserError


class Checkpointer:

  def __init__(self, directory: str, max_to_keep: int = 3, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    self._latest = ocp.CheckpointManager(
        os.path.join(self.directory, "latest"),
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                             enable_async_checkpointing=async_save))

  def save(self, step: int, state: Any, data_state: dict, force: bool = False,
           totals: Optional[dict] = None) -> None:
    """``totals``: running sums of the stage (windows, seconds) that a resume continues."""
    args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                              data=ocp.args.JsonSave({"iterator": data_state,
                                                      "totals": totals or {}}))
    self._latest.save(step, args=args, force=force)

  def latest_step(self) -> Optional[int]:
    return self._latest.latest_step()

  def restore(self, abstract_state: Any, step: Optional[int] = None
              ) -> tuple[Any, dict, dict]:
    """``(state, data_state, totals)`` of ``step`` (default: the newest that reads back),
    in the structure and shardings of ``abstract_state``."""
    abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, abstract_state)
    args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                              data=ocp.args.JsonRestore())
    if step is not None:
      out = self._latest.restore(step, args=args)
      return out["state"], out["data"]["iterator"], out["data"]["totals"]
    bad, errors = [], []
    for s in sorted(self._latest.all_steps(), reverse=True):
      try:
        out = self._latest.restore(s, args=args)
      except Exception as e:  # a damaged step: say so and try the one before
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        logging.warning("checkpoint step %d in %s does not read back (%s); trying an older one",
                        s, self.directory, first)
        bad.append(s)
        errors.append(f"step {s}: {first[:200]}")
        continue
      for b in bad:  # an older step read back, so those are damaged: training redoes them
        self._latest.delete(b)
      return out["state"], out["data"]["iterator"], out["data"]["totals"]
    raise UserError(f"{self.directory}: no checkpoint reads back ({'; '.join(errors)}); "
                    f"delete that directory to start the stage over")

  def wait(self) -> None:
    self._latest.wait_until_finished()

  def close(self) -> None:
    self._latest.wait_until_finished()
    self._latest.close()
