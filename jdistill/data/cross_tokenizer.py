"""Aligning a student and a teacher that use different tokenizers.

Cross-tokenizer distillation (ULD, `jdistill.losses.uld`) compares the
next-token distributions of two models that read the same text cut into
different tokens. This module decides *which* positions are compared and
builds the training windows that carry that decision.

Alignment rule (`align_offsets`). Tokens carry character offsets
``[start, end)`` into the text (``tokenizers.Encoding.offsets``). Student
position ``i`` has read the student tokens ``0..i``, i.e. the text up to
``e_s[i] = end of token i``; teacher position ``j`` the text up to
``e_t[j]``. Position ``i`` is aligned to ``j`` when

* ``e_s[i] == e_t[j]``: both models have read exactly the same text prefix,
  so both predict what follows the same character; and
* both positions end on a *complete* character: a position is incomplete
  when the next token of the same sequence starts before its end
  (``start[k + 1] < end[k]``). Byte-level tokenizers split a multi-byte
  UTF-8 character into several tokens that all carry the offsets of the
  whole character; only the last of them has read the character, the
  others are never aligned. The last token of a sequence counts as
  complete.

Among several teacher positions with the same complete end (zero-length
tokens such as a BOS at ``(0, 0)`` followed by one ending at 0), the last is
taken: it has read everything up to that end. Everything else is dropped
(index ``-1``). The next *targets* are not required to be equal: they are
different tokens by construction (that is what ULD's relabelling-invariant
loss is for); both continue the same text from the same character. One
case where they do not: a tokenizer whose pre-tokenizer drops text (e.g.
``Whitespace``) leaves gaps between offsets, so its "prefix" omits the
dropped characters and its next token starts after them; such pairs are
kept (the prefix ends agree) and the difference is the tokenizer's, not the
alignment's.

Windows (`cross_tokenized_windows`). Each document is tokenized by the
student (``[BOS] + text + [EOS]`` when ids are given, as
`jdistill.data.corpus` does) and cut into consecutive, non-overlapping
windows of ``seq_len + 1`` tokens (never across documents; the last window
of a document is padded, and a window needs at least 2 tokens): ``x = w[:-1]``
and ``y = w[1:]``, ``token_mask`` True where ``y`` is a real token. The
teacher tokenizes exactly the text covered by the window's input tokens
``x`` (from the start of ``x[0]`` to the end of ``x[-1]``), with its BOS in
front only for a window that starts its document. Tokenizing a substring can
differ from tokenizing it in context (a word cut at the window start, a
merge across the window end); the alignment rule only pairs positions that
read the same text, so such differences cost aligned positions, never wrong
pairs. A window whose first token continues a character split by the
previous token (byte-level, mid-character start) has every position
dropped: the student read only part of that character. Teacher windows are
padded to ``teacher_seq_len`` (default: the longest, rounded up to a
multiple of 8) with ``teacher_pad_id``; teacher tokens beyond it are
truncated and student positions aligned to them dropped. The result is
deterministic.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np

__all__ = ["align_offsets", "complete_positions", "cross_tokenized_windows"]


def _offsets(offsets: Any, name: str) -> np.ndarray:
  a = np.asarray(offsets, dtype=np.int64).reshape(-1, 2) if len(
      offsets) else np.zeros((0, 2), np.int64)
  if a.ndim != 2 or a.shape[1] != 2:
    raise ValueError(f"{name} must be [T, 2] (start, end), got shape "
                     f"{np.shape(offsets)}")
  return a


def complete_positions(offsets: Any) -> np.ndarray:
  """Bool ``[T]``: True where the prefix up to token ``k`` ends on a
  complete character (the next token starts at or after ``end[k]``; the
  last token is complete)."""
  a = _offsets(offsets, "offsets")
  complete = np.ones(len(a), bool)
  complete[:-1] = a[1:, 0] >= a[:-1, 1]
  return complete


def align_offsets(student_offsets: Any, teacher_offsets: Any) -> np.ndarray:
  """For each student position, the teacher position with the same prefix.

  Args:
    student_offsets: ``[T_s, 2]`` character offsets ``(start, end)`` of the
      student's tokens, in order.
    teacher_offsets: ``[T_t, 2]`` offsets of the teacher's tokens of the
      same text.

  Returns:
    int32 ``[T_s]``: ``teacher_index[i] = j`` (module docstring) or ``-1``
    where student position ``i`` is dropped.

  Example:
    >>> align_offsets([(0, 2), (2, 5), (5, 6)], [(0, 3), (3, 5), (5, 6)])
    array([-1,  1,  2], dtype=int32)
  """
  s = _offsets(student_offsets, "student_offsets")
  t = _offsets(teacher_offsets, "teacher_offsets")
  out = np.full(len(s), -1, np.int32)
  if not len(s) or not len(t):
    return out
  t_ok = np.nonzero(complete_positions(t))[0]
  ends = t[t_ok, 1]
  if np.any(np.diff(ends) < 0):
    raise ValueError("teacher_offsets must be in text order (non-decreasing "
                     "token ends)")
  k = np.searchsorted(ends, s[:, 1], side="right") - 1  # Last end <= e_s.
  hit = (k >= 0) & complete_positions(s)
  hit[hit] = ends[k[hit]] == s[hit, 1]
  out[hit] = t_ok[k[hit]]
  return out


def _bytes_len(text: str) -> int:
  return len(text.encode("utf-8"))


def cross_tokenized_windows(
    texts: Sequence[str],
    student_tokenizer: Any,
    teacher_tokenizer: Any,
    *,
    seq_len: int,
    teacher_seq_len: Optional[int] = None,
    student_bos_id: Optional[int] = None,
    student_eos_id: Optional[int] = None,
    student_pad_id: int = 0,
    teacher_bos_id: Optional[int] = None,
    teacher_pad_id: int = 0,
) -> dict[str, Any]:
  """Student windows with the teacher's tokens of the same text, aligned.

  Args:
    texts: documents (strings; empty ones are skipped).
    student_tokenizer: a ``tokenizers.Tokenizer`` (``encode_batch`` with
      character ``offsets``; special tokens are not added by it).
    teacher_tokenizer: the teacher's ``tokenizers.Tokenizer``.
    seq_len: student inputs per window (``>= 2``).
    teacher_seq_len: teacher tokens per window; default the longest teacher
      window rounded up to a multiple of 8.
    student_bos_id, student_eos_id: prepended / appended to every document
      (None: none).
    student_pad_id: fills ``x`` and ``y`` after the end of a document.
    teacher_bos_id: prepended to the teacher window of a document's first
      window (None: none).
    teacher_pad_id: fills ``teacher_x`` (0 when the teacher has no pad).

  Returns:
    A dict of numpy arrays, ``N`` windows: ``x``, ``y`` int32 ``[N,
    seq_len]``; ``token_mask`` bool ``[N, seq_len]``; ``teacher_x`` int32
    ``[N, T_t]``; ``teacher_index`` int32 ``[N, seq_len]`` (``-1``:
    dropped, module docstring); and ``stats``, a dict: ``windows``,
    ``targets`` (True in ``token_mask``), ``aligned`` (of them, with a
    teacher position), ``fraction_aligned``, ``teacher_truncated`` (aligned
    positions lost to ``teacher_seq_len``), ``student_tokens_per_byte``,
    ``teacher_tokens_per_byte`` (over the texts the two tokenized, no
    special tokens).

  Raises:
    ValueError: ``seq_len < 2``, or no position aligned at all.
  """
  if seq_len < 2:
    raise ValueError(f"seq_len must be >= 2, got {seq_len}")
  docs = [t for t in texts if t]
  enc = student_tokenizer.encode_batch(docs, add_special_tokens=False)
  windows = []  # (doc, start token k0 in doc tokens, ids [<= seq_len + 1])
  doc_tokens = []
  student_count = sum(len(e.ids) for e in enc)
  student_bytes = sum(_bytes_len(d) for d in docs)
  for d, (text, e) in enumerate(zip(docs, enc)):
    ids = list(e.ids)
    offs = [tuple(o) for o in e.offsets]
    if student_bos_id is not None:
      ids, offs = [student_bos_id] + ids, [(0, 0)] + offs
    if student_eos_id is not None:
      ids, offs = ids + [student_eos_id], offs + [(len(text), len(text))]
    ids = np.asarray(ids, np.int32)
    offs = _offsets(offs, "offsets")
    doc_tokens.append((ids, offs, complete_positions(offs)))
    for k0 in range(0, len(ids) - 1, seq_len + 1):
      windows.append((d, k0))
  spans = []
  for d, k0 in windows:
    ids, offs, _ = doc_tokens[d]
    n_in = min(seq_len, len(ids) - 1 - k0)
    spans.append(docs[d][offs[k0, 0]:offs[k0 + n_in - 1, 1]])
  t_enc = teacher_tokenizer.encode_batch(spans, add_special_tokens=False)
  teacher_count = sum(len(e.ids) for e in t_enc)
  teacher_bytes = sum(_bytes_len(s) for s in spans)
  t_ids, t_offs = [], []
  for (d, k0), e in zip(windows, t_enc):
    c0 = int(doc_tokens[d][1][k0, 0])
    ids = list(e.ids)
    offs = [(a + c0, b + c0) for a, b in e.offsets]
    if teacher_bos_id is not None and k0 == 0:
      ids, offs = [teacher_bos_id] + ids, [(c0, c0)] + offs
    t_ids.append(np.asarray(ids, np.int32))
    t_offs.append(_offsets(offs, "teacher offsets"))
  longest = max((len(i) for i in t_ids), default=1)
  if teacher_seq_len is None:
    teacher_seq_len = max(8, -(-longest // 8) * 8)
  n = len(windows)
  x = np.full((n, seq_len), student_pad_id, np.int32)
  y = np.full((n, seq_len), student_pad_id, np.int32)
  mask = np.zeros((n, seq_len), bool)
  teacher_x = np.full((n, teacher_seq_len), teacher_pad_id, np.int32)
  index = np.full((n, seq_len), -1, np.int32)
  truncated = 0
  for w, (d, k0) in enumerate(windows):
    ids, offs, complete = doc_tokens[d]
    win = ids[k0:k0 + seq_len + 1]
    n_in = len(win) - 1
    x[w, :n_in], y[w, :n_in], mask[w, :n_in] = win[:-1], win[1:], True
    tx = t_ids[w][:teacher_seq_len]
    teacher_x[w, :len(tx)] = tx
    if k0 > 0 and not complete[k0 - 1]:
      continue  # The window starts inside a split character.
    # Completeness from the whole document: the next token may be y[-1].
    s_offs = offs[k0:k0 + n_in]
    j = align_offsets(s_offs, t_offs[w])
    j[~complete[k0:k0 + n_in]] = -1
    over = j >= teacher_seq_len
    truncated += int(over.sum())
    j[over] = -1
    index[w, :n_in] = j
  targets = int(mask.sum())
  aligned = int((index >= 0).sum())
  if aligned == 0:
    raise ValueError(f"the student and teacher tokenizers align no position "
                     f"in {n} windows (no common prefix ends)")
  stats = dict(
      windows=n, targets=targets, aligned=aligned,
      fraction_aligned=aligned / max(targets, 1),
      teacher_truncated=truncated,
      student_tokens_per_byte=student_count / max(student_bytes, 1),
      teacher_tokens_per_byte=teacher_count / max(teacher_bytes, 1))
  return dict(x=x, y=y, token_mask=mask, teacher_x=teacher_x,
              teacher_index=index, stats=stats)
