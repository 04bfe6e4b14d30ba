"""TensorFlow Datasets builders for local corpora, read without TensorFlow.

Why TFDS, and why ``array_record`` + ``as_data_source()``: TFDS gives a prepared dataset a
versioned, self-describing home (``<data_dir>/<name>/<config>/<version>/`` with
``dataset_info.json`` and ``features.json``) that is built once and then shared by every run and
host, and ``array_record`` files give O(1) random access. Random access is what grain needs to
shuffle globally, shard per host and checkpoint an iterator as a few integers. Reading through
``as_data_source()`` needs only ``array_record`` -- not TensorFlow, which ``as_dataset``,
``tfds.load`` and the tfrecord format would pull in (several hundred MB, a second runtime
beside JAX). Text comes back as ``bytes``.

Nothing here downloads:

* ``TextCorpus`` and ``Conversations`` read local files only;
* ``load_prepared`` opens an already prepared dataset from its files alone (TFDS's read-only
  builder, whose ``download_and_prepare`` cannot run), never from builder code that could
  fetch data, and GCS lookups stay disabled.

A builder's config name carries a digest of its source (absolute path, options, and the
size/mtime listing of its files), so two corpora -- or one corpus after its files change --
never share a directory in the ``data_dir`` cache.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import glob
import hashlib
import json
import os
import re
from typing import Any, Iterator, Optional, Sequence

from absl import logging
import tensorflow_datasets as tfds

from ppow_jax.data import prompts
from ppow_jax.errors import UserError

TRAIN = "train"
HELDOUT = "heldout"

# GCS is already off by default in TFDS 4.9.x; pin it so no version can reach for the network.
_gcs_utils = tfds.core.utils.gcs_utils
if hasattr(_gcs_utils, "_is_gcs_disabled"):
  _gcs_utils._is_gcs_disabled = True  # pylint: disable=protected-access

_GLOB_CHARS = frozenset("*?[")
_ALWAYS_SKIPPED = ("__pycache__",)  # plus hidden files and directories (".git", ".venv", ...)


# ---------------------------------------------------------------- file listing and splits


def _has_glob(path: str) -> bool:
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
  if _has_glob(source):
    root = source
    while _has_glob(root):
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
  _check_fraction(heldout_fraction)
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


def _check_fraction(fraction: float) -> None:
  if not 0 <= fraction < 1:
    raise UserError(f"heldout_fraction must be in [0, 1), got {fraction}")


def _digest(identity: dict, root: str, rels: Sequence[str]) -> str:
  """Digest of a corpus's identity: its options and the size/mtime listing of its files."""
  h = hashlib.sha256(json.dumps(identity, sort_keys=True).encode())
  for rel in rels:
    stat = os.stat(os.path.join(root, rel))
    h.update(f"{rel}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
  return h.hexdigest()[:12]


def _slug(text: str) -> str:
  return re.sub(r"[^a-z0-9_]+", "_", text.lower()).strip("_")[:40] or "corpus"


class _LocalFilesBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Base of builders that read local files: no URLs, hence no checksum file to look for.

  TFDS looks for a checksums file next to the builder's code; for a class inside an installed
  package that path lookup needs ``importlib_resources`` (absent on Python >= 3.9 installs).
  """

  @tfds.core.utils.classproperty
  @classmethod
  def url_infos(cls) -> None:
    return None


# ---------------------------------------------------------------- TextCorpus


@dataclasses.dataclass(eq=False)
class TextCorpusConfig(tfds.core.BuilderConfig):
  """A text/code corpus: every matching file is one example.

  ``name`` is a readable prefix (default: the source's base name); ``-<digest>`` is appended
  so the config name identifies the corpus, whatever prefix was asked for.
  """
  name: str = ""
  source: str = ""  # directory, glob, or single file
  include: str = "*"  # fnmatch pattern on relative paths of a directory source ("*.py")
  exclude: tuple[str, ...] = ()  # fnmatch patterns; matching directories are not entered
  heldout_fraction: float = 0.05  # share of *files* held out, chosen by hash of the path

  def __post_init__(self):
    if not self.source:
      raise UserError("TextCorpusConfig needs a source (directory, glob or file)")
    _check_fraction(self.heldout_fraction)
    self.source = os.path.abspath(os.path.expanduser(self.source))
    self.exclude = tuple(self.exclude)
    self.root, self.files = list_files(self.source, self.include, self.exclude)
    identity = {"source": self.source, "include": self.include, "exclude": list(self.exclude),
                "heldout_fraction": self.heldout_fraction}
    digest = _digest(identity, self.root, self.files)
    if not self.name.endswith(digest):
      prefix = _slug(self.name or os.path.basename(self.root) or "corpus")
      self.name = f"{prefix}-{digest}"
    if self.description is None:
      self.description = (f"{len(self.files)} files {self.include!r} from {self.source}, "
                          f"excluding {list(self.exclude)}; held out by path hash: "
                          f"{self.heldout_fraction}")


class TextCorpus(_LocalFilesBuilder, skip_registration=True):
  """Local text or code files; features ``text`` and ``path`` (relative to the corpus root).

  Splits ``train`` and, when ``heldout_fraction > 0``, ``heldout``, assigned *by file* from a
  hash of the relative path, so a file never leaks between them and the split survives adding
  other files. Files keep their sorted order (shuffling is the input pipeline's job). Binary
  files (a NUL byte) are skipped; invalid UTF-8 is replaced, not dropped.
  """
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}

  def __init__(self, *, config: Optional[TextCorpusConfig] = None, source: Optional[str] = None,
               include: str = "*", exclude: Sequence[str] = (), heldout_fraction: float = 0.05,
               data_dir: Optional[str] = None, **kwargs: Any):
    if config is None:
      if source is None:
        raise UserError("TextCorpus needs source= (directory, glob or file) or config=")
      config = TextCorpusConfig(source=source, include=include, exclude=tuple(exclude),
                                heldout_fraction=heldout_fraction)
    kwargs.setdefault("file_format", "array_record")
    super().__init__(config=config, data_dir=data_dir, **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=self.builder_config.description,
        features=tfds.features.FeaturesDict({"text": tfds.features.Text(),
                                             "path": tfds.features.Text()}),
        disable_shuffling=True)

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download.
    cfg = self.builder_config
    splits = split_by_key(cfg.files, cfg.heldout_fraction, what=f"corpus {cfg.source}")
    return {name: self._generate_examples(rels) for name, rels in splits.items()}

  def _generate_examples(self, rels: Sequence[str]) -> Iterator[tuple[str, dict]]:
    root = self.builder_config.root
    replaced = 0
    for rel in rels:
      with open(os.path.join(root, rel), "rb") as f:
        data = f.read()
      if b"\0" in data:
        logging.warning("TextCorpus: skipping binary file %s", os.path.join(root, rel))
        continue
      try:
        text = data.decode("utf-8")
      except UnicodeDecodeError:
        text = data.decode("utf-8", errors="replace")
        replaced += 1
      yield rel, {"text": text, "path": rel}
    if replaced:
      logging.info("TextCorpus: %d files under %s were not valid UTF-8 (bad bytes replaced)",
                   replaced, root)


# ---------------------------------------------------------------- Conversations


@dataclasses.dataclass(eq=False)
class ConversationsConfig(tfds.core.BuilderConfig):
  """Chat data from JSONL files in ShareGPT or OpenAI form (see ``prompts.py``)."""
  name: str = ""
  source: str = ""  # a JSONL file or a glob of them
  skip_bad_lines: bool = False  # skip malformed lines with a warning instead of failing
  heldout_fraction: float = 0.0  # share of conversations held out, by hash of their turns

  def __post_init__(self):
    if not self.source:
      raise UserError("ConversationsConfig needs a source (JSONL file or glob)")
    _check_fraction(self.heldout_fraction)
    self.source = os.path.abspath(os.path.expanduser(self.source))
    self.root, self.files = list_files(self.source)
    identity = {"source": self.source, "skip_bad_lines": self.skip_bad_lines,
                "heldout_fraction": self.heldout_fraction}
    digest = _digest(identity, self.root, self.files)
    if not self.name.endswith(digest):
      stem = (os.path.basename(self.root) if _has_glob(self.source)
              else os.path.splitext(os.path.basename(self.source))[0])
      prefix = _slug(self.name or stem)
      self.name = f"{prefix}-{digest}"
    if self.description is None:
      self.description = f"Conversations from {self.source} ({len(self.files)} files)"


class Conversations(_LocalFilesBuilder, skip_registration=True):
  """Conversations as parallel ``roles``/``contents`` lists, plus ``where`` (``file:line``).

  Roles are normalised to system/user/assistant. A malformed line raises ``UserError`` naming
  ``file:line`` (or is skipped with a warning under ``skip_bad_lines``). Split ``train`` and,
  when ``heldout_fraction > 0``, ``heldout`` chosen by a hash of the conversation's content, so
  duplicates never straddle the two.
  """
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}

  def __init__(self, *, config: Optional[ConversationsConfig] = None,
               source: Optional[str] = None, skip_bad_lines: bool = False,
               heldout_fraction: float = 0.0, data_dir: Optional[str] = None, **kwargs: Any):
    if config is None:
      if source is None:
        raise UserError("Conversations needs source= (a JSONL file or glob) or config=")
      config = ConversationsConfig(source=source, skip_bad_lines=skip_bad_lines,
                                   heldout_fraction=heldout_fraction)
    kwargs.setdefault("file_format", "array_record")
    super().__init__(config=config, data_dir=data_dir, **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=self.builder_config.description,
        features=tfds.features.FeaturesDict({
            "roles": tfds.features.Sequence(tfds.features.Text()),
            "contents": tfds.features.Sequence(tfds.features.Text()),
            "where": tfds.features.Text(),
        }),
        disable_shuffling=True)

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download.
    if self.builder_config.heldout_fraction == 0:
      return {TRAIN: self._generate_examples(None)}
    return {TRAIN: self._generate_examples(False), HELDOUT: self._generate_examples(True)}

  def _generate_examples(self, heldout: Optional[bool]) -> Iterator[tuple[str, dict]]:
    cfg = self.builder_config
    for rel in cfg.files:
      for where, turns in prompts.iter_jsonl_turns(os.path.join(cfg.root, rel),
                                                   cfg.skip_bad_lines):
        if heldout is not None:
          score = heldout_score(json.dumps(turns, ensure_ascii=False))
          if (score < cfg.heldout_fraction) != heldout:
            continue
        yield where, {"roles": [r for r, _ in turns], "contents": [c for _, c in turns],
                      "where": where}


def example_turns(example: dict) -> list[prompts.Turn]:
  """Turns back from a ``Conversations`` example as read by ``as_data_source`` (bytes)."""
  def text(value):
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)
  return [(text(r), text(c)) for r, c in zip(example["roles"], example["contents"])]


# ---------------------------------------------------------------- preparing and loading


def prepare(builder: tfds.core.DatasetBuilder) -> dict[str, Sequence[dict]]:
  """Builds the dataset once (a no-op when already prepared) and opens every split.

  TFDS writes into a temporary directory and renames it when done, so an interrupted build
  leaves nothing that passes for prepared. On several hosts, prepare on one host first (or on
  each, into a per-host ``data_dir``).

  Returns:
    ``{split: random-access data source}`` (``len`` and ``[i]``, examples as dicts of numpy
    values/bytes) -- what ``pipeline.make_train_iterator`` takes.

  Raises:
    UserError: malformed input, or a split with no examples (naming the source).
  """
  if not builder.is_prepared():
    config = builder.builder_config
    source = getattr(config, "source", builder.name)
    try:
      builder.download_and_prepare(
          download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    except AssertionError as e:
      if "No examples were yielded" not in str(e):
        raise
      split = re.search(r'split "([^"]+)"', str(e))
      raise UserError(f"dataset from {source} is empty"
                      + (f" (split {split.group(1)!r})" if split else "")
                      + ": no usable examples") from None
    logging.info("Prepared %s at %s", builder.name, builder.data_dir)
  return dict(builder.as_data_source())


def _prepared_names(data_dir: str, limit: int = 20) -> list[str]:
  """``name/config:version`` of datasets under ``data_dir`` (for error messages)."""
  found = []
  for info_path in sorted(glob.glob(os.path.join(glob.escape(data_dir), "*", "**",
                                                 "dataset_info.json"), recursive=True)):
    parts = os.path.relpath(os.path.dirname(info_path), data_dir).split(os.sep)
    if len(parts) in (2, 3) and "incomplete" not in parts[-1]:
      found.append("/".join(parts[:-1]) + ":" + parts[-1])
    if len(found) >= limit:
      break
  return found


def load_prepared(name: str, data_dir: str) -> tfds.core.DatasetBuilder:
  """Opens a dataset already prepared under ``data_dir`` by its TFDS name, offline.

  ``name`` is ``dataset``, ``dataset/config`` or either with ``:version`` (latest version when
  omitted). Unlike ``tfds.builder``, which constructs an *unprepared* builder for any registered
  name (and whose ``download_and_prepare`` would fetch it), this reads the dataset's own files
  and fails at once when they are not there.

  Returns:
    A read-only builder; ``.as_data_source(split)`` or ``prepare(builder)`` opens its splits.

  Raises:
    UserError: unknown name, not prepared under ``data_dir``, or not stored as ``array_record``.
  """
  from tensorflow_datasets.core import read_only_builder  # pylint: disable=g-import-not-at-top
  from tensorflow_datasets.core import registered  # pylint: disable=g-import-not-at-top
  data_dir = os.path.abspath(os.path.expanduser(os.fspath(data_dir)))
  if not os.path.isdir(data_dir):
    raise UserError(f"TFDS data_dir does not exist: {data_dir}")
  try:
    builder = read_only_builder.builder_from_files(name, data_dir=data_dir)
  except (registered.DatasetNotFoundError, ValueError) as e:
    available = _prepared_names(data_dir)
    raise UserError(f"dataset {name!r} is not prepared under {data_dir} (nothing is downloaded; "
                    f"prepare it first). Prepared there: {available or 'none'}") from e
  formats = {f.value for f in builder.info.available_file_formats()}
  if "array_record" not in formats:
    raise UserError(f"dataset {name!r} under {data_dir} is stored as {sorted(formats)}; reading "
                    f"without TensorFlow needs array_record (prepare it with "
                    f"file_format='array_record')")
  return builder
