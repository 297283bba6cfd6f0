"""Computes reference values of logit distillation losses with PyTorch.

Writes ``tests/fixtures/logit_reference.npz`` (inputs, losses, gradients) and
``tests/fixtures/logit_reference.json`` (versions, constructor arguments,
cases), which ``tests/losses/test_losses_reference.py`` compares jdistill against
without needing torch. Run from the repository root:

    pip install -r benchmarks/reference/requirements.txt  # see the README
    python benchmarks/reference/make_logit_fixtures.py

References used:

* ``torchdistill.losses.mid_level.KDLoss``, ``DISTLoss`` and
  ``LogitStdKDLoss`` from the installed ``torchdistill`` package (imported
  as the ``mid_level`` module; it needs no torchvision, so nothing is stubbed).
* DKD: ``mdistiller`` (megvii-research) is not on PyPI and torchdistill has no
  DKD loss, so ``mdistiller_dkd_loss`` below is a TRANSCRIPTION, written here,
  of ``mdistiller/distillers/DKD.py::dkd_loss`` (Zhao et al., CVPR 2022),
  not the package: softmax at temperature T; TCKD is the KL between the binary
  distributions [p_gt, sum of the other p] (log taken of the student's); NCKD is
  the KL between softmaxes of ``logits / T - 1000 * gt_mask`` (mdistiller's way
  of removing the target class); each KL is summed over the batch
  (``size_average=False``, i.e. ``reduction='sum'``), times T**2, divided by the
  batch size; the result is ``alpha * TCKD + beta * NCKD``.

Inputs are drawn in float32 with a seeded numpy generator and the float64
references are computed on exactly those values (upcast), so float64 and float32
results differ only by arithmetic, not by input rounding.
"""

from __future__ import annotations

import sys

import numpy as np
import torch
import torch.nn.functional as F

from torchdistill.losses import mid_level as td

from fixture_io import package_versions, write_fixture

FIXTURE = "logit_reference"  # tests/fixtures/logit_reference.{npz,json}

SEED = 20240601
# (batch, classes, logit scale, temperature)
CASES = [
    (b, c, scale, temp)
    for (b, c) in ((8, 10), (16, 100))
    for scale in (1.0, 10.0)
    for temp in (1.0, 4.0)
]

PATH, IO = ".", "output"  # torchdistill io-dict addressing of the logits


def io(x):
  return {PATH: {IO: x}}


# ---- Constructor arguments (besides the io-dict paths), per temperature. ----


def kd_soft_args(temp):
  # alpha=0 -> forward returns the bare KLDivLoss(batchmean) soft loss
  # (no T**2).  alpha=None is not usable: __init__ computes 1 - alpha.
  return dict(temperature=temp, alpha=0.0, reduction="batchmean")


def kd_combined_args(temp):
  # torchdistill's usual KD setting: alpha=0.5, beta defaults to 1 - alpha.
  return dict(temperature=temp, alpha=0.5, reduction="batchmean")


def dist_args(temp):
  return dict(beta=1.0, gamma=1.0, tau=temp, eps=1e-8)


def dist_b1g2_args(temp):
  # Unequal weights so that swapping inter/intra would be detected.
  return dict(beta=1.0, gamma=2.0, tau=temp, eps=1e-8)


def lskd_soft_args(temp):
  return dict(temperature=temp, eps=1e-7, alpha=0.0, reduction="batchmean")


def lskd_combined_args(temp):
  # The class docstring's YAML example: alpha=0.5, beta=9, batchmean.
  return dict(temperature=temp, eps=1e-7, alpha=0.5, beta=9.0,
              reduction="batchmean")


def dkd_args(temp):
  # mdistiller's CIFAR-100 DKD config: ALPHA=1.0, BETA=8.0 (T from the case).
  return dict(alpha=1.0, beta=8.0, temperature=temp)


# ---- DKD transcription (see module docstring). ----


def mdistiller_dkd_loss(logits_student, logits_teacher, target, alpha, beta,
                        temperature):
  gt_mask = F.one_hot(target, logits_student.shape[1]).bool()
  other_mask = ~gt_mask

  def binary(p):
    return torch.stack([(p * gt_mask).sum(1), (p * other_mask).sum(1)], dim=1)

  p_s = binary(F.softmax(logits_student / temperature, dim=1))
  p_t = binary(F.softmax(logits_teacher / temperature, dim=1))
  tckd = (F.kl_div(torch.log(p_s), p_t, reduction="sum")
          * temperature**2 / target.shape[0])
  offset = 1000.0 * gt_mask
  log_q_s = F.log_softmax(logits_student / temperature - offset, dim=1)
  q_t = F.softmax(logits_teacher / temperature - offset, dim=1)
  nckd = (F.kl_div(log_q_s, q_t, reduction="sum")
          * temperature**2 / target.shape[0])
  return alpha * tckd + beta * nckd


# ---- Reference losses: name -> (constructor args fn, callable). ----


def _td_loss(cls, args_fn, with_targets):
  def fn(s, t, y, temp):
    mod = cls(PATH, IO, PATH, IO, **args_fn(temp))
    if with_targets:
      return mod(io(s), io(t), y)
    return mod(io(s), io(t))
  return fn


def _dkd(s, t, y, temp):
  return mdistiller_dkd_loss(s, t, y, **dkd_args(temp))


