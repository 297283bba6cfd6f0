"""Experiment configuration: absl flags -> a validated, frozen `Config`."""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from typing import Any

from absl import flags

from jdistill.models import MODEL_NAMES
from jdistill.train.objective import (FEATURE_LOSSES, DistillObjective,
                                      FeatureTerm, distill_loss_names,
                                      feature_loss_hyperparameters)
from jdistill.train.multi_teacher import (COMBINERS, FEATURE_STANDARDIZATIONS,
                                          MultiTeacherObjective)
from jdistill.train.projectors import PROJECTOR_KINDS
from jdistill.train import sharding as sharding_lib
from jdistill.train.teachers import STACKINGS
from jdistill.train.optim import OPTIMIZERS, SCHEDULES
from jdistill.train.schedules import SCHEDULE_KINDS

MODES = ("train", "distill", "compare", "tune", "kip", "distill_lm", "cache_lm",
         "born_again", "mutual", "online_distill")
AUGMENT_VIEWS = ("shared", "independent")
# Modes that train several peers in one state (jdistill.train.mutual).
PEER_MODES = ("mutual", "online_distill")
KIP_METHODS = ("kip", "rfad", "frepo", "krr_st")
KIP_KERNELS = ("fc_nngp", "fc_ntk", "conv_nngp", "conv_ntk")
LM_RUNS = ("baseline", "online", "dense", "topk", "sampled")
LM_CACHE_FORMS = ("dense", "topk", "sampled")
LM_REDUCTIONS = ("batch", "batch_of_sequences")
TEACHER_LOGITS = ("auto", "cached", "online")
CPU_DOT_LIBRARIES = ("auto", "ynnpack", "eigen")
ON_NONFINITE = ("skip", "stop", "ignore")
PRECISIONS = ("float32", "bfloat16", "float16")
from jdistill.models.remat import REMAT_NAMES as REMAT_POLICIES  # noqa: E402
PLAN_MODES = ("train", "distill", "distill_lm")
# TAID keeps a state of one teacher-student pair.
PEER_LOSSES = tuple(n for n in distill_loss_names() if n != "taid")
# Model families whose KD steps ran faster on XLA CPU with YNNPACK's dots
# turned off (benchmarks/vs_pytorch.py, README "Performance against
# PyTorch"): resnet8x4<-resnet32x4 +17%, causal_lm +19%; mlp and vit were
# 21% and 7% slower, so they keep XLA's default.
EIGEN_DOT_MODELS = ("resnet", "causal_lm")
YNN_FLAG = "--xla_cpu_experimental_ynn_fusion_type"


