"""PyTorch reference values of PLD, SinKD and MLKD from the authors' code.

Writes ``tests/fixtures/pld_sinkhorn_mlkd_reference.npz`` (inputs, float64
and float32 losses, float64 autograd gradients w.r.t. the student logits) and
``tests/fixtures/pld_sinkhorn_mlkd_reference.json`` (versions, the reference
code's repository / path / commit, arguments, cases), which
``tests/losses/test_losses_reference_pld_sinkhorn_mlkd.py`` compares jdistill with,
without torch. Run from the repository root (CPU torch is enough):

    python benchmarks/reference/make_pld_sinkhorn_mlkd_fixtures.py

None of the three reference codes is a pip package, so each function below is
a TRANSCRIPTION written here (the authors' code is not copied into this
repository) that performs the authors' torch operations step by step, in
their order, with their reductions, constants and conventions. What each
step is:

PLD -- Bassam, Zhu and Bian, "PLD: A Choice-Theoretic List-Wise Knowledge
Distillation" (arXiv:2506.12542, NeurIPS 2025), Appendix C "Implementation of
the PLD Loss" (functions ``create_adjusted_ranking`` and
``plackett_luce_loss``). No official code repository was found (searched the
code index for ``plackett_luce_loss`` / PLD distillation and the first
author's GitHub account ``Ejafa``: its repositories are unrelated), so the
paper's listing is the reference. ``pld_appendix_c``:
  1. ``prepare_for_classification`` (not defined in the listing) flattens
     the inputs to ``[N, V]``; the inputs here are already ``[N, V]``.
  2. ``create_adjusted_ranking(teacher, labels)``: ``torch.sort`` of the
     TEACHER logits, ascending (``descending=False``, default unstable sort);
     remove the label from each row's sorted indices (asserting exactly one
     removal per row), reshape to ``[N, V-1]`` and append the label as the
     LAST column. So the ranking is worst-to-best with the label at the end.
  3. ``torch.gather`` the student and teacher logits with that ranking.
  4. ``torch.logcumsumexp(s_perm, dim=-1)`` (a forward, i.e. prefix,
     log-cum-sum-exp of the worst-to-best order, which is the suffix
     log-sum-exp of the best-to-worst order) minus ``s_perm``.
  5. Teacher weights ``F.softmax(t_perm / temperature, dim=-1)`` (the
     student is NOT temperature-scaled).
  6. Weighted per-position losses summed over classes, then ``.mean()`` over
     the batch: the function returns a scalar, no ``T**2``.
  Ties between teacher logits: the ascending unstable CPU sort keeps ties in
  index order (checked and recorded per case), so in the best-to-worst order
  tied classes come by DEcreasing class index.

SinKD -- Cui et al., "SinKD: Sinkhorn Distance Minimization for Knowledge
Distillation" (LREC-COLING 2024 / TNNLS), GitHub ``2018cx/SinKD``, ``loss.py``
at commit 2b91a8edd30cf864eacdf56e67047e319b818ce4, class ``saliency_mse``
(the Sinkhorn version used by ``glue_train.py`` through
``from loss import *``). ``sinkd_sinkhorn_loss`` transcribes its
``sinkhorn_loss(x, y, epsilon=0.1, n_iters=20)``:
  1. ``Wxy = torch.cdist(x, y, p=1)``: L1 distance between every student row
     and every teacher row (``[N, N]``; rows = student examples).
  2. ``K = torch.exp(-Wxy / epsilon)`` (exp domain, no log-sum-exp).
  3. ``sinkhorn_normalized(K, n_iters)``: ``n_iters`` times
     ``x = x / x.sum(dim=1, keepdim=True)`` then
     ``x = x / x.sum(dim=0, keepdim=True)`` (that function's own default of
     10 iterations is not used: ``sinkhorn_loss`` passes its ``n_iters=20``).
  4. ``torch.sum(P * Wxy)``: plain transport cost of the whole plan (total
     mass N, no division by N, no entropy term); autograd differentiates
     through every iteration.
  ``sinkd_module_forward`` transcribes ``saliency_mse.forward``: ``self.T =
  2`` whatever the constructor argument, ``nn.Softmax(dim=1)`` of
  ``y_s / 2`` and ``y_t / 2``, then ``0.0008 * sinkhorn_loss(p_s, p_t) * 20
  / 8`` (epsilon 0.1, 20 iterations), evaluated in that order. The same
  ``sinkhorn_normalized`` / ``sinkhorn_loss`` appear in ``T0/lossd.py``
  (class ``Sinkhorn``, weight 0.0008, same commit) and in ``loss.py`` at
  commit eb4b3da77e4b9fdefedc180092b6a65119c2ec58 (class ``Sinkhorn``, weight
  0.001); only the fixed weight differs.

MLKD -- Jin, Wang and Lin, "Multi-Level Logit Distillation" (CVPR 2023),
GitHub ``Jin-Ying/Multi-Level-Logit-Distillation``,
``mdistiller/distillers/KD_ours.py`` at commit
6327e733bbbdeae766a4f72f01fb6226df209f70 (defaults from
``mdistiller/engine/cfg.py``, same commit: ``KD.TEMPERATURE = 4``,
``KD.LOSS.CE_WEIGHT = 0.1``, ``KD.LOSS.KD_WEIGHT = 0.9``; the
``configs/cifar100/ours/*.yaml`` files do not override them; the trainer,
``mdistiller/engine/trainer.py::AugTrainer``, back-propagates
``sum(l.mean() for l in losses_dict.values())``).
  * ``mlkd_kd_loss(s, t, T)`` (``kd_loss``, ``reduce=True``):
    ``F.kl_div(F.log_softmax(s / T, 1), F.softmax(t / T, 1),
    reduction="none").sum(1).mean() * T**2``.
  * ``mlkd_cc_loss(s, t, T)`` (``cc_loss``, ``reduce=True``): softmaxes at
    T, class Gram matrices ``p.T @ p`` (``torch.mm``, ``[C, C]``),
    ``((G_t - G_s) ** 2).sum() / class_num``.
  * ``mlkd_bc_loss(s, t, T)`` (``bc_loss``, ``reduce=True``): batch Gram
    matrices ``p @ p.T`` (``[N, N]``), ``((G_t - G_s) ** 2).sum() /
    batch_size``. Neither Gram loss has a ``T**2`` factor.
  * ``mlkd_forward_train(sw, ss, tw, ts, y, temperature=4, ce_w=0.1,
    kd_w=0.9)``: ``KD_ours.forward_train`` with the networks replaced by the
    given logits of the weak (``w``) and strong (``s``) views (the teacher
    ones constant, as under ``torch.no_grad``):
      - ``mask = max softmax(tw) <= np.percentile(that, 50)`` ([N]) and
        ``class_conf_mask = softmax(tw).sum(0) <= np.percentile(that, 50)``
        ([C]), both at T = 1, detached;
      - ``loss_ce = ce_w * (CE(sw, y) + CE(ss, y))`` (batch means);
      - ``loss_kd = loss_kd_weak + loss_kd_strong`` with ``loss_kd_weak =
        sum over T in (temperature, 3, 5, 2, 6) of kd_w * (kd_loss(sw, tw, T)
        * mask).mean()`` -- ``kd_loss`` is already a scalar (``reduce=False``
        is commented out), so the mask only multiplies it by mean(mask) --
        and ``loss_kd_strong = kd_w * [kd_loss(ss, ts, temperature) +
        kd_loss(ss, ts, 3) + kd_loss(ss, ts, 5) + kd_loss(sw, tw, 2) +
        kd_loss(sw, tw, 6)]`` (the last two on the WEAK logits, as written);
      - ``loss_cc = loss_cc_weak``: the same five temperatures of
        ``kd_w * (cc_loss(sw, tw, T) * class_conf_mask).mean()``;
      - ``loss_bc = loss_bc_weak``: the same with ``bc_loss`` and ``mask``;
      - ``loss_cc_strong`` and ``loss_bc_strong`` are computed by the
        official code but not returned (so they get no gradient); they are
        computed here too, for fidelity, and recorded as values only.
    Returns the losses dict; the fixture stores each entry and the
    trainer's total ``sum(l.mean())`` with its gradients w.r.t. ``sw`` and
    ``ss``.

Inputs are float32 draws of a seeded numpy generator; the float64 references
are computed on exactly those values (upcast), so float64 and float32 results
differ only by arithmetic. Gradients are float64 autograd, stored as float32
(relative rounding 6e-8).
"""

