"""``--mode=kip``: kernel-ridge dataset distillation and its evaluation.

For every ``--images_per_class`` N the program

1. distils a support set of N examples per class with ``--kip_method``
   (``kip``: KIP with the closed-form ``--kernel``; ``rfad``: random ConvNet
   features; ``frepo``: a pool of ``--model`` networks trained online;
   ``krr_st``: FRePo regressing the penultimate representations of the
   ``--teacher_checkpoint`` model), starting from real examples;
2. evaluates it, and a random real subset of the same size, and the full
   training set, in two ways: KRR test accuracy with ``--kernel``, and the
   test accuracy of fresh ``--model`` networks trained only on that set
   (MSE onto its labels, one network per ``--seeds`` entry);
3. writes under ``<workdir>/ipc<N>/``: ``distilled.npz``, ``curve.jsonl``
   and ``curve.png`` (the learning curve), and a picture of the set
   (``images.png`` for images, ``signals.png`` for 1-D signals); and
   ``results.json`` / ``results.md`` (the table) under ``<workdir>``.

For ``krr_st`` the targets are representations: the accuracies are those of
a ridge classifier, fitted on the teacher's representations of the training
set, applied to the representations predicted for the test set.
"""

from __future__ import annotations

import json
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from experiments import machine
from experiments.engine import setup, teachers
from experiments.engine.workdir import check_workdir, write_atomic
from experiments.config import Config
from jdistill import data as jdata
from jdistill import dataset_distillation as jdd
from jdistill import models as jmodels
from jdistill import train as jtrain
from jdistill.dataset_distillation import frepo as frepo_lib
from jdistill.dataset_distillation import kip as kip_lib

SYNC_EVERY = 16  # Host sync at least this often (multi-device CPU safety).


_log = setup.log


def _write_atomic_with(path: str, write) -> None:
  """``write(tmp_path)`` then rename, so a crash never leaves half a file
  (binary files; text goes through `write_atomic`)."""
  tmp = path + ".tmp"
  write(tmp)
  os.replace(tmp, path)


def _kernel_input(x: np.ndarray, kernel: str) -> np.ndarray:
  """Conv kernels and random ConvNet features need a channel axis."""
  conv = kernel.startswith("conv")
  if conv and x.ndim == 2:
    return x[..., None]
  return x


def _kip_kernel(cfg: Config) -> kip_lib.Kernel:
  kwargs = dict(cfg.kernel_kwargs)
  try:
    if cfg.kip_method == "rfad":
      return kip_lib.random_features(**kwargs)
    return kip_lib.closed_form(cfg.kernel, **kwargs)
  except ValueError as e:
    raise ValueError(f"--kernel_kwargs={json.dumps(kwargs)}: {e}") from None


def _eval_kernel(cfg: Config) -> kip_lib.Kernel:
  """The KRR evaluation kernel: ``--kernel`` (its ``--kernel_kwargs`` apply
  unless they are random-feature options)."""
  kwargs = dict(cfg.kernel_kwargs) if cfg.kip_method == "kip" else {}
  try:
    return kip_lib.closed_form(cfg.kernel, **kwargs)
  except ValueError as e:
    raise ValueError(f"--kernel_kwargs={json.dumps(kwargs)}: {e}") from None


def _ridge_readout(features: np.ndarray, labels: np.ndarray,
                   num_classes: int, reg: float = 1e-3) -> np.ndarray:
  """A ridge classifier ``W`` (features -> centred one-hot), float64."""
  f = np.asarray(features, np.float64)
  f = np.concatenate([f, np.ones((len(f), 1))], axis=1)
  y = np.eye(num_classes)[labels] - 1.0 / num_classes
  a = f.T @ f
  a += reg * np.trace(a) / len(a) * np.eye(len(a))
  return np.linalg.solve(a, f.T @ y)


