r"""jdistill against PyTorch + torchdistill: one logit-KD training step, side
by side on the same machine.

  python benchmarks/vs_pytorch.py [--workloads=resnet,mlp,vit,lm]
      [--repeats=7] [--columns=jdistill,torch_eager,torch_channels_last,
      torch_compile] [--out=vs_pytorch.json]
  python benchmarks/vs_pytorch.py --check   # the architectures are the same

Needs ``benchmarks/requirements-vs-pytorch.txt`` (PyTorch and torchdistill,
the latter installed with ``--no-deps``); jdistill itself never imports
PyTorch.

A step is: teacher forward (no gradient; BatchNorm on running statistics),
student forward (BatchNorm on batch statistics), the loss, backward and the
optimizer update. Both frameworks get identical architectures
(`benchmarks/torch_models.py` mirrors jdistill's models and ``--check``
proves it on the logits and the first training losses), the same float32
batch, the same loss and optimizer:

* resnet: resnet8x4 ← resnet32x4, CIFAR-shaped 32×32×3, 100 classes, batch 64;
* mlp: mlp 512-512 ← cnn1d (3 × 32 channels), MNIST-1D shape (40,), 10
  classes, batch 256;
* vit: ViT dim 192, depth 4, 3 heads, MLP ratio 2 ← ViT dim 384, depth 6,
  6 heads, MLP ratio 2; patches of 4×4 on 32×32×3 (64 patches + CLS), 100
  classes, batch 64;
* lm: causal_lm dim 64, depth 2, 4 heads ← causal_lm dim 128, depth 3,
  4 heads (the sizes of experiments/flags/distill_lm.flags); vocabulary 256,
  128 tokens, batch 32; token-level KD over every position.

Loss: CE + Hinton KD at T = 4 (jdistill ``DistillObjective(loss="kd",
temperature=4, ce_weight=1, kd_weight=1)``, torchdistill ``KDLoss(alpha=1,
beta=1, temperature=4)``); for lm KD alone at T = 1 (jdistill
``make_lm_distill_step`` with the online teacher, not fused; torchdistill
``KDLoss`` on the ``[B*T, V]`` logits). Optimizer: SGD, momentum 0.9
(Nesterov, as jdistill's ``sgd``), weight decay 5e-4, lr 0.05 cosine for
resnet, mlp and vit; AdamW, lr 3e-3 cosine, weight decay 0.01 for lm.
jdistill is used as a user would: ``create_model`` with its defaults,
``make_distill_step`` / ``make_lm_distill_step``, ``compile_step`` on a
1-device mesh; its step also computes its usual metrics (accuracies, grad
norm).

Columns: ``jdistill``; ``torch_eager`` (NCHW); ``torch_channels_last``
(resnet only: model and batch in ``torch.channels_last``); ``torch_compile``
(``torch.compile`` of teacher forward + student forward + loss; backward and
optimizer as usual). Each column is warmed up first (compilation excluded,
and reported as the first step's time); then every one of ``--repeats``
rounds times one run of ``--steps_per_run`` steps of each column in turn, so
that machine noise hits all columns alike. The table gives median samples/s,
jdistill's ratio to each PyTorch column, and utilisation: the XLA-counted
FLOPs of jdistill's compiled step (``cost_analysis()``; the same count is
used for every column) times steps/s, against this machine's float32 matmul
peak (2048³, the better of jax and torch).

The PyTorch mirrors compute attention with ``F.scaled_dot_product_attention``
(what a PyTorch user writes); jdistill's models write it out (their attention
scores are distillation taps). Time on an otherwise idle machine: with
``--torch_threads`` equal to the cores, PyTorch's OpenMP threads collapse as
soon as another process takes a core (on 2 shared cores the mlp step went
from about 6 ms to 150 ms; jdistill slowed far less).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import statistics
import sys
import time
from typing import Any, Callable

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from machine import git_state, load_average  # noqa: E402

COLUMNS = ("jdistill", "torch_eager", "torch_channels_last", "torch_compile",
           "jdistill_cached_logits")
# Not the peers' work (no teacher forward): reported as a lever, not in the
# jdistill ÷ PyTorch ratios.
LEVER_COLUMNS = ("jdistill_cached_logits",)

flags.DEFINE_list("workloads", ["resnet", "mlp", "vit", "lm"],
                  "Workloads to time.")
flags.DEFINE_integer("repeats", 7, "Timed rounds (each times every column).")
flags.DEFINE_integer("steps_per_run", 0,
                     "Steps per timed run; 0: the workload's default (one "
                     "run of the slowest column takes about 1-3 s on 2 "
                     "cores).")
flags.DEFINE_integer("warmup_steps", 3, "Untimed steps per column first.")
flags.DEFINE_integer("torch_threads", os.cpu_count(),
                     "torch.set_num_threads.")
flags.DEFINE_list("columns", list(COLUMNS), "Columns to time.")
flags.DEFINE_bool("check", False,
                  "Instead of timing: copy jdistill's weights into the "
                  "PyTorch mirrors and check parameter counts, logits and "
                  "the first training losses; exit 1 on a mismatch.")
flags.DEFINE_string("out", None, "Write every raw time to this JSON file.")
flags.DEFINE_enum("cpu_allocator", "retain", ["retain", "system"],
                  "As the programs' --cpu_allocator: 'retain' applies "
                  "jdistill.runtime.retain_host_memory() at start (glibc "
                  "keeps freed memory; process-wide, so the PyTorch columns "
                  "run under it too); 'system' leaves glibc's defaults.")
flags.DEFINE_string("attention_impl", "auto",
                    "attention_impl= of the jdistill vit/lm models "
                    "(jdistill.models.attention: auto, vjp, xla).")
FLAGS = flags.FLAGS

SYNC_EVERY = 16  # Host sync at least this often (a known CPU trap).
LOGIT_TOL = 1e-4  # max |Δ logits| / max |logits|
LOSS_TOL = 1e-4  # |Δ loss| / |loss|, first training steps
CHECK_STEPS = 3


@dataclasses.dataclass(frozen=True)
class Workload:
  student: str
  student_kwargs: dict
  teacher: str
  teacher_kwargs: dict
  input_shape: tuple[int, ...]
  num_classes: int
  batch_size: int
  steps_per_run: int
  lm: bool = False

  def describe(self) -> str:
    def name(model, kw):
      return f"{model}({', '.join(f'{k}={v}' for k, v in kw.items())})" \
          if kw else model
    return (f"{name(self.student, self.student_kwargs)} ← "
            f"{name(self.teacher, self.teacher_kwargs)}")


_VIT = dict(patch_size=4, mlp_ratio=2)
WORKLOADS = {
    "resnet": Workload("resnet8x4", {}, "resnet32x4", {}, (32, 32, 3), 100,
                       64, 1),
    "mlp": Workload("mlp", {"hidden_sizes": (512, 512)}, "cnn1d", {}, (40,),
                    10, 256, 200),
    "vit": Workload("vit", dict(dim=192, depth=4, num_heads=3, **_VIT), "vit",
                    dict(dim=384, depth=6, num_heads=6, **_VIT), (32, 32, 3),
                    100, 64, 2),
    "lm": Workload("causal_lm", dict(dim=64, depth=2, num_heads=4),
                   "causal_lm", dict(dim=128, depth=3, num_heads=4), (128,),
                   256, 32, 8, lm=True),
}

SGD = dict(learning_rate=0.05, momentum=0.9, weight_decay=5e-4)
ADAMW = dict(learning_rate=3e-3, weight_decay=0.01)
SCHEDULE_STEPS = 10_000
KD_TEMPERATURE, LM_TEMPERATURE = 4.0, 1.0


# --------------------------------------------------------------- machine ---

def machine_description(torch_threads: int) -> dict[str, Any]:
  import flax
  import jax
  import jaxlib
  import optax
  import torch
  import torchdistill
  from machine import cpu_model
  cpu = cpu_model()
  mem_gib = None
  try:
    with open("/proc/meminfo") as f:
      for line in f:
        if line.startswith("MemTotal"):
          mem_gib = int(line.split()[1]) / 2**20
          break
  except OSError:
    pass
  return {
      "cpu": cpu, "cores": os.cpu_count(), "memory_gib": mem_gib,
      "jax": jax.__version__, "jaxlib": jaxlib.__version__,
      "flax": flax.__version__, "optax": optax.__version__,
      "torch": torch.__version__, "torchdistill": torchdistill.__version__,
      "jax_device": str(jax.devices()[0].device_kind),
      "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""),
      "torch_threads": torch_threads,
      "python": platform.python_version(),
      "load_average_at_start": load_average(),
      **_git_state(),
  }


def _git_state() -> dict[str, Any]:
  """The commit timed and the files of jdistill/ that differ from it."""
  state = git_state("jdistill")
  if state is None:
    return {}
  return {"jdistill_commit": state[0], "jdistill_uncommitted": state[1]}


def matmul_peak(n: int = 2048, reps: int = 10) -> dict[str, float]:
  """Best float32 ``n×n @ n×n`` GFLOP/s of a jitted jnp matmul and of
  ``torch.mm``."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  import torch
  rng = np.random.default_rng(0)
  a = rng.normal(size=(n, n)).astype(np.float32)
  b = rng.normal(size=(n, n)).astype(np.float32)
  flops = 2.0 * n ** 3
  f = jax.jit(jnp.matmul)
  ja, jb = jnp.asarray(a), jnp.asarray(b)
  f(ja, jb).block_until_ready()
  best_j = math.inf
  for _ in range(reps):
    t0 = time.perf_counter()
    f(ja, jb).block_until_ready()
    best_j = min(best_j, time.perf_counter() - t0)
  ta, tb = torch.from_numpy(a), torch.from_numpy(b)
  torch.mm(ta, tb)
  best_t = math.inf
  for _ in range(reps):
    t0 = time.perf_counter()
    torch.mm(ta, tb)
    best_t = min(best_t, time.perf_counter() - t0)
  return {"jax": flops / best_j / 1e9, "torch": flops / best_t / 1e9}