from __future__ import annotations

import sys

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from fixture_io import package_versions, write_fixture

FIXTURE = "pld_sinkhorn_mlkd_reference"  # tests/fixtures/pld_sinkhorn_mlkd_reference.{npz,json}

SEED = 20250614

REFERENCES = {
    "pld": dict(
        repo=None,
        source=("Bassam, Zhu and Bian, PLD: A Choice-Theoretic List-Wise "
                "Knowledge Distillation, arXiv:2506.12542 (NeurIPS 2025), "
                "Appendix C listing"),
        path="Appendix C: create_adjusted_ranking, plackett_luce_loss",
        commit=None,
        note=("no official code repository found; the paper's PyTorch "
              "listing is the reference"),
    ),
    "sinkhorn": dict(
        repo="2018cx/SinKD",
        path="loss.py",
        function="saliency_mse.sinkhorn_normalized / sinkhorn_loss / forward",
        commit="2b91a8edd30cf864eacdf56e67047e319b818ce4",
        also=("T0/lossd.py::Sinkhorn at 2b91a8edd30cf864eacdf56e67047e319b818ce4 "
              "(weight 0.0008) and loss.py::Sinkhorn at "
              "eb4b3da77e4b9fdefedc180092b6a65119c2ec58 (weight 0.001) have "
              "the same sinkhorn_normalized / sinkhorn_loss"),
    ),
    "mlkd": dict(
        repo="Jin-Ying/Multi-Level-Logit-Distillation",
        path="mdistiller/distillers/KD_ours.py",
        function="kd_loss, cc_loss, bc_loss, KD_ours.forward_train",
        commit="6327e733bbbdeae766a4f72f01fb6226df209f70",
        also=("mdistiller/engine/cfg.py (KD.TEMPERATURE=4, CE_WEIGHT=0.1, "
              "KD_WEIGHT=0.9) and mdistiller/engine/trainer.py::AugTrainer "
              "(loss = sum(l.mean() for l in losses_dict.values())) at the "
              "same commit"),
    ),
}