class _Task:
  """What the support set regresses: labels, or teacher representations.

  ``targets(indices)`` gives the regression targets of training examples;
  ``readout(pred)`` maps predicted targets to class scores.
  """

  def __init__(self, cfg: Config, dataset: jdata.Dataset, mesh):
    self.num_classes = dataset.num_classes
    labels = dataset.train.y
    if cfg.kip_method != "krr_st":
      self.train_targets = np.asarray(
          jdd.centered_one_hot(labels, self.num_classes), np.float32)
      self.readout_matrix = None
      return
    teacher, variables, _ = teachers.load_teacher(cfg, dataset, mesh)
    if "penultimate" not in teacher.apply(
        variables["params"], variables["model_state"],
        jnp.asarray(dataset.train.x[:1]), train=False)[1]:
      raise ValueError(f"--teacher_checkpoint={cfg.teacher_checkpoint}: the "
                       "model has no 'penultimate' feature to distil")

    @jax.jit
    def represent(x):
      return teacher.apply(variables["params"], variables["model_state"], x,
                           train=False)[1]["penultimate"].reshape(
                               x.shape[0], -1)

    def all_of(x):
      return np.concatenate([np.asarray(represent(jnp.asarray(
          x[i:i + 500]))) for i in range(0, len(x), 500)])

    self.train_targets = all_of(dataset.train.x).astype(np.float32)
    self.readout_matrix = _ridge_readout(self.train_targets, labels,
                                         self.num_classes)

  @property
  def dim(self) -> int:
    return self.train_targets.shape[1]

  def readout(self, pred) -> np.ndarray:
    pred = np.asarray(pred, np.float64)
    if self.readout_matrix is None:
      return pred
    return np.concatenate([pred, np.ones((len(pred), 1))],
                          axis=1) @ self.readout_matrix


def _fit_network(cfg: Config, spec: dict, seed: int, x, y, task: _Task,
                 x_test, y_test, *, batch_size: int = 256) -> float:
  """Trains a fresh ``--model`` network on ``(x, y)`` (MSE onto the
  targets, Adam, cosine decay) and returns its test accuracy."""
  spec = dict(spec, num_classes=task.dim)
  model, params, model_state = setup.build_model(spec, seed)
  steps = cfg.eval_num_steps
  tx = optax.adam(optax.cosine_decay_schedule(1e-3, steps))
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, model_state, xb, yb):
    def loss_fn(p):
      out, _, new_state = model.apply(p, model_state, xb, train=True)
      return 0.5 * jnp.mean(jnp.sum((out - yb) ** 2, -1)), new_state
    (loss, new_state), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, new_state, loss

  rng = np.random.default_rng(seed)
  n = len(x)
  for i in range(steps):
    idx = (np.arange(n) if n <= batch_size
           else rng.choice(n, batch_size, replace=False))
    params, opt_state, model_state, loss = step(
        params, opt_state, model_state, jnp.asarray(x[idx]),
        jnp.asarray(y[idx]))
    if i % SYNC_EVERY == 0:
      loss.block_until_ready()

  @jax.jit
  def predict(xb):
    return model.apply(params, model_state, xb, train=False)[0]

  correct = 0
  for start in range(0, len(x_test), 500):
    scores = task.readout(predict(jnp.asarray(x_test[start:start + 500])))
    correct += int(np.sum(scores.argmax(-1) == y_test[start:start + 500]))
  return correct / len(x_test)


def _frepo_functions(cfg: Config, dataset: jdata.Dataset, out_dim: int):
  """``init_fn(key) -> params`` and ``apply_fn(params, x) -> (outputs,
  penultimate features)`` of ``--model`` for the FRePo pool."""
  spec = dict(setup.model_spec(cfg.model, cfg.model_kwargs, dataset),
              num_classes=out_dim)
  model, params, model_state = setup.build_model(spec, cfg.seed)
  if jax.tree.leaves(model_state):
    raise ValueError(f"--model={cfg.model}: frepo/krr_st need a model "
                     "without batch statistics (e.g. convnet with "
                     "norm='instance', mlp, cnn1d)")
  kwargs = {k: list(v) if isinstance(v, tuple) else v
            for k, v in spec["kwargs"].items()}

  def init_fn(key):
    m = jmodels.create_model(spec["name"], num_classes=out_dim,
                             input_shape=tuple(spec["input_shape"]),
                             rngs=nnx.Rngs(key), **kwargs)
    return jtrain.FunctionalModel.split(m)[1]

  def apply_fn(p, x):
    out, feats, _ = model.apply(p, model_state, x, train=False)
    return out, feats["penultimate"].reshape(x.shape[0], -1)

  return init_fn, apply_fn