@dataclasses.dataclass(frozen=True)
class Config:
  """Everything one invocation of ``experiments.main`` needs; see `define_flags`."""

  mode: str = "train"
  workdir: str = "runs/default"
  dataset: str = "mnist1d"
  data_dir: str | None = None
  tfds_train_split: str = "train"
  tfds_test_split: str = "test"
  tfds_input_key: str = "image"
  tfds_label_key: str = "label"
  validation_fraction: float = 0.0
  model: str = "mlp"
  model_kwargs: tuple[tuple[str, Any], ...] = ()
  teacher_model: str = "cnn1d"
  teacher_model_kwargs: tuple[tuple[str, Any], ...] = ()
  teacher_checkpoint: str | None = None
  teacher_checkpoints: tuple[str, ...] = ()
  teacher_seeds: tuple[int, ...] = ()
  teacher_models: tuple[str, ...] = ()
  combiner: str = "mean_probs"
  teacher_weights: tuple[float, ...] = ()
  teacher_drop_rate: float = 0.0
  teacher_feature_standardize: str = "none"
  teacher_stacking: str = "auto"
  teacher_shards: int = 1
  teacher_logits: str = "auto"
  cpu_dot_library: str = "auto"
  seed: int = 0
  seeds: tuple[int, ...] = (0, 1, 2)
  num_steps: int = 1000
  teacher_num_steps: int = 0
  batch_size: int = 128
  eval_batch_size: int = 512
  optimizer: str = "adamw"
  learning_rate: float = 1e-3
  teacher_learning_rate: float = 0.0
  weight_decay: float = 1e-4
  lr_schedule: str = "cosine"
  warmup_steps: int = 0
  grad_clip_norm: float = 0.0
  label_smoothing: float = 0.0
  loss: str = "kd"
  temperature: float = 4.0
  ce_weight: float = 1.0
  kd_weight: float = 1.0
  loss_kwargs: tuple[tuple[str, float], ...] = ()
  standardize_logits: bool = False
  temperature_schedule: str = "constant"
  temperature_end: float | None = None
  ce_weight_schedule: str = "constant"
  ce_weight_end: float | None = None
  kd_weight_schedule: str = "constant"
  kd_weight_end: float | None = None
  temperature_schedule_steps: int = 0
  ce_weight_schedule_steps: int = 0
  kd_weight_schedule_steps: int = 0
  aux_loss: str | None = None
  aux_weight: float = 1.0
  aux_temperature: float | None = None
  aux_loss_kwargs: tuple[tuple[str, float], ...] = ()
  feature_pairs: tuple[str, ...] = ()
  feature_loss: tuple[str, ...] = ("hint",)
  feature_weight: tuple[float, ...] = (1.0,)
  projector: tuple[str, ...] = ("identity",)
  feature_loss_kwargs: tuple[tuple[str, float], ...] = ()
  feature_weight_schedule: str = "constant"
  feature_weight_end: tuple[float, ...] = ()
  feature_weight_schedule_steps: int = 0
  log_every: int = 100
  eval_every: int = 0
  checkpoint_every: int = 500
  max_to_keep: int = 3
  on_nonfinite: str = "stop"
  peer_timeout_s: float = 60.0
  methods: tuple[str, ...] = ()
  tune_grid: str | None = None
  tune_output_dir: str | None = None
  kip_method: str = "kip"
  kernel: str = "fc_ntk"
  kernel_kwargs: tuple[tuple[str, Any], ...] = ()
  images_per_class: tuple[int, ...] = (1, 10, 50)
  learn_labels: bool = True
  zca_strength: float = 0.0
  krr_reg: float = 1e-6
  target_per_class: int = 16
  frepo_pool_size: int = 10
  frepo_max_online_steps: int = 100
  frepo_learning_rate: float = 1e-3
  eval_num_steps: int = 1000
  seq_len: int = 128
  corpus_train_bytes: int = 1_000_000
  corpus_validation_bytes: int = 100_000
  lm_runs: tuple[str, ...] = LM_RUNS
  lm_reduction: str = "batch"
  lm_fused_kd: bool = False
  lm_chunk_size: int = 1024
  lm_topk: int = 8
  lm_topk_variant: str = "renormalized"
  lm_num_samples: int = 12
  lm_proposal_temperature: float = 1.0
  lm_cache_dir: str | None = None
  lm_cache_form: str = "sampled"
  lm_cache_shards: int = 4
  num_devices: int = 0
  mesh: str = ""
  student_sharding: str = "auto"
  teacher_sharding: str = "auto"
  sharding_rules: str = ""
  teacher_sharding_rules: str = ""
  grad_accum_steps: int = 1
  precision: str = "float32"
  teacher_precision: str = ""
  remat: str = "none"
  plan: bool = False
  device_memory_gb: float = 0.0
  coordinator_address: str | None = None
  num_processes: int = 1
  process_id: int = 0
  augment: str = ""
  augment_views: str = "shared"
  ema_teacher_decay: float = 0.0
  ema_warmup: bool = True
  generations: int = 3
  num_peers: int = 2
  peer_models: tuple[str, ...] = ()

  def __post_init__(self):
    _check(self.mode in MODES, "--mode", self.mode,
           f"one of: {', '.join(MODES)}")
    self._check_models()
    for name in ("num_steps", "batch_size", "eval_batch_size"):
      _check(getattr(self, name) > 0, f"--{name}", getattr(self, name),
             "a positive integer")
    for name in ("teacher_num_steps", "log_every", "eval_every",
                 "checkpoint_every", "warmup_steps", "num_devices"):
      _check(getattr(self, name) >= 0, f"--{name}", getattr(self, name),
             "a non-negative integer")
    _check(0 <= self.validation_fraction < 1, "--validation_fraction",
           self.validation_fraction, "a number in [0, 1)")
    _check(self.max_to_keep > 0, "--max_to_keep", self.max_to_keep,
           "a positive integer")
    _check(self.optimizer in OPTIMIZERS, "--optimizer", self.optimizer,
           f"one of: {', '.join(OPTIMIZERS)}")
    _check(self.lr_schedule in SCHEDULES, "--lr_schedule", self.lr_schedule,
           f"one of: {', '.join(SCHEDULES)}")
    _check(self.learning_rate > 0, "--learning_rate", self.learning_rate,
           "a positive number")
    _check(self.teacher_learning_rate >= 0, "--teacher_learning_rate",
           self.teacher_learning_rate, "a non-negative number (0: same as "
           "--learning_rate)")
    _check(self.weight_decay >= 0, "--weight_decay", self.weight_decay,
           "a non-negative number")
    _check(self.loss in distill_loss_names(), "--loss", self.loss,
           f"one of: {', '.join(distill_loss_names())}")
    _check(self.temperature > 0, "--temperature", self.temperature,
           "a positive number")
    _check(self.ce_weight >= 0, "--ce_weight", self.ce_weight,
           "a non-negative number")
    _check(self.kd_weight >= 0, "--kd_weight", self.kd_weight,
           "a non-negative number")
    _check(0 <= self.label_smoothing < 1, "--label_smoothing",
           self.label_smoothing, "a number in [0, 1)")
    for name in ("temperature_end", "aux_temperature"):
      value = getattr(self, name)
      _check(value is None or value > 0, f"--{name}", value,
             "a positive number")
    self.objective()  # Validates the loss, its options and schedules.
    _check(bool(self.workdir), "--workdir", self.workdir, "a directory path")
    self._check_recipes()
    if self.mode == "distill" and self.ema_teacher_decay > 0:
      _check(not self.teacher_checkpoint and not self.teacher_checkpoints,
             "--teacher_checkpoint",
             self.teacher_checkpoint or ",".join(self.teacher_checkpoints),
             "unset with --ema_teacher_decay > 0 (the teacher is the "
             "student's own moving average)")
    elif self.mode == "distill":
      _check(bool(self.teacher_checkpoint) != bool(self.teacher_checkpoints),
             "--teacher_checkpoint", self.teacher_checkpoint,
             "the workdir of a --mode=train run (required by --mode=distill)"
             if not self.teacher_checkpoints else
             "unset when --teacher_checkpoints names the teachers")
    self._check_multi_teacher()
    if self.mode in ("compare", "tune", "born_again", "mutual",
                     "online_distill"):
      _check(len(self.seeds) > 0, "--seeds", self.seeds,
             "at least one seed")
    if self.mode == "tune":
      _check(self.validation_fraction > 0, "--validation_fraction",
             self.validation_fraction, "a fraction in (0, 1) with "
             "--mode=tune, which must not choose on the test set")
      _check(len(self.methods) > 0, "--methods", self.methods,
             "the method flagfiles to tune (required by --mode=tune)")
      _check(bool(self.tune_grid), "--tune_grid", self.tune_grid,
             "a JSON file of candidate values per method (required by "
             "--mode=tune)")
    for path in self.methods:
      _check(path.endswith(".flags"), "--methods", path,
             "paths of method flagfiles ending in .flags")
    self._check_kip_values()
    if self.mode == "kip":
      _check(self.kip_method != "krr_st" or bool(self.teacher_checkpoint),
             "--teacher_checkpoint", self.teacher_checkpoint,
             "the workdir of a --mode=train run whose penultimate "
             "representations --kip_method=krr_st distills")
    self._check_lm_values()
    if self.mode in ("distill_lm", "cache_lm"):
      self._check_lm()
    self._check_scale()
    _check(self.num_processes >= 0, "--num_processes", self.num_processes,
           "a positive integer, or 0 to detect the cluster (TPU pod, SLURM, "
           "Open MPI, Kubernetes)")
    if self.num_processes:
      _check(0 <= self.process_id < self.num_processes, "--process_id",
             self.process_id,
             f"in [0, --num_processes={self.num_processes})")
    if self.num_processes > 1:
      _check(bool(self.coordinator_address), "--coordinator_address",
             self.coordinator_address,
             "host:port of process 0 when --num_processes > 1")
    self._check_numbers()  # After the particular checks' messages.

  def _check_recipes(self) -> None:
    """Augmentation, EMA teacher, born-again and peer flags (the
    --augment spec itself is checked against the data's input shape when
    the run starts)."""
    _check(self.augment_views in AUGMENT_VIEWS, "--augment_views",
           self.augment_views, f"one of {', '.join(AUGMENT_VIEWS)}")
    _check(0 <= self.ema_teacher_decay < 1, "--ema_teacher_decay",
           self.ema_teacher_decay, "a number in [0, 1) (0: no EMA teacher)")
    if self.ema_teacher_decay > 0:
      _check(self.mode in ("distill", "compare", "tune"), "--ema_teacher_decay",
             self.ema_teacher_decay, "0 outside --mode=distill (or a "
             "--methods file of compare/tune)")
      _check(not self.teacher_checkpoints, "--teacher_checkpoints",
             ",".join(self.teacher_checkpoints), "unset with "
             "--ema_teacher_decay > 0")
    _check(self.generations >= 1, "--generations", self.generations,
           "a positive integer (born-again generations after the first)")
    _check(self.num_peers >= 2, "--num_peers", self.num_peers,
           "an integer >= 2 (--mode=mutual trains that many peers)")
    for name in self.peer_models:
      if name not in MODEL_NAMES:
        raise ValueError(f"--peer_models: unknown model {name!r}; expected "
                         f"one of: {', '.join(MODEL_NAMES)}")
    if self.peer_models:
      _check(len(self.peer_models) >= 2, "--peer_models",
             ",".join(self.peer_models), "at least two models")
    if self.mode in PEER_MODES:
      _check(not self.feature_pairs, "--feature_pairs",
             ",".join(self.feature_pairs), f"unset with --mode={self.mode} "
             "(peers distil logits)")
      _check(self.loss in PEER_LOSSES, "--loss", self.loss,
             f"one of {', '.join(PEER_LOSSES)} with --mode={self.mode}")

  def peers(self) -> tuple[str, ...]:
    """The peer architectures of --mode=mutual (``--peer_models``, else
    ``--model`` ``--num_peers`` times) or online_distill (the teacher, then
    the student)."""
    if self.mode == "online_distill":
      return (self.teacher_model, self.model)
    return self.peer_models or (self.model,) * self.num_peers

  def _check_scale(self) -> None:
    """The mesh, sharding, precision and memory flags (their syntax; sizes
    are checked against the devices and the model when the mesh is
    built)."""
    axes = sharding_lib.parse_mesh(self.mesh)
    if self.teacher_shards > 1 and sharding_lib.TEACHER_AXIS in axes and (
        axes[sharding_lib.TEACHER_AXIS] != self.teacher_shards):
      raise ValueError(f"--mesh={self.mesh} has a teacher axis of size "
                       f"{axes[sharding_lib.TEACHER_AXIS]} but --teacher_shards="
                       f"{self.teacher_shards}; give one of them")
    for flag in ("student_sharding", "teacher_sharding"):
      _check(getattr(self, flag) in sharding_lib.PRESETS, f"--{flag}",
             getattr(self, flag), f"one of {', '.join(sharding_lib.PRESETS)}")
    sharding_lib.parse_rules(self.sharding_rules, flag="--sharding_rules")
    sharding_lib.parse_rules(self.teacher_sharding_rules,
                             flag="--teacher_sharding_rules")
    _check(self.grad_accum_steps >= 1, "--grad_accum_steps",
           self.grad_accum_steps, "a positive integer")
    _check(self.batch_size % self.grad_accum_steps == 0, "--batch_size",
           self.batch_size, f"a multiple of --grad_accum_steps="
           f"{self.grad_accum_steps} (each step splits its batch into that "
           "many micro-batches)")
    _check(self.precision in PRECISIONS, "--precision", self.precision,
           f"one of {', '.join(PRECISIONS)}")
    _check(self.teacher_precision in ("",) + PRECISIONS[:2],
           "--teacher_precision", self.teacher_precision,
           f"empty (as --precision) or one of {', '.join(PRECISIONS[:2])}")
    _check(self.remat in REMAT_POLICIES, "--remat", self.remat,
           f"one of {', '.join(REMAT_POLICIES)}")
    _check(self.device_memory_gb >= 0, "--device_memory_gb",
           self.device_memory_gb, "a non-negative number of GiB (0: unknown)")
    if self.plan:
      _check(self.mode in PLAN_MODES, "--plan", self.mode,
             f"used with --mode among {', '.join(PLAN_MODES)}")

  def mesh_axes(self) -> dict[str, int]:
    """``--mesh`` parsed, with the ``teacher`` axis of ``--teacher_shards``."""
    axes = sharding_lib.parse_mesh(self.mesh)
    if self.teacher_shards > 1:
      axes[sharding_lib.TEACHER_AXIS] = self.teacher_shards
    return axes

  def sharding_rules_of(self, who: str) -> "sharding_lib.ShardingRules":
    """The `ShardingRules` of the student (``who="student"``) or of the
    teachers."""
    flag = ("sharding_rules" if who == "student"
            else "teacher_sharding_rules")
    return sharding_lib.ShardingRules(
        preset=getattr(self, f"{who}_sharding"),
        rules=sharding_lib.parse_rules(getattr(self, flag), flag=f"--{flag}"),
        flag=f"--{flag}", preset_flag=f"--{who}_sharding")

  def _check_numbers(self) -> None:
    """Every number of every flag, after the checks of particular flags
    (positive, in [0, 1), ...) have had their say: finite and non-negative
    (no flag means anything at NaN, infinity or a negative value), integers
    below 2**31 (steps, sizes and seeds are int32 on the device)."""
    for field in dataclasses.fields(self):
      value = getattr(self, field.name)
      if field.name.endswith("_kwargs"):
        # Options named by the user: the losses and models check their
        # signs; none of them means anything at NaN or infinity.
        items = [(f"{k}={v}", v) for k, v in value
                 if isinstance(v, (int, float)) and not isinstance(v, bool)]
        for text, v in items:
          _check(math.isfinite(v), f"--{field.name}", text,
                 "finite numbers")
        continue
      values = value if isinstance(value, tuple) else (value,)
      shown = (",".join(map(str, value)) if isinstance(value, tuple)
               else value)
      for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
          continue
        if isinstance(v, int):
          _check(0 <= v < 2**31, f"--{field.name}", shown,
                 "a non-negative integer below 2**31 = 2147483648"
                 if isinstance(value, int) else
                 "non-negative integers below 2**31 = 2147483648")
        else:
          _check(math.isfinite(v) and v >= 0, f"--{field.name}", shown,
                 "a finite, non-negative number"
                 if isinstance(value, float) else
                 "finite, non-negative numbers")

  def _check_models(self) -> None:
    """Model names; causal_lm reads byte tokens, which only the LM modes
    feed it (the datasets of the other modes are float inputs)."""
    names = [("--model", self.model), ("--teacher_model", self.teacher_model)]
    names += [("--teacher_models", m) for m in self.teacher_models]
    lm_mode = self.mode in ("distill_lm", "cache_lm")
    for flag, name in names:
      if name not in MODEL_NAMES:
        raise ValueError(f"{flag}: unknown model {name!r}; expected one of: "
                         f"{', '.join(MODEL_NAMES)}")
      if name == "causal_lm" and not lm_mode and (
          flag != "--teacher_model" or self.mode == "compare"):
        raise ValueError(f"{flag}=causal_lm: expected --mode=distill_lm or "
                         f"cache_lm for a causal LM (--mode={self.mode} "
                         "feeds the float inputs of --dataset)")

  def num_teachers(self) -> int:
    """Teachers of this run: ``--teacher_checkpoints`` (distill) or
    ``--teacher_seeds`` (compare trains them); 1 without them."""
    return max(len(self.teacher_checkpoints), len(self.teacher_seeds), 1)

  def multi_teacher(self) -> bool:
    return bool(self.teacher_checkpoints or self.teacher_seeds)

  def _check_multi_teacher(self) -> None:
    _check(self.combiner in COMBINERS, "--combiner", self.combiner,
           f"one of: {', '.join(COMBINERS)}")
    _check(self.teacher_stacking in STACKINGS, "--teacher_stacking",
           self.teacher_stacking, f"one of: {', '.join(STACKINGS)}")
    _check(self.teacher_feature_standardize in FEATURE_STANDARDIZATIONS,
           "--teacher_feature_standardize", self.teacher_feature_standardize,
           f"one of: {', '.join(FEATURE_STANDARDIZATIONS)}")
    _check(self.cpu_dot_library in CPU_DOT_LIBRARIES, "--cpu_dot_library",
           self.cpu_dot_library, f"one of: {', '.join(CPU_DOT_LIBRARIES)}")
    _check(math.isfinite(self.peer_timeout_s) and self.peer_timeout_s > 0,
           "--peer_timeout_s", self.peer_timeout_s, "a positive number of "
           "seconds")
    _check(self.on_nonfinite in ON_NONFINITE, "--on_nonfinite",
           self.on_nonfinite, f"one of: {', '.join(ON_NONFINITE)}")
    _check(self.teacher_logits in TEACHER_LOGITS, "--teacher_logits",
           self.teacher_logits, f"one of: {', '.join(TEACHER_LOGITS)}")
    _check(self.teacher_shards >= 1, "--teacher_shards", self.teacher_shards,
           "a positive integer")
    if self.teacher_checkpoints:
      _check(self.mode == "distill", "--teacher_checkpoints",
             ",".join(self.teacher_checkpoints), "only with --mode=distill "
             "(--mode=compare trains its teachers: --teacher_seeds)")
    if self.teacher_seeds:
      _check(self.mode == "compare", "--teacher_seeds",
             ",".join(map(str, self.teacher_seeds)), "only with "
             "--mode=compare (--mode=distill takes --teacher_checkpoints)")
    if self.teacher_models:
      _check(len(self.teacher_models) == len(self.teacher_seeds),
             "--teacher_models", ",".join(self.teacher_models),
             f"one architecture per --teacher_seeds entry "
             f"({len(self.teacher_seeds)})")
    _check(len(set(self.teacher_checkpoints)) == len(self.teacher_checkpoints),
           "--teacher_checkpoints", ",".join(self.teacher_checkpoints),
           "distinct teacher workdirs")
    if self.multi_teacher():
      self.multi_teacher_objective()  # Validates the combiner's options.

  def _check_kip_values(self) -> None:
    """The --mode=kip flags' values, whatever the mode."""
    _check(self.kip_method in KIP_METHODS, "--kip_method", self.kip_method,
           f"one of: {', '.join(KIP_METHODS)}")
    _check(self.kernel in KIP_KERNELS, "--kernel", self.kernel,
           f"one of: {', '.join(KIP_KERNELS)}")
    _check(len(self.images_per_class) > 0
           and all(n > 0 for n in self.images_per_class),
           "--images_per_class", ",".join(map(str, self.images_per_class)),
           "positive integers such as 1,10,50")
    _check(self.krr_reg >= 0, "--krr_reg", self.krr_reg,
           "a non-negative number")
    _check(self.zca_strength >= 0, "--zca_strength", self.zca_strength,
           "a non-negative number (0: no ZCA whitening)")
    for name in ("target_per_class", "frepo_pool_size",
                 "frepo_max_online_steps", "eval_num_steps"):
      _check(getattr(self, name) > 0, f"--{name}", getattr(self, name),
             "a positive integer")
    _check(self.frepo_learning_rate > 0, "--frepo_learning_rate",
           self.frepo_learning_rate, "a positive number")

  def _check_lm_values(self) -> None:
    """The LM flags' values, whatever the mode (wrong in every mode)."""
    for name in ("seq_len", "lm_chunk_size", "lm_topk", "lm_num_samples",
                 "lm_cache_shards"):
      _check(getattr(self, name) > 0, f"--{name}", getattr(self, name),
             "a positive integer")
    for name in ("corpus_train_bytes", "corpus_validation_bytes"):
      _check(getattr(self, name) > self.seq_len, f"--{name}",
             getattr(self, name), f"more bytes than --seq_len={self.seq_len}")
    _check(len(self.lm_runs) > 0 and set(self.lm_runs) <= set(LM_RUNS),
           "--lm_runs", ",".join(self.lm_runs),
           f"a list of: {', '.join(LM_RUNS)}")
    _check(self.lm_reduction in LM_REDUCTIONS, "--lm_reduction",
           self.lm_reduction, f"one of: {', '.join(LM_REDUCTIONS)}")
    _check(self.lm_cache_form in LM_CACHE_FORMS, "--lm_cache_form",
           self.lm_cache_form, f"one of: {', '.join(LM_CACHE_FORMS)}")
    _check(self.lm_proposal_temperature > 0, "--lm_proposal_temperature",
           self.lm_proposal_temperature, "a positive number")

  def _check_lm(self) -> None:
    _check(not (self.lm_fused_kd and self.ce_weight), "--lm_fused_kd",
           self.lm_fused_kd, "only with --ce_weight=0 (the fused loss is the "
           "KD term alone; a CE term would materialise the student's logits)")
    _check(self.model == "causal_lm", "--model", self.model,
           "causal_lm for --mode=distill_lm/cache_lm")
    _check(self.teacher_model == "causal_lm", "--teacher_model",
           self.teacher_model, "causal_lm for --mode=distill_lm/cache_lm")
    if self.mode == "cache_lm":
      _check(bool(self.teacher_checkpoint), "--teacher_checkpoint",
             self.teacher_checkpoint, "the teacher workdir whose outputs "
             "--mode=cache_lm writes")
      _check(bool(self.lm_cache_dir), "--lm_cache_dir", self.lm_cache_dir,
             "the directory --mode=cache_lm writes the cache to")

  def multi_teacher_objective(self) -> MultiTeacherObjective:
    """The multi-teacher objective of these flags (`MultiTeacherObjective`,
    feature terms expanded to one per teacher)."""
    return MultiTeacherObjective.create(
        self.objective(), self.num_teachers(), combiner=self.combiner,
        teacher_weights=self.teacher_weights,
        drop_rate=self.teacher_drop_rate,
        feature_standardize=self.teacher_feature_standardize)

  def objective(self) -> DistillObjective:
    """The distillation objective these flags describe: every objective
    field that is also a flag, plus the schedules' length (``num_steps``)
    and the feature terms."""
    flags_ = {f.name for f in dataclasses.fields(self)}
    shared = {f.name: getattr(self, f.name)
              for f in dataclasses.fields(DistillObjective)
              if f.name in flags_}
    return DistillObjective(**shared, schedule_steps=self.num_steps,
                            feature_terms=self.feature_terms())

  def feature_terms(self) -> tuple[FeatureTerm, ...]:
    """One `FeatureTerm` per ``--feature_pairs`` entry. ``--feature_loss``,
    ``--feature_weight``, ``--projector`` and ``--feature_weight_end`` give
    one value for all pairs or one per pair."""
    n = len(self.feature_pairs)
    pairs = []
    for item in self.feature_pairs:
      student, sep, teacher = item.partition(":")
      _check(bool(sep and student and teacher and ":" not in teacher),
             "--feature_pairs", item,
             "student_tap:teacher_tap items such as penultimate:penultimate")
      pairs.append((student.strip(), teacher.strip()))

    def per_pair(flag, values):
      values = tuple(values)
      _check(len(values) in (1, n), f"--{flag}", ",".join(map(str, values)),
             f"one value, or one per --feature_pairs entry ({n})")
      return values * n if len(values) == 1 else values

    for flag, names, known, what in (
        ("--feature_loss", self.feature_loss, FEATURE_LOSSES,
         "feature loss"),
        ("--projector", self.projector, PROJECTOR_KINDS, "projector")):
      for name in names:
        if name not in known:
          raise ValueError(f"{flag}={name}: unknown {what}; expected one "
                           f"of: {', '.join(known)}")
    if not n:
      _check(not self.feature_loss_kwargs, "--feature_loss_kwargs",
             ",".join(f"{k}={v}" for k, v in self.feature_loss_kwargs),
             "no options without --feature_pairs")
      return ()
    losses_, weights, projectors = (
        per_pair("feature_loss", self.feature_loss),
        per_pair("feature_weight", self.feature_weight),
        per_pair("projector", self.projector))
    ends = (per_pair("feature_weight_end", self.feature_weight_end)
            if self.feature_weight_end else (None,) * n)
    # Each term takes the --feature_loss_kwargs its loss knows; each one
    # must be known to at least one of the losses.
    for key, _ in self.feature_loss_kwargs:
      if not any(key in feature_loss_hyperparameters(l) for l in losses_):
        raise ValueError(
            f"--feature_loss_kwargs: '{key}' is not a hyperparameter of "
            f"feature loss {' or '.join(sorted(set(losses_)))}; expected "
            "one of: " + (", ".join(sorted({
                h for l in losses_ for h in feature_loss_hyperparameters(l)}))
                          or "none"))

    def kwargs_of(loss):
      known = feature_loss_hyperparameters(loss)
      return tuple((k, v) for k, v in self.feature_loss_kwargs if k in known)

    terms = tuple(
        FeatureTerm(loss=l, student_tap=s, teacher_tap=t, weight=w,
                    projector=p, loss_kwargs=kwargs_of(l),
                    weight_schedule=self.feature_weight_schedule,
                    weight_end=e,
                    weight_schedule_steps=self.feature_weight_schedule_steps)
        for (s, t), l, w, p, e in zip(pairs, losses_, weights, projectors,
                                      ends))
    for term in terms:
      # The bank is written one whole batch per step.
      _check(term.memory_size % self.batch_size == 0,
             "--feature_loss_kwargs", f"memory_size={term.memory_size}",
             f"a multiple of --batch_size={self.batch_size}")
    return terms

  def replace(self, **changes) -> "Config":
    return dataclasses.replace(self, **changes)

  def to_json(self) -> dict:
    d = dataclasses.asdict(self)
    d["images_per_class"] = list(d["images_per_class"])
    for key in ("model_kwargs", "teacher_model_kwargs", "kernel_kwargs",
                "loss_kwargs",
                "aux_loss_kwargs", "feature_loss_kwargs"):
      d[key] = dict(d[key])
    d["seeds"] = list(d["seeds"])
    for key in ("teacher_checkpoints", "teacher_seeds", "teacher_models",
                "teacher_weights"):
      d[key] = list(d[key])
    for key in ("feature_pairs", "feature_loss", "feature_weight", "projector",
                "feature_weight_end"):
      d[key] = list(d[key])
    d["methods"] = list(d["methods"])
    d["lm_runs"] = list(d["lm_runs"])
    return d


