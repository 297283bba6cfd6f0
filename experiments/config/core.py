"""Config sections every program reads: the run, the data, the models,
the optimiser, the scale, and compare/tune's methods."""

from __future__ import annotations

import dataclasses
from typing import Any

from experiments.config.options import Section, check, one_of, option

import math

from jdistill.data.images import IMAGE_PIPELINES as IMAGE_PIPELINE_AUGMENTS
from jdistill.models import MODEL_NAMES
from jdistill.models.remat import REMAT_NAMES as REMAT_POLICIES
from jdistill.train import sharding as sharding_lib
from jdistill.train.optim import (OPTIMIZERS, SCHEDULES, WEIGHT_DECAY_FILTERS,
                                  check_step_schedule)

TFDS_NORMALIZATIONS = ("minus_one_one", "unit", "cifar100", "imagenet")
IMAGE_PIPELINES = ("off", *IMAGE_PIPELINE_AUGMENTS)
MODES = ("train", "distill", "compare", "tune", "kip", "distill_lm", "cache_lm",
         "born_again", "mutual", "online_distill")
# Modes that train several peers in one state (jdistill.train.mutual).
PEER_MODES = ("mutual", "online_distill")
LM_MODES = ("distill_lm", "cache_lm")
PLAN_MODES = ("train", "distill", "distill_lm", "mutual", "online_distill")
TEACHER_LOGITS = ("auto", "cached", "online")
CPU_DOT_LIBRARIES = ("auto", "ynnpack", "eigen")
CPU_ALLOCATORS = ("retain", "system")
ON_NONFINITE = ("skip", "stop", "ignore")
PRECISIONS = ("float32", "bfloat16", "float16")
YNN_FLAG = "--xla_cpu_experimental_ynn_fusion_type"


@dataclasses.dataclass(frozen=True)
class RunSection(Section):
  """What runs where: the mode, its directory, seeds, logging, checkpoints and
  failure handling."""

  mode: str = option(
      "train", "enum",
      "train: a teacher or a from-labels baseline; distill: logit "
      "KD from --teacher_checkpoint; compare: teacher, students "
      "from labels and distilled students over --seeds, as a table; "
      "tune: choose each method's hyperparameters on the validation "
      "split from --tune_grid and write tuned method flagfiles; "
      "kip: kernel-ridge dataset distillation (--kip_method) at "
      "each --images_per_class, evaluated "
      "against random real subsets and the full training set; "
      "distill_lm: byte-level LM distillation on the Python "
      "stdlib (teacher, baseline, online KD and KD from dense, "
      "top-k and sampled teacher caches), as a table; cache_lm: "
      "write one teacher cache (--lm_cache_form) to "
      "--lm_cache_dir.",
      choices=MODES)
  workdir: str = option(
      "runs/default", "str",
      "Run directory: checkpoints, "
      "metrics.jsonl, model.json. A rerun resumes from it.")
  seed: int = option(
      0, "int",
      "Seed of initialisation and data order.")
  seeds: tuple[int, ...] = option(
      (0, 1, 2), "ints",
      "Student seeds of --mode=compare.")
  log_every: int = option(
      100, "int",
      "Progress line every N steps.")
  eval_every: int = option(
      0, "int",
      "Evaluate every N steps (0: at the end only).")
  checkpoint_every: int = option(
      500, "int",
      "Checkpoint every N steps (0: at the end only).")
  max_to_keep: int = option(
      3, "int",
      "Checkpoints to keep.")
  on_nonfinite: str = option(
      "stop", "enum",
      "A step whose loss or gradients are NaN/inf: 'stop' ends the "
      "run with an error naming the step and the first non-finite "
      "loss term (the state before the step is checkpointed); "
      "'skip' leaves the state unchanged and counts the skipped "
      "steps (metric nonfinite_skipped); 'ignore' applies the "
      "update anyway.",
      choices=ON_NONFINITE)
  peer_timeout_s: float = option(
      60.0, "float",
      "Multi-process runs: "
      "a process whose peer shows no sign of life for this many "
      "seconds (it died or hangs) stops with a one-line error "
      "instead of waiting in its next collective "
      "(experiments/watchdog.py).")
  plan: bool = option(
      False, "bool",
      "Do not train: compile the step for "
      "--mesh on abstract shapes and print per-device memory "
      "(XLA's memory analysis) against --device_memory_gb.")


  def validate(self) -> None:
    one_of(self, "mode", MODES)
    for name in ("log_every", "eval_every", "checkpoint_every"):
      check(getattr(self, name) >= 0, f"--{name}", getattr(self, name),
            "a non-negative integer")
    check(self.max_to_keep > 0, "--max_to_keep", self.max_to_keep,
          "a positive integer")
    check(bool(self.workdir), "--workdir", self.workdir, "a directory path")
    check(math.isfinite(self.peer_timeout_s) and self.peer_timeout_s > 0,
          "--peer_timeout_s", self.peer_timeout_s, "a positive number of "
          "seconds")
    one_of(self, "on_nonfinite", ON_NONFINITE)
    if self.plan:
      check(self.mode in PLAN_MODES, "--plan", self.mode,
            f"used with --mode among {', '.join(PLAN_MODES)}")


