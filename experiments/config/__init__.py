"""Experiment configuration: sections -> absl flags -> a validated `Config`.

Every setting is declared once, as an `option` field of one section
(`core`, `distill`, `modes`): its default, help text, kind and choices. The
absl flags, their parsing (command line, flagfiles, method files, tune
grids) and the flat `Config` are generated from the sections, so adding a
flag is one edit. ``cfg.section("optim")`` is one section's view;
``cfg.learning_rate`` reads a field wherever it lives (the flat flag names
are the public interface). Rules that span sections or depend on the mode
live in `check_across`.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

from absl import flags

from experiments.config import options as options_lib
from experiments.config.core import (  # noqa: F401  (re-exported)
    CPU_DOT_LIBRARIES, LM_MODES, MODES, ON_NONFINITE, PEER_MODES, PLAN_MODES,
    PRECISIONS, TEACHER_LOGITS, YNN_FLAG, CompareSection, DataSection,
    ModelSection, OptimSection, RunSection, ScaleSection)
from experiments.config.distill import (  # noqa: F401
    AUGMENT_VIEWS, PEER_LOSSES, FeatureSection, MultiTeacherSection,
    ObjectiveSection, RecipeSection)
from experiments.config.modes import (  # noqa: F401
    KIP_KERNELS, KIP_METHODS, LM_CACHE_FORMS, LM_REDUCTIONS, LM_RUNS,
    KipSection, LmSection, OnPolicySection)
from experiments.config.options import (  # noqa: F401
    parse_json_kwargs, parse_loss_kwargs)
from jdistill.models.remat import REMAT_NAMES as REMAT_POLICIES  # noqa: F401
from jdistill.train import sharding as sharding_lib
from jdistill.train.multi_teacher import MultiTeacherObjective
from jdistill.train.objective import DistillObjective, FeatureTerm

# Section name -> section class, in the order of `--helpfull` and of the
# flag reference (docs/program.md).
SECTIONS: dict[str, type] = {
    "run": RunSection, "data": DataSection, "model": ModelSection,
    "optim": OptimSection, "objective": ObjectiveSection,
    "feature": FeatureSection, "multi_teacher": MultiTeacherSection,
    "recipe": RecipeSection, "compare": CompareSection,
    "scale": ScaleSection, "kip": KipSection, "lm": LmSection,
    "on_policy": OnPolicySection}
# Model families whose KD steps ran faster on XLA CPU with YNNPACK's dots
# turned off (benchmarks/vs_pytorch.py, docs/performance.md): resnet8x4<-
# resnet32x4 +17%, causal_lm +19%; mlp and vit were 21% and 7% slower, so
# they keep XLA's default.
EIGEN_DOT_MODELS = ("resnet", "causal_lm")
CPU_SCHEDULER_FLAG = "--xla_cpu_scheduler_type"


def _section_of() -> dict[str, str]:
  owner = {}
  for name, section in SECTIONS.items():
    for field in dataclasses.fields(section):
      if field.name in owner:
        raise TypeError(f"config field {field.name} is declared in sections "
                        f"{owner[field.name]} and {name}")
      owner[field.name] = name
  return owner


SECTION_OF = _section_of()  # Field name -> its section's name.


class _ConfigMethods:
  """The methods of `Config` (whose fields come from `SECTIONS`)."""

  def __post_init__(self):
    for section in self.sections().values():
      section.validate()
    check_across(self)
    for section in self.sections().values():  # After the particular checks.
      options_lib.check_numbers(section)

  def section(self, name: str):
    """The section ``name`` (a key of `SECTIONS`) of this config."""
    cls = SECTIONS[name]
    return cls(**{f.name: getattr(self, f.name)
                  for f in dataclasses.fields(cls)})

  def sections(self) -> dict[str, Any]:
    return {name: self.section(name) for name in SECTIONS}

  def replace(self, **changes) -> "Config":
    return dataclasses.replace(self, **changes)

  def to_json(self) -> dict:
    """The settings as JSON data (the flat flag names)."""
    return {f.name: options_lib.to_json_value(f, getattr(self, f.name))
            for f in dataclasses.fields(self)}

  def to_flagfile(self) -> str:
    """The settings as an absl flagfile, one ``--name=value`` line per
    setting that differs from its default."""
    lines = []
    for field in dataclasses.fields(self):
      value = getattr(self, field.name)
      if value == field.default:
        continue
      lines.append(f"--{field.name}={flag_text(field, value)}")
    return "".join(line + "\n" for line in lines)

  # What the sections describe, assembled across sections.

  def objective(self) -> DistillObjective:
    """The distillation objective these flags describe: every objective
    field that is also a flag, plus the schedules' length (``num_steps``)
    and the feature terms."""
    shared = {f.name: getattr(self, f.name)
              for f in dataclasses.fields(DistillObjective)
              if f.name in SECTION_OF}
    return DistillObjective(**shared, schedule_steps=self.num_steps,
                            feature_terms=self.feature_terms())

  def feature_terms(self) -> tuple[FeatureTerm, ...]:
    return self.section("feature").terms(self.batch_size)

  def multi_teacher_objective(self) -> MultiTeacherObjective:
    """The multi-teacher objective of these flags (`MultiTeacherObjective`,
    feature terms expanded to one per teacher)."""
    return MultiTeacherObjective.create(
        self.objective(), self.num_teachers(), combiner=self.combiner,
        teacher_weights=self.teacher_weights,
        drop_rate=self.teacher_drop_rate,
        feature_standardize=self.teacher_feature_standardize)

  def num_teachers(self) -> int:
    return self.section("multi_teacher").num_teachers()

  def multi_teacher(self) -> bool:
    return bool(self.teacher_checkpoints or self.teacher_seeds)

  def peers(self) -> tuple[str, ...]:
    """The peer architectures of --mode=mutual (``--peer_models``, else
    ``--model`` ``--num_peers`` times) or online_distill (the teacher, then
    the student)."""
    if self.mode == "online_distill":
      return (self.teacher_model, self.model)
    return self.peer_models or (self.model,) * self.num_peers

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


Config = dataclasses.make_dataclass(
    "Config",
    [(f.name, f.type, dataclasses.field(default=f.default,
                                        metadata=f.metadata))
     for section in SECTIONS.values() for f in dataclasses.fields(section)],
    bases=(_ConfigMethods,), frozen=True)
Config.__module__ = __name__
Config.__qualname__ = "Config"
Config.__doc__ = """Everything one invocation of ``experiments.main`` needs.

