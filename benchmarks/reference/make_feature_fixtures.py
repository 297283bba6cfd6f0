"""Computes reference values of feature distillation losses with PyTorch.

Writes ``tests/fixtures/feature_reference.npz`` (inputs, losses, gradients)
and ``tests/fixtures/feature_reference.json`` (versions, arguments, cases),
which ``tests/losses/test_losses_reference_feature.py`` compares jdistill against
without needing torch. Run from the repository root:

    pip install torch==2.13.0
    pip install --no-deps torchdistill==1.1.5
    python benchmarks/reference/make_feature_fixtures.py

References used (jdistill is channels-last, torch channels-first: inputs are
stored NHWC / [batch, length, channels] and transposed to NCHW / NCL here):

* Attention transfer: ``torchdistill.losses.mid_level.ATLoss`` with one
  student/teacher pair of weight 1, ``mode='code'`` (the authors' ``at_loss``:
  ``(at(s) - at(t)).pow(2).mean()`` with ``at(x) =
  F.normalize(x.pow(2).mean(1).flatten(1))``) and ``mode='paper'``
  (``sum_b ||at(s)_b - at(t)_b||_2 / batch``, with a channel sum).
* FitNets hints: torchdistill's ``SimpleLossWrapper`` around
  ``torch.nn.MSELoss()`` and ``torch.nn.SmoothL1Loss(beta=...)`` (how
  torchdistill configures FitNets: student regressor output vs teacher
  feature); the cosine variant is plain torch,
  ``(1 - F.cosine_similarity(s, t, dim=1)).mean()`` on NCHW (channel axis).
* ND: a TRANSCRIPTION, written here, of ``DirectNormLoss`` from
  ``WangYZ1608/Knowledge-Distillation-via-ND`` (``CIFAR/utils.py``, commit
  ``3b2ff1be19ad17a7a08e6a056478a590a7a76a82``): per example
  ``1 - dot(s, center / |center|) / max(|s|, |t|)``, summed over the batch,
  times ``nd_loss_factor`` (1), divided by the batch size. The class centres
  are passed as an array instead of the authors' JSON dict.
* V_kD: TRANSCRIPTIONS of ``roymiles/VkD`` ``engine.py`` (commit
  ``0c9cc5eb7dec9c771350b74b01e9ff6f26bf4c2c``):
  ``F.smooth_l1_loss(z_s, F.layer_norm(z_t, (D,)))`` and of the ViDT
  criterion ``vidt/methods/vidt/criterion.py`` (commit
  ``4b480506d10bad9bfaf27b144f5929ad4007472d``): both standardised per
  feature over the rows, ``(x - x.mean(0)) / x.std(0)``, then
  ``F.smooth_l1_loss``. The orthogonal projector is
  ``torch.nn.utils.parametrizations.orthogonal(nn.Linear(in, out,
  bias=False), orthogonal_map='matrix_exp', use_trivialization=False)`` with
  its ``original`` parameter set to the stored weight.
* MiniLMv2 relations: a TRANSCRIPTION to torch of PaddleNLP's
  ``calc_minilm_loss`` (``paddlenlp/transformers/distill_utils.py``): q of
  shape ``[batch, heads, tokens, head_dim]`` regrouped into relation heads,
  ``softmax(q q^T / sqrt(d))``, KL with ``reduction='batchmean'`` (the
  PaddleNLP examples pass a ``KLDivLoss``; batchmean is chosen here and
  recorded), no padding (``attn_mask`` = 0).

Inputs are drawn in float32 with a seeded numpy generator; the float64
references are computed on exactly those values (upcast).
"""

from __future__ import annotations

import math
import sys

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import parametrizations

from torchdistill.losses import mid_level as td

from fixture_io import package_versions, write_fixture

FIXTURE = "feature_reference"  # tests/fixtures/feature_reference.{npz,json}
SEED = 20240602


def to_channels_first(x):
  return np.moveaxis(x, -1, 1)


def to_channels_last(x):
  return np.moveaxis(x, 1, -1)