# (key, batch, classes, logit scale, temperature). The temperature is PLD's
# teacher temperature, SinKD's softmax temperature (besides the module's own
# fixed T=2) and MLKD's cfg.KD.TEMPERATURE (the first of its 5 temperatures).
CASES = [
    ("case0", 8, 10, 1.0, 1.0),
    ("case1", 8, 10, 1.0, 4.0),
    ("case2", 8, 10, 10.0, 1.0),
    ("case3", 8, 10, 10.0, 4.0),
    ("case4", 16, 100, 1.0, 1.0),
    ("case5", 16, 100, 10.0, 4.0),
]
# PLD only: teacher logits rounded to integers, so rows have tied classes.
TIE_CASE = ("ties", 8, 10, 2.0, 2.0)

# SinKD sinkhorn_loss settings: name -> (epsilon, n_iters); the temperature is
# the case's. "e0.1_n20" are the authors' defaults.
SINKHORN_SETTINGS = {
    "sinkhorn_e0.1_n20": (0.1, 20),
    "sinkhorn_e0.05_n5": (0.05, 5),
    "sinkhorn_e0.02_n50": (0.02, 50),
}
SINKD_MODULE = dict(T=2.0, epsilon=0.1, n_iters=20, weight=0.0008,
                    extra_factor="* 20 / 8")

MLKD_EXTRA_TEMPERATURES = (3.0, 5.0, 2.0, 6.0)  # after cfg.KD.TEMPERATURE
MLKD_CE_WEIGHT = 0.1
MLKD_KD_WEIGHT = 0.9


# ---------------------------------------------------------------------------
# PLD: transcription of the paper's Appendix C listing.
# ---------------------------------------------------------------------------


