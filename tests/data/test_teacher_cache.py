"""Tests of jdistill.data.teacher_cache: round trips of every form through
several shards with out-of-order writes, random access, bytes per token,
atomic and refused writes, and clear errors for damaged caches."""

import json
import os
import pickle

import ml_dtypes
import numpy as np
import pytest
from array_record.python import array_record_module

from jdistill.data import teacher_cache as tc

SEQ_LEN = 6
NUM = 7
ORDER = [5, 2, 6, 0, 3, 1, 4]  # out of order; 3 shards get 3, 2, 2.


def _log_probs(rng, shape):
  x = rng.standard_normal(shape).astype(np.float32) * 2
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _make(form, vocab_size, seed=0, *, k=4, num_samples=5, tau=1.0,
          entropy=False):
  """NUM sequences of targets for ``form``: {name: [NUM, ...]}."""
  rng = np.random.default_rng(seed)
  out = {}
  if form == "dense":
    out["log_probs"] = _log_probs(rng, (NUM, SEQ_LEN, vocab_size))
    out["log_probs"][0, 0, :3] = -np.inf  # probability 0 survives.
  elif form == "topk":
    ids = np.stack([rng.permutation(vocab_size)[:k] for _ in
                    range(NUM * SEQ_LEN)]).reshape(NUM, SEQ_LEN, k)
    ids[0, 0, 0] = vocab_size - 1
    out["ids"] = ids
    out["log_probs"] = -np.sort(np.abs(rng.standard_normal(
        (NUM, SEQ_LEN, k))) * 5, axis=-1).astype(np.float32)
  else:
    ids = np.zeros((NUM, SEQ_LEN, num_samples), np.int64)
    w = np.zeros((NUM, SEQ_LEN, num_samples), np.float32)
    for idx in np.ndindex(NUM, SEQ_LEN):
      draws = rng.integers(0, vocab_size, num_samples)
      uniq, counts = np.unique(draws, return_counts=True)
      ids[idx][:len(uniq)] = uniq
      ratio = rng.uniform(0.2, 3.0, len(uniq)) if tau != 1.0 else 1.0
      w[idx][:len(uniq)] = counts / num_samples * ratio
    out["ids"], out["weights"] = ids, w
  if entropy:
    out["entropy"] = rng.uniform(0, 5, (NUM, SEQ_LEN)).astype(np.float32)
  return out


def _rounded(name, x, field_dtype):
  """What a read returns for written ``x``: the storage rounding."""
  if name == "ids":
    return x.astype(np.int32)
  if field_dtype == "uint8":
    return x.astype(np.float32)  # counts / n: exact at these values.
  dtype = {"float16": np.float16, "bfloat16": ml_dtypes.bfloat16,
           "float32": np.float32}[field_dtype]
  return x.astype(dtype).astype(np.float32)


def _write(path, form, vocab_size, data, *, batch=False, **kwargs):
  with tc.TeacherCacheWriter(path, form=form, vocab_size=vocab_size,
                             seq_len=SEQ_LEN, num_shards=3, **kwargs) as w:
    if batch:
      order = np.array(ORDER)
      w.add_batch(order[:4], {k: v[order[:4]] for k, v in data.items()})
      w.add_batch(order[4:], {k: v[order[4:]] for k, v in data.items()})
    else:
      for i in ORDER:
        w.add(i, {k: v[i] for k, v in data.items()})
  return path


CONFIGS = [
    # (form, vocab_size, kwargs, expected ids dtype, expected values dtype)
    ("dense", 300, {}, None, "float16"),
    ("dense", 40, {"log_probs_dtype": "bfloat16"}, None, "bfloat16"),
    ("topk", 256, {"k": 4}, "uint8", "float16"),
    ("topk", 70000, {"k": 3, "log_probs_dtype": "float32"}, "uint24",
     "float32"),
    ("sampled", 1000, {"num_samples": 5}, "uint16", "uint8"),
    ("sampled", 1000, {"num_samples": 5, "proposal_temperature": 2.0},
     "uint16", "float16"),
]