# ----------------------------------------------------------- the builders ---

def make_batch(w: Workload, seed: int = 0):
  """The workload's host batch: random inputs and labels (speed only)."""
  import numpy as np
  rng = np.random.default_rng(seed)
  if w.lm:
    x = rng.integers(0, w.num_classes, (w.batch_size, *w.input_shape))
    y = rng.integers(0, w.num_classes, (w.batch_size, *w.input_shape))
    return {"x": x.astype(np.int32), "y": y.astype(np.int32)}
  return {"x": rng.normal(size=(w.batch_size, *w.input_shape)
                          ).astype(np.float32),
          "y": rng.integers(0, w.num_classes, w.batch_size).astype(np.int32)}


def build_nnx_models(w: Workload):
  """jdistill's student and teacher, built by ``create_model`` with the
  library's defaults except the workload's kwargs."""
  from flax import nnx
  from jdistill.models import create_model
  extra = ({"attention_impl": FLAGS.attention_impl}
           if w.lm and FLAGS.is_parsed() else {})
  student = create_model(w.student, num_classes=w.num_classes,
                         input_shape=w.input_shape, rngs=nnx.Rngs(0),
                         **w.student_kwargs, **extra)
  teacher = create_model(w.teacher, num_classes=w.num_classes,
                         input_shape=w.input_shape, rngs=nnx.Rngs(1),
                         **w.teacher_kwargs, **extra)
  return student, teacher


