"""TensorBoard event files without TensorFlow: a writer and a reader.

The programs write a run's event files to ``<workdir>/tensorboard/``, next
to ``metrics.jsonl``; ``tensorboard --logdir=<workdir>`` shows them (every
run of a ``--mode=compare`` workdir as its own run). Writing uses
tensorboardX; reading (`read_scalars`) parses the TFRecord framing here, with
a plain-Python CRC-32C, and decodes the ``Event`` protos with tensorboardX's
bundled protobuf classes.

An event file is a sequence of records::

  uint64 length | uint32 masked_crc32c(length) | data | uint32 masked_crc32c(data)

(little-endian), each ``data`` a serialized ``Event``.
"""

from __future__ import annotations

import logging as std_logging
import math
import numbers
import os
import re
import struct
import uuid
from typing import Any, Iterator

import jax
from absl import logging

SUMMARY_DIR = "tensorboard"

# What TensorBoard accepts in a tag (tensorboardX replaces the rest too).
_INVALID_TAG_CHARACTERS = re.compile(r"[^-/\w.]")


def scalar_tag(split: str, name: str) -> str:
  """The tag of metric ``name`` of ``split``: ``f"{split}/{name}"``, with
  every character outside ``[-/\\w.]`` replaced by ``_`` (a feature term's
  ``hint:block2:block2`` becomes ``hint_block2_block2``)."""
  return _INVALID_TAG_CHARACTERS.sub("_", f"{split}/{name}").lstrip("/")