@dataclasses.dataclass(frozen=True)
class DataSection(Section):
  """The dataset and its splits."""

  dataset: str = option(
      "mnist1d", "str",
      "mnist1d, digits, digits_flat, digits32 (digits upscaled to "
      "32x32x3, CIFAR's shape) or "
      "tfds:<name> (array_record under --data_dir).")
  data_dir: str | None = option(
      None, "str",
      "TFDS data directory.")
  tfds_train_split: str = option(
      "train", "str",
      "TFDS train split.")
  tfds_test_split: str = option(
      "test", "str",
      "TFDS eval split.")
  tfds_input_key: str = option(
      "image", "str",
      "TFDS input feature.")
  tfds_label_key: str = option(
      "label", "str",
      "TFDS label feature.")
  tfds_normalization: str = option(
      "minus_one_one", "enum",
      "How uint8 TFDS images become floats, (x/255 - mean)/std: "
      "minus_one_one ([-1, 1]), unit ([0, 1]), cifar100 or imagenet "
      "(the per-channel constants a PyTorch teacher was trained with: "
      "mdistiller's CIFAR-100 teachers, torchvision's ImageNet weights).",
      choices=TFDS_NORMALIZATIONS)
  image_pipeline: str = option(
      "off", "enum",
      "tfds:<name> image datasets: decode (JPEG/PNG, no TensorFlow) and "
      "augment the images on the host in --data_workers Grain processes, "
      "as torchvision does: cifar (train: zero-pad 4, random crop, flip; "
      "eval: as stored), imagenet (train: random-resized crop to "
      "--image_size, flip; eval: resize to --image_size*256/224, centre "
      "crop), center_crop (the eval view for both). off: records are "
      "stacked as stored (fixed-shape uint8 arrays), augmented on device "
      "by --augment.",
      choices=IMAGE_PIPELINES)
  image_size: int = option(
      0, "int",
      "--image_pipeline: side of the square images the model sees; 0: the "
      "stored size (which must then be fixed and square).")
  data_workers: str = option(
      "auto", "str",
      "--image_pipeline: Grain worker processes per host decoding and "
      "augmenting: a number (0: in the training process) or auto (one per "
      "CPU core this process may use). The batches do not depend on it.")
  validation_fraction: float = option(
      0.0, "float",
      "Hold out this share of the training set (stratified) and "
      "evaluate on it instead of the test set; for choosing "
      "hyperparameters. 0: evaluate on the test set.")


  def validate(self) -> None:
    check(0 <= self.validation_fraction < 1, "--validation_fraction",
          self.validation_fraction, "a number in [0, 1)")
    one_of(self, "tfds_normalization", TFDS_NORMALIZATIONS)
    one_of(self, "image_pipeline", IMAGE_PIPELINES)
    if self.image_pipeline != "off":
      check(self.dataset.startswith("tfds:"), "--image_pipeline",
            self.image_pipeline, "used with --dataset=tfds:<name> (the "
            "embedded datasets are arrays; use --augment)")
    check(self.image_size >= 0, "--image_size", self.image_size,
          "a positive side in pixels, or 0 for the stored size")
    check(self.data_workers == "auto" or self.data_workers.isdigit(),
          "--data_workers", self.data_workers,
          "auto (one per core) or a number of processes (0: in the training "
          "process)")

  @property
  def worker_count(self) -> int:
    """``--data_workers`` as a number (-1: one per core)."""
    return -1 if self.data_workers == "auto" else int(self.data_workers)


