"""Packed token corpora for LLM distillation: documents read from local files,
tokenized once with the teacher's Hugging Face tokenizer, packed into
fixed windows with segment ids, written as array_record, read back with
random access.

Reading (`read_documents`). Inputs are local files, directories (their
``.txt``, ``.jsonl`` and ``.parquet`` files, recursively, in path order) or
the special path ``"stdlib"``:

* ``.txt``: one document per file (UTF-8).
* ``.jsonl``: one document per non-blank line, a JSON object with the text
  under ``text_field``, or chat data: a ``messages`` list of ``{"role",
  "content"}`` objects, or ``prompt`` and ``response`` strings.
* ``.parquet``: one document per row with the same columns as ``.jsonl``,
  read in batches of rows (never the whole file at once).
* ``stdlib``: the Python standard library's ``.py`` files (the files of the
  byte-level corpus in `jdistill.data.text`), one document per file.

A `Document` is a list of text pieces with one "trained" flag each. Plain
text is one trained piece. Chat data is rendered without the model's chat
template (see `CHAT_RENDERING`): each message's content followed by
``"\\n"``, no role tags and no special tokens; assistant messages and
``response`` are trained, every other role and ``prompt`` are not. This is
a known limitation: a chat model's template (role headers, turn
separators) is not reproduced, and pieces are tokenized separately, so no
token spans a piece boundary. Empty documents (every piece ``""``) are
skipped.

Tokenizing. Each document is ``[BOS] + pieces + [EOS]`` with
``add_special_tokens=False`` and ``encode_special_tokens=True`` (a literal
``"<|endoftext|>"`` in the text is tokenized as text, never as the special
token). BOS is omitted when the tokenizer has none. The loss flag of EOS is
the flag of the document's last piece (a chat ending with an assistant turn
learns to stop).

Packing (`pack_windows`, `examples_from_windows`). The documents of a split
are concatenated in order and cut into non-overlapping windows of
``seq_len + 1`` tokens; a document longer than the room left is split and
continues in the next window. The last window is padded with ``pad_id``.
Example ``i`` is, with ``w`` its window:

* ``x = w[:-1]``, ``y = w[1:]``: int32 ``[seq_len]``;
* ``segment_ids``: int32 ``[seq_len]``, ``1, 2, 3...`` per document (or
  document part) inside the window, 0 for padding;
* ``positions``: int32 ``[seq_len]``, the offset inside the document part:
  it restarts at 0 for every document, and a document continued from the
  previous window restarts at 0 too (the model attends within the window
  only); 0 for padding;
* ``token_mask``: bool ``[seq_len]``, True where ``y`` is a trained token of
  the same document as ``x``: False where ``y`` is padding, starts another
  document (no cross-document prediction) or is a prompt token.

The last token of a window is a target only (``y[-1]``), never an input of
the next window.

Split. A document goes to validation when a hash of its source is below
``validation_percent`` (as `jdistill.data.text` does for files): the source
is ``<absolute path>`` for ``.txt``, ``<absolute path>:<line>`` (1-based) for
``.jsonl``, ``<absolute path>:<row>`` (0-based) for ``.parquet`` and the
path relative to the standard library for ``stdlib`` (the same files go to
validation as in `jdistill.data.text`). The split of a document depends on
neither the file order nor the other files; moving the files changes it.

On disk (`prepare_corpus`)::

  out_dir/
    corpus.json                                  sizes, fingerprints, options
    train-00000-of-00002.array_record            one record per window
    train-00001-of-00002.array_record
    validation-00000-of-00001.array_record

Records are fixed size, described in ``corpus.json["fields"]`` (the
`jdistill.data.teacher_cache` layout): an 8-byte little-endian uint64 header
holding the window's index in its split (checked on every read), then
``tokens`` ``[seq_len + 1]`` (the smallest unsigned dtype for the
vocabulary, e.g. uint16 or uint24), ``segment_ids`` ``[seq_len + 1]`` and
``trained`` ``[seq_len + 1]`` (uint8 0/1, the loss flag of each token);
`PackedCorpus` derives the five arrays above from them. Shards are written
with ``group_size:1`` (random access) into a sibling temporary directory
that is renamed to ``out_dir`` when complete. Files are read in sorted
order whatever order they are given in, so the corpus does not depend on
the argument order.

Reuse. ``corpus.json`` records the tokenizer fingerprint (SHA-256 of
``tokenizer.json``), the files fingerprint (SHA-256 over the paths, sizes
and content hashes of the files; for ``stdlib`` over the relative paths and
bytes of the files used, as `jdistill.data.text` does) and the options. A
second `prepare_corpus` into the same ``out_dir`` with the same
fingerprints and options returns the existing corpus; anything different
raises a one-line ValueError naming what differs and leaves the directory
untouched. ``records_per_shard`` and ``compression`` change only the
sharding, and are not compared.

Example::

  meta = prepare_corpus(["data/chat.jsonl", "data/web/"], "teacher/",
                        "/data/corpus-2048", seq_len=2048)
  train = PackedCorpus("/data/corpus-2048", "train")
  batch = train.get_batch([17, 3])   # x, y, segment_ids, positions, ...
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import os
import shutil
import sysconfig
import uuid
from typing import (Any, Iterable, Iterator, NamedTuple, Optional, Sequence,
                    Union)

import numpy as np
from absl import logging
from array_record.python import array_record_data_source
from array_record.python import array_record_module

from jdistill.data.sources import Dataset
from jdistill.data.teacher_cache import (Field, fsync_path, id_dtype_for,
                                         normalize_indices)
from jdistill.data import text as text_lib
from jdistill.data.text import _is_validation

__all__ = [
    "CHAT_RENDERING",
    "Document",
    "PackedCorpus",
    "STDLIB",
    "Window",
    "check_corpus",
    "examples_from_windows",
    "files_fingerprint",
    "pack_examples",
    "pack_windows",
    "packed_dataset",
    "prepare_corpus",
    "read_documents",
    "special_ids",
    "split_of",
    "tokenize_documents",
    "tokenizer_fingerprint",
]

FORMAT = "jdistill.packed_corpus"
VERSION = 2  # 2: splits record target_bytes.
META_FILE = "corpus.json"
TOKENIZER_FILE = "tokenizer.json"
SPLITS = ("train", "validation")
STDLIB = "stdlib"
EXTENSIONS = (".txt", ".jsonl", ".parquet")
HEADER_BYTES = 8
CHAT_RENDERING = (
    "no chat template: each message's content followed by '\\n', no role "
    "tags or special tokens; assistant/response pieces trained, "
    "system/user/tool/developer/prompt pieces not")
# Trained flag of each chat role.
CHAT_ROLES = {"system": False, "developer": False, "user": False,
              "tool": False, "assistant": True}
_PARQUET_BATCH_ROWS = 1024
_TOKENIZE_BATCH_DOCS = 256
_READ_CHUNK = 1 << 20

PathLike = Union[str, os.PathLike]


# ---------------------------------------------------------------------------
# Documents.
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Document:
  """One document: text pieces with their loss flags, and where it came from.

  Attributes:
    pieces: the text pieces, in order.
    trained: one flag per piece; True if its tokens are training targets
      (text, assistant turns), False if not (prompts, user turns).
    source: the document's identity, hashed for the train/validation split:
      ``<path>``, ``<path>:<line>`` (jsonl, 1-based), ``<path>:<row>``
      (parquet, 0-based) or the path relative to the standard library.
  """

  pieces: tuple[str, ...]
  trained: tuple[bool, ...]
  source: str


def split_of(source: str, validation_percent: int) -> str:
  """``"validation"`` or ``"train"``: the split of a document source (a hash
  of ``source``, as `jdistill.data.text` splits files)."""
  return "validation" if _is_validation(source,
                                        validation_percent) else "train"


def _stdlib_root() -> str:
  return os.path.realpath(sysconfig.get_paths()["stdlib"])


def _stdlib_entries(max_documents: Optional[int]
                    ) -> Iterator[tuple[str, bytes]]:
  """``(relative path, bytes)`` of the non-empty stdlib files, in order, at
  most ``max_documents``."""
  root = _stdlib_root()
  count = 0
  for path in text_lib.stdlib_files(root):
    if max_documents is not None and count >= max_documents:
      return
    with open(path, "rb") as f:
      data = f.read()
    if data:
      count += 1
      yield os.path.relpath(path, root), data


def _resolve_paths(paths: Union[PathLike, Sequence[PathLike]]) -> list[str]:
  """Absolute paths of the input files (directories expanded, ``stdlib``
  kept), in the given order; refuses unknown, missing and repeated ones."""
  if isinstance(paths, (str, os.PathLike)):
    paths = [paths]
  paths = [os.fspath(p) for p in paths]
  if not paths:
    raise ValueError("no input files: expected .txt, .jsonl or .parquet "
                     "files, directories of them, or 'stdlib'")
  out: list[str] = []
  for given in paths:
    if given == STDLIB:
      out.append(STDLIB)
    elif os.path.isdir(given):
      found = []
      for dirpath, dirnames, filenames in os.walk(given):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found.extend(os.path.join(dirpath, f) for f in filenames
                     if f.endswith(EXTENSIONS) and not f.startswith("."))
      if not found:
        raise ValueError(f"{given}: directory has no .txt, .jsonl or "
                         ".parquet files")
      out.extend(sorted(os.path.realpath(p) for p in found))
    elif os.path.isfile(given):
      if not given.endswith(EXTENSIONS):
        raise ValueError(f"{given}: unknown file type; expected .txt, "
                         ".jsonl, .parquet, a directory of them or 'stdlib'")
      out.append(os.path.realpath(given))
    else:
      raise ValueError(f"{given}: no such file or directory")
  seen = set()
  for p in out:
    if p in seen:
      raise ValueError(f"{p}: given twice (directly or through a directory)")
    seen.add(p)
  return out


def _text_value(value: Any, where: str, name: str) -> str:
  if not isinstance(value, str):
    raise ValueError(f"{where}: field {name!r} must be a string, got "
                     f"{type(value).__name__}")
  return value


def _row_document(row: Any, text_field: str, where: str,
                  source: str) -> Document:
  """The document of one jsonl line / parquet row (see the module
  docstring)."""
  if not isinstance(row, dict):
    raise ValueError(f"{where}: expected a JSON object, got "
                     f"{type(row).__name__}")
  if row.get(text_field) is not None:
    text = _text_value(row[text_field], where, text_field)
    return Document((text,), (True,), source)
  if row.get("messages") is not None:
    messages = row["messages"]
    if not isinstance(messages, list) or not messages:
      raise ValueError(f"{where}: field 'messages' must be a non-empty list "
                       "of {'role', 'content'} objects")
    pieces, trained = [], []
    for j, m in enumerate(messages):
      if not isinstance(m, dict) or "role" not in m or "content" not in m:
        raise ValueError(f"{where}: messages[{j}] must be an object with "
                         "'role' and 'content'")
      if m["role"] not in CHAT_ROLES:
        raise ValueError(f"{where}: messages[{j}] has role {m['role']!r}; "
                         f"expected one of {', '.join(CHAT_ROLES)}")
      content = _text_value(m["content"], where, f"messages[{j}].content")
      pieces.append(content + "\n")
      trained.append(CHAT_ROLES[m["role"]])
    return Document(tuple(pieces), tuple(trained), source)
  if row.get("prompt") is not None or row.get("response") is not None:
    for name in ("prompt", "response"):
      if row.get(name) is None:
        raise ValueError(f"{where}: has 'prompt' and 'response' chat fields "
                         f"but {name!r} is missing")
    prompt = _text_value(row["prompt"], where, "prompt")
    response = _text_value(row["response"], where, "response")
    return Document((prompt + "\n", response + "\n"), (False, True), source)
  raise ValueError(f"{where}: missing field {text_field!r} (or chat fields "
                   "'messages', or 'prompt' and 'response')")


def _read_txt(path: str) -> Iterator[Document]:
  with open(path, "rb") as f:
    data = f.read()
  try:
    text = data.decode("utf-8")
  except UnicodeDecodeError as e:
    raise ValueError(f"{path}: not valid UTF-8 at byte {e.start}") from None
  yield Document((text,), (True,), path)


def _read_jsonl(path: str, text_field: str) -> Iterator[Document]:
  with open(path, "rb") as f:
    for lineno, line in enumerate(f, 1):
      if not line.strip():
        continue
      where = f"{path} line {lineno}"
      try:
        row = json.loads(line)
      except UnicodeDecodeError as e:
        raise ValueError(f"{where}: not valid UTF-8 ({e.reason})") from None
      except ValueError as e:
        raise ValueError(f"{where}: invalid JSON ({e})") from None
      yield _row_document(row, text_field, where, f"{path}:{lineno}")


def _read_parquet(path: str, text_field: str) -> Iterator[Document]:
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  try:
    pf = pq.ParquetFile(path)
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f"{path}: not a readable parquet file "
                     f"({str(e).splitlines()[0] if str(e) else e!r})"
                     ) from None
  names = set(pf.schema_arrow.names)
  if text_field in names:
    columns = [text_field]
  elif "messages" in names:
    columns = ["messages"]
  elif {"prompt", "response"} <= names:
    columns = ["prompt", "response"]
  else:
    raise ValueError(f"{path}: no column {text_field!r} (or chat columns "
                     "'messages', or 'prompt' and 'response'); columns are "
                     f"{sorted(names)}")
  row_index = 0
  for batch in pf.iter_batches(batch_size=_PARQUET_BATCH_ROWS,
                               columns=columns):
    for row in batch.to_pylist():
      yield _row_document(row, text_field, f"{path} row {row_index}",
                          f"{path}:{row_index}")
      row_index += 1


def _read_stdlib(max_documents: Optional[int]) -> Iterator[Document]:
  for rel, data in _stdlib_entries(max_documents):
    yield Document((data.decode("utf-8", errors="replace"),), (True,), rel)


def read_documents(paths: Union[PathLike, Sequence[PathLike]], *,
                   text_field: str = "text",
                   max_documents: Optional[int] = None
                   ) -> Iterator[Document]:
  """Yields the documents of local files, in the given order.

  Args:
    paths: ``.txt``, ``.jsonl`` and ``.parquet`` files, directories of them
      (recursive, sorted) and/or ``"stdlib"`` (see the module docstring).
    text_field: the jsonl field / parquet column holding plain text; rows
      without it are read as chat data (``messages``, or ``prompt`` and
      ``response``).
    max_documents: stop after this many documents (all files together).

  Yields:
    `Document` objects; empty ones (every piece ``""``) are skipped.

  Raises:
    ValueError: one line naming the file (and line or row): no paths, an
      unknown extension, a missing file, invalid JSON or UTF-8, a missing
      or non-string field, an unknown chat role.
  """
  if max_documents is not None and (not isinstance(max_documents, int)
                                    or max_documents < 1):
    raise ValueError(f"max_documents must be a positive int or None, got "
                     f"{max_documents!r}")
  count = 0
  for path in _resolve_paths(paths):
    if path == STDLIB:
      docs = _read_stdlib(None if max_documents is None
                          else max_documents - count)
    elif path.endswith(".txt"):
      docs = _read_txt(path)
    elif path.endswith(".jsonl"):
      docs = _read_jsonl(path, text_field)
    else:
      docs = _read_parquet(path, text_field)
    for doc in docs:
      if not any(doc.pieces):
        continue
      if max_documents is not None and count >= max_documents:
        return
      count += 1
      yield doc


# ---------------------------------------------------------------------------
# Fingerprints and special ids.
# ---------------------------------------------------------------------------


def tokenizer_file(tokenizer_path: PathLike) -> str:
  """The real path of ``tokenizer.json`` given it or its directory."""
  path = os.fspath(tokenizer_path)
  if os.path.isdir(path):
    path = os.path.join(path, TOKENIZER_FILE)
  if not os.path.isfile(path):
    raise ValueError(f"{path}: no such tokenizer file; expected a "
                     f"{TOKENIZER_FILE} or a directory holding one")
  return os.path.realpath(path)


def _file_sha256(path: str) -> str:
  sha = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(_READ_CHUNK), b""):
      sha.update(chunk)
  return sha.hexdigest()


def tokenizer_fingerprint(tokenizer_path: PathLike) -> str:
  """SHA-256 hex digest of the bytes of ``tokenizer.json`` (a file, or a
  directory holding one)."""
  return _file_sha256(tokenizer_file(tokenizer_path))


def files_fingerprint(paths: Union[PathLike, Sequence[PathLike]], *,
                      max_documents: Optional[int] = None) -> str:
  """SHA-256 hex digest of the inputs, independent of their order.

  Each file contributes its absolute path, size and content SHA-256;
  ``stdlib`` contributes the relative path and bytes of each file it reads
  (as `jdistill.data.text` fingerprints its corpus), at most
  ``max_documents`` of them.
  """
  sha = hashlib.sha256()
  for path in sorted(_resolve_paths(paths)):
    if path == STDLIB:
      stdlib = hashlib.sha256()
      for rel, data in _stdlib_entries(max_documents):
        stdlib.update(rel.encode() + b"\0" + data + b"\0")
      sha.update(f"{STDLIB}\0{stdlib.hexdigest()}\0".encode())
    else:
      sha.update(f"{path}\0{os.path.getsize(path)}\0"
                 f"{_file_sha256(path)}\0".encode())
  return sha.hexdigest()


def _load_tokenizer(tokenizer_file: str):
  import tokenizers  # pylint: disable=g-import-not-at-top
  try:
    tokenizer = tokenizers.Tokenizer.from_file(tokenizer_file)
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f"{tokenizer_file}: not a Hugging Face tokenizer file "
                     f"({str(e).splitlines()[0] if str(e) else e!r})"
                     ) from None
  # Text that spells a special token ("<|endoftext|>") is text.
  tokenizer.encode_special_tokens = True
  return tokenizer


def _read_json(path: str) -> Optional[dict]:
  if not os.path.isfile(path):
    return None
  try:
    with open(path) as f:
      data = json.load(f)
  except (OSError, ValueError) as e:
    raise ValueError(f"{path}: not valid JSON ({e})") from None
  if not isinstance(data, dict):
    raise ValueError(f"{path}: expected a JSON object")
  return data


def special_ids(tokenizer_dir: PathLike) -> dict[str, Optional[int]]:
  """The BOS, EOS and padding ids of a Hugging Face model directory.

  Each id is taken from the first file that sets it: ``tokenizer_config.json``
  (``bos_token`` ... as a string or ``{"content": ...}``, resolved through
  its ``added_tokens_decoder`` or ``tokenizer.json``), then
  ``special_tokens_map.json`` (the same), then ``config.json``
  (``bos_token_id`` ...; the first of a list).

  Args:
    tokenizer_dir: the directory, or its ``tokenizer.json``.

  Returns:
    ``{"bos": id or None, "eos": ..., "pad": ...}``.

  Raises:
    ValueError: a file that is not JSON, or a token string with no id.
  """
  d = os.fspath(tokenizer_dir)
  if os.path.isfile(d):
    d = os.path.dirname(d) or "."
  tokenizer_config = _read_json(os.path.join(d, "tokenizer_config.json"))
  tokens_map = _read_json(os.path.join(d, "special_tokens_map.json"))
  model_config = _read_json(os.path.join(d, "config.json"))
  vocab: Optional[dict] = None

  def token_id(token: str, where: str, key: str) -> int:
    nonlocal vocab
    for id_, entry in ((tokenizer_config or {}).get("added_tokens_decoder")
                       or {}).items():
      if isinstance(entry, dict) and entry.get("content") == token:
        return int(id_)
    if vocab is None:
      tokenizer_json = os.path.join(d, TOKENIZER_FILE)
      vocab = (_load_tokenizer(tokenizer_json).get_vocab(with_added_tokens=True)
               if os.path.isfile(tokenizer_json) else {})
    if token not in vocab:
      raise ValueError(f"{where}: {key} {token!r} is not a token of "
                       f"{os.path.join(d, TOKENIZER_FILE)}")
    return int(vocab[token])

  out: dict[str, Optional[int]] = {}
  for name in ("bos", "eos", "pad"):
    value = None
    for config, file in ((tokenizer_config, "tokenizer_config.json"),
                         (tokens_map, "special_tokens_map.json")):
      token = (config or {}).get(f"{name}_token")
      if isinstance(token, dict):
        token = token.get("content")
      if isinstance(token, str) and token:
        value = token_id(token, os.path.join(d, file), f"{name}_token")
        break
    if value is None and model_config is not None:
      ids = model_config.get(f"{name}_token_id")
      if isinstance(ids, list):
        ids = ids[0] if ids else None
      if ids is not None:
        if isinstance(ids, bool) or not isinstance(ids, int):
          raise ValueError(f"{os.path.join(d, 'config.json')}: "
                           f"{name}_token_id must be an int, got {ids!r}")
        value = ids
    out[name] = value
  return out


# ---------------------------------------------------------------------------
# Tokenizing and packing.
# ---------------------------------------------------------------------------


def tokenize_documents(tokenizer, documents: Iterable[Document], *,
                       bos_id: Optional[int], eos_id: int,
                       batch_size: int = _TOKENIZE_BATCH_DOCS
                       ) -> Iterator[tuple[Document, np.ndarray, np.ndarray]]:
  """Tokenizes documents in batches (``tokenizers.Tokenizer.encode_batch``).

  Args:
    tokenizer: a ``tokenizers.Tokenizer``.
    documents: `Document` objects.
    bos_id: prepended to every document; None for none.
    eos_id: appended to every document.
    batch_size: documents per ``encode_batch`` call.

  Yields:
    ``(document, ids, trained)``: int32 ``[n]`` token ids
    ``[BOS] + pieces + [EOS]`` (pieces with ``add_special_tokens=False``)
    and bool ``[n]`` loss flags (each piece's flag; BOS False; EOS the last
    piece's flag).
  """
  def flush(batch: list[Document]):
    pieces = [p for doc in batch for p in doc.pieces]
    encodings = iter(tokenizer.encode_batch(pieces, add_special_tokens=False))
    for doc in batch:
      ids = [] if bos_id is None else [bos_id]
      trained = [] if bos_id is None else [False]
      for flag in doc.trained:
        piece_ids = next(encodings).ids
        ids.extend(piece_ids)
        trained.extend([flag] * len(piece_ids))
      ids.append(eos_id)
      trained.append(doc.trained[-1])
      yield doc, np.asarray(ids, np.int32), np.asarray(trained, bool)

  batch: list[Document] = []
  for doc in documents:
    batch.append(doc)
    if len(batch) >= batch_size:
      yield from flush(batch)
      batch = []
  if batch:
    yield from flush(batch)


class Window(NamedTuple):
  """One packed window of ``seq_len + 1`` tokens (see the module docstring).

  Attributes:
    tokens: int32 token ids, ``pad_id`` after the last document.
    segment_ids: int32 ``1, 2, ...`` per document part, 0 for padding.
    trained: bool loss flag of each token, False for padding.
  """

  tokens: np.ndarray
  segment_ids: np.ndarray
  trained: np.ndarray


class _Packer:
  """Greedy packing of token documents into windows of ``seq_len + 1``."""

  def __init__(self, seq_len: int, pad_id: int):
    if not isinstance(seq_len, int) or isinstance(seq_len, bool) or (
        seq_len < 1):
      raise ValueError(f"seq_len must be a positive int, got {seq_len!r}")
    self.width = seq_len + 1
    self.pad_id = pad_id
    self._new_window()

  def _new_window(self) -> None:
    self._tokens = np.full(self.width, self.pad_id, np.int32)
    self._segments = np.zeros(self.width, np.int32)
    self._trained = np.zeros(self.width, bool)
    self._fill = 0
    self._segment = 0

  def add(self, ids: np.ndarray, trained: np.ndarray) -> Iterator[Window]:
    """Appends one document; yields the windows it completes."""
    offset = 0
    while offset < len(ids):
      take = min(self.width - self._fill, len(ids) - offset)
      end = self._fill + take
      self._segment += 1
      self._tokens[self._fill:end] = ids[offset:offset + take]
      self._segments[self._fill:end] = self._segment
      self._trained[self._fill:end] = trained[offset:offset + take]
      self._fill = end
      offset += take
      if self._fill == self.width:
        yield Window(self._tokens, self._segments, self._trained)
        self._new_window()

  def finish(self) -> Iterator[Window]:
    """Yields the last, padded window, if any token is left."""
    if self._fill:
      yield Window(self._tokens, self._segments, self._trained)
      self._new_window()


def pack_windows(documents: Iterable[tuple[Sequence[int], Sequence[bool]]],
                 seq_len: int, pad_id: int) -> Iterator[Window]:
  """Packs token documents into windows of ``seq_len + 1`` tokens.

  Args:
    documents: ``(token ids, loss flags)`` per document (BOS/EOS included).
    seq_len: tokens per example.
    pad_id: the id that fills the end of the last window.

  Yields:
    `Window` objects, the last one padded.
  """
  packer = _Packer(seq_len, pad_id)
  for ids, trained in documents:
    ids = np.asarray(ids, np.int64)
    trained = np.asarray(trained, bool)
    if ids.ndim != 1 or ids.shape != trained.shape:
      raise ValueError(f"a document has ids of shape {ids.shape} and flags of "
                       f"shape {trained.shape}; expected equal 1-D shapes")
    yield from packer.add(ids, trained)
  yield from packer.finish()


def _target_mask(segment_ids: np.ndarray, trained: np.ndarray) -> np.ndarray:
  """``token_mask`` of windows ``[..., seq_len + 1]``."""
  return ((segment_ids[..., 1:] == segment_ids[..., :-1])
          & (segment_ids[..., 1:] != 0) & trained[..., 1:].astype(bool))


def examples_from_windows(tokens: np.ndarray, segment_ids: np.ndarray,
                          trained: np.ndarray) -> dict[str, np.ndarray]:
  """The examples of windows ``[n, seq_len + 1]``: ``x``, ``y``,
  ``segment_ids``, ``positions`` (int32) and ``token_mask`` (bool), each
  ``[n, seq_len]`` (see the module docstring)."""
  tokens = np.asarray(tokens)
  segments = np.asarray(segment_ids, np.int32)
  trained = np.asarray(trained, bool)
  n, width = tokens.shape
  index = np.broadcast_to(np.arange(width, dtype=np.int32), (n, width))
  starts = np.ones((n, width), bool)
  starts[:, 1:] = segments[:, 1:] != segments[:, :-1]
  start_index = np.maximum.accumulate(np.where(starts, index, 0), axis=1)
  positions = np.where(segments != 0, index - start_index, 0)
  return {
      "x": tokens[:, :-1].astype(np.int32),
      "y": tokens[:, 1:].astype(np.int32),
      "segment_ids": segments[:, :-1].copy(),
      "positions": positions[:, :-1].astype(np.int32),
      "token_mask": _target_mask(segments, trained),
  }


def pack_examples(documents: Iterable[tuple[Sequence[int], Sequence[bool]]],
                  seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
  """`pack_windows` then `examples_from_windows`, in memory: the arrays
  that `PackedCorpus.get_batch` returns for the same documents."""
  windows = list(pack_windows(documents, seq_len, pad_id))
  if not windows:
    empty = np.zeros((0, seq_len + 1), np.int32)
    return examples_from_windows(empty, empty, empty.astype(bool))
  return examples_from_windows(*(np.stack(a) for a in zip(*windows)))


# ---------------------------------------------------------------------------
# Writing.
# ---------------------------------------------------------------------------


def _record_fields(vocab_size: int, seq_len: int) -> list[Field]:
  width = seq_len + 1
  return [Field("tokens", id_dtype_for(vocab_size), (width,)),
          Field("segment_ids", id_dtype_for(width + 1), (width,)),
          Field("trained", "uint8", (width,))]


def _shard_name(split: str, shard: int, num_shards: int) -> str:
  return f"{split}-{shard:05d}-of-{num_shards:05d}.array_record"


class _SplitWriter:
  """Writes the windows of one split into numbered shards of a directory."""

  def __init__(self, directory: str, split: str, fields: list[Field],
               records_per_shard: int, compression: str):
    self.directory = directory
    self.split = split
    self.fields = fields
    self.records_per_shard = records_per_shard
    self.options = f"group_size:1,{compression}"
    self._writer = None
    self._partials: list[str] = []
    self._counts: list[int] = []
    self.stats = {"documents": 0, "records": 0, "tokens": 0,
                  "target_tokens": 0, "padding_tokens": 0,
                  "target_bytes": 0}

  def write(self, window: Window) -> None:
    if self._writer is None:
      path = os.path.join(self.directory,
                          f"{self.split}-{len(self._partials):05d}.partial")
      self._writer = array_record_module.ArrayRecordWriter(path, self.options)
      self._partials.append(path)
      self._counts.append(0)
    parts = [np.uint64(self.stats["records"]).astype("<u8").tobytes()]
    for field, x in zip(self.fields, window):
      parts.append(field.encode(np.asarray(x, np.int64)))
    self._writer.write(b"".join(parts))
    self._counts[-1] += 1
    real = int(np.count_nonzero(window.segment_ids))
    self.stats["records"] += 1
    self.stats["tokens"] += real
    self.stats["padding_tokens"] += len(window.tokens) - real
    self.stats["target_tokens"] += int(
        _target_mask(window.segment_ids, window.trained).sum())
    if self._counts[-1] >= self.records_per_shard:
      self._close_writer()

  def _close_writer(self) -> None:
    if self._writer is not None:
      if not self._writer.ok():
        raise ValueError(f"array_record writer of {self._partials[-1]} "
                         "failed")
      self._writer.close()
      self._writer = None

  def finish(self) -> list[dict[str, Any]]:
    """Closes the shards and gives them their final names."""
    self._close_writer()
    n = len(self._partials)
    shards = []
    for k, (partial, count) in enumerate(zip(self._partials, self._counts)):
      name = _shard_name(self.split, k, n)
      os.rename(partial, os.path.join(self.directory, name))
      shards.append({"file": name, "num_records": count})
    return shards

  def abort(self) -> None:
    if self._writer is not None:
      try:
        self._writer.close()
      except Exception:  # pylint: disable=broad-except
        pass
      self._writer = None


def _read_meta(directory: str) -> dict[str, Any]:
  path = os.path.join(directory, META_FILE)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{directory}: no {META_FILE}; not a packed "
                            "corpus, or an unfinished write")
  meta = _read_json(path)
  if meta.get("format") != FORMAT:
    raise ValueError(f"{path}: not a {FORMAT} file (format "
                     f"{meta.get('format')!r})")
  if meta.get("version") != VERSION:
    raise ValueError(f"{path}: version {meta.get('version')!r}, this reader "
                     f"supports {VERSION}")
  return meta


def _short(value: Any) -> str:
  return f"{value[:12]}..." if isinstance(value, str) and len(
      value) == 64 else repr(value)


def _differences(meta: dict[str, Any], expected: dict[str, Any]) -> list[str]:
  """``"name (has X, requested Y)"`` for every entry that differs."""
  have = {"tokenizer": meta.get("tokenizer", {}).get("fingerprint"),
          "files": meta.get("files", {}).get("fingerprint"),
          **meta.get("options", {})}
  return [f"{name} (has {_short(have.get(name))}, requested {_short(value)})"
          for name, value in expected.items() if have.get(name) != value]


def _check_positive(name: str, value: Any) -> None:
  if not isinstance(value, int) or isinstance(value, bool) or value < 1:
    raise ValueError(f"{name} must be a positive int, got {value!r}")


def prepare_corpus(
    paths: Union[PathLike, Sequence[PathLike]],
    tokenizer_path: PathLike,
    out_dir: PathLike,
    *,
    seq_len: int,
    text_field: str = "text",
    validation_percent: int = 10,
    bos_id: Optional[int] = None,
    eos_id: Optional[int] = None,
    pad_id: Optional[int] = None,
    add_bos: bool = True,
    max_documents: Optional[int] = None,
    records_per_shard: int = 10_000,
    compression: str = "zstd:3",
) -> dict[str, Any]:
  """Tokenizes, splits, packs and writes a corpus (see the module docstring),
  or returns the one already in ``out_dir``.

  Args:
    paths: inputs of `read_documents` (read in sorted order).
    tokenizer_path: the teacher's ``tokenizer.json`` or its directory.
    out_dir: the corpus directory to create.
    seq_len: tokens per example (windows hold ``seq_len + 1``).
    text_field: the text field of jsonl / parquet rows.
    validation_percent: share of documents (by source hash) in validation,
      in ``[0, 99]``.
    bos_id: prepended to every document; None reads it with `special_ids`
      (no BOS when the tokenizer has none).
    eos_id: appended to every document; None reads it with `special_ids`
      (required).
    pad_id: fills the last window of each split; None reads it with
      `special_ids`, else uses ``eos_id`` (padding is masked either way).
    add_bos: False to prepend no BOS (e.g. GPT-2 style tokenizers whose BOS
      is their EOS).
    max_documents: read at most this many documents (all files together).
    records_per_shard: windows per array_record shard.
    compression: array_record compression option (``"zstd:3"``,
      ``"uncompressed"``, ...).

  Returns:
    The contents of ``out_dir/corpus.json``.

  Raises:
    ValueError: one line: a bad option or input (see `read_documents`), no
      training document, ``out_dir`` holding a corpus with other
      fingerprints or options (naming them), or ``out_dir`` a non-empty
      directory that is not a corpus.
  """
  _check_positive("seq_len", seq_len)
  _check_positive("records_per_shard", records_per_shard)
  if max_documents is not None:
    _check_positive("max_documents", max_documents)
  if (not isinstance(validation_percent, int)
      or isinstance(validation_percent, bool)
      or not 0 <= validation_percent <= 99):
    raise ValueError(f"validation_percent must be an int in [0, 99], got "
                     f"{validation_percent!r}")
  out_dir = os.path.abspath(os.fspath(out_dir))
  tok_file = tokenizer_file(tokenizer_path)
  tokenizer = _load_tokenizer(tok_file)
  vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
  found = special_ids(os.path.dirname(tok_file))
  if not add_bos:
    if bos_id is not None:
      raise ValueError(f"bos_id={bos_id} with add_bos=False; pass one of them")
  else:
    bos_id = found["bos"] if bos_id is None else bos_id
  eos_id = found["eos"] if eos_id is None else eos_id
  if eos_id is None:
    raise ValueError(f"{os.path.dirname(tok_file)}: no EOS id in "
                     "tokenizer_config.json, special_tokens_map.json or "
                     "config.json; pass eos_id")
  if pad_id is None:
    pad_id = found["pad"] if found["pad"] is not None else eos_id
  for name, value in (("bos_id", bos_id), ("eos_id", eos_id),
                      ("pad_id", pad_id)):
    if value is not None and (not isinstance(value, int) or isinstance(
        value, bool) or not 0 <= value < vocab_size):
      raise ValueError(f"{name} must be an int in [0, {vocab_size}) (the "
                       f"vocabulary of {tok_file}), got {value!r}")

  files = sorted(_resolve_paths(paths))
  expected = {
      "tokenizer": tokenizer_fingerprint(tok_file),
      "files": files_fingerprint(files, max_documents=max_documents),
      "seq_len": seq_len,
      "text_field": text_field,
      "validation_percent": validation_percent,
      "max_documents": max_documents,
      "bos_id": bos_id,
      "eos_id": eos_id,
      "pad_id": pad_id,
  }
  existing = _existing_corpus(out_dir, expected)
  if existing is not None:
    logging.info("reusing the packed corpus in %s", out_dir)
    return existing

  fields = _record_fields(vocab_size, seq_len)
  parent = os.path.dirname(out_dir)
  os.makedirs(parent, exist_ok=True)
  # Not tempfile.mkdtemp: its mode 0700 would make the corpus private.
  tmp = f"{out_dir}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
  os.makedirs(tmp)
  writers = {s: _SplitWriter(tmp, s, fields, records_per_shard, compression)
             for s in SPLITS}
  try:
    packers = {s: _Packer(seq_len, pad_id) for s in SPLITS}
    docs = read_documents(files, text_field=text_field,
                          max_documents=max_documents)
    for doc, ids, trained in tokenize_documents(tokenizer, docs,
                                                bos_id=bos_id, eos_id=eos_id):
      split = split_of(doc.source, validation_percent)
      writers[split].stats["documents"] += 1
      # UTF-8 bytes of the trained text: bits per byte = NLL of the target
      # tokens / (ln 2 * target_bytes).
      writers[split].stats["target_bytes"] += sum(
          len(piece.encode("utf-8"))
          for piece, t in zip(doc.pieces, doc.trained) if t)
      for window in packers[split].add(ids, trained):
        writers[split].write(window)
    for split in SPLITS:
      for window in packers[split].finish():
        writers[split].write(window)
    if writers["train"].stats["documents"] == 0:
      raise ValueError(f"no training documents in {len(files)} input files "
                       f"(validation_percent={validation_percent}, "
                       f"{writers['validation'].stats['documents']} "
                       "validation documents)")
    splits = {}
    for split in SPLITS:
      shards = writers[split].finish()
      splits[split] = {**writers[split].stats, "shards": shards}
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "seq_len": seq_len,
        "window": seq_len + 1,
        "vocab_size": vocab_size,
        "tokenizer": {"fingerprint": expected["tokenizer"],
                      "file": tok_file},
        "files": {"fingerprint": expected["files"], "paths": files},
        "options": {k: v for k, v in expected.items()
                    if k not in ("tokenizer", "files")},
        "special_ids": {"bos": bos_id, "eos": eos_id, "pad": pad_id},
        "chat_rendering": CHAT_RENDERING,
        "splits": splits,
        "fields": [f.to_json() for f in fields],
        "record_header": "uint64 little-endian window index in its split",
        "record_bytes": HEADER_BYTES + sum(f.nbytes for f in fields),
        "compression": compression,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(
            timespec="seconds"),
    }
    with open(os.path.join(tmp, META_FILE), "w") as f:
      json.dump(meta, f, indent=2, sort_keys=True)
      f.write("\n")
    for name in os.listdir(tmp):
      fsync_path(os.path.join(tmp, name))
    fsync_path(tmp)
    if os.path.isdir(out_dir) and not os.listdir(out_dir):
      os.rmdir(out_dir)
    try:
      os.rename(tmp, out_dir)
    except OSError:
      # Another process finished the same corpus meanwhile: reuse or refuse.
      existing = _existing_corpus(out_dir, expected)
      if existing is None:
        raise
      shutil.rmtree(tmp, ignore_errors=True)
      return existing
    fsync_path(parent)
    return meta
  except BaseException:
    for writer in writers.values():
      writer.abort()
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def _existing_corpus(out_dir: str, expected: dict[str, Any]
                     ) -> Optional[dict[str, Any]]:
  """The meta of a matching corpus in ``out_dir``; None if there is none."""
  if not os.path.exists(out_dir):
    return None
  if not os.path.isdir(out_dir):
    raise ValueError(f"{out_dir}: exists and is not a directory")
  if not os.path.isfile(os.path.join(out_dir, META_FILE)):
    if os.listdir(out_dir):
      raise ValueError(f"{out_dir}: exists, is not empty and is not a packed "
                       f"corpus (no {META_FILE}); refusing to replace it")
    return None
  meta = _read_meta(out_dir)
  differences = _differences(meta, expected)
  if differences:
    raise ValueError(f"{out_dir}: holds a corpus with a different "
                     + ", ".join(differences)
                     + "; delete it or choose another out_dir")
  return meta


def check_corpus(out_dir: PathLike, tokenizer_path: PathLike
                 ) -> dict[str, Any]:
  """Checks that the corpus in ``out_dir`` was tokenized by
  ``tokenizer_path``; returns its ``corpus.json``.

  Raises:
    FileNotFoundError: no corpus in ``out_dir``.
    ValueError: one line naming the tokenizer if its fingerprint differs.
  """
  out_dir = os.path.abspath(os.fspath(out_dir))
  meta = _read_meta(out_dir)
  have = meta.get("tokenizer", {}).get("fingerprint")
  want = tokenizer_fingerprint(tokenizer_path)
  if have != want:
    raise ValueError(f"{out_dir}: corpus was tokenized with another "
                     f"tokenizer ({META_FILE} has {_short(have)}, "
                     f"{os.fspath(tokenizer_path)} is {_short(want)}); "
                     "prepare it again with this tokenizer")
  return meta


# ---------------------------------------------------------------------------
# Reading.
# ---------------------------------------------------------------------------


class PackedCorpus:
  """One split of a corpus written by `prepare_corpus`, as a random-access
  `jdistill.data.sources.Source`.

  ``get_batch(indices)`` returns ``x``, ``y``, ``segment_ids``,
  ``positions`` (int32 ``[n, seq_len]``) and ``token_mask`` (bool
  ``[n, seq_len]``), as `examples_from_windows` describes. The object
  pickles without open readers (data loader workers).

  Args:
    out_dir: the corpus directory.
    split: ``"train"`` or ``"validation"``.

  Raises:
    FileNotFoundError: no corpus in ``out_dir``.
    ValueError: one line naming the file that does not match corpus.json.
  """

  def __init__(self, out_dir: PathLike, split: str):
    if split not in SPLITS:
      raise ValueError(f"split={split!r}: expected one of {', '.join(SPLITS)}")
    self.directory = os.path.abspath(os.fspath(out_dir))
    self.split = split
    self.meta = _read_meta(self.directory)
    meta_path = os.path.join(self.directory, META_FILE)
    try:
      self.fields = [Field(f["name"], f["dtype"], tuple(f["shape"]))
                     for f in self.meta["fields"]]
      self._record_bytes = int(self.meta["record_bytes"])
      shards = self.meta["splits"][split]["shards"]
      files = [s["file"] for s in shards]
      counts = [int(s["num_records"]) for s in shards]
      self._num_records = int(self.meta["splits"][split]["records"])
    except (KeyError, TypeError, ValueError) as e:
      raise ValueError(f"{meta_path}: missing or bad entry {e!r}") from None
    if [f.name for f in self.fields] != ["tokens", "segment_ids", "trained"]:
      raise ValueError(f"{meta_path}: fields are "
                       f"{[f.name for f in self.fields]}, expected tokens, "
                       "segment_ids, trained")
    if HEADER_BYTES + sum(f.nbytes for f in self.fields) != self._record_bytes:
      raise ValueError(f"{meta_path}: record_bytes {self._record_bytes} does "
                       "not match the fields")
    if sum(counts) != self._num_records:
      raise ValueError(f"{meta_path}: the {split} shards hold {sum(counts)} "
                       f"records but records is {self._num_records}")
    for name in files:
      if not os.path.isfile(os.path.join(self.directory, name)):
        raise ValueError(f"{os.path.join(self.directory, name)}: shard listed "
                         f"in {META_FILE} is missing")
    self._paths = [os.path.join(self.directory, f) for f in files]
    self._counts = counts
    self._source = None

  @property
  def seq_len(self) -> int:
    return int(self.meta["seq_len"])

  @property
  def vocab_size(self) -> int:
    return int(self.meta["vocab_size"])

  def __len__(self) -> int:
    return self._num_records

  def __repr__(self) -> str:
    return (f"PackedCorpus({self.directory!r}, {self.split!r}: {len(self)} "
            f"windows of {self.seq_len} tokens, vocab_size="
            f"{self.vocab_size})")

  def _data_source(self):
    if self._source is None:
      try:
        source = array_record_data_source.ArrayRecordDataSource(self._paths)
      except Exception as e:  # pylint: disable=broad-except
        raise ValueError(f"{self.directory}: cannot open the {self.split} "
                         f"shards ({str(e).splitlines()[0] if str(e) else e!r})"
                         ) from None
      if len(source) != self._num_records:
        raise ValueError(f"{self.directory}: the {self.split} shards hold "
                         f"{len(source)} records, {META_FILE} says "
                         f"{self._num_records}")
      self._source = source
    return self._source

  def get_batch(self, indices: Any) -> dict[str, np.ndarray]:
    """The examples at ``indices`` (1-D ints, negative from the end)."""
    idx = normalize_indices(indices, len(self),
                            f"the {len(self)} windows of {self.directory} "
                            f"{self.split}")
    width = self.seq_len + 1
    arrays = [np.zeros((len(idx), width), np.int64) for _ in self.fields]
    if idx.size:
      records = self._data_source().__getitems__(idx.tolist())
      for row, (i, record) in enumerate(zip(idx.tolist(), records)):
        if len(record) != self._record_bytes:
          raise ValueError(f"{self.directory} {self.split} window {i}: record "
                           f"has {len(record)} bytes, expected "
                           f"{self._record_bytes} (truncated or corrupted)")
        header = int(np.frombuffer(record, "<u8", 1)[0])
        if header != i:
          raise ValueError(f"{self.directory} {self.split} window {i}: the "
                           f"record holds window {header}; the shards do not "
                           f"match {META_FILE}")
        offset = HEADER_BYTES
        for field, out in zip(self.fields, arrays):
          out[row] = field.decode(record, offset)
          offset += field.nbytes
    return examples_from_windows(*arrays)

  def close(self) -> None:
    if self._source is not None:
      self._source.__exit__(None, None, None)
      self._source = None

  def __getstate__(self) -> dict[str, Any]:
    state = dict(self.__dict__)
    state["_source"] = None
    return state


def packed_dataset(out_dir: PathLike, *, name: Optional[str] = None
                   ) -> Dataset:
  """The corpus as a `Dataset`: ``train`` and ``test`` (the validation
  split), ``num_classes`` the vocabulary, ``input_shape`` ``(seq_len,)``."""
  train = PackedCorpus(out_dir, "train")
  return Dataset(name=name or f"corpus:{os.fspath(out_dir)}", train=train,
                 test=PackedCorpus(out_dir, "validation"),
                 num_classes=train.vocab_size, input_shape=(train.seq_len,))