def pld_adjusted_ranking(teacher, labels):
  """Ascending teacher order without the label, the label appended last."""
  order = torch.sort(teacher, dim=-1, descending=False)[1]
  keep = order != labels.unsqueeze(-1)
  num_classes = teacher.size(-1)
  assert torch.all(keep.sum(dim=-1) == num_classes - 1)
  rest = order[keep].view(-1, num_classes - 1)
  return torch.cat([rest, labels.unsqueeze(-1)], dim=-1)


def pld_appendix_c(student, teacher, labels, temperature, per_example=False):
  ranking = pld_adjusted_ranking(teacher, labels)
  s_perm = torch.gather(student, dim=-1, index=ranking)
  t_perm = torch.gather(teacher, dim=-1, index=ranking)
  per_position = torch.logcumsumexp(s_perm, dim=-1) - s_perm
  weights = F.softmax(t_perm / temperature, dim=-1)
  rows = (per_position * weights).sum(dim=-1)
  return rows if per_example else rows.mean()


# ---------------------------------------------------------------------------
# SinKD: transcription of 2018cx/SinKD loss.py::saliency_mse.
# ---------------------------------------------------------------------------


def sinkd_normalized(kernel, n_iters):
  plan = kernel
  for _ in range(n_iters):
    plan = plan / torch.sum(plan, dim=1, keepdim=True)
    plan = plan / torch.sum(plan, dim=0, keepdim=True)
  return plan


def sinkd_sinkhorn_loss(x, y, epsilon=0.1, n_iters=20):
  cost = torch.cdist(x, y, p=1)
  kernel = torch.exp(-cost / epsilon)
  plan = sinkd_normalized(kernel, n_iters)
  return torch.sum(plan * cost)


def sinkd_probs_loss(student, teacher, temperature, epsilon, n_iters):
  """``sinkhorn_loss`` on the two softmaxes at ``temperature`` (no weight)."""
  softmax = nn.Softmax(dim=1)
  return sinkd_sinkhorn_loss(softmax(student / temperature),
                             softmax(teacher / temperature),
                             epsilon=epsilon, n_iters=n_iters)


def sinkd_module_forward(student, teacher):
  """``saliency_mse.forward`` (classification): T fixed at 2, weighted."""
  softmax = nn.Softmax(dim=1)
  p_s = softmax(student / SINKD_MODULE["T"])
  p_t = softmax(teacher / SINKD_MODULE["T"])
  return SINKD_MODULE["weight"] * sinkd_sinkhorn_loss(x=p_s, y=p_t) * 20 / 8


# ---------------------------------------------------------------------------
# MLKD: transcription of KD_ours.py (kd_loss, cc_loss, bc_loss, forward_train).
# ---------------------------------------------------------------------------


def mlkd_kd_loss(student, teacher, temperature):
  log_p_s = F.log_softmax(student / temperature, dim=1)
  p_t = F.softmax(teacher / temperature, dim=1)
  loss = F.kl_div(log_p_s, p_t, reduction="none").sum(1).mean()
  return loss * temperature**2


def mlkd_cc_loss(student, teacher, temperature):
  _, class_num = teacher.shape
  p_s = F.softmax(student / temperature, dim=1)
  p_t = F.softmax(teacher / temperature, dim=1)
  gram_s = torch.mm(p_s.transpose(1, 0), p_s)
  gram_t = torch.mm(p_t.transpose(1, 0), p_t)
  return ((gram_t - gram_s) ** 2).sum() / class_num


def mlkd_bc_loss(student, teacher, temperature):
  batch_size, _ = teacher.shape
  p_s = F.softmax(student / temperature, dim=1)
  p_t = F.softmax(teacher / temperature, dim=1)
  gram_s = torch.mm(p_s, p_s.transpose(1, 0))
  gram_t = torch.mm(p_t, p_t.transpose(1, 0))
  return ((gram_t - gram_s) ** 2).sum() / batch_size


def mlkd_confidence_masks(teacher_weak):
  """The example mask and the class mask of ``forward_train`` (T = 1)."""
  probs = F.softmax(teacher_weak.detach(), dim=1)
  confidence = probs.max(dim=1)[0].detach()
  mask = confidence.le(np.percentile(confidence.cpu().numpy().flatten(), 50))
  class_confidence = torch.sum(probs, dim=0).detach()
  class_mask = class_confidence.le(
      np.percentile(class_confidence.cpu().numpy().flatten(), 50))
  return mask.bool(), class_mask.bool()


