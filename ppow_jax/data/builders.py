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
import glob
import hashlib
import json
import os
import re
from typing import Any, Iterator, Optional, Sequence

from absl import logging
import tensorflow_datasets as tfds

from ppow_jax.data import corpus, prompts
from ppow_jax.errors import UserError

TRAIN, HELDOUT = corpus.TRAIN, corpus.HELDOUT

# GCS is already off by default in TFDS 4.9.x; pin it so no version can reach for the network.
_gcs_utils = tfds.core.utils.gcs_utils
if hasattr(_gcs_utils, "_is_gcs_disabled"):
  _gcs_utils._is_gcs_disabled = True  # pylint: disable=protected-access

def _digest(identity: dict, root: str, rels: Sequence[str]) -> str:
  """Digest of a corpus's identity: its options and the size/mtime listing of its files."""
  h = hashlib.sha256(json.dumps(identity, sort_keys=True).encode())
  for rel in rels:
    stat = os.stat(os.path.join(root, rel))
    h.update(f"{rel}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
  return h.hexdigest()[:12]


def _slug(text: str) -> str:
  return re.sub(r"[^a-z0-9_]+", "_", text.lower()).strip("_")[:40] or "corpus"


@dataclasses.dataclass(eq=False)
class _LocalFilesConfig(tfds.core.BuilderConfig):
  """What both configs share: a local ``source``, listed once and digested into the name.

  ``name`` is a readable prefix (default: from the source's base name); ``-<digest>`` is
  appended, the digest covering every option of the subclass (its dataclass fields) and the
  size/mtime listing of the files, so the config name identifies the data.
  """
  name: str = ""
  source: str = ""
  heldout_fraction: float = 0.0

  def __post_init__(self):
    if not self.source:
      raise UserError(f"{type(self).__name__} needs a source ({self._what_source()})")
    corpus.check_fraction(self.heldout_fraction)
    self.source = os.path.abspath(os.path.expanduser(self.source))
    self.root, self.files = self._list_files()
    base = {f.name for f in dataclasses.fields(tfds.core.BuilderConfig)}
    identity = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name not in base}
    digest = _digest(identity, self.root, self.files)
    if not self.name.endswith(digest):
      self.name = f"{_slug(self.name or self._stem())}-{digest}"
    if self.description is None:
      self.description = self._describe()

  def _what_source(self) -> str:
    raise NotImplementedError

  def _list_files(self) -> tuple[str, list[str]]:
    return corpus.list_files(self.source)

  def _stem(self) -> str:
    return os.path.basename(self.root)

  def _describe(self) -> str:
    raise NotImplementedError


class _LocalFilesBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Base of builders that read local files: no URLs, hence no checksum file to look for.

  Built from ``config=`` or from the config's fields as keywords (``source=...``); other
  keywords go to TFDS (``file_format`` defaults to ``array_record``). TFDS looks for a
  checksums file next to the builder's code; for a class inside an installed package that path
  lookup needs ``importlib_resources`` (absent on Python >= 3.9 installs).
  """
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  CONFIG: type[_LocalFilesConfig]

  def __init__(self, *, config: Optional[_LocalFilesConfig] = None,
               data_dir: Optional[str] = None, **options: Any):
    if config is None:
      fields = {f.name for f in dataclasses.fields(self.CONFIG)}
      config = self.CONFIG(**{k: options.pop(k) for k in list(options) if k in fields})
    options.setdefault("file_format", "array_record")
    super().__init__(config=config, data_dir=data_dir, **options)

  @tfds.core.utils.classproperty
  @classmethod
  def url_infos(cls) -> None:
    return None


# ---------------------------------------------------------------- TextCorpus


@dataclasses.dataclass(eq=False)
class TextCorpusConfig(_LocalFilesConfig):
  """A text/code corpus: every matching file is one example."""
  source: str = ""  # directory, glob, or single file
  include: str = "*"  # fnmatch pattern on relative paths of a directory source ("*.py")
  exclude: tuple[str, ...] = ()  # fnmatch patterns; matching directories are not entered
  heldout_fraction: float = 0.05  # share of *files* held out, chosen by hash of the path

  def __post_init__(self):
    self.exclude = tuple(self.exclude)
    super().__post_init__()

  def _what_source(self) -> str:
    return "directory, glob or file"

  def _list_files(self) -> tuple[str, list[str]]:
    return corpus.list_files(self.source, self.include, self.exclude)

  def _stem(self) -> str:
    return os.path.basename(self.root) or "corpus"

  def _describe(self) -> str:
    return (f"{len(self.files)} files {self.include!r} from {self.source}, excluding "
            f"{list(self.exclude)}; held out by path hash: {self.heldout_fraction}")


class TextCorpus(_LocalFilesBuilder, skip_registration=True):
  """Local text or code files; features ``text`` and ``path`` (relative to the corpus root).

  Splits ``train`` and, when ``heldout_fraction > 0``, ``heldout``, assigned *by file* from a
  hash of the relative path, so a file never leaks between them and the split survives adding
  other files. Files keep their sorted order (shuffling is the input pipeline's job). Binary
  files (a NUL byte) are skipped; invalid UTF-8 is replaced, not dropped.
  """
  CONFIG = TextCorpusConfig

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
    splits = corpus.split_by_key(cfg.files, cfg.heldout_fraction, what=f"corpus {cfg.source}")
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
class ConversationsConfig(_LocalFilesConfig):
  """Chat data from JSONL files in ShareGPT or OpenAI form (see ``prompts.py``)."""
  source: str = ""  # a JSONL file or a glob of them
  skip_bad_lines: bool = False  # skip malformed lines with a warning instead of failing
  heldout_fraction: float = 0.0  # share of conversations held out, by hash of their turns

  def _what_source(self) -> str:
    return "JSONL file or glob"

  def _stem(self) -> str:
    return (os.path.basename(self.root) if corpus.has_glob(self.source)
            else os.path.splitext(os.path.basename(self.source))[0])

  def _describe(self) -> str:
    return f"Conversations from {self.source} ({len(self.files)} files)"


class Conversations(_LocalFilesBuilder, skip_registration=True):
  """Conversations as parallel ``roles``/``contents`` lists, plus ``where`` (``file:line``).

  Roles are normalised to system/user/assistant. A malformed line raises ``UserError`` naming
  ``file:line`` (or is skipped with a warning under ``skip_bad_lines``). Split ``train`` and,
  when ``heldout_fraction > 0``, ``heldout`` chosen by a hash of the conversation's content, so
  duplicates never straddle the two.
  """
  CONFIG = ConversationsConfig

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
          score = corpus.heldout_score(json.dumps(turns, ensure_ascii=False))
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
