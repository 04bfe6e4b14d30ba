"""The training loop of one stage: resume, step, log, checkpoint, stop cleanly.

* Resume: the newest committed checkpoint of the stage (state + data position + running totals)
  is restored, so the same command continues an interrupted run and ends bit-identical on CPU;
  the metrics file forgets the steps after that checkpoint (they are trained again), so each
  step appears once, and the totals count every step once.
* The host never waits for the device inside the loop: step n+1 is dispatched before step
  n's metrics are read (nanodo's pattern).
* A NaN/Inf in the loss stops the run with the step number; the state of that step is never
  saved, so the last checkpoint is the last good one.
* SIGTERM (preemption) finishes the current step, saves, and exits with a message. In a
  multi-process job JAX's preemption service (``sharding.stop_requested``) has every process
  stop after the same step, whichever got the signal.
"""

from __future__ import annotations

import dataclasses
import signal
import sys
import time
from typing import Any, Callable, Optional

from absl import logging
import numpy as np

from ppow_jax import sharding
from ppow_jax.checkpoint import Checkpointer


class NonFiniteError(RuntimeError):
  """The loss went NaN/Inf; the message names the step and the last good checkpoint."""


@dataclasses.dataclass
class LoopConfig:
  num_steps: int
  save_every: int = 50
  log_every: int = 10
  max_to_keep: int = 3
  eval_every: int = 0  # steps between held-out τ evaluations (logged as eval_tau); 0 = never

  def due(self, step_no: int) -> bool:
    """Whether step ``step_no``'s state is saved or evaluated (it must not be donated yet)."""
    return step_no % self.save_every == 0 or step_no == self.num_steps or bool(
        self.eval_every and step_no % self.eval_every == 0)


class _Preemption:
  """Turns SIGTERM into a flag the loop checks between steps (one process; in a multi-process
  job JAX's preemption service has the signal)."""

  def __init__(self):
    self.requested = False
    self._old = None

  def __enter__(self):
    if sharding.is_multiprocess():
      return self
    try:
      self._old = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread (e.g. some test runners): no handler
      self._old = None
    return self

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def __exit__(self, *exc):
    if self._old is not None:
      signal.signal(signal.SIGTERM, self._old)


def _scalars(metrics: dict) -> dict:
  out = {}
  for k, v in metrics.items():
    v = np.asarray(v)
    out[k] = float(v) if v.ndim == 0 else v
  return out

# Per-step metrics summed into a stage's totals (a step that lacks one counts 0).
COUNTED = ("windows", "updates", "target_calls", "target_tokens")


def run(name: str, step_fn: Callable, state: Any, step_args: tuple, data: Any,
        ckpt_dir: str, cfg: LoopConfig, writer: Optional[Any] = None,
        evaluate: Optional[Callable[[Any], float]] = None,
        totals: Optional[dict] = None) -> Any:
  """Run ``state, metrics = step_fn(state, *step_args, batch)`` until ``cfg.num_steps``.

  ``data`` is an iterator with ``get_state()``/``set_state()`` (JSON-serialisable).
  ``evaluate(state) -> τ`` runs every ``cfg.eval_every`` steps and at the end (``eval_tau``).
  ``totals`` (filled in): the steps' ``COUNTED`` metrics summed (windows, updates, target calls
  and tokens) and ``seconds`` of training, over every run of this stage, resumed ones included.
  Returns the final state.
  """
  ckpt = Checkpointer(ckpt_dir, cfg.max_to_keep)
  totals = {} if totals is None else totals
  totals.update({key: 0.0 for key in COUNTED}, seconds=0.0)
  start = 0
  if ckpt.latest_step() is not None:
    state, data_state, saved = ckpt.restore(state)
    data.set_state(data_state)
    totals.update(saved)
    start = int(ckpt.latest_step())
    logging.info("[%s] resumed from step %d (%s)", name, start, ckpt_dir)
  if writer is not None:
    writer.rewind(start)  # rows of steps after the checkpoint are written again below
  if start >= cfg.num_steps:
    ckpt.close()
    return state
  t_start, seconds_before = time.perf_counter(), totals["seconds"]

  pending = None  # (step number, metrics of that step, data state after it, state)
  t_last, steps_since = time.perf_counter(), 0

  def finish(pending_item, force_save: bool):
    nonlocal t_last, steps_since
    step_no, metrics, data_state, new_state = pending_item
    m = _scalars(metrics)
    loss = m.get("loss", 0.0)
    if not np.isfinite(loss):
      raise NonFiniteError(
          f"[{name}] loss is {loss} at step {step_no}; stopped. Last good checkpoint: step "
          f"{ckpt.latest_step()} in {ckpt_dir}")
    steps_since += 1
    last = step_no == cfg.num_steps
    if evaluate is not None and cfg.eval_every and (step_no % cfg.eval_every == 0 or last):
      m["eval_tau"] = float(evaluate(new_state))  # in the step's own row: one row per step
    if step_no % cfg.log_every == 0 or last or "eval_tau" in m:
      now = time.perf_counter()
      m["windows_per_s"] = m.get("windows", 0.0) * steps_since / max(now - t_last, 1e-9)
      t_last, steps_since = now, 0
      shown = " ".join(f"{k}={v:.4g}" for k, v in m.items()
                       if isinstance(v, float) and k != "windows")
      logging.info("[%s] step %d/%d %s", name, step_no, cfg.num_steps, shown)
      print(f"[{name}] {step_no}/{cfg.num_steps} {shown}", file=sys.stderr, flush=True)
      if writer is not None:
        writer.write(step_no, m)
    for key in COUNTED:
      totals[key] += float(m.get(key, 0.0))
    totals["seconds"] = seconds_before + time.perf_counter() - t_start
    if force_save or step_no % cfg.save_every == 0 or last:
      ckpt.save(step_no, new_state, data_state, force=True, totals=dict(totals))

  # ``finally`` waits for an in-flight async save even when the loop dies (Ctrl-C, errors)
  with _Preemption() as preempt:
    try:
      for step_no in range(start + 1, cfg.num_steps + 1):
        if pending is not None and cfg.due(pending[0]):
          # a step that donates its input state would free the buffers about to be used
          finish(pending, False)
          pending = None
        batch = next(data)
        data_state = data.get_state()
        state, metrics = step_fn(state, *step_args, batch)
        if pending is not None:
          finish(pending, False)
        pending = (step_no, metrics, data_state, state)
        if sharding.stop_requested(step_no, preempt.requested):
          finish(pending, True)
          logging.warning("[%s] SIGTERM: saved step %d, exiting", name, step_no)
          print(f"[{name}] interrupted: saved step {step_no}; rerun the same command to resume",
                file=sys.stderr, flush=True)
          raise SystemExit(143)
      finish(pending, False)
    finally:
      ckpt.close()
  return state