class JdistillColumn:
  """jdistill's compiled step on a 1-device mesh, as a user would build it."""

  def __init__(self, w: Workload, student_nnx, teacher_nnx, host_batch, *,
               cached_logits: bool = False):
    import jax
    from jdistill import data as jdata
    from jdistill import train as jtrain
    from jdistill.train import lm as jlm
    self._jax = jax
    mesh = jtrain.make_data_mesh(1)
    student, sp, sms = jtrain.FunctionalModel.split(student_nnx)
    teacher, tp, tms = jtrain.FunctionalModel.split(teacher_nnx)
    if w.lm:
      tx = jtrain.make_optimizer("adamw", jtrain.make_schedule(
          ADAMW["learning_rate"], schedule="cosine",
          num_steps=SCHEDULE_STEPS), weight_decay=ADAMW["weight_decay"])
      objective = jlm.LMDistillObjective(loss="kd", temperature=LM_TEMPERATURE,
                                         kd_weight=1.0, ce_weight=0.0)
      step = jlm.make_lm_distill_step(student, tx, objective, teacher)
    else:
      tx = jtrain.make_optimizer("sgd", jtrain.make_schedule(
          SGD["learning_rate"], schedule="cosine", num_steps=SCHEDULE_STEPS),
          momentum=SGD["momentum"], weight_decay=SGD["weight_decay"])
      objective = jtrain.DistillObjective(loss="kd", temperature=KD_TEMPERATURE,
                                          ce_weight=1.0, kd_weight=1.0)
      step = jtrain.make_distill_step(student, teacher, tx, objective)
    self.step = jtrain.compile_step(step, mesh)
    self.state = jtrain.replicate(jtrain.TrainState.create(sp, sms, tx, 0),
                                  mesh)
    self.teacher_vars = jtrain.replicate(
        {"params": tp, "model_state": tms}, mesh)
    if cached_logits:
      # What --teacher_logits=cached does: the teacher ran once, before
      # training; its logits come with the batch and the step skips it.
      host_batch = dict(host_batch)
      host_batch["teacher_logits"] = jtrain.predict_logits(
          teacher, self.teacher_vars, jdata.NamedArraysSource(host_batch),
          batch_size=len(host_batch["y"]), mesh=mesh)
    self.batch = jtrain.put_batch(host_batch, mesh)

  def run(self, num_steps: int):
    """``num_steps`` steps, host-synced every `SYNC_EVERY` steps and at the
    end; returns the last step's metrics."""
    metrics = None
    for i in range(num_steps):
      self.state, metrics = self.step(self.state, self.teacher_vars,
                                      self.batch)
      if (i + 1) % SYNC_EVERY == 0:
        self._jax.block_until_ready(metrics)
    self._jax.block_until_ready((self.state, metrics))
    return metrics

  def losses(self, num_steps: int) -> list[float]:
    out = []
    for _ in range(num_steps):
      out.append(float(self.run(1)["loss"]))
    return out

  def flops(self) -> float:
    """XLA-counted FLOPs of one compiled step."""
    compiled = self.step.lower(self.state, self.teacher_vars,
                               self.batch).compile()
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):  # Older jax: one dict per module.
      return float(sum(c.get("flops", 0.0) for c in cost))
    return float(cost["flops"])


