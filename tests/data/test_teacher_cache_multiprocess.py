"""Multi-process teacher cache writes (jdistill.data.teacher_cache): P
simulated processes (threads sharing a threading.Barrier, one sequential run
with a no-op barrier, and one run of real spawned processes) each write
their share into <cache>.staging and process 0 commits; the result reads
back bit for bit like a single-process cache of the same data, a missing
part fails the commit in one line and leaves no cache, a rerun after a
crash works, and process_count=1 writes exactly the single-process files."""

import filecmp
import json
import multiprocessing
import os
import threading

import numpy as np
import pytest

from jdistill.data import teacher_cache as tc
from tests.data.test_teacher_cache import NUM, SEQ_LEN, _make

V = 300
TOPK = {"form": "topk", "k": 4, "store_entropy": True, "temperature": 2.0,
        "source": {"teacher": "ckpt/step_9"}}
SAMPLED = {"form": "sampled", "num_samples": 5, "proposal_temperature": 2.0}
LAYOUT_KEYS = {"shards", "num_shards", "shard_of_index", "created",
               "disk_bytes_per_token", "process_count"}


def _data(settings, seed=0):
  form = settings["form"]
  return _make(form, V, seed, k=settings.get("k", 4),
               num_samples=settings.get("num_samples", 5),
               tau=settings.get("proposal_temperature", 1.0),
               entropy=settings.get("store_entropy", False))


def _writer(path, settings, n, p, num, barrier, num_shards=3, **kwargs):
  return tc.TeacherCacheWriter(
      path, vocab_size=V, seq_len=SEQ_LEN, num_sequences=n,
      num_shards=num_shards, process_index=p, process_count=num,
      barrier=barrier, **settings, **kwargs)


def _add(writer, data, indices, seed):
  order = list(indices)
  np.random.default_rng(seed).shuffle(order)  # any order within a process.
  for i in order:
    writer.add(i, {k: v[i] for k, v in data.items()})


