"""Computes reference values of relational distillation losses with PyTorch.

Writes ``tests/fixtures/relational_reference.npz`` (inputs, losses, autograd
gradients) and ``tests/fixtures/relational_reference.json`` (versions,
constructor arguments, cases, notes), which
``tests/losses/test_losses_reference_relational.py`` compares jdistill against
without needing torch. Run from the repository root:

    pip install torch==2.13.0
    pip install --no-deps torchdistill==1.1.5
    python benchmarks/reference/make_relational_fixtures.py

References used:

* ``torchdistill.losses.mid_level.RKDLoss`` (a refactoring of
  ``lenscloth/RKD`` ``metric/loss.py``), evaluated three times per case:
  ``dist_factor=1, angle_factor=0`` (the distance loss alone: the angle part
  returns 0 when its factor is 0), ``dist_factor=0, angle_factor=1`` (the
  angle loss alone) and ``dist_factor=1, angle_factor=2`` (torchdistill's
  YAML example), all with ``reduction='mean'``.
* ``torchdistill.losses.mid_level.SPKDLoss(reduction='batchmean')``.
* ``torchdistill.losses.mid_level.PKTLoss(eps=1e-7)`` (a refactoring of
  ``passalis/probabilistic_kt`` ``nn/pkt.py::cosine_similarity_loss``), on
  ``[batch, features]`` inputs only (it sums over ``dim=1``, so feature maps
  would not be flattened).
* SP, RepDistiller: ``repdistiller_similarity_loss`` below is a
  TRANSCRIPTION, written here, of ``HobbitLong/RepDistiller``
  ``distiller_zoo/SP.py::Similarity.similarity_loss`` (commit
  ``5237c1fdeeb06b092cd103cc0daa8a2935cba98f``; RepDistiller is not on PyPI):
  flatten to ``[bsz, -1]``, ``G = f f^T``,
  ``torch.nn.functional.normalize(G)`` (defaults ``p=2, dim=1``), and
  ``sum((G_t - G_s)^2) / bsz^2``. It is stored because torchdistill 1.1.5's
  ``SPKDLoss`` calls ``normalize(G, 1)``, whose second positional argument is
  ``p``, not ``dim``: it normalises each row by its L1 norm, unlike the paper
  and RepDistiller (L2).

Inputs are drawn in float32 with a seeded numpy generator and the float64
references are computed on exactly those values (upcast), so float64 and
float32 results differ only by arithmetic, not by input rounding.
"""

from __future__ import annotations

import sys

import numpy as np
import torch
import torch.nn.functional as F

from torchdistill.losses import mid_level as td

from fixture_io import package_versions, write_fixture

FIXTURE = "relational_reference"  # tests/fixtures/relational_reference.*

SEED = 20240611
# (key, student shape, teacher shape, scale, duplicate rows, gradients)
CASES = [
    ("vec_small", (8, 16), (8, 32), 1.0, False, True),
    ("vec_large", (16, 64), (16, 128), 1.0, False, True),
    ("vec_scaled", (12, 24), (12, 24), 10.0, False, True),
    ("fmap", (6, 4, 3, 3), (6, 2, 2, 8), 1.0, False, True),
    # Rows 1 == 3 in the student and 0 == 4 in the teacher: zero distances.
    # Values only: at a zero difference F.normalize has a 1e12 gradient,
    # which jdistill deliberately replaces by 0.
    ("duplicates", (8, 16), (8, 32), 1.0, True, False),
]

IO = "output"
PATH = "."


def io(x):
  return {PATH: {IO: x}}


RKD_ARGS = {
    "rkd_distance": dict(dist_factor=1.0, angle_factor=0.0, reduction="mean"),
    "rkd_angle": dict(dist_factor=0.0, angle_factor=1.0, reduction="mean"),
    "rkd_combined": dict(dist_factor=1.0, angle_factor=2.0,
                         reduction="mean"),
}
SP_ARGS = dict(reduction="batchmean")
PKT_ARGS = dict(eps=1e-7)


def repdistiller_similarity_loss(f_s, f_t):
  """Transcription of RepDistiller ``Similarity.similarity_loss``."""
  bsz = f_s.shape[0]
  f_s = f_s.reshape(bsz, -1)
  f_t = f_t.reshape(bsz, -1)
  g_s = F.normalize(torch.mm(f_s, f_s.t()))
  g_t = F.normalize(torch.mm(f_t, f_t.t()))
  g_diff = g_t - g_s
  return (g_diff * g_diff).sum() / (bsz * bsz)


def _rkd(args):
  def fn(s, t):
    return td.RKDLoss(PATH, PATH, **args)(io(s), io(t))
  return fn


def _spkd(s, t):
  return td.SPKDLoss(PATH, PATH, **SP_ARGS)(io(s), io(t))


def _pkt(s, t):
  return td.PKTLoss(PATH, IO, PATH, IO, **PKT_ARGS)(io(s), io(t))


# name -> (reference description, callable, 2-D inputs only)
LOSSES = {
    "rkd_distance": ("torchdistill.losses.mid_level.RKDLoss",
                     _rkd(RKD_ARGS["rkd_distance"]), False),
    "rkd_angle": ("torchdistill.losses.mid_level.RKDLoss",
                  _rkd(RKD_ARGS["rkd_angle"]), False),
    "rkd_combined": ("torchdistill.losses.mid_level.RKDLoss",
                     _rkd(RKD_ARGS["rkd_combined"]), False),
    "spkd": ("torchdistill.losses.mid_level.SPKDLoss", _spkd, False),
    "sp_repdistiller": (
        "transcription of HobbitLong/RepDistiller distiller_zoo/SP.py "
        "Similarity.similarity_loss (commit 5237c1fd; not on PyPI)",
        repdistiller_similarity_loss, False),
    "pkt": ("torchdistill.losses.mid_level.PKTLoss", _pkt, True),
}


