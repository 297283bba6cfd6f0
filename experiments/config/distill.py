"""Config sections of distillation: the objective, feature terms, several
teachers and the recipes."""

from __future__ import annotations

import dataclasses

from experiments.config.options import Section, check, one_of, option

from experiments.config.core import check_model_name
from jdistill.train.multi_teacher import COMBINERS, FEATURE_STANDARDIZATIONS
from jdistill.train.objective import (FEATURE_LOSSES, FeatureTerm,
                                      distill_loss_names,
                                      feature_loss_hyperparameters)
from jdistill.train.projectors import PROJECTOR_KINDS
from jdistill.train.schedules import SCHEDULE_KINDS
from jdistill.train.lm import CROSS_TOKENIZER_LOSSES
from jdistill.train.stateful import STATEFUL_LOGIT_LOSSES
from jdistill.train.ensemble import STACKINGS

AUGMENT_VIEWS = ("shared", "independent")
# Stateful losses (TAID) keep a state of one teacher-student pair.
PEER_LOSSES = tuple(n for n in distill_loss_names()
                    if n not in STATEFUL_LOGIT_LOSSES)


@dataclasses.dataclass(frozen=True)
class ObjectiveSection(Section):
  """The logit loss, its weights, temperature and schedules
  (`jdistill.train.DistillObjective`)."""

  loss: str = option(
      "kd", "str",
      "Distillation loss: "
      + ", ".join(distill_loss_names()) + "; uld (distill_lm across "
      "tokenizers, with --student_tokenizer).")
  temperature: float = option(
      4.0, "float",
      "Distillation temperature.")
  ce_weight: float = option(
      1.0, "float",
      "Weight of CE on the labels.")
  kd_weight: float = option(
      1.0, "float",
      "Weight of the logit loss.")
  loss_kwargs: tuple[tuple[str, float], ...] = option(
      (), "kwargs",
      "Loss hyperparameters as name=value, "
      "e.g. beta=0.5 for jsd, alpha=1,beta=8 for dkd.")
  standardize_logits: bool = option(
      False, "bool",
      "Z-score student and teacher logits before the loss.")
  temperature_schedule: str = option(
      "constant", "enum",
      "How the temperature moves from --temperature at step 0 to "
      "--temperature_end at --num_steps.",
      choices=SCHEDULE_KINDS)
  temperature_end: float | None = option(
      None, "float",
      "Final value of the temperature for a "
      "linear or cosine schedule.")
  ce_weight_schedule: str = option(
      "constant", "enum",
      "How the CE weight moves from --ce_weight at step 0 to "
      "--ce_weight_end at --num_steps.",
      choices=SCHEDULE_KINDS)
  ce_weight_end: float | None = option(
      None, "float",
      "Final value of the CE weight for a "
      "linear or cosine schedule.")
  kd_weight_schedule: str = option(
      "constant", "enum",
      "How the distillation weight moves from --kd_weight at step 0 to "
      "--kd_weight_end at --num_steps.",
      choices=SCHEDULE_KINDS)
  kd_weight_end: float | None = option(
      None, "float",
      "Final value of the distillation weight for a "
      "linear or cosine schedule.")
  temperature_schedule_steps: int = option(
      0, "int",
      "Length of the schedule "
      "of the temperature in steps; it holds --temperature_end afterwards "
      "(0: --num_steps).")
  ce_weight_schedule_steps: int = option(
      0, "int",
      "Length of the schedule "
      "of the CE weight in steps; it holds --ce_weight_end afterwards "
      "(0: --num_steps).")
  kd_weight_schedule_steps: int = option(
      0, "int",
      "Length of the schedule "
      "of the distillation weight in steps; it holds --kd_weight_end "
      "afterwards (0: --num_steps).")
  aux_loss: str | None = option(
      None, "str_or_none",
      "Optional second logit loss added to "
      "--loss (e.g. SinKD: --loss=kd --aux_loss=sinkhorn).")
  aux_weight: float = option(
      1.0, "float",
      "Weight of --aux_loss.")
  aux_temperature: float | None = option(
      None, "float",
      "Temperature of --aux_loss "
      "(default: that of --loss).")
  aux_loss_kwargs: tuple[tuple[str, float], ...] = option(
      (), "kwargs",
      "Hyperparameters of --aux_loss as "
      "name=value.")


  def validate(self) -> None:
    """The values alone; the objective they make (`DistillObjective`,
    which checks the options and schedules) is built across sections."""
    names = distill_loss_names() + CROSS_TOKENIZER_LOSSES
    check(self.loss in names, "--loss", self.loss,
          f"one of: {', '.join(names)}")
    check(self.temperature > 0, "--temperature", self.temperature,
          "a positive number")
    for name in ("ce_weight", "kd_weight"):
      check(getattr(self, name) >= 0, f"--{name}", getattr(self, name),
            "a non-negative number")
    for name in ("temperature_end", "aux_temperature"):
      value = getattr(self, name)
      check(value is None or value > 0, f"--{name}", value,
            "a positive number")