Its fields are those of the sections (`SECTIONS`), under their flag names;
``Config(**changes)`` validates every section and the rules across them
(`check_across`), raising one-line ``ValueError``s that name the flag."""


def check_across(cfg) -> None:
  """The rules that span sections or depend on ``--mode``, in one place."""
  check = options_lib.check
  lm_mode = cfg.mode in LM_MODES
  for flag, name in [("--model", cfg.model),
                     ("--teacher_model", cfg.teacher_model)] + [
                         ("--teacher_models", m) for m in cfg.teacher_models]:
    # causal_lm reads byte tokens, which only the LM modes feed it.
    if name == "causal_lm" and not lm_mode and (
        flag != "--teacher_model" or cfg.mode == "compare"):
      raise ValueError(f"{flag}=causal_lm: expected --mode=distill_lm or "
                       f"cache_lm for a causal LM (--mode={cfg.mode} "
                       "feeds the float inputs of --dataset)")
  if cfg.loss != "uld":  # ULD (across vocabularies) is checked below.
    cfg.objective()  # The loss, its options, schedules and feature terms.
  # Teachers per mode.
  if cfg.ema_teacher_decay > 0:
    check(cfg.mode in ("distill", "compare", "tune"), "--ema_teacher_decay",
          cfg.ema_teacher_decay, "0 outside --mode=distill (or a "
          "--methods file of compare/tune)")
    check(not cfg.teacher_checkpoints, "--teacher_checkpoints",
          ",".join(cfg.teacher_checkpoints), "unset with "
          "--ema_teacher_decay > 0")
  if cfg.mode in PEER_MODES:
    check(not cfg.feature_pairs, "--feature_pairs",
          ",".join(cfg.feature_pairs), f"unset with --mode={cfg.mode} "
          "(peers distil logits)")
    check(cfg.loss in PEER_LOSSES, "--loss", cfg.loss,
          f"one of {', '.join(PEER_LOSSES)} with --mode={cfg.mode}")
  if cfg.mode == "distill" and cfg.ema_teacher_decay > 0:
    check(not cfg.teacher_checkpoint and not cfg.teacher_checkpoints,
          "--teacher_checkpoint",
          cfg.teacher_checkpoint or ",".join(cfg.teacher_checkpoints),
          "unset with --ema_teacher_decay > 0 (the teacher is the "
          "student's own moving average)")
  elif cfg.mode == "distill":
    check(bool(cfg.teacher_checkpoint or cfg.teacher_torch_checkpoint)
          != bool(cfg.teacher_checkpoints),
          "--teacher_checkpoint", cfg.teacher_checkpoint,
          "the workdir of a --mode=train run, or --teacher_torch_checkpoint "
          "(required by --mode=distill)"
          if not cfg.teacher_checkpoints else
          "unset when --teacher_checkpoints names the teachers")
  if cfg.teacher_torch_checkpoint:
    check(cfg.mode in ("distill", "kip"), "--teacher_torch_checkpoint",
          cfg.teacher_torch_checkpoint, "only with --mode=distill or kip")
    check(not cfg.teacher_checkpoint and not cfg.teacher_checkpoints
          and cfg.ema_teacher_decay <= 0, "--teacher_torch_checkpoint",
          cfg.teacher_torch_checkpoint, "unset with --teacher_checkpoint, "
          "--teacher_checkpoints or --ema_teacher_decay (one teacher)")
  if cfg.teacher_checkpoints:
    check(cfg.mode == "distill", "--teacher_checkpoints",
          ",".join(cfg.teacher_checkpoints), "only with --mode=distill "
          "(--mode=compare trains its teachers: --teacher_seeds)")
  if cfg.teacher_seeds:
    check(cfg.mode == "compare", "--teacher_seeds",
          ",".join(map(str, cfg.teacher_seeds)), "only with "
          "--mode=compare (--mode=distill takes --teacher_checkpoints)")
  if cfg.multi_teacher():
    cfg.multi_teacher_objective()  # Validates the combiner's options.
  # Modes that train over --seeds, tune, kip and the LM modes.
  if cfg.mode in ("compare", "tune", "born_again") + PEER_MODES:
    check(len(cfg.seeds) > 0, "--seeds", cfg.seeds, "at least one seed")
  if cfg.mode == "tune":
    check(cfg.validation_fraction > 0, "--validation_fraction",
          cfg.validation_fraction, "a fraction in (0, 1) with "
          "--mode=tune, which must not choose on the test set")
    check(len(cfg.methods) > 0, "--methods", cfg.methods,
          "the method flagfiles to tune (required by --mode=tune)")
    check(bool(cfg.tune_grid), "--tune_grid", cfg.tune_grid,
          "a JSON file of candidate values per method (required by "
          "--mode=tune)")
  if cfg.mode == "kip":
    check(cfg.kip_method != "krr_st" or bool(cfg.teacher_checkpoint
                                             or cfg.teacher_torch_checkpoint),
          "--teacher_checkpoint", cfg.teacher_checkpoint,
          "the workdir of a --mode=train run whose penultimate "
          "representations --kip_method=krr_st distills")
  if not lm_mode:
    for name in ("teacher_hf", "student_hf", "student_config",
                 "student_init", "tokenizer", "student_tokenizer"):
      check(not getattr(cfg, name), f"--{name}", getattr(cfg, name),
            "only with --mode=distill_lm or cache_lm")
    check(not cfg.lora_rank, "--lora_rank", cfg.lora_rank,
          "0 outside --mode=distill_lm")
  on_policy = (cfg.on_policy_fraction > 0
               or cfg.on_policy_schedule == "distillm")
  if on_policy or "seqkd" in cfg.lm_runs or cfg.gen_eval_prompts:
    flag = ("--on_policy_fraction" if cfg.on_policy_fraction > 0 else
            "--on_policy_schedule" if on_policy else
            "--gen_eval_prompts" if cfg.gen_eval_prompts else "--lm_runs")
    check(cfg.mode == "distill_lm", flag, getattr(
        cfg, flag[2:]), "only with --mode=distill_lm")
    check(0 < cfg.lm_prompt_len < cfg.seq_len, "--lm_prompt_len",
          cfg.lm_prompt_len, f"a prompt length in [1, --seq_len={cfg.seq_len})"
          f" ({flag} samples completions after it)")
  cross = cfg.loss == "uld"
  if cross or cfg.student_tokenizer:
    check(cfg.mode == "distill_lm" and bool(cfg.teacher_hf),
          "--loss" if cross else "--student_tokenizer",
          cfg.loss if cross else cfg.student_tokenizer,
          "uld only with --mode=distill_lm --teacher_hf (a student with its "
          "own tokenizer)")
    check(cross, "--loss", cfg.loss, "uld with --student_tokenizer (token-"
          "level losses need one vocabulary; ULD compares sorted "
          "distributions across vocabularies)")
    check(bool(cfg.student_tokenizer), "--student_tokenizer",
          cfg.student_tokenizer, "the student's tokenizer with --loss=uld")
    check(not on_policy and "seqkd" not in cfg.lm_runs, "--loss", cfg.loss,
          "uld without on-policy students or seqkd (their samples are in "
          "one tokenizer)")
    check(set(cfg.lm_runs) <= {"baseline", "online"}, "--lm_runs",
          ",".join(cfg.lm_runs), "baseline,online with --loss=uld (caches "
          "hold the teacher's vocabulary)")
    check(not cfg.lm_fused_kd, "--lm_fused_kd", cfg.lm_fused_kd,
          "unset with --loss=uld")
  if cfg.on_policy_schedule == "distillm" and cfg.mode == "distill_lm":
    check(cfg.eval_every > 0, "--eval_every", cfg.eval_every,
          "> 0 with --on_policy_schedule=distillm (the validation loss "
          "adapts its ratio of student outputs)")
  if lm_mode:
    if cfg.teacher_hf or cfg.student_hf or cfg.student_config:
      check(not cfg.teacher_checkpoint, "--teacher_checkpoint",
            cfg.teacher_checkpoint, "unset with --teacher_hf")
      check(bool(cfg.student_hf or cfg.student_config or cfg.student_init)
            or cfg.mode == "cache_lm", "--student_hf", cfg.student_hf,
            "the student: --student_hf=DIR, --student_config=FILE or "
            "--student_init=teacher_layers:... with --teacher_hf")
    else:
      check(cfg.model == "causal_lm", "--model", cfg.model,
            "causal_lm for --mode=distill_lm/cache_lm (a Hugging Face "
            "decoder comes with --teacher_hf)")
      check(cfg.teacher_model == "causal_lm", "--teacher_model",
            cfg.teacher_model, "causal_lm for --mode=distill_lm/cache_lm")
      check(not cfg.lora_rank, "--lora_rank", cfg.lora_rank,
            "0 without --teacher_hf (LoRA adapts decoder students)")
  if cfg.mode == "cache_lm":
    check(bool(cfg.teacher_checkpoint or cfg.teacher_hf),
          "--teacher_checkpoint",
          cfg.teacher_checkpoint, "the teacher workdir whose outputs "
          "--mode=cache_lm writes")
    check(bool(cfg.lm_cache_dir), "--lm_cache_dir", cfg.lm_cache_dir,
          "the directory --mode=cache_lm writes the cache to")
  # Scale against the other sections.
  axes = sharding_lib.parse_mesh(cfg.mesh)
  if cfg.teacher_shards > 1 and sharding_lib.TEACHER_AXIS in axes and (
      axes[sharding_lib.TEACHER_AXIS] != cfg.teacher_shards):
    raise ValueError(f"--mesh={cfg.mesh} has a teacher axis of size "
                     f"{axes[sharding_lib.TEACHER_AXIS]} but --teacher_shards="
                     f"{cfg.teacher_shards}; give one of them")
  check(cfg.batch_size % cfg.grad_accum_steps == 0, "--batch_size",
        cfg.batch_size, f"a multiple of --grad_accum_steps="
        f"{cfg.grad_accum_steps} (each step splits its batch into that "
        "many micro-batches)")


# Flags.

def config_fields() -> tuple[dataclasses.Field, ...]:
  return dataclasses.fields(Config)


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """Defines one absl flag per section field in ``flag_values`` (once per
  `FlagValues`; a fresh one parses a command line with no state left by
  another)."""
  if "mode" in flag_values:
    return
  for field in config_fields():
    options_lib.define_flag(field, flag_values)


def config_from_flags(FLAGS=flags.FLAGS) -> Config:
  """Builds and validates a `Config` from parsed absl flags."""
  return Config(**{f.name: options_lib.from_flag(f, FLAGS[f.name].value)
                   for f in config_fields()})


def flag_text(field: dataclasses.Field, value) -> str:
  """``value`` of ``field`` as its flag would be written."""
  kind = field.metadata["kind"]
  if value is None:
    return ""
  if kind == "json":
    import json  # pylint: disable=g-import-not-at-top
    return json.dumps(options_lib.to_json_value(field, value))
  if kind == "kwargs":
    return ",".join(f"{k}={v:g}" for k, v in value)
  if isinstance(value, tuple):
    return ",".join(map(str, value))
  if isinstance(value, bool):
    return "true" if value else "false"
  return str(value)


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


def cpu_xla_flags(cfg: Config, xla_flags: str) -> str:
  """``XLA_FLAGS`` with ``--cpu_dot_library``'s choice added (unchanged when
  the user's flags already choose; only the CPU backend reads the flag),
  and with ``--remat`` XLA:CPU's memory-optimising scheduler: its default
  one runs the recomputation early, next to the forward pass, and saves no
  memory (tests/models/test_remat.py)."""
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


# Method files (--methods of compare and tune).

# Settings a method flagfile may not change: they define the comparison.
_NOT_PER_METHOD = {"mode", "workdir", "seeds", "methods", "dataset",
                   "data_dir", "model", "model_kwargs", "teacher_model",
                   "teacher_model_kwargs", "teacher_checkpoint",
                   "teacher_torch_checkpoint",
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
  (a path, named in errors). Later lines override earlier ones; values go
  through the flags' parsers and the sections' converters, as on the
  command line."""
  fields = {f.name: f for f in config_fields()}
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
    if name not in FLAGS or name not in fields:
      raise ValueError(f"{source}: unknown flag --{name}")
    if name in _NOT_PER_METHOD:
      raise ValueError(f"{source}: --{name} cannot differ between methods; "
                       "set it in the main flagfile")
    try:
      parsed = FLAGS[name].parser.parse(value)
    except ValueError as e:
      raise ValueError(f"{source}: --{name}={value}: {e}") from None
    changes[name] = options_lib.from_flag(fields[name], parsed,
                                          f"{source}: --{name}")
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


# Paths.

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
          ("--teacher_hf", cfg.teacher_hf),
          ("--student_hf", cfg.student_hf),
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
