"""The functional view of an NNX model and the `TrainState` pytree.

`FunctionalModel` splits an NNX module once, outside jit, into a static
``graphdef`` and two pytrees of plain dicts: ``params`` (`nnx.Param`, what
the optimizer trains) and ``model_state`` (everything else, e.g. BatchNorm
running statistics). Inside a jitted step the model is rebuilt with
``nnx.merge`` and called; nothing in the step depends on Flax otherwise.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct

from jdistill.train.precision import cast_floating, cast_like

PyTree = Any


@dataclasses.dataclass(frozen=True)
class FunctionalModel:
  """A pure ``apply`` for an NNX model whose call is ``model(x, train=...)``
  and returns ``(logits, features)``.

  Attributes:
    graphdef: the model's static graph definition (`nnx.split`).
    compute_dtype: ``None`` (no casts) or the dtype of mixed-precision
      compute (`jdistill.train.precision`), e.g. ``jnp.bfloat16``: `apply`
      casts the floating parameters and inputs to it, runs every layer in it
      (the modules' ``dtype`` attributes are set to it), and returns the
      logits and features in float32, so the losses run in float32. Integer
      inputs (token ids) are not cast. The parameters stay in their (float32)
      dtype outside: gradients flow back through the cast, so the optimizer
      updates float32 master weights. Updated model state (BatchNorm
      statistics) comes back in its original dtype. A teacher that runs in
      bfloat16 is a teacher model with ``compute_dtype=jnp.bfloat16``.
    param_sharding: ``None``, or a pytree of `jax.sharding.NamedSharding`
      like the parameters that the forward pass constrains them to
      (`with_param_sharding`): FSDP's all-gather of the weights before
      compute (after the cast to ``compute_dtype``, so bfloat16 halves the
      traffic), whose transpose reduce-scatters the gradients. Without it
      XLA's SPMD partitioner may split the activations along the features
      of an FSDP-sharded weight instead of the batch, and replicate them
      to reshard (much more memory; see `jdistill.train.sharding`).
  """

  graphdef: Any
  compute_dtype: Any = None
  param_sharding: Any = dataclasses.field(default=None, compare=False,
                                          hash=False)

  def __post_init__(self):
    if self.compute_dtype is not None:
      dtype = jnp.dtype(self.compute_dtype)
      if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"FunctionalModel: compute_dtype must be a floating "
                         f"dtype; got {dtype}")
      object.__setattr__(self, "compute_dtype", dtype)

  @classmethod
  def split(cls, model: nnx.Module, *, compute_dtype: Any = None
            ) -> tuple["FunctionalModel", PyTree, PyTree]:
    """Returns ``(functional_model, params, model_state)`` as pure dicts."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    return (cls(graphdef, compute_dtype), nnx.to_pure_dict(params),
            nnx.to_pure_dict(rest))

  def with_compute_dtype(self, dtype: Any) -> "FunctionalModel":
    """A copy computing in ``dtype`` (``None``: no casts)."""
    return dataclasses.replace(self, compute_dtype=dtype)

  def with_param_sharding(self, shardings: Any) -> "FunctionalModel":
    """A copy whose forward constrains the parameters to ``shardings``
    (``None``: no constraint)."""
    return dataclasses.replace(self, param_sharding=shardings)

  def merge(self, params: PyTree, model_state: PyTree) -> nnx.Module:
    """The NNX module with these variables, set up for ``compute_dtype``:
    its floating parameters cast to it and its layers computing in it (and
    the parameters constrained to ``param_sharding``)."""
    if self.compute_dtype is not None:
      params = cast_floating(params, self.compute_dtype)
    per_layer = None
    if self.param_sharding is not None:
      sharding = self.param_sharding
      if _gathers_per_layer(self.graphdef, params, sharding):
        # A decoder with stacked layers gathers one layer's weights at a
        # time, inside its scan (`jdistill.models.decoder`): the stacked
        # "layers" are left sharded here.
        per_layer = _layer_slices(sharding["layers"])
        rest = {k: v for k, v in params.items() if k != "layers"}
        rest = jax.lax.with_sharding_constraint(
            rest, {k: v for k, v in sharding.items() if k != "layers"})
        params = {**rest, "layers": params["layers"]}
      else:
        params = jax.lax.with_sharding_constraint(params, sharding)
    model = nnx.merge(self.graphdef, params, model_state)
    if per_layer is not None:
      model.layer_sharding = per_layer
    if self.compute_dtype is None:
      return model
    for _, module in nnx.iter_modules(model):
      dtype = getattr(module, "dtype", None)
      if dtype is not None and jnp.issubdtype(dtype, jnp.floating):
        module.dtype = self.compute_dtype
    return model

  def apply(self, params: PyTree, model_state: PyTree, x: jax.Array, *,
            train: bool, **inputs: jax.Array
            ) -> tuple[jax.Array, dict[str, jax.Array], PyTree]:
    """Runs the model.

    ``inputs`` are passed to the model call as keywords (the decoder LM's
    ``segment_ids`` and ``positions`` of packed sequences); they are never
    cast.

    Returns:
      ``(logits, features, new_model_state)``; ``new_model_state`` carries the
      updated BatchNorm statistics when ``train`` is True. With a
      ``compute_dtype``, floating logits and features are float32.
    """
    if self.compute_dtype is not None:
      x = cast_floating(x, self.compute_dtype)
    model = self.merge(params, model_state)
    logits, features = model(x, train=train, **inputs)
    if self.compute_dtype is not None:
      logits, features = cast_floating((logits, features), jnp.float32)
    if not train:
      return logits, features, model_state
    _, _, new_state = nnx.split(model, nnx.Param, ...)
    new_state = nnx.to_pure_dict(new_state)
    if self.compute_dtype is not None:
      new_state = cast_like(new_state, model_state)
    return logits, features, new_state