@dataclasses.dataclass(frozen=True)
class FeatureSection(Section):
  """Feature terms: taps, losses, weights and projectors
  (`jdistill.train.FeatureTerm`)."""

  feature_pairs: tuple[str, ...] = option(
      (), "strs",
      "Feature distillation: "
      "student_tap:teacher_tap pairs (the models' feature names, "
      "e.g. block2:block2,penultimate:penultimate).")
  feature_loss: tuple[str, ...] = option(
      ("hint",), "strs",
      "Feature loss per "
      "pair (one for all, or one per pair): "
      + ", ".join(FEATURE_LOSSES) + ".")
  feature_weight: tuple[float, ...] = option(
      (1.0,), "floats",
      "Weight per feature pair (one for all, or one per pair).")
  projector: tuple[str, ...] = option(
      ("identity",), "strs",
      "Student-feature projector "
      "per pair (one for all, or one per pair): "
      + ", ".join(PROJECTOR_KINDS) + ".")
  feature_loss_kwargs: tuple[tuple[str, float], ...] = option(
      (), "kwargs",
      "Hyperparameters of the feature "
      "losses and term options (memory_size of contrastive) as "
      "name=value; each pair's loss takes those it knows.")
  feature_weight_schedule: str = option(
      "constant", "enum",
      "How each feature weight moves to its "
      "--feature_weight_end.",
      choices=SCHEDULE_KINDS)
  feature_weight_end: tuple[float, ...] = option(
      (), "floats",
      "Final feature weight(s) of a "
      "linear or cosine --feature_weight_schedule.")
  feature_weight_schedule_steps: int = option(
      0, "int",
      "Length of the "
      "feature weight schedule (0: --num_steps).")


  def validate(self) -> None:
    self.terms()

  def terms(self, batch_size: int | None = None) -> tuple[FeatureTerm, ...]:
    """One `FeatureTerm` per ``--feature_pairs`` entry. ``--feature_loss``,
    ``--feature_weight``, ``--projector`` and ``--feature_weight_end`` give
    one value for all pairs or one per pair. With ``batch_size``, memory
    banks are checked to hold whole batches."""
    n = len(self.feature_pairs)
    pairs = []
    for item in self.feature_pairs:
      student, sep, teacher = item.partition(":")
      check(bool(sep and student and teacher and ":" not in teacher),
            "--feature_pairs", item,
            "student_tap:teacher_tap items such as penultimate:penultimate")
      pairs.append((student.strip(), teacher.strip()))

    def per_pair(flag, values):
      values = tuple(values)
      check(len(values) in (1, n), f"--{flag}", ",".join(map(str, values)),
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
      check(not self.feature_loss_kwargs, "--feature_loss_kwargs",
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
    for term in terms if batch_size else ():
      # The bank is written one whole batch per step.
      check(term.memory_size % batch_size == 0,
            "--feature_loss_kwargs", f"memory_size={term.memory_size}",
            f"a multiple of --batch_size={batch_size}")
    return terms


@dataclasses.dataclass(frozen=True)
class MultiTeacherSection(Section):
  """Several teachers and how they are combined
  (`jdistill.train.MultiTeacherObjective`)."""

  teacher_checkpoints: tuple[str, ...] = option(
      (), "strs",
      "Multi-teacher distillation: the "
      "workdirs of several --mode=train runs (instead of "
      "--teacher_checkpoint); see --combiner.")
  teacher_seeds: tuple[int, ...] = option(
      (), "ints",
      "--mode=compare: train one teacher "
      "per seed and distill from all of them (multi-teacher).")
  teacher_models: tuple[str, ...] = option(
      (), "strs",
      "--mode=compare: the architecture "
      "of each --teacher_seeds teacher (default: --teacher_model; "
      "--teacher_model_kwargs apply to --teacher_model only).")
  combiner: str = option(
      "mean_probs", "enum",
      "How several teachers "
      "are combined: mean_probs (probability ensemble), "
      "mean_logits, confidence (CA-MKD per-example weights), "
      "entropy, best (best teacher per example), learned (weights "
      "in the train state, fit to the labels), per_teacher (the "
      "loss against each teacher, summed with weights).",
      choices=COMBINERS)
  teacher_weights: tuple[float, ...] = option(
      (), "floats",
      "Fixed teacher weights, one per "
      "teacher (mean_probs, mean_logits, per_teacher); default "
      "uniform.")
  teacher_drop_rate: float = option(
      0.0, "float",
      "UNIC teacher "
      "dropping: per example, drop each teacher but the worst-"
      "matched one with this probability.")
  teacher_feature_standardize: str = option(
      "none", "enum",
      "Standardise each teacher's features before the feature "
      "losses: with batch or running statistics.",
      choices=FEATURE_STANDARDIZATIONS)
  teacher_stacking: str = option(
      "auto", "enum",
      "How teachers of one architecture run: vmap, map (lax.map), "
      "or auto (map for 2-D convolutions on CPU).",
      choices=STACKINGS)
  teacher_shards: int = option(
      1, "int",
      "Shard the stacked "
      "teachers over a 'teacher' mesh axis of this size (the "
      "'data' axis gets the rest of the devices).")


  def validate(self) -> None:
    for name in self.teacher_models:
      check_model_name("--teacher_models", name)
    one_of(self, "combiner", COMBINERS)
    one_of(self, "teacher_stacking", STACKINGS)
    one_of(self, "teacher_feature_standardize", FEATURE_STANDARDIZATIONS)
    check(self.teacher_shards >= 1, "--teacher_shards", self.teacher_shards,
          "a positive integer")
    if self.teacher_models:
      check(len(self.teacher_models) == len(self.teacher_seeds),
            "--teacher_models", ",".join(self.teacher_models),
            f"one architecture per --teacher_seeds entry "
            f"({len(self.teacher_seeds)})")
    check(len(set(self.teacher_checkpoints)) == len(self.teacher_checkpoints),
          "--teacher_checkpoints", ",".join(self.teacher_checkpoints),
          "distinct teacher workdirs")

  def num_teachers(self) -> int:
    """Teachers of this run: ``--teacher_checkpoints`` (distill) or
    ``--teacher_seeds`` (compare trains them); 1 without them."""
    return max(len(self.teacher_checkpoints), len(self.teacher_seeds), 1)


@dataclasses.dataclass(frozen=True)
class RecipeSection(Section):
  """Recipes: augmentation (function matching), EMA teacher, born-again
  generations, peers."""

  augment: str = option(
      "", "str",
      "Augmentation inside the train "
      "step, as comma-separated ops applied in order: crop:P "
      "(pad P, random crop), flip (images), shift:S (1-D "
      "signals, circular), noise:STD, then at most one of "
      "mixup:ALPHA or cutmix:ALPHA (images); e.g. "
      "'shift:8,noise:0.1,mixup:1'. Empty: none. With a "
      "teacher the teacher's logits are computed in every step "
      "(never cached), on the view --augment_views says.")
  augment_views: str = option(
      "shared", "enum",
      "shared: teacher and student see the same augmented batch "
      "(function matching, Beyer et al. 2022); independent: the "
      "teacher sees its own augmented view of the same examples.",
      choices=list(AUGMENT_VIEWS))
  ema_teacher_decay: float = option(
      0.0, "float",
      "--mode=distill "
      "without a teacher checkpoint: self-distillation from an "
      "exponential moving average of the student with this decay "
      "(kept and checkpointed in the train state). 0: off.")
  ema_warmup: bool = option(
      True, "bool",
      "Ramp the EMA decay up as "
      "min(decay, (1 + step) / (10 + step)).")
  generations: int = option(
      3, "int",
      "--mode=born_again: "
      "generations distilled after generation 0 (trained from "
      "labels); generation k distils from generation k-1 of "
      "the same architecture (--model).")
  num_peers: int = option(
      2, "int",
      "--mode=mutual: peers of "
      "--model trained together (Deep Mutual Learning), each "
      "distilling from the others' current predictions.")
  peer_models: tuple[str, ...] = option(
      (), "strs",
      "--mode=mutual: one architecture per "
      "peer instead of --model x --num_peers (e.g. cnn1d,mlp); "
      "--model_kwargs apply to peers named --model.")


  def validate(self) -> None:
    """The recipe flags' values (the --augment spec itself is checked
    against the data's input shape when the run starts)."""
    check(self.augment_views in AUGMENT_VIEWS, "--augment_views",
          self.augment_views, f"one of {', '.join(AUGMENT_VIEWS)}")
    check(0 <= self.ema_teacher_decay < 1, "--ema_teacher_decay",
          self.ema_teacher_decay, "a number in [0, 1) (0: no EMA teacher)")
    check(self.generations >= 1, "--generations", self.generations,
          "a positive integer (born-again generations after the first)")
    check(self.num_peers >= 2, "--num_peers", self.num_peers,
          "an integer >= 2 (--mode=mutual trains that many peers)")
    for name in self.peer_models:
      check_model_name("--peer_models", name)
    if self.peer_models:
      check(len(self.peer_models) >= 2, "--peer_models",
            ",".join(self.peer_models), "at least two models")