# ---- torchdistill calls. ----


def at_loss(mode):
  pairs = {"pair1": {"student": {"path": "student", "io": "output"},
                     "teacher": {"path": "teacher", "io": "output"},
                     "weight": 1}}
  mod = td.ATLoss(pairs, mode=mode)

  def fn(s, t):
    return mod({"student": {"output": s}}, {"teacher": {"output": t}})
  return fn


def wrapped(low_level_loss):
  mod = td.SimpleLossWrapper(
      low_level_loss,
      input={"is_from_teacher": False, "module_path": "regressor",
             "io": "output"},
      target={"is_from_teacher": True, "module_path": "hint_layer",
              "io": "output"})

  def fn(s, t):
    return mod({"regressor": {"output": s}}, {"hint_layer": {"output": t}},
               None)
  return fn


def cosine_hint(s, t):
  return (1.0 - F.cosine_similarity(s, t, dim=1)).mean()


# ---- Transcriptions (see module docstring). ----


def nd_direct_norm_loss(s_emb, t_emb, centers, labels, nd_loss_factor=1.0):
  loss = 0.0
  for s, t, i in zip(s_emb, t_emb, labels):
    center = centers[int(i)]
    e_c = center / center.norm(p=2)
    max_norm = max(s.norm(p=2), t.norm(p=2))
    loss += 1 - torch.dot(s, e_c) / max_norm
  return loss * nd_loss_factor / len(labels)


def vkd_deit(z_s, z_t):
  z_t_norm = F.layer_norm(z_t, (z_t.shape[1],))
  return F.smooth_l1_loss(z_s, z_t_norm)


def vkd_vidt(z_s, z_t):
  z_s = (z_s - z_s.mean(0)) / z_s.std(0)
  z_t = (z_t - z_t.mean(0)) / z_t.std(0)
  return F.smooth_l1_loss(z_s, z_t)


def minilm_relation(s, t, num_relation_heads):
  """calc_minilm_loss, transcribed: s, t are [bs, heads, seq, head_dim]."""
  def regroup(x):
    if num_relation_heads > 0 and num_relation_heads != x.shape[1]:
      x = x.permute(0, 2, 1, 3)
      x = x.reshape(x.shape[0], x.shape[1], num_relation_heads, -1)
      x = x.permute(0, 2, 1, 3)
    return x

  s, t = regroup(s), regroup(t)
  s_head_dim, t_head_dim = s.shape[3], t.shape[3]
  attn_mask = torch.zeros(s.shape[0], 1, 1, s.shape[2], dtype=s.dtype)
  dot_s = s @ s.transpose(-1, -2) / math.sqrt(s_head_dim) + attn_mask
  dot_t = t @ t.transpose(-1, -2) / math.sqrt(t_head_dim) + attn_mask
  return F.kl_div(F.log_softmax(dot_s, dim=-1), F.softmax(dot_t, dim=-1),
                  reduction="batchmean")


def orthogonal_matrix_exp(weight):
  out, inp = weight.shape
  lin = nn.Linear(inp, out, bias=False).to(weight.dtype)
  parametrizations.orthogonal(lin, orthogonal_map="matrix_exp",
                              use_trivialization=False)
  with torch.no_grad():
    lin.parametrizations.weight.original.copy_(weight)
  return lin.weight.detach()


# ---- Evaluation. ----


def evaluate(fn, inputs, dtype, channels_first=False, grad=True):
  """(value, d value / d inputs[0]) with inputs[:2] as float tensors."""
  def conv(x):
    x = to_channels_first(x) if channels_first else x
    return torch.tensor(np.ascontiguousarray(x), dtype=dtype)

  s = conv(inputs[0]).requires_grad_(grad)
  rest = [conv(x) if np.issubdtype(x.dtype, np.floating) else
          torch.tensor(x) for x in inputs[1:]]
  loss = fn(s, *rest)
  if not grad:
    return loss.item(), None
  (g,) = torch.autograd.grad(loss, s)
  g = g.numpy()
  return loss.item(), (to_channels_last(g) if channels_first else g)


