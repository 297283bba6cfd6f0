"""Computes reference values of TAID and BD-KD with PyTorch, from the authors' code.

Writes ``tests/fixtures/taid_bdkd_reference.npz`` (inputs, losses, gradients,
schedule trajectories) and ``tests/fixtures/taid_bdkd_reference.json``
(versions, the source of each reference, constructor arguments, cases), which
``tests/losses/test_losses_reference_taid_bdkd.py`` compares jdistill against without
needing torch. Run from the repository root (CPU is enough):

    pip install torch==2.13.0
    python benchmarks/reference/make_taid_bdkd_fixtures.py

Neither reference is a package, so both are TRANSCRIPTIONS written here (not
copies) that follow the authors' functions op by op. The sources were read in
the stored public-code index:

TAID (Shing et al., ICLR 2025), official code ``SakanaAI/TAID``. The index
holds only the README of ``SakanaAI/TAID`` (commit
a0628922c16169d1fca10ddf61849e0693289cf8), so the code was read in two forks
(that they match the official code is assumed, not checked):

* ``src/distil_losses/taid.py`` (``class TAID``: ``__init__``, ``update_t``,
  ``compute_loss``, ``forward``) from ``Rumia-Channel/TAID`` at commit
  5699a2a1654c1e194e782a3547115b2234c65122;
* ``src/distil_losses/fkl.py`` (``forward_kl``, which ``compute_loss``
  calls) from ``ohashi3399/TAID`` (the index returned this file without a
  commit; the fork's other ``src/distil_losses`` files and ``src/loss.py``
  are at commit 12c78335af20c6fce034569e0736a4b4f8d5a2fd);
* ``src/loss.py`` (``KDLoss.forward``: how ``mask`` is built) from
  ``ohashi3399/TAID`` at commit 12c78335af20c6fce034569e0736a4b4f8d5a2fd.

BD-KD (Amara et al., 2022): the ``bdkd`` function of ``ghwang-s/abkd``
``distillation_llm/distillm/losses.py`` at commit
0a1b43013e3e8b817693f16aaf6bccb84439d0ba (the function is identical at
71d54613c3c405fd44bf2724f62298afa73858a1).

Steps transcribed
-----------------

``TAID.__init__(t_start, t_end, alpha, beta, disable_adaptive)``: asserts
``0 <= t_start < 1``, ``0 < t_end <= 1``, ``0 <= alpha <= 1``; registers
0-dim **float32** buffers ``t = t_start``, ``prev_loss = inf``,
``momentum = 0``.

``TAID.update_t(loss, global_step, num_train_steps)`` (``loss`` is
``compute_loss(...).detach().clone()``, ``global_step`` Lightning's
``trainer.global_step``, ``num_train_steps`` its
``estimated_stepping_batches``):

1. if ``isinf(prev_loss)``: ``prev_loss = loss``; return ``None`` (``t`` and
   ``momentum`` unchanged);
2. ``relative_change = (prev_loss - loss) / (prev_loss + 1e-15)`` (tensors);
3. ``momentum = beta * momentum + (1 - beta) * relative_change``;
4. ``adaptive_delta = sigmoid(momentum)``;
5. ``progress = global_step / num_train_steps`` (Python float);
   ``t_target = t_start + (t_end - t_start) * progress`` (Python float);
6. ``delta_t = alpha * adaptive_delta * (1 - t)`` (tensor);
7. ``t = min(t_end, max(t_target, t + delta_t))`` with Python's builtin
   ``min``/``max`` (mixing floats and 0-dim tensors), or ``t = t_target`` if
   ``disable_adaptive`` (no clipping to ``t_end``);
8. a Python-float result is turned into a tensor of the buffer's dtype;
   ``t``, ``prev_loss = loss`` are stored; ``delta_t`` is returned.

``TAID.compute_loss(logits, teacher_logits, mask)``:

1. ``p_t = (1 - t) * logits.detach() + t * teacher_logits`` (``t`` the
   float32 buffer; logit-space interpolation, student detached);
2. ``p_t = softmax(p_t, dim=-1, dtype=float32)``;
3. ``forward_kl(logits, teacher_logits, mask, teacher_probs=p_t)``:
   ``student_logprobs = log_softmax(logits, dim=-1, dtype=float32)``;
   ``inf_mask = isinf(logits)`` (student only);
   ``prod = masked_fill(p_t * student_logprobs, inf_mask, 0)``;
   ``x = sum(prod, dim=-1).view(-1)``;
   ``loss = -sum(x * mask.view(-1)) / sum(mask.view(-1))``
   -- the CROSS-ENTROPY ``-sum_k p_t log q_s`` (no ``p_t log p_t`` term),
   averaged over the tokens selected by ``mask``. ``mask`` is built in
   ``KDLoss.forward`` as ``(labels != -100).int()`` (there shifted by one
   position together with the logits, which is the caller's business and is
   not reproduced: here ``labels`` are already aligned with the logits).

``bdkd(logits, teacher_logits, no_model_batch)`` (ABKD):

1. ``entropy(z) = -sum(softmax(z) * log(softmax(z) + 1e-9), dim=-1)``
   (softmax in the input dtype, no ``dtype=`` argument) for the student and
   the teacher;
2. ``weight_student = where(H_s > H_t, 3.0, 1.0)``,
   ``weight_teacher = where(H_t > H_s, 3.0, 1.0)`` (3.0 hard-coded; the
   comments say 2);
3. forward term: ``teacher_probs = softmax(teacher_logits, float32)``,
   ``inf_mask = isinf(logits)``,
   ``prod = masked_fill(teacher_probs * log_softmax(logits, float32),
   inf_mask, 0)``, ``x = sum(prod, -1).view(-1)``,
   ``mask = (label != -100).int()``,
   ``loss1 = -sum(x * mask * weight_teacher) / sum(mask)``
   -- a cross-entropy, weighted;
4. reverse term: ``inf_mask = isinf(teacher_logits) | isinf(logits)``,
   ``prod = masked_fill(p_s * log p_t, inf_mask, 0)
   - masked_fill(p_s * log p_s, inf_mask, 0)`` (all in float32),
   ``x = sum(prod, -1).view(-1)``,
   ``loss2 = -sum(x * mask * weight_student) / sum(mask)``
   -- ``KL(p_s || p_t)``, weighted;
5. return ``loss1 + loss2``.

Dtypes: the authors' ``dtype=torch.float32`` arguments upcast bf16 model
logits. The float32 run below ("f32") uses them as written. For the float64
reference ("f64") that compute dtype is float64 instead (otherwise the run
would silently be float32); everything else, including TAID's float32 ``t``
buffer, is as in the authors' code. Inputs are drawn in float32 with a seeded
numpy generator and upcast for the f64 run.

Schedule runs: each ``update_t`` trajectory is run with the authors' float32
buffers ("f32", their exact arithmetic) and with float64 buffers ("f64").

Known behaviours of the reference code recorded here (see the JSON notes):
with ``-inf`` logits (e.g. vocabulary padding) ABKD's ``bdkd`` returns a
finite value but an all-NaN gradient on every token that has a ``-inf``
logit (the masked ``0 * -inf`` products still back-propagate ``0 * -inf``);
TAID's ``compute_loss`` returns NaN at ``t = 1`` when a student logit is
``-inf`` (``(1 - t) * -inf = 0 * -inf``).
"""