def _distil(cfg: Config, dataset: jdata.Dataset, task: _Task, mesh,
            ipc: int, x_train, out_dir: str):
  """Runs the distillation at ``ipc``; returns the support set and the
  learning curve."""
  rng = np.random.default_rng(cfg.seed + 1000 * ipc)
  labels = dataset.train.y
  support_idx = _support_indices(rng, labels, ipc, task.num_classes)
  support_x = x_train[support_idx]
  support_y = task.train_targets[support_idx]
  tx = optax.adam(cfg.learning_rate)
  key = jax.random.key(cfg.seed)
  if cfg.kip_method in ("kip", "rfad"):
    state = kip_lib.kip_init(support_x, support_y, tx, key)
    step = kip_lib.make_kip_step(_kip_kernel(cfg), tx, reg=cfg.krr_reg,
                                 learn_labels=cfg.learn_labels, mesh=mesh)
  else:
    init_fn, apply_fn = _frepo_functions(cfg, dataset, task.dim)
    model_tx = optax.adam(cfg.frepo_learning_rate)
    state = frepo_lib.frepo_init(
        support_x, support_y, tx, model_tx, init_fn, key,
        pool_size=cfg.frepo_pool_size,
        max_online_steps=cfg.frepo_max_online_steps)
    step = frepo_lib.make_frepo_step(
        init_fn, apply_fn, tx, model_tx, reg=cfg.krr_reg,
        learn_labels=cfg.learn_labels,
        max_online_steps=cfg.frepo_max_online_steps, mesh=mesh)
  state = jtrain.replicate(state, mesh)
  step = jtrain.compile_step(step, mesh)
  curve = []
  start = time.time()
  pending = []
  for i in range(cfg.num_steps):
    idx = kip_lib.class_balanced_indices(rng, labels, cfg.target_per_class,
                                         task.num_classes)
    batch = jtrain.put_batch({"x": x_train[idx],
                              "y": task.train_targets[idx]}, mesh)
    state, metrics = step(state, batch)
    pending.append(metrics)
    last = i + 1 == cfg.num_steps
    if len(pending) >= SYNC_EVERY or last or (i + 1) % cfg.log_every == 0:
      for j, m in enumerate(jax.device_get(pending)):
        row = {"step": i + 2 - len(pending) + j,
               **{k: float(v) for k, v in m.items()}}
        if not math.isfinite(row["loss"]):
          raise FloatingPointError(
              f"--mode=kip: the KRR loss is {row['loss']} at step "
              f"{row['step']} (images_per_class={ipc}): the support kernel "
              "became singular or non-finite; raise --krr_reg or lower "
              "--learning_rate")
        curve.append(row)
      pending = []
    if (i + 1) % cfg.log_every == 0 or last:
      r = curve[-1]
      _log(f"[kip {cfg.kip_method} ipc={ipc}] step {r['step']}: "
           f"loss={r['loss']:.4f} target acc={r['accuracy']:.3f} "
           f"({time.time() - start:.0f}s)")
  seconds = time.time() - start
  support_x = np.asarray(jax.device_get(state.support_x))
  support_y = np.asarray(jax.device_get(state.support_y))
  return support_idx, support_x, support_y, curve, seconds


def _support_indices(rng, labels, ipc, num_classes):
  try:
    return kip_lib.support_indices(rng, labels, ipc, num_classes)
  except ValueError as e:
    raise ValueError(f"--images_per_class={ipc}: {e}") from None


