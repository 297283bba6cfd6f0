"""TensorBoard event files: TensorBoardWriter writes them with tensorboardX,
read_scalars reads them back without TensorFlow (TFRecord framing, CRC-32C,
Event protos)."""

import math
import os
import struct
import time

import jax
import numpy as np
import pytest

from jdistill.train import summaries
from jdistill.train.summaries import (TensorBoardWriter, crc32c,
                                      masked_crc32c, read_scalars)


def _f32(x):
  return float(np.float32(x))


def _event_files(logdir):
  return sorted(os.path.join(logdir, n) for n in os.listdir(logdir)
                if "tfevents" in n)


def test_crc32c_known_vectors():
  # The check value of CRC-32C, and RFC 3720 (iSCSI) B.4's vectors.
  assert crc32c(b"123456789") == 0xE3069283
  assert crc32c(b"") == 0
  assert crc32c(bytes(32)) == 0x8A9136AA
  assert crc32c(b"\xff" * 32) == 0x62A8AB43
  assert crc32c(bytes(range(32))) == 0x46DD794E
  assert crc32c(bytes(range(31, -1, -1))) == 0x113FDB5C


def test_masked_crc_matches_tensorboardx_framing():
  from tensorboardX import record_writer
  rng = np.random.default_rng(0)
  for n in (0, 1, 8, 13, 100):
    data = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
    assert masked_crc32c(data) == record_writer.masked_crc32c(data)


def test_write_then_read_back_exactly(tmp_path):
  logdir = str(tmp_path / "tb")
  records = [
      {"step": 10, "split": "train", "loss": 2.1906373739242553,
       "accuracy": 0.16796875, "steps_per_sec": 10.7, "name": "ignored",
       "flag": True, "nested": {"a": 1}},
      {"step": 20, "split": "train", "loss": 1.8639657616615295,
       "accuracy": 0.2796875, "steps_per_sec": 314.2},
      {"step": 20, "split": "test", "accuracy": 0.283, "count": 1000,
       "loss": 1.7887302856445313},
      {"step": 40, "split": "validation", "accuracy": np.float32(0.5),
       "hint:block2:block2": np.float64(0.25)},
  ]
  with TensorBoardWriter(logdir) as writer:
    for r in records:
      writer.write(r)
  scalars = read_scalars(logdir)
  assert scalars == {
      "train/loss": [(10, _f32(2.1906373739242553)),
                     (20, _f32(1.8639657616615295))],
      "train/accuracy": [(10, 0.16796875), (20, _f32(0.2796875))],
      "train/steps_per_sec": [(10, _f32(10.7)), (20, _f32(314.2))],
      "test/accuracy": [(20, _f32(0.283))],
      "test/count": [(20, 1000.0)],
      "test/loss": [(20, _f32(1.7887302856445313))],
      "validation/accuracy": [(40, 0.5)],
      "validation/hint_block2_block2": [(40, 0.25)],
  }
  assert len(_event_files(logdir)) == 1


def test_nan_and_inf_round_trip(tmp_path):
  logdir = str(tmp_path)
  with TensorBoardWriter(logdir) as writer:
    writer.write({"step": 1, "split": "train", "loss": float("nan"),
                  "up": float("inf"), "down": -math.inf})
  s = read_scalars(logdir)
  assert s["train/up"] == [(1, math.inf)]
  assert s["train/down"] == [(1, -math.inf)]
  [(step, value)] = s["train/loss"]
  assert step == 1 and math.isnan(value)


def test_events_reach_the_file_without_close(tmp_path):
  """A run killed before close() keeps its events: they are flushed within
  flush_secs of the write."""
  writer = TensorBoardWriter(str(tmp_path))
  writer.write({"step": 3, "split": "train", "loss": 0.5})
  deadline = time.monotonic() + 10
  while read_scalars(str(tmp_path)) != {"train/loss": [(3, 0.5)]}:
    assert time.monotonic() < deadline, "the event was not flushed"
    time.sleep(0.1)
  writer.close()


def test_close_twice_and_write_after_close(tmp_path):
  writer = TensorBoardWriter(str(tmp_path))
  writer.write({"step": 1, "split": "train", "loss": 1.0})
  writer.close()
  writer.close()
  writer.write({"step": 2, "split": "train", "loss": 2.0})  # Ignored.
  assert read_scalars(str(tmp_path)) == {"train/loss": [(1, 1.0)]}


def test_record_without_step_or_split_is_refused(tmp_path):
  with TensorBoardWriter(str(tmp_path)) as writer:
    with pytest.raises(ValueError, match="'split'"):
      writer.write({"step": 1, "loss": 1.0})


