r"""Trains mdistiller's wrn_16_2 in PyTorch on digits32: a real PyTorch teacher
checkpoint for jdistill's PyTorch-import path.

    # in jdistill's environment: the data
    python benchmarks/zoo_digits_data.py --out=/tmp/digits32.npz
    # with torch (CPU): ~5 minutes on one thread
    python benchmarks/zoo_torch_teacher.py --data=/tmp/digits32.npz \
        --out_dir=benchmarks/results/zoo_digits_teacher \
        --pth_dir=/tmp/zoo_teacher \
        [--mdistiller=PATH_TO_MDISTILLER]

The model is ``wrn_16_2(num_classes=10)`` from
``benchmarks/reference/zoo_torch_models.py`` (mdistiller's own file with
``--mdistiller``, else the transcription, which gives identical modules). The
inputs are jdistill's ``digits32`` (NHWC float32 in [0, 1], transposed to
NCHW), not normalised. Training follows mdistiller's CIFAR recipe scaled down:
SGD (momentum 0.9, weight decay 5e-4 on every parameter, not Nesterov), batch
64 (shuffled each epoch, last batch kept), learning rate 0.05 with a cosine
decay to 0 over the epochs (set per step), cross-entropy on ``forward(x)[0]``.
Augmentation: a random 32x32 crop of the image zero-padded by 4 pixels (as
``torchvision.transforms.RandomCrop(32, padding=4)``); no horizontal flip,
which changes what a digit is (it would turn a 2 into a mirrored glyph).
Note that mdistiller's ``WideResNet.forward`` re-applies three BatchNorms to
build its pre-activation features, so in training their running statistics
get two momentum updates per step; that is part of the model as trained.

Writes to ``--out_dir``:

* ``wrn_16_2_digits32.safetensors``: the plain ``state_dict`` (every tensor
  contiguous, ``num_batches_tracked`` included);
* ``wrn_16_2_digits32.json``: accuracy, epochs, seconds, versions, machine,
  the hyperparameters, the eval-mode logits of the first 16 test examples and
  the argmax prediction of all 359 test examples (for an example-by-example
  comparison after importing into JAX);

and to ``--pth_dir`` (default ``--out_dir``) ``wrn_16_2_digits32.pth``:
``torch.save({"model": state_dict, "epoch": E, "test_acc": acc})``, the layout
of mdistiller's ``download_ckpts/cifar_teachers`` checkpoints (``test_acc`` in
percent there as here).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "reference"))

import zoo_torch_models as Z  # noqa: E402

NAME = "wrn_16_2_digits32"


def random_crop(x: np.ndarray, rng: np.random.Generator, pad: int = 4):
  """Per-example random crop of the zero-padded NCHW batch ``x``."""
  n, _, h, w = x.shape
  padded = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
  dy = rng.integers(0, 2 * pad + 1, n)
  dx = rng.integers(0, 2 * pad + 1, n)
  return np.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w]
                   for i in range(n)])


@torch.no_grad()
def evaluate(model, x, batch=256):
  model.eval()
  return torch.cat([Z.logits_of(model, torch.from_numpy(x[i:i + batch]))
                    for i in range(0, len(x), batch)]).numpy()


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--data", default="/tmp/digits32.npz")
  parser.add_argument("--out_dir",
                      default="benchmarks/results/zoo_digits_teacher")
  parser.add_argument("--pth_dir", default=None)
  parser.add_argument("--mdistiller", default=None)
  parser.add_argument("--epochs", type=int, default=15)
  parser.add_argument("--lr", type=float, default=0.05)
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--weight_decay", type=float, default=5e-4)
  parser.add_argument("--threads", type=int, default=1)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  torch.set_num_threads(args.threads)
  torch.manual_seed(args.seed)
  rng = np.random.default_rng(args.seed)

  d = np.load(args.data)
  x_train = np.ascontiguousarray(d["x_train"].transpose(0, 3, 1, 2))
  x_test = np.ascontiguousarray(d["x_test"].transpose(0, 3, 1, 2))
  y_train = d["y_train"].astype(np.int64)
  y_test = d["y_test"].astype(np.int64)

  snapshot = Z.load_snapshot(args.mdistiller) if args.mdistiller else None
  model = Z.build("wrn_16_2", snapshot=snapshot, num_classes=10)
  opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9,
                        weight_decay=args.weight_decay)
  steps_per_epoch = math.ceil(len(x_train) / args.batch)
  total = args.epochs * steps_per_epoch

  t0 = time.time()
  step = 0
  history = []
  for epoch in range(args.epochs):
    model.train()
    order = rng.permutation(len(x_train))
    loss_sum, correct = 0.0, 0
    for i in range(0, len(order), args.batch):
      idx = order[i:i + args.batch]
      xb = torch.from_numpy(random_crop(x_train[idx], rng))
      yb = torch.from_numpy(y_train[idx])
      lr = 0.5 * args.lr * (1 + math.cos(math.pi * step / total))
      for g in opt.param_groups:
        g["lr"] = lr
      logits = Z.logits_of(model, xb)
      loss = F.cross_entropy(logits, yb)
      opt.zero_grad(set_to_none=True)
      loss.backward()
      opt.step()
      step += 1
      loss_sum += float(loss.detach()) * len(idx)
      correct += int((logits.argmax(1) == yb).sum())
    test_acc = float((evaluate(model, x_test).argmax(1) == y_test).mean())
    history.append(dict(epoch=epoch + 1,
                        train_loss=loss_sum / len(x_train),
                        train_acc=correct / len(x_train),
                        test_acc=test_acc,
                        seconds=round(time.time() - t0, 1)))
    print(json.dumps(history[-1]), flush=True)
  seconds = time.time() - t0

  logits = evaluate(model, x_test)
  preds = logits.argmax(1)
  acc = float((preds == y_test).mean())
  print(f"test accuracy {acc:.4f} ({int((preds == y_test).sum())}/"
        f"{len(y_test)}) after {args.epochs} epochs, {seconds:.0f} s")

  os.makedirs(args.out_dir, exist_ok=True)
  pth_dir = args.pth_dir or args.out_dir
  os.makedirs(pth_dir, exist_ok=True)
  state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
  from safetensors.torch import save_file
  st_path = os.path.join(args.out_dir, NAME + ".safetensors")
  save_file(state, st_path)
  pth_path = os.path.join(pth_dir, NAME + ".pth")
  torch.save({"model": state, "epoch": args.epochs,
              "test_acc": 100.0 * acc}, pth_path)

  def sha256(path):
    with open(path, "rb") as f:
      return hashlib.sha256(f.read()).hexdigest()

  import safetensors
  meta = {
      "model": "wrn_16_2",
      "num_classes": 10,
      "source": {"repo": Z.REPO, "commit": Z.COMMIT,
                 "file": "mdistiller/models/cifar/wrn.py",
                 "loaded_from": ("mdistiller's file" if snapshot is not None
                                 else "transcription (benchmarks/reference/"
                                 "zoo_torch_models.py)")},
      "data": {"name": "digits32 (jdistill.data.load_dataset)",
               "made_by": "benchmarks/zoo_digits_data.py",
               "train": len(x_train), "test": len(x_test),
               "input": "NHWC float32 in [0, 1] transposed to NCHW, "
                        "not normalised",
               "x_test_sha256": hashlib.sha256(
                   np.ascontiguousarray(d["x_test"]).tobytes()).hexdigest()},
      "training": {
          "optimizer": "SGD momentum 0.9, not Nesterov, weight decay "
                       f"{args.weight_decay} on all parameters",
          "lr": args.lr, "schedule": "cosine to 0, per step",
          "batch": args.batch, "epochs": args.epochs, "seed": args.seed,
          "augmentation": "random 32x32 crop of the 4-pixel zero-padded "
                          "image; no horizontal flip (it changes digits)",
          "loss": "cross-entropy",
          "threads": args.threads,
      },
      "test_acc": acc,
      "test_correct": int((preds == y_test).sum()),
      "epochs": args.epochs,
      "seconds": round(seconds, 1),
      "history": history,
      "versions": {"python": platform.python_version(),
                   "torch": torch.__version__, "numpy": np.__version__,
                   "safetensors": safetensors.__version__},
      "machine": {"processor": platform.processor(),
                  "cpu_count": os.cpu_count(),
                  "machine": platform.machine()},
      "files": {
          "safetensors": {"path": os.path.relpath(st_path),
                          "sha256": sha256(st_path)},
          "pth": {"path": os.path.abspath(pth_path),
                  "sha256": sha256(pth_path),
                  "layout": "{'model': state_dict, 'epoch': E, "
                            "'test_acc': percent} (mdistiller's "
                            "cifar_teachers)"},
      },
      "state_dict_keys": [[k, list(v.shape), str(v.dtype)]
                          for k, v in state.items()],
      "test_logits_first16": logits[:16].astype(float).tolist(),
      "test_predictions": preds.astype(int).tolist(),
  }
  json_path = os.path.join(args.out_dir, NAME + ".json")
  with open(json_path, "w") as f:
    json.dump(meta, f, indent=1)
    f.write("\n")
  print(f"wrote {st_path}, {json_path} and {pth_path}")


if __name__ == "__main__":
  main()