def _run_threads(path, settings, data, n, num, *, num_shards=3, skip=(),
                 **kwargs):
  """Every process in its own thread, the whole writer protocol; returns
  each process's result: the path close() returned, or its exception."""
  barrier = threading.Barrier(num, timeout=30)
  results = [None] * num

  def work(p):
    try:
      with _writer(path, settings, n, p, num, barrier.wait, num_shards,
                   **kwargs) as w:
        _add(w, data, [i for i in w.sequence_range if i not in skip], p)
      results[p] = w.directory
    except Exception as e:  # pylint: disable=broad-except
      results[p] = e

  threads = [threading.Thread(target=work, args=(p,)) for p in range(num)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  return results


def _write_single(path, settings, data, n, num_shards=3):
  with tc.TeacherCacheWriter(path, vocab_size=V, seq_len=SEQ_LEN,
                             num_sequences=n, num_shards=num_shards,
                             **settings) as w:
    _add(w, data, range(n), 0)
  return path


def _check_same_cache(multi_path, single_path, n, num, num_shards):
  """The multi-process cache holds the single-process cache's bytes."""
  multi = tc.TeacherCache(multi_path, float_dtype=None)
  single = tc.TeacherCache(single_path, float_dtype=None)
  assert len(multi) == len(single) == n
  everything = np.arange(n)
  assert multi._records(everything) == single._records(everything)
  for name, x in single.get_batch(everything).items():
    np.testing.assert_array_equal(multi.get_batch(everything)[name], x)
  assert multi[n - 1].keys() == single[n - 1].keys()
  meta = {k: v for k, v in multi.meta.items() if k not in LAYOUT_KEYS}
  assert meta == {k: v for k, v in single.meta.items()
                  if k not in LAYOUT_KEYS}
  assert multi.meta["process_count"] == num
  assert "process_count" not in single.meta
  assert multi.num_shards == max(num_shards, num)
  # The same files: meta.json, index.npy and the global shard names.
  assert sorted(os.listdir(multi_path)) == sorted(
      ["meta.json", "index.npy"]
      + [f"cache-{s:05d}-of-{multi.num_shards:05d}.array_record"
         for s in range(multi.num_shards)])
  # Every sequence once; process p's in p's shards, positions 0..count-1.
  index = np.load(os.path.join(multi_path, "index.npy"))
  counts = [s["num_records"] for s in multi.meta["shards"]]
  assert sum(counts) == n
  assert len({tuple(r) for r in index.tolist()}) == n
  for s, count in enumerate(counts):
    assert sorted(index[index[:, 0] == s, 1].tolist()) == list(range(count))
  for p in range(num):
    seqs = tc.process_sequence_range(n, p, num)
    shards = tc.process_shard_range(multi.num_shards, p, num)
    assert set(index[seqs.start:seqs.stop, 0].tolist()) <= set(shards)


@pytest.mark.parametrize("settings", [TOPK, SAMPLED], ids=["topk", "sampled"])
@pytest.mark.parametrize("num,num_shards,n", [(3, 3, 7), (2, 5, 7),
                                              (3, 1, 7), (3, 3, 2)])
def test_processes_write_the_single_process_cache(tmp_path, settings, num,
                                                  num_shards, n):
  data = _data(settings)
  path = str(tmp_path / "cache")
  results = _run_threads(path, settings, data, n, num,
                         num_shards=num_shards)
  assert results == [os.path.abspath(path)] * num, results
  single = _write_single(str(tmp_path / "single"), settings, data, n,
                         num_shards)
  assert sorted(os.listdir(tmp_path)) == ["cache", "single"]  # no staging.
  _check_same_cache(path, single, n, num, num_shards)


def test_process_ranges():
  assert [tc.process_sequence_range(7, p, 3) for p in range(3)] == [
      range(0, 2), range(2, 4), range(4, 7)]
  assert [tc.process_sequence_range(2, p, 3) for p in range(3)] == [
      range(0, 0), range(0, 1), range(1, 2)]
  assert [tc.process_shard_range(8, p, 3) for p in range(3)] == [
      range(0, 2), range(2, 5), range(5, 8)]
  with pytest.raises(ValueError, match="num_shards=2 < process_count=3"):
    tc.process_shard_range(2, 0, 3)
  with pytest.raises(ValueError, match="need 0 <= process_index"):
    tc.process_sequence_range(7, 3, 3)
  assert tc.staging_directory("/a/cache") == "/a/cache.staging"


def test_missing_part_fails_the_commit_then_a_rerun_works(tmp_path):
  data = _data(TOPK)
  path = str(tmp_path / "cache")
  staging = tc.staging_directory(path)
  # Three processes in sequence with a no-op barrier (process 0 first).
  writers = [_writer(path, TOPK, NUM, p, 3, lambda: None) for p in range(3)]
  assert {w.tmp_directory for w in writers} == {staging}
  _add(writers[0], data, writers[0].sequence_range, 0)
  _add(writers[2], data, writers[2].sequence_range, 2)
  writers[1].add(2, {k: v[2] for k, v in data.items()})
  # Process 1 dies here: no part. Process 2 finishes; process 0 commits.
  writers[2].write_part()
  with pytest.raises(ValueError) as err:
    writers[0].close()
  message = str(err.value)
  assert "\n" not in message
  assert message.startswith(f"teacher cache {path} cannot be committed: "
                            "process 1 (sequences [2, 4)) wrote no part")
  assert "nothing was written at" in message
  assert not os.path.exists(path)
  assert sorted(os.listdir(tmp_path)) == ["cache.staging"]
  assert "failed.json" in os.listdir(staging)
  # The rerun's process 0 removes the staging directory and all goes well.
  results = _run_threads(path, TOPK, data, NUM, 3)
  assert results == [path] * 3, results
  assert sorted(os.listdir(tmp_path)) == ["cache"]
  cache = tc.TeacherCache(path)
  np.testing.assert_array_equal(cache.get_batch(range(NUM))["ids"],
                                data["ids"])


def test_unwritten_sequences_fail_every_process_alike(tmp_path):
  data = _data(TOPK)
  path = str(tmp_path / "cache")
  results = _run_threads(path, TOPK, data, NUM, 3, skip=(4, 5, 6))
  assert all(isinstance(r, ValueError) for r in results), results
  message = str(results[0])
  assert "process 2 (sequences [4, 7)) never wrote 3 of them: [4, 7)" in (
      message)
  assert "process 0" not in message and "process 1 " not in message
  for r in results[1:]:
    assert str(r) == f"process 0 could not commit: {message}"
  assert not os.path.exists(path)
  results = _run_threads(path, TOPK, data, NUM, 3)  # rerun.
  assert results == [path] * 3 and sorted(os.listdir(tmp_path)) == ["cache"]


def test_commit_alone_finishes_a_write(tmp_path):
  data = _data(SAMPLED)
  path = str(tmp_path / "cache")
  with pytest.raises(FileNotFoundError, match="no multi-process write"):
    tc.commit_teacher_cache(path)
  writers = [_writer(path, SAMPLED, NUM, p, 2, lambda: None, num_shards=4)
             for p in range(2)]
  for p, w in enumerate(writers):
    _add(w, data, w.sequence_range, p)
    w.write_part()  # then process 0 died before its commit.
  assert tc.commit_teacher_cache(path) == path
  single = _write_single(str(tmp_path / "single"), SAMPLED, data, NUM, 4)
  _check_same_cache(path, single, NUM, 2, 4)


def test_one_process_writes_todays_files(tmp_path):
  data = _data(TOPK)
  calls = []
  old = _write_single(str(tmp_path / "old"), TOPK, data, NUM)
  with tc.TeacherCacheWriter(str(tmp_path / "new"), vocab_size=V,
                             seq_len=SEQ_LEN, num_sequences=NUM, num_shards=3,
                             process_index=0, process_count=1,
                             barrier=lambda: calls.append(1), **TOPK) as w:
    assert w.sequence_range == range(NUM)
    assert w.tmp_directory == f"{tmp_path}/new.tmp-{os.getpid()}"
    _add(w, data, range(NUM), 0)
  new = str(tmp_path / "new")
  assert not calls and sorted(os.listdir(tmp_path)) == ["new", "old"]
  names = sorted(os.listdir(old))
  assert names == sorted(os.listdir(new)) == [
      "cache-00000-of-00003.array_record", "cache-00001-of-00003.array_record",
      "cache-00002-of-00003.array_record", "index.npy", "meta.json"]
  for name in names[:-1]:
    assert filecmp.cmp(os.path.join(old, name), os.path.join(new, name),
                       shallow=False), name
  metas = [json.load(open(os.path.join(d, "meta.json"))) for d in (old, new)]
  for meta in metas:
    meta.pop("created")
  assert metas[0] == metas[1]
  assert metas[1]["shard_of_index"] == "index % num_shards"
  assert metas[1]["version"] == 1 and "process_count" not in metas[1]
  index = np.load(os.path.join(new, "index.npy"))
  np.testing.assert_array_equal(index[:, 0], np.arange(NUM) % 3)


def test_refusals_and_aborts(tmp_path):
  path = str(tmp_path / "cache")
  staging = tc.staging_directory(path)
  kw = {"vocab_size": V, "seq_len": SEQ_LEN, "form": "topk", "k": 4}
  with pytest.raises(ValueError, match="process_count=2 needs num_sequences"):
    tc.TeacherCacheWriter(path, process_index=0, process_count=2,
                          barrier=lambda: None, **kw)
  with pytest.raises(ValueError, match="process_count=2 needs a barrier"):
    tc.TeacherCacheWriter(path, num_sequences=4, process_index=0,
                          process_count=2, **kw)
  with pytest.raises(ValueError, match="need 0 <= process_index"):
    tc.TeacherCacheWriter(path, num_sequences=4, process_index=2,
                          process_count=2, barrier=lambda: None, **kw)
  assert os.listdir(tmp_path) == []
  data = _data(TOPK)
  w0 = _writer(path, TOPK, NUM, 0, 2, lambda: None)
  w1 = _writer(path, TOPK, NUM, 1, 2, lambda: None)
  assert (w0.sequence_range, w1.sequence_range) == (range(0, 3), range(3, 7))
  with pytest.raises(ValueError, match=r"sequence index 3 is not process 0's "
                     r"\(it writes \[0, 3\) of 7, process_count=2\)"):
    w0.add(3, {k: v[3] for k, v in data.items()})
  # An exception in one process removes only its own files.
  with pytest.raises(RuntimeError, match="teacher crashed"):
    with w1:
      _add(w1, data, [3, 4], 1)
      raise RuntimeError("teacher crashed")
  assert sorted(os.listdir(staging)) == [
      "cache-00000-of-00003.array_record", "job.json"]
  w0.abort()
  assert os.listdir(staging) == ["job.json"] and not os.path.exists(path)
  # A staging directory with files a writer does not make is never removed.
  with open(os.path.join(staging, "notes.txt"), "w") as f:
    f.write("mine")
  with pytest.raises(FileExistsError, match=r"cache\.staging holds files no "
                     r"teacher cache writer made \(notes\.txt\); delete it"):
    _writer(path, TOPK, NUM, 0, 2, lambda: None)
  assert sorted(os.listdir(staging)) == ["job.json", "notes.txt"]
  # A finished cache is not replaced unless asked, by any process.
  os.remove(os.path.join(staging, "notes.txt"))
  assert _run_threads(path, TOPK, data, NUM, 2) == [path] * 2
  with pytest.raises(FileExistsError, match="already exists; pass overwrite"):
    _writer(path, TOPK, NUM, 1, 2, lambda: None)
  second = _data(TOPK, seed=1)
  assert _run_threads(path, TOPK, second, NUM, 2, overwrite=True) == [path] * 2
  np.testing.assert_array_equal(tc.TeacherCache(path)[5]["ids"],
                                second["ids"][5])
  assert sorted(os.listdir(tmp_path)) == ["cache"]


def test_other_settings_in_one_process_are_reported(tmp_path):
  data = _data(TOPK)
  path = str(tmp_path / "cache")
  w0 = _writer(path, TOPK, NUM, 0, 2, lambda: None)
  w1 = _writer(path, dict(TOPK, temperature=1.0), NUM, 1, 2, lambda: None)
  for p, w in enumerate((w0, w1)):
    _add(w, data, w.sequence_range, p)
  w1.write_part()
  with pytest.raises(ValueError, match=r"process 1 \(sequences \[3, 7\)\) "
                     r"wrote with other settings than process 0 \(differing: "
                     r"meta\)"):
    w0.close()
  assert not os.path.exists(path)


def _spawned_process(path, p, num, n, barrier, queue):
  try:
    data = _data(TOPK)
    with _writer(path, TOPK, n, p, num, barrier.wait) as w:
      _add(w, data, w.sequence_range, p)
    queue.put((p, w.directory))
  except Exception as e:  # pylint: disable=broad-except
    queue.put((p, f"{type(e).__name__}: {e}"))


def test_spawned_processes(tmp_path):
  ctx = multiprocessing.get_context("spawn")
  num = 3
  barrier, queue = ctx.Barrier(num, timeout=60), ctx.Queue()
  path = str(tmp_path / "cache")
  procs = [ctx.Process(target=_spawned_process,
                       args=(path, p, num, NUM, barrier, queue))
           for p in range(num)]
  for proc in procs:
    proc.start()
  results = dict(queue.get(timeout=120) for _ in procs)
  for proc in procs:
    proc.join(timeout=30)
  assert results == {p: path for p in range(num)}, results
  single = _write_single(str(tmp_path / "single"), TOPK, _data(TOPK), NUM)
  _check_same_cache(path, single, NUM, num, 3)