LOSSES = {
    "kd_soft": ("torchdistill.losses.mid_level.KDLoss", kd_soft_args,
                _td_loss(td.KDLoss, kd_soft_args, True)),
    "kd_combined": ("torchdistill.losses.mid_level.KDLoss", kd_combined_args,
                    _td_loss(td.KDLoss, kd_combined_args, True)),
    "lskd_soft": ("torchdistill.losses.mid_level.LogitStdKDLoss",
                  lskd_soft_args,
                  _td_loss(td.LogitStdKDLoss, lskd_soft_args, True)),
    "lskd_combined": ("torchdistill.losses.mid_level.LogitStdKDLoss",
                      lskd_combined_args,
                      _td_loss(td.LogitStdKDLoss, lskd_combined_args, True)),
    "dist": ("torchdistill.losses.mid_level.DISTLoss", dist_args,
             _td_loss(td.DISTLoss, dist_args, False)),
    "dist_b1g2": ("torchdistill.losses.mid_level.DISTLoss", dist_b1g2_args,
                  _td_loss(td.DISTLoss, dist_b1g2_args, False)),
    "dkd": ("transcription of mdistiller/distillers/DKD.py::dkd_loss "
            "(mdistiller is not on PyPI)", dkd_args, _dkd),
}


# Gradients are stored for these only (fixture size); the combined KD losses
# add a hard-label CE whose gradient is elementary, and dist_b1g2 differs from
# dist only in a weight.
GRAD_LOSSES = ("kd_soft", "lskd_soft", "dist", "dkd")


def make_inputs(rng, batch, classes, scale):
  base = rng.standard_normal((batch, classes))
  noise = rng.standard_normal((batch, classes))
  student = (scale * base).astype(np.float32)
  # Teacher correlated with the student (correlation 0.6) so the losses are
  # neither ~0 nor the independent-logits extreme.
  teacher = (scale * (0.6 * base + 0.8 * noise)).astype(np.float32)
  labels = rng.integers(0, classes, size=batch).astype(np.int32)
  return student, teacher, labels


def evaluate(fn, s_np, t_np, y_np, temp, dtype):
  s = torch.tensor(s_np, dtype=dtype, requires_grad=True)
  t = torch.tensor(t_np, dtype=dtype)
  y = torch.tensor(y_np, dtype=torch.long)
  loss = fn(s, t, y, temp)
  (grad,) = torch.autograd.grad(loss, s)
  return loss.item(), grad.numpy()


def main():
  torch.use_deterministic_algorithms(True)
  rng = np.random.default_rng(SEED)
  arrays = {}
  cases_meta = []
  for i, (batch, classes, scale, temp) in enumerate(CASES):
    key = f"case{i}"
    s, t, y = make_inputs(rng, batch, classes, scale)
    arrays[f"{key}/student"] = s
    arrays[f"{key}/teacher"] = t
    arrays[f"{key}/labels"] = y
    cases_meta.append(dict(
        key=key, batch=batch, classes=classes, logit_scale=scale,
        temperature=temp,
        description=(
            f"student = {scale:g} * N(0,1); teacher = {scale:g} * (0.6 * z + "
            f"0.8 * N(0,1)) with z the student's normal draw; labels uniform "
            f"in [0, {classes}); [{batch}, {classes}] float32 inputs, "
            f"temperature {temp:g}"),
        constructor_args={name: args_fn(temp)
                          for name, (_, args_fn, _) in LOSSES.items()},
    ))
    for name, (_, _, fn) in LOSSES.items():
      v64, g64 = evaluate(fn, s, t, y, temp, torch.float64)
      v32, _ = evaluate(fn, s, t, y, temp, torch.float32)
      arrays[f"{key}/{name}/f64"] = np.float64(v64)
      arrays[f"{key}/{name}/f32"] = np.float32(v32)
      if name in GRAD_LOSSES:
        # Gradients of the float64 computation, stored as float32 to keep the
        # fixture small (relative rounding 6e-8, far below the tolerances).
        arrays[f"{key}/{name}/grad_student"] = g64.astype(np.float32)

  meta = dict(
      generator="benchmarks/reference/make_logit_fixtures.py",
      seed=SEED,
      versions=package_versions(torchdistill=True),
      references={name: ref for name, (ref, _, _) in LOSSES.items()},
      torchdistill_call=(
          "cls(student_module_path='.', student_module_io='output', "
          "teacher_module_path='.', teacher_module_io='output', **args); "
          "KD/LogitStd losses are called as forward({'.': {'output': s}}, "
          "{'.': {'output': t}}, labels), DISTLoss without labels"),
      notes=[
          "f64 values: torch float64 on the float32 inputs upcast; f32 values: "
          "torch float32; grad_student: d(loss)/d(student logits) from torch "
          "autograd in float64, stored as float32, for "
          + ", ".join(GRAD_LOSSES) + " only.",
          "KDLoss(alpha=None, beta=None) raises TypeError (1 - None) in "
          "torchdistill 1.1.5, so the soft-only reference uses alpha=0.0, "
          "for which forward returns the KLDivLoss('batchmean') value WITHOUT "
          "the T**2 factor.",
          "dkd is a transcription of mdistiller's dkd_loss (mdistiller is not "
          "on PyPI; torchdistill has no DKD loss).",
          "DISTLoss uses torch.nn.functional.cosine_similarity, which divides "
          "by max(|a|, eps) * max(|b|, eps) (checked in torch 2.13), not by "
          "|a| |b| + eps as hunto/DIST_KD's own cosine_similarity does.",
          "LogitStdKDLoss standardizes with torch.Tensor.std (unbiased, "
          "ddof=1) and eps=1e-7 added to the std; its hard-label CE uses the "
          "raw (unstandardized) student logits.",
      ],
      cases=cases_meta,
  )
  write_fixture(FIXTURE, arrays, meta)


if __name__ == "__main__":
  sys.exit(main())