@pytest.mark.parametrize("batch", [False, True])
@pytest.mark.parametrize("form,vocab_size,kwargs,id_dtype,value_dtype",
                         CONFIGS)
def test_round_trip(tmp_path, form, vocab_size, kwargs, id_dtype,
                    value_dtype, batch):
  tau = kwargs.get("proposal_temperature", 1.0)
  data = _make(form, vocab_size, k=kwargs.get("k", 4),
               num_samples=kwargs.get("num_samples", 5), tau=tau,
               entropy=form != "dense")
  path = _write(str(tmp_path / "cache"), form, vocab_size, data, batch=batch,
                store_entropy=form != "dense", temperature=2.0,
                source={"teacher": "ckpt/step_100", "corpus": "sha256:ab"},
                **kwargs)
  assert sorted(os.listdir(tmp_path)) == ["cache"]  # no tmp left behind.
  cache = tc.TeacherCache(path, form=form)
  assert len(cache) == NUM and cache.form == form
  assert cache.vocab_size == vocab_size and cache.seq_len == SEQ_LEN
  assert cache.num_shards == 3 and cache.temperature == 2.0
  assert cache.source == {"teacher": "ckpt/step_100", "corpus": "sha256:ab"}
  assert [s["num_records"] for s in cache.meta["shards"]] == [3, 2, 2]
  dtypes = {f.name: f.dtype for f in cache.fields}
  assert dtypes.get("ids") == id_dtype
  assert dtypes["weights" if form == "sampled" else "log_probs"] == (
      value_dtype)
  for i in range(NUM):
    got = cache[i]
    assert sorted(got) == sorted(data)
    for name, x in data.items():
      want = _rounded(name, x[i], dtypes[name])
      assert got[name].dtype == want.dtype, name
      np.testing.assert_array_equal(got[name], want, err_msg=name)
  if form == "sampled" and tau == 1.0:
    assert cache.meta["weights_encoding"] == "counts"
    np.testing.assert_allclose(cache.get_batch(range(NUM))["weights"].sum(-1),
                               1.0, rtol=1e-6)


def test_random_access_and_batches(tmp_path):
  data = _make("topk", 500, k=4, entropy=True)
  path = _write(str(tmp_path / "c"), "topk", 500, data, k=4,
                store_entropy=True)
  cache = tc.TeacherCache(path)
  idx = [6, 0, 6, 3, -1]
  batch = cache.get_batch(idx)
  assert batch["ids"].shape == (5, SEQ_LEN, 4) and batch["ids"].dtype == (
      np.int32)
  assert batch["log_probs"].dtype == np.float32
  assert batch["entropy"].shape == (5, SEQ_LEN)
  np.testing.assert_array_equal(batch["ids"], data["ids"][[6, 0, 6, 3, 6]])
  np.testing.assert_array_equal(
      batch["log_probs"],
      data["log_probs"][[6, 0, 6, 3, 6]].astype(np.float16).astype(
          np.float32))
  np.testing.assert_array_equal(cache[-1]["ids"], data["ids"][6])
  assert cache.get_batch([])["ids"].shape == (0, SEQ_LEN, 4)
  with pytest.raises(IndexError, match="out of range for a cache of 7"):
    cache.get_batch([7])
  with pytest.raises(IndexError):
    cache[-8]  # pylint: disable=pointless-statement
  with pytest.raises(TypeError, match="use get_batch"):
    cache[[1, 2]]  # pylint: disable=pointless-statement
  # Storage dtypes on request; pickles without open readers.
  raw = tc.TeacherCache(path, float_dtype=None)[2]
  assert raw["log_probs"].dtype == np.float16
  clone = pickle.loads(pickle.dumps(cache))
  np.testing.assert_array_equal(clone[4]["ids"], data["ids"][4])
  assert "topk" in repr(cache) and "7 sequences" in repr(cache)
  cache.close()
  np.testing.assert_array_equal(cache[1]["ids"], data["ids"][1])  # reopens.