def test_only_process_zero_writes(tmp_path, monkeypatch):
  monkeypatch.setattr(jax, "process_index", lambda: 1)
  logdir = tmp_path / "tb"
  writer = TensorBoardWriter(str(logdir))
  writer.write({"step": 1, "split": "train", "loss": 1.0})
  writer.close()
  assert not logdir.exists()


def _write_three(logdir):
  with TensorBoardWriter(logdir) as writer:
    for step in (1, 2, 3):
      writer.write({"step": step, "split": "train", "loss": float(step)})
  [path] = _event_files(logdir)
  return path


def test_truncated_trailing_record_is_skipped(tmp_path):
  logdir = str(tmp_path)
  path = _write_three(logdir)
  data = open(path, "rb").read()
  # Cut inside the last record's data, then inside its header.
  for cut in (len(data) - 6, len(data) - 4, len(data) - 1):
    with open(path, "wb") as f:
      f.write(data[:cut])
    assert read_scalars(logdir) == {"train/loss": [(1, 1.0), (2, 2.0)]}
  with open(path, "wb") as f:  # A header cut short.
    f.write(data + struct.pack("<Q", 50)[:5])
  assert read_scalars(logdir)["train/loss"][-1] == (3, 3.0)


def _record_offsets(data):
  offsets, offset = [], 0
  while offset < len(data):
    offsets.append(offset)
    (length,) = struct.unpack("<Q", data[offset:offset + 8])
    offset += 16 + length
  return offsets


def test_corrupt_records_fail_their_crc(tmp_path):
  logdir = str(tmp_path)
  path = _write_three(logdir)
  data = bytearray(open(path, "rb").read())
  offsets = _record_offsets(bytes(data))
  assert len(offsets) == 4  # file_version, then steps 1, 2, 3.
  # Flip a byte in step 2's data: that record alone is skipped.
  bad = bytearray(data)
  bad[offsets[2] + 14] ^= 0xFF
  open(path, "wb").write(bytes(bad))
  assert read_scalars(logdir) == {"train/loss": [(1, 1.0), (3, 3.0)]}
  # Corrupt step 2's length: the framing is lost, the file ends there.
  bad = bytearray(data)
  bad[offsets[2]] ^= 0x01
  open(path, "wb").write(bytes(bad))
  assert read_scalars(logdir) == {"train/loss": [(1, 1.0)]}


def test_resumed_run_purges_the_killed_runs_later_steps(tmp_path):
  logdir = str(tmp_path)
  with TensorBoardWriter(logdir) as writer:  # Killed after step 3, say.
    for step in (1, 2, 3):
      writer.write({"step": step, "split": "train", "loss": float(step)})
  # Resumed from the checkpoint of step 1: its first record is step 2.
  with TensorBoardWriter(logdir, purge_step=2) as writer:
    for step in (2, 3, 4):
      writer.write({"step": step, "split": "train", "loss": 10.0 * step})
  assert len(_event_files(logdir)) == 2
  assert read_scalars(logdir) == {
      "train/loss": [(1, 1.0), (2, 20.0), (3, 30.0), (4, 40.0)]}


def test_reads_tensor_scalars_of_other_writers(tmp_path):
  """TF2 and torch write scalars as 0-d tensors, not simple_value."""
  from tensorboardX.proto import event_pb2, summary_pb2, tensor_pb2
  values = [
      summary_pb2.Summary.Value(tag="a", tensor=tensor_pb2.TensorProto(
          dtype=1, float_val=[1.5])),
      summary_pb2.Summary.Value(tag="b", tensor=tensor_pb2.TensorProto(
          dtype=2, tensor_content=struct.pack("<d", 0.1))),
      summary_pb2.Summary.Value(tag="c", tensor=tensor_pb2.TensorProto(
          dtype=7, string_val=[b"text"])),
  ]
  event = event_pb2.Event(step=5, wall_time=1.0,
                          summary=summary_pb2.Summary(value=values))
  with open(tmp_path / "events.out.tfevents.1.host", "wb") as f:
    for data in (event_pb2.Event(file_version="brain.Event:2")
                 .SerializeToString(), event.SerializeToString()):
      header = struct.pack("<Q", len(data))
      f.write(header + struct.pack("<I", masked_crc32c(header)) + data +
              struct.pack("<I", masked_crc32c(data)))
  assert read_scalars(str(tmp_path)) == {"a": [(5, 1.5)], "b": [(5, 0.1)]}


def test_missing_logdir_and_empty_logdir(tmp_path):
  with pytest.raises(FileNotFoundError, match="no such directory"):
    read_scalars(str(tmp_path / "missing"))
  assert read_scalars(str(tmp_path)) == {}


def test_scalar_tag():
  assert summaries.scalar_tag("train", "loss") == "train/loss"
  assert summaries.scalar_tag("train", "rkd distance:a:b") == (
      "train/rkd_distance_a_b")