from __future__ import annotations

import math
import sys

import numpy as np
import torch
import torch.nn.functional as F

from fixture_io import package_versions, write_fixture

FIXTURE = "taid_bdkd_reference"  # tests/fixtures/taid_bdkd_reference.{npz,json}

SEED = 20250123
IGNORE = -100  # the label value that ``(labels != -100)`` masks out

SOURCES = {
    "taid": dict(
        paper="Shing, Misaki, Bao, Yokoi, Akiba. TAID: Temporally Adaptive "
              "Interpolated Distillation for Efficient Knowledge Transfer in "
              "Language Models. ICLR 2025. arXiv:2501.16937",
        official_repo="SakanaAI/TAID",
        official_repo_commit_read="a0628922c16169d1fca10ddf61849e0693289cf8 "
                                  "(README.md only is in the index)",
        files=[
            dict(repo="Rumia-Channel/TAID", path="src/distil_losses/taid.py",
                 commit="5699a2a1654c1e194e782a3547115b2234c65122",
                 functions="TAID.__init__, TAID.update_t, TAID.compute_loss, "
                           "TAID.forward"),
            dict(repo="ohashi3399/TAID", path="src/distil_losses/fkl.py",
                 commit="not returned by the index (fork's other "
                        "src/distil_losses files at "
                        "12c78335af20c6fce034569e0736a4b4f8d5a2fd)",
                 functions="forward_kl"),
            dict(repo="ohashi3399/TAID", path="src/loss.py",
                 commit="12c78335af20c6fce034569e0736a4b4f8d5a2fd",
                 functions="KDLoss.forward (mask = (labels != -100).int())"),
        ],
    ),
    "bdkd": dict(
        paper="Amara, Sepahvand, Meyer, Gross, Clark. BD-KD: Balancing the "
              "Divergences for Online Knowledge Distillation. "
              "arXiv:2212.12965",
        files=[
            dict(repo="ghwang-s/abkd",
                 path="distillation_llm/distillm/losses.py",
                 commit="0a1b43013e3e8b817693f16aaf6bccb84439d0ba",
                 also_identical_at="71d54613c3c405fd44bf2724f62298afa73858a1",
                 functions="bdkd"),
        ],
    ),
}