def mlkd_forward_train(sw, ss, tw, ts, target, temperature=4.0,
                       ce_weight=MLKD_CE_WEIGHT, kd_weight=MLKD_KD_WEIGHT):
  tw, ts = tw.detach(), ts.detach()
  mask, class_mask = mlkd_confidence_masks(tw)
  temps = (temperature,) + MLKD_EXTRA_TEMPERATURES

  loss_ce = ce_weight * (F.cross_entropy(sw, target)
                         + F.cross_entropy(ss, target))

  def weak_masked(fn, m):
    total = 0.0
    for temp in temps:
      total = total + kd_weight * ((fn(sw, tw, temp) * m).mean())
    return total

  def strong_mixed(fn):
    # (temperature, 3, 5) on the strong view, then (2, 6) on the weak view.
    total = 0.0
    for temp in temps[:3]:
      total = total + kd_weight * fn(ss, ts, temp)
    for temp in temps[3:]:
      total = total + kd_weight * fn(sw, tw, temp)
    return total

  def strong_masked(fn, m):
    total = 0.0
    for temp in temps:
      total = total + kd_weight * ((fn(ss, ts, temp) * m).mean())
    return total

  loss_kd_weak = weak_masked(mlkd_kd_loss, mask)
  loss_kd_strong = strong_mixed(mlkd_kd_loss)
  loss_cc_weak = weak_masked(mlkd_cc_loss, class_mask)
  loss_cc_strong = strong_mixed(mlkd_cc_loss)  # computed, not returned
  loss_bc_weak = weak_masked(mlkd_bc_loss, mask)
  loss_bc_strong = strong_masked(mlkd_bc_loss, mask)  # computed, not returned
  losses = {
      "loss_ce": loss_ce,
      "loss_kd": loss_kd_weak + loss_kd_strong,
      "loss_cc": loss_cc_weak,
      "loss_bc": loss_bc_weak,
  }
  unused = {"loss_cc_strong": loss_cc_strong, "loss_bc_strong": loss_bc_strong}
  return losses, unused, mask, class_mask


# ---------------------------------------------------------------------------
# Inputs and evaluation.
# ---------------------------------------------------------------------------


def make_inputs(rng, batch, classes, scale):
  base = rng.standard_normal((batch, classes))
  noise = rng.standard_normal((batch, classes))
  student = (scale * base).astype(np.float32)
  # Teacher correlated with the student (correlation 0.6).
  teacher = (scale * (0.6 * base + 0.8 * noise)).astype(np.float32)
  labels = rng.integers(0, classes, size=batch).astype(np.int32)
  # MLKD strong view: another draw correlated with the weak one (0.8).
  strong_noise = rng.standard_normal((2, batch, classes))
  student_strong = (scale * (0.8 * base + 0.6 * strong_noise[0])).astype(
      np.float32)
  teacher_strong = (0.8 * teacher + scale * 0.6 * strong_noise[1]).astype(
      np.float32)
  return student, teacher, labels, student_strong, teacher_strong


def _t(x, dtype, grad=False):
  return torch.tensor(np.asarray(x), dtype=dtype, requires_grad=grad)


def value_and_grad(fn, s_np, dtype, *others):
  s = _t(s_np, dtype, grad=True)
  out = fn(s, *others)
  (g,) = torch.autograd.grad(out, s)
  return out.item(), g.numpy()


def add_value(arrays, key, fn, s, with_grad=True):
  """``fn(s_tensor, dtype)`` in float64 (value, grad) and float32 (value)."""
  v64, g64 = value_and_grad(lambda a: fn(a, torch.float64), s, torch.float64)
  v32, _ = value_and_grad(lambda a: fn(a, torch.float32), s, torch.float32)
  arrays[f"{key}/f64"] = v64
  arrays[f"{key}/f32"] = v32
  if with_grad:
    arrays[f"{key}/grad_student"] = g64.astype(np.float32)
  return v64, v32


