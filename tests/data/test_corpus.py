"""Tests of jdistill.data.corpus: packing against a straightforward reference,
write/read round trips, txt/jsonl/parquet/chat/stdlib inputs, prompt
masking, the path-hash split, reuse and refusal of a prepared directory,
atomic writes and one-line errors. A tiny byte-level BPE tokenizer is
trained in a fixture (no network)."""

import json
import os
import pickle

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from jdistill.data import corpus as C
from jdistill.data import sources
from jdistill.data import text as text_lib

BOS, EOS, PAD = "<bos>", "<eos>", "<pad>"
KEYS = ("x", "y", "segment_ids", "positions", "token_mask")
TRAIN_TEXT = [
    "the quick brown fox jumps over the lazy dog",
    "hello world, this is a tiny corpus for a tiny tokenizer",
    "def f(x):\n  return x + 1\n",
    "system prompt user question assistant answer",
] * 10


def _train_tokenizer(directory, vocab_size):
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
      vocab_size=vocab_size, special_tokens=[BOS, EOS, PAD],
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
      show_progress=False)
  tok.train_from_iterator(TRAIN_TEXT, trainer)
  os.makedirs(directory, exist_ok=True)
  tok.save(os.path.join(directory, "tokenizer.json"))
  with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
    json.dump({"bos_token": BOS, "eos_token": {"content": EOS},
               "pad_token": PAD}, f)
  return str(directory)


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
  return _train_tokenizer(tmp_path_factory.mktemp("tok"), 300)


@pytest.fixture(scope="module")
def other_tok_dir(tmp_path_factory):
  return _train_tokenizer(tmp_path_factory.mktemp("tok2"), 280)


@pytest.fixture(scope="module")
def tok(tok_dir):
  return C._load_tokenizer(os.path.join(tok_dir, "tokenizer.json"))


def _ids(tok):
  return (tok.token_to_id(BOS), tok.token_to_id(EOS), tok.token_to_id(PAD))


def _write_jsonl(path, rows):
  with open(path, "w") as f:
    for row in rows:
      f.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
  return str(path)


def _write_text(path, text):
  with open(path, "w") as f:
    f.write(text)
  return str(path)


def _snapshot(directory):
  """{relative path: bytes} of every file under ``directory``."""
  out = {}
  for dirpath, _, files in os.walk(directory):
    for name in files:
      path = os.path.join(dirpath, name)
      with open(path, "rb") as f:
        out[os.path.relpath(path, directory)] = f.read()
  return out


def _one_line_error(excinfo, *needles):
  message = str(excinfo.value)
  assert "\n" not in message, message
  for needle in needles:
    assert needle in message, (needle, message)
  return message


# ---------------------------------------------------------------------------
# Packing against a straightforward reference.
# ---------------------------------------------------------------------------


def _reference_pack(docs, seq_len, pad_id):
  """Token by token: a stream of (token, document, trained) cut into
  windows of seq_len + 1; segments numbered by first appearance."""
  width = seq_len + 1
  stream = [(t, d, bool(f)) for d, (ids, flags) in enumerate(docs)
            for t, f in zip(ids, flags)]
  out = {k: [] for k in KEYS}
  for start in range(0, len(stream), width):
    win = stream[start:start + width]
    win += [(pad_id, None, False)] * (width - len(win))
    segment, first, segs, pos = {}, {}, [], []
    for j, (_, d, _) in enumerate(win):
      if d is None:
        segs.append(0)
        pos.append(0)
        continue
      if d not in segment:
        segment[d], first[d] = len(segment) + 1, j
      segs.append(segment[d])
      pos.append(j - first[d])
    out["x"].append([t for t, _, _ in win[:-1]])
    out["y"].append([t for t, _, _ in win[1:]])
    out["segment_ids"].append(segs[:-1])
    out["positions"].append(pos[:-1])
    out["token_mask"].append([
        win[j + 1][1] is not None and win[j + 1][1] == win[j][1]
        and win[j + 1][2] for j in range(seq_len)])
  return {k: np.asarray(v, bool if k == "token_mask" else np.int32
                        ).reshape(-1, seq_len) for k, v in out.items()}


