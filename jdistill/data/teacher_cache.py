"""Offline teacher caches: teacher outputs per sequence on disk, random access.

A cache is a directory written once by :class:`TeacherCacheWriter` and read
by :class:`TeacherCache`::

  cache/
    meta.json                          form, sizes, field layout, source
    index.npy                          int64 [num_sequences, 2]: (shard, pos)
    cache-00000-of-00004.array_record  one record per sequence
    ...

Forms (the math is in ``jdistill.losses.sparse``):

* ``"dense"``: ``log_probs`` ``[seq_len, V]``, the teacher's
  log-probabilities (``dense_teacher_targets``).
* ``"topk"``: ``ids`` and ``log_probs`` ``[seq_len, k]``, the ``k`` most
  probable tokens in descending order (``topk_teacher_targets``).
* ``"sampled"``: ``ids`` and ``weights`` ``[seq_len, n]``, RS-KD draws in the
  layout of ``sample_teacher_tokens``: distinct ids ascending, then padding
  slots (id 0, weight 0).
* ``"sequences"``: ``ids`` ``[seq_len + 1]``, a whole token sequence the
  teacher generated (its prompt, then its completion: sequence-level KD,
  Kim & Rush 2016), and ``completion`` ``[seq_len]`` (``uint8`` 0/1; read as
  bool): True where the next-token target ``ids[t + 1]`` is a generated
  token (up to and including the first EOS). The student trains on
  ``x = ids[:-1]``, ``y = ids[1:]``.

Any form may add ``entropy`` ``[seq_len]``, the teacher entropy per token
(``teacher_entropy``; the constant that makes ``sampled_kd`` comparable to
dense KD).

Record layout (fixed size, described in ``meta.json["fields"]``): an 8-byte
little-endian ``uint64`` header holding the global sequence index (checked on
every read), then each field's raw little-endian bytes, C order, in the
order of ``fields``. Storage dtypes:

* ids: the smallest unsigned integer that holds ``vocab_size - 1``:
  ``uint8`` (V <= 256), ``uint16`` (V <= 65536), ``uint24`` (3 bytes, V <=
  2**24, e.g. 128k or 256k vocabularies) or ``uint32``;
* log-probabilities: ``float16`` by default (``-inf`` = probability 0;
  ``bfloat16`` and ``float32`` on request);
* sampled weights at ``proposal_temperature == 1``: ``uint8`` counts
  (``weight = count / n`` exactly, ``n <= 255``); otherwise ``float16``
  importance weights (a write that overflows float16 is refused);
* entropy: ``float16``.

Reads return ids as ``int32`` and floating fields (weights decoded from
counts included) as ``float32`` by default, equal to what was written up to
the storage rounding.

Sequences are added in any order with their global index ``i``; the record
goes to shard ``i % num_shards`` and ``index.npy`` records where. The writer
fills ``<directory>.tmp-<pid>`` and renames it to ``<directory>`` only when
every index ``0 .. num_sequences - 1`` was written, so a crash leaves no
directory that looks complete (a killed process leaves its ``.tmp-<pid>``
directory behind to delete). Shards are array_record files written with
``group_size:1`` (each record its own compressed chunk, as
``ArrayRecordDataSource`` requires for random access), ``zstd:3`` by
default. Each shard file carries up to about 128 KiB of fixed array_record
overhead (block and footer padding), so keep shards at 100 MB or more; the
layout's payload and the actual disk use per token are reported separately
(``payload_bytes_per_token``, ``bytes_per_token``).

Example::

  with TeacherCacheWriter("/data/cache", form="topk", vocab_size=32768,
                          seq_len=2048, k=32, temperature=1.0, num_shards=8,
                          source={"teacher": ckpt, "corpus": fingerprint}) as w:
    for i, tokens in batches:
      lp, ids = sparse.topk_teacher_targets(teacher(tokens), 32)
      w.add_batch(i, {"log_probs": lp, "ids": ids})
  cache = TeacherCache("/data/cache", form="topk")
  batch = cache.get_batch([17, 3, 9])   # {"ids": [3, 2048, 32] int32, ...}

Multi-process writes (every host of a job writes its own part; no host sees
the whole cache): give each process's writer ``process_index``,
``process_count`` (``P``), ``num_sequences`` (``N``) and a ``barrier`` that
returns once every process has called it, e.g.
``lambda: jax.experimental.multihost_utils.sync_global_devices("cache")``.
``directory`` must be on a filesystem every process sees. Process ``p`` owns
the contiguous sequences ``process_sequence_range(N, p, P)`` =
``[p * N // P, (p + 1) * N // P)`` and the shards ``process_shard_range(S,
p, P)`` = ``[p * S // P, (p + 1) * S // P)`` (``S = max(num_shards, P)``),
its sequences going round robin over its shards in the order they are
added. The shard files keep the global ``cache-XXXXX-of-YYYYY`` names and the
finished directory has the same files and format as a single-process cache
(``meta.json`` adds ``process_count`` and describes the layout in
``shard_of_index``; ``index.npy`` still maps every sequence to its shard and
position). Every process runs the same calls::

  w = TeacherCacheWriter("/shared/cache", form="topk", ..., num_sequences=N,
                         num_shards=8, process_index=jax.process_index(),
                         process_count=jax.process_count(), barrier=sync)
  # constructor: process 0 empties <directory>.staging; barrier()
  with w:
    for i in w.sequence_range:       # only this process's sequences
      w.add(i, targets(i))
  # close(): this process's part file; barrier(); process 0 commits
  # (commit_teacher_cache); barrier(); every process returns the path, or
  # raises the same one-line error when the commit failed.

Everything goes to ``<directory>.staging`` (``job.json`` from process 0,
then per process its shards and ``part-PPPPP-of-QQQQQ.{npy,json}``); the
commit checks that every part is there, from this run and with the same
settings, that every sequence ``0 .. N - 1`` was written exactly once and
every shard holds what its part says, then writes ``index.npy`` and
``meta.json``, removes the bookkeeping files and renames the staging
directory to ``directory``. A crash of any process before that leaves no
``directory`` (the staging directory stays; the next run's process 0 removes
it, or refuses in one line if it holds files no writer makes, and
``commit_teacher_cache`` can finish it if every part was written). A process
that raises inside its ``with`` deletes only its own files and calls no
barrier: the others wait in ``close()`` until the job's runtime stops them
(JAX's coordination service does when a process exits). The meta.json
version stays 1: a multi-process cache only adds ``process_count``, so every
reader of version 1 reads it.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import re
import shutil
import uuid
from typing import (Any, Callable, Iterable, Mapping, Optional, Sequence,
                    Union)

import ml_dtypes
import numpy as np

__all__ = [
    "FORMS",
    "Field",
    "TeacherCache",
    "TeacherCacheWriter",
    "cache_layout",
    "commit_teacher_cache",
    "id_dtype_for",
    "layout_bytes_per_token",
    "process_sequence_range",
    "process_shard_range",
    "staging_directory",
]


def _array_record():
  """array_record's module, imported when a cache is written or read (so
  that ``jdistill.data`` and ``jdistill.train`` import where array_record
  is not installed, e.g. a GPU image with only the JAX stack)."""
  from array_record.python import array_record_module
  return array_record_module


FORMS = ("dense", "topk", "sampled", "sequences")
FORMAT = "jdistill.teacher_cache"
VERSION = 1
META_FILE = "meta.json"
INDEX_FILE = "index.npy"
HEADER_BYTES = 8
_SHARD_RE = re.compile(r"^cache-(\d{5})-of-(\d{5})\.array_record$")
# Multi-process writes: the staging directory and its bookkeeping files.
STAGING_SUFFIX = ".staging"
JOB_FILE = "job.json"
FAILED_FILE = "failed.json"
_PART_RE = re.compile(r"^part-(\d{5})-of-(\d{5})\.(json|npy)$")
_STAGING_FILE_RE = re.compile(
    r"^(job\.json|failed\.json|meta\.json|index\.npy"
    r"|part-\d{5}-of-\d{5}\.(json|npy)"
    r"|cache-\d{5}-of-\d{5}\.array_record)(\.tmp)?$")
_READER_OPTIONS = "readahead_buffer_size:0"

_FLOAT_DTYPES = {
    "float16": np.dtype("<f2"),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float32": np.dtype("<f4"),
}
_ID_BYTES = {"uint8": 1, "uint16": 2, "uint24": 3, "uint32": 4}
_DTYPE_BYTES = {**_ID_BYTES, **{k: v.itemsize for k, v in
                                _FLOAT_DTYPES.items()}}

PathLike = Union[str, os.PathLike]


def _shard_name(shard: int, num_shards: int) -> str:
  return f"cache-{shard:05d}-of-{num_shards:05d}.array_record"


def _part_name(process_index: int, process_count: int, ext: str) -> str:
  return f"part-{process_index:05d}-of-{process_count:05d}.{ext}"


def _check_process(process_index: Any, process_count: Any) -> None:
  for name, value in (("process_index", process_index),
                      ("process_count", process_count)):
    if not isinstance(value, (int, np.integer)) or isinstance(
        value, (bool, np.bool_)):
      raise ValueError(f"{name} must be an int, got {value!r}")
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(f"need 0 <= process_index < process_count, got "
                     f"process_index={process_index}, "
                     f"process_count={process_count}")


def process_sequence_range(num_sequences: int, process_index: int,
                           process_count: int) -> range:
  """The sequences process ``p`` of ``P`` writes: ``[p*N//P, (p+1)*N//P)``.

  Contiguous, in process order, covering ``0 .. N - 1`` once; sizes differ
  by at most one (a process may own none when ``N < P``).
  """
  _check_process(process_index, process_count)
  n, p, num = int(num_sequences), int(process_index), int(process_count)
  return range(p * n // num, (p + 1) * n // num)


def process_shard_range(num_shards: int, process_index: int,
                        process_count: int) -> range:
  """The shard files process ``p`` of ``P`` writes: ``[p*S//P, (p+1)*S//P)``
  (``num_shards >= process_count``, so each process has at least one)."""
  _check_process(process_index, process_count)
  if num_shards < process_count:
    raise ValueError(f"num_shards={num_shards} < process_count="
                     f"{process_count}: every process needs its own shard")
  s, p, num = int(num_shards), int(process_index), int(process_count)
  return range(p * s // num, (p + 1) * s // num)


def staging_directory(directory: PathLike) -> str:
  """Where a multi-process write of ``directory`` is staged until commit."""
  return os.path.abspath(os.fspath(directory)) + STAGING_SUFFIX


def _format_ranges(indices: np.ndarray, limit: int = 4) -> str:
  """``[3, 5), 9, [12, 20)``: sorted ints as half-open runs (``limit``
  runs, then ``...``)."""
  idx = np.unique(np.asarray(indices, np.int64))
  if not idx.size:
    return "none"
  breaks = np.nonzero(np.diff(idx) != 1)[0] + 1
  runs = [(int(r[0]), int(r[-1]) + 1) for r in np.split(idx, breaks)]
  text = [str(a) if b == a + 1 else f"[{a}, {b})" for a, b in runs[:limit]]
  return ", ".join(text) + (", ..." if len(runs) > limit else "")


def _write_atomic(path: str, write: Callable[[Any], None],
                  mode: str = "w") -> None:
  """Writes ``path`` through ``path.tmp`` and a rename, fsynced."""
  tmp = path + ".tmp"
  with open(tmp, mode) as f:
    write(f)
    f.flush()
    os.fsync(f.fileno())
  os.rename(tmp, path)


def _dump_json(obj: Any) -> Callable[[Any], None]:
  def write(f):
    json.dump(obj, f, indent=2, sort_keys=True)
    f.write("\n")
  return write


def id_dtype_for(vocab_size: int) -> str:
  """The storage dtype name of token ids for ``vocab_size``.

  ``"uint8"`` up to 256, ``"uint16"`` up to 65536, ``"uint24"`` (3 bytes) up
  to 2**24, else ``"uint32"``.
  """
  for name, nbytes in _ID_BYTES.items():
    if vocab_size <= 2**(8 * nbytes):
      return name
  raise ValueError(f"vocab_size={vocab_size} does not fit in 32-bit ids")


def _storage_dtype(name: str) -> np.dtype:
  """The little-endian numpy dtype of a storage dtype name (not uint24)."""
  if name in _FLOAT_DTYPES:
    return _FLOAT_DTYPES[name]
  return np.dtype(name).newbyteorder("<")


@dataclasses.dataclass(frozen=True)
class Field:
  """One array of a record: name, storage dtype name and shape."""

  name: str
  dtype: str
  shape: tuple[int, ...]

  @property
  def nbytes(self) -> int:
    return math.prod(self.shape) * _DTYPE_BYTES[self.dtype]

  def encode(self, x: np.ndarray) -> bytes:
    """Raw little-endian bytes of ``x`` (already validated) in ``dtype``."""
    if self.dtype == "uint24":
      raw = np.ascontiguousarray(x, dtype="<u4").view(np.uint8)
      return raw.reshape(x.shape + (4,))[..., :3].tobytes()
    return np.ascontiguousarray(x, dtype=_storage_dtype(self.dtype)).tobytes()

  def decode(self, buffer: bytes, offset: int) -> np.ndarray:
    """The field's array from ``buffer[offset:offset + nbytes]``."""
    if self.dtype == "uint24":
      raw = np.frombuffer(buffer, np.uint8, self.nbytes, offset)
      raw = raw.reshape(self.shape + (3,)).astype(np.int32)
      return raw[..., 0] | (raw[..., 1] << 8) | (raw[..., 2] << 16)
    count = math.prod(self.shape)
    return np.frombuffer(buffer, _storage_dtype(self.dtype), count,
                         offset).reshape(self.shape)

  def to_json(self) -> dict[str, Any]:
    return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


def _weights_encoding(num_samples: int, proposal_temperature: float,
                      weights_dtype: Optional[str]) -> str:
  if weights_dtype is None:
    if float(proposal_temperature) == 1.0 and num_samples <= 255:
      return "counts"
    return "float16"
  if weights_dtype == "counts":
    if float(proposal_temperature) != 1.0:
      raise ValueError("weights_dtype='counts' needs proposal_temperature=1 "
                       f"(weights count/n), got {proposal_temperature}")
    if num_samples > 255:
      raise ValueError(f"weights_dtype='counts' stores uint8 counts; "
                       f"num_samples={num_samples} > 255")
    return "counts"
  if weights_dtype not in _FLOAT_DTYPES:
    raise ValueError(f"weights_dtype={weights_dtype!r} is not one of counts, "
                     + ", ".join(_FLOAT_DTYPES))
  return weights_dtype


def cache_layout(
    form: str,
    *,
    vocab_size: int,
    seq_len: int,
    k: Optional[int] = None,
    num_samples: Optional[int] = None,
    proposal_temperature: float = 1.0,
    log_probs_dtype: str = "float16",
    weights_dtype: Optional[str] = None,
    store_entropy: bool = False,
) -> list[Field]:
  """The fields of one record (see the module docstring), in record order.

  Args:
    form: ``"dense"``, ``"topk"``, ``"sampled"`` or ``"sequences"``.
    vocab_size: ``V``.
    seq_len: tokens per sequence.
    k: entries per token of ``"topk"``.
    num_samples: slots per token of ``"sampled"``.
    proposal_temperature: of the sampled targets; 1 allows uint8 counts.
    log_probs_dtype: ``"float16"``, ``"bfloat16"`` or ``"float32"``.
    weights_dtype: sampled weights: None (counts when possible, else
      float16), ``"counts"`` or a float dtype name.
    store_entropy: add a ``[seq_len]`` float16 ``entropy`` field.

  Returns:
    A list of :class:`Field`.
  """
  if form not in FORMS:
    raise ValueError(f"form={form!r} is not one of {', '.join(FORMS)}")
  for name, value in (("vocab_size", vocab_size), ("seq_len", seq_len)):
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
      raise ValueError(f"{name} must be a positive int, got {value!r}")
  if log_probs_dtype not in _FLOAT_DTYPES:
    raise ValueError(f"log_probs_dtype={log_probs_dtype!r} is not one of "
                     + ", ".join(_FLOAT_DTYPES))
  ids = id_dtype_for(vocab_size)
  if form in ("dense", "sequences"):
    if k is not None or num_samples is not None:
      raise ValueError(f"form={form!r} takes neither k nor num_samples")
    fields = ([Field("log_probs", log_probs_dtype, (seq_len, vocab_size))]
              if form == "dense" else
              [Field("ids", ids, (seq_len + 1,)),
               Field("completion", "uint8", (seq_len,))])
  elif form == "topk":
    if num_samples is not None:
      raise ValueError("form='topk' takes k, not num_samples")
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= (
        vocab_size):
      raise ValueError(f"form='topk' needs an int k in [1, vocab_size="
                       f"{vocab_size}], got {k!r}")
    fields = [Field("ids", ids, (seq_len, k)),
              Field("log_probs", log_probs_dtype, (seq_len, k))]
  else:
    if k is not None:
      raise ValueError("form='sampled' takes num_samples, not k")
    if (not isinstance(num_samples, int) or isinstance(num_samples, bool)
        or num_samples < 1):
      raise ValueError("form='sampled' needs a positive int num_samples, got "
                       f"{num_samples!r}")
    if not float(proposal_temperature) > 0:
      raise ValueError(f"proposal_temperature must be > 0, got "
                       f"{proposal_temperature}")
    encoding = _weights_encoding(num_samples, proposal_temperature,
                                 weights_dtype)
    fields = [Field("ids", ids, (seq_len, num_samples)),
              Field("weights", "uint8" if encoding == "counts" else encoding,
                    (seq_len, num_samples))]
  if store_entropy:
    fields.append(Field("entropy", "float16", (seq_len,)))
  return fields


def layout_bytes_per_token(form: str, *, vocab_size: int, **kwargs) -> float:
  """Payload bytes per token of a cache layout (no header, no file overhead).

  Example: ``layout_bytes_per_token("topk", vocab_size=32768, k=32)`` is
  128.0 (uint16 ids + float16 log-probs).
  """
  fields = cache_layout(form, vocab_size=vocab_size, seq_len=1, **kwargs)
  return float(sum(f.nbytes for f in fields))


# ---------------------------------------------------------------------------
# Validation of arrays before they are written.
# ---------------------------------------------------------------------------


def _check_array(field: Field, x: Any, *, vocab_size: int, num_samples: int,
                 where: str) -> np.ndarray:
  """``x`` as a numpy array that ``field`` can store losslessly enough."""
  x = np.asarray(x)
  if x.shape != field.shape:
    raise ValueError(f"{where}: {field.name} has shape {x.shape}, expected "
                     f"{field.shape}")
  if field.name == "ids":
    if not np.issubdtype(x.dtype, np.integer):
      raise ValueError(f"{where}: ids must be integers, got dtype {x.dtype}")
    if x.size and (x.min() < 0 or x.max() >= vocab_size):
      raise ValueError(f"{where}: ids must be in [0, {vocab_size}), got "
                       f"[{x.min()}, {x.max()}]")
    return x
  if field.name == "completion":
    if x.dtype != np.bool_ and not (np.issubdtype(x.dtype, np.integer) and (
        x.size == 0 or (x.min() >= 0 and x.max() <= 1))):
      raise ValueError(f"{where}: completion must be a bool (or 0/1) mask, "
                       f"got dtype {x.dtype}")
    return x.astype(np.uint8)
  if not np.issubdtype(x.dtype, np.floating) and x.dtype != (
      ml_dtypes.bfloat16):
    raise ValueError(f"{where}: {field.name} must be floating point, got "
                     f"dtype {x.dtype}")
  x = x.astype(np.float32)
  if np.isnan(x).any():
    raise ValueError(f"{where}: {field.name} contains NaN")
  if field.name == "log_probs":
    if (x > 1e-3).any():
      raise ValueError(f"{where}: log_probs must be <= 0 (log-probabilities), "
                       f"got a maximum of {x.max()}")
    return np.minimum(x, 0.0)
  if not np.isfinite(x).all() or (x < 0).any():
    raise ValueError(f"{where}: {field.name} must be finite and >= 0")
  if field.name == "weights" and field.dtype == "uint8":
    counts = np.rint(x * num_samples)
    if np.abs(counts - x * num_samples).max(initial=0.0) > 1e-3 or (
        counts.max(initial=0) > num_samples):
      raise ValueError(
          f"{where}: weights are not counts / num_samples (num_samples="
          f"{num_samples}); the cache stores uint8 counts because "
          "proposal_temperature == 1; pass weights_dtype='float16' for other "
          "weights")
    return counts.astype(np.uint8)
  with np.errstate(over="ignore"):
    stored = x.astype(_FLOAT_DTYPES[field.dtype])
  if not np.isfinite(stored.astype(np.float32)).all():
    hint = "; use weights_dtype='float32'" if field.name == "weights" else ""
    raise ValueError(f"{where}: {field.name} overflow {field.dtype} (max "
                     f"{x.max()}){hint}")
  return x


def fsync_path(path: str) -> None:
  """fsync a file or directory (so a rename into it is durable)."""
  fd = os.open(path, os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


def _is_cache_dir(path: str) -> bool:
  return os.path.isfile(os.path.join(path, META_FILE))


def _check_destination(d: str, overwrite: bool) -> None:
  if not os.path.exists(d):
    return
  if not os.path.isdir(d):
    raise FileExistsError(f"{d} exists and is not a directory")
  if _is_cache_dir(d):
    if not overwrite:
      raise FileExistsError(f"teacher cache {d} already exists; pass "
                            "overwrite=True to replace it")
  elif os.listdir(d):
    raise FileExistsError(f"{d} exists, is not empty and is not a teacher "
                          "cache (no meta.json); refusing to replace it")


def _move_into_place(src: str, d: str, overwrite: bool) -> None:
  """Renames the finished cache ``src`` to ``d`` (replacing a complete cache
  there when ``overwrite``)."""
  old = None
  if os.path.exists(d):
    try:
      _check_destination(d, overwrite)
    except FileExistsError as e:
      raise FileExistsError(f"{e}; the finished cache is left at "
                            f"{src}") from None
    if _is_cache_dir(d):
      old = f"{d}.old-{os.getpid()}"
      os.rename(d, old)
    else:
      os.rmdir(d)  # empty
  os.rename(src, d)
  fsync_path(os.path.dirname(d) or ".")
  if old is not None:
    shutil.rmtree(old)


def _cache_meta(settings: Mapping[str, Any], *, num_sequences: int,
                shards: list[dict[str, Any]], shard_of_index: str,
                disk_bytes: int) -> dict[str, Any]:
  """meta.json of a finished cache; ``settings`` as the writer records
  them (:meth:`TeacherCacheWriter._settings`)."""
  fields = [Field(f["name"], f["dtype"], tuple(f["shape"]))
            for f in settings["fields"]]
  seq_len = int(settings["meta"]["seq_len"])
  meta = dict(settings["meta"])
  meta.update({
      "fields": [f.to_json() for f in fields],
      "record_header": "uint64 little-endian global sequence index",
      "record_bytes": settings["record_bytes"],
      "num_sequences": num_sequences,
      "num_shards": len(shards),
      "shards": shards,
      "shard_of_index": shard_of_index,
      "index_file": INDEX_FILE,
      "compression": settings["compression"],
      "payload_bytes_per_token": sum(f.nbytes for f in fields) / seq_len,
      "disk_bytes_per_token": disk_bytes / (num_sequences * seq_len),
      "created": datetime.datetime.now(datetime.timezone.utc).isoformat(
          timespec="seconds"),
      "source": settings["source"],
  })
  return meta


def _write_finished(directory: str, index: np.ndarray, meta_of_disk:
                    Callable[[int], dict[str, Any]]) -> None:
  """Writes ``index.npy`` and ``meta.json`` (from the bytes on disk of the
  shards and the index) into ``directory`` and fsyncs everything."""
  np.save(os.path.join(directory, INDEX_FILE), index)
  disk = sum(os.path.getsize(os.path.join(directory, f))
             for f in os.listdir(directory)
             if f == INDEX_FILE or _SHARD_RE.match(f))
  with open(os.path.join(directory, META_FILE), "w") as f:
    _dump_json(meta_of_disk(disk))(f)
  for name in os.listdir(directory):
    fsync_path(os.path.join(directory, name))
  fsync_path(directory)


# ---------------------------------------------------------------------------
# Writer.
# ---------------------------------------------------------------------------


def normalize_indices(indices: Any, n: int, what: str) -> np.ndarray:
  """1-D int ``indices`` into ``n`` records (negative from the end) as
  non-negative int64; ``what`` names the records in the IndexError."""
  idx = np.asarray(indices)
  if idx.ndim != 1 or not (np.issubdtype(idx.dtype, np.integer)
                           or idx.size == 0):
    raise ValueError(f"indices must be a 1-D array of ints, got shape "
                     f"{idx.shape} and dtype {idx.dtype}")
  idx = idx.astype(np.int64)
  if idx.size and (idx.min() < -n or idx.max() >= n):
    raise IndexError(f"index out of range for {what}: [{idx.min()}, "
                     f"{idx.max()}]")
  return np.where(idx < 0, idx + n, idx)


class TeacherCacheWriter:
  """Writes a teacher cache atomically (see the module docstring).

  Use as a context manager; a normal exit finalises the cache (:meth:`close`),
  an exception deletes the temporary directory (with ``process_count > 1``:
  this process's files in it) and propagates.

  Args:
    directory: final cache directory (local filesystem; with
      ``process_count > 1`` one that every process sees). Refused if it
      exists, unless ``overwrite=True`` and it is a complete teacher cache
      (an existing non-cache directory is never replaced, an empty one is).
    form: ``"dense"``, ``"topk"``, ``"sampled"`` or ``"sequences"``.
    vocab_size: ``V``.
    seq_len: tokens per sequence (pad shorter sequences; keep their mask
      with the corpus).
    k: entries per token (``"topk"``).
    num_samples: slots per token (``"sampled"``).
    temperature: the distillation temperature the targets were computed at
      (recorded; pass it to the loss).
    proposal_temperature: of sampled targets (recorded; 1 stores counts).
    num_shards: number of array_record files (of the whole cache; with
      ``process_count > 1`` raised to ``process_count`` if smaller).
    num_sequences: expected number of sequences; if given, indices outside
      ``[0, num_sequences)`` are refused at ``add`` time. Either way
      :meth:`close` requires every index ``0 .. N - 1`` exactly once.
      Required with ``process_count > 1``.
    log_probs_dtype: ``"float16"`` (default), ``"bfloat16"`` or
      ``"float32"``.
    weights_dtype: see :func:`cache_layout`.
    store_entropy: expect an ``entropy`` ``[seq_len]`` array per sequence.
    compression: array_record compression option: ``"zstd:3"`` (default),
      ``"zstd:N"``, ``"brotli:N"``, ``"snappy"`` or ``"uncompressed"``.
    source: JSON-serialisable description of where the targets come from
      (teacher checkpoint, corpus fingerprint, ...), stored in meta.json.
    overwrite: replace an existing complete cache at ``directory``.
    process_index: this process (``jax.process_index()``).
    process_count: processes writing the cache together
      (``jax.process_count()``). 1 (default) is the single-process writer;
      more writes ``<directory>.staging`` as the module docstring says, each
      process only :attr:`sequence_range`.
    barrier: with ``process_count > 1``, a function that returns once every
      process has called it (``multihost_utils.sync_global_devices``); the
      constructor calls it once and :meth:`close` twice, so every process
      must construct and close its writer. Unused with one process.
  """

  def __init__(
      self,
      directory: PathLike,
      *,
      form: str,
      vocab_size: int,
      seq_len: int,
      k: Optional[int] = None,
      num_samples: Optional[int] = None,
      temperature: float = 1.0,
      proposal_temperature: float = 1.0,
      num_shards: int = 1,
      num_sequences: Optional[int] = None,
      log_probs_dtype: str = "float16",
      weights_dtype: Optional[str] = None,
      store_entropy: bool = False,
      compression: str = "zstd:3",
      source: Optional[Mapping[str, Any]] = None,
      overwrite: bool = False,
      process_index: int = 0,
      process_count: int = 1,
      barrier: Optional[Callable[[], None]] = None,
  ):
    self.directory = os.path.abspath(os.fspath(directory))
    self.fields = cache_layout(
        form, vocab_size=vocab_size, seq_len=seq_len, k=k,
        num_samples=num_samples, proposal_temperature=proposal_temperature,
        log_probs_dtype=log_probs_dtype, weights_dtype=weights_dtype,
        store_entropy=store_entropy)
    if not isinstance(num_shards, int) or num_shards < 1:
      raise ValueError(f"num_shards must be a positive int, got {num_shards!r}")
    if num_sequences is not None and (not isinstance(num_sequences, int)
                                      or num_sequences < 1):
      raise ValueError(f"num_sequences must be a positive int or None, got "
                       f"{num_sequences!r}")
    if not float(temperature) > 0:
      raise ValueError(f"temperature must be > 0, got {temperature}")
    try:
      json.dumps(dict(source or {}))
    except (TypeError, ValueError) as e:
      raise ValueError(f"source must be a JSON-serialisable dict: {e}"
                       ) from None
    _check_process(process_index, process_count)
    process_index, process_count = int(process_index), int(process_count)
    if process_count > 1:
      if num_sequences is None:
        raise ValueError(f"process_count={process_count} needs num_sequences "
                         "(each process writes its share of 0 .. N - 1)")
      if not callable(barrier):
        raise ValueError(
            f"process_count={process_count} needs a barrier function (e.g. "
            "lambda: multihost_utils.sync_global_devices('teacher_cache')), "
            f"got {barrier!r}")
      num_shards = max(num_shards, process_count)
    self._check_destination(overwrite)
    self.form = form
    self.vocab_size = vocab_size
    self.seq_len = seq_len
    self.num_shards = num_shards
    self.num_sequences = num_sequences
    self.overwrite = overwrite
    self.process_index = process_index
    self.process_count = process_count
    self._barrier = barrier
    self._meta = {
        "format": FORMAT,
        "version": VERSION,
        "form": form,
        "vocab_size": vocab_size,
        "seq_len": seq_len,
        "temperature": float(temperature),
    }
    if form == "topk":
      self._meta["k"] = k
      self._meta["layout"] = ("ids sorted by descending teacher probability; "
                              "log_probs = log_softmax(logits / temperature) "
                              "at the ids (not renormalised)")
    elif form == "sampled":
      self._meta["num_samples"] = num_samples
      self._meta["proposal_temperature"] = float(proposal_temperature)
      encoding = self._field("weights").dtype
      self._meta["weights_encoding"] = (
          "counts" if encoding == "uint8" else encoding)
      self._meta["layout"] = (
          "distinct sampled ids ascending, then padding slots (id 0, weight "
          "0); weight = count / num_samples * p / q")
    elif form == "sequences":
      self._meta["layout"] = (
          "ids: the teacher's prompt + generated tokens [seq_len + 1]; "
          "completion[t]: ids[t + 1] was generated")
    else:
      self._meta["layout"] = "log_probs = log_softmax(logits / temperature)"
    self._num_samples = num_samples or 0
    self._compression = compression
    self._source = dict(source or {})
    self._record_bytes = HEADER_BYTES + sum(f.nbytes for f in self.fields)
    self._writers: dict[int, Any] = {}
    self._positions: dict[int, tuple[int, int]] = {}
    self._counts = [0] * num_shards
    self._closed = False
    self._part_written = False
    self._close_called = False
    if process_count == 1:
      self._sequences = (range(num_sequences) if num_sequences is not None
                         else None)
      self._shards = range(num_shards)
      self._tmp = f"{self.directory}.tmp-{os.getpid()}"
      if os.path.exists(self._tmp):
        raise FileExistsError(
            f"{self._tmp} exists: another writer of {self.directory} in this "
            "process, or one that was killed; delete it to start again")
      os.makedirs(self._tmp)
    else:
      self._sequences = process_sequence_range(num_sequences, process_index,
                                               process_count)
      self._shards = process_shard_range(num_shards, process_index,
                                         process_count)
      self._tmp = staging_directory(self.directory)
      if process_index == 0:
        self._run = uuid.uuid4().hex
        self._prepare_staging()
      barrier()
      if process_index != 0:
        self._run = self._staged_run()
    try:
      for s in self._shards:
        path = os.path.join(self._tmp, _shard_name(s, num_shards))
        self._writers[s] = _array_record().ArrayRecordWriter(
            path, f"group_size:1,{compression}")
    except Exception:
      self.abort()
      raise

  def _field(self, name: str) -> Field:
    return next(f for f in self.fields if f.name == name)

  def _check_destination(self, overwrite: bool) -> None:
    _check_destination(self.directory, overwrite)

  def _settings(self) -> dict[str, Any]:
    """What every process of a multi-process write must agree on."""
    return {
        "meta": self._meta,
        "fields": [f.to_json() for f in self.fields],
        "record_bytes": self._record_bytes,
        "compression": self._compression,
        "source": self._source,
        "num_sequences": self.num_sequences,
        "num_shards": self.num_shards,
        "process_count": self.process_count,
    }

  def _prepare_staging(self) -> None:
    """Process 0: a fresh ``<directory>.staging`` holding ``job.json``.

    A staging directory left by a crashed run is removed when it holds only
    files a writer makes; anything else there is refused.
    """
    staging = self._tmp
    if os.path.lexists(staging):
      if not os.path.isdir(staging) or os.path.islink(staging):
        raise FileExistsError(f"{staging} exists and is not a directory; "
                              "delete it to write the teacher cache")
      foreign = sorted(n for n in os.listdir(staging)
                       if not _STAGING_FILE_RE.match(n))
      if foreign:
        raise FileExistsError(
            f"{staging} holds files no teacher cache writer made "
            f"({', '.join(foreign[:3])}); delete it to write the cache")
      shutil.rmtree(staging)
    os.makedirs(staging)
    job = {"format": FORMAT + ".staging", "run": self._run,
           "directory": self.directory, "overwrite": self.overwrite,
           "settings": self._settings()}
    _write_atomic(os.path.join(staging, JOB_FILE), _dump_json(job))
    fsync_path(staging)
    fsync_path(os.path.dirname(staging) or ".")

  def _staged_run(self) -> Optional[str]:
    """Processes other than 0, after the barrier: the run id of job.json.

    Without one (the staging directory is not shared with process 0) this
    process still writes its part locally: the commit then reports the part
    missing, and :meth:`close` raises on every process.
    """
    try:
      with open(os.path.join(self._tmp, JOB_FILE)) as f:
        return json.load(f).get("run")
    except (OSError, ValueError):
      os.makedirs(self._tmp, exist_ok=True)
      return None

  @property
  def tmp_directory(self) -> str:
    """Where the cache is written until :meth:`close` renames it (the shared
    ``<directory>.staging`` with ``process_count > 1``)."""
    return self._tmp

  @property
  def sequence_range(self) -> Optional[range]:
    """The sequence indices this writer takes: its process's contiguous share
    with ``process_count > 1``, else ``range(num_sequences)`` (None when
    ``num_sequences`` is None)."""
    return self._sequences

  def add(self, index: int, arrays: Mapping[str, Any]) -> None:
    """Writes the targets of sequence ``index``.

    Args:
      index: global sequence index (any order, each exactly once; with
        ``process_count > 1`` one of :attr:`sequence_range`).
      arrays: one array per field name (``ids``, ``log_probs``, ``weights``,
        ``entropy`` as the form requires), with the field's shape, e.g.
        ``[seq_len, k]``; numpy or jax arrays.
    """
    if self._closed:
      raise ValueError(f"writer for {self.directory} is closed")
    if isinstance(index, (bool, np.bool_)) or not isinstance(
        index, (int, np.integer)):
      raise ValueError(f"index must be an int, got {index!r}")
    index = int(index)
    if index < 0 or (self.num_sequences is not None
                     and index >= self.num_sequences):
      raise ValueError(f"sequence index {index} is out of range [0, "
                       f"{self.num_sequences or 'inf'})")
    if self.process_count > 1 and index not in self._sequences:
      r = self._sequences
      raise ValueError(
          f"sequence index {index} is not process {self.process_index}'s "
          f"(it writes [{r.start}, {r.stop}) of {self.num_sequences}, "
          f"process_count={self.process_count})")
    if index in self._positions:
      raise ValueError(f"sequence index {index} was already written")
    names = {f.name for f in self.fields}
    if set(arrays) != names:
      raise ValueError(f"sequence {index}: got arrays {sorted(arrays)}, "
                       f"expected {sorted(names)} for form={self.form!r}")
    parts = [np.uint64(index).astype("<u8").tobytes()]
    for field in self.fields:
      x = _check_array(field, arrays[field.name], vocab_size=self.vocab_size,
                       num_samples=self._num_samples,
                       where=f"sequence {index}")
      parts.append(field.encode(x))
    record = b"".join(parts)
    assert len(record) == self._record_bytes
    if self.process_count == 1:
      shard = index % self.num_shards
    else:
      shard = self._shards.start + (
          (index - self._sequences.start) % len(self._shards))
    self._writers[shard].write(record)
    self._positions[index] = (shard, self._counts[shard])
    self._counts[shard] += 1

  def add_batch(self, indices: Iterable[int], arrays: Mapping[str, Any]
                ) -> None:
    """:meth:`add` for a batch: ``arrays`` have a leading ``[B]`` axis."""
    indices = np.asarray(list(indices) if not hasattr(indices, "shape")
                         else indices)
    if indices.ndim != 1:
      raise ValueError(f"indices must be 1-D, got shape {indices.shape}")
    arrays = {name: np.asarray(x) for name, x in arrays.items()}
    for name, x in arrays.items():
      if x.ndim == 0 or x.shape[0] != len(indices):
        raise ValueError(f"{name} has shape {x.shape}; expected a leading "
                         f"batch axis of {len(indices)}")
    for b, i in enumerate(indices.tolist()):
      self.add(i, {name: x[b] for name, x in arrays.items()})

  def abort(self) -> None:
    """Stops writing and deletes the temporary directory (with
    ``process_count > 1``: only this process's shards and part, never the
    shared staging directory; no barrier is called)."""
    self._closed = True
    for w in getattr(self, "_writers", {}).values():
      try:
        w.close()
      except Exception:  # pylint: disable=broad-except
        pass
    if self.process_count == 1:
      shutil.rmtree(self._tmp, ignore_errors=True)
      return
    mine = [_shard_name(s, self.num_shards) for s in self._shards] + [
        _part_name(self.process_index, self.process_count, ext)
        for ext in ("npy", "json")]
    for name in mine:
      for path in (os.path.join(self._tmp, name),
                   os.path.join(self._tmp, name + ".tmp")):
        try:
          os.remove(path)
        except OSError:
          pass

  def write_part(self) -> None:
    """``process_count > 1``: closes this process's shards and writes its
    part (``part-PPPPP-of-QQQQQ.npy``: ``(shard, position)`` per sequence of
    :attr:`sequence_range`, ``-1`` for one never added; ``.json``: run,
    settings, records per shard), without a barrier.

    :meth:`close` calls it first; call it directly (then
    :func:`commit_teacher_cache` on process 0 once every process has) to
    run the steps of :meth:`close` under your own synchronisation.
    """
    if self.process_count == 1:
      raise ValueError("write_part is for process_count > 1; close() "
                       "finishes a single-process cache")
    if self._closed:
      raise ValueError(f"writer for {self.directory} is closed")
    self._closed = True
    for w in self._writers.values():
      w.close()
    seqs = self._sequences
    positions = np.full((len(seqs), 2), -1, np.int64)
    for i, where in self._positions.items():
      positions[i - seqs.start] = where
    p, num = self.process_index, self.process_count
    _write_atomic(os.path.join(self._tmp, _part_name(p, num, "npy")),
                  lambda f: np.save(f, positions), mode="wb")
    part = {"run": self._run, "process_index": p,
            "sequences": [seqs.start, seqs.stop],
            "shards": [self._shards.start, self._shards.stop],
            "num_records": [self._counts[s] for s in self._shards],
            "settings": self._settings()}
    _write_atomic(os.path.join(self._tmp, _part_name(p, num, "json")),
                  _dump_json(part))
    fsync_path(self._tmp)
    self._part_written = True

  def close(self) -> str:
    """Finalises the cache and renames it into place; returns its path.

    With ``process_count > 1`` every process must call it: it writes this
    process's part (:meth:`write_part`), calls ``barrier()``, process 0
    commits (:func:`commit_teacher_cache`), ``barrier()`` again, and then
    every process returns the path or raises the commit's error (processes
    other than 0 prefix it with ``process 0 could not commit:``).

    Raises:
      ValueError: if some index in ``0 .. N - 1`` was never written (the
        temporary directory is kept, named in the message); with
        ``process_count > 1`` also a part missing or not matching
        (:func:`commit_teacher_cache`).
      FileExistsError: if ``directory`` appeared meanwhile and may not be
        replaced (the finished cache is left in the temporary directory).
      FileNotFoundError: ``process_count > 1``, a process other than 0 that
        does not see the committed cache (``directory`` is not shared).
    """
    if self.process_count > 1:
      return self._close_multiprocess()
    if self._closed:
      raise ValueError(f"writer for {self.directory} is closed")
    n = (self.num_sequences if self.num_sequences is not None
         else (max(self._positions) + 1 if self._positions else 0))
    missing = n - len(self._positions)
    if n == 0 or missing:
      absent = [i for i in range(n) if i not in self._positions][:5]
      raise ValueError(
          f"teacher cache {self.directory} is incomplete: "
          f"{len(self._positions)} of {n} sequences written"
          + (f" (missing {absent}...)" if absent else "")
          + f"; add them and close again, or abort() (data in {self._tmp})")
    self._closed = True
    for w in self._writers.values():
      w.close()
    index = np.array([self._positions[i] for i in range(n)], np.int64)
    shards = [{"file": _shard_name(s, self.num_shards),
               "num_records": self._counts[s]}
              for s in range(self.num_shards)]
    settings = self._settings()
    _write_finished(self._tmp, index, lambda disk: _cache_meta(
        settings, num_sequences=n, shards=shards,
        shard_of_index="index % num_shards", disk_bytes=disk))
    _move_into_place(self._tmp, self.directory, self.overwrite)
    return self.directory

  def _close_multiprocess(self) -> str:
    if self._close_called:
      raise ValueError(f"writer for {self.directory} is closed")
    self._close_called = True
    if not self._part_written:
      self.write_part()
    self._barrier()
    error: Optional[BaseException] = None
    failed = os.path.join(self._tmp, FAILED_FILE)
    if self.process_index == 0:
      try:
        commit_teacher_cache(self.directory)
      except Exception as e:  # pylint: disable=broad-except
        error = e
        try:
          _write_atomic(failed, _dump_json(
              {"type": type(e).__name__, "message": str(e)}))
        except OSError:
          pass
    self._barrier()
    if error is not None:
      raise error
    if self.process_index != 0:
      if os.path.exists(failed):
        with open(failed) as f:
          report = json.load(f)
        kind = {"ValueError": ValueError, "FileExistsError": FileExistsError,
                "FileNotFoundError": FileNotFoundError}.get(
                    report.get("type"), RuntimeError)
        raise kind(f"process 0 could not commit: {report.get('message')}")
      if not _is_cache_dir(self.directory):
        raise FileNotFoundError(
            f"process {self.process_index}: process 0 finished its commit but "
            f"teacher cache {self.directory} is not visible here; is it on a "
            "filesystem every process shares?")
    return self.directory

  def __enter__(self) -> "TeacherCacheWriter":
    return self

  def __exit__(self, exc_type, exc, tb) -> bool:
    if exc_type is not None:
      if not self._closed:
        self.abort()
      return False
    if self.process_count > 1:
      if not self._closed:  # else aborted, closed or write_part() called.
        self.close()
      return False
    if not self._closed:
      try:
        self.close()
      except ValueError:
        self.abort()
        raise
    return False


def commit_teacher_cache(directory: PathLike) -> str:
  """Process 0's commit of a multi-process write; returns ``directory``.

  Reads ``<directory>.staging``: ``job.json`` and the part of every process
  (:meth:`TeacherCacheWriter.write_part`), checks them, writes ``index.npy``
  and ``meta.json``, removes the bookkeeping files and renames the staging
  directory to ``directory``. :meth:`TeacherCacheWriter.close` calls it
  between its two barriers; call it alone to finish a write whose
  processes all wrote their parts but whose commit did not run.

  Raises:
    FileNotFoundError: no staging directory or ``job.json``.
    ValueError: one line listing every problem: a process without a part
      (with the sequences it owns), a part of another run or with other
      settings, sequences never written, a shard that does not hold what
      its part says. Nothing is written at ``directory``; the staging
      directory is kept (the next write removes it).
    FileExistsError: ``directory`` appeared meanwhile and may not be
      replaced (the finished cache is left in the staging directory).
  """
  d = os.path.abspath(os.fspath(directory))
  staging = staging_directory(d)
  job_path = os.path.join(staging, JOB_FILE)
  try:
    with open(job_path) as f:
      job = json.load(f)
    run = job["run"]
    settings = job["settings"]
    n = int(settings["num_sequences"])
    num_shards = int(settings["num_shards"])
    num = int(settings["process_count"])
    overwrite = bool(job["overwrite"])
  except FileNotFoundError:
    raise FileNotFoundError(
        f"no multi-process write of teacher cache {d} to commit: {job_path} "
        "does not exist") from None
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise ValueError(f"{job_path} is not a staging job file: {e!r}") from None
  problems = []
  index = np.full((n, 2), -1, np.int64)
  counts = [0] * num_shards
  for p in range(num):
    seqs = process_sequence_range(n, p, num)
    shards = process_shard_range(num_shards, p, num)
    who = f"process {p} (sequences [{seqs.start}, {seqs.stop}))"
    json_path = os.path.join(staging, _part_name(p, num, "json"))
    if not os.path.exists(json_path):
      problems.append(
          f"{who} wrote no part (it failed before close, or {staging} is "
          "not on a filesystem every process shares)")
      continue
    try:
      with open(json_path) as f:
        part = json.load(f)
      positions = np.load(os.path.join(staging, _part_name(p, num, "npy")))
      part_counts = [int(c) for c in part["num_records"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
      problems.append(f"{who}: unreadable part: {e!r}")
      continue
    if part.get("run") != run:
      problems.append(f"{who}: its part is from another run (run "
                      f"{part.get('run')}, expected {run}); did every process "
                      "construct its writer between the same barriers?")
      continue
    if part.get("settings") != settings:
      theirs = part.get("settings") or {}
      keys = sorted(k for k in set(settings) | set(theirs)
                    if settings.get(k) != theirs.get(k))
      problems.append(f"{who} wrote with other settings than process 0 "
                      f"(differing: {', '.join(keys)})")
      continue
    if (positions.shape != (len(seqs), 2) or len(part_counts) != len(shards)
        or part.get("sequences") != [seqs.start, seqs.stop]):
      problems.append(f"{who}: its part does not match the layout")
      continue
    absent = np.nonzero(positions[:, 0] < 0)[0]
    if absent.size:
      problems.append(f"{who} never wrote {absent.size} of them: "
                      + _format_ranges(absent + seqs.start))
      continue
    bad = []
    for s, count in zip(shards, part_counts):
      pos = np.sort(positions[positions[:, 0] == s, 1])
      if not np.array_equal(pos, np.arange(count)):
        bad.append(s)
      counts[s] = count
    if bad or not np.isin(positions[:, 0], np.asarray(shards)).all():
      problems.append(f"{who}: its index does not match its shards {bad}")
      continue
    index[seqs.start:seqs.stop] = positions
  if not problems:
    for s in range(num_shards):
      path = os.path.join(staging, _shard_name(s, num_shards))
      try:
        reader = _array_record().ArrayRecordReader(path, _READER_OPTIONS)
        ok = reader.ok()
        records = reader.num_records() if ok else None
        reader.close()
      except Exception:  # pylint: disable=broad-except
        ok, records = False, None
      if not ok or records != counts[s]:
        problems.append(f"shard {path} " + (
            f"holds {records} records, its part says {counts[s]}" if ok else
            "is missing or not a complete array_record file"))
  if problems:
    raise ValueError(
        f"teacher cache {d} cannot be committed: " + "; ".join(problems)
        + f"; nothing was written at {d} (the staging directory {staging} is "
        "kept; the next write removes it)")
  shards_meta = [{"file": _shard_name(s, num_shards), "num_records": counts[s]}
                 for s in range(num_shards)]
  layout = (f"process p of P={num} wrote sequences [p*N//P, (p+1)*N//P) to "
            f"shards [p*S//P, (p+1)*S//P) (N={n}, S={num_shards}), "
            "round robin in the order added; index.npy says where")
  _write_finished(staging, index, lambda disk: dict(
      _cache_meta(settings, num_sequences=n, shards=shards_meta,
                  shard_of_index=layout, disk_bytes=disk),
      process_count=num))
  # Last, so that a commit that dies here can be run again.
  for name in os.listdir(staging):
    if _PART_RE.match(name) or name in (JOB_FILE, FAILED_FILE) or (
        name.endswith(".tmp")):
      os.remove(os.path.join(staging, name))
  fsync_path(staging)
  _move_into_place(staging, d, overwrite)
  return d


# ---------------------------------------------------------------------------
# Reader.
# ---------------------------------------------------------------------------


class TeacherCache:
  """Random access to a teacher cache written by :class:`TeacherCacheWriter`.

  Args:
    directory: the cache directory.
    form: if given, the form the caller expects (a mismatch is an error).
    float_dtype: dtype of the floating fields returned (``np.float32`` by
      default); None returns them in their storage dtype (counts are always
      decoded to float32 weights).

  Raises:
    FileNotFoundError: no such directory, or no meta.json in it.
    ValueError: anything else that does not match meta.json (one line naming
      the file).

  ``cache[i]`` returns ``{name: array}`` for sequence ``i`` (``ids`` int32
  ``[seq_len, k]``, ``log_probs`` / ``weights`` ``[seq_len, k]``,
  ``entropy`` ``[seq_len]``); ``get_batch(indices)`` stacks them. The
  object pickles without its open readers, so it can be handed to data
  loader workers.
  """

  def __init__(self, directory: PathLike, *, form: Optional[str] = None,
               float_dtype: Any = np.float32):
    d = os.path.abspath(os.fspath(directory))
    self.directory = d
    self.float_dtype = None if float_dtype is None else np.dtype(float_dtype)
    if not os.path.isdir(d):
      raise FileNotFoundError(f"teacher cache {d} does not exist")
    meta_path = os.path.join(d, META_FILE)
    if not os.path.isfile(meta_path):
      raise FileNotFoundError(
          f"{d} has no {META_FILE}: not a teacher cache, or an unfinished "
          "write")
    try:
      with open(meta_path) as f:
        meta = json.load(f)
    except (OSError, ValueError) as e:
      raise ValueError(f"{meta_path} is not valid JSON: {e}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
      raise ValueError(f"{meta_path} is not a {FORMAT} meta file")
    if meta.get("version") != VERSION:
      raise ValueError(f"{meta_path} has version {meta.get('version')}, this "
                       f"reader supports {VERSION}")
    if form is not None and meta.get("form") != form:
      raise ValueError(f"teacher cache {d} has form {meta.get('form')!r}, "
                       f"expected {form!r}")
    try:
      self.fields = [Field(f["name"], f["dtype"], tuple(f["shape"]))
                     for f in meta["fields"]]
      num_shards = int(meta["num_shards"])
      self._num_sequences = int(meta["num_sequences"])
      self._record_bytes = int(meta["record_bytes"])
      shard_records = [int(s["num_records"]) for s in meta["shards"]]
      shard_files = [s["file"] for s in meta["shards"]]
    except (KeyError, TypeError, ValueError) as e:
      raise ValueError(f"{meta_path} is missing or has a bad entry: {e!r}"
                       ) from None
    for field in self.fields:
      if field.dtype not in _DTYPE_BYTES:
        raise ValueError(f"{meta_path}: field {field.name} has unknown dtype "
                         f"{field.dtype!r}")
    if HEADER_BYTES + sum(f.nbytes for f in self.fields) != self._record_bytes:
      raise ValueError(f"{meta_path}: record_bytes {self._record_bytes} does "
                       "not match the fields")
    self.meta = meta
    if len(shard_files) != num_shards:
      raise ValueError(f"{meta_path}: num_shards is {num_shards} but "
                       f"{len(shard_files)} shards are listed")
    present = sorted(n for n in os.listdir(d) if _SHARD_RE.match(n))
    missing = sorted(set(shard_files) - set(present))
    extra = sorted(set(present) - set(shard_files))
    if missing or extra:
      raise ValueError(
          f"teacher cache {d}: meta.json lists {num_shards} shards but "
          f"{len(present)} shard files are present"
          + (f"; missing {missing}" if missing else "")
          + (f"; unexpected {extra}" if extra else ""))
    if sum(shard_records) != self._num_sequences:
      raise ValueError(f"{meta_path}: the shards hold {sum(shard_records)} "
                       f"records but num_sequences is {self._num_sequences}")
    self._shard_paths = [os.path.join(d, f) for f in shard_files]
    self._shard_records = shard_records
    index_path = os.path.join(d, meta.get("index_file", INDEX_FILE))
    try:
      index = np.load(index_path)
    except (OSError, ValueError) as e:
      raise ValueError(f"cannot read index {index_path}: {e}") from None
    if (index.shape != (self._num_sequences, 2)
        or not np.issubdtype(index.dtype, np.integer)):
      raise ValueError(f"{index_path} has shape {index.shape} and dtype "
                       f"{index.dtype}, expected ({self._num_sequences}, 2) "
                       "integers")
    if self._num_sequences and (
        index[:, 0].min() < 0 or index[:, 0].max() >= num_shards
        or index[:, 1].min() < 0
        or np.any(index[:, 1] >= np.asarray(shard_records)[index[:, 0]])):
      raise ValueError(f"{index_path} points outside the shards")
    self._index = index
    self._readers: dict[int, Any] = {}

  # -- metadata ------------------------------------------------------------

  @property
  def form(self) -> str:
    return self.meta["form"]

  @property
  def vocab_size(self) -> int:
    return int(self.meta["vocab_size"])

  @property
  def seq_len(self) -> int:
    return int(self.meta["seq_len"])

  @property
  def num_shards(self) -> int:
    return len(self._shard_paths)

  @property
  def k(self) -> Optional[int]:
    return self.meta.get("k")

  @property
  def num_samples(self) -> Optional[int]:
    return self.meta.get("num_samples")

  @property
  def temperature(self) -> float:
    return float(self.meta["temperature"])

  @property
  def source(self) -> dict[str, Any]:
    return dict(self.meta.get("source", {}))

  @property
  def payload_bytes_per_token(self) -> float:
    """Bytes per token of the record layout (fields only, no header)."""
    return sum(f.nbytes for f in self.fields) / self.seq_len

  @property
  def bytes_per_token(self) -> float:
    """Actual bytes on disk (every file of the directory) per token."""
    total = sum(os.path.getsize(os.path.join(self.directory, f))
                for f in os.listdir(self.directory))
    return total / (len(self) * self.seq_len)

  def __len__(self) -> int:
    return self._num_sequences

  def __repr__(self) -> str:
    size = (f"k={self.k}" if self.form == "topk" else
            f"num_samples={self.num_samples}" if self.form == "sampled" else
            self.form)
    return (f"TeacherCache({self.directory!r}, form={self.form!r}, "
            f"{len(self)} sequences x {self.seq_len} tokens, "
            f"vocab_size={self.vocab_size}, {size})")

  # -- reading -------------------------------------------------------------

  def _reader(self, shard: int):
    reader = self._readers.get(shard)
    if reader is None:
      path = self._shard_paths[shard]
      try:
        reader = _array_record().ArrayRecordReader(path, _READER_OPTIONS)
      except Exception as e:  # pylint: disable=broad-except
        raise ValueError(f"cannot open shard {path}: {e}") from None
      if not reader.ok():
        raise ValueError(f"shard {path} is not a readable array_record file "
                         "(truncated or corrupted)")
      if reader.num_records() != self._shard_records[shard]:
        raise ValueError(f"shard {path} has {reader.num_records()} records, "
                         f"meta.json says {self._shard_records[shard]}")
      self._readers[shard] = reader
    return reader

  def _normalize(self, indices: Any) -> np.ndarray:
    return normalize_indices(indices, len(self),
                             f"a cache of {len(self)} sequences")

  def _records(self, indices: np.ndarray) -> list[bytes]:
    out: list[Optional[bytes]] = [None] * len(indices)
    shards = self._index[indices, 0]
    positions = self._index[indices, 1]
    for shard in np.unique(shards).tolist():
      (where,) = np.nonzero(shards == shard)
      try:
        records = self._reader(shard).read(positions[where].tolist())
      except RuntimeError as e:
        raise ValueError(f"cannot read shard {self._shard_paths[shard]}: "
                         f"{e}") from None
      for j, record in zip(where.tolist(), records):
        out[j] = record
    for j, (i, record) in enumerate(zip(indices.tolist(), out)):
      if len(record) != self._record_bytes:
        raise ValueError(
            f"sequence {i}: record in {self._shard_paths[shards[j]]} has "
            f"{len(record)} bytes, expected {self._record_bytes} (truncated "
            "or corrupted record)")
      header = int(np.frombuffer(record, "<u8", 1)[0])
      if header != i:
        raise ValueError(f"sequence {i}: the record at shard {shards[j]}, "
                         f"position {positions[j]} holds sequence {header}; "
                         "index.npy does not match the shards")
    return out

  def _decode(self, record: bytes) -> dict[str, np.ndarray]:
    out = {}
    offset = HEADER_BYTES
    for field in self.fields:
      x = field.decode(record, offset)
      offset += field.nbytes
      if field.name == "ids":
        x = x.astype(np.int32)
      elif field.name == "completion":
        x = x.astype(bool)
      elif field.name == "weights" and field.dtype == "uint8":
        x = x.astype(np.float32) / np.float32(self.num_samples)
      elif self.float_dtype is not None:
        x = x.astype(self.float_dtype)
      else:
        x = x.copy()
      out[field.name] = x
    return out

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    if isinstance(index, (bool, np.bool_)) or not isinstance(
        index, (int, np.integer)):
      raise TypeError(f"TeacherCache indices must be ints, got {index!r}; "
                      "use get_batch for several")
    (i,) = self._normalize([index])
    return self._decode(self._records(np.array([i]))[0])

  def get_batch(self, indices: Sequence[int]) -> dict[str, np.ndarray]:
    """The sequences ``indices`` stacked: ``{name: [len(indices), ...]}``."""
    idx = self._normalize(indices)
    decoded = [self._decode(r) for r in self._records(idx)]
    if not decoded:
      return {f.name: np.zeros((0,) + f.shape, np.int32 if f.name == "ids"
                               else bool if f.name == "completion"
                               else self.float_dtype or np.float32)
              for f in self.fields}
    return {name: np.stack([d[name] for d in decoded])
            for name in decoded[0]}

  def close(self) -> None:
    for reader in self._readers.values():
      reader.close()
    self._readers = {}

  def __enter__(self) -> "TeacherCache":
    return self

  def __exit__(self, *exc) -> bool:
    self.close()
    return False

  def __getstate__(self) -> dict[str, Any]:
    state = dict(self.__dict__)
    state["_readers"] = {}
    return state