class TorchColumn:
  """The same step in PyTorch with torchdistill's ``KDLoss``."""

  def __init__(self, w: Workload, student_nnx, teacher_nnx, host_batch, *,
               channels_last: bool = False, compile: bool = False):
    import numpy as np
    import torch
    from torchdistill.losses.mid_level import KDLoss
    import torch_models
    self._torch = torch
    self.lm = w.lm
    self.student = torch_models.load_from_nnx(torch_models.mirror(
        w.student, num_classes=w.num_classes, input_shape=w.input_shape,
        **w.student_kwargs), student_nnx)
    self.teacher = torch_models.load_from_nnx(torch_models.mirror(
        w.teacher, num_classes=w.num_classes, input_shape=w.input_shape,
        **w.teacher_kwargs), teacher_nnx)
    self.student.train()
    self.teacher.eval().requires_grad_(False)
    x = host_batch["x"]
    if w.lm:
      self.x = torch.from_numpy(x.astype(np.int64))
      self.y = torch.from_numpy(host_batch["y"].astype(np.int64))
    else:
      if w.student.startswith("resnet"):  # NHWC -> PyTorch's NCHW.
        x = np.ascontiguousarray(x.transpose(0, 3, 1, 2))
      self.x = torch.from_numpy(x)
      self.y = torch.from_numpy(host_batch["y"].astype(np.int64))
    if channels_last:
      fmt = torch.channels_last
      self.student = self.student.to(memory_format=fmt)
      self.teacher = self.teacher.to(memory_format=fmt)
      self.x = self.x.contiguous(memory_format=fmt)
    if w.lm:
      self.kd = KDLoss("logits", "output", "logits", "output",
                       temperature=LM_TEMPERATURE, alpha=0.0, beta=1.0)
      self.opt = torch.optim.AdamW(self.student.parameters(),
                                   lr=ADAMW["learning_rate"],
                                   weight_decay=ADAMW["weight_decay"])
    else:
      self.kd = KDLoss("logits", "output", "logits", "output",
                       temperature=KD_TEMPERATURE, alpha=1.0, beta=1.0)
      self.opt = torch.optim.SGD(self.student.parameters(),
                                 lr=SGD["learning_rate"],
                                 momentum=SGD["momentum"], nesterov=True,
                                 weight_decay=SGD["weight_decay"])
    self.sched = torch.optim.lr_scheduler.CosineAnnealingLR(
        self.opt, T_max=SCHEDULE_STEPS)
    self.loss_fn = torch.compile(self._loss) if compile else self._loss

  def _loss(self, x, y):
    with self._torch.no_grad():
      t_logits = self.teacher(x)
    s_logits = self.student(x)
    if self.lm:  # Token-level KD: every position is a row.
      t_logits = t_logits.reshape(-1, t_logits.shape[-1])
      s_logits = s_logits.reshape(-1, s_logits.shape[-1])
    return self.kd({"logits": {"output": s_logits}},
                   {"logits": {"output": t_logits}}, y)

  def step(self):
    self.opt.zero_grad(set_to_none=True)
    loss = self.loss_fn(self.x, self.y)
    loss.backward()
    self.opt.step()
    self.sched.step()
    return loss

  def run(self, num_steps: int):
    loss = None
    for _ in range(num_steps):
      loss = self.step()
    return loss

  def losses(self, num_steps: int) -> list[float]:
    return [float(self.step().detach()) for _ in range(num_steps)]