def _parse_list(flag: str, items, convert, what: str) -> tuple:
  try:
    return tuple(convert(x) for x in items)
  except ValueError:
    raise ValueError(f"{flag}: expected comma-separated {what}; got "
                     f"{','.join(items)!r}") from None


def _floats(flag: str, items) -> tuple[float, ...]:
  return _parse_list(flag, items, float, "numbers")


def _ints(flag: str, items) -> tuple[int, ...]:
  return _parse_list(flag, items, int, "integers")


def _check(ok: bool, flag: str, value, expected: str) -> None:
  if not ok:
    raise ValueError(f"{flag}={value}: expected {expected}")


def parse_json_kwargs(flag: str, text: str) -> tuple[tuple[str, Any], ...]:
  """``'{"hidden_sizes": [512, 512]}'`` -> sorted ``(key, value)`` pairs."""
  if not text:
    return ()

  def not_json(constant):  # Python's json reads NaN and Infinity.
    raise ValueError(f"{flag}: {constant} in {text!r} is not JSON; expected "
                     "finite numbers")

  try:
    value = json.loads(text, parse_constant=not_json)
  except json.JSONDecodeError as e:
    raise ValueError(f"{flag}: expected a JSON object such as "
                     f"'{{\"hidden_sizes\": [256, 256]}}'; got {text!r} "
                     f"({e.msg})") from None
  if not isinstance(value, dict):
    raise ValueError(f"{flag}: expected a JSON object; got {text!r}")
  return tuple(sorted((k, _freeze(v)) for k, v in value.items()))


