"""Cross-tokenizer alignment (`jdistill.data.cross_tokenizer`).

The student is the byte-level BPE fixture tokenizer
(``tests/fixtures/hf/tokenizer``); a second, different byte-level BPE (vocab
600, trained here in about 0.1 s on two other standard-library files) is the
teacher. `align_offsets` is checked against a brute-force double loop on
random tokenizations with split characters and gaps.
"""

from __future__ import annotations

import os
import sysconfig
from types import SimpleNamespace

import numpy as np
import pytest

from jdistill.data.cross_tokenizer import (align_offsets, complete_positions,
                                           cross_tokenized_windows)
from jdistill.hf import load_tokenizer

FIXTURE = os.path.join(os.path.dirname(os.path.dirname(__file__)),
                       "fixtures", "hf", "tokenizer")
LIB = sysconfig.get_paths()["stdlib"]
UNICODE = "héllo wörld 日本語 ünïcödé ✓ done\nnaïve café — x"


def _read(name):
  with open(os.path.join(LIB, name), encoding="utf-8") as f:
    return f.read()


@pytest.fixture(scope="module")
def student():
  return load_tokenizer(FIXTURE)


@pytest.fixture(scope="module")
def teacher():
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator(
      [_read("argparse.py"), _read("difflib.py")],
      trainers.BpeTrainer(vocab_size=600, show_progress=False,
                          initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  return tok


def _brute(s, t):
  s_ok, t_ok = complete_positions(s), complete_positions(t)
  out = np.full(len(s), -1, np.int32)
  for i in range(len(s)):
    if not s_ok[i]:
      continue
    for j in range(len(t)):
      if t_ok[j] and t[j][1] == s[i][1]:
        out[i] = j  # The last match.
  return out


def _random_offsets(rng, length):
  """A random tokenization of ``length`` characters: tokens of 1-4
  characters, some characters split into 2-3 byte tokens with equal
  offsets, some characters dropped (gaps), zero-length tokens."""
  offs, c = [], 0
  if rng.random() < 0.5:
    offs.append((0, 0))
  while c < length:
    r = rng.random()
    if r < 0.15:
      offs += [(c, c + 1)] * int(rng.integers(2, 4))
      c += 1
    elif r < 0.2:
      c += 1  # A dropped character.
    elif r < 0.23:
      offs.append((c, c))
    else:
      n = int(rng.integers(1, 5))
      offs.append((c, min(c + n, length)))
      c += n
  return np.asarray(offs, np.int64).reshape(-1, 2)


def test_align_offsets_matches_brute_force():
  rng = np.random.default_rng(0)
  aligned = 0
  for _ in range(300):
    length = int(rng.integers(1, 60))
    s, t = _random_offsets(rng, length), _random_offsets(rng, length)
    got = align_offsets(s, t)
    assert got.dtype == np.int32 and got.shape == (len(s),)
    np.testing.assert_array_equal(got, _brute(s, t))
    aligned += int((got >= 0).sum())
  assert aligned > 1000


def test_align_offsets_examples():
  np.testing.assert_array_equal(
      align_offsets([(0, 2), (2, 5), (5, 6)], [(0, 3), (3, 5), (5, 6)]),
      [-1, 1, 2])
  # Byte-split character (1, 2) twice: only its last token is complete.
  s = [(0, 1), (1, 2), (1, 2), (2, 3)]
  np.testing.assert_array_equal(complete_positions(s), [1, 0, 1, 1])
  np.testing.assert_array_equal(align_offsets(s, [(0, 2), (2, 3)]),
                                [-1, -1, 0, 1])
  np.testing.assert_array_equal(align_offsets(s, s), [0, -1, 2, 3])
  assert align_offsets([], [(0, 1)]).shape == (0,)
  np.testing.assert_array_equal(align_offsets([(0, 1)], []), [-1])


def test_split_characters_of_a_byte_level_tokenizer(student):
  enc = student.encode(UNICODE, add_special_tokens=False)
  offs = np.asarray(enc.offsets)
  complete = complete_positions(offs)
  # Every incomplete token shares its offsets with the next one, and some
  # characters are split (the fixture tokenizer is byte-level).
  assert (~complete).sum() > 5
  np.testing.assert_array_equal(offs[:-1][~complete[:-1]],
                                offs[1:][~complete[:-1]])
  # Self-alignment: the identity on complete positions, -1 elsewhere.
  got = align_offsets(offs, offs)
  np.testing.assert_array_equal(
      got, np.where(complete, np.arange(len(offs)), -1))


def _texts():
  return [_read(n) for n in ("textwrap.py", "json/__init__.py", "string.py",
                             "heapq.py")] + [UNICODE, ""]


def test_windows_shapes_and_student_tokens(student, teacher):
  texts = _texts()
  out = cross_tokenized_windows(texts, student, teacher, seq_len=32,
                                student_bos_id=1, student_eos_id=2)
  x, y, mask, tx, idx = (out[k] for k in ("x", "y", "token_mask",
                                          "teacher_x", "teacher_index"))
  n = out["stats"]["windows"]
  assert x.shape == y.shape == mask.shape == idx.shape == (n, 32)
  assert x.dtype == y.dtype == tx.dtype == idx.dtype == np.int32
  assert tx.shape[1] % 8 == 0
  # Concatenating the windows gives back each document's student tokens.
  docs, w = [t for t in texts if t], 0
  for text in docs:
    ids = [1] + student.encode(text, add_special_tokens=False).ids + [2]
    got = []
    while len(got) < len(ids):
      k = int(mask[w].sum())
      np.testing.assert_array_equal(x[w, 1:k], y[w, :k - 1])
      got += list(x[w, :k]) + [int(y[w, k - 1])]
      w += 1
    assert got == ids
  assert w == n
  assert np.all(idx[~mask] == -1)
  assert np.all(idx < tx.shape[1])
  stats = out["stats"]
  assert stats["targets"] == mask.sum() and stats["aligned"] == (idx >= 0).sum()
  assert 0.5 < stats["fraction_aligned"] < 0.9
  assert 0.3 < stats["teacher_tokens_per_byte"] < stats[
      "student_tokens_per_byte"] < 1.0


def test_aligned_pairs_read_the_same_text(student, teacher):
  texts = [_read("heapq.py")[:6000], UNICODE]
  out = cross_tokenized_windows(texts, student, teacher, seq_len=24)
  docs = [t for t in texts if t]
  w = 0
  for text in docs:
    enc = student.encode(text, add_special_tokens=False)
    for k0 in range(0, len(enc.ids) - 1, 25):
      n_in = min(24, len(enc.ids) - 1 - k0)
      c0 = enc.offsets[k0][0]
      span = text[c0:enc.offsets[k0 + n_in - 1][1]]
      t_enc = teacher.encode(span, add_special_tokens=False)
      np.testing.assert_array_equal(out["teacher_x"][w, :len(t_enc.ids)],
                                    t_enc.ids)
      assert np.all(out["teacher_x"][w, len(t_enc.ids):] == 0)
      for i, j in enumerate(out["teacher_index"][w, :n_in]):
        if j >= 0:  # Same prefix text, ending on a complete character.
          assert c0 + t_enc.offsets[j][1] == enc.offsets[k0 + i][1]
          if (i + w) % 5:
            continue  # Decoding every pair is slow: check one in five.
          s_prefix = student.decode(enc.ids[k0:k0 + i + 1])
          t_prefix = teacher.decode(t_enc.ids[:j + 1])
          assert s_prefix == t_prefix, (s_prefix, t_prefix)
      w += 1
  assert w == out["stats"]["windows"]


def test_teacher_bos_truncation_and_determinism(student, teacher):
  texts = _texts()[:2]
  a = cross_tokenized_windows(texts, student, teacher, seq_len=16,
                              student_bos_id=1, teacher_bos_id=5,
                              teacher_pad_id=7)
  b = cross_tokenized_windows(texts, student, teacher, seq_len=16,
                              student_bos_id=1, teacher_bos_id=5,
                              teacher_pad_id=7)
  for k in ("x", "y", "token_mask", "teacher_x", "teacher_index"):
    np.testing.assert_array_equal(a[k], b[k])
  assert a["stats"] == b["stats"]
  # BOS aligns with BOS at each document's first window only.
  first = np.flatnonzero(a["x"][:, 0] == 1)
  assert np.all(a["teacher_x"][first, 0] == 5)
  assert np.all(a["teacher_index"][first, 0] == 0)
  assert np.any(a["teacher_x"] == 7)
  short = cross_tokenized_windows(texts, student, teacher, seq_len=16,
                                  teacher_seq_len=6)
  assert short["teacher_x"].shape[1] == 6
  assert np.all(short["teacher_index"] < 6)
  assert short["stats"]["teacher_truncated"] > 0


def test_window_starting_inside_a_character_is_dropped(student):
  text = "日本語" * 40
  enc = student.encode(text, add_special_tokens=False)
  complete = complete_positions(enc.offsets)
  out = cross_tokenized_windows([text], student, student, seq_len=4)
  for w, k0 in enumerate(range(0, len(enc.ids) - 1, 5)):
    if not complete[k0 - 1] if k0 else False:
      assert np.all(out["teacher_index"][w] == -1)
    else:
      n_in = int(out["token_mask"][w].sum())
      np.testing.assert_array_equal(
          out["teacher_index"][w, :n_in] >= 0, complete[k0:k0 + n_in])


def test_errors(student, teacher):
  with pytest.raises(ValueError, match="seq_len must be >= 2, got 1"):
    cross_tokenized_windows(["abc"], student, teacher, seq_len=1)

  class Misaligned:  # Every token ends at character 0.
    def encode_batch(self, texts, add_special_tokens=False):
      return [SimpleNamespace(ids=[3] * len(t), offsets=[(0, 0)] * len(t))
              for t in texts]

  with pytest.raises(ValueError, match="align no position"):
    cross_tokenized_windows(["some text here"], student, Misaligned(),
                            seq_len=4)


def test_a_megabyte_in_seconds(student, teacher):
  import time
  texts, size = [], 0
  for name in sorted(os.listdir(LIB)):
    if name.endswith(".py") and size < 1_000_000:
      texts.append(_read(name))
      size += len(texts[-1])
  start = time.perf_counter()
  out = cross_tokenized_windows(texts, student, teacher, seq_len=128)
  assert time.perf_counter() - start < 30  # About 3.5 s on 2 shared cores.
  assert 0.5 < out["stats"]["fraction_aligned"] < 0.8
