"""TensorBoard (via tensorboardX, no TensorFlow needed) plus a JSONL copy for plots/reports.

The JSONL copy has one row per logged step: a resumed stage first ``rewind`` s it to its
checkpoint, dropping the rows of steps that are trained again.
"""

from __future__ import annotations

import json
import os

import numpy as np

from ppow_jax import cli, sharding


class MetricWriter:
  """Only the primary process writes; others get a no-op writer."""

  def __init__(self, logdir: str, enabled: bool = True):
    self.enabled = enabled and sharding.is_primary()
    self._tb = None
    self._jsonl = None
    self._path = os.path.join(logdir, "metrics.jsonl")
    if self.enabled:
      from tensorboardX import SummaryWriter  # deferred: heavy import
      os.makedirs(logdir, exist_ok=True)
      self._tb = SummaryWriter(logdir)
      self._jsonl = open(self._path, "a")

  def rewind(self, step: int) -> None:
    """Drops the JSONL rows after ``step`` (a resumed run trains those steps again)."""
    if not self.enabled:
      return
    self._jsonl.close()
    with open(self._path) as f:
      rows = [line for line in f if line.strip()]
    keep = []
    for line in rows:
      try:
        if json.loads(line)["step"] <= step:
          keep.append(line if line.endswith("\n") else line + "\n")
      except (ValueError, KeyError):
        pass  # a line cut short by a kill
    cli.write_text(self._path, "".join(keep))
    self._jsonl = open(self._path, "a")

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