def _freeze(v):
  return tuple(_freeze(x) for x in v) if isinstance(v, list) else v


def parse_loss_kwargs(items: list[str], flag: str = "--loss_kwargs"
                      ) -> tuple[tuple[str, float], ...]:
  """``["beta=0.5"]`` -> ``(("beta", 0.5),)``."""
  out = []
  for item in items or ():
    key, sep, value = item.partition("=")
    try:
      if not sep or not key:
        raise ValueError
      out.append((key.strip(), float(value)))
    except ValueError:
      raise ValueError(f"{flag}: expected name=number items such as "
                       f"beta=0.5; got {item!r}") from None
  return tuple(sorted(out))


class _FlagDefiner:
  """``flags`` with every ``DEFINE_*`` bound to one `flags.FlagValues`."""

  def __init__(self, flag_values: flags.FlagValues):
    self._flag_values = flag_values

  def __getattr__(self, name):
    return functools.partial(getattr(flags, name),
                             flag_values=self._flag_values)


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """Defines the absl flags in ``flag_values`` (once per `FlagValues`; a
  fresh one parses a command line with no state left by another)."""
  if "mode" in flag_values:
    return
  d = Config()
  F = _FlagDefiner(flag_values)
  F.DEFINE_enum("mode", d.mode, MODES,
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
                "--lm_cache_dir.")
  F.DEFINE_string("workdir", d.workdir, "Run directory: checkpoints, "
                  "metrics.jsonl, model.json. A rerun resumes from it.")
  F.DEFINE_string("dataset", d.dataset, "mnist1d, digits, digits_flat or "
                  "tfds:<name> (array_record under --data_dir).")
  F.DEFINE_string("data_dir", d.data_dir, "TFDS data directory.")
  F.DEFINE_string("tfds_train_split", d.tfds_train_split, "TFDS train split.")
  F.DEFINE_string("tfds_test_split", d.tfds_test_split, "TFDS eval split.")
  F.DEFINE_string("tfds_input_key", d.tfds_input_key, "TFDS input feature.")
  F.DEFINE_string("tfds_label_key", d.tfds_label_key, "TFDS label feature.")
  F.DEFINE_float("validation_fraction", d.validation_fraction,
                 "Hold out this share of the training set (stratified) and "
                 "evaluate on it instead of the test set; for choosing "
                 "hyperparameters. 0: evaluate on the test set.")
  F.DEFINE_string("model", d.model, "Model trained by this run (student in "
                  "distill/compare): mlp, cnn1d, convnet, resnet8x4, ...")
  F.DEFINE_string("model_kwargs", "", "JSON object of model options, e.g. "
                  "'{\"hidden_sizes\": [256, 256]}'.")
  F.DEFINE_string("teacher_model", d.teacher_model,
                  "Teacher architecture trained by --mode=compare.")
  F.DEFINE_string("teacher_model_kwargs", "", "JSON options of the teacher.")
  F.DEFINE_string("teacher_checkpoint", d.teacher_checkpoint,
                  "Workdir of a --mode=train run to distill from.")
  F.DEFINE_enum("teacher_logits", d.teacher_logits, TEACHER_LOGITS,
                "--mode=distill with one teacher: 'cached' runs the teacher "
                "once over the training split before training and feeds its "
                "logits with each batch (valid because the training inputs "
                "are not augmented, so the teacher's outputs never change); "
                "'online' runs the teacher in every step; 'auto' caches "
                "unless feature terms need the teacher's features or the "
                "run has several processes.")
  F.DEFINE_enum("cpu_dot_library", d.cpu_dot_library, CPU_DOT_LIBRARIES,
                "On CPU: which library XLA uses for matmuls. 'ynnpack' is "
                "XLA's default; 'eigen' turns YNNPACK's dots off "
                f"({YNN_FLAG}=); 'auto' picks eigen when --model or "
                "--teacher_model is a ResNet or causal_lm (measured faster) "
                "and ynnpack otherwise. Ignored when XLA_FLAGS already sets "
                f"{YNN_FLAG}.")
  F.DEFINE_list("teacher_checkpoints", [], "Multi-teacher distillation: the "
                "workdirs of several --mode=train runs (instead of "
                "--teacher_checkpoint); see --combiner.")
  F.DEFINE_list("teacher_seeds", [], "--mode=compare: train one teacher "
                "per seed and distill from all of them (multi-teacher).")
  F.DEFINE_list("teacher_models", [], "--mode=compare: the architecture "
                "of each --teacher_seeds teacher (default: --teacher_model; "
                "--teacher_model_kwargs apply to --teacher_model only).")
  F.DEFINE_enum("combiner", d.combiner, COMBINERS, "How several teachers "
                "are combined: mean_probs (probability ensemble), "
                "mean_logits, confidence (CA-MKD per-example weights), "
                "entropy, best (best teacher per example), learned (weights "
                "in the train state, fit to the labels), per_teacher (the "
                "loss against each teacher, summed with weights).")
  F.DEFINE_list("teacher_weights", [], "Fixed teacher weights, one per "
                "teacher (mean_probs, mean_logits, per_teacher); default "
                "uniform.")
  F.DEFINE_float("teacher_drop_rate", d.teacher_drop_rate, "UNIC teacher "
                 "dropping: per example, drop each teacher but the worst-"
                 "matched one with this probability.")
  F.DEFINE_enum("teacher_feature_standardize",
                d.teacher_feature_standardize, FEATURE_STANDARDIZATIONS,
                "Standardise each teacher's features before the feature "
                "losses: with batch or running statistics.")
  F.DEFINE_enum("teacher_stacking", d.teacher_stacking, STACKINGS,
                "How teachers of one architecture run: vmap, map (lax.map), "
                "or auto (map for 2-D convolutions on CPU).")
  F.DEFINE_integer("teacher_shards", d.teacher_shards, "Shard the stacked "
                   "teachers over a 'teacher' mesh axis of this size (the "
                   "'data' axis gets the rest of the devices).")
  F.DEFINE_integer("seed", d.seed, "Seed of initialisation and data order.")
  F.DEFINE_list("seeds", [str(s) for s in d.seeds],
                "Student seeds of --mode=compare.")
  F.DEFINE_integer("num_steps", d.num_steps, "Training steps of this run "
                   "(of the students in --mode=compare).")
  F.DEFINE_integer("teacher_num_steps", d.teacher_num_steps, "Teacher "
                   "training steps in --mode=compare (0: --num_steps).")
  F.DEFINE_integer("batch_size", d.batch_size, "Global training batch size.")
  F.DEFINE_integer("eval_batch_size", d.eval_batch_size,
                   "Global evaluation batch size.")
  F.DEFINE_string("optimizer", d.optimizer, "adamw, adam or sgd.")
  F.DEFINE_float("learning_rate", d.learning_rate, "Peak learning rate.")
  F.DEFINE_float("teacher_learning_rate", d.teacher_learning_rate,
                 "Teacher's learning rate in --mode=compare (0: same).")
  F.DEFINE_float("weight_decay", d.weight_decay, "Weight decay.")
  F.DEFINE_string("lr_schedule", d.lr_schedule, "constant or cosine.")
  F.DEFINE_integer("warmup_steps", d.warmup_steps, "Linear warm-up steps.")
  F.DEFINE_float("grad_clip_norm", d.grad_clip_norm,
                 "Clip gradients to this global norm (0: off).")
  F.DEFINE_float("label_smoothing", d.label_smoothing,
                 "Label smoothing of the CE term.")
  F.DEFINE_string("loss", d.loss, "Distillation loss: "
                  + ", ".join(distill_loss_names()) + ".")
  F.DEFINE_float("temperature", d.temperature, "Distillation temperature.")
  F.DEFINE_float("ce_weight", d.ce_weight, "Weight of CE on the labels.")
  F.DEFINE_float("kd_weight", d.kd_weight, "Weight of the logit loss.")
  F.DEFINE_list("loss_kwargs", [], "Loss hyperparameters as name=value, "
                "e.g. beta=0.5 for jsd, alpha=1,beta=8 for dkd.")
  F.DEFINE_boolean("standardize_logits", d.standardize_logits,
                   "Z-score student and teacher logits before the loss.")
  for name, what in (("temperature", "the temperature"),
                     ("ce_weight", "the CE weight"),
                     ("kd_weight", "the distillation weight")):
    F.DEFINE_enum(f"{name}_schedule", "constant", SCHEDULE_KINDS,
                  f"How {what} moves from --{name} at step 0 to "
                  f"--{name}_end at --num_steps.")
    F.DEFINE_float(f"{name}_end", None, f"Final value of {what} for a "
                   "linear or cosine schedule.")
    F.DEFINE_integer(f"{name}_schedule_steps", 0, f"Length of the schedule "
                     f"of {what} in steps; it holds --{name}_end afterwards "
                     "(0: --num_steps).")
  F.DEFINE_string("aux_loss", None, "Optional second logit loss added to "
                  "--loss (e.g. SinKD: --loss=kd --aux_loss=sinkhorn).")
  F.DEFINE_float("aux_weight", d.aux_weight, "Weight of --aux_loss.")
  F.DEFINE_float("aux_temperature", None, "Temperature of --aux_loss "
                 "(default: that of --loss).")
  F.DEFINE_list("aux_loss_kwargs", [], "Hyperparameters of --aux_loss as "
                "name=value.")
  F.DEFINE_list("feature_pairs", [], "Feature distillation: "
                "student_tap:teacher_tap pairs (the models' feature names, "
                "e.g. block2:block2,penultimate:penultimate).")
  F.DEFINE_list("feature_loss", list(d.feature_loss), "Feature loss per "
                "pair (one for all, or one per pair): "
                + ", ".join(FEATURE_LOSSES) + ".")
  F.DEFINE_list("feature_weight", [str(w) for w in d.feature_weight],
                "Weight per feature pair (one for all, or one per pair).")
  F.DEFINE_list("projector", list(d.projector), "Student-feature projector "
                "per pair (one for all, or one per pair): "
                + ", ".join(PROJECTOR_KINDS) + ".")
  F.DEFINE_list("feature_loss_kwargs", [], "Hyperparameters of the feature "
                "losses and term options (memory_size of contrastive) as "
                "name=value; each pair's loss takes those it knows.")
  F.DEFINE_enum("feature_weight_schedule", d.feature_weight_schedule,
                SCHEDULE_KINDS, "How each feature weight moves to its "
                "--feature_weight_end.")
  F.DEFINE_list("feature_weight_end", [], "Final feature weight(s) of a "
                "linear or cosine --feature_weight_schedule.")
  F.DEFINE_integer("feature_weight_schedule_steps", 0, "Length of the "
                   "feature weight schedule (0: --num_steps).")
  F.DEFINE_list("methods", [], "--mode=compare: method flagfiles (loss "
                "flags only, e.g. experiments/flags/methods/dkd.flags)"
                "; each is distilled over --seeds and gets a row of the table."
                " Empty: one method, the loss flags of this run.")
  F.DEFINE_string("tune_grid", None, "--mode=tune: JSON file mapping a "
                  "method name (its flagfile's name) to {flag: [candidate "
                  "values]}; every combination is tried.")
  F.DEFINE_string("tune_output_dir", None, "--mode=tune: where the tuned "
                  "method flagfiles go (default: <workdir>/methods).")
  F.DEFINE_integer("log_every", d.log_every, "Progress line every N steps.")
  F.DEFINE_integer("eval_every", d.eval_every,
                   "Evaluate every N steps (0: at the end only).")
  F.DEFINE_integer("checkpoint_every", d.checkpoint_every,
                   "Checkpoint every N steps (0: at the end only).")
  F.DEFINE_integer("max_to_keep", d.max_to_keep, "Checkpoints to keep.")
  F.DEFINE_float("peer_timeout_s", d.peer_timeout_s, "Multi-process runs: "
                 "a process whose peer shows no sign of life for this many "
                 "seconds (it died or hangs) stops with a one-line error "
                 "instead of waiting in its next collective "
                 "(experiments/watchdog.py).")
  F.DEFINE_enum("on_nonfinite", d.on_nonfinite, ON_NONFINITE,
                "A step whose loss or gradients are NaN/inf: 'stop' ends the "
                "run with an error naming the step and the first non-finite "
                "loss term (the state before the step is checkpointed); "
                "'skip' leaves the state unchanged and counts the skipped "
                "steps (metric nonfinite_skipped); 'ignore' applies the "
                "update anyway.")
  F.DEFINE_enum("kip_method", d.kip_method, KIP_METHODS, "--mode=kip: "
                "kip (KIP with --kernel), rfad (random ConvNet features), "
                "frepo (KRR on the features of a pool of --model networks "
                "trained online), krr_st (self-supervised: FRePo regressing "
                "the --teacher_checkpoint model's representations).")
  F.DEFINE_enum("kernel", d.kernel, KIP_KERNELS, "--mode=kip: the "
                "closed-form kernel of kip, and the kernel of every "
                "method's KRR evaluation.")
  F.DEFINE_string("kernel_kwargs", "", "JSON options of --kernel (depth, "
                  "w_std, b_std, filter_size, pool) or, for rfad, of the "
                  "random features (num_networks, width, depth, ...).")
  F.DEFINE_list("images_per_class", [str(n) for n in d.images_per_class],
                "--mode=kip: support sizes to distil, per class.")
  F.DEFINE_boolean("learn_labels", d.learn_labels,
                   "--mode=kip: also learn the support labels.")
  F.DEFINE_float("zca_strength", d.zca_strength, "--mode=kip: regularised "
                 "ZCA whitening of the inputs (0: off; KIP uses 0.1).")
  F.DEFINE_float("krr_reg", d.krr_reg, "--mode=kip: KRR ridge relative to "
                 "the mean kernel diagonal.")
  F.DEFINE_integer("target_per_class", d.target_per_class, "--mode=kip: "
                   "examples of each class in a target batch.")
  F.DEFINE_integer("frepo_pool_size", d.frepo_pool_size, "frepo/krr_st: "
                   "networks in the pool.")
  F.DEFINE_integer("frepo_max_online_steps", d.frepo_max_online_steps,
                   "frepo/krr_st: a network is re-initialised after this "
                   "many online steps.")
  F.DEFINE_float("frepo_learning_rate", d.frepo_learning_rate,
                 "frepo/krr_st: Adam learning rate of the pool networks.")
  F.DEFINE_integer("eval_num_steps", d.eval_num_steps, "--mode=kip: steps "
                   "of the fresh --model networks trained on each support "
                   "set (one per --seeds entry).")
  F.DEFINE_integer("seq_len", d.seq_len, "distill_lm/cache_lm: tokens "
                   "(bytes) per training sequence.")
  F.DEFINE_integer("corpus_train_bytes", d.corpus_train_bytes, "distill_lm: "
                   "bytes of Python stdlib source in the train split.")
  F.DEFINE_integer("corpus_validation_bytes", d.corpus_validation_bytes,
                   "distill_lm: bytes in the validation split.")
  F.DEFINE_list("lm_runs", list(d.lm_runs), "distill_lm: the students to "
                "train: baseline (labels only), online (teacher run in the "
                "step), dense, topk, sampled (from offline caches).")
  F.DEFINE_enum("lm_reduction", d.lm_reduction, LM_REDUCTIONS,
                "distill_lm: batch (mean over valid tokens) or "
                "batch_of_sequences (mean of per-sequence means).")
  F.DEFINE_boolean("lm_fused_kd", d.lm_fused_kd, "distill_lm: the online "
                   "run uses the chunked fused linear-KD loss (no [N, V] "
                   "logits; needs --ce_weight=0).")
  F.DEFINE_integer("lm_chunk_size", d.lm_chunk_size, "Tokens per chunk of "
                   "the fused loss.")
  F.DEFINE_integer("lm_topk", d.lm_topk, "Top-k cache: teacher "
                   "probabilities kept per token.")
  F.DEFINE_enum("lm_topk_variant", d.lm_topk_variant,
                ["renormalized", "raw", "tail"], "How a top-k cache is "
                "turned into a loss (jdistill.losses.sparse.topk_kd).")
  F.DEFINE_integer("lm_num_samples", d.lm_num_samples, "Sampled (RS-KD) "
                   "cache: token draws per position.")
  F.DEFINE_float("lm_proposal_temperature", d.lm_proposal_temperature,
                 "Sampled cache: draws come from the teacher's softmax at "
                 "this temperature, reweighted to be unbiased.")
  F.DEFINE_string("lm_cache_dir", None, "cache_lm: where the cache goes.")
  F.DEFINE_enum("lm_cache_form", d.lm_cache_form, list(LM_CACHE_FORMS),
                "cache_lm: dense, topk or sampled.")
  F.DEFINE_integer("lm_cache_shards", d.lm_cache_shards, "Shards (files) of "
                   "a teacher cache.")
  F.DEFINE_integer("num_devices", d.num_devices,
                   "Devices of the data mesh (0: all).")
  F.DEFINE_string("mesh", d.mesh, "Device mesh as axis:size pairs over "
                  "data, fsdp, tensor (and teacher), e.g. data:2,fsdp:4; one "
                  "size may be -1 (the rest). Empty: every device on data. "
                  "Batches are split over data x fsdp.")
  F.DEFINE_enum("student_sharding", d.student_sharding,
                list(sharding_lib.PRESETS),
                "How the student's parameters and optimizer state are split "
                "(jdistill/train/sharding.py): auto (tensor rules, then "
                "fsdp), replicated, fsdp or tensor.")
  F.DEFINE_enum("teacher_sharding", d.teacher_sharding,
                list(sharding_lib.PRESETS), "The same for the teachers.")
  F.DEFINE_string("sharding_rules", d.sharding_rules,
                  "Rules tried before --student_sharding: 'regex=spec;...' "
                  "with spec one entry per dimension (an axis, none, a+b or "
                  "...), or replicated; e.g. 'lm_head/kernel=...,tensor'.")
  F.DEFINE_string("teacher_sharding_rules", d.teacher_sharding_rules,
                  "The same for the teachers' parameters.")
  F.DEFINE_integer("grad_accum_steps", d.grad_accum_steps,
                   "Split each batch into this many micro-batches (lax.scan) "
                   "and apply one update: the big batch's result at one "
                   "micro-batch's activation memory.")
  F.DEFINE_enum("precision", d.precision, list(PRECISIONS),
                "Student compute dtype: float32; bfloat16 (float32 master "
                "weights, optimizer and loss math); float16 (the same plus "
                "dynamic loss scaling).")
  F.DEFINE_string("teacher_precision", d.teacher_precision,
                  "Teacher forward dtype: float32 or bfloat16 (empty: as "
                  "--precision, float16 meaning bfloat16).")
  F.DEFINE_enum("remat", d.remat, list(REMAT_POLICIES),
                "Rematerialise the student's blocks in the backward pass "
                "(jax.checkpoint): none, full (save block inputs only), dots "
                "(keep matmul outputs without batch dimensions) or "
                "dots_saveable (keep every matmul output).")
  F.DEFINE_boolean("plan", d.plan, "Do not train: compile the step for "
                   "--mesh on abstract shapes and print per-device memory "
                   "(XLA's memory analysis) against --device_memory_gb.")
  F.DEFINE_float("device_memory_gb", d.device_memory_gb, "--plan: memory of "
                 "one device in GiB (0: report without a verdict).")
  F.DEFINE_string("coordinator_address", None,
                  "host:port of process 0 for jax.distributed.initialize.")
  F.DEFINE_integer("num_processes", 1, "Processes of a multi-host job; 0: "
                   "jax.distributed.initialize() detects them (TPU pods, "
                   "SLURM, Open MPI, Kubernetes).")
  F.DEFINE_integer("process_id", 0, "Index of this process.")
  F.DEFINE_string("augment", d.augment, "Augmentation inside the train "
                  "step, as comma-separated ops applied in order: crop:P "
                  "(pad P, random crop), flip (images), shift:S (1-D "
                  "signals, circular), noise:STD, then at most one of "
                  "mixup:ALPHA or cutmix:ALPHA (images); e.g. "
                  "'shift:8,noise:0.1,mixup:1'. Empty: none. With a "
                  "teacher the teacher's logits are computed in every step "
                  "(never cached), on the view --augment_views says.")
  F.DEFINE_enum("augment_views", d.augment_views, list(AUGMENT_VIEWS),
                "shared: teacher and student see the same augmented batch "
                "(function matching, Beyer et al. 2022); independent: the "
                "teacher sees its own augmented view of the same examples.")
  F.DEFINE_float("ema_teacher_decay", d.ema_teacher_decay, "--mode=distill "
                 "without a teacher checkpoint: self-distillation from an "
                 "exponential moving average of the student with this decay "
                 "(kept and checkpointed in the train state). 0: off.")
  F.DEFINE_boolean("ema_warmup", d.ema_warmup, "Ramp the EMA decay up as "
                   "min(decay, (1 + step) / (10 + step)).")
  F.DEFINE_integer("generations", d.generations, "--mode=born_again: "
                   "generations distilled after generation 0 (trained from "
                   "labels); generation k distils from generation k-1 of "
                   "the same architecture (--model).")
  F.DEFINE_integer("num_peers", d.num_peers, "--mode=mutual: peers of "
                   "--model trained together (Deep Mutual Learning), each "
                   "distilling from the others' current predictions.")
  F.DEFINE_list("peer_models", [], "--mode=mutual: one architecture per "
                "peer instead of --model x --num_peers (e.g. cnn1d,mlp); "
                "--model_kwargs apply to peers named --model.")


