"""Every path of a run directory, its lock, and the record of the settings behind each artifact.

  <workdir>/
    .lock                      held by the running process 0 (pid, host)
    config_history.jsonl       one line per run started here (appended, never rewritten)
    tokenizer/  tfds/          the BPE trained here, prepared datasets
    cache/                     regenerated answers and target features, keyed by what shaped them
    target/                    the embedded target (HF layout) + ppow_target_info.json
    checkpoints/<stage>/       orbax steps + settings.json (the settings they were made with)
    drafters/<stage>/          exported drafters + ppow_stage_info.json (incl. the settings)
    tensorboard/<stage>/       event files + metrics.jsonl
    report.json report.md *.png

A rerun whose settings differ from a stage's record stops with the differing keys
(``check_settings``), so an old artifact never silently stands for a new recipe.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import glob
import json
import os
import shutil
import socket
import sys
from typing import Any, Iterator, Optional

from ppow_jax import stages
from ppow_jax.errors import UserError

STAGE_INFO = "ppow_stage_info.json"
TARGET_INFO = "ppow_target_info.json"


@dataclasses.dataclass(frozen=True)
class Layout:
  root: str

  # ---- Paths ---------------------------------------------------------------------------------

  def path(self, *parts: str) -> str:
    return os.path.join(self.root, *parts)

  @property
  def lock_file(self) -> str:
    return self.path(".lock")

  @property
  def config_history(self) -> str:
    return self.path("config_history.jsonl")

  @property
  def tokenizer(self) -> str:
    return self.path("tokenizer")

  @property
  def tfds(self) -> str:
    return self.path("tfds")

  @property
  def cache(self) -> str:
    """Derived data kept between runs: regenerated answers, cached target features."""
    return self.path("cache")

  def export(self, stage: str) -> str:
    """Where a stage's result lives in Hugging Face layout (``target/`` or ``drafters/<s>``)."""
    return self.path("target") if stage == "target" else self.path("drafters", stage)

  def info(self, stage: str) -> str:
    """The stage's info file, written last: its presence means the stage is done."""
    return os.path.join(self.export(stage), TARGET_INFO if stage == "target" else STAGE_INFO)

  def checkpoints(self, stage: str) -> str:
    return self.path("checkpoints", stage)

  def settings_file(self, stage: str) -> str:
    return os.path.join(self.checkpoints(stage), "settings.json")

  def tensorboard(self, stage: str) -> str:
    return self.path("tensorboard", stage)

  def metrics(self, stage: str) -> str:
    return os.path.join(self.tensorboard(stage), "metrics.jsonl")

  @property
  def report_json(self) -> str:
    return self.path("report.json")

  @property
  def report_md(self) -> str:
    return self.path("report.md")

  def done(self, stage: str) -> bool:
    return os.path.isfile(self.info(stage))

  def read_info(self, stage: str) -> Optional[dict]:
    if not self.done(stage):
      return None
    with open(self.info(stage)) as f:
      return json.load(f)

  # ---- Safety --------------------------------------------------------------------------------

  def prepare(self) -> None:
    """Creates the directory; a file in its place or no write permission is a UserError."""
    if os.path.exists(self.root) and not os.path.isdir(self.root):
      raise UserError(f"--workdir {self.root}: exists and is not a directory")
    try:
      os.makedirs(self.root, exist_ok=True)
    except OSError as e:
      raise UserError(f"--workdir {self.root}: cannot create it ({e.strerror})") from None
    if not os.access(self.root, os.W_OK | os.X_OK):
      raise UserError(f"--workdir {self.root}: not writable (a run writes checkpoints, "
                      f"exports and the report there)")

  @contextlib.contextmanager
  def lock(self, primary: bool = True) -> Iterator[None]:
    """Held for the whole run by process 0 (other hosts work under its lock). A lock whose
    process is gone (same host) is stale and taken over; a live one is a UserError."""
    if not primary:
      yield
      return
    me = {"pid": os.getpid(), "host": socket.gethostname(),
          "since": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    for _ in range(2):
      try:
        fd = os.open(self.lock_file, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
      except FileExistsError:
        holder = self._holder()
        if holder is not None and _alive(holder):
          raise UserError(
              f"--workdir {self.root} is in use by process {holder.get('pid')} on "
              f"{holder.get('host')} (since {holder.get('since')}); wait for it to finish or "
              f"use another --workdir") from None
        with contextlib.suppress(FileNotFoundError):  # stale: its process is gone
          os.remove(self.lock_file)
        continue
      with os.fdopen(fd, "w") as f:
        json.dump(me, f)
      break
    else:
      raise UserError(f"--workdir {self.root}: could not take the lock {self.lock_file}")
    try:
      yield
    finally:
      if (self._holder() or {}).get("pid") == me["pid"]:
        os.remove(self.lock_file)

  def _holder(self) -> Optional[dict]:
    try:
      with open(self.lock_file) as f:
        return json.load(f)
    except (OSError, ValueError):
      return None  # vanished, or half-written by a process killed while writing it

  def append_history(self, config: Any, argv: Optional[list] = None) -> None:
    """One JSON line per run: when, the command, and the whole config."""
    row = {"time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "argv": list(sys.argv if argv is None else argv),
           "config": json.loads(config.to_json_best_effort())}
    with open(self.config_history, "a") as f:
      f.write(json.dumps(row) + "\n")

  # ---- Settings behind each artifact ---------------------------------------------------------

  def recorded_settings(self, stage: str) -> Optional[dict]:
    """The settings a stage's artifact (finished) or checkpoints (half-finished) were made with."""
    info = self.read_info(stage)
    if info is not None and "settings" in info:
      return info["settings"]
    if os.path.isfile(self.settings_file(stage)):
      with open(self.settings_file(stage)) as f:
        return json.load(f)
    return None

  def check_settings(self, c, names: tuple[str, ...]) -> None:
    """UserError naming the differing keys when a stage's record disagrees with ``c``."""
    for name in names:
      recorded = self.recorded_settings(name)
      if recorded is None:
        continue
      diff = stages.differences(recorded, stages.settings(c, name))
      if diff:
        raise UserError(
            f"--workdir {self.root}: stage {name!r} was made with other settings: "
            f"{', '.join(diff)}; rerun with the same config, or pass --retrain={name} to "
            f"discard it (and the stages that start from it)")

  def discard(self, stage: str) -> None:
    """Deletes a stage's checkpoints, export and metrics (``--retrain``)."""
    for path in (self.checkpoints(stage), self.export(stage), self.tensorboard(stage)):
      if os.path.isdir(path):
        shutil.rmtree(path)

  def remove_leftovers(self) -> None:
    """Temporary export directories of a killed run (``drafters/.baseline.tmp-*``, ...)."""
    for pattern in ("drafters/.*.tmp-*", "drafters/.*.old-*", ".target.tmp-*", ".target.old-*",
                    "tokenizer.tmp"):
      for path in glob.glob(self.path(pattern)):
        shutil.rmtree(path, ignore_errors=True)


def make_readable(directory: str) -> None:
  """Exports are for others to load: mode 0755 (a temporary directory renamed into place is
  created 0700)."""
  os.chmod(directory, 0o755)


def _alive(holder: dict) -> bool:
  """Whether the lock's process still runs; on another host we cannot tell, so assume so."""
  if holder.get("host") != socket.gethostname():
    return True
  try:
    os.kill(int(holder["pid"]), 0)
  except (ProcessLookupError, KeyError, ValueError, TypeError):
    return False
  except PermissionError:
    return True  # exists, owned by another user
  return True
