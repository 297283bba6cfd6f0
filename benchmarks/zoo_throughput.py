r"""Throughput of the vision zoo: samples/s of a train step and of an eval
forward, per model, on this machine.

  python benchmarks/zoo_throughput.py [--models=cifar] [--repeats=3]
      [--out=benchmarks/results/zoo_throughput_<cpu>.json]

``--models``: ``cifar`` (the CIFAR-100 zoo at 32×32×3, batch 64, 100
classes), ``imagenet`` (224×224×3, batch 16, 1000 classes) or a
comma-separated list of names. The train step is one SGD (momentum 0.9)
update on cross-entropy with train-mode BatchNorm
(`jdistill.train.make_train_step`, compiled on a 1-device mesh); the eval
forward is the jitted inference-mode forward. Inputs are random (speed
only). Two warm-up runs (compilation) are excluded; the median of
``--repeats`` runs of ``--steps`` steps is reported, with the load average
(other jobs skew timings on a shared machine).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks import machine  # noqa: E402


def _median_seconds(fn, repeats, steps):
  import jax
  out = None
  for _ in range(2):
    out = fn()
  jax.block_until_ready(out)
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    for _ in range(steps):
      out = fn()
    jax.block_until_ready(out)
    times.append((time.perf_counter() - start) / steps)
  return statistics.median(times)


def measure(name, input_shape, num_classes, batch, repeats, steps):
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax
  from flax import nnx

  from jdistill.models import count_params, create_model
  from jdistill.train import FunctionalModel

  model = create_model(name, num_classes=num_classes,
                       input_shape=input_shape, rngs=nnx.Rngs(0))
  params_count = count_params(model)
  functional, params, model_state = FunctionalModel.split(model)
  x = jnp.asarray(np.random.default_rng(0).standard_normal(
      (batch,) + input_shape), jnp.float32)
  y = jnp.asarray(np.arange(batch) % num_classes, jnp.int32)
  tx = optax.sgd(0.05, momentum=0.9)
  opt_state = tx.init(params)

  @jax.jit
  def train_step(params, model_state, opt_state):
    def loss_fn(p):
      logits, _, new_state = functional.apply(p, model_state, x, train=True)
      return optax.softmax_cross_entropy_with_integer_labels(
          logits, y).mean(), new_state
    (loss, new_state), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), new_state, opt_state, loss

  @jax.jit
  def forward(params, model_state):
    return functional.apply(params, model_state, x, train=False)[0]

  state = [params, model_state, opt_state]

  def one_train():
    state[0], state[1], state[2], loss = train_step(*state)
    return loss

  train_s = _median_seconds(one_train, repeats, steps)
  eval_s = _median_seconds(lambda: forward(params, model_state), repeats,
                           steps)
  return {"model": name, "params": params_count, "batch": batch,
          "input_shape": list(input_shape),
          "train_samples_per_s": batch / train_s,
          "eval_samples_per_s": batch / eval_s,
          "load": machine.load_average()}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--models", default="cifar")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--steps", type=int, default=3)
  parser.add_argument("--out", default=None)
  a = parser.parse_args()
  import jax

  from jdistill.models.registry import (CIFAR_ZOO_NAMES, IMAGENET_ZOO_NAMES,
                                        RESNET_NAMES)
  groups = {"cifar": RESNET_NAMES + CIFAR_ZOO_NAMES,
            "imagenet": IMAGENET_ZOO_NAMES}
  names = []
  for item in a.models.split(","):
    names.extend(groups.get(item, (item,)))
  out = a.out or os.path.join(
      ROOT, "benchmarks", "results",
      f"zoo_throughput_{a.models.replace(',', '_')}_"
      f"{machine.cpu_model().split()[0]}.json")
  result = {"machine": {"cpu": machine.cpu_model(), "isa": machine.xla_isa(),
                        "cores": os.cpu_count(), "jax": jax.__version__},
            "rows": []}
  rows = result["rows"]
  for name in names:
    imagenet = name in IMAGENET_ZOO_NAMES
    row = measure(name, (224, 224, 3) if imagenet else (32, 32, 3),
                  1000 if imagenet else 100, 16 if imagenet else 64,
                  a.repeats, a.steps)
    rows.append(row)
    print(f"| {name} | {row['params']:,} | {row['batch']} | "
          f"{row['train_samples_per_s']:.1f} | "
          f"{row['eval_samples_per_s']:.1f} | {row['load']} |", flush=True)
    with open(out, "w") as f:  # After each model: a partial run keeps rows.
      json.dump(result, f, indent=1)
      f.write("\n")
  print(f"wrote {out}")


if __name__ == "__main__":
  main()