def plan_xla_flags(cfg: Config, xla_flags: str) -> str:
  """``XLA_FLAGS`` with enough fake CPU devices for ``--mesh`` when planning
  (unchanged when the flags already set a device count, or when an axis
  size is ``-1``). Only the CPU backend reads the flag."""
  if not cfg.plan or "xla_force_host_platform_device_count" in xla_flags:
    return xla_flags
  sizes = cfg.mesh_axes().values()
  if not sizes or -1 in sizes:
    return xla_flags
  return (xla_flags + " --xla_force_host_platform_device_count="
          f"{math.prod(sizes)}").strip()


CPU_SCHEDULER_FLAG = "--xla_cpu_scheduler_type"


def cpu_xla_flags(cfg: Config, xla_flags: str) -> str:
  """``XLA_FLAGS`` with ``--cpu_dot_library``'s choice added (unchanged when
  the user's flags already choose; only the CPU backend reads the flag),
  and with ``--remat`` XLA:CPU's memory-optimising scheduler: its default
  one runs the recomputation early, next to the forward pass, and saves no
  memory (tests/test_remat.py)."""
  if cfg.remat != "none" and CPU_SCHEDULER_FLAG not in xla_flags:
    xla_flags = (f"{xla_flags} {CPU_SCHEDULER_FLAG}="
                 "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED").strip()
  if YNN_FLAG in xla_flags:
    return xla_flags
  library = cfg.cpu_dot_library
  if library == "auto":
    models = (cfg.model, cfg.teacher_model)
    library = ("eigen" if any(m.startswith(EIGEN_DOT_MODELS) for m in models)
               else "ynnpack")
  if library == "ynnpack":
    return xla_flags
  return f"{xla_flags} {YNN_FLAG}=".strip()