# ---------------------------------------------------------------------------
# TAID transcription.
# ---------------------------------------------------------------------------


class TaidReference(torch.nn.Module):
  """Transcription of SakanaAI's ``TAID`` (see the module docstring).

  ``buffer_dtype`` is float32 in the authors' code; ``compute_dtype`` stands
  for their ``dtype=torch.float32`` softmax arguments.
  """

  def __init__(self, t_start=0.4, t_end=1.0, alpha=5e-4, beta=0.99,
               disable_adaptive=False, buffer_dtype=torch.float32,
               compute_dtype=torch.float32):
    super().__init__()
    assert 0.0 <= t_start < 1.0
    assert 0.0 < t_end <= 1.0
    assert 0.0 <= alpha <= 1.0
    self.t_start, self.t_end = t_start, t_end
    self.alpha, self.beta = alpha, beta
    self.disable_adaptive = disable_adaptive
    self.compute_dtype = compute_dtype
    self.register_buffer("t", torch.tensor(t_start, dtype=buffer_dtype))
    self.register_buffer("prev_loss",
                         torch.tensor(float("inf"), dtype=buffer_dtype))
    self.register_buffer("momentum", torch.zeros([], dtype=buffer_dtype))

  def update_t(self, loss, global_step, num_train_steps):
    # Step 1: the first call only stores the loss.
    if torch.isinf(self.prev_loss):
      self.prev_loss = loss
      return None
    # Steps 2-4.
    rel = (self.prev_loss - loss) / (self.prev_loss + 1e-15)
    self.momentum = self.beta * self.momentum + (1 - self.beta) * rel
    sig = torch.sigmoid(self.momentum)
    # Step 5: Python floats.
    progress = global_step / num_train_steps
    target = self.t_start + (self.t_end - self.t_start) * progress
    # Step 6.
    delta = self.alpha * sig * (1 - self.t)
    # Step 7: Python's builtin max/min on a float and a 0-dim tensor.
    if self.disable_adaptive:
      new_t = target
    else:
      new_t = min(self.t_end, max(target, self.t + delta))
    # Step 8.
    if not isinstance(new_t, torch.Tensor):
      new_t = torch.tensor(new_t, dtype=self.t.dtype)
    self.t = new_t
    self.prev_loss = loss
    return delta

  def compute_loss(self, logits, teacher_logits, mask):
    # Steps 1-2: interpolated target, student detached.
    mix = (1 - self.t) * logits.detach() + self.t * teacher_logits
    target = F.softmax(mix, dim=-1, dtype=self.compute_dtype)
    # Step 3: DistiLLM-style forward_kl with the given teacher probs.
    log_q = F.log_softmax(logits, dim=-1, dtype=self.compute_dtype)
    student_inf = torch.isinf(logits)
    per_class = torch.masked_fill(target * log_q, student_inf, 0)
    per_token = per_class.sum(dim=-1).view(-1)
    flat_mask = mask.view(-1)
    return -torch.sum(per_token * flat_mask, dim=0) / torch.sum(flat_mask, dim=0)