def build_column(name: str, w: Workload, student_nnx, teacher_nnx,
                 host_batch):
  if name == "jdistill":
    return JdistillColumn(w, student_nnx, teacher_nnx, host_batch)
  if name == "jdistill_cached_logits":
    return JdistillColumn(w, student_nnx, teacher_nnx, host_batch,
                          cached_logits=True)
  if name == "torch_eager":
    return TorchColumn(w, student_nnx, teacher_nnx, host_batch)
  if name == "torch_channels_last":
    return TorchColumn(w, student_nnx, teacher_nnx, host_batch,
                       channels_last=True)
  if name == "torch_compile":
    return TorchColumn(w, student_nnx, teacher_nnx, host_batch, compile=True)
  raise ValueError(name)


def applies(column: str, workload: str) -> bool:
  if column == "jdistill_cached_logits":
    return not WORKLOADS[workload].lm  # LMs: the teacher caches of issue 7.
  return column != "torch_channels_last" or workload == "resnet"


# ------------------------------------------------------------------ check ---

def _rel(a, b) -> float:
  import numpy as np
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / max(np.max(np.abs(a)), 1e-30))


def check_workload(name: str, w: Workload) -> tuple[list[str], bool]:
  """Copies jdistill's weights into the mirrors; compares parameter counts,
  eval logits (teacher and student), train-mode student logits, and the
  first `CHECK_STEPS` training losses of the two steps. Returns report
  lines and whether everything agreed."""
  import numpy as np
  import torch
  import torch_models
  from flax import nnx
  from jdistill.models import count_params

  student, teacher = build_nnx_models(w)
  host = make_batch(w)
  lines, ok = [], True
  # Move BatchNorm running statistics off their (0, 1) initial values, so
  # that copying them is tested too.
  for model in (student, teacher):
    if w.student.startswith("resnet"):
      for seed in (1, 2):
        model(make_batch(w, seed)["x"], train=True)

  def to_torch_x(x):
    if w.lm:
      return torch.from_numpy(x.astype(np.int64))
    if w.student.startswith("resnet"):
      x = x.transpose(0, 3, 1, 2)
    return torch.from_numpy(np.ascontiguousarray(x))

  for role, nnx_model, model_name, kw in (
      ("student", student, w.student, w.student_kwargs),
      ("teacher", teacher, w.teacher, w.teacher_kwargs)):
    mirror = torch_models.load_from_nnx(torch_models.mirror(
        model_name, num_classes=w.num_classes, input_shape=w.input_shape,
        **kw), nnx_model)
    n_j, n_t = count_params(nnx_model), torch_models.count_params(mirror)
    good = n_j == n_t
    ok &= good
    lines.append(f"{name}/{role} {model_name}: parameters jdistill {n_j:,} "
                 f"torch {n_t:,} {'ok' if good else 'MISMATCH'}")
    modes = [False] + ([True] if role == "student" and
                       model_name.startswith("resnet") else [])
    for train in modes:
      # jdistill's train-mode call updates its BatchNorm statistics: run a
      # clone so that the step below starts from the same variables.
      run = nnx.clone(nnx_model) if train else nnx_model
      j_logits = np.asarray(run(host["x"], train=train)[0])
      mirror.train(train)
      with torch.no_grad():
        t_logits = mirror(to_torch_x(host["x"])).numpy()
      rel = _rel(j_logits, t_logits)
      diff = float(np.max(np.abs(j_logits - t_logits)))
      good = j_logits.shape == t_logits.shape and rel < LOGIT_TOL
      ok &= good
      lines.append(f"{name}/{role} logits ({'train' if train else 'eval'} "
                   f"mode) {tuple(j_logits.shape)}: max |Δ| {diff:.2e}, "
                   f"relative to max |logit| {rel:.2e} "
                   f"{'ok' if good else 'MISMATCH'} (tol {LOGIT_TOL:g})")
  # The whole step: the first training losses from identical weights.
  j_losses = JdistillColumn(w, student, teacher, host).losses(CHECK_STEPS)
  t_losses = TorchColumn(w, student, teacher, host).losses(CHECK_STEPS)
  rels = [abs(a - b) / abs(a) for a, b in zip(j_losses, t_losses)]
  good = max(rels) < LOSS_TOL
  ok &= good
  lines.append(f"{name} step losses jdistill "
               f"{', '.join(f'{v:.6f}' for v in j_losses)} | torch "
               f"{', '.join(f'{v:.6f}' for v in t_losses)}: max relative Δ "
               f"{max(rels):.2e} {'ok' if good else 'MISMATCH'} "
               f"(tol {LOSS_TOL:g})")
  return lines, ok