def config_from_flags(FLAGS=flags.FLAGS) -> Config:
  """Builds and validates a `Config` from parsed absl flags."""
  return Config(
      mode=FLAGS.mode,
      workdir=FLAGS.workdir,
      dataset=FLAGS.dataset,
      data_dir=FLAGS.data_dir,
      tfds_train_split=FLAGS.tfds_train_split,
      tfds_test_split=FLAGS.tfds_test_split,
      tfds_input_key=FLAGS.tfds_input_key,
      tfds_label_key=FLAGS.tfds_label_key,
      validation_fraction=FLAGS.validation_fraction,
      model=FLAGS.model,
      model_kwargs=parse_json_kwargs("--model_kwargs", FLAGS.model_kwargs),
      teacher_model=FLAGS.teacher_model,
      teacher_model_kwargs=parse_json_kwargs("--teacher_model_kwargs",
                                             FLAGS.teacher_model_kwargs),
      teacher_checkpoint=FLAGS.teacher_checkpoint,
      teacher_checkpoints=tuple(FLAGS.teacher_checkpoints),
      teacher_seeds=_ints("--teacher_seeds", FLAGS.teacher_seeds),
      teacher_models=tuple(FLAGS.teacher_models),
      combiner=FLAGS.combiner,
      teacher_weights=_floats("--teacher_weights", FLAGS.teacher_weights),
      teacher_drop_rate=FLAGS.teacher_drop_rate,
      teacher_feature_standardize=FLAGS.teacher_feature_standardize,
      teacher_stacking=FLAGS.teacher_stacking,
      teacher_shards=FLAGS.teacher_shards,
      teacher_logits=FLAGS.teacher_logits,
      cpu_dot_library=FLAGS.cpu_dot_library,
      seed=FLAGS.seed,
      seeds=_ints("--seeds", FLAGS.seeds),
      num_steps=FLAGS.num_steps,
      teacher_num_steps=FLAGS.teacher_num_steps,
      batch_size=FLAGS.batch_size,
      eval_batch_size=FLAGS.eval_batch_size,
      optimizer=FLAGS.optimizer,
      learning_rate=FLAGS.learning_rate,
      teacher_learning_rate=FLAGS.teacher_learning_rate,
      weight_decay=FLAGS.weight_decay,
      lr_schedule=FLAGS.lr_schedule,
      warmup_steps=FLAGS.warmup_steps,
      grad_clip_norm=FLAGS.grad_clip_norm,
      label_smoothing=FLAGS.label_smoothing,
      loss=FLAGS.loss,
      temperature=FLAGS.temperature,
      ce_weight=FLAGS.ce_weight,
      kd_weight=FLAGS.kd_weight,
      loss_kwargs=parse_loss_kwargs(FLAGS.loss_kwargs),
      standardize_logits=FLAGS.standardize_logits,
      temperature_schedule=FLAGS.temperature_schedule,
      temperature_end=FLAGS.temperature_end,
      ce_weight_schedule=FLAGS.ce_weight_schedule,
      ce_weight_end=FLAGS.ce_weight_end,
      kd_weight_schedule=FLAGS.kd_weight_schedule,
      kd_weight_end=FLAGS.kd_weight_end,
      temperature_schedule_steps=FLAGS.temperature_schedule_steps,
      ce_weight_schedule_steps=FLAGS.ce_weight_schedule_steps,
      kd_weight_schedule_steps=FLAGS.kd_weight_schedule_steps,
      aux_loss=FLAGS.aux_loss or None,
      aux_weight=FLAGS.aux_weight,
      aux_temperature=FLAGS.aux_temperature,
      aux_loss_kwargs=parse_loss_kwargs(FLAGS.aux_loss_kwargs,
                                        "--aux_loss_kwargs"),
      feature_pairs=tuple(FLAGS.feature_pairs),
      feature_loss=tuple(FLAGS.feature_loss),
      feature_weight=_floats("--feature_weight", FLAGS.feature_weight),
      projector=tuple(FLAGS.projector),
      feature_loss_kwargs=parse_loss_kwargs(FLAGS.feature_loss_kwargs,
                                            "--feature_loss_kwargs"),
      feature_weight_schedule=FLAGS.feature_weight_schedule,
      feature_weight_end=_floats("--feature_weight_end",
                                 FLAGS.feature_weight_end),
      feature_weight_schedule_steps=FLAGS.feature_weight_schedule_steps,
      kip_method=FLAGS.kip_method,
      kernel=FLAGS.kernel,
      kernel_kwargs=parse_json_kwargs("--kernel_kwargs", FLAGS.kernel_kwargs),
      images_per_class=_ints("--images_per_class", FLAGS.images_per_class),
      learn_labels=FLAGS.learn_labels,
      zca_strength=FLAGS.zca_strength,
      krr_reg=FLAGS.krr_reg,
      target_per_class=FLAGS.target_per_class,
      frepo_pool_size=FLAGS.frepo_pool_size,
      frepo_max_online_steps=FLAGS.frepo_max_online_steps,
      frepo_learning_rate=FLAGS.frepo_learning_rate,
      eval_num_steps=FLAGS.eval_num_steps,
      seq_len=FLAGS.seq_len,
      corpus_train_bytes=FLAGS.corpus_train_bytes,
      corpus_validation_bytes=FLAGS.corpus_validation_bytes,
      lm_runs=tuple(FLAGS.lm_runs),
      lm_reduction=FLAGS.lm_reduction,
      lm_fused_kd=FLAGS.lm_fused_kd,
      lm_chunk_size=FLAGS.lm_chunk_size,
      lm_topk=FLAGS.lm_topk,
      lm_topk_variant=FLAGS.lm_topk_variant,
      lm_num_samples=FLAGS.lm_num_samples,
      lm_proposal_temperature=FLAGS.lm_proposal_temperature,
      lm_cache_dir=FLAGS.lm_cache_dir,
      lm_cache_form=FLAGS.lm_cache_form,
      lm_cache_shards=FLAGS.lm_cache_shards,
      log_every=FLAGS.log_every,
      eval_every=FLAGS.eval_every,
      checkpoint_every=FLAGS.checkpoint_every,
      max_to_keep=FLAGS.max_to_keep,
      on_nonfinite=FLAGS.on_nonfinite,
      peer_timeout_s=FLAGS.peer_timeout_s,
      methods=tuple(FLAGS.methods),
      tune_grid=FLAGS.tune_grid,
      tune_output_dir=FLAGS.tune_output_dir,
      num_devices=FLAGS.num_devices,
      mesh=FLAGS.mesh,
      student_sharding=FLAGS.student_sharding,
      teacher_sharding=FLAGS.teacher_sharding,
      sharding_rules=FLAGS.sharding_rules,
      teacher_sharding_rules=FLAGS.teacher_sharding_rules,
      grad_accum_steps=FLAGS.grad_accum_steps,
      precision=FLAGS.precision,
      teacher_precision=FLAGS.teacher_precision,
      remat=FLAGS.remat,
      plan=FLAGS.plan,
      device_memory_gb=FLAGS.device_memory_gb,
      coordinator_address=FLAGS.coordinator_address,
      num_processes=FLAGS.num_processes,
      process_id=FLAGS.process_id,
      augment=FLAGS.augment,
      augment_views=FLAGS.augment_views,
      ema_teacher_decay=FLAGS.ema_teacher_decay,
      ema_warmup=FLAGS.ema_warmup,
      generations=FLAGS.generations,
      num_peers=FLAGS.num_peers,
      peer_models=tuple(FLAGS.peer_models),
  )


