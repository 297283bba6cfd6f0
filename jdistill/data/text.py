"""An embedded byte-level text corpus: the Python standard library's own
source files, which exist on every Python installation (no network).

Tokens are bytes (vocabulary 256). Files are assigned to the train or the
validation split by a hash of their path relative to the standard library,
so the split does not depend on the file order or on which other files
exist. Each split is the concatenation of its files (sorted by path), cut
into non-overlapping windows of ``seq_len + 1`` bytes: example ``i`` has
inputs ``x = window[:-1]`` and next-token targets ``y = window[1:]``, both
``[seq_len]``. The corpus differs between Python versions, so
`TextCorpus.fingerprint` (a SHA-256 of the paths and bytes used) is recorded
with every result.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import sysconfig

import numpy as np

from jdistill.data.sources import ArraySource, Dataset

BYTE_VOCAB_SIZE = 256


@dataclasses.dataclass(frozen=True)
class TextCorpus:
  """Train and validation byte streams of one corpus.

  Attributes:
    train: uint8 ``[n_train]`` bytes.
    validation: uint8 ``[n_validation]`` bytes.
    fingerprint: SHA-256 hex digest of the files (paths and contents) used.
    num_files: ``(train files, validation files)``.
    root: the directory the files were read from.
  """

  train: np.ndarray
  validation: np.ndarray
  fingerprint: str
  num_files: tuple[int, int]
  root: str


STDLIB_SKIP_DIRS = ("test", "tests", "site-packages", "__pycache__",
                    "idle_test")


def stdlib_files(root: str) -> list[str]:
  """The ``.py`` files under ``root`` (the standard library), the
  directories of `STDLIB_SKIP_DIRS` left out, sorted by relative path."""
  paths = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = sorted(d for d in dirnames if d not in STDLIB_SKIP_DIRS)
    paths.extend(os.path.join(dirpath, f) for f in filenames
                 if f.endswith(".py"))
  paths.sort(key=lambda p: os.path.relpath(p, root))
  return paths


def _is_validation(relpath: str, validation_percent: int) -> bool:
  digest = hashlib.sha256(relpath.encode()).digest()
  return int.from_bytes(digest[:4], "little") % 100 < validation_percent


def stdlib_corpus(*, max_train_bytes: int = 2_000_000,
                  max_validation_bytes: int = 200_000,
                  validation_percent: int = 10,
                  root: str | None = None) -> TextCorpus:
  """Reads ``*.py`` files of the standard library (``test`` packages and
  ``site-packages`` excluded) in path order until each split has its bytes.

  Args:
    max_train_bytes: stop adding train files past this many bytes (the
      stream is then cut to exactly this length).
    max_validation_bytes: the same for validation.
    validation_percent: the share of files (by path hash) that go to
      validation, in ``[1, 99]``.
    root: directory to read instead of the standard library (tests).

  Raises:
    ValueError: bad sizes, or a directory with too few bytes for a split.
  """
  for name, value in (("max_train_bytes", max_train_bytes),
                      ("max_validation_bytes", max_validation_bytes)):
    if value < 2:
      raise ValueError(f"{name} must be at least 2, got {value}")
  if not 1 <= validation_percent <= 99:
    raise ValueError(f"validation_percent must be in [1, 99], got "
                     f"{validation_percent}")
  root = os.path.realpath(root or sysconfig.get_paths()["stdlib"])
  if not os.path.isdir(root):
    raise ValueError(f"corpus directory {root} does not exist")
  paths = stdlib_files(root)
  limits = {False: max_train_bytes, True: max_validation_bytes}
  chunks: dict[bool, list[bytes]] = {False: [], True: []}
  sizes = {False: 0, True: 0}
  counts = {False: 0, True: 0}
  sha = hashlib.sha256()
  for path in paths:
    rel = os.path.relpath(path, root)
    split = _is_validation(rel, validation_percent)
    if sizes[split] >= limits[split]:
      if sizes[not split] >= limits[not split]:
        break
      continue
    with open(path, "rb") as f:
      data = f.read()
    take = data[:limits[split] - sizes[split]]
    sha.update(rel.encode() + b"\0" + take + b"\0")
    chunks[split].append(take)
    sizes[split] += len(take)
    counts[split] += 1
  for split, name in ((False, "train"), (True, "validation")):
    if sizes[split] < 2:
      raise ValueError(f"corpus directory {root} has too few .py bytes for "
                       f"the {name} split ({sizes[split]})")
  as_array = lambda s: np.frombuffer(b"".join(chunks[s]), np.uint8).copy()
  return TextCorpus(train=as_array(False), validation=as_array(True),
                    fingerprint=sha.hexdigest(),
                    num_files=(counts[False], counts[True]), root=root)


def byte_windows(stream: np.ndarray, seq_len: int, *,
                 name: str = "stream") -> ArraySource:
  """Non-overlapping next-token examples of ``seq_len`` tokens.

  Returns:
    an `ArraySource` with ``x`` and ``y`` int32 ``[n, seq_len]``,
    ``y[i, j] = x[i, j + 1]`` within the stream, ``n = (len - 1) // seq_len``.
  """
  if seq_len < 1:
    raise ValueError(f"--seq_len must be >= 1, got {seq_len}")
  n = (len(stream) - 1) // seq_len
  if n < 1:
    raise ValueError(f"the {name} split has {len(stream)} bytes, too few for "
                     f"one sequence of --seq_len={seq_len}")
  tokens = np.asarray(stream[:n * seq_len + 1], np.int32)
  x = tokens[:-1].reshape(n, seq_len)
  y = tokens[1:].reshape(n, seq_len)
  return ArraySource(x=x, y=y)


def load_stdlib_text(seq_len: int, **corpus_kwargs) -> tuple[Dataset, TextCorpus]:
  """The byte-level stdlib corpus as a `Dataset` (``test`` is the validation
  split; ``num_classes`` is the vocabulary, ``input_shape`` ``(seq_len,)``)."""
  corpus = stdlib_corpus(**corpus_kwargs)
  dataset = Dataset(name="stdlib_text",
                    train=byte_windows(corpus.train, seq_len, name="train"),
                    test=byte_windows(corpus.validation, seq_len,
                                      name="validation"),
                    num_classes=BYTE_VOCAB_SIZE, input_shape=(seq_len,))
  return dataset, corpus