# ---------------------------------------------------------------------------
# BD-KD transcription (ABKD's ``bdkd``).
# ---------------------------------------------------------------------------


def abkd_bdkd(logits, teacher_logits, labels, compute_dtype=torch.float32):
  """Transcription of ghwang-s/abkd ``bdkd`` (see the module docstring)."""

  # Step 1: entropies with log(p + 1e-9), softmax in the input dtype.
  def token_entropy(z):
    p = F.softmax(z, dim=-1)
    return -torch.sum(p * torch.log(p + 1e-9), dim=-1)

  h_student = token_entropy(logits)
  h_teacher = token_entropy(teacher_logits)
  # Step 2: hard-coded 3.0 / 1.0 weights.
  w_student = torch.where(h_student > h_teacher, 3.0, 1.0)
  w_teacher = torch.where(h_teacher > h_student, 3.0, 1.0)
  valid = (labels != IGNORE).int()

  # Step 3: weighted cross-entropy -sum p_t log p_s.
  p_teacher = F.softmax(teacher_logits, dim=-1, dtype=compute_dtype)
  log_p_student = F.log_softmax(logits, dim=-1, dtype=compute_dtype)
  cross = torch.masked_fill(p_teacher * log_p_student, torch.isinf(logits), 0)
  cross = cross.sum(dim=-1).view(-1)
  term_fwd = (-torch.sum(cross * valid.view(-1) * w_teacher.view(-1), dim=0)
              / torch.sum(valid.view(-1), dim=0))

  # Step 4: weighted KL(p_s || p_t).
  p_student = F.softmax(logits, dim=-1, dtype=compute_dtype)
  log_p_student = F.log_softmax(logits, dim=-1, dtype=compute_dtype)
  log_p_teacher = F.log_softmax(teacher_logits, dim=-1, dtype=compute_dtype)
  any_inf = torch.isinf(teacher_logits) | torch.isinf(logits)
  rev = torch.masked_fill(p_student * log_p_teacher, any_inf, 0)
  rev = rev - torch.masked_fill(p_student * log_p_student, any_inf, 0)
  rev = rev.sum(dim=-1).view(-1)
  term_rev = (-torch.sum(rev * valid.view(-1) * w_student.view(-1), dim=0)
              / torch.sum(valid.view(-1), dim=0))
  # Step 5.
  return term_fwd + term_rev


BDKD_WEIGHT = 3.0  # hard-coded in ABKD's bdkd


# ---------------------------------------------------------------------------
# Inputs.
# ---------------------------------------------------------------------------


def make_logits(rng, shape, scale):
  """Student ~ scale * N(0,1); teacher correlated with it (0.6), with a
  per-example sharpness factor exp(0.5 N(0,1)) so that the teacher is more
  peaked than the student on some examples and less on others."""
  base = rng.standard_normal(shape)
  noise = rng.standard_normal(shape)
  sharp = np.exp(0.5 * rng.standard_normal(shape[:-1] + (1,)))
  student = (scale * base).astype(np.float32)
  teacher = (scale * sharp * (0.6 * base + 0.8 * noise)).astype(np.float32)
  return student, teacher