# Settings a method flagfile may not change: they define the comparison.
_NOT_PER_METHOD = {"mode", "workdir", "seeds", "methods", "dataset",
                   "data_dir", "model", "model_kwargs", "teacher_model",
                   "teacher_model_kwargs", "teacher_checkpoint",
                   "teacher_checkpoints", "teacher_seeds", "teacher_models",
                   "teacher_shards",
                   "teacher_num_steps", "teacher_learning_rate",
                   "validation_fraction", "num_steps", "tune_grid",
                   "tune_output_dir", "coordinator_address",
                   "num_processes", "process_id", "mesh", "plan",
                   "device_memory_gb"}


def apply_method_file(cfg: Config, path: str, FLAGS=flags.FLAGS) -> Config:
  """``cfg`` with the ``--name=value`` lines of method flagfile ``path``.

  Values are parsed by the same absl flag definitions as the command line.
  Lines starting with ``#`` are comments.
  """
  return apply_method_lines(cfg, read_method_lines(path), path, FLAGS)


def read_method_lines(path: str) -> list[str]:
  """The ``--name=value`` lines of method flagfile ``path`` (no comments)."""
  try:
    with open(path, encoding="utf-8") as f:
      lines = [l.strip() for l in f]
  except OSError as e:
    raise ValueError(f"--methods: cannot read method flagfile {path} "
                     f"({e.strerror})") from None
  except UnicodeDecodeError as e:
    raise ValueError(f"--methods: method flagfile {path} is not UTF-8 text "
                     f"({e.reason} at byte {e.start}); expected lines of "
                     "--name=value") from None
  return [l for l in lines if l and not l.startswith("#")]