def pld_entries(arrays, key, s, t, y, temp):
  yt = torch.tensor(y, dtype=torch.long)
  add_value(arrays, f"{key}/pld",
            lambda a, dt: pld_appendix_c(a, _t(t, dt), yt, temp), s)
  arrays[f"{key}/pld/per_example_f64"] = pld_appendix_c(
      _t(s, torch.float64), _t(t, torch.float64), yt, temp,
      per_example=True).numpy()
  teacher = _t(t, torch.float64)
  stable = bool(torch.equal(torch.sort(teacher, dim=-1)[1],
                            torch.sort(teacher, dim=-1, stable=True)[1]))
  ties = int(sum(len(row) - len(np.unique(row)) for row in t))
  return dict(sort_matches_stable_sort=stable, tied_teacher_pairs=ties)


def pack_scalars(arrays, meta):
  """Python-float entries ``NAME/f64`` and ``NAME/f32`` of every case go to
  one float64 array ``CASE/values_f64`` and one float32 array
  ``CASE/values_f32``, in the order of ``meta["value_names"][CASE]`` (the
  name without the case prefix and the dtype suffix): fewer npz entries."""
  out, names = {}, {}
  for k, v in arrays.items():
    if isinstance(v, float):
      case, rest = k.split("/", 1)
      name, tag = rest.rsplit("/", 1)
      if tag == "f64":
        names.setdefault(case, []).append(name)
    else:
      out[k] = v
  for case, case_names in names.items():
    out[f"{case}/values_f64"] = np.array(
        [arrays[f"{case}/{n}/f64"] for n in case_names], np.float64)
    out[f"{case}/values_f32"] = np.array(
        [arrays[f"{case}/{n}/f32"] for n in case_names], np.float32)
  meta["value_names"] = names
  return out