@dataclasses.dataclass(frozen=True)
class ModelSection(Section):
  """The student and the single teacher."""

  model: str = option(
      "mlp", "str",
      "Model trained by this run (student in "
      "distill/compare): mlp, cnn1d, convnet, resnet8x4, ...")
  model_kwargs: tuple[tuple[str, Any], ...] = option(
      (), "json",
      "JSON object of model options, e.g. "
      "'{\"hidden_sizes\": [256, 256]}'.")
  teacher_model: str = option(
      "cnn1d", "str",
      "Teacher architecture trained by --mode=compare.")
  teacher_model_kwargs: tuple[tuple[str, Any], ...] = option(
      (), "json",
      "JSON options of the teacher.")
  teacher_checkpoint: str | None = option(
      None, "str",
      "Workdir of a --mode=train run to distill from.")
  teacher_torch_checkpoint: str | None = option(
      None, "str",
      "A PyTorch checkpoint of --teacher_model to distill from "
      "(instead of --teacher_checkpoint): .safetensors or .npz (no torch "
      "needed), .pth/.pt/.tar (torch.load, weights only); a state dict "
      "with mdistiller's/torchvision's names, plain or under 'model' "
      "(mdistiller's cifar_teachers layout) or 'state_dict'.")
  teacher_logits: str = option(
      "auto", "enum",
      "--mode=distill with one teacher: 'cached' runs the teacher "
      "once over the training split before training and feeds its "
      "logits with each batch (valid because the training inputs "
      "are not augmented, so the teacher's outputs never change); "
      "'online' runs the teacher in every step; 'auto' caches "
      "unless feature terms need the teacher's features or the "
      "run has several processes.",
      choices=TEACHER_LOGITS)


  def validate(self) -> None:
    for flag, name in (("--model", self.model),
                       ("--teacher_model", self.teacher_model)):
      check_model_name(flag, name)
    one_of(self, "teacher_logits", TEACHER_LOGITS)


@dataclasses.dataclass(frozen=True)
class OptimSection(Section):
  """Steps, batches, optimiser and learning-rate schedule."""

  num_steps: int = option(
      1000, "int",
      "Training steps of this run "
      "(of the students in --mode=compare).")
  teacher_num_steps: int = option(
      0, "int",
      "Teacher "
      "training steps in --mode=compare (0: --num_steps).")
  batch_size: int = option(
      128, "int",
      "Global training batch size.")
  eval_batch_size: int = option(
      512, "int",
      "Global evaluation batch size.")
  optimizer: str = option(
      "adamw", "str",
      "adamw, adam or sgd.")
  learning_rate: float = option(
      1e-3, "float",
      "Peak learning rate.")
  teacher_learning_rate: float = option(
      0.0, "float",
      "Teacher's learning rate in --mode=compare (0: same).")
  weight_decay: float = option(
      1e-4, "float",
      "Weight decay.")
  weight_decay_filter: str = option(
      "none", "enum",
      "Parameters --weight_decay leaves alone: none, or bias_and_norm "
      "(every parameter of at most one dimension: biases, BatchNorm and "
      "LayerNorm scales and offsets; timm's filter_bias_and_bn).",
      choices=WEIGHT_DECAY_FILTERS)
  lr_schedule: str = option(
      "cosine", "str",
      "constant, cosine, or step (piecewise constant: times "
      "--lr_decay_rate at each of --lr_decay_boundaries, as "
      "mdistiller/CRD).")
  lr_decay_boundaries: tuple[int, ...] = option(
      (), "ints",
      "--lr_schedule=step: the steps (counted from 0, warm-up "
      "included, strictly increasing, after --warmup_steps) from which "
      "the learning rate is multiplied by another --lr_decay_rate; "
      "boundaries at or past --num_steps never apply.")
  lr_decay_rate: float = option(
      0.1, "float",
      "--lr_schedule=step: factor applied at each boundary.")
  warmup_steps: int = option(
      0, "int",
      "Linear warm-up steps.")
  sgd_momentum: float = option(
      0.9, "float",
      "--optimizer=sgd: momentum (dampening 0).")
  sgd_nesterov: bool = option(
      True, "bool",
      "--optimizer=sgd: Nesterov momentum. --nosgd_nesterov is "
      "torch.optim.SGD's default update (mdistiller, CRD); the weight "
      "decay is always L2 added to the gradient before the momentum, as "
      "torch.optim.SGD's weight_decay.")
  grad_clip_norm: float = option(
      0.0, "float",
      "Clip gradients to this global norm (0: off).")
  label_smoothing: float = option(
      0.0, "float",
      "Label smoothing of the CE term.")


  def validate(self) -> None:
    for name in ("num_steps", "batch_size", "eval_batch_size"):
      check(getattr(self, name) > 0, f"--{name}", getattr(self, name),
            "a positive integer")
    for name in ("teacher_num_steps", "warmup_steps"):
      check(getattr(self, name) >= 0, f"--{name}", getattr(self, name),
            "a non-negative integer")
    one_of(self, "optimizer", OPTIMIZERS)
    one_of(self, "lr_schedule", SCHEDULES)
    one_of(self, "weight_decay_filter", WEIGHT_DECAY_FILTERS)
    check_step_schedule(self.lr_schedule, self.lr_decay_boundaries,
                        self.lr_decay_rate, warmup_steps=self.warmup_steps)
    check(0 <= self.sgd_momentum < 1, "--sgd_momentum", self.sgd_momentum,
          "a number in [0, 1)")
    check(self.learning_rate > 0, "--learning_rate", self.learning_rate,
          "a positive number")
    check(self.teacher_learning_rate >= 0, "--teacher_learning_rate",
          self.teacher_learning_rate, "a non-negative number (0: same as "
          "--learning_rate)")
    check(self.weight_decay >= 0, "--weight_decay", self.weight_decay,
          "a non-negative number")
    check(0 <= self.label_smoothing < 1, "--label_smoothing",
          self.label_smoothing, "a number in [0, 1)")