def make_labels(rng, shape, vocab):
  """Token labels with -100 on padding: for [B, S], a random number of
  trailing positions (at least one valid token per row) and, in row 0, the
  first position (a prompt token); for [B], two masked examples."""
  labels = rng.integers(0, vocab, size=shape).astype(np.int64)
  if len(shape) == 2:
    b, s = shape
    for i in range(b):
      keep = int(rng.integers(1, s + 1))
      labels[i, keep:] = IGNORE
    labels[0, 0] = IGNORE
    if (labels != IGNORE).sum() == 0:
      labels[0, 0] = 0
  else:
    labels[[1, 5 % shape[0]]] = IGNORE
  return labels


def add_vocab_padding(rng, student, teacher, n_pad):
  """-inf in both logits at the last ``n_pad`` classes of the tokens of the
  first half of the batch (vocabulary padding), plus one random class in
  those tokens; the other tokens stay finite."""
  s, t = student.copy(), teacher.copy()
  half = s.shape[0] // 2
  s[:half, ..., -n_pad:] = -np.inf
  t[:half, ..., -n_pad:] = -np.inf
  flat_s = s[:half].reshape(-1, s.shape[-1])
  flat_t = t[:half].reshape(-1, t.shape[-1])
  cols = rng.integers(0, s.shape[-1] - n_pad, size=flat_s.shape[0])
  flat_s[np.arange(flat_s.shape[0]), cols] = -np.inf
  flat_t[np.arange(flat_t.shape[0]), cols] = -np.inf
  s[:half] = flat_s.reshape(s[:half].shape)
  t[:half] = flat_t.reshape(t[:half].shape)
  return s, t


# (key, shape, logit scale, vocab padding, TAID t values)
LOSS_CASES = [
    ("case0", (4, 6, 11), 1.0, 0, (0.0, 0.4, 0.7, 1.0)),
    ("case1", (4, 6, 11), 10.0, 0, (0.4, 0.7, 1.0)),
    ("case2", (8, 32), 1.0, 0, (0.4, 0.9, 1.0)),
    ("case3", (8, 32), 10.0, 0, (0.4, 0.9, 1.0)),
    ("case4", (4, 6, 11), 1.0, 2, (0.4, 0.7)),
    ("case5", (8, 32), 10.0, 3, (0.4, 0.9)),
]


def _tensors(s_np, t_np, dtype):
  s = torch.tensor(s_np, dtype=dtype, requires_grad=True)
  t = torch.tensor(t_np, dtype=dtype)
  return s, t


def eval_taid(s_np, t_np, labels_np, interp, dtype):
  module = TaidReference(t_start=0.4, compute_dtype=dtype)
  module.t = torch.tensor(interp, dtype=torch.float32)  # the float32 buffer
  s, t = _tensors(s_np, t_np, dtype)
  mask = (torch.tensor(labels_np) != IGNORE).int()
  loss = module.compute_loss(s, t, mask)
  (grad,) = torch.autograd.grad(loss, s)
  return loss.item(), grad.numpy()


def eval_bdkd(s_np, t_np, labels_np, dtype):
  s, t = _tensors(s_np, t_np, dtype)
  loss = abkd_bdkd(s, t, torch.tensor(labels_np), compute_dtype=dtype)
  (grad,) = torch.autograd.grad(loss, s)
  return loss.item(), grad.numpy()


def abkd_entropy_gap(s_np, t_np):
  """min |H_s - H_t| over tokens, with ABKD's log(p + 1e-9) entropies."""
  def h(z):
    z = z.astype(np.float64)
    m = np.max(z, axis=-1, keepdims=True)
    e = np.exp(z - m)
    p = e / e.sum(axis=-1, keepdims=True)
    return -np.sum(p * np.log(p + 1e-9), axis=-1)
  gap = h(s_np) - h(t_np)
  return float(np.min(np.abs(gap))), int(np.sum(gap > 0)), int(np.sum(gap < 0))