def test_bytes_per_token(tmp_path):
  data = _make("sampled", 300, num_samples=5)
  path = _write(str(tmp_path / "c"), "sampled", 300, data, num_samples=5)
  cache = tc.TeacherCache(path)
  assert cache.payload_bytes_per_token == 5 * (2 + 1)  # uint16 + uint8.
  assert cache.meta["payload_bytes_per_token"] == 15
  disk = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))
  assert cache.bytes_per_token == pytest.approx(disk / (NUM * SEQ_LEN))
  assert cache.meta["disk_bytes_per_token"] < cache.bytes_per_token
  # The layout arithmetic quoted in the docs.
  per_token = tc.layout_bytes_per_token
  assert per_token("dense", vocab_size=256) == 512
  assert per_token("topk", vocab_size=256, k=8) == 24
  assert per_token("topk", vocab_size=32768, k=32) == 128
  assert per_token("topk", vocab_size=128256, k=32) == 160  # uint24 ids.
  assert per_token("sampled", vocab_size=32768, num_samples=12) == 36
  assert per_token("sampled", vocab_size=32768, num_samples=12,
                   proposal_temperature=2.0) == 48
  assert per_token("sampled", vocab_size=256, num_samples=12,
                   store_entropy=True) == 26
  assert [tc.id_dtype_for(v) for v in (256, 257, 65536, 65537, 2**24,
                                       2**24 + 1)] == [
                                           "uint8", "uint16", "uint16",
                                           "uint24", "uint24", "uint32"]


def test_uint24_and_uint32_ids_round_trip():
  for dtype, top in (("uint24", 2**24 - 1), ("uint32", 2**31 - 1)):
    field = tc.Field("ids", dtype, (2, 3))
    x = np.array([[0, 1, 255], [256, 65536, top]])
    buf = b"\0" * 5 + field.encode(x)
    assert len(buf) == 5 + field.nbytes
    np.testing.assert_array_equal(field.decode(buf, 5), x)


def test_overwrite_is_refused_unless_asked(tmp_path):
  path = str(tmp_path / "c")
  first = _make("topk", 100, seed=0)
  _write(path, "topk", 100, first, k=4)
  with pytest.raises(FileExistsError, match=f"teacher cache {path} already "
                     "exists; pass overwrite=True"):
    tc.TeacherCacheWriter(path, form="topk", vocab_size=100, seq_len=SEQ_LEN,
                          k=4)
  second = _make("topk", 100, seed=1)
  _write(path, "topk", 100, second, k=4, overwrite=True)
  np.testing.assert_array_equal(tc.TeacherCache(path)[3]["ids"],
                                second["ids"][3])
  assert sorted(os.listdir(tmp_path)) == ["c"]
  # A directory that is not a cache is never replaced; an empty one is used.
  other = tmp_path / "notes"
  other.mkdir()
  (other / "keep.txt").write_text("mine")
  with pytest.raises(FileExistsError, match="not a teacher cache"):
    tc.TeacherCacheWriter(str(other), form="topk", vocab_size=100,
                          seq_len=SEQ_LEN, k=4, overwrite=True)
  empty = tmp_path / "empty"
  empty.mkdir()
  _write(str(empty), "topk", 100, first, k=4)
  assert len(tc.TeacherCache(str(empty))) == NUM