def _gathers_per_layer(graphdef, params, sharding) -> bool:
  return (isinstance(params, dict) and "layers" in params
          and isinstance(sharding, dict) and "layers" in sharding
          and any(isinstance(a, tuple) and a[0] == "layer_sharding"
                  for a in getattr(graphdef, "attributes", ())))


class _LayerSharding:
  """The per-layer compute shardings of stacked layers (a static value:
  hashable by identity of its leaves' specs)."""

  def __init__(self, tree):
    self.tree = tree
    leaves, self._treedef = jax.tree.flatten(tree)
    self._key = (self._treedef, tuple(leaves))

  def __hash__(self):
    return hash(self._key)

  def __eq__(self, other):
    return isinstance(other, _LayerSharding) and self._key == other._key


def _layer_slices(shardings) -> _LayerSharding:
  """``shardings`` of ``[L, ...]`` stacked arrays -> those of one layer."""
  from jax.sharding import NamedSharding, PartitionSpec

  return _LayerSharding(jax.tree.map(
      lambda s: NamedSharding(s.mesh, PartitionSpec(*tuple(s.spec)[1:])),
      shardings))


@struct.dataclass
class TrainState:
  """Everything a training run carries from step to step (and checkpoints).

  Attributes:
    step: int32 scalar, number of updates applied.
    params: trainable parameters (pure dict).
    model_state: non-trainable model variables, e.g. BatchNorm statistics.
    opt_state: the optax optimizer state of ``params``.
    rng: raw uint32 PRNG key data (``jax.random.key_data``), so that it can
      be checkpointed; steps fold in ``step`` to derive per-step keys.
    loss_state: state of the distillation objective itself (e.g. TAID's
      adaptive interpolation coefficient); ``{}`` for stateless losses.
    projector_params: parameters of the feature projectors of a feature
      distillation run (`jdistill.train.projectors`); ``{}`` if none. They
      are optimised together with ``params`` and checkpointed in the
      ``train`` item, never in the student's ``model`` item.
    combiner_params: trainable parameters of a multi-teacher combiner (the
      ``learned`` combiner's teacher-weight logits,
      `jdistill.train.multi_teacher`); ``{}`` if none. Optimised and
      checkpointed like ``projector_params``.
    precision_state: state of mixed-precision training: ``{"loss_scale":
      ...}`` (`jdistill.train.precision.DynamicLossScale.init`) for a step
      with dynamic loss scaling; ``{}`` otherwise (so runs without it keep
      their trees unchanged).
    ema: ``{"params", "model_state"}``, an exponential moving average of the
      student's variables that serves as its own teacher
      (`jdistill.train.make_ema_self_distill_step`); ``{}`` otherwise. Not
      optimised; checkpointed in the ``train`` item.
  """

  step: jax.Array
  params: PyTree
  model_state: PyTree
  opt_state: PyTree
  rng: jax.Array
  loss_state: PyTree = dataclasses.field(default_factory=dict)
  projector_params: PyTree = dataclasses.field(default_factory=dict)
  combiner_params: PyTree = dataclasses.field(default_factory=dict)
  precision_state: PyTree = dataclasses.field(default_factory=dict)
  ema: PyTree = dataclasses.field(default_factory=dict)

  @classmethod
  def create(cls, params: PyTree, model_state: PyTree,
             tx: optax.GradientTransformation, seed: int,
             loss_state: PyTree | None = None,
             projector_params: PyTree | None = None,
             combiner_params: PyTree | None = None,
             precision_state: PyTree | None = None,
             ema: bool = False) -> "TrainState":
    """The state at step 0; ``ema=True`` starts the EMA teacher (`ema`) at
    the initial variables."""
    projector_params = {} if projector_params is None else projector_params
    combiner_params = {} if combiner_params is None else combiner_params
    return cls(
        step=jnp.zeros((), jnp.int32),
        params=params,
        model_state=model_state,
        opt_state=tx.init(trainables(params, projector_params,
                                     combiner_params)),
        rng=jax.random.key_data(jax.random.key(seed)),
        loss_state={} if loss_state is None else loss_state,
        projector_params=projector_params,
        combiner_params=combiner_params,
        precision_state={} if precision_state is None else precision_state,
        ema=({"params": params, "model_state": model_state} if ema
             else {}),
    )

  def trainables(self) -> PyTree:
    """What the optimizer updates (see `trainables`)."""
    return trainables(self.params, self.projector_params,
                      self.combiner_params)

  def with_trainables(self, tree: PyTree) -> "TrainState":
    """The state with ``tree`` (shaped like `trainables`) written back."""
    if not (jax.tree.leaves(self.projector_params)
            or jax.tree.leaves(self.combiner_params)):
      return self.replace(params=tree)
    return self.replace(
        params=tree["model"],
        projector_params=tree.get("projectors", self.projector_params),
        combiner_params=tree.get("combiner", self.combiner_params))

  def step_key(self) -> jax.Array:
    """A typed PRNG key unique to the current step."""
    return jax.random.fold_in(jax.random.wrap_key_data(self.rng), self.step)


def trainables(params: PyTree, projector_params: PyTree,
               combiner_params: PyTree = None) -> PyTree:
  """The optimizer's pytree: ``params`` alone when there are no projector
  or combiner parameters (so plain runs keep their optimizer-state layout),
  else ``{"model": params}`` plus ``"projectors": projector_params`` and
  ``"combiner": combiner_params`` where they have parameters."""
  extra = {name: tree for name, tree in (("projectors", projector_params),
                                         ("combiner", combiner_params))
           if jax.tree.leaves(tree)}
  if not extra:
    return params
  return {"model": params, **extra}