@dataclasses.dataclass(frozen=True)
class CompareSection(Section):
  """--mode=compare and --mode=tune: the methods and the tuning grid."""

  methods: tuple[str, ...] = option(
      (), "strs",
      "--mode=compare: method flagfiles (loss "
      "flags only, e.g. experiments/flags/methods/logit/dkd.flags)"
      "; each is distilled over --seeds and gets a row of the table."
      " Empty: one method, the loss flags of this run.")
  tune_grid: str | None = option(
      None, "str",
      "--mode=tune: JSON file mapping a "
      "method name (its flagfile's name) to {flag: [candidate "
      "values]}; every combination is tried.")
  tune_output_dir: str | None = option(
      None, "str",
      "--mode=tune: where the tuned "
      "method flagfiles go (default: <workdir>/methods).")


  def validate(self) -> None:
    for path in self.methods:
      check(path.endswith(".flags"), "--methods", path,
            "paths of method flagfiles ending in .flags")


@dataclasses.dataclass(frozen=True)
class ScaleSection(Section):
  """Devices, mesh, sharding, precision, memory and processes."""

  num_devices: int = option(
      0, "int",
      "Devices of the data mesh (0: all).")
  mesh: str = option(
      "", "str",
      "Device mesh as axis:size pairs over "
      "data, fsdp, tensor (and teacher), e.g. data:2,fsdp:4; one "
      "size may be -1 (the rest). Empty: every device on data. "
      "Batches are split over data x fsdp.")
  student_sharding: str = option(
      "auto", "enum",
      "How the student's parameters and optimizer state are split "
      "(jdistill/train/sharding.py): auto (tensor rules, then "
      "fsdp), replicated, fsdp or tensor.",
      choices=list(sharding_lib.PRESETS))
  teacher_sharding: str = option(
      "auto", "enum",
      "The same for the teachers.",
      choices=list(sharding_lib.PRESETS))
  sharding_rules: str = option(
      "", "str",
      "Rules tried before --student_sharding: 'regex=spec;...' "
      "with spec one entry per dimension (an axis, none, a+b or "
      "...), or replicated; e.g. 'lm_head/kernel=...,tensor'.")
  teacher_sharding_rules: str = option(
      "", "str",
      "The same for the teachers' parameters.")
  grad_accum_steps: int = option(
      1, "int",
      "Split each batch into this many micro-batches (lax.scan) "
      "and apply one update: the big batch's result at one "
      "micro-batch's activation memory.")
  precision: str = option(
      "float32", "enum",
      "Student compute dtype: float32; bfloat16 (float32 master "
      "weights, optimizer and loss math); float16 (the same plus "
      "dynamic loss scaling).",
      choices=list(PRECISIONS))
  teacher_precision: str = option(
      "", "str",
      "Teacher forward dtype: float32 or bfloat16 (empty: as "
      "--precision, float16 meaning bfloat16).")
  remat: str = option(
      "none", "enum",
      "Rematerialise the student's blocks in the backward pass "
      "(jax.checkpoint): none, full (save block inputs only), dots "
      "(keep matmul outputs without batch dimensions) or "
      "dots_saveable (keep every matmul output).",
      choices=list(REMAT_POLICIES))
  device_memory_gb: float = option(
      0.0, "float",
      "--plan: memory of "
      "one device in GiB (0: report without a verdict).")
  coordinator_address: str | None = option(
      None, "str",
      "host:port of process 0 for jax.distributed.initialize.")
  num_processes: int = option(
      1, "int",
      "Processes of a multi-host job; 0: "
      "jax.distributed.initialize() detects them (TPU pods, "
      "SLURM, Open MPI, Kubernetes).")
  process_id: int = option(
      0, "int",
      "Index of this process.")
  cpu_dot_library: str = option(
      "auto", "enum",
      "On CPU: which library XLA uses for matmuls. 'ynnpack' is "
      "XLA's default; 'eigen' turns YNNPACK's dots off "
      f"({YNN_FLAG}=); 'auto' picks eigen when --model or "
      "--teacher_model is a ResNet or causal_lm (measured faster) "
      "and ynnpack otherwise. Ignored when XLA_FLAGS already sets "
      f"{YNN_FLAG}.",
      choices=CPU_DOT_LIBRARIES)
  cpu_allocator: str = option(
      "retain", "enum",
      "Host memory allocator setting, applied at program start before JAX "
      "starts: 'retain' keeps freed memory in the process (glibc mallopt: "
      "one arena, no mmap for large blocks, no trimming), so XLA:CPU's "
      "per-step scratch buffers are reused instead of mapped afresh every "
      "step (lm step 1.4-1.8x faster on CPU, docs/performance.md); the "
      "cost is that the process keeps its peak heap (about the step's "
      "temporaries). 'system' leaves the allocator as it is. No effect "
      "without glibc.",
      choices=CPU_ALLOCATORS)


  def validate(self) -> None:
    """The syntax of the mesh, sharding, precision and memory flags (sizes
    are checked against the devices and the model when the mesh is
    built)."""
    check(self.num_devices >= 0, "--num_devices", self.num_devices,
          "a non-negative integer")
    sharding_lib.parse_mesh(self.mesh)
    for name in ("student_sharding", "teacher_sharding"):
      check(getattr(self, name) in sharding_lib.PRESETS, f"--{name}",
            getattr(self, name), f"one of {', '.join(sharding_lib.PRESETS)}")
    sharding_lib.parse_rules(self.sharding_rules, flag="--sharding_rules")
    sharding_lib.parse_rules(self.teacher_sharding_rules,
                             flag="--teacher_sharding_rules")
    check(self.grad_accum_steps >= 1, "--grad_accum_steps",
          self.grad_accum_steps, "a positive integer")
    check(self.precision in PRECISIONS, "--precision", self.precision,
          f"one of {', '.join(PRECISIONS)}")
    check(self.teacher_precision in ("",) + PRECISIONS[:2],
          "--teacher_precision", self.teacher_precision,
          f"empty (as --precision) or one of {', '.join(PRECISIONS[:2])}")
    check(self.remat in REMAT_POLICIES, "--remat", self.remat,
          f"one of {', '.join(REMAT_POLICIES)}")
    check(self.device_memory_gb >= 0, "--device_memory_gb",
          self.device_memory_gb, "a non-negative number of GiB (0: unknown)")
    one_of(self, "cpu_dot_library", CPU_DOT_LIBRARIES)
    one_of(self, "cpu_allocator", CPU_ALLOCATORS)
    check(self.num_processes >= 0, "--num_processes", self.num_processes,
          "a positive integer, or 0 to detect the cluster (TPU pod, SLURM, "
          "Open MPI, Kubernetes)")
    if self.num_processes:
      check(0 <= self.process_id < self.num_processes, "--process_id",
            self.process_id, f"in [0, --num_processes={self.num_processes})")
    if self.num_processes > 1:
      check(bool(self.coordinator_address), "--coordinator_address",
            self.coordinator_address,
            "host:port of process 0 when --num_processes > 1")


def check_model_name(flag: str, name: str) -> None:
  if name not in MODEL_NAMES:
    raise ValueError(f"{flag}: unknown model {name!r}; expected one of: "
                     f"{', '.join(MODEL_NAMES)}")
