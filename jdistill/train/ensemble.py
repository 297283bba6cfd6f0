"""Several teachers in one jitted step.

Teachers of the same architecture are stacked: their variables get a leading
``[group_size]`` axis and one ``jax.vmap``-ed forward runs them all, so XLA
compiles one program for the group instead of one per teacher. Teachers of
different architectures form separate groups, each with its own forward,
inside the same jitted step. `TeacherEnsemble.apply` returns the teachers'
logits stacked as ``[num_teachers, batch, classes]`` in the order the
teachers were given, the layout of the combiners in `jdistill.losses.multi_teacher`.

The stacked variables can be sharded over a mesh axis (`shard_teachers`):
each device then holds only its slice of the teachers, so a set of teachers
too big to replicate still fits, and the vmapped forward runs each teacher
where its parameters live.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from jdistill.train.mesh import DATA_AXIS
from jdistill.train.state import FunctionalModel

PyTree = Any
STACKINGS = ("auto", "vmap", "map", "loop")


@dataclasses.dataclass(frozen=True)
class TeacherEnsemble:
  """The forwards of ``num_teachers`` teachers, grouped by architecture.

  Attributes:
    models: one `FunctionalModel` per group (architecture).
    groups: per group, the indices of its teachers in the given order.
    mesh, teacher_axis: set by `sharded`: the groups whose size the axis
      divides run under ``jax.shard_map``, each device running its own
      teachers on its slice of the batch.
    stacking: how a group's stacked teachers run: ``"vmap"`` (one batched
      forward), ``"map"`` (``lax.map``: one compiled forward applied to the
      teachers in turn), ``"loop"`` (one forward per teacher, a Python loop
      inside the jit: the program grows with the group) or ``"auto"``:
      ``"vmap"`` on GPU and TPU and, on CPU, for models without
      convolutions or batched matmuls (e.g. MLPs); ``"loop"`` on CPU for
      the others, because XLA:CPU runs the grouped convolutions and the
      extra batch axis of attention matmuls that vmap makes of them slower
      than K separate forwards (whole steps: 6-14% for 1-D CNNs and ViTs,
      about 6x for ResNets; `benchmarks/multi_teacher_step.py`).
  """

  models: tuple[FunctionalModel, ...]
  groups: tuple[tuple[int, ...], ...]
  mesh: Any = None
  teacher_axis: str | None = None
  stacking: str = "auto"

  @property
  def num_teachers(self) -> int:
    return sum(len(g) for g in self.groups)

  @classmethod
  def create(cls, teachers: Sequence[tuple[FunctionalModel, PyTree, PyTree]],
             *, stacking: str = "auto"
             ) -> tuple["TeacherEnsemble", tuple[PyTree, ...]]:
    """Groups ``teachers`` (``(functional_model, params, model_state)``
    each, e.g. from `FunctionalModel.split`) by architecture and stacks the
    variables of each group.

    Two teachers share a group when their graph definitions are equal and
    their variables have the same shapes and dtypes.

    Returns:
      ``(ensemble, variables)``: ``variables`` holds per group
      ``{"params": ..., "model_state": ...}`` with a leading axis of the
      group's size on every leaf.
    """
    if not teachers:
      raise ValueError("TeacherEnsemble needs at least one teacher")
    if stacking not in STACKINGS:
      raise ValueError(f"stacking={stacking!r}: expected one of: "
                       f"{', '.join(STACKINGS)}")
    keys, models, groups = [], [], []
    for i, (model, params, model_state) in enumerate(teachers):
      key = (model.graphdef, _signature({"params": params,
                                         "model_state": model_state}))
      if key in keys:
        groups[keys.index(key)].append(i)
      else:
        keys.append(key)
        models.append(model)
        groups.append([i])
    variables = tuple(
        jax.tree.map(lambda *xs: jnp.stack(xs),
                     *[{"params": teachers[i][1],
                        "model_state": teachers[i][2]} for i in group])
        for group in groups)
    return cls(tuple(models), tuple(tuple(g) for g in groups),
               stacking=stacking), variables

  def apply(self, variables: Sequence[PyTree], x: jax.Array, *,
            taps: Sequence[str] = ()) -> tuple[jax.Array, list[dict]]:
    """All teachers in inference mode, one vmapped forward per group.

    Args:
      variables: the stacked variables of `create` (per group).
      x: the input batch.
      taps: feature names to return per teacher.

    Returns:
      ``(logits, features)``: ``[num_teachers, batch, classes]`` float32
      logits in the teachers' given order (every teacher must predict the
      same classes), and per teacher a dict of the requested taps.
    """
    logits: list[Any] = [None] * self.num_teachers
    feats: list[Any] = [None] * self.num_teachers
    for model, group, v in zip(self.models, self.groups, variables):

      def forward(v, x, model=model):
        out, f, _ = model.apply(v["params"], v["model_state"], x,
                                train=False)
        return out.astype(jnp.float32), {t: f[t] for t in taps}

      sharded = self._is_sharded(len(group))
      if len(group) == 1 and not sharded:  # A lone teacher needs no stacking.
        run = lambda v, x, forward=forward: jax.tree.map(
            lambda a: a[None], forward(jax.tree.map(lambda a: a[0], v), x))
      elif (stacking := self._stacking(model, v, x)) == "loop":
        run = lambda v, x, forward=forward: jax.tree.map(
            lambda *outs: jnp.stack(outs),
            *[forward(jax.tree.map(lambda a, j=j: a[j], v), x)
              for j in range(jax.tree.leaves(v)[0].shape[0])])
      elif stacking == "vmap":
        run = jax.vmap(forward, in_axes=(0, None))
      else:
        run = lambda v, x, forward=forward: jax.lax.map(
            lambda one: forward(one, x), v)
      if sharded:
        run = self._shard_mapped(run, taps)
      group_logits, group_feats = run(v, x)
      for j, i in enumerate(group):
        logits[i] = group_logits[j]
        feats[i] = {t: group_feats[t][j] for t in taps}
    _check_same_classes(logits)
    return jnp.stack(logits), feats

  def sharded(self, mesh, axis: str) -> "TeacherEnsemble":
    """The ensemble with its teachers sharded over mesh axis ``axis`` (pair
    it with variables placed by `shard_teachers`).

    Each device keeps ``group_size / mesh.shape[axis]`` teachers of a group
    and runs them, under ``jax.shard_map``, on its slice of the batch (the
    batch is split over the mesh's ``'data'`` axis, if any); the logits come
    out sharded ``P(axis, 'data')``. Teacher parameters are never gathered,
    so teachers too big to replicate fit. A group the axis size does not
    divide runs replicated.
    """
    if axis not in mesh.axis_names:
      raise ValueError(f"teacher axis '{axis}' is not an axis of the mesh "
                       f"(axes: {', '.join(mesh.axis_names)})")
    return dataclasses.replace(self, mesh=mesh, teacher_axis=axis)

  def _stacking(self, model: FunctionalModel, v, x) -> str:
    """The forward (``vmap`` or ``loop``) that ``auto`` picks for a group."""
    if self.stacking != "auto":
      return self.stacking
    if jax.default_backend() != "cpu":
      return "vmap"
    one = jax.tree.map(lambda a: a[0], v)
    jaxpr = jax.make_jaxpr(lambda one, x: model.apply(
        one["params"], one["model_state"], x, train=False))(one, x)
    return "loop" if _slow_to_vmap_on_cpu(jaxpr.jaxpr) else "vmap"

  def _is_sharded(self, group_size: int) -> bool:
    return (self.mesh is not None
            and group_size % self.mesh.shape[self.teacher_axis] == 0)

  def _shard_mapped(self, run, taps):
    """``run(v, x)`` under shard_map: teachers split over the teacher axis,
    the batch over ``'data'`` (when the mesh has it)."""
    axis = self.teacher_axis
    data = DATA_AXIS if DATA_AXIS in self.mesh.axis_names else None
    out = P(axis, data)
    return jax.shard_map(run, mesh=self.mesh, in_specs=(P(axis), P(data)),
                         out_specs=(out, {t: out for t in taps}))

  def apply_loop(self, variables: Sequence[PyTree], x: jax.Array
                 ) -> jax.Array:
    """The same logits as `apply`, one forward per teacher (``stacking=
    "loop"``); the baseline of the benchmark."""
    return dataclasses.replace(self, stacking="loop").apply(variables, x)[0]


def _slow_to_vmap_on_cpu(jaxpr) -> bool:
  """Whether ``jaxpr`` (or a jaxpr nested in it) has a convolution or a
  matmul with batch dimensions (attention): vmapped over the weights, they
  become grouped convolutions and matmuls with an extra batch axis, which
  XLA:CPU runs slower than separate ones."""
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "conv_general_dilated":
      return True
    if name == "dot_general" and eqn.params["dimension_numbers"][1][0]:
      return True
    for param in eqn.params.values():
      for sub in param if isinstance(param, (tuple, list)) else (param,):
        inner = getattr(sub, "jaxpr", None)
        if inner is not None and _slow_to_vmap_on_cpu(
            getattr(inner, "jaxpr", inner)):
          return True
  return False


def _signature(tree: PyTree):
  leaves, treedef = jax.tree.flatten(tree)
  return treedef, tuple((tuple(np.shape(x)), str(jnp.asarray(x).dtype))
                        for x in leaves)


def _check_same_classes(logits) -> None:
  shapes = [tuple(l.shape) for l in logits]
  if len(set(shapes)) > 1:
    listing = ", ".join(f"teacher {i}: {s}" for i, s in enumerate(shapes))
    raise ValueError(f"the teachers' logits have different shapes ({listing})"
                     "; every teacher must predict the same classes")


def shard_teachers(variables: Sequence[PyTree], mesh, axis: str
                   ) -> tuple[PyTree, ...]:
  """Places stacked teacher variables with their teacher (leading) axis
  sharded over mesh axis ``axis`` and replicated over the other axes.

  A group whose size is not divisible by the axis size is replicated
  instead (a teacher is never split across devices by this function).
  """
  n = mesh.shape[axis]
  out = []
  for v in variables:
    size = jax.tree.leaves(v)[0].shape[0]
    spec = P(axis) if size % n == 0 else P()
    sharding = NamedSharding(mesh, spec)
    out.append(jax.device_put(v, sharding, may_alias=False))
  return tuple(out)