# ----------------------------------------------------------------- timing ---

def time_workload(name: str, w: Workload, columns: list[str], repeats: int,
                  steps_per_run: int, warmup: int, log: Callable):
  """Builds, warms up and times every applicable column, interleaved."""
  student, teacher = build_nnx_models(w)
  from jdistill.models import count_params
  sizes = (count_params(student), count_params(teacher))
  host = make_batch(w)
  cols, first_step_s, flops, lever_flops = {}, {}, None, {}
  for c in columns:
    if not applies(c, name):
      continue
    col = build_column(c, w, student, teacher, host)
    t0 = time.perf_counter()
    col.run(1)
    first_step_s[c] = time.perf_counter() - t0
    col.run(max(warmup - 1, 1))
    cols[c] = col
    log(f"  {name}/{c}: first step (with compilation) "
        f"{first_step_s[c]:.1f} s")
    if c == "jdistill":
      flops = col.flops()
    if c in LEVER_COLUMNS:
      lever_flops[c] = col.flops()
  if flops is None:  # jdistill not timed: still count its FLOPs.
    flops = JdistillColumn(w, student, teacher, host).flops()
  times = {c: [] for c in cols}
  for r in range(repeats):
    for c, col in cols.items():
      t0 = time.perf_counter()
      col.run(steps_per_run)
      times[c].append((time.perf_counter() - t0) / steps_per_run)
    log(f"  {name} round {r + 1}/{repeats}: " + ", ".join(
        f"{c} {1e3 * times[c][-1]:.1f} ms" for c in cols))
  return {"sizes": sizes, "flops": flops, "lever_flops": lever_flops,
          "first_step_s": first_step_s,
          "seconds_per_step": times, "steps_per_run": steps_per_run}