def _plot_set(path: str, support_x, classes, ipc: int, image: bool) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  num_classes = int(classes.max()) + 1
  cols = min(ipc, 10)
  if image:
    fig, axes = plt.subplots(num_classes, cols,
                             figsize=(cols * 0.9, num_classes * 0.9),
                             squeeze=False)
    for c in range(num_classes):
      rows = np.flatnonzero(classes == c)[:cols]
      for j, r in enumerate(rows):
        ax = axes[c, j]
        img = support_x[r]
        img = img[..., 0] if img.shape[-1] == 1 else img
        ax.imshow(img, cmap="gray_r")
        ax.set_xticks([])
        ax.set_yticks([])
        if j == 0:
          ax.set_ylabel(str(c))
  else:
    fig, axes = plt.subplots(2, math.ceil(num_classes / 2),
                             figsize=(2.4 * math.ceil(num_classes / 2), 4),
                             squeeze=False)
    for c in range(num_classes):
      ax = axes.flat[c]
      for r in np.flatnonzero(classes == c)[:cols]:
        ax.plot(np.asarray(support_x[r]).reshape(-1), lw=0.8)
      ax.set_title(f"class {c}", fontsize=8)
      ax.set_xticks([])
      ax.set_yticks([])
  fig.tight_layout()
  _write_atomic_with(path,
                     lambda tmp: fig.savefig(tmp, dpi=80, format="png"))
  plt.close(fig)