def test_exception_inside_with_leaves_nothing(tmp_path):
  path = str(tmp_path / "c")
  data = _make("topk", 100)
  with pytest.raises(RuntimeError, match="teacher crashed"):
    with tc.TeacherCacheWriter(path, form="topk", vocab_size=100,
                               seq_len=SEQ_LEN, k=4, num_shards=2) as w:
      assert os.path.isdir(w.tmp_directory)
      w.add(0, {"ids": data["ids"][0], "log_probs": data["log_probs"][0]})
      raise RuntimeError("teacher crashed")
  assert os.listdir(tmp_path) == []
  # A second writer of the same directory in one process is refused.
  with tc.TeacherCacheWriter(path, form="topk", vocab_size=100,
                             seq_len=SEQ_LEN, k=4) as w:
    with pytest.raises(FileExistsError, match=r"\.tmp-\d+ exists: another "
                       "writer"):
      tc.TeacherCacheWriter(path, form="topk", vocab_size=100,
                            seq_len=SEQ_LEN, k=4)
    w.abort()
  assert os.listdir(tmp_path) == []
  # An incomplete cache is never finalised either.
  with pytest.raises(ValueError, match=r"incomplete: 2 of 4 sequences "
                     r"written \(missing \[1, 3\]"):
    with tc.TeacherCacheWriter(path, form="topk", vocab_size=100,
                               seq_len=SEQ_LEN, k=4, num_sequences=4) as w:
      for i in (0, 2):
        w.add(i, {"ids": data["ids"][i], "log_probs": data["log_probs"][i]})
  assert os.listdir(tmp_path) == []
  with pytest.raises(ValueError, match="missing"):  # gaps with N inferred.
    with tc.TeacherCacheWriter(path, form="topk", vocab_size=100,
                               seq_len=SEQ_LEN, k=4) as w:
      w.add(1, {"ids": data["ids"][1], "log_probs": data["log_probs"][1]})
  assert os.listdir(tmp_path) == []


def test_bad_writes_are_refused(tmp_path):
  data = _make("sampled", 50, num_samples=5)
  w = tc.TeacherCacheWriter(str(tmp_path / "c"), form="sampled",
                            vocab_size=50, seq_len=SEQ_LEN, num_samples=5,
                            num_sequences=NUM)
  good = {"ids": data["ids"][0], "weights": data["weights"][0]}
  w.add(0, good)
  with pytest.raises(ValueError, match="sequence index 0 was already"):
    w.add(0, good)
  with pytest.raises(ValueError, match=r"out of range \[0, 7\)"):
    w.add(7, good)
  with pytest.raises(ValueError, match="expected \\['ids', 'weights'\\]"):
    w.add(1, {"ids": good["ids"]})
  with pytest.raises(ValueError, match=r"ids has shape \(6, 4\), expected"):
    w.add(1, {"ids": good["ids"][:, :4], "weights": good["weights"]})
  with pytest.raises(ValueError, match=r"ids must be in \[0, 50\)"):
    w.add(1, {"ids": good["ids"] + 50, "weights": good["weights"]})
  with pytest.raises(ValueError, match="not counts / num_samples"):
    w.add(1, {"ids": good["ids"], "weights": good["weights"] * 0.9})
  with pytest.raises(ValueError, match="contains NaN"):
    w.add(1, {"ids": good["ids"], "weights": good["weights"] * np.nan})
  w.abort()
  assert os.listdir(tmp_path) == []
  with pytest.raises(ValueError, match="overflow float16"):
    with tc.TeacherCacheWriter(str(tmp_path / "c"), form="sampled",
                               vocab_size=50, seq_len=SEQ_LEN, num_samples=5,
                               proposal_temperature=0.5) as w2:
      w2.add(0, {"ids": good["ids"], "weights": good["weights"] * 1e6})
  with pytest.raises(ValueError, match="log_probs must be <= 0"):
    with tc.TeacherCacheWriter(str(tmp_path / "c"), form="topk",
                               vocab_size=50, seq_len=SEQ_LEN, k=5) as w3:
      w3.add(0, {"ids": good["ids"], "log_probs": np.ones((SEQ_LEN, 5))})
  assert os.listdir(tmp_path) == []
  with pytest.raises(ValueError, match="form='bogus' is not one of"):
    tc.TeacherCacheWriter(str(tmp_path / "c"), form="bogus", vocab_size=5,
                          seq_len=2)
  with pytest.raises(ValueError, match="form='topk' needs an int k"):
    tc.TeacherCacheWriter(str(tmp_path / "c"), form="topk", vocab_size=5,
                          seq_len=2, k=6)
  with pytest.raises(ValueError, match="needs proposal_temperature=1"):
    tc.TeacherCacheWriter(str(tmp_path / "c"), form="sampled", vocab_size=5,
                          seq_len=2, num_samples=3, proposal_temperature=2.0,
                          weights_dtype="counts")
  with pytest.raises(ValueError, match="JSON-serialisable"):
    tc.TeacherCacheWriter(str(tmp_path / "c"), form="dense", vocab_size=5,
                          seq_len=2, source={"x": object()})
  assert os.listdir(tmp_path) == []