def _fmt_rate(v: float) -> str:
  return f"{v:,.0f}" if v >= 100 else f"{v:,.1f}"


def tables(results: dict, columns: list[str], peak: float) -> str:
  out = []
  head = "| workload | student ← teacher (params) | batch | " + " | ".join(
      columns) + " |"
  sep = "|---" * (3 + len(columns)) + "|"
  out += ["Samples/s (median; higher is better):", "", head, sep]
  for name, r in results.items():
    w = WORKLOADS[name]
    cells = []
    for c in columns:
      t = r["seconds_per_step"].get(c)
      cells.append(_fmt_rate(w.batch_size / statistics.median(t))
                   if t else "-")
    out.append(f"| {name} | {w.describe()} ({r['sizes'][0] / 1e6:.2f}M ← "
               f"{r['sizes'][1] / 1e6:.2f}M) | {w.batch_size} | "
               + " | ".join(cells) + " |")
  torch_cols = [c for c in columns if c.startswith("torch")]
  if "jdistill" in columns and torch_cols:
    out += ["", "jdistill ÷ PyTorch (samples/s ratio; > 1: jdistill faster):",
            "", "| workload | " + " | ".join(torch_cols) + " |",
            "|---" * (1 + len(torch_cols)) + "|"]
    for name, r in results.items():
      tj = statistics.median(r["seconds_per_step"]["jdistill"])
      cells = []
      for c in torch_cols:
        t = r["seconds_per_step"].get(c)
        cells.append(f"{statistics.median(t) / tj:.2f}" if t else "-")
      out.append(f"| {name} | " + " | ".join(cells) + " |")
  levers = [c for c in columns if c in LEVER_COLUMNS]
  if "jdistill" in columns and levers:
    out += ["", "Levers (not the peers' work): speed-up over the jdistill "
            "column. jdistill_cached_logits = teacher logits computed once "
            "before training (--teacher_logits=cached; valid without "
            "augmentation), so the step has no teacher forward:", ""]
    for name, r in results.items():
      tj = statistics.median(r["seconds_per_step"]["jdistill"])
      cells = [f"{c} {tj / statistics.median(r['seconds_per_step'][c]):.2f}×"
               for c in levers if r["seconds_per_step"].get(c)]
      if cells:
        out.append(f"- {name}: " + ", ".join(cells))
  out += ["", f"Utilisation: XLA-counted FLOPs of the step × steps/s, GFLOP/s "
          f"(% of the {peak:.0f} GFLOP/s matmul peak):", "",
          "| workload | GFLOP/step | " + " | ".join(columns) + " |",
          "|---" * (2 + len(columns)) + "|"]
  for name, r in results.items():
    cells = []
    for c in columns:
      t = r["seconds_per_step"].get(c)
      if not t:
        cells.append("-")
        continue
      g = r.get("lever_flops", {}).get(c, r["flops"]) / statistics.median(
          t) / 1e9
      cells.append(f"{g:.1f} ({100 * g / peak:.0f}%)")
    out.append(f"| {name} | {r['flops'] / 1e9:.2f} | " + " | ".join(cells)
               + " |")
  out += ["", "First step, compilation included (s; torch.compile's time "
          "depends on what Inductor's on-disk cache already holds):", "",
          "| workload | steps/run | " + " | ".join(columns) + " |",
          "|---" * (2 + len(columns)) + "|"]
  for name, r in results.items():
    cells = [f"{r['first_step_s'][c]:.1f}" if c in r["first_step_s"]
             else "-" for c in columns]
    out.append(f"| {name} | {r['steps_per_run']} | " + " | ".join(cells)
               + " |")
  return "\n".join(out)


