"""The distillation objective:
``ce_weight * CE + kd_weight * <logit loss> + aux_weight * <second logit loss>``.

This is the glue between the pure losses in `jdistill.losses` and the steps:
it chooses the losses by name, applies logit standardization when asked, and
reduces per-example values to a masked batch mean. The optional second logit
loss serves recipes that add one loss to another, e.g. SinKD's
``alpha * KD + (1 - alpha) * CE + beta * Sinkhorn``.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jdistill import losses
from jdistill.augment import choose_dominant
from jdistill.train.schedules import Schedule, make_value_schedule
from jdistill.train.stateful import STATEFUL_LOGIT_LOSSES, get_stateful_loss

# How the objective calls each loss whose signature is not the registry's
# (student, teacher, *, temperature, ...): (student, teacher, labels,
# example_mask, temperature, kwargs) -> scalar. Per-example losses are reduced
# with `masked_mean`; relational ones get the example mask themselves. The
# stateful logit losses (`jdistill.train.stateful`) read the loss state, so
# `DistillObjective.logit_loss` calls them through their protocol instead.
_SPECIAL_LOSSES: dict[str, tuple[Callable, Callable | None]] = {
    "dkd": (losses.dkd, lambda s, t, y, m, T, kw: masked_mean(
        losses.dkd(s, t, y, temperature=T, **kw), m)),
    "pld": (losses.pld, lambda s, t, y, m, T, kw: masked_mean(
        losses.pld(s, t, y, temperature=T, **kw), m)),
    # DIST takes no mask; padded examples never occur in training batches.
    "dist": (losses.dist, lambda s, t, y, m, T, kw: losses.dist(
        s, t, temperature=T, **kw)),
    "sinkhorn": (losses.sinkhorn, lambda s, t, y, m, T, kw: losses.sinkhorn(
        s, t, temperature=T, example_mask=m, **kw)),
    # MLKD uses its own set of temperatures (2..6 by default).
    "mlkd": (losses.mlkd, lambda s, t, y, m, T, kw: losses.mlkd(
        s, t, example_mask=m, **kw)),
    # The stateful logit losses, here for the order of `distill_loss_names`:
    # no stateless call (see above).
    **{name: (loss.fn, None) for name, loss in STATEFUL_LOGIT_LOSSES.items()},
    "ofa": (losses.ofa, lambda s, t, y, m, T, kw: masked_mean(
        losses.ofa(s, t, y, temperature=T, **kw), m)),
}
_NOT_HYPERPARAMETERS = ("temperature", "temperatures", "axis", "where",
                        "example_mask", "labels")


class FeatureLossSpec(NamedTuple):
  """How the objective calls a feature loss.

  Attributes:
    fn: the loss function of `jdistill.losses`.
    relational: whether it is a scalar over the batch that takes the example
      mask itself (RKD, SP, PKT, CKA, contrastive) rather than a per-example
      value that the objective averages.
    same_shape: whether it compares the projected student feature with the
      teacher's element by element (so the projector must match shapes).
      Losses that compare features of different sizes (AT, RKD, SP, PKT,
      CKA, token relations) can run without a projector.
    needs_labels: whether it takes the labels (ND, OFA).
    state: the term's state in `TrainState.loss_state`: ``None``,
      ``"memory_bank"`` (a FIFO bank of teacher embeddings used as extra
      negatives, `losses.memory_bank_update`; its size is the term option
      ``memory_size``, 0 for none) or ``"class_centers"`` (the teacher's
      per-class mean of the tap over the training set, `losses.class_means`,
      computed by the program before training and kept constant).
    options: term options that are not keywords of ``fn`` (they configure
      the state).
  """

  fn: Callable
  relational: bool
  same_shape: bool
  needs_labels: bool = False
  state: str | None = None
  options: tuple[str, ...] = ()


# Feature losses by name. Per-example losses are averaged over their
# non-batch axes and then over the unmasked examples.
FEATURE_LOSSES: dict[str, FeatureLossSpec] = {
    "hint": FeatureLossSpec(functools.partial(losses.hint, kind="mse"),
                            False, True),
    "hint_smooth_l1": FeatureLossSpec(
        functools.partial(losses.hint, kind="smooth_l1"), False, True),
    "hint_cosine": FeatureLossSpec(
        functools.partial(losses.hint, kind="cosine"), False, True),
    "attention_transfer": FeatureLossSpec(losses.attention_transfer, False,
                                          False),
    "vkd": FeatureLossSpec(losses.vkd, False, True),
    "nd": FeatureLossSpec(losses.nd, False, True, needs_labels=True,
                          state="class_centers"),
    "attention_map": FeatureLossSpec(losses.attention_map, False, True),
    "token_relation": FeatureLossSpec(losses.token_relation, False, False),
    "rkd_distance": FeatureLossSpec(losses.rkd_distance, True, False),
    "rkd_angle": FeatureLossSpec(losses.rkd_angle, True, False),
    "similarity_preserving": FeatureLossSpec(losses.similarity_preserving,
                                             True, False),
    "pkt": FeatureLossSpec(losses.pkt, True, False),
    "cka": FeatureLossSpec(losses.cka_loss, True, False),
    "contrastive": FeatureLossSpec(losses.contrastive, True, True,
                                   state="memory_bank",
                                   options=("memory_size",)),
    # OFA: a student feature mapped into logit space (--projector=ofa)
    # against the teacher's logits (teacher tap "logits").
    "ofa": FeatureLossSpec(losses.ofa, False, True, needs_labels=True),
}
_FEATURE_NOT_HYPERPARAMETERS = ("axis", "where", "example_mask", "labels",
                                "kind", "mode", "normalize", "negatives",
                                "from_logits")


def _feature_spec(name: str) -> FeatureLossSpec:
  if name not in FEATURE_LOSSES:
    raise ValueError(f"--feature_loss={name}: unknown feature loss; expected "
                     f"one of: {', '.join(FEATURE_LOSSES)}")
  return FEATURE_LOSSES[name]


def feature_loss_hyperparameters(name: str) -> tuple[str, ...]:
  """Numeric keyword hyperparameters and term options of feature loss
  ``name``."""
  spec = _feature_spec(name)
  fixed = spec.fn.keywords if isinstance(spec.fn, functools.partial) else {}
  return tuple(p.name for p in inspect.signature(spec.fn).parameters.values()
               if p.kind is inspect.Parameter.KEYWORD_ONLY
               and p.name not in _FEATURE_NOT_HYPERPARAMETERS
               and p.name not in fixed) + spec.options


@dataclasses.dataclass(frozen=True)
class FeatureTerm:
  """One feature loss between a student tap and a teacher tap.

  The student feature goes through the term's projector (applied by the
  step, `jdistill.train.projectors`) before the loss. The weight at step
  ``k`` follows ``weight_schedule`` from ``weight`` to ``weight_end`` over
  ``weight_schedule_steps`` (0: the objective's ``schedule_steps``).
  ``loss_kwargs`` holds the loss's hyperparameters and the term's options
  (`FeatureLossSpec.options`, e.g. ``memory_size`` of ``contrastive``).
  """

  loss: str
  student_tap: str
  teacher_tap: str
  weight: float = 1.0
  projector: str = "identity"
  loss_kwargs: tuple[tuple[str, float], ...] = ()
  weight_schedule: str = "constant"
  weight_end: float | None = None
  weight_schedule_steps: int = 0

  def __post_init__(self):
    allowed = feature_loss_hyperparameters(self.loss)
    for key, _ in self.loss_kwargs:
      if key not in allowed:
        raise ValueError(
            f"--feature_loss_kwargs: '{key}' is not a hyperparameter of "
            f"feature loss '{self.loss}'; expected one of: "
            f"{', '.join(allowed) or 'none'}")
    if not self.weight >= 0:
      raise ValueError(f"--feature_weight must be >= 0; got {self.weight}")
    if self.weight_schedule_steps < 0:
      raise ValueError("--feature_weight_schedule_steps must be >= 0; got "
                       f"{self.weight_schedule_steps}")
    size = self.memory_size
    if size < 0 or size != int(size):
      raise ValueError(f"--feature_loss_kwargs: memory_size must be a "
                       f"non-negative integer; got {size}")

  @property
  def spec(self) -> FeatureLossSpec:
    return FEATURE_LOSSES[self.loss]

  @property
  def needs_same_shape(self) -> bool:
    """Whether the loss compares the projected student feature with the
    teacher's element by element (so the projector must match shapes)."""
    return self.spec.same_shape

  @property
  def memory_size(self) -> int:
    """Slots of the term's memory bank (0: none)."""
    return int(dict(self.loss_kwargs).get("memory_size", 0))

  @property
  def state_kind(self) -> str | None:
    """The kind of state this term keeps in the loss state (`FeatureLossSpec.
    state`), or ``None``; a contrastive term without a bank keeps none."""
    if self.spec.state == "memory_bank" and not self.memory_size:
      return None
    return self.spec.state

  @property
  def name(self) -> str:
    """The metric name of the term."""
    return f"{self.loss}:{self.student_tap}:{self.teacher_tap}"

  def schedule(self, default_steps: int) -> Schedule:
    """The weight's schedule ``step -> weight``, of length
    ``weight_schedule_steps`` or else ``default_steps``."""
    return make_value_schedule(
        self.weight_schedule, self.weight, self.weight_end,
        num_steps=self.weight_schedule_steps or default_steps,
        name="feature_weight")

  def init_state(self, teacher_shape, *, key=None, class_centers=None):
    """The term's initial state (``None`` for a stateless term).

    Args:
      teacher_shape: per-example shape of the teacher tap.
      key: PRNG key of the memory bank's random initial rows.
      class_centers: ``[num_classes, prod(teacher_shape)]`` teacher class
        means for ``nd`` (e.g. `teacher_class_means`).
    """
    dim = math.prod(teacher_shape)
    if self.state_kind == "memory_bank":
      if key is None:
        raise ValueError(f"feature term {self.name}: its memory bank needs "
                         "a PRNG key")
      return losses.memory_bank_init(self.memory_size, dim, key=key)
    if self.state_kind == "class_centers":
      if class_centers is None:
        raise ValueError(f"feature term {self.name}: ND needs the teacher's "
                         f"class means of tap '{self.teacher_tap}'")
      centers = jnp.asarray(class_centers, jnp.float32)
      if centers.ndim != 2 or centers.shape[1] != dim:
        raise ValueError(
            f"feature term {self.name}: class_centers has shape "
            f"{tuple(centers.shape)} but expected [num_classes, {dim}] (the "
            f"size of teacher tap '{self.teacher_tap}')")
      return centers
    return None

  def _kwargs(self) -> dict:
    """The loss's keyword arguments (term options left out), with int and
    bool hyperparameters (e.g. ``num_heads``) cast from the flags' floats."""
    params = inspect.signature(self.spec.fn).parameters
    return _cast_to_defaults(params, [(k, v) for k, v in self.loss_kwargs
                                      if k not in self.spec.options])

  def value(self, student_feat, teacher_feat, mask, labels=None, state=None):
    """The term's unweighted loss on a batch (a scalar); ``state`` is the
    term's state (`init_state`)."""
    spec = self.spec
    kwargs = self._kwargs()
    if self.state_kind is not None and state is None:
      raise ValueError(f"feature term {self.name} needs its state "
                       f"({self.state_kind})")
    teacher_feat = jax.lax.stop_gradient(teacher_feat)
    if self.state_kind == "memory_bank":
      kwargs["negatives"] = state
    if spec.relational:
      return spec.fn(student_feat, teacher_feat, example_mask=mask, **kwargs)
    if self.state_kind == "class_centers":
      values = spec.fn(student_feat, teacher_feat, state, labels, **kwargs)
    elif spec.needs_labels:
      values = spec.fn(student_feat, teacher_feat, labels, **kwargs)
    else:
      values = spec.fn(student_feat, teacher_feat, **kwargs)
    values = jnp.mean(values.reshape(values.shape[0], -1).astype(jnp.float32),
                      axis=1)
    return masked_mean(values, mask)

  def next_state(self, state, teacher_feat, mask, step):
    """The term's state after a step with teacher features
    ``teacher_feat``: the memory bank receives the batch's teacher
    embeddings (masked examples are not written); other states are
    constant."""
    if self.state_kind != "memory_bank":
      return state
    return losses.memory_bank_update(state, teacher_feat, step, where=mask)


def distill_loss_names() -> tuple[str, ...]:
  names = tuple(losses.LOGIT_LOSSES) + tuple(_SPECIAL_LOSSES)
  # Stateful losses registered after this module was imported come last.
  return names + tuple(n for n in STATEFUL_LOGIT_LOSSES if n not in names)


def _loss_fn(name: str, *, flag: str = "--loss") -> Callable:
  stateful = get_stateful_loss(name)
  if stateful is not None:
    return stateful.fn
  if name in _SPECIAL_LOSSES:
    return _SPECIAL_LOSSES[name][0]
  if name in losses.LOGIT_LOSSES:
    return losses.LOGIT_LOSSES[name]
  raise ValueError(f"{flag}={name}: unknown distillation loss; expected one "
                   f"of: {', '.join(distill_loss_names())}")


def _keyword_parameters(name: str) -> dict[str, inspect.Parameter]:
  return {p.name: p
          for p in inspect.signature(_loss_fn(name)).parameters.values()
          if p.kind is inspect.Parameter.KEYWORD_ONLY
          and p.name not in _NOT_HYPERPARAMETERS}


def loss_hyperparameters(name: str) -> tuple[str, ...]:
  """Keyword-only hyperparameters of loss ``name`` (besides temperature)."""
  stateful = get_stateful_loss(name)
  if stateful is not None:
    return stateful.options
  return tuple(_keyword_parameters(name))


def typed_loss_kwargs(name: str, loss_kwargs) -> dict:
  """``loss_kwargs`` as a dict, with values cast to the type of the loss's
  default where that is an int or bool (e.g. sinkhorn's ``num_iters``); the
  options of a stateful loss (`jdistill.train.stateful`) are kept as given."""
  params = ({} if get_stateful_loss(name) is not None
            else _keyword_parameters(name))
  return _cast_to_defaults(params, loss_kwargs)


def _cast_to_defaults(params: dict[str, inspect.Parameter], kwargs) -> dict:
  """``kwargs`` (pairs) as a dict, each value cast to the type of its
  parameter's default where that is an int or bool (flags give floats)."""
  out = {}
  for key, value in kwargs:
    default = params[key].default if key in params else None
    out[key] = (type(default)(value)
                if isinstance(default, (bool, int)) else value)
  return out


def check_loss_kwargs(name: str, loss_kwargs, *, flag: str = "--loss"
                      ) -> None:
  """Raises if ``name`` is unknown or ``loss_kwargs`` names a keyword that
  loss ``name`` does not take. ``flag`` names the loss flag in errors."""
  _loss_fn(name, flag=flag)
  allowed = loss_hyperparameters(name)
  for key, _ in loss_kwargs:
    if key not in allowed:
      raise ValueError(
          f"{flag}_kwargs: '{key}' is not a hyperparameter of loss "
          f"'{name}'; expected one of: {', '.join(allowed) or 'none'}")


def masked_mean(values: jax.Array, mask: jax.Array | None) -> jax.Array:
  """Mean of per-example ``values`` over examples where ``mask`` is True."""
  values = values.astype(jnp.float32)
  if mask is None:
    return jnp.mean(values)
  return jnp.sum(jnp.where(mask, values, 0.0)) / jnp.maximum(
      jnp.sum(mask), 1)


def cross_entropy(logits: jax.Array, labels: jax.Array, *,
                  label_smoothing: float = 0.0, label_mix=None) -> jax.Array:
  """Per-example softmax cross-entropy in float32, with label smoothing.

  ``label_mix=(mixed_labels, lam)`` (``[batch]`` int and float, from mixup
  or CutMix, `jdistill.augment`) gives the mixed-input cross-entropy
  ``lam * CE(labels) + (1 - lam) * CE(mixed_labels)`` (Zhang et al. 2018),
  i.e. the CE against the mixed one-hot target.
  """
  num_classes = logits.shape[-1]
  targets = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
  if label_mix is not None:
    mixed_labels, lam = label_mix
    lam = jnp.asarray(lam, jnp.float32)[..., None]
    targets = lam * targets + (1.0 - lam) * jax.nn.one_hot(
        mixed_labels, num_classes, dtype=jnp.float32)
  if label_smoothing:
    targets = optax.smooth_labels(targets, label_smoothing)
  return optax.softmax_cross_entropy(logits.astype(jnp.float32), targets)


_SCHEDULED = ("temperature", "ce_weight", "kd_weight")


@dataclasses.dataclass(frozen=True)
class DistillObjective:
  """Configuration of the combined loss; hashable, so it can close over jit.

  The loss at step ``k`` is ``ce_weight(k) * CE + kd_weight(k) *
  <loss>(temperature(k)) + aux_weight * <aux_loss>(aux_temperature)``.

  Attributes:
    loss: name of the logit loss (`distill_loss_names()`).
    temperature: softmax temperature of the logit loss.
    ce_weight: weight of the cross-entropy on the labels.
    kd_weight: weight of the distillation term.
    loss_kwargs: extra keyword hyperparameters of the loss, as a tuple of
      ``(name, value)`` pairs (e.g. ``(("beta", 0.5),)`` for ``jsd``).
    standardize_logits: z-score student and teacher logits first (Sun et al.
      2024); applies to every loss (the CE term keeps the raw logits).
    label_smoothing: label smoothing of the CE term.
    temperature_schedule, ce_weight_schedule, kd_weight_schedule:
      ``constant``, ``linear`` or ``cosine`` (`make_value_schedule`): the
      value moves from the field above at step 0 to the matching ``*_end``
      at the schedule's length and holds it afterwards.
    temperature_end, ce_weight_end, kd_weight_end: the values at the end.
    schedule_steps: default length of the schedules (usually the run's
      number of steps); the update of a stateful loss
      (`jdistill.train.stateful`) also uses it.
    temperature_schedule_steps, ce_weight_schedule_steps,
      kd_weight_schedule_steps: per-schedule lengths; 0 means
      ``schedule_steps``. A short linear ``kd_weight`` schedule from 0 to 1
      is DKD's warm-up (``min(epoch / 20, 1)``).
    aux_loss: optional second logit loss added to the first (not a
      stateful loss, `jdistill.train.stateful`, whose state is the first
      loss's); ``None`` for none.
    aux_weight: its (constant) weight.
    aux_temperature: its temperature; ``None`` means ``temperature``'s
      schedule.
    aux_loss_kwargs: its keyword hyperparameters, like ``loss_kwargs``.
    feature_terms: feature losses (`FeatureTerm`) added to the total, each
      with its own weight and schedule; their (projected) features are
      passed to `__call__` as ``features``.
  """

  loss: str = "kd"
  temperature: float = 4.0
  ce_weight: float = 1.0
  kd_weight: float = 1.0
  loss_kwargs: tuple[tuple[str, float], ...] = ()
  standardize_logits: bool = False
  label_smoothing: float = 0.0
  temperature_schedule: str = "constant"
  temperature_end: float | None = None
  ce_weight_schedule: str = "constant"
  ce_weight_end: float | None = None
  kd_weight_schedule: str = "constant"
  kd_weight_end: float | None = None
  schedule_steps: int = 0
  temperature_schedule_steps: int = 0
  ce_weight_schedule_steps: int = 0
  kd_weight_schedule_steps: int = 0
  aux_loss: str | None = None
  aux_weight: float = 1.0
  aux_temperature: float | None = None
  aux_loss_kwargs: tuple[tuple[str, float], ...] = ()
  feature_terms: tuple[FeatureTerm, ...] = ()

  def __post_init__(self):
    check_loss_kwargs(self.loss, self.loss_kwargs)
    for name in _SCHEDULED:
      if getattr(self, f"{name}_schedule_steps") < 0:
        raise ValueError(f"--{name}_schedule_steps must be >= 0 (0: the "
                         f"run's length); got "
                         f"{getattr(self, f'{name}_schedule_steps')}")
    # The schedules, chosen (and checked) once; `logit_loss`,
    # `feature_loss` and `temperature_at` call them.
    object.__setattr__(self, "_value_schedules", tuple(
        make_value_schedule(
            getattr(self, f"{n}_schedule"), getattr(self, n),
            getattr(self, f"{n}_end"),
            num_steps=(getattr(self, f"{n}_schedule_steps")
                       or self.schedule_steps), name=n)
        for n in _SCHEDULED))
    object.__setattr__(self, "_feature_weight_schedules", tuple(
        term.schedule(self.schedule_steps) for term in self.feature_terms))
    stateful = self.stateful_loss
    if (stateful is not None and stateful.needs_num_steps
        and self.schedule_steps <= 0):
      raise ValueError(f"--loss={self.loss} needs the number of training "
                       "steps (schedule_steps) for its adaptive schedule")
    if self.temperature_end is not None and self.temperature_end <= 0:
      raise ValueError(f"--temperature_end must be positive; got "
                       f"{self.temperature_end}")
    if self.temperature <= 0:
      raise ValueError(f"--temperature must be positive; got "
                       f"{self.temperature}")
    if not 0.0 <= self.label_smoothing < 1.0:
      raise ValueError(f"--label_smoothing must be in [0, 1); got "
                       f"{self.label_smoothing}")
    if self.aux_loss is None:
      if self.aux_loss_kwargs:
        raise ValueError("--aux_loss_kwargs is set but --aux_loss is not")
      return
    check_loss_kwargs(self.aux_loss, self.aux_loss_kwargs, flag="--aux_loss")
    aux_stateful = get_stateful_loss(self.aux_loss)
    if aux_stateful is not None:
      raise ValueError(f"--aux_loss={self.aux_loss}: {aux_stateful.label} "
                       "keeps a training state and can only be the main "
                       "--loss")
    if not self.aux_weight >= 0:
      raise ValueError(f"--aux_weight must be >= 0; got {self.aux_weight}")
    if self.aux_temperature is not None and not self.aux_temperature > 0:
      raise ValueError(f"--aux_temperature must be positive; got "
                       f"{self.aux_temperature}")

  @property
  def stateful_loss(self):
    """The main loss's `jdistill.train.stateful.StatefulLogitLoss`, or
    ``None`` for a stateless loss."""
    return get_stateful_loss(self.loss)

  def schedules(self) -> dict[str, Schedule]:
    """The schedules ``step -> value`` of ``temperature``, ``ce_weight``
    and ``kd_weight`` (built once, by `make_value_schedule`)."""
    return dict(zip(_SCHEDULED, self._value_schedules))

  def init_loss_state(self, feature_states=None):
    """The objective's own state for `TrainState.loss_state`.

    A dict with the state of a stateful loss (`jdistill.train.stateful`)
    under the loss's name when the loss keeps one, and ``"features"`` (the
    states of the stateful feature terms, keyed by the term's index as a
    string) when a term keeps one; ``{}`` otherwise.

    Args:
      feature_states: one entry per feature term, `FeatureTerm.init_state`
        (``None`` for stateless terms); required when a term is stateful.
    """
    state = {}
    if self.stateful_loss is not None:
      state[self.loss] = self.stateful_loss.init(
          typed_loss_kwargs(self.loss, self.loss_kwargs))
    stateful = [i for i, term in enumerate(self.feature_terms)
                if term.state_kind is not None]
    if not stateful:
      return state
    if feature_states is None or len(feature_states) != len(
        self.feature_terms):
      names = ", ".join(self.feature_terms[i].name for i in stateful)
      raise ValueError(f"init_loss_state: feature terms {names} keep a state; "
                       "pass feature_states, one entry per feature term "
                       "(FeatureTerm.init_state)")
    state["features"] = {}
    for i in stateful:
      if feature_states[i] is None:
        raise ValueError(f"init_loss_state: feature term "
                         f"{self.feature_terms[i].name} needs its state")
      state["features"][str(i)] = feature_states[i]
    return state

  def next_loss_state(self, loss_state, parts: dict[str, jax.Array], step,
                      teacher_features=(), mask=None):
    """The loss state after a step whose outputs were ``parts``, with the
    teacher's features of the feature terms (for memory banks)."""
    loss_state = dict(loss_state)
    if self.stateful_loss is not None:
      loss_state[self.loss] = self.stateful_loss.update(
          loss_state[self.loss], jax.lax.stop_gradient(parts["kd"]), step,
          num_steps=self.schedule_steps,
          options=typed_loss_kwargs(self.loss, self.loss_kwargs))
    if "features" in loss_state:
      loss_state["features"] = {
          key: self.feature_terms[int(key)].next_state(
              value, teacher_features[int(key)], mask, step)
          for key, value in loss_state["features"].items()}
    return loss_state

  def temperature_at(self, step) -> jax.Array:
    """The (scheduled) temperature of the logit loss at ``step``."""
    return self._value_schedules[0](step)

  def __call__(self, student_logits: jax.Array, teacher_logits: jax.Array,
               labels: jax.Array, mask: jax.Array | None = None, *,
               step: jax.Array | int = 0, loss_state=None, features=(),
               label_mix=None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Returns ``(scalar loss, parts)`` at training step ``step``.

    ``parts`` holds ``ce``, ``kd`` and the scheduled ``temperature``,
    ``ce_weight`` and ``kd_weight`` in force at ``step`` (and ``aux`` with
    a second loss, the metrics of a stateful loss (`jdistill.train.
    stateful`), and per feature term its value and weight under
    ``<loss>:<student tap>:<teacher tap>`` and ``..._weight``).
    ``loss_state`` is `init_loss_state`'s pytree, as advanced by
    `next_loss_state`; ``None`` means the initial state (only without
    stateful feature terms). ``features`` holds
    one ``(projected student feature, teacher feature)`` pair per
    `feature_terms` entry. It is `logit_loss` plus `feature_loss`.
    ``label_mix=(mixed_labels, lam)`` marks a batch mixed by mixup or
    CutMix: the CE term is the mixed-target CE (`cross_entropy`) and the
    label-dependent terms use the dominant label
    (`jdistill.augment.choose_dominant`).
    """
    if loss_state is None:
      loss_state = self.init_loss_state()
    total, parts = self.logit_loss(student_logits, teacher_logits, labels,
                                   mask, step=step, loss_state=loss_state,
                                   label_mix=label_mix)
    feature_total, feature_parts = self.feature_loss(
        features, choose_dominant(labels, label_mix), mask, step=step,
        loss_state=loss_state)
    return total + feature_total, {**parts, **feature_parts}

  def logit_loss(self, student_logits: jax.Array, teacher_logits: jax.Array,
                 labels: jax.Array, mask: jax.Array | None = None, *,
                 step: jax.Array | int = 0, loss_state=None, label_mix=None
                 ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """``ce_weight * CE + kd_weight * <loss> (+ aux_weight * <aux loss>)``
    at ``step``, and its parts (see `__call__`)."""
    if loss_state is None:
      loss_state = self.init_loss_state()
    if student_logits.shape != teacher_logits.shape:
      raise ValueError(
          f"student logits have shape {student_logits.shape} but teacher "
          f"logits have shape {teacher_logits.shape}; the student and the "
          "teacher must predict the same classes")
    teacher_logits = jax.lax.stop_gradient(teacher_logits)
    ce = masked_mean(cross_entropy(student_logits, labels,
                                   label_smoothing=self.label_smoothing,
                                   label_mix=label_mix), mask)
    labels = choose_dominant(labels, label_mix)
    s, t = student_logits, teacher_logits
    if self.standardize_logits:
      s, t = losses.standardize_logits(s), losses.standardize_logits(t)
    temperature_at, ce_weight_at, kd_weight_at = self._value_schedules
    temperature = temperature_at(step)
    ce_weight, kd_weight = ce_weight_at(step), kd_weight_at(step)
    stateful = self.stateful_loss
    if stateful is not None:
      kd = masked_mean(stateful.per_example(
          loss_state[self.loss], s, t, labels, temperature=temperature,
          options=typed_loss_kwargs(self.loss, self.loss_kwargs)), mask)
    else:
      kd = _logit_term(self.loss, self.loss_kwargs, s, t, labels, mask,
                       temperature)
    total = ce_weight * ce + kd_weight * kd
    parts = {"ce": ce, "kd": kd, "temperature": temperature,
             "ce_weight": ce_weight, "kd_weight": kd_weight}
    if self.aux_loss is not None:
      aux_temperature = (temperature if self.aux_temperature is None
                         else jnp.float32(self.aux_temperature))
      aux = _logit_term(self.aux_loss, self.aux_loss_kwargs, s, t, labels,
                        mask, aux_temperature)
      total = total + self.aux_weight * aux
      parts["aux"] = aux
    if stateful is not None:
      parts.update(stateful.metrics(loss_state[self.loss]))
    return total, parts

  def feature_loss(self, features, labels: jax.Array,
                   mask: jax.Array | None = None, *,
                   step: jax.Array | int = 0, loss_state=None,
                   feature_masks=None
                   ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The weighted sum of the feature terms at ``step`` and its parts.

    Args:
      features: one ``(projected student feature, teacher feature)`` pair
        per `feature_terms` entry.
      labels, mask: the batch's labels and example mask.
      loss_state: the objective's loss state (stateful terms read theirs).
      feature_masks: optional per-term example masks (e.g. a teacher
        dropped for some examples); ``None`` entries, or ``None`` for all,
        use ``mask``.
    """
    if len(features) != len(self.feature_terms):
      raise ValueError(f"got {len(features)} feature pairs for "
                       f"{len(self.feature_terms)} feature terms")
    if feature_masks is None:
      feature_masks = (None,) * len(features)
    term_states = (loss_state or {}).get("features", {})
    total = jnp.zeros((), jnp.float32)
    parts = {}
    for i, (term, weight_at, (fs, ft), term_mask) in enumerate(
        zip(self.feature_terms, self._feature_weight_schedules, features,
            feature_masks)):
      value = term.value(fs, ft, mask if term_mask is None else term_mask,
                         labels, term_states.get(str(i)))
      weight = weight_at(step)
      total = total + weight * value
      parts[term.name] = value
      parts[term.name + "_weight"] = weight
    return total, parts


def _logit_term(name: str, loss_kwargs, s, t, labels, mask, temperature):
  """The scalar value of stateless logit loss ``name`` on the batch."""
  kwargs = typed_loss_kwargs(name, loss_kwargs)
  if name in _SPECIAL_LOSSES:
    return _SPECIAL_LOSSES[name][1](s, t, labels, mask, temperature, kwargs)
  return masked_mean(losses.LOGIT_LOSSES[name](
      s, t, temperature=temperature, **kwargs), mask)