# ---------------------------------------------------------------------------
# Schedule trajectories.
# ---------------------------------------------------------------------------

# (key, constructor args, num_train_steps, steps, losses)
def _given_losses(rng, n, start, decay, noise):
  k = np.arange(n)
  vals = start * np.exp(-decay * k) * (1 + noise * rng.standard_normal(n))
  return vals.astype(np.float32)


def make_trajectories(rng):
  out = []
  # Authors' defaults; steps run past num_train_steps (t then equals t_end).
  out.append(("defaults", dict(t_start=0.4, t_end=1.0, alpha=5e-4, beta=0.99,
                               disable_adaptive=False),
              10, np.arange(14), _given_losses(rng, 14, 3.0, 0.05, 0.05)))
  # Large alpha, small beta: the adaptive increase dominates the linear
  # bound; noisy losses give negative relative changes too.
  out.append(("adaptive", dict(t_start=0.2, t_end=0.9, alpha=0.3, beta=0.5,
                               disable_adaptive=False),
              40, np.arange(30), _given_losses(rng, 30, 5.0, 0.03, 0.2)))
  # Loss going up (momentum < 0), non-consecutive steps.
  out.append(("rising", dict(t_start=0.0, t_end=1.0, alpha=0.1, beta=0.9,
                             disable_adaptive=False),
              100, np.array([0, 3, 7, 8, 20, 21, 50, 90, 99, 100, 130]),
              np.linspace(1.0, 2.5, 11).astype(np.float32)))
  # Linear schedule only, past num_train_steps (unclipped in the reference).
  out.append(("linear", dict(t_start=0.3, t_end=0.9, alpha=5e-4, beta=0.99,
                             disable_adaptive=True),
              8, np.arange(12), _given_losses(rng, 12, 2.0, 0.1, 0.05)))
  return out


def run_trajectory(args, num_steps, steps, losses, buffer_dtype):
  module = TaidReference(**args, buffer_dtype=buffer_dtype)
  rec = {k: [] for k in ("t", "momentum", "prev_loss", "delta_t")}
  for step, loss in zip(steps, losses):
    delta = module.update_t(torch.tensor(loss, dtype=buffer_dtype),
                            global_step=int(step), num_train_steps=num_steps)
    rec["t"].append(float(module.t))
    rec["momentum"].append(float(module.momentum))
    rec["prev_loss"].append(float(module.prev_loss))
    rec["delta_t"].append(math.nan if delta is None else float(delta))
  return {k: np.asarray(v, np.float64) for k, v in rec.items()}


COUPLED = dict(args=dict(t_start=0.4, t_end=1.0, alpha=0.05, beta=0.9,
                         disable_adaptive=False),
               num_steps=12, n_steps=10, shape=(2, 5, 11), scale=3.0)


def make_coupled_inputs(rng):
  """A student moving towards the teacher over the steps (new tokens each
  step): student_n = (1 - a_n) * z_n + a_n * teacher_n, a_n = n / n_steps."""
  n, shape, scale = COUPLED["n_steps"], COUPLED["shape"], COUPLED["scale"]
  students, teachers, labels = [], [], []
  for i in range(n):
    s, t = make_logits(rng, shape, scale)
    a = i / n
    students.append(((1 - a) * s + a * t).astype(np.float32))
    teachers.append(t)
    labels.append(make_labels(rng, shape[:-1], shape[-1]))
  return np.stack(students), np.stack(teachers), np.stack(labels)


def run_coupled(students, teachers, labels, dtype, buffer_dtype):
  """TAID.forward, step by step: loss with the current t, then update_t with
  loss.detach().clone(), global_step = n, num_train_steps fixed."""
  module = TaidReference(**COUPLED["args"], buffer_dtype=buffer_dtype,
                         compute_dtype=dtype)
  rec = {k: [] for k in ("t_used", "loss", "t", "momentum")}
  for n in range(students.shape[0]):
    s, t = _tensors(students[n], teachers[n], dtype)
    mask = (torch.tensor(labels[n]) != IGNORE).int()
    rec["t_used"].append(float(module.t))
    loss = module.compute_loss(s, t, mask)
    module.update_t(loss.detach().clone(), global_step=n,
                    num_train_steps=COUPLED["num_steps"])
    rec["loss"].append(loss.item())
    rec["t"].append(float(module.t))
    rec["momentum"].append(float(module.momentum))
  return {k: np.asarray(v, np.float64) for k, v in rec.items()}