class _DropNonfiniteWarning(std_logging.Filter):
  """tensorboardX warns on every NaN or infinite scalar; such values are
  meant to be recorded (the training loop reports non-finite losses)."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    return "NaN or Inf found" not in record.getMessage()


class TensorBoardWriter:
  """Writes metrics records as TensorBoard scalars to event files in
  ``logdir`` (the programs use ``<workdir>/tensorboard/``).

  ``write(record)`` takes one ``metrics.jsonl`` record, ``{"step": int,
  "split": str, name: value, ...}``: every int or float field (NaN and
  infinities included; bools and non-numbers are skipped) becomes the scalar
  ``scalar_tag(split, name)`` at ``step``, stored as float32.

  Only process 0 writes; elsewhere ``write`` does nothing. Each writer opens
  a new event file (a resumed run adds one to the same ``logdir``). Events
  reach the file within ``flush_secs`` of ``write``, so a killed run keeps
  all but its last second of events; ``close()`` flushes and may be called
  any number of times.

  Args:
    logdir: directory of the event files (created if missing).
    purge_step: for a resumed run, the first step it will write: TensorBoard
      (and `read_scalars`) then drop the events of earlier files at this
      step or later, which the interrupted run wrote before it was killed.
    flush_secs: at most this many seconds between a write and the flush.
  """

  def __init__(self, logdir: str, *, purge_step: int | None = None,
               flush_secs: int = 1):
    self.logdir = logdir
    self._writer = None
    if jax.process_index() != 0:
      return
    import tensorboardX  # Imported only where it writes.
    nonfinite_logger = std_logging.getLogger("tensorboardX.x2num")
    if not any(isinstance(f, _DropNonfiniteWarning)
               for f in nonfinite_logger.filters):
      nonfinite_logger.addFilter(_DropNonfiniteWarning())
    os.makedirs(logdir, exist_ok=True)
    # tensorboardX names files by the second and opens them with "wb": a
    # unique suffix keeps two writers started in the same second apart.
    self._writer = tensorboardX.SummaryWriter(
        logdir=logdir, purge_step=purge_step, flush_secs=flush_secs,
        filename_suffix=f".{os.getpid()}.{uuid.uuid4().hex[:8]}")

  def write(self, record: dict[str, Any]) -> None:
    if self._writer is None:
      return
    try:
      step, split = int(record["step"]), str(record["split"])
    except KeyError as e:
      raise ValueError(f"metrics record {record!r} has no {e.args[0]!r}; "
                       "expected 'step' and 'split'") from None
    for name, value in record.items():
      if name in ("step", "split") or isinstance(value, bool) or (
          not isinstance(value, numbers.Real)):
        continue
      self._writer.add_scalar(scalar_tag(split, name), float(value),
                              global_step=step)
    self._writer.flush()

  def close(self) -> None:
    if self._writer is not None:
      self._writer.close()
      self._writer = None

  def __enter__(self) -> "TensorBoardWriter":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def _crc32c_table() -> tuple[int, ...]:
  table = []
  for i in range(256):
    crc = i
    for _ in range(8):
      crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
    table.append(crc)
  return tuple(table)


_CRC32C_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
  """CRC-32C (Castagnoli, reflected polynomial 0x82F63B78) of ``data``."""
  crc = 0xFFFFFFFF
  table = _CRC32C_TABLE
  for byte in data:
    crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
  return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
  """TFRecord's masked CRC-32C: rotated right by 15 bits plus 0xa282ead8."""
  crc = crc32c(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def read_records(path: str) -> Iterator[bytes]:
  """The data of each TFRecord record of the file ``path``, checked
  against both CRCs. A record whose data fails its CRC is skipped; a
  truncated record or a length that fails its CRC (so the framing is lost)
  ends the file. Both are logged as warnings."""
  with open(path, "rb") as f:
    buf = f.read()
  offset = 0
  while offset < len(buf):
    header = buf[offset:offset + 12]
    if len(header) < 12:
      logging.warning("%s: truncated record at byte %d; ignored", path, offset)
      return
    (length,), (length_crc,) = (struct.unpack("<Q", header[:8]),
                                struct.unpack("<I", header[8:]))
    if masked_crc32c(header[:8]) != length_crc:
      logging.warning("%s: corrupt record length at byte %d; the rest of "
                      "the file is ignored", path, offset)
      return
    end = offset + 12 + length
    if end + 4 > len(buf):
      logging.warning("%s: truncated record at byte %d; ignored", path, offset)
      return
    data = buf[offset + 12:end]
    (data_crc,) = struct.unpack("<I", buf[end:end + 4])
    if masked_crc32c(data) == data_crc:
      yield data
    else:
      logging.warning("%s: corrupt record at byte %d; skipped", path, offset)
    offset = end + 4


def _scalar_value(value) -> float | None:
  """The number in a ``Summary.Value``: ``simple_value`` (tensorboardX,
  TF1) or a 0-d float32/float64 tensor (TF2, torch's new style)."""
  if value.HasField("simple_value"):
    return float(value.simple_value)
  if not value.HasField("tensor"):
    return None
  t = value.tensor
  if t.tensor_shape.dim:
    return None
  if t.dtype == 1:  # DT_FLOAT
    if t.float_val:
      return float(t.float_val[0])
    if len(t.tensor_content) == 4:
      return struct.unpack("<f", t.tensor_content)[0]
  if t.dtype == 2:  # DT_DOUBLE
    if t.double_val:
      return float(t.double_val[0])
    if len(t.tensor_content) == 8:
      return struct.unpack("<d", t.tensor_content)[0]
  return None


def read_scalars(logdir: str) -> dict[str, list[tuple[int, float]]]:
  """The scalars of the event files directly in ``logdir``, read without
  TensorFlow: ``{tag: [(step, value), ...]}`` in the order written (files
  by the time of their first event). As TensorBoard does, a session start
  with a step (a `TensorBoardWriter`'s ``purge_step``) drops the earlier
  points at that step or later. Corrupt or truncated records (a killed
  writer) are skipped. Raises FileNotFoundError if ``logdir`` does not
  exist."""
  from google.protobuf.message import DecodeError
  from tensorboardX.proto import event_pb2

  if not os.path.isdir(logdir):
    raise FileNotFoundError(f"{logdir}: no such directory of event files")
  files = []
  for name in sorted(os.listdir(logdir)):
    path = os.path.join(logdir, name)
    if "tfevents" not in name or not os.path.isfile(path):
      continue
    events = []
    for data in read_records(path):
      event = event_pb2.Event()
      try:
        event.ParseFromString(data)
      except DecodeError:
        logging.warning("%s: undecodable event; skipped", path)
        continue
      events.append(event)
    first_time = events[0].wall_time if events else math.inf
    files.append((first_time, name, events))
  files.sort(key=lambda f: f[:2])

  scalars: dict[str, list[tuple[int, float]]] = {}
  for _, _, events in files:
    for event in events:
      if (event.HasField("session_log") and
          event.session_log.status == event_pb2.SessionLog.START):
        for tag, points in scalars.items():
          scalars[tag] = [p for p in points if p[0] < event.step]
      if not event.HasField("summary"):
        continue
      for value in event.summary.value:
        number = _scalar_value(value)
        if number is not None:
          scalars.setdefault(value.tag, []).append((int(event.step), number))
  return {tag: points for tag, points in scalars.items() if points}