def apply_method_lines(cfg: Config, lines: list[str], source: str,
                       FLAGS=flags.FLAGS) -> Config:
  """``cfg`` with method flag ``lines`` (``--name=value``) from ``source``
  (a path, named in errors). Later lines override earlier ones."""
  changes: dict[str, Any] = {}
  for line in lines:
    name, sep, value = line[2:].partition("=") if line.startswith("--") else (
        "", "", "")
    if not name:
      raise ValueError(f"{source}: expected lines of the form --name=value; "
                       f"got {line!r}")
    if not sep and name.startswith("no") and name[2:] in FLAGS:
      name, value = name[2:], "false"
    elif not sep:
      value = "true"
    if name not in FLAGS or not hasattr(cfg, name):
      raise ValueError(f"{source}: unknown flag --{name}")
    if name in _NOT_PER_METHOD:
      raise ValueError(f"{source}: --{name} cannot differ between methods; "
                       "set it in the main flagfile")
    try:
      parsed = FLAGS[name].parser.parse(value)
    except ValueError as e:
      raise ValueError(f"{source}: --{name}={value}: {e}") from None
    if name in ("loss_kwargs", "aux_loss_kwargs", "feature_loss_kwargs"):
      parsed = parse_loss_kwargs(parsed, f"{source}: --{name}")
    elif name in ("feature_weight", "feature_weight_end", "teacher_weights"):
      parsed = _floats(f"{source}: --{name}", parsed)
    elif isinstance(parsed, list):
      parsed = tuple(parsed)
    if name == "aux_loss":
      parsed = parsed or None
    changes[name] = parsed
  if "loss" in changes and "aux_loss" not in changes:
    changes["aux_loss"] = None  # A method names all of its losses.
  for loss in ("loss", "aux_loss"):
    if loss in changes and f"{loss}_kwargs" not in changes:
      # Another loss's options do not carry over.
      changes[f"{loss}_kwargs"] = ()
  try:
    return cfg.replace(**changes)
  except ValueError as e:
    raise ValueError(f"{source}: {e}") from None


def existing_ancestor(path: str) -> str:
  """``path`` if it exists, else its nearest existing parent ("" if
  none)."""
  existing = path
  while existing and not os.path.lexists(existing):
    parent = os.path.dirname(existing.rstrip(os.sep))
    existing = parent if parent != existing else ""
  return existing


def check_paths(cfg: Config) -> None:
  """Checks, before a run, that the directories the flags name are not
  files (a run would fail there only after its first write, or, for an
  output directory, at its end). What a directory holds is checked by the
  code that reads it."""
  dirs = [("--workdir", cfg.workdir),
          ("--teacher_checkpoint", cfg.teacher_checkpoint),
          ("--data_dir", cfg.data_dir),
          ("--tune_output_dir", cfg.tune_output_dir),
          ("--lm_cache_dir", cfg.lm_cache_dir)]
  dirs += [("--teacher_checkpoints", p) for p in cfg.teacher_checkpoints]
  for flag, path in dirs:
    if not path:
      continue
    # The path itself or a parent that exists must be a directory.
    existing = existing_ancestor(path)
    if existing and not os.path.isdir(existing):
      where = ("is a file" if existing == path else
               f"is under {existing}, which is a file")
      raise ValueError(f"{flag}={path} {where}; expected a directory")