def _plot_curve(path: str, curve: list[dict], title: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  steps = [r["step"] for r in curve]
  fig, ax = plt.subplots(1, 2, figsize=(8, 3))
  ax[0].plot(steps, [r["loss"] for r in curve], lw=0.8)
  ax[0].set_yscale("log")
  ax[0].set_xlabel("step")
  ax[0].set_title("KRR loss on target batches")
  ax[1].plot(steps, [r["accuracy"] for r in curve], lw=0.8)
  ax[1].set_xlabel("step")
  ax[1].set_title("KRR accuracy on target batches")
  fig.suptitle(title, fontsize=9)
  fig.tight_layout()
  _write_atomic_with(path,
                     lambda tmp: fig.savefig(tmp, dpi=80, format="png"))
  plt.close(fig)


def format_kip_table(results: dict) -> str:
  lines = [f"KRR: {results['kernel']}; networks: {results['model']} "
           f"({results['eval_num_steps']} steps, {len(results['seeds'])} "
           f"seeds); method: {results['method']}",
           "",
           "| images/class | set | KRR test acc | network test acc |",
           "|---|---|---|---|"]
  for ipc, rows in results["ipc"].items():
    for name in ("distilled", "random subset"):
      r = rows[name]
      lines.append(f"| {ipc} | {name} | {100 * r['krr_accuracy']:.2f} | "
                   f"{100 * r['network_mean']:.2f} ± "
                   f"{100 * r['network_std']:.2f} |")
  r = results["full"]
  lines.append(f"| all ({results['train_size']}) | full training set | "
               f"{100 * r['krr_accuracy']:.2f} | {100 * r['network_mean']:.2f}"
               f" ± {100 * r['network_std']:.2f} |")
  return "\n".join(lines)


def run_kip(cfg: Config) -> dict:
  dataset = setup.load_data(cfg)
  mesh = jtrain.make_data_mesh(cfg.num_devices)
  n_dev = mesh.devices.size
  if (cfg.target_per_class * dataset.num_classes) % n_dev:
    raise ValueError(
        f"--target_per_class={cfg.target_per_class}: the target batch "
        f"({cfg.target_per_class} x {dataset.num_classes} classes) must be "
        f"divisible by the {n_dev} devices of the mesh")
  task = _Task(cfg, dataset, mesh)
  spec = setup.model_spec(cfg.model, cfg.model_kwargs, dataset)
  setup.build_model(spec, cfg.seed)  # Checks --model before any work.
  for ipc in cfg.images_per_class:
    _support_indices(np.random.default_rng(0), dataset.train.y, ipc,
                     dataset.num_classes)
  eval_kernel = _eval_kernel(cfg)
  if cfg.kip_method in ("kip", "rfad"):
    _kip_kernel(cfg)  # Checks --kernel_kwargs.
  else:
    _frepo_functions(cfg, dataset, task.dim)  # Checks --model.
  check_workdir(cfg)()  # The first write.

  # Inputs in the network's shape; kernels may add a channel axis.
  shape = tuple(dataset.input_shape)
  x_train = np.asarray(dataset.train.x, np.float32)
  x_test = np.asarray(dataset.test.x, np.float32)
  y_test = np.asarray(dataset.test.y)
  zca = None
  if cfg.zca_strength > 0:
    zca = kip_lib.fit_zca(x_train, cfg.zca_strength)
    x_train, x_test = zca(x_train), zca(x_test)

  def for_net(x):
    return np.asarray(x).reshape((len(x),) + shape)

  def for_kernel(x):
    return _kernel_input(for_net(x), cfg.kernel)

  distil_format = {"kip": for_kernel, "rfad": lambda x: _kernel_input(
      for_net(x), "conv"), "frepo": for_net, "krr_st": for_net}[
          cfg.kip_method]

  def evaluate(x, y, name, ipc):
    krr = kip_lib.krr_evaluate(eval_kernel, for_kernel(x), y,
                               for_kernel(x_test), y_test, reg=cfg.krr_reg,
                               readout=task.readout)
    nets = [_fit_network(cfg, spec, s, for_net(x), y, task, x_test, y_test)
            for s in cfg.seeds]
    _log(f"[kip ipc={ipc}] {name}: KRR test accuracy {krr:.4f}; "
         f"{cfg.model} trained on it: {np.mean(nets):.4f} ± "
         f"{np.std(nets):.4f}")
    return {"krr_accuracy": krr, "network_accuracies": nets,
            "network_mean": float(np.mean(nets)),
            "network_std": float(np.std(nets))}

  results = {"dataset": dataset.name, "method": cfg.kip_method,
             "kernel": cfg.kernel, "kernel_kwargs": dict(cfg.kernel_kwargs),
             "model": cfg.model, "eval_num_steps": cfg.eval_num_steps,
             "seeds": list(cfg.seeds), "train_size": len(x_train),
             "ipc": {}}
  for ipc in cfg.images_per_class:
    out_dir = os.path.join(cfg.workdir, f"ipc{ipc}")
    os.makedirs(out_dir, exist_ok=True)
    idx, support_x, support_y, curve, seconds = _distil(
        cfg, dataset, task, mesh, ipc, distil_format(x_train), out_dir)
    classes = dataset.train.y[idx]
    random_idx = _support_indices(np.random.default_rng(cfg.seed + 7 + ipc),
                                  dataset.train.y, ipc, dataset.num_classes)
    rows = {"distilled": evaluate(support_x, support_y, "distilled", ipc),
            "random subset": evaluate(x_train[random_idx],
                                      task.train_targets[random_idx],
                                      "random subset", ipc),
            "distill_seconds": seconds}
    results["ipc"][str(ipc)] = rows
    arrays = {"support_x": for_net(support_x), "support_y": support_y,
              "initial_classes": classes, "initial_indices": idx}
    if zca is not None:
      arrays.update(zca_mean=zca.mean, zca_matrix=zca.matrix)
    if jax.process_index() == 0:
      def write_npz(tmp, arrays=arrays):
        with open(tmp, "wb") as f:
          np.savez(f, **arrays)
      _write_atomic_with(os.path.join(out_dir, "distilled.npz"),
                         write_npz)
      write_atomic(os.path.join(out_dir, "curve.jsonl"),
                  "".join(json.dumps(r) + "\n" for r in curve))
      _plot_curve(os.path.join(out_dir, "curve.png"), curve,
                  f"{cfg.kip_method} on {dataset.name}, {ipc} per class")
      image = len(shape) == 3
      pictures = for_net(support_x)
      if zca is not None:
        pictures = zca.inverse(pictures)
      _plot_set(os.path.join(out_dir, "images.png" if image else
                             "signals.png"), pictures, classes, ipc, image)
  results["full"] = evaluate(x_train, task.train_targets,
                             "full training set", "all")
  results, table = machine.annotate(results, format_kip_table(results))
  if jax.process_index() == 0:
    write_atomic(os.path.join(cfg.workdir, "results.json"),
                json.dumps(results, indent=2))
    write_atomic(os.path.join(cfg.workdir, "results.md"),
                          table + "\n")
  _log("\n" + table)
  return results
