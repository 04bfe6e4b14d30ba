"""A local corpus's files and their train/held-out split, both deterministic (no TFDS here).

Files are listed in sorted order, and a key (a file's relative path, a module's name) is held
out by a stable hash of it, so a split never depends on the machine, the order of listing, or
the other keys beside it.
"""

from __future__ import annotations

import fnmatch
import glob
import hashlib
import os
from typing import Sequence

from ppow_jax.errors import UserError

TRAIN = "train"
HELDOUT = "heldout"

_GLOB_CHARS = frozenset("*?[")
_ALWAYS_SKIPPED = ("__pycache__",)  # plus hidden files and directories (".git", ".venv", ...)


def has_glob(path: str) -> bool:
  return any(c in _GLOB_CHARS for c in path)


def _excluded(rel: str, exclude: Sequence[str]) -> bool:
  return any(fnmatch.fnmatchcase(rel, pattern) for pattern in exclude)


def _skipped_name(name: str) -> bool:
  return name.startswith(".") or name in _ALWAYS_SKIPPED


def list_files(source: str, include: str = "*",
               exclude: Sequence[str] = ()) -> tuple[str, list[str]]:
  """Files of a corpus as ``(root, sorted POSIX paths relative to root)``.

  ``source`` is a directory (walked recursively; ``include`` and ``exclude`` are fnmatch patterns
  on the relative path, where ``*`` also matches ``/``, and an excluded directory is not
  entered), a glob (``**`` recursive; ``root`` is its leading non-glob directory), or one file.
  Hidden entries and ``__pycache__`` are always skipped.

  Raises:
    UserError: the path does not exist, or nothing matches.
  """
  source = os.path.abspath(os.path.expanduser(source))
  if has_glob(source):
    root = source
    while has_glob(root):
      root = os.path.dirname(root)
    matches = (os.path.relpath(p, root) for p in glob.glob(source, recursive=True)
               if os.path.isfile(p))
    rels = sorted(r.replace(os.sep, "/") for r in matches
                  if not any(_skipped_name(part) for part in r.split(os.sep)))
    rels = [r for r in rels if not _excluded(r, exclude)]
    if not rels:
      raise UserError(f"corpus glob matches no files: {source}")
    return root, rels
  if os.path.isfile(source):
    return os.path.dirname(source), [os.path.basename(source)]
  if not os.path.isdir(source):
    raise UserError(f"corpus directory does not exist: {source}")
  rels = []
  for dirpath, dirnames, filenames in os.walk(source):
    rel_dir = os.path.relpath(dirpath, source).replace(os.sep, "/")
    prefix = "" if rel_dir == "." else rel_dir + "/"
    dirnames[:] = sorted(d for d in dirnames
                         if not _skipped_name(d) and not _excluded(prefix + d, exclude))
    for name in filenames:
      rel = prefix + name
      if (not _skipped_name(name) and fnmatch.fnmatchcase(rel, include)
          and not _excluded(rel, exclude)):
        rels.append(rel)
  if not rels:
    raise UserError(f"no files matching {include!r} (excluding {list(exclude)}) under {source}")
  return source, sorted(rels)


def heldout_score(key: str) -> float:
  """A uniform number in [0, 1) from a stable hash of ``key`` (not Python's salted ``hash``)."""
  digest = hashlib.sha256(key.encode("utf-8")).digest()
  return int.from_bytes(digest[:8], "big") / 2.0**64


def split_by_key(keys: Sequence[str], heldout_fraction: float,
                 what: str = "corpus") -> dict[str, list[str]]:
  """Deterministic train/held-out assignment by hashed key; neither split is left empty.

  A key is held out when its score is below ``heldout_fraction``. When the hash leaves a split
  empty (small corpora), the key with the lowest (highest) score moves to held-out (train), so
  the result is still a pure function of the keys.
  """
  check_fraction(heldout_fraction)
  keys = list(keys)
  if heldout_fraction == 0:
    return {TRAIN: keys}
  if len(keys) < 2:
    raise UserError(f"{what} has {len(keys)} file(s): cannot hold out a fraction by file; set "
                    f"heldout_fraction=0")
  scores = {k: heldout_score(k) for k in keys}
  heldout = {k for k in keys if scores[k] < heldout_fraction}
  if not heldout:
    heldout = {min(keys, key=scores.__getitem__)}
  if len(heldout) == len(keys):
    heldout.discard(max(keys, key=scores.__getitem__))
  return {TRAIN: [k for k in keys if k not in heldout],
          HELDOUT: [k for k in keys if k in heldout]}


def check_fraction(fraction: float) -> None:
  if not 0 <= fraction < 1:
    raise UserError(f"heldout_fraction must be in [0, 1), got {fraction}")