@pytest.fixture
def cache_dir(tmp_path):
  return _write(str(tmp_path / "c"), "topk", 100, _make("topk", 100), k=4)


def test_missing_cache_and_meta_errors(tmp_path, cache_dir):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    tc.TeacherCache(str(tmp_path / "nope"))
  with pytest.raises(ValueError, match="has form 'topk', expected 'sampled'"):
    tc.TeacherCache(cache_dir, form="sampled")
  meta_path = os.path.join(cache_dir, "meta.json")
  meta = json.load(open(meta_path))
  with open(meta_path, "w") as f:
    f.write("{not json")
  with pytest.raises(ValueError, match="meta.json is not valid JSON"):
    tc.TeacherCache(cache_dir)
  with open(meta_path, "w") as f:
    json.dump({**meta, "record_bytes": 3}, f)
  with pytest.raises(ValueError, match="record_bytes 3 does not match"):
    tc.TeacherCache(cache_dir)
  os.remove(meta_path)
  with pytest.raises(FileNotFoundError, match="has no meta.json"):
    tc.TeacherCache(cache_dir)


def test_shard_count_mismatch(cache_dir):
  shard = os.path.join(cache_dir, "cache-00001-of-00003.array_record")
  os.rename(shard, os.path.join(cache_dir, "cache-00001-of-00004"
                                ".array_record"))
  with pytest.raises(ValueError, match=r"lists 3 shards but 3 shard files "
                     r"are present; missing \['cache-00001-of-00003"
                     r".array_record'\]; unexpected"):
    tc.TeacherCache(cache_dir)


