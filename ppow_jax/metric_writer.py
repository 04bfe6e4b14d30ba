"""TensorBoard (via tensorboardX, no TensorFlow needed) plus a JSONL copy for plots/reports."""

from __future__ import annotations

import json
import os

import jax
import numpy as np


class MetricWriter:
  """Only the primary process writes; others get a no-op writer."""

  def __init__(self, logdir: str, enabled: bool = True):
    self.enabled = enabled and jax.process_index() == 0
    self._tb = None
    self._jsonl = None
    if self.enabled:
      from tensorboardX import SummaryWriter  # deferred: heavy import
      os.makedirs(logdir, exist_ok=True)
      self._tb = SummaryWriter(logdir)
      self._jsonl = open(os.path.join(logdir, "metrics.jsonl"), "a")

  def write(self, step: int, metrics: dict) -> None:
    if not self.enabled:
      return
    row = {"step": int(step)}
    for k, v in metrics.items():
      v = np.asarray(v)
      if v.ndim == 0:
        self._tb.add_scalar(k, float(v), step)
        row[k] = float(v)
      elif k.endswith("_hist"):  # counts per bin (e.g. accepted length 0..K)
        values = np.repeat(np.arange(len(v)), v.astype(np.int64))
        if len(values):
          self._tb.add_histogram(k, values, step, bins=np.arange(len(v) + 1) - 0.5)
        row[k] = v.tolist()
    self._jsonl.write(json.dumps(row) + "\n")
    self._jsonl.flush()

  def close(self) -> None:
    if self.enabled:
      self._tb.close()
      self._jsonl.close()
