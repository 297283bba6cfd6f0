"""Named meshes and sharding rules: data, FSDP and tensor parallelism.

A mesh has the named axes ``data``, ``fsdp`` and ``tensor`` (sizes of 1
where unused, so one set of `PartitionSpec`s fits every layout), and
optionally ``teacher`` (stacked teachers, `jdistill.train.shard_teachers`):

* ``data`` -- pure data parallelism: batches are split over it, parameters
  are replicated over it (across hosts, over DCN, in a pod).
* ``fsdp`` -- fully sharded data parallelism (ZeRO-3): batches are split
  over it too, and parameters, gradients and optimizer moments are sharded
  over it; XLA's SPMD partitioner all-gathers each weight where it is used
  and reduce-scatters its gradient.
* ``tensor`` -- tensor (Megatron-style) parallelism: weights are split along
  their feature dimensions and the batch is replicated over it.

A mesh is described by a string such as ``"data:2,fsdp:4"``
(`parse_mesh`); one size may be ``-1`` (the devices left over).

Which array is split how is decided by `ShardingRules`: an ordered list of
``(regex, spec)`` pairs matched (``re.search``) against a parameter's path
(``"blocks/0/attn/qkv/kernel"``), first match wins, on top of a preset:

* ``replicated`` -- every parameter whole on every device.
* ``fsdp`` -- each parameter split over ``fsdp`` along its largest
  dimension that the axis size divides (big_vision's and MaxText's FSDP).
* ``tensor`` -- `TENSOR_RULES`: column-parallel kernels (output features
  over ``tensor``), row-parallel attention output and second MLP layer,
  vocabulary-parallel embeddings; norms and other biases replicated.
* ``auto`` (default) -- ``tensor``, then ``fsdp`` on the largest dimension
  left.

An axis whose size does not divide the dimension a preset would split is
left out for that parameter (it stays replicated along it; `plan_report`
lists them); an explicit rule that asks for it is an error. The optimizer
state follows the parameters (`optax.tree_map_params`); everything else in a
`TrainState` (step, RNG, loss state, projector and combiner parameters, the
loss scale) is replicated.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Iterable, Sequence

import jax
import numpy as np
import optax
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from jdistill.train.mesh import (DATA_AXIS, FSDP_AXIS, TEACHER_AXIS,
                                 TENSOR_AXIS, batch_shards,
                                 checked_device_count, format_mesh)

MESH_AXES = (DATA_AXIS, FSDP_AXIS, TENSOR_AXIS)
ALL_AXES = MESH_AXES + (TEACHER_AXIS,)
PRESETS = ("auto", "replicated", "fsdp", "tensor")

# Megatron-style tensor parallelism for jdistill's models (MLP, CNNs, ViT,
# causal LM). ``...`` stands for the dimensions not named.
TENSOR_RULES: tuple[tuple[str, tuple], ...] = (
    # Row-parallel: the layer after a column-parallel one takes its input
    # features split, so the pair needs one all-reduce.
    (r"(attn/out|mlp_out|fc2|o_proj|down_proj)/kernel$",
     (..., TENSOR_AXIS, None)),
    # Vocabulary-parallel embedding tables.
    (r"embed\w*/embedding$", (TENSOR_AXIS, None)),
    # Column-parallel: output features (a conv's output channels).
    (r"kernel$", (..., TENSOR_AXIS)),
    (r"(attn/(query|key|value|qkv)|mlp_in|fc1|lm_head|hidden/\d+)/bias$",
     (TENSOR_AXIS,)),
    # The decoder family (jdistill.models.decoder): layers stacked on a
    # leading axis, so the rules say ``...`` for it.
    (r"(q_proj|k_proj|v_proj|gate_proj|up_proj)/bias$", (..., TENSOR_AXIS)),
    (r"(q_proj|k_proj|v_proj|gate_proj|up_proj)/lora_b$",
     (..., TENSOR_AXIS)),
)


def parse_mesh(text: str | None, *, flag: str = "--mesh") -> dict[str, int]:
  """``"data:2,fsdp:4"`` -> ``{"data": 2, "fsdp": 4}`` (in that order).

  Axis names are those of `ALL_AXES`; sizes are positive integers, and at
  most one may be ``-1`` (filled in by `make_mesh`). Empty: ``{}`` (all
  devices on ``data``).
  """
  axes: dict[str, int] = {}
  if text and not text.strip():
    raise ValueError(f"{flag}={text!r}: expected comma-separated axis:size "
                     f"pairs such as data:2,fsdp:4 (or nothing)")
  for part in (text or "").split(","):
    part = part.strip()
    if not part:
      continue
    name, sep, size = part.partition(":")
    name = name.strip()
    if not sep or name not in ALL_AXES:
      raise ValueError(f"{flag}={text}: expected comma-separated axis:size "
                       f"pairs with axes among {', '.join(ALL_AXES)}, e.g. "
                       f"data:2,fsdp:4; got {part!r}")
    if name in axes:
      raise ValueError(f"{flag}={text}: axis {name!r} is given twice")
    try:
      value = int(size)
    except ValueError:
      value = 0
    if value < 1 and value != -1:
      raise ValueError(f"{flag}={text}: the size of axis {name!r} must be a "
                       f"positive integer or -1, got {size.strip()!r}")
    axes[name] = value
  if sum(v == -1 for v in axes.values()) > 1:
    raise ValueError(f"{flag}={text}: at most one axis may have size -1")
  return axes


def make_mesh(axes: dict[str, int] | str | None = None, *,
              num_devices: int | None = None,
              flag: str = "--mesh") -> jax.sharding.Mesh:
  """A mesh with axes ``('data', 'fsdp', 'tensor')`` (plus ``'teacher'``
  when given) over ``num_devices`` devices (``None`` or 0: all devices of
  all processes).

  Axes left out have size 1, except ``data``, which takes the devices left
  over when no axis is ``-1``. ``tensor`` is the innermost axis (the
  fastest interconnect), ``data`` the outermost (across hosts).
  """
  if isinstance(axes, str) or axes is None:
    axes = parse_mesh(axes, flag=flag)
  n = checked_device_count(num_devices)
  sizes = {name: axes.get(name, 1) for name in ALL_AXES if name in axes
           or name in MESH_AXES}
  if -1 not in sizes.values() and DATA_AXIS not in axes:
    sizes[DATA_AXIS] = -1
  known = math.prod(v for v in sizes.values() if v != -1)
  if -1 in sizes.values():
    fill = n // known if known and n % known == 0 else 0
    if fill < 1:
      raise ValueError(
          f"{flag}={format_axes(axes)}: the named axes take {known} devices, "
          f"which does not divide the {n} devices")
    sizes = {k: (fill if v == -1 else v) for k, v in sizes.items()}
  if math.prod(sizes.values()) != n:
    raise ValueError(
        f"{flag}={format_axes(axes)}: the axis sizes multiply to "
        f"{math.prod(sizes.values())} but there are {n} devices (use -1 for "
        "one axis to take the rest)")
  order = [a for a in (DATA_AXIS, TEACHER_AXIS, FSDP_AXIS, TENSOR_AXIS)
           if a in sizes]
  return jax.make_mesh(tuple(sizes[a] for a in order), tuple(order),
                       axis_types=(AxisType.Auto,) * len(order),
                       devices=jax.devices()[:n])


def format_axes(axes: dict[str, int]) -> str:
  return ",".join(f"{k}:{v}" for k, v in axes.items())


# ----------------------------------------------------------------- rules


def parse_rules(text: str | None, *, flag: str = "--sharding_rules"
                ) -> tuple[tuple[str, tuple], ...]:
  """``"attn/qkv/kernel=fsdp,tensor; norm=replicated"`` -> rules.

  Each ``;``-separated entry is ``regex=spec``. The spec lists one entry per
  dimension: an axis name, ``none`` (not split), ``a+b`` (split over
  several axes) or ``...`` (the dimensions not listed); ``replicated``
  alone is the spec ``()`` for any rank.
  """
  rules = []
  for entry in (text or "").split(";"):
    entry = entry.strip()
    if not entry:
      continue
    pattern, sep, spec_text = entry.rpartition("=")
    pattern = pattern.strip()
    if not sep or not pattern:
      raise ValueError(f"{flag}: expected regex=spec entries separated by "
                       f"';', got {entry!r}")
    try:
      re.compile(pattern)
    except re.error as e:
      raise ValueError(f"{flag}: {pattern!r} is not a regular expression "
                       f"({e})") from None
    spec: list = []
    if spec_text.strip() != "replicated":
      for dim in spec_text.split(","):
        dim = dim.strip()
        if dim == "...":
          spec.append(...)
        elif dim.lower() in ("none", "-", ""):
          spec.append(None)
        else:
          names = tuple(d.strip() for d in dim.split("+"))
          bad = [d for d in names if d not in ALL_AXES]
          if bad:
            raise ValueError(f"{flag}: {entry!r} names axis {bad[0]!r}; "
                             f"expected one of {', '.join(ALL_AXES)}, none, "
                             "... or replicated")
          spec.append(names[0] if len(names) == 1 else names)
      if spec.count(...) > 1:
        raise ValueError(f"{flag}: {entry!r} has more than one '...'")
    rules.append((pattern, tuple(spec)))
  return tuple(rules)


@dataclasses.dataclass(frozen=True)
class ShardingRules:
  """How a model's parameters (and their optimizer state) are split.

  Attributes:
    preset: ``auto``, ``replicated``, ``fsdp`` or ``tensor`` (module
      docstring): what parameters that no rule matches get.
    rules: ``(regex, spec)`` pairs tried first, in order; each must match at
      least one parameter and fit it exactly (rank and divisibility).
    flag: the flag named in errors about ``rules``.
    preset_flag: the flag named in errors about ``preset``.
  """

  preset: str = "auto"
  rules: tuple[tuple[str, tuple], ...] = ()
  flag: str = "--sharding_rules"
  preset_flag: str = "--student_sharding"

  def __post_init__(self):
    if self.preset not in PRESETS:
      raise ValueError(f"{self.preset_flag}={self.preset}: expected one of "
                       f"{', '.join(PRESETS)}")

  def specs(self, tree: Any, mesh, *, who: str = "the student",
            report: list | None = None) -> Any:
    """A `PartitionSpec` for every array of ``tree`` (e.g. abstract params).

    ``report`` (a list) receives ``(path, shape, spec, note)`` per leaf.
    """
    leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
    paths = [path_string(p) for p, _ in leaves]
    used = [False] * len(self.rules)
    out = []
    for path, (_, leaf) in zip(paths, leaves):
      shape = tuple(np.shape(leaf))
      spec, note = None, ""
      for i, (pattern, rule) in enumerate(self.rules):
        if re.search(pattern, path):
          used[i] = True
          spec = _fit(rule, shape, mesh, strict=True,
                      where=f"{self.flag}: rule {pattern!r} on {who}'s "
                            f"parameter {path} {shape}")
          note = f"rule {pattern!r}"
          break
      if spec is None:
        spec, note = self._preset_spec(path, shape, mesh)
      if report is not None:
        report.append((path, shape, spec, note))
      out.append(spec)
    unused = [p for (p, _), u in zip(self.rules, used) if not u]
    if unused:
      examples = ", ".join(paths[:6]) + (", ..." if len(paths) > 6 else "")
      raise ValueError(f"{self.flag}: rule {unused[0]!r} matches no parameter "
                       f"of {who} ({len(paths)} parameters, e.g. {examples})")
    return jax.tree_util.tree_unflatten(treedef, out)

  def _preset_spec(self, path: str, shape: tuple, mesh) -> tuple[P, str]:
    dims: list = [None] * len(shape)
    notes = []
    if self.preset in ("tensor", "auto") and _size(mesh, TENSOR_AXIS) > 1:
      for pattern, rule in TENSOR_RULES:
        if re.search(pattern, path):
          expanded = _expand(rule, len(shape))
          if expanded is None:
            break
          for d, axis in enumerate(expanded):
            if axis is None:
              continue
            if shape[d] % _size(mesh, axis):
              notes.append(f"{axis} does not divide dim {d} ({shape[d]})")
            else:
              dims[d] = axis
          break
    if self.preset in ("fsdp", "auto") and _size(mesh, FSDP_AXIS) > 1 and (
        shape):
      n = _size(mesh, FSDP_AXIS)
      free = [d for d in range(len(shape)) if dims[d] is None
              and shape[d] % n == 0]
      if free:
        d = max(free, key=lambda d: (shape[d], d))
        dims[d] = FSDP_AXIS
      elif all(a is None for a in dims):
        notes.append(f"fsdp:{n} divides no dimension: replicated")
    while dims and dims[-1] is None:
      dims.pop()
    return P(*dims), "; ".join(notes)


def _size(mesh, axis: str) -> int:
  return mesh.shape.get(axis, 1)


def _expand(rule: tuple, ndim: int) -> list | None:
  """A rule's per-dimension axes for rank ``ndim`` (``None`` if it cannot
  apply: a rank mismatch)."""
  rule = list(rule)
  if ... in rule:
    i = rule.index(...)
    rest = rule[:i] + rule[i + 1:]
    if len(rest) > ndim:
      return None
    return rule[:i] + [None] * (ndim - len(rest)) + rule[i + 1:]
  return rule if len(rule) == ndim else None


def _fit(rule: tuple, shape: tuple, mesh, *, strict: bool, where: str) -> P:
  if not rule:
    return P()
  dims = _expand(rule, len(shape))
  if dims is None:
    raise ValueError(f"{where}: the spec {_spec_text(rule)} does not fit "
                     f"rank {len(shape)}")
  for d, axes in enumerate(dims):
    if axes is None:
      continue
    names = axes if isinstance(axes, tuple) else (axes,)
    for a in names:
      if a not in mesh.axis_names:
        raise ValueError(f"{where}: axis {a!r} is not in the mesh "
                         f"({format_mesh(mesh)}); add it to --mesh")
    size = math.prod(mesh.shape[a] for a in names)
    if strict and shape[d] % size:
      raise ValueError(f"{where}: dimension {d} has size {shape[d]}, which "
                       f"{'+'.join(names)} ({size} devices) does not divide")
  while dims and dims[-1] is None:
    dims.pop()
  return P(*dims)


def _spec_text(rule) -> str:
  return ",".join("..." if r is ... else str(r) for r in rule)


def path_string(path) -> str:
  """``"blocks/0/attn/qkv/kernel"`` for a pytree key path."""
  return jax.tree_util.keystr(tuple(path), simple=True, separator="/")


# ------------------------------------------------------------ placement


def named(mesh, specs: Any) -> Any:
  """`NamedSharding`s of a tree of `PartitionSpec`s."""
  return jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                      is_leaf=lambda x: isinstance(x, P))


def optimizer_specs(tx: optax.GradientTransformation, abstract_opt_state,
                    trainable_specs) -> Any:
  """The optimizer state's specs: leaves shaped like the parameters (Adam's
  moments, ...) take their parameter's spec, the rest (counts, scalars) are
  replicated."""
  # ``optax.MaskedNode``: the leaves that a transform of
  # ``optax.multi_transform`` (e.g. one optimizer per peer) does not own;
  # they hold no array.
  return optax.tree_map_params(
      tx, lambda value, spec: (value if isinstance(value, optax.MaskedNode)
                               else spec),
      abstract_opt_state, trainable_specs,
      transform_non_params=lambda _: P(),
      is_leaf=lambda x: isinstance(x, (P, optax.MaskedNode)))


def state_specs(abstract_state, tx: optax.GradientTransformation,
                rules: ShardingRules, mesh, *, who: str = "the student",
                report: list | None = None) -> Any:
  """`PartitionSpec`s of a `TrainState` (abstract, e.g. from
  ``jax.eval_shape``): parameters and model state per ``rules``, the
  optimizer state like its parameters, the rest replicated."""
  from jdistill.train.state import trainables
  params = rules.specs(abstract_state.params, mesh, who=who, report=report)
  model_state = ShardingRules(
      "replicated" if rules.preset == "replicated" else "fsdp"
      if rules.preset in ("fsdp", "auto") else "replicated").specs(
          abstract_state.model_state, mesh, who=who)
  replicate = lambda tree: jax.tree.map(lambda _: P(), tree)
  projector = replicate(abstract_state.projector_params)
  combiner = replicate(abstract_state.combiner_params)
  opt = optimizer_specs(tx, abstract_state.opt_state,
                        trainables(params, projector, combiner))
  return abstract_state.replace(
      step=P(), params=params, model_state=model_state, opt_state=opt,
      rng=P(), loss_state=replicate(abstract_state.loss_state),
      projector_params=projector, combiner_params=combiner,
      precision_state=replicate(abstract_state.precision_state),
      ema=({"params": params, "model_state": model_state}
           if jax.tree.leaves(abstract_state.ema) else {}))


def compute_specs(specs: Any, axis: str = FSDP_AXIS) -> Any:
  """The specs of the parameters during compute: ``specs`` without ``axis``
  (FSDP gathers each weight before use; tensor-parallel splits stay)."""

  def drop(spec: P) -> P:
    dims = []
    for axes in spec:
      names = tuple(a for a in (axes if isinstance(axes, tuple) else (axes,))
                    if a is not None and a != axis)
      dims.append(None if not names else names[0] if len(names) == 1
                  else names)
    while dims and dims[-1] is None:
      dims.pop()
    return P(*dims)

  return jax.tree.map(drop, specs, is_leaf=lambda x: isinstance(x, P))


def compute_shardings(specs: Any, mesh) -> Any:
  """`NamedSharding`s for `FunctionalModel.with_param_sharding`: the
  parameters gathered over ``fsdp`` for the forward pass; ``None`` when no
  parameter is split over ``fsdp`` (nothing to gather)."""
  if FSDP_AXIS not in axes_in(specs):
    return None
  return named(mesh, compute_specs(specs))


def abstract_with_shardings(abstract: Any, shardings: Any) -> Any:
  """``jax.ShapeDtypeStruct``s carrying ``shardings`` (for restoring into,
  or compiling on, arrays that do not exist yet)."""
  return jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
      abstract, shardings)


def bytes_per_device(abstract: Any, specs: Any, mesh) -> int:
  """The bytes one device holds of arrays ``abstract`` split per ``specs``."""
  total = 0
  for a, s in zip(jax.tree.leaves(abstract),
                  jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P))):
    shards = 1
    for axes in s:
      if axes is None:
        continue
      for name in (axes if isinstance(axes, tuple) else (axes,)):
        shards *= mesh.shape[name]
    total += math.ceil(math.prod(a.shape) / shards) * np.dtype(a.dtype).itemsize
  return total


def describe_specs(report: Sequence[tuple], limit: int = 0) -> list[str]:
  """Lines ``path shape -> spec`` of a `ShardingRules.specs` report."""
  lines = []
  for path, shape, spec, note in report[:limit or None]:
    lines.append(f"  {path} {shape} -> {spec}" + (f"  ({note})" if note
                                                     else ""))
  return lines


def check_divisible(mesh, **sizes: int) -> None:
  """Raises naming the flag when a batch size is not a multiple of the
  number of batch slices (``data`` x ``fsdp``)."""
  n = batch_shards(mesh)
  for flag, value in sizes.items():
    if value % n:
      raise ValueError(
          f"--{flag}={value} must be divisible by the data x fsdp size "
          f"{n} of --mesh={format_mesh(mesh)} (each of the {n} batch slices "
          "gets the same number of examples)")


def axes_in(specs: Any) -> set[str]:
  """Every mesh axis a tree of specs uses."""
  used: set[str] = set()
  for s in jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P)):
    for axes in s:
      if axes is not None:
        used.update(axes if isinstance(axes, tuple) else (axes,))
  return used


def unused_note(mesh, specs: Iterable) -> str:
  """A note when a model axis of size > 1 shards nothing."""
  used = set()
  for tree in specs:
    used |= axes_in(tree)
  idle = [a for a in (FSDP_AXIS, TENSOR_AXIS)
          if _size(mesh, a) > 1 and a not in used]
  return (f"mesh axis {', '.join(idle)} shards no parameter (they are "
          "replicated over it)") if idle else ""