def _assert_examples_equal(got, want):
  assert set(got) == set(KEYS)
  for k in KEYS:
    assert got[k].dtype == (bool if k == "token_mask" else np.int32), k
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def test_pack_hand_checked_example():
  docs = [([10, 11, 12], [True] * 3), ([20, 21], [False, True])]
  got = C.pack_examples(docs, seq_len=3, pad_id=99)
  # Windows of 4: [10 11 12 20] [21 pad pad pad]; document 2 is split.
  np.testing.assert_array_equal(got["x"], [[10, 11, 12], [21, 99, 99]])
  np.testing.assert_array_equal(got["y"], [[11, 12, 20], [99, 99, 99]])
  np.testing.assert_array_equal(got["segment_ids"], [[1, 1, 1], [1, 0, 0]])
  np.testing.assert_array_equal(got["positions"], [[0, 1, 2], [0, 0, 0]])
  np.testing.assert_array_equal(got["token_mask"],
                                [[True, True, False], [False] * 3])
  # Prompt tokens are never targets; a second document is not predicted
  # from the first.
  docs = [([1, 30, 31, 32, 2], [False, False, False, True, True]),
          ([1, 40, 2], [False, True, True])]
  got = C.pack_examples(docs, seq_len=8, pad_id=0)
  np.testing.assert_array_equal(got["x"], [[1, 30, 31, 32, 2, 1, 40, 2]])
  np.testing.assert_array_equal(got["segment_ids"],
                                [[1, 1, 1, 1, 1, 2, 2, 2]])
  np.testing.assert_array_equal(got["positions"], [[0, 1, 2, 3, 4, 0, 1, 2]])
  np.testing.assert_array_equal(
      got["token_mask"], [[False, False, True, True, False, True, True,
                           False]])


