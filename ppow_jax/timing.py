"""How every speed number here is taken, and the machine it is taken on.

One untimed call of each candidate first (it compiles and warms up; its result is kept), then
``repeats`` rounds that call every candidate in turn, so that machine noise hits all of them
alike; the reported time is the median of a candidate's rounds. Results are waited for
(``jax.block_until_ready``): JAX dispatches asynchronously.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import time
from typing import Any, Callable, Optional

import jax
import numpy as np


@dataclasses.dataclass
class Timed:
  first: dict[str, Any]  # each candidate's result of the untimed first call
  first_seconds: dict[str, float]  # compile + first run
  seconds: dict[str, list[float]]  # the timed rounds
  last: dict[str, Any]  # each candidate's result of the last timed round

  def median(self, name: str) -> float:
    return float(np.median(self.seconds[name]))


def _call(fn: Callable[[], Any]) -> tuple[Any, float]:
  t0 = time.perf_counter()
  out = jax.block_until_ready(fn())
  return out, time.perf_counter() - t0


def rate_beyond(count: int, full_s: float, part_s: float) -> Optional[float]:
  """``count`` items per second of the time a whole run takes beyond a part of it timed on
  its own (e.g. tokens of decoding without the prompt pass); None when noise makes the part
  as slow as the whole (no rate can be told)."""
  if full_s <= part_s:
    return None
  return count / (full_s - part_s)


def interleaved(fns: dict[str, Callable[[], Any]], repeats: int, alternate: bool = False
                ) -> Timed:
  """See the module docstring; ``alternate`` reverses the order every other round."""
  timed = Timed({}, {}, {k: [] for k in fns}, {})
  for name, fn in fns.items():
    timed.first[name], timed.first_seconds[name] = _call(fn)
  names = list(fns)
  for r in range(repeats):
    for name in (names[::-1] if alternate and r % 2 else names):
      timed.last[name], sec = _call(fns[name])
      timed.seconds[name].append(sec)
  return timed


def bandwidth_summary(weight_bytes: int, step_s: dict[str, Optional[float]],
                      peak_gbs: float) -> dict:
  """GB/s of weights that an AR step reads in each timing of ``step_s``, and (with the
  device's ``peak_gbs``) each step over the time its weights take at that bandwidth. A step
  time that noise left non-positive (a difference of two timings) gives None."""
  out = {"weight_bytes_per_step": weight_bytes, "peak_gbs": peak_gbs or None}
  for name, sec in step_s.items():
    known = sec is not None and sec > 0
    out[f"{name}_gbs"] = weight_bytes / sec / 1e9 if known else None
    out[f"{name}_over_bandwidth_time"] = (sec / (weight_bytes / (peak_gbs * 1e9))
                                          if known and peak_gbs else None)
  return out


def machine_info() -> dict:
  """What a timing depends on: devices, CPU, software versions, XLA's flags and the load
  average."""
  cpu = platform.processor() or ""
  try:
    with open("/proc/cpuinfo") as f:
      cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
  except OSError:
    pass
  dev = jax.devices()[0]
  return {"platform": dev.platform, "device_kind": dev.device_kind,
          "num_devices": jax.device_count(), "cpu": cpu, "cpu_count": os.cpu_count(),
          "machine": platform.machine(), "os": platform.platform(),
          "python": platform.python_version(), "jax": jax.__version__,
          "xla_flags": os.environ.get("XLA_FLAGS", ""), "load_average": list(os.getloadavg())}
