"""Writes jdistill's ``digits32`` data set to an ``.npz`` for the PyTorch side.

    python benchmarks/zoo_digits_data.py --out=/tmp/digits32.npz

(in jdistill's environment). ``digits32`` is scikit-learn's 8x8 digits,
embedded in jdistill, upscaled to 32x32x3 (CIFAR's shape): NHWC float32 in
[0, 1], 1438 training and 359 test examples, 10 classes. The arrays are
``x_train``, ``y_train``, ``x_test``, ``y_test``;
``benchmarks/zoo_torch_teacher.py`` trains mdistiller's wrn_16_2 on them in
PyTorch.
"""

from __future__ import annotations

import argparse
import os

import numpy as np

from jdistill.data import load_dataset


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default="/tmp/digits32.npz")
  args = parser.parse_args(argv)
  d = load_dataset("digits32")
  arrays = dict(x_train=np.asarray(d.train.x), y_train=np.asarray(d.train.y),
                x_test=np.asarray(d.test.x), y_test=np.asarray(d.test.y))
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  np.savez(args.out, **arrays)
  print(f"wrote {args.out}: " + ", ".join(
      f"{k} {v.shape} {v.dtype}" for k, v in arrays.items()))


if __name__ == "__main__":
  main()
