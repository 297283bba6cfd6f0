"""Reference logits and BatchNorm statistics of mdistiller's vision models.

Writes ``tests/fixtures/zoo_reference.npz`` and ``zoo_reference.json``, which
jdistill's model tests compare the JAX zoo against without torch. Run from
the repository root with torch (CPU is enough, about 3 minutes on one
thread):

    python benchmarks/reference/make_zoo_fixtures.py \\
        --mdistiller=PATH_TO_MDISTILLER   # checkout or bare git dir

``--mdistiller`` imports mdistiller's own model files (commit
``zoo_torch_models.COMMIT``) and also checks that the transcription in
``zoo_torch_models.py`` gives bit-identical results; without it the
transcription alone is used (the JSON says which).

Per model (``zoo_torch_models.MODELS``): build the torch module, record its
``state_dict()`` keys and shapes (in order) and its trainable parameter count,
load ``tests/reference/numpy_zoo_weights.reference_weights(keys, seed=0,
gain=<the model's weight_gain>)``, take ``x = reference_input(input_shape,
seed=0)`` (NHWC, transposed to NCHW for torch) and store

* ``{model}/x``: the NHWC input ``[2, H, W, 3]`` float32;
* ``{model}/eval_logits``: ``model.eval()`` logits ``[2, classes]``;
* ``{model}/train_logits``: the logits of one ``model.train()`` forward
  (batch statistics; BatchNorm momentum 0.1, the default) on the same weights;
* ``{model}/train_stats``: every ``running_mean`` / ``running_var`` after that
  forward, flattened and concatenated in ``state_dict`` key order
  (``models.<name>.stats_keys``), float32. For a BatchNorm applied more than
  once in the forward (mdistiller's WideResNet re-applies three to build its
  pre-activation features) the values after its FIRST application are stored,
  i.e. what a logits-only forward gives; the JSON lists those modules under
  ``bn_applied_twice``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch
import torch.nn as nn

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)

import zoo_torch_models as Z  # noqa: E402
from fixture_io import package_versions, write_fixture  # noqa: E402
from tests.reference import numpy_zoo_weights as W  # noqa: E402

FIXTURE = "zoo_reference"
WEIGHT_SEED = 0
INPUT_SEED = 0


def _bn_modules(model):
  return {name: m for name, m in model.named_modules()
          if isinstance(m, nn.modules.batchnorm._BatchNorm)}


def run_model(model, spec):
  """Loads the reference weights into ``model`` and runs it; returns a dict."""
  sd = model.state_dict()
  keys = [[k, [int(d) for d in v.shape]] for k, v in sd.items()]
  trainable = int(sum(p.numel() for p in model.parameters()
                      if p.requires_grad))
  weights = W.reference_weights(keys, seed=WEIGHT_SEED,
                                gain=spec["weight_gain"])
  model.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()},
                        strict=True)
  x = W.reference_input(spec["input_shape"], seed=INPUT_SEED)
  xt = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))

  model.eval()
  with torch.no_grad():
    eval_logits = Z.logits_of(model, xt).numpy().copy()

  # One train-mode forward; record each BatchNorm's buffers after its first
  # application (and count applications).
  bns = _bn_modules(model)
  first, calls = {}, {}

  def hook(name):
    def fn(module, inputs, output):
      calls[name] = calls.get(name, 0) + 1
      if name not in first:
        first[name] = (module.running_mean.detach().clone(),
                       module.running_var.detach().clone())
    return fn

  handles = [m.register_forward_hook(hook(n)) for n, m in bns.items()]
  model.train()
  with torch.no_grad():
    train_logits = Z.logits_of(model, xt).numpy().copy()
  for h in handles:
    h.remove()
  model.eval()

  stats_keys, stats = [], []
  for k in sd:
    module, _, leaf = k.rpartition(".")
    if leaf in ("running_mean", "running_var"):
      stats_keys.append(k)
      if module not in first:
        raise RuntimeError(f"BatchNorm {module} was not applied")
      stats.append(first[module][0 if leaf == "running_mean" else 1]
                   .numpy().ravel())
  train_stats = (np.concatenate(stats).astype(np.float32) if stats
                 else np.zeros((0,), np.float32))
  return dict(keys=keys, trainable=trainable, x=x,
              eval_logits=eval_logits.astype(np.float32),
              train_logits=train_logits.astype(np.float32),
              train_stats=train_stats, stats_keys=stats_keys,
              twice=sorted(n for n, c in calls.items() if c > 1))


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--mdistiller", default=None,
                      help="mdistiller checkout or bare git directory")
  parser.add_argument("--models", default=None,
                      help="comma-separated subset (default: all)")
  parser.add_argument("--threads", type=int, default=1)
  parser.add_argument("--no-write", action="store_true")
  args = parser.parse_args(argv)
  torch.set_num_threads(args.threads)
  torch.manual_seed(0)  # only the (overwritten) default initialisation

  snapshot = Z.load_snapshot(args.mdistiller) if args.mdistiller else None
  names = args.models.split(",") if args.models else list(Z.MODELS)

  arrays, models_meta, cross = {}, {}, {}
  for name in names:
    t0 = time.time()
    spec = Z.MODELS[name]
    model = Z.build(name, snapshot=snapshot)
    out = run_model(model, spec)
    if snapshot is not None:
      # The transcription must give the same keys and the same numbers.
      ref = run_model(Z.build(name), spec)
      if ref["keys"] != out["keys"] or ref["trainable"] != out["trainable"]:
        raise RuntimeError(f"{name}: transcription's state_dict differs")
      diffs = {a: float(np.max(np.abs(ref[a] - out[a])))
               for a in ("eval_logits", "train_logits", "train_stats")}
      if max(diffs.values()) != 0.0:
        raise RuntimeError(f"{name}: transcription differs: {diffs}")
      cross[name] = diffs
    for a in ("x", "eval_logits", "train_logits", "train_stats"):
      arrays[f"{name}/{a}"] = out[a]
    el, tl = out["eval_logits"], out["train_logits"]
    models_meta[name] = {
        "jdistill_name": spec["jdistill_name"],
        "module": "mdistiller/models/" + spec["module"].replace(".", "/")
                  + ".py",
        "constructor": spec["constructor"],
        "num_classes": spec["num_classes"],
        "input_shape": spec["input_shape"],
        "pool": spec["pool"],
        "weight_seed": WEIGHT_SEED,
        "weight_gain": spec["weight_gain"],
        "input_seed": INPUT_SEED,
        "trainable_params": out["trainable"],
        "eval_logit_absmax": float(np.abs(el).max()),
        "eval_logit_example_diff": float(np.abs(el[0] - el[1]).mean()),
        "train_logit_absmax": float(np.abs(tl).max()),
        "bn_applied_twice": out["twice"],
        "keys": out["keys"],
        "stats_keys": out["stats_keys"],
    }
    print(f"{name:15s} params={out['trainable']:>10,d} "
          f"eval|max|={np.abs(el).max():9.3g} "
          f"diff={np.abs(el[0] - el[1]).mean():8.2g} "
          f"train|max|={np.abs(tl).max():8.3g} "
          f"stats={out['train_stats'].size:>7d} "
          f"twice={out['twice']} {time.time() - t0:5.1f}s", flush=True)

  files = list(Z.SNAPSHOT_FILES)
  meta = {
      "source": {
          "repo": Z.REPO,
          "commit": Z.COMMIT,
          "files": ([{"path": p, "blob": b} for p, b in
                     Z.snapshot_blobs(args.mdistiller).items()]
                    if args.mdistiller else files),
          "loaded_from": ("mdistiller's files (zoo_torch_models."
                          "load_snapshot)" if snapshot is not None else
                          "transcription (benchmarks/reference/"
                          "zoo_torch_models.py)"),
          "transcription": "benchmarks/reference/zoo_torch_models.py",
          "transcription_max_abs_diff": cross or None,
      },
      "versions": package_versions(),
      "weights": W.DESCRIPTION,
      "input": ("tests/reference/numpy_zoo_weights.reference_input("
                "input_shape, seed=input_seed): [2, H, W, C] float32 NHWC, "
                "standard normal rounded to multiples of 1/16, clipped to "
                "[-4, 4]; transposed to NCHW for torch."),
      "compared": (
          "eval_logits: model.eval() forward with the loaded running "
          "statistics. train_logits: one model.train() forward (batch "
          "statistics, biased variance for normalising). train_stats: the "
          "running_mean / running_var after that forward (momentum 0.1: "
          "0.9 * loaded + 0.1 * batch statistic, unbiased batch variance), "
          "flattened and concatenated in stats_keys order; for a BatchNorm "
          "in bn_applied_twice the values after its first application. "
          "Logits are mdistiller's forward(x)[0]."),
      "notes": [
          "imagenet resnet18/34/50/101 (pool 'adaptive') run mdistiller's "
          "module with avgpool = nn.AdaptiveAvgPool2d((1, 1)) "
          "(torchvision's), since mdistiller's nn.AvgPool2d(7, stride=1) "
          "needs a 7x7 last map (input 193..224) and these run at 64x64; "
          "resnet18_224 is the unmodified module at 224x224 "
          "(jdistill_name resnet18).",
          "mdistiller's WideResNet.forward re-applies block2.layer.0.bn1, "
          "block3.layer.0.bn1 and bn1 for its pre-activation features, so "
          "in train mode those running statistics are updated twice per "
          "forward; train_stats holds the first (logits-only) update.",
          "mobilenetv1 is mdistiller's MobileNetV1 (fc fixed at 1000 "
          "classes; AvgPool2d(7) needs a 7x7 last map, hence 224x224).",
      ],
      "models": models_meta,
  }
  if not args.no_write:
    write_fixture(FIXTURE, arrays, meta)


if __name__ == "__main__":
  main()