def main():
  torch.use_deterministic_algorithms(True)
  rng = np.random.default_rng(SEED)
  arrays = {}
  cases_meta = []

  for key, batch, classes, scale, temp in CASES:
    s, t, y, ss, ts = make_inputs(rng, batch, classes, scale)
    arrays[f"{key}/student"] = s
    arrays[f"{key}/teacher"] = t
    arrays[f"{key}/labels"] = y
    arrays[f"{key}/student_strong"] = ss
    arrays[f"{key}/teacher_strong"] = ts
    meta = dict(
        key=key, batch=batch, classes=classes, logit_scale=scale,
        temperature=temp,
        description=(
            f"student = {scale:g} * z; teacher = {scale:g} * (0.6 z + 0.8 n); "
            f"strong views: student = {scale:g} * (0.8 z + 0.6 n1), teacher = "
            f"0.8 * teacher + {scale:g} * 0.6 n2 (z, n, n1, n2 standard "
            f"normal); labels uniform in [0, {classes}); [{batch}, {classes}] "
            f"float32"),
    )

    # PLD.
    meta["pld"] = dict(temperature=temp, **pld_entries(arrays, key, s, t, y,
                                                      temp))

    # SinKD.
    meta["sinkhorn"] = {}
    for name, (eps, iters) in SINKHORN_SETTINGS.items():
      v64, v32 = add_value(
          arrays, f"{key}/{name}",
          lambda a, dt, eps=eps, iters=iters: sinkd_probs_loss(
              a, _t(t, dt), temp, eps, iters), s)
      meta["sinkhorn"][name] = dict(temperature=temp, epsilon=eps,
                                    n_iters=iters,
                                    f32_finite=bool(np.isfinite(v32)))
    add_value(arrays, f"{key}/sinkd_module",
              lambda a, dt: sinkd_module_forward(a, _t(t, dt)), s,
              with_grad=False)
    meta["sinkhorn"]["sinkd_module"] = dict(SINKD_MODULE)

    # MLKD single-level losses, each temperature, weak view.
    temps = (temp,) + MLKD_EXTRA_TEMPERATURES
    level_fns = dict(kd=mlkd_kd_loss, bc=mlkd_bc_loss, cc=mlkd_cc_loss)
    for level, fn in level_fns.items():
      for tk in temps:
        add_value(arrays, f"{key}/mlkd_{level}_T{tk:g}",
                  lambda a, dt, fn=fn, tk=tk: fn(a, _t(t, dt), tk), s,
                  with_grad=False)

    def all_levels(a, dt):
      total = 0.0
      for fn in level_fns.values():
        for tk in temps:
          total = total + fn(a, _t(t, dt), tk)
      return total

    add_value(arrays, f"{key}/mlkd_all_levels", all_levels, s)

    # MLKD forward_train (both views), gradients w.r.t. both student views.
    yt = torch.tensor(y, dtype=torch.long)
    for dt, tag in ((torch.float64, "f64"), (torch.float32, "f32")):
      sw_, ss_ = _t(s, dt, grad=True), _t(ss, dt, grad=True)
      losses, unused, mask, class_mask = mlkd_forward_train(
          sw_, ss_, _t(t, dt), _t(ts, dt), yt, temperature=temp)
      total = sum(v.mean() for v in losses.values())
      for name, v in {**losses, **unused, "total": total}.items():
        arrays[f"{key}/mlkd_train/{name}/{tag}"] = v.item()
      if tag == "f64":
        g_w, g_s = torch.autograd.grad(total, (sw_, ss_))
        arrays[f"{key}/mlkd_train/total/grad_student_weak"] = (
            g_w.numpy().astype(np.float32))
        arrays[f"{key}/mlkd_train/total/grad_student_strong"] = (
            g_s.numpy().astype(np.float32))
        arrays[f"{key}/mlkd_train/mask"] = mask.numpy()
        arrays[f"{key}/mlkd_train/class_conf_mask"] = class_mask.numpy()
    meta["mlkd"] = dict(
        temperatures=list(temps), kd_temperature=temp,
        ce_weight=MLKD_CE_WEIGHT, kd_weight=MLKD_KD_WEIGHT,
        mask_fraction=float(arrays[f"{key}/mlkd_train/mask"].mean()),
        class_mask_fraction=float(
            arrays[f"{key}/mlkd_train/class_conf_mask"].mean()),
    )
    cases_meta.append(meta)

  # PLD tie case.
  key, batch, classes, scale, temp = TIE_CASE
  s, t, y, _, _ = make_inputs(rng, batch, classes, scale)
  t = np.round(t).astype(np.float32)
  arrays[f"{key}/student"] = s
  arrays[f"{key}/teacher"] = t
  arrays[f"{key}/labels"] = y
  tie_meta = dict(
      key=key, batch=batch, classes=classes, logit_scale=scale,
      temperature=temp,
      description=(f"as the other cases, but the teacher logits are rounded "
                   f"to integers (many ties); PLD only, temperature {temp:g}"),
      pld=dict(temperature=temp, **pld_entries(arrays, key, s, t, y, temp)),
  )

  meta = dict(
      generator="benchmarks/reference/make_pld_sinkhorn_mlkd_fixtures.py",
      seed=SEED,
      versions=package_versions(),
      references=REFERENCES,
      sinkhorn_settings={k: dict(epsilon=e, n_iters=n)
                         for k, (e, n) in SINKHORN_SETTINGS.items()},
      notes=[
          "f64: torch float64 on the float32 inputs upcast; f32: torch "
          "float32; grad_student: float64 autograd gradient w.r.t. the "
          "student logits, stored as float32.",
          "pld: the Appendix C function's value (batch mean); "
          "per_example_f64 is its per-row sum before .mean().",
          "sinkhorn_*: sinkhorn_loss(softmax(s/T), softmax(t/T), epsilon, "
          "n_iters) with the case's T (no weight); sinkd_module: "
          "saliency_mse.forward (T=2, 0.0008 * loss * 20 / 8).",
          "mlkd_{kd,bc,cc}_T*: kd_loss / bc_loss / cc_loss (reduce=True) of "
          "the weak-view logits; mlkd_all_levels: the sum of all 15.",
          "mlkd_train: KD_ours.forward_train on logits (both views); total = "
          "sum(l.mean() for l in losses_dict.values()) as in AugTrainer; "
          "loss_cc_strong / loss_bc_strong are computed but not returned by "
          "the official code (not in total).",
      ],
      cases=cases_meta,
      tie_case=tie_meta,
  )
  arrays = pack_scalars(arrays, meta)
  write_fixture(FIXTURE, arrays, meta)


if __name__ == "__main__":
  sys.exit(main())