def test_truncated_shard_and_index_errors(cache_dir):
  shard = os.path.join(cache_dir, "cache-00000-of-00003.array_record")
  data = open(shard, "rb").read()
  with open(shard, "wb") as f:
    f.write(data[:len(data) // 2])
  cache = tc.TeacherCache(cache_dir)  # opening is lazy.
  np.testing.assert_array_equal(cache[1]["ids"].shape, (SEQ_LEN, 4))  # shard 1.
  with pytest.raises(ValueError, match="cache-00000-of-00003.array_record is "
                     "not a readable array_record file"):
    cache[0]  # pylint: disable=pointless-statement
  index_path = os.path.join(cache_dir, "index.npy")
  np.save(index_path, np.zeros((3, 2), np.int64))
  with pytest.raises(ValueError, match=r"index.npy has shape \(3, 2\)"):
    tc.TeacherCache(cache_dir)


def test_truncated_record_and_wrong_index(cache_dir):
  cache = tc.TeacherCache(cache_dir)
  index = np.load(os.path.join(cache_dir, "index.npy"))
  # Swap where two sequences of shard 0 are said to be.
  swapped = index.copy()
  swapped[[0, 3]] = index[[3, 0]]
  np.save(os.path.join(cache_dir, "index.npy"), swapped)
  with pytest.raises(ValueError, match="holds sequence 3; index.npy does not "
                     "match"):
    tc.TeacherCache(cache_dir)[0]  # pylint: disable=expression-not-assigned
  np.save(os.path.join(cache_dir, "index.npy"), index)
  # Rewrite shard 2 (sequences 2 and 5) with a short record at position 0.
  shard = os.path.join(cache_dir, "cache-00002-of-00003.array_record")
  reader = array_record_module.ArrayRecordReader(shard)
  records = reader.read(list(range(reader.num_records())))
  reader.close()
  writer = array_record_module.ArrayRecordWriter(shard, "group_size:1")
  writer.write(records[0][:-10])
  writer.write(records[1])
  writer.close()
  cache.close()
  seq = int(np.nonzero((index[:, 0] == 2) & (index[:, 1] == 0))[0][0])
  with pytest.raises(ValueError, match=f"sequence {seq}: record in .*has "
                     r"\d+ bytes, expected \d+ \(truncated or corrupted"):
    cache.get_batch([seq])


def test_cache_feeds_the_sparse_losses(tmp_path):
  jax = pytest.importorskip("jax")
  from jdistill.losses import sparse  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(0)
  vocab_size = 40
  teacher = rng.standard_normal((NUM, SEQ_LEN, vocab_size)).astype(np.float32)
  student = rng.standard_normal((NUM, SEQ_LEN, vocab_size)).astype(np.float32)
  lp, ids = (np.asarray(x) for x in sparse.topk_teacher_targets(
      teacher, 5, temperature=2.0))
  sid, sw = (np.asarray(x) for x in sparse.sample_teacher_tokens(
      jax.random.key(0), teacher, 8, temperature=2.0))
  topk = _write(str(tmp_path / "topk"), "topk", vocab_size,
                {"ids": ids, "log_probs": lp}, k=5,
                temperature=2.0)
  sampled = _write(str(tmp_path / "sampled"), "sampled", vocab_size,
                   {"ids": sid, "weights": sw},
                   num_samples=8, temperature=2.0)
  order = [4, 1, 6]
  got = tc.TeacherCache(topk).get_batch(order)
  np.testing.assert_allclose(
      sparse.topk_kd(student[order], got["log_probs"], got["ids"],
                     temperature=2.0, variant="tail"),
      sparse.topk_kd(student[order], lp[order], ids[order],
                     temperature=2.0, variant="tail"), rtol=5e-3, atol=1e-4)
  got = tc.TeacherCache(sampled).get_batch(order)
  np.testing.assert_array_equal(got["ids"], sid[order])
  np.testing.assert_allclose(
      sparse.sampled_kd(student[order], got["ids"], got["weights"],
                        temperature=2.0),
      sparse.sampled_kd(student[order], sid[order], sw[order],
                        temperature=2.0), rtol=1e-6)


def test_sequences_form_round_trips_teacher_text(tmp_path):
  """Sequence-level KD's form: the teacher's ids [seq_len + 1] and its
  completion mask [seq_len], read back exactly (ids int32, mask bool)."""
  rng = np.random.default_rng(3)
  ids = rng.integers(0, 70000, (NUM, SEQ_LEN + 1))
  completion = rng.random((NUM, SEQ_LEN)) < 0.6
  d = str(tmp_path / "s")
  with tc.TeacherCacheWriter(d, form="sequences", vocab_size=70000,
                             seq_len=SEQ_LEN, num_shards=3) as w:
    for i in ORDER:
      w.add(i, {"ids": ids[i], "completion": completion[i]})
  cache = tc.TeacherCache(d, form="sequences")
  got = cache.get_batch([4, 0, 6])
  np.testing.assert_array_equal(got["ids"], ids[[4, 0, 6]])
  assert got["ids"].dtype == np.int32 and got["completion"].dtype == bool
  np.testing.assert_array_equal(got["completion"], completion[[4, 0, 6]])
  # uint24 ids (70000 > 65536) + one mask byte per token.
  assert cache.payload_bytes_per_token == pytest.approx(
      (3 * (SEQ_LEN + 1) + SEQ_LEN) / SEQ_LEN)
  with pytest.raises(ValueError, match="completion must be a bool"):
    with tc.TeacherCacheWriter(str(tmp_path / "bad"), form="sequences",
                               vocab_size=10, seq_len=SEQ_LEN) as w:
      w.add(0, {"ids": np.zeros(SEQ_LEN + 1, int),
                "completion": np.full(SEQ_LEN, 0.5)})
  assert not os.path.exists(tmp_path / "bad")
  with pytest.raises(ValueError, match="takes neither k nor num_samples"):
    tc.cache_layout("sequences", vocab_size=10, seq_len=4, k=2)