def normal(rng, shape, scale=1.0, shift=0.0):
  return (scale * rng.standard_normal(shape) + shift).astype(np.float32)


def main():
  torch.use_deterministic_algorithms(True)
  rng = np.random.default_rng(SEED)
  arrays, cases = {}, []

  def add(key, family, inputs, losses, description, channels_first, **extra):
    for name, x in inputs.items():
      arrays[f"{key}/{name}"] = x
    ordered = list(inputs.values())
    for name, (fn, args) in losses.items():
      v64, g64 = evaluate(fn, ordered, torch.float64, channels_first)
      v32, _ = evaluate(fn, ordered, torch.float32, channels_first,
                        grad=False)
      arrays[f"{key}/{name}/f64"] = np.float64(v64)
      arrays[f"{key}/{name}/f32"] = np.float32(v32)
      # float64 autograd gradient w.r.t. the first input, stored as float32.
      arrays[f"{key}/{name}/grad_student"] = g64.astype(np.float32)
    cases.append(dict(key=key, family=family, description=description,
                      shapes={k: list(v.shape) for k, v in inputs.items()},
                      losses={n: a for n, (_, a) in losses.items()}, **extra))

  # -- Attention transfer (NHWC and [B, L, C]; channel counts may differ).
  at_losses = {f"at_{m}": (at_loss(m), dict(
      reference="torchdistill.losses.mid_level.ATLoss", mode=m, weight=1))
               for m in ("code", "paper")}
  for i, (shape_s, c_t, scale, relu) in enumerate([
      ((4, 6, 6, 8), 16, 1.0, False),
      ((3, 5, 7, 4), 4, 10.0, True),
      ((4, 9, 5), 3, 1.0, False)]):
    s = normal(rng, shape_s, scale)
    t = normal(rng, shape_s[:-1] + (c_t,), scale)
    if relu:
      s, t = np.maximum(s, 0), np.maximum(t, 0)
    add(f"at{i}", "attention_transfer", {"student": s, "teacher": t},
        at_losses,
        f"student {scale:g} * N(0,1) of shape {shape_s}, teacher with "
        f"{c_t} channels{', both after ReLU' if relu else ''}; stored "
        "channels-last, given to torchdistill channels-first",
        channels_first=True)

  # -- FitNets hints.
  hint_losses = {
      "mse": (wrapped(nn.MSELoss()), dict(
          reference="torchdistill SimpleLossWrapper(torch.nn.MSELoss())")),
      "smooth_l1": (wrapped(nn.SmoothL1Loss()), dict(
          reference="torchdistill SimpleLossWrapper(torch.nn.SmoothL1Loss())",
          beta=1.0)),
      "smooth_l1_b05": (wrapped(nn.SmoothL1Loss(beta=0.5)), dict(
          reference="torchdistill SimpleLossWrapper("
                    "torch.nn.SmoothL1Loss(beta=0.5))", beta=0.5)),
      "cosine": (cosine_hint, dict(
          reference="(1 - torch.nn.functional.cosine_similarity(s, t, "
                    "dim=1)).mean(), channel axis")),
  }
  for i, shape in enumerate([(4, 5, 5, 6), (8, 12)]):
    base = normal(rng, shape, 1.5)
    s = base
    t = (0.7 * base + normal(rng, shape, 1.0)).astype(np.float32)
    add(f"hint{i}", "hint", {"student": s, "teacher": t}, hint_losses,
        f"student 1.5 * N(0,1) of shape {shape}; teacher 0.7 * student + "
        "N(0,1)", channels_first=len(shape) > 2)

  # -- ND.
  b, d, k = 8, 6, 5
  centers = normal(rng, (k, d), 1.0, shift=0.5)
  labels = rng.integers(0, k, size=b).astype(np.int32)
  s = normal(rng, (b, d), 2.0)
  t = (centers[labels] * 3.0 + normal(rng, (b, d), 1.0)).astype(np.float32)
  add("nd0", "nd", {"student": s, "teacher": t, "centers": centers,
                    "labels": labels},
      {"nd": (nd_direct_norm_loss, dict(
          reference="transcription of DirectNormLoss (WangYZ1608/"
                    "Knowledge-Distillation-via-ND CIFAR/utils.py)",
          nd_loss_factor=1.0))},
      "student 2 * N(0,1) [8, 6]; teacher 3 * its class centre + N(0,1); "
      "centres N(0.5, 1) [5, 6]", channels_first=False)

  # -- V_kD.
  s = normal(rng, (8, 16), 1.0)
  t = normal(rng, (8, 16), 3.0, shift=2.0)
  add("vkd0", "vkd", {"student": s, "teacher": t},
      {"vkd_deit": (vkd_deit, dict(
          reference="transcription of roymiles/VkD engine.py: "
                    "F.smooth_l1_loss(z_s, F.layer_norm(z_t, (D,)))",
          layer_norm_eps=1e-5, beta=1.0)),
       "vkd_vidt": (vkd_vidt, dict(
           reference="transcription of roymiles/VkD vidt criterion: "
                     "(x - x.mean(0)) / x.std(0) for both, smooth_l1_loss",
           beta=1.0))},
      "student N(0,1) [8, 16]; teacher N(2, 9) [8, 16]",
      channels_first=False)
  for i, shape in enumerate([(6, 3), (3, 6), (4, 4)]):
    w = normal(rng, shape, 0.7)
    arrays[f"orth{i}/weight"] = w
    arrays[f"orth{i}/q_f64"] = orthogonal_matrix_exp(
        torch.tensor(w, dtype=torch.float64)).numpy()
    cases.append(dict(
        key=f"orth{i}", family="orthogonal_projection",
        description=f"weight 0.7 * N(0,1) of shape {shape}",
        shapes={"weight": list(shape)},
        losses={"q": dict(reference=(
            "torch.nn.utils.parametrizations.orthogonal(nn.Linear(in, out, "
            "bias=False), orthogonal_map='matrix_exp', "
            "use_trivialization=False) with original := weight"))}))

  # -- MiniLMv2 token relations (q as [bs, heads, seq, head_dim]).
  q_s = normal(rng, (2, 2, 5, 4), 1.0)
  q_t = normal(rng, (2, 4, 5, 6), 1.0)
  add("minilm0", "token_relation", {"student": q_s, "teacher": q_t},
      {"relation": (lambda s, t: minilm_relation(s, t, 2), dict(
          reference="transcription of PaddleNLP calc_minilm_loss with "
                    "F.kl_div(reduction='batchmean')",
          num_relation_heads=2))},
      "student queries [2, 2 heads, 5 tokens, 4]; teacher [2, 4 heads, 5 "
      "tokens, 6]; 2 relation heads, no padding", channels_first=False)

  meta = dict(
      generator="benchmarks/reference/make_feature_fixtures.py",
      seed=SEED,
      versions=package_versions(torchdistill=True),
      notes=[
          "Inputs are stored channels-last (jdistill's layout); the "
          "torchdistill/torch calls of the attention_transfer and 4-D hint "
          "cases got np.moveaxis(x, -1, 1), and their gradients were moved "
          "back to channels-last.",
          "f64: torch float64 on the float32 inputs upcast; f32: torch "
          "float32; grad_student: d(loss)/d(first input) from float64 "
          "autograd, stored as float32.",
          "torchdistill ATLoss(mode='paper') sums the attention map over "
          "channels and divides the batch sum of L2 distances by the batch "
          "size; mode='code' averages over channels and over batch x "
          "positions.",
          "The ND, V_kD and MiniLMv2 references are transcriptions written "
          "in the generator (none is a pip package); orth*/q_f64 comes from "
          "torch's own parametrization.",
      ],
      cases=cases,
  )
  write_fixture(FIXTURE, arrays, meta)


if __name__ == "__main__":
  sys.exit(main())