def make_inputs(rng, s_shape, t_shape, scale, duplicates):
  s = rng.standard_normal(s_shape)
  ds = int(np.prod(s_shape[1:]))
  dt = int(np.prod(t_shape[1:]))
  # Teacher: a random linear map of the student plus noise, so that the
  # student and teacher relations are correlated but not equal.
  w = rng.standard_normal((ds, dt)) / np.sqrt(ds)
  t = s.reshape(s_shape[0], ds) @ w + 0.7 * rng.standard_normal(
      (s_shape[0], dt))
  s = (scale * s).astype(np.float32)
  t = (scale * t).reshape(t_shape).astype(np.float32)
  if duplicates:
    s[3] = s[1]
    t[4] = t[0]
  return s, t


def evaluate(fn, s_np, t_np, dtype, grads):
  s = torch.tensor(s_np, dtype=dtype, requires_grad=grads)
  t = torch.tensor(t_np, dtype=dtype, requires_grad=grads)
  loss = fn(s, t)
  if not grads:
    return loss.item(), None, None
  g_s, g_t = torch.autograd.grad(loss, (s, t), allow_unused=True)
  g_t = None if g_t is None else g_t.numpy()
  return loss.item(), g_s.numpy(), g_t


def main():
  torch.use_deterministic_algorithms(True)
  rng = np.random.default_rng(SEED)
  arrays = {}
  cases_meta = []
  for key, s_shape, t_shape, scale, dup, grads in CASES:
    s, t = make_inputs(rng, s_shape, t_shape, scale, dup)
    arrays[f"{key}/student"] = s
    arrays[f"{key}/teacher"] = t
    names = [n for n, (_, _, flat_only) in LOSSES.items()
             if not flat_only or (len(s_shape) == 2 and len(t_shape) == 2)]
    teacher_grad = {}
    for name in names:
      _, fn, _ = LOSSES[name]
      v64, gs, gt = evaluate(fn, s, t, torch.float64, grads)
      v32, _, _ = evaluate(fn, s, t, torch.float32, False)
      arrays[f"{key}/{name}/f64"] = np.float64(v64)
      arrays[f"{key}/{name}/f32"] = np.float32(v32)
      if grads:
        # float64 autograd gradients, stored as float32 (fixture size).
        arrays[f"{key}/{name}/grad_student"] = gs.astype(np.float32)
        teacher_grad[name] = gt is not None
        if gt is not None:
          arrays[f"{key}/{name}/grad_teacher"] = gt.astype(np.float32)
    cases_meta.append(dict(
        key=key, student_shape=list(s_shape), teacher_shape=list(t_shape),
        scale=scale, duplicate_rows=dup, gradients=grads, losses=names,
        teacher_has_gradient=teacher_grad,
        description=(
            f"student = {scale:g} * N(0,1) {list(s_shape)}; teacher = "
            f"{scale:g} * (flat(student / {scale:g}) @ W + 0.7 N(0,1)), W "
            f"~ N(0, 1/{int(np.prod(s_shape[1:]))}), reshaped to "
            f"{list(t_shape)}; float32"
            + ("; student row 3 := row 1, teacher row 4 := row 0"
               if dup else "")),
    ))

  meta = dict(
      generator="benchmarks/reference/make_relational_fixtures.py",
      seed=SEED,
      versions=package_versions(torchdistill=True),
      references={name: desc for name, (desc, _, _) in LOSSES.items()},
      constructor_args=dict(
          rkd=RKD_ARGS, spkd=SP_ARGS, pkt=PKT_ARGS),
      torchdistill_call=(
          "RKDLoss('.', '.', **args) and SPKDLoss('.', '.', **args) are "
          "called as forward({'.': {'output': s}}, {'.': {'output': t}}); "
          "PKTLoss('.', 'output', '.', 'output', eps=1e-7) likewise"),
      notes=[
          "f64: torch float64 on the float32 inputs upcast; f32: torch "
          "float32; grad_student / grad_teacher: d(loss)/d(input) from torch "
          "autograd in float64, stored as float32.",
          "RKDLoss computes the teacher's distances and angles under "
          "torch.no_grad(): the teacher has no gradient "
          "(teacher_has_gradient false, no grad_teacher array).",
          "torchdistill 1.1.5 SPKDLoss normalises the Gram rows with "
          "torch.nn.functional.normalize(G, 1): the 1 is p (L1 norm), not "
          "dim; the paper and RepDistiller (sp_repdistiller) use the L2 "
          "norm.",
          "PKTLoss is only evaluated on [batch, features] inputs: it takes "
          "norms over dim=1 and uses torch.mm, so it does not flatten "
          "feature maps.",
          "The duplicates case has values only: at a zero difference "
          "F.normalize (RKD angle) has gradient 1/eps = 1e12.",
      ],
      cases=cases_meta,
  )
  write_fixture(FIXTURE, arrays, meta)


if __name__ == "__main__":
  sys.exit(main())