@pytest.mark.parametrize("seq_len", [1, 2, 3, 5, 8, 13])
def test_pack_matches_reference(seq_len):
  rng = np.random.default_rng(seq_len)
  for trial in range(5):
    lengths = list(rng.integers(1, 3 * seq_len + 4, rng.integers(1, 9)))
    if trial == 0:  # exact fits and a document of one token
      lengths = [seq_len + 1, 1, 2 * (seq_len + 1), seq_len]
    docs = [(rng.integers(3, 500, n).tolist(), (rng.random(n) < 0.7).tolist())
            for n in lengths]
    got = C.pack_examples(docs, seq_len=seq_len, pad_id=2)
    want = _reference_pack(docs, seq_len, pad_id=2)
    _assert_examples_equal(got, want)
    total = sum(lengths)
    assert len(got["x"]) == -(-total // (seq_len + 1))


def test_pack_long_document_is_split_and_restarts_positions():
  doc = (list(range(100, 123)), [True] * 23)  # 23 tokens, windows of 5
  got = C.pack_examples([doc], seq_len=4, pad_id=0)
  assert got["x"].shape == (5, 4)
  np.testing.assert_array_equal(got["positions"][:4], [[0, 1, 2, 3]] * 4)
  np.testing.assert_array_equal(got["x"][:, 0], [100, 105, 110, 115, 120])
  # The last window: 120 121 122 pad pad.
  np.testing.assert_array_equal(got["segment_ids"][-1], [1, 1, 1, 0])
  np.testing.assert_array_equal(got["token_mask"][-1],
                                [True, True, False, False])


def test_pack_empty_and_bad_documents():
  got = C.pack_examples([], seq_len=4, pad_id=0)
  assert all(got[k].shape == (0, 4) for k in KEYS)
  with pytest.raises(ValueError, match="seq_len must be a positive int"):
    C.pack_examples([([1], [True])], seq_len=0, pad_id=0)
  with pytest.raises(ValueError, match="equal 1-D shapes"):
    C.pack_examples([([1, 2], [True])], seq_len=4, pad_id=0)


# ---------------------------------------------------------------------------
# Reading documents.
# ---------------------------------------------------------------------------


def test_read_txt_jsonl_parquet_and_chat(tmp_path):
  txt = _write_text(tmp_path / "a.txt", "plain text document")
  jsonl = _write_jsonl(tmp_path / "b.jsonl", [
      {"text": "line one"},
      "",
      {"body": "custom field", "text": None, "messages": [
          {"role": "system", "content": "be brief"},
          {"role": "user", "content": "hi?"},
          {"role": "assistant", "content": "hello"}]},
      {"prompt": "2+2=", "response": "4"},
      {"text": ""},  # empty: skipped
  ])
  table = pa.table({"text": [f"row {i}" for i in range(5)]})
  parquet = str(tmp_path / "c.parquet")
  pq.write_table(table, parquet, row_group_size=2)
  chat = str(tmp_path / "d.parquet")
  pq.write_table(pa.table({"messages": [
      [{"role": "user", "content": "q"}, {"role": "assistant",
                                          "content": "a"}]]}), chat)
  docs = list(C.read_documents([txt, jsonl, parquet, chat]))
  real = lambda p: os.path.realpath(p)
  assert docs[0] == C.Document(("plain text document",), (True,), real(txt))
  assert docs[1] == C.Document(("line one",), (True,), f"{real(jsonl)}:1")
  assert docs[2] == C.Document(("be brief\n", "hi?\n", "hello\n"),
                               (False, False, True), f"{real(jsonl)}:3")
  assert docs[3] == C.Document(("2+2=\n", "4\n"), (False, True),
                               f"{real(jsonl)}:4")
  assert [d.pieces for d in docs[4:9]] == [(f"row {i}",) for i in range(5)]
  assert [d.source for d in docs[4:9]] == [f"{real(parquet)}:{i}"
                                           for i in range(5)]
  assert docs[9] == C.Document(("q\n", "a\n"), (False, True), f"{real(chat)}:0")
  assert len(docs) == 10
  # text_field picks another field; a directory expands to its files.
  body = _write_jsonl(tmp_path / "e.jsonl", [{"body": "custom", "text": "x"}])
  assert next(C.read_documents(body, text_field="body")).pieces == (
      "custom",)
  assert len(list(C.read_documents([str(tmp_path)]))) == 11
  assert len(list(C.read_documents([str(tmp_path)], max_documents=3))) == 3


@pytest.mark.parametrize("rows, where, needle", [
    ([{"text": "ok"}, {"other": "x"}], "line 2", "missing field 'text'"),
    ([{"text": "ok"}, "", "{not json"], "line 3", "invalid JSON"),
    (["[1, 2]"], "line 1", "expected a JSON object"),
    ([{"text": 3}], "line 1", "field 'text' must be a string"),
    ([{"messages": [{"role": "gpt", "content": "x"}]}], "line 1",
     "role 'gpt'"),
    ([{"messages": "hi"}], "line 1", "'messages' must be a non-empty list"),
    ([{"prompt": "only a prompt"}], "line 1", "'response' is missing"),
])
def test_bad_jsonl_one_line_errors(tmp_path, rows, where, needle):
  path = _write_jsonl(tmp_path / "bad.jsonl", rows)
  with pytest.raises(ValueError) as e:
    list(C.read_documents([path]))
  _one_line_error(e, "bad.jsonl", where, needle)


def test_bad_paths_one_line_errors(tmp_path):
  with pytest.raises(ValueError) as e:
    list(C.read_documents([]))
  _one_line_error(e, "no input files")
  csv = _write_text(tmp_path / "data.csv", "a,b")
  with pytest.raises(ValueError) as e:
    list(C.read_documents([csv]))
  _one_line_error(e, "data.csv", "unknown file type")
  with pytest.raises(ValueError) as e:
    list(C.read_documents([str(tmp_path / "missing.jsonl")]))
  _one_line_error(e, "missing.jsonl", "no such file")
  txt = _write_text(tmp_path / "a.txt", "x")
  with pytest.raises(ValueError) as e:
    list(C.read_documents([txt, str(tmp_path)]))
  _one_line_error(e, "a.txt", "given twice")
  with open(tmp_path / "latin.txt", "wb") as f:
    f.write(b"caf\xe9")
  with pytest.raises(ValueError) as e:
    list(C.read_documents([str(tmp_path / "latin.txt")]))
  _one_line_error(e, "latin.txt", "not valid UTF-8")
  parquet = str(tmp_path / "p.parquet")
  pq.write_table(pa.table({"content": ["x"]}), parquet)
  with pytest.raises(ValueError) as e:
    list(C.read_documents([parquet]))
  _one_line_error(e, "p.parquet", "no column 'text'")
  _write_text(tmp_path / "junk.parquet", "not parquet")
  with pytest.raises(ValueError) as e:
    list(C.read_documents([str(tmp_path / "junk.parquet")]))
  _one_line_error(e, "junk.parquet", "not a readable parquet file")


# ---------------------------------------------------------------------------
# Tokenizing.
# ---------------------------------------------------------------------------


def test_special_ids(tok_dir, tok, tmp_path):
  bos, eos, pad = _ids(tok)
  assert C.special_ids(tok_dir) == {"bos": bos, "eos": eos, "pad": pad}
  assert C.special_ids(os.path.join(tok_dir, "tokenizer.json"))["eos"] == eos
  # special_tokens_map.json, then config.json (first of a list).
  d = tmp_path / "model"
  d.mkdir()
  with open(d / "special_tokens_map.json", "w") as f:
    json.dump({"eos_token": {"content": "</s>"}}, f)
  with open(d / "tokenizer_config.json", "w") as f:
    json.dump({"added_tokens_decoder": {"7": {"content": "</s>"}}}, f)
  with open(d / "config.json", "w") as f:
    json.dump({"bos_token_id": 1, "eos_token_id": [5, 6],
               "pad_token_id": None}, f)
  assert C.special_ids(str(d)) == {"bos": 1, "eos": 7, "pad": None}
  with open(d / "special_tokens_map.json", "w") as f:
    json.dump({"pad_token": "<nope>"}, f)
  with pytest.raises(ValueError) as e:
    C.special_ids(str(d))
  _one_line_error(e, "special_tokens_map.json", "pad_token", "<nope>")


def test_tokenize_documents_bos_eos_and_flags(tok):
  bos, eos, _ = _ids(tok)
  docs = [C.Document(("hello world",), (True,), "a"),
          C.Document(("prompt\n", "answer\n"), (False, True), "b"),
          C.Document(("say <eos> here",), (True,), "c")]
  out = list(C.tokenize_documents(tok, docs, bos_id=bos, eos_id=eos,
                                  batch_size=2))
  assert [d for d, _, _ in out] == docs
  for doc, ids, trained in out:
    assert ids.dtype == np.int32 and trained.dtype == bool
    assert ids[0] == bos and ids[-1] == eos
    assert tok.decode(ids[1:-1].tolist()) == "".join(doc.pieces)
    assert not trained[0] and trained[-1]
  _, ids, trained = out[1]
  assert tok.decode(ids[1:-1][trained[1:-1]].tolist()) == "answer\n"
  assert tok.decode(ids[1:-1][~trained[1:-1]].tolist()) == "prompt\n"
  # A literal special token in the text is text, not EOS.
  assert list(out[2][1]).count(eos) == 1
  _, ids, _ = next(C.tokenize_documents(tok, docs[:1], bos_id=None,
                                        eos_id=eos))
  assert ids[0] != bos


# ---------------------------------------------------------------------------
# Writing and reading.
# ---------------------------------------------------------------------------


def _inputs(tmp_path):
  """Eleven documents of every kind, some longer than a window."""
  txt = _write_text(tmp_path / "story.txt", " ".join(TRAIN_TEXT[:6]))
  jsonl = _write_jsonl(tmp_path / "rows.jsonl", [
      {"text": t} for t in TRAIN_TEXT[:4]] + [
      {"messages": [{"role": "user", "content": "question?"},
                    {"role": "assistant", "content": "the answer"}]},
      {"prompt": "def f(x):", "response": "return x"}])
  parquet = str(tmp_path / "table.parquet")
  pq.write_table(pa.table({"text": TRAIN_TEXT[:4]}), parquet,
                 row_group_size=3)
  return [txt, jsonl, parquet]


def _expected(paths, tok, seq_len, validation_percent, max_documents=None):
  """In-memory packing of each split, straight from read_documents."""
  bos, eos, pad = _ids(tok)
  docs = {"train": [], "validation": []}
  files = sorted(os.path.realpath(p) if p != "stdlib" else p for p in paths)
  for doc, ids, trained in C.tokenize_documents(
      tok, C.read_documents(files, max_documents=max_documents),
      bos_id=bos, eos_id=eos):
    docs[C.split_of(doc.source, validation_percent)].append((ids, trained))
  return {s: C.pack_examples(d, seq_len, pad) for s, d in docs.items()}, docs


def _read_all(out_dir, split):
  source = C.PackedCorpus(out_dir, split)
  return source.get_batch(np.arange(len(source)))


def test_round_trip_equals_in_memory_packing(tmp_path, tok_dir, tok):
  paths = _inputs(tmp_path)
  out = str(tmp_path / "corpus")
  meta = C.prepare_corpus(paths, tok_dir, out, seq_len=16,
                          validation_percent=30, records_per_shard=3)
  want, docs = _expected(paths, tok, 16, 30)
  assert len(docs["train"]) + len(docs["validation"]) == 11
  assert sorted(os.listdir(out)) == sorted(
      ["corpus.json"] + [s["file"] for split in C.SPLITS
                         for s in meta["splits"][split]["shards"]])
  with open(os.path.join(out, "corpus.json")) as f:
    assert json.load(f) == meta
  bos, eos, pad = _ids(tok)
  assert meta["special_ids"] == {"bos": bos, "eos": eos, "pad": pad}
  assert meta["tokenizer"]["fingerprint"] == C.tokenizer_fingerprint(tok_dir)
  assert meta["files"]["fingerprint"] == C.files_fingerprint(paths)
  assert meta["vocab_size"] == tok.get_vocab_size()
  for split in C.SPLITS:
    got = _read_all(out, split)
    _assert_examples_equal(got, want[split])
    stats = meta["splits"][split]
    assert stats["documents"] == len(docs[split])
    assert stats["records"] == len(got["x"])
    assert stats["tokens"] == sum(len(ids) for ids, _ in docs[split])
    assert stats["target_tokens"] == int(got["token_mask"].sum())
    assert stats["padding_tokens"] == (
        stats["records"] * 17 - stats["tokens"])
    if stats["records"] > 3:
      assert len(stats["shards"]) == -(-stats["records"] // 3)
    # BOS starts every document exactly once.
    assert stats["documents"] == int(
        (got["x"] == bos).sum() + (got["y"][:, -1] == bos).sum())
  # Random access in any order, negative indices, pickling, empty batch.
  train = C.PackedCorpus(out, "train")
  order = np.random.default_rng(0).permutation(len(train))
  batch = train.get_batch(order)
  for k in KEYS:
    np.testing.assert_array_equal(batch[k], want["train"][k][order])
  np.testing.assert_array_equal(train.get_batch([-1])["x"],
                                want["train"]["x"][-1:])
  clone = pickle.loads(pickle.dumps(train))
  np.testing.assert_array_equal(clone.get_batch([0])["y"],
                                want["train"]["y"][:1])
  assert clone.get_batch(np.array([], np.int64))["x"].shape == (0, 16)
  with pytest.raises(IndexError):
    train.get_batch([len(train)])
  assert train.meta == meta and train.seq_len == 16
  dataset = C.packed_dataset(out)
  assert isinstance(dataset, sources.Dataset)
  assert dataset.input_shape == (16,) and dataset.num_classes == 300
  assert len(dataset.test) == meta["splits"]["validation"]["records"]


def test_chat_prompts_are_masked(tmp_path, tok_dir, tok):
  chat = _write_jsonl(tmp_path / "chat.jsonl", [
      {"messages": [
          {"role": "system", "content": "be brief"},
          {"role": "user", "content": "first question"},
          {"role": "assistant", "content": "first answer"},
          {"role": "user", "content": "second question"},
          {"role": "assistant", "content": "second answer"}]},
      {"prompt": "the prompt", "response": "the response"}])
  out = str(tmp_path / "corpus")
  C.prepare_corpus([chat], tok_dir, out, seq_len=256, validation_percent=0)
  got = _read_all(out, "train")
  assert len(got["x"]) == 1
  _, eos, _ = _ids(tok)
  y, mask = got["y"][0], got["token_mask"][0]
  targets = y[mask]
  assert (targets == eos).sum() == 2  # each document learns to stop
  assert tok.decode(targets[targets != eos].tolist()) == (
      "first answer\nsecond answer\nthe response\n")
  assert C.PackedCorpus(out, "validation").get_batch([])["x"].shape == (0, 256)


def test_split_is_independent_of_file_order(tmp_path, tok_dir, tok):
  paths = [_write_jsonl(tmp_path / f"part{k}.jsonl",
                        [{"text": f"document {k} {i} " + TRAIN_TEXT[i % 4]}
                         for i in range(30)]) for k in range(3)]
  by_source = lambda ps: {d.source: C.split_of(d.source, 30)
                          for d in C.read_documents(ps)}
  assert by_source(paths) == by_source(paths[::-1]) == by_source(
      [paths[1], paths[2], paths[0]])
  # ...and independent of the other files.
  alone = by_source(paths[1:2])
  assert all(by_source(paths)[s] == v for s, v in alone.items())
  splits = set(by_source(paths).values())
  assert splits == {"train", "validation"}
  a, b = str(tmp_path / "a"), str(tmp_path / "b")
  meta_a = C.prepare_corpus(paths, tok_dir, a, seq_len=32,
                            validation_percent=30)
  meta_b = C.prepare_corpus([paths[2], paths[0], paths[1]], tok_dir, b,
                            seq_len=32, validation_percent=30)
  assert meta_a["splits"] == meta_b["splits"]
  assert meta_a["files"] == meta_b["files"]
  for split in C.SPLITS:
    _assert_examples_equal(_read_all(a, split), _read_all(b, split))


def test_reuse_and_refusal(tmp_path, tok_dir, other_tok_dir, monkeypatch):
  paths = _inputs(tmp_path)
  out = str(tmp_path / "corpus")
  meta = C.prepare_corpus(paths, tok_dir, out, seq_len=16)
  before = _snapshot(out)

  def no_tokenizing(*args, **kwargs):
    raise AssertionError("tokenized again")

  with monkeypatch.context() as m:
    m.setattr(C, "tokenize_documents", no_tokenizing)
    # Same inputs in another order, other sharding: reused.
    assert C.prepare_corpus(paths[::-1], tok_dir, out, seq_len=16,
                            records_per_shard=1) == meta
  assert _snapshot(out) == before

  with pytest.raises(ValueError) as e:
    C.prepare_corpus(paths, other_tok_dir, out, seq_len=16)
  message = _one_line_error(e, out, "tokenizer")
  assert "files" not in message and "seq_len" not in message
  with pytest.raises(ValueError) as e:
    C.prepare_corpus(paths, tok_dir, out, seq_len=8)
  _one_line_error(e, "seq_len (has 16, requested 8)")
  with pytest.raises(ValueError) as e:
    C.prepare_corpus(paths, tok_dir, out, seq_len=16, validation_percent=20)
  _one_line_error(e, "validation_percent")
  with open(paths[1], "a") as f:
    f.write(json.dumps({"text": "one more"}) + "\n")
  with pytest.raises(ValueError) as e:
    C.prepare_corpus(paths, other_tok_dir, out, seq_len=8)
  _one_line_error(e, "tokenizer", "files", "seq_len")
  assert _snapshot(out) == before

  C.check_corpus(out, tok_dir)
  with pytest.raises(ValueError) as e:
    C.check_corpus(out, other_tok_dir)
  _one_line_error(e, out, "tokenizer")

  other = tmp_path / "not_a_corpus"
  other.mkdir()
  _write_text(other / "keep.txt", "x")
  with pytest.raises(ValueError) as e:
    C.prepare_corpus(paths, tok_dir, str(other), seq_len=16)
  _one_line_error(e, "not_a_corpus", "not a packed corpus")
  assert os.listdir(other) == ["keep.txt"]


def test_failed_write_leaves_nothing(tmp_path, tok_dir):
  data = tmp_path / "data"
  data.mkdir()
  good = _write_jsonl(data / "a.jsonl", [{"text": t} for t in TRAIN_TEXT])
  bad = _write_jsonl(data / "b.jsonl", [{"text": "fine"}, {"txt": "typo"}])
  out = tmp_path / "out" / "corpus"
  with pytest.raises(ValueError) as e:
    C.prepare_corpus([good, bad], tok_dir, str(out), seq_len=8,
                     records_per_shard=2)
  _one_line_error(e, "b.jsonl line 2", "missing field 'text'")
  assert not out.exists()
  assert os.listdir(tmp_path / "out") == []
  # An empty out_dir is fine; bad options are one line too.
  out.mkdir()
  C.prepare_corpus([good], tok_dir, str(out), seq_len=8)
  assert C.PackedCorpus(str(out), "train").get_batch([0])["x"].shape == (1, 8)
  for kwargs, needle in (({"seq_len": 0}, "seq_len"),
                         ({"seq_len": 8, "validation_percent": 100},
                          "validation_percent"),
                         ({"seq_len": 8, "eos_id": 10_000}, "eos_id"),
                         ({"seq_len": 8, "bos_id": 0, "add_bos": False},
                          "add_bos")):
    with pytest.raises(ValueError) as e:
      C.prepare_corpus([good], tok_dir, str(tmp_path / "x"), **kwargs)
    _one_line_error(e, needle)
  with pytest.raises(ValueError) as e:
    C.prepare_corpus([good], str(tmp_path), str(tmp_path / "x"), seq_len=8)
  _one_line_error(e, "tokenizer.json")
  assert not (tmp_path / "x").exists()


def test_stdlib_source(tmp_path, tok_dir, tok):
  docs = list(C.read_documents(["stdlib"], max_documents=4))
  assert len(docs) == 4
  assert all(not os.path.isabs(d.source) and d.source.endswith(".py")
             for d in docs)
  # The same files go to validation as in the byte-level corpus.
  assert [C.split_of(d.source, 50) == "validation" for d in docs] == [
      text_lib._is_validation(d.source, 50) for d in docs]
  out = str(tmp_path / "stdlib")
  meta = C.prepare_corpus(["stdlib"], tok_dir, out, seq_len=64,
                          validation_percent=50, max_documents=4)
  want, _ = _expected(["stdlib"], tok, 64, 50, max_documents=4)
  assert sum(meta["splits"][s]["documents"] for s in C.SPLITS) == 4
  assert meta["files"]["fingerprint"] == C.files_fingerprint(
      ["stdlib"], max_documents=4)
  assert meta["files"]["fingerprint"] != C.files_fingerprint(
      ["stdlib"], max_documents=3)
  for split in C.SPLITS:
    _assert_examples_equal(_read_all(out, split), want[split])
  with pytest.raises(ValueError) as e:
    C.prepare_corpus(["stdlib"], tok_dir, out, seq_len=64,
                     validation_percent=50, max_documents=3)
  _one_line_error(e, "files", "max_documents")


def test_damaged_corpus_one_line_errors(tmp_path, tok_dir):
  paths = _inputs(tmp_path)
  out = str(tmp_path / "corpus")
  meta = C.prepare_corpus(paths, tok_dir, out, seq_len=8, records_per_shard=4,
                          validation_percent=0)
  with pytest.raises(ValueError) as e:
    C.PackedCorpus(out, "test")
  _one_line_error(e, "split='test'", "train, validation")
  with pytest.raises(FileNotFoundError):
    C.PackedCorpus(str(tmp_path), "train")
  # Shards swapped: the record headers catch it.
  first, second = [os.path.join(out, s["file"])
                   for s in meta["splits"]["train"]["shards"][:2]]
  os.rename(first, first + ".x")
  os.rename(second, first)
  os.rename(first + ".x", second)
  with pytest.raises(ValueError) as e:
    C.PackedCorpus(out, "train").get_batch([0])
  _one_line_error(e, "window 0", "holds window 4")
  os.remove(second)
  with pytest.raises(ValueError) as e:
    C.PackedCorpus(out, "train")
  _one_line_error(e, os.path.basename(second), "missing")