def main(argv):
  del argv
  for name in FLAGS.workloads:
    if name not in WORKLOADS:
      raise app.UsageError(f"--workloads: unknown workload '{name}'; "
                           f"expected some of {', '.join(WORKLOADS)}")
  for c in FLAGS.columns:
    if c not in COLUMNS:
      raise app.UsageError(f"--columns: unknown column '{c}'; expected some "
                           f"of {', '.join(COLUMNS)}")
  if FLAGS.repeats < 1 or FLAGS.steps_per_run < 0 or FLAGS.warmup_steps < 3:
    raise app.UsageError("--repeats >= 1, --steps_per_run >= 0 and "
                         "--warmup_steps >= 3 are required")
  allocator = "system default"
  if FLAGS.cpu_allocator == "retain":
    from jdistill import runtime
    allocator = runtime.retain_host_memory()
  import torch
  torch.set_num_threads(FLAGS.torch_threads)

  def log(msg):
    print(msg, file=sys.stderr, flush=True)

  if FLAGS.check:
    all_ok = True
    for name in FLAGS.workloads:
      lines, ok = check_workload(name, WORKLOADS[name])
      all_ok &= ok
      print("\n".join(lines), flush=True)
    print("check: " + ("all architectures agree" if all_ok else "FAILED"))
    if not all_ok:
      sys.exit(1)
    return

  machine = machine_description(FLAGS.torch_threads)
  machine["cpu_allocator"] = allocator
  machine["attention_impl"] = FLAGS.attention_impl
  log(allocator)
  peak = matmul_peak()
  peak_max = max(peak.values())
  log(f"matmul peak GFLOP/s: jax {peak['jax']:.1f}, torch {peak['torch']:.1f}")
  results = {}
  for name in FLAGS.workloads:
    w = WORKLOADS[name]
    steps = FLAGS.steps_per_run or w.steps_per_run
    log(f"{name}: {w.describe()}, batch {w.batch_size}, {steps} steps/run")
    results[name] = time_workload(name, w, FLAGS.columns, FLAGS.repeats,
                                  steps, FLAGS.warmup_steps, log)
  m = machine
  print(f"Machine: {m['cpu']}, {m['cores']} cores, "
        f"{m['memory_gib']:.0f} GiB; jax {m['jax']} / jaxlib {m['jaxlib']} "
        f"(flax {m['flax']}, optax {m['optax']}), torch {m['torch']}, "
        f"torchdistill {m['torchdistill']}; torch threads "
        f"{m['torch_threads']}; XLA_FLAGS={m['XLA_FLAGS'] or '(unset)'}; "
        f"jdistill at {m.get('jdistill_commit', '?')}"
        + (f" + uncommitted {', '.join(m['jdistill_uncommitted'])}"
           if m.get("jdistill_uncommitted") else "") + ".")
  machine["load_average_at_end"] = load_average()
  print(f"Load average (1/5/15 min) at start {m['load_average_at_start']}, "
        f"at end {m['load_average_at_end']}.")
  print(f"float32 matmul 2048³: jax {peak['jax']:.0f} GFLOP/s, torch "
        f"{peak['torch']:.0f} GFLOP/s (peak used below: {peak_max:.0f}). "
        f"{FLAGS.repeats} interleaved rounds per workload.\n")
  print(tables(results, FLAGS.columns, peak_max))
  if FLAGS.out:
    with open(FLAGS.out, "w") as f:
      json.dump({"machine": machine, "matmul_peak_gflops": peak,
                 "repeats": FLAGS.repeats, "columns": FLAGS.columns,
                 "workloads": {
                     n: {**dataclasses.asdict(WORKLOADS[n]), **r}
                     for n, r in results.items()}}, f, indent=1)
    log(f"wrote {FLAGS.out}")


if __name__ == "__main__":
  app.run(main)