# ---------------------------------------------------------------------------


def main():
  torch.use_deterministic_algorithms(True)
  rng = np.random.default_rng(SEED)
  arrays = {}
  cases_meta = []
  for key, shape, scale, n_pad, t_values in LOSS_CASES:
    s, t = make_logits(rng, shape, scale)
    if n_pad:
      s, t = add_vocab_padding(rng, s, t, n_pad)
    labels = make_labels(rng, shape[:-1], shape[-1])
    arrays[f"{key}/student"] = s
    arrays[f"{key}/teacher"] = t
    arrays[f"{key}/labels"] = labels.astype(np.int32)
    gap, n_s_higher, n_t_higher = abkd_entropy_gap(s, t)
    # Keep BD-KD's entropy comparison away from ties (ABKD's 1e-9 shifts the
    # entropies by < V * 1e-9), and exercise both weightings.
    assert gap > 1e-4, (key, gap)
    assert n_s_higher > 0 and n_t_higher > 0, key
    inf_tokens = np.any(np.isinf(s), axis=-1)
    meta = dict(
        key=key, shape=list(shape), logit_scale=scale,
        vocab_padding=n_pad,
        valid_tokens=int((labels != IGNORE).sum()),
        tokens_with_inf=int(inf_tokens.sum()),
        abkd_min_entropy_gap=gap,
        tokens_student_entropy_higher=n_s_higher,
        tokens_teacher_entropy_higher=n_t_higher,
        taid_t=[float(np.float32(v)) for v in t_values],
        description=(
            f"student = {scale:g} * z, teacher = {scale:g} * exp(0.5 g) * "
            f"(0.6 z + 0.8 n), z, n, g standard normal (g per token); "
            f"{list(shape)} float32; labels -100 on padding"
            + (f"; -inf in both logits at the last {n_pad} classes and one "
               f"random class of every token of the first half of the batch"
               if n_pad else "")),
    )
    # TAID at several t (t is the authors' float32 buffer).
    for j, interp in enumerate(t_values):
      interp32 = np.float32(interp)
      v64, g64 = eval_taid(s, t, labels, interp32, torch.float64)
      v32, _ = eval_taid(s, t, labels, interp32, torch.float32)
      arrays[f"{key}/taid/t{j}/t"] = interp32
      arrays[f"{key}/taid/t{j}/f64"] = np.float64(v64)
      arrays[f"{key}/taid/t{j}/f32"] = np.float32(v32)
      arrays[f"{key}/taid/t{j}/grad_student"] = g64.astype(np.float32)
    if n_pad:
      # t = 1 with -inf student logits: (1 - t) * -inf = NaN in the target.
      v, _ = eval_taid(s, t, labels, np.float32(1.0), torch.float64)
      arrays[f"{key}/taid/t_one_with_inf/f64"] = np.float64(v)
      assert math.isnan(v), (key, v)
      meta["taid_t_one_with_inf_value"] = "NaN"
    # BD-KD.
    v64, g64 = eval_bdkd(s, t, labels, torch.float64)
    v32, _ = eval_bdkd(s, t, labels, torch.float32)
    arrays[f"{key}/bdkd/f64"] = np.float64(v64)
    arrays[f"{key}/bdkd/f32"] = np.float32(v32)
    arrays[f"{key}/bdkd/grad_student"] = g64.astype(np.float32)
    nan_rows = np.all(np.isnan(g64), axis=-1)
    meta["bdkd_grad_nan_tokens"] = int(nan_rows.sum())
    assert np.array_equal(nan_rows, inf_tokens), key
    assert not np.any(np.isnan(g64[~inf_tokens])), key
    cases_meta.append(meta)

  traj_meta = []
  for key, args, num_steps, steps, losses in make_trajectories(rng):
    pre = f"traj/{key}"
    arrays[f"{pre}/steps"] = np.asarray(steps, np.int32)
    arrays[f"{pre}/losses"] = np.asarray(losses, np.float32)
    for name, bdt in (("f32", torch.float32), ("f64", torch.float64)):
      rec = run_trajectory(args, num_steps, steps, losses, bdt)
      for k, v in rec.items():
        arrays[f"{pre}/{name}/{k}"] = v
    traj_meta.append(dict(key=key, constructor_args=args,
                          num_train_steps=num_steps,
                          n_updates=int(len(steps))))

  students, teachers, labels = make_coupled_inputs(rng)
  arrays["coupled/student"] = students
  arrays["coupled/teacher"] = teachers
  arrays["coupled/labels"] = labels.astype(np.int32)
  for name, (dt, bdt) in (("f32", (torch.float32, torch.float32)),
                          ("f64", (torch.float64, torch.float64)),
                          ("f64_f32buf", (torch.float64, torch.float32))):
    rec = run_coupled(students, teachers, labels, dt, bdt)
    for k, v in rec.items():
      arrays[f"coupled/{name}/{k}"] = v

  meta = dict(
      generator="benchmarks/reference/make_taid_bdkd_fixtures.py",
      seed=SEED,
      versions=package_versions(),
      references=SOURCES,
      constructor_args=dict(
          taid_loss_cases=dict(
              note="TAID(t_start=0.4) with its float32 buffer t overwritten "
                   "by each case's t before compute_loss(logits, "
                   "teacher_logits, mask=(labels != -100).int())"),
          bdkd=dict(weight=BDKD_WEIGHT,
                    note="bdkd(logits, teacher_logits, {'label': labels}); "
                         "the weight 3.0 is hard-coded"),
          coupled=COUPLED,
      ),
      notes=[
          "f64: the transcription with the authors' dtype=torch.float32 "
          "compute dtype replaced by float64 (float32 inputs upcast); TAID's "
          "t stays the authors' float32 buffer. f32: the authors' dtypes "
          "exactly. grad_student: autograd d(loss)/d(student logits) of the "
          "f64 run, stored as float32.",
          "TAID compute_loss returns the token mean (over mask) of the "
          "cross-entropy -sum_k p_t log q_s, not of KL(p_t || q_s).",
          "ABKD bdkd returns the token mean (over labels != -100) of "
          "w_teacher * CE(p_t, p_s) + w_student * KL(p_s || p_t) with "
          "w = 3 / 1 from log(p + 1e-9) entropies.",
          "Vocabulary padding (-inf in both logits): ABKD bdkd's value is "
          "finite but its gradient is NaN on every token with a -inf logit, "
          "masked (label -100) or not (masked_fill's zero gradient is "
          "multiplied by the -inf log-probability in the backward pass of "
          "p_s * log p_t). Stored as is.",
          "TAID compute_loss at t = 1 with -inf student logits is NaN "
          "((1 - t) * -inf); stored under taid/t_one_with_inf.",
          "Trajectories: update_t fed the given float32 losses at the given "
          "global_step values; f32 = the authors' float32 buffers, f64 = "
          "float64 buffers. t, momentum, prev_loss after each call; delta_t "
          "is update_t's return value (NaN for the first call's None).",
          "coupled: TAID.forward's order (compute_loss with the current t, "
          "then update_t(loss.detach().clone(), global_step=n, "
          "num_train_steps)); t_used is the t the loss was computed with. "
          "f64_f32buf: float64 compute with the authors' float32 buffers.",
      ],
      cases=cases_meta,
      trajectories=traj_meta,
  )
  write_fixture(FIXTURE, arrays, meta)


if __name__ == "__main__":
  sys.exit(main())
