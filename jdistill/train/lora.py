"""LoRA adapters for the decoder LM (`jdistill.models.decoder`).

A LoRA adapter adds a trainable low-rank update to a frozen projection::

    y = x @ W + (x @ A) @ B * alpha / r (+ bias)

with ``A [in, r]``, ``B [r, out]``. In the decoder's params the adapter of
a projection group (``params["layers"]["q_proj"]``) is three more leaves
stacked on the layer axis like the kernel: ``lora_a [L, in, r]``,
``lora_b [L, r, out]`` and ``lora_scale [L]`` (float32, ``alpha / r``;
frozen). `jdistill.models.decoder._dense` computes the update;
`jdistill.hf.merge_lora` folds it into the kernels (``save_model`` does so).

Initialisation is PEFT's default (``init_lora_weights=True``): ``A``
kaiming-uniform with ``a=sqrt(5)`` over ``fan_in = in``, i.e.
``U(-1/sqrt(in), 1/sqrt(in))``, and ``B = 0``, so the adapted model starts
equal to the base model. ``init="gaussian"`` is PEFT's other choice,
``A ~ normal(0, 1/r)``. ``alpha`` defaults to ``rank`` (scale 1), which is
PEFT's default pair ``r=8, lora_alpha=8`` at rank 8; PEFT keeps
``lora_alpha=8`` for other ranks, so pass ``alpha=8`` to reproduce it. The
adapters are float32 when the kernels are 16-bit (PEFT's
``autocast_adapter_dtype=True``: bfloat16 master weights lose small Adam
updates), else the kernels' dtype; ``dtype=`` overrides.

Use::

    model, variables = jdistill.hf.load_model(student_dir)
    model, variables = add_lora(model, variables, rank=8,
                                targets=parse_targets("all"), key=key)
    tx = lora_optimizer(make_optimizer(...), variables["params"])
    state = TrainState.create(variables["params"], variables["model_state"],
                              tx, seed)
    ...
    save_peft_adapter(f"{out}/adapter", state.params)   # PEFT's format
    jdistill.hf.save_model(f"{out}/merged", model, {"params": state.params})

(each replaces its directory whole, so give them different ones).

A runner that builds the student from its model spec inside ``jax.jit``
calls `attach_lora` on the live `Decoder` instead (then
``LoraModel.split(module)``), and `init_lora` is the same on a params dict.

`add_lora` returns a `LoraModel`: a `FunctionalModel` whose graph holds the
adapter parameters and whose forward stops the gradient of every frozen
parameter, so ``jax.grad`` of a step returns exact zeros for them without
computing the weight gradients of the base kernels (a third of a dense
step's FLOPs). `lora_optimizer` applies ``tx`` to the adapters only (its
state holds nothing for the frozen leaves) and zero updates elsewhere.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jdistill.train.state import FunctionalModel

PyTree = Any

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                "up_proj", "down_proj")
TARGET_GROUPS = {
    "all": LORA_TARGETS,
    "attention": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "mlp": ("gate_proj", "up_proj", "down_proj"),
}
INITS = ("kaiming", "gaussian")
# The adapter leaves of a projection group; only the first two train.
ADAPTER_KEYS = ("lora_a", "lora_b", "lora_scale")
TRAINABLE_KEYS = ("lora_a", "lora_b")
# Top-level keys of `jdistill.train.state.trainables` when the optimizer's
# tree holds more than the model's params.
_TRAINABLES_KEYS = ("model", "projectors", "combiner")

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def parse_targets(text: str, *, flag: str = "--lora_targets"
                  ) -> tuple[str, ...]:
  """``"q_proj,v_proj"`` / ``"all"`` / ``"attention"`` / ``"mlp"`` (groups
  may be mixed with names) -> the projection names, in `LORA_TARGETS`
  order.

  Raises:
    ValueError: one line naming ``flag`` and the valid names.
  """
  valid = ", ".join(tuple(TARGET_GROUPS) + LORA_TARGETS)
  items = [t.strip() for t in str(text).split(",")]
  if not any(items):
    raise ValueError(f"{flag}={text!r}: no projections named; expected a "
                     f"comma-separated list of: {valid}")
  chosen: set[str] = set()
  for item in items:
    if item in TARGET_GROUPS:
      chosen.update(TARGET_GROUPS[item])
    elif item in LORA_TARGETS:
      chosen.add(item)
    else:
      raise ValueError(f"{flag}={text!r}: unknown projection {item!r}; "
                       f"expected a comma-separated list of: {valid}")
  return tuple(t for t in LORA_TARGETS if t in chosen)


def _check_targets(targets: str | Iterable[str]) -> tuple[str, ...]:
  if isinstance(targets, str):
    return parse_targets(targets)
  targets = tuple(targets)
  bad = [t for t in targets if t not in LORA_TARGETS]
  if bad or not targets:
    raise ValueError(f"LoRA targets {list(targets)}: expected a non-empty "
                     f"subset of {', '.join(LORA_TARGETS)}")
  return tuple(t for t in LORA_TARGETS if t in targets)


def _check_rank_alpha(rank, alpha) -> tuple[int, float]:
  if isinstance(rank, bool) or int(rank) != rank or rank < 1:
    raise ValueError(f"LoRA rank must be a positive integer; got {rank!r}")
  rank = int(rank)
  alpha = float(rank if alpha is None else alpha)
  if not alpha > 0 or not math.isfinite(alpha):
    raise ValueError(f"LoRA alpha must be a positive number; got {alpha!r}")
  return rank, alpha


def adapter_dtype(kernel_dtype: Any) -> jnp.dtype:
  """The default adapter dtype: float32 for 16-bit kernels, else theirs."""
  dtype = jnp.dtype(kernel_dtype)
  return jnp.dtype(jnp.float32) if dtype.itemsize < 4 else dtype


def has_lora(params: PyTree) -> bool:
  """Whether any projection group of ``params`` holds an adapter."""
  layers = params.get("layers", {}) if isinstance(params, Mapping) else {}
  return any(isinstance(g, Mapping) and "lora_a" in g
             for g in layers.values())


def init_lora(params: PyTree, *, rank: int, targets: str | Iterable[str],
              key: jax.Array, alpha: float | None = None,
              init: str = "kaiming", dtype: Any = None) -> PyTree:
  """``params`` (a decoder's, layers stacked) with an adapter added to each
  target projection (a new dict; the base leaves are shared, not copied).

  Pure and jittable with ``rank``, ``targets``, ``alpha``, ``init`` and
  ``dtype`` static (only the shapes of ``params`` are read), so a state can
  be made with it inside ``jax.jit(..., out_shardings=...)`` or under
  ``jax.eval_shape``.

  Args:
    params: the decoder's params (``params["layers"][name]["kernel"]`` is
      ``[L, in, out]``).
    rank: ``r``.
    targets: projection names (`LORA_TARGETS`) or a `parse_targets` string.
    key: PRNG key for ``A`` (one fold per target).
    alpha: LoRA alpha; ``lora_scale = alpha / rank`` (default ``rank``).
    init: ``"kaiming"`` (PEFT's default) or ``"gaussian"``; ``B = 0``.
    dtype: adapter dtype (default `adapter_dtype` of the kernel's).

  Raises:
    ValueError: one line: a bad rank / alpha / target / init, params that
      are not a decoder's, or that already hold adapters.
  """
  rank, alpha = _check_rank_alpha(rank, alpha)
  targets = _check_targets(targets)
  if init not in INITS:
    raise ValueError(f"LoRA init {init!r}: expected one of {', '.join(INITS)}")
  layers = params.get("layers") if isinstance(params, Mapping) else None
  if not isinstance(layers, Mapping):
    raise ValueError("add_lora: the params are not a decoder's (no stacked "
                     "params['layers'])")
  if has_lora(params):
    raise ValueError("add_lora: the params already hold LoRA adapters")
  if isinstance(key, int):
    key = jax.random.key(key)
  new_layers = dict(layers)
  for i, name in enumerate(targets):
    group = layers.get(name)
    if not isinstance(group, Mapping) or "kernel" not in group:
      raise ValueError(f"add_lora: params['layers'] has no {name}/kernel "
                       f"(groups: {', '.join(sorted(layers))})")
    kernel = group["kernel"]
    if len(kernel.shape) != 3:
      raise ValueError(f"add_lora: layers/{name}/kernel has shape "
                       f"{tuple(kernel.shape)}; expected [layers, in, out]")
    n, d_in, d_out = kernel.shape
    a_dtype = adapter_dtype(kernel.dtype) if dtype is None else jnp.dtype(
        dtype)
    k = jax.random.fold_in(key, i)
    if init == "kaiming":
      bound = 1.0 / math.sqrt(d_in)
      a = jax.random.uniform(k, (n, d_in, rank), jnp.float32, -bound, bound)
    else:
      a = jax.random.normal(k, (n, d_in, rank), jnp.float32) / rank
    new_layers[name] = {
        **group,
        "lora_a": a.astype(a_dtype),
        "lora_b": jnp.zeros((n, rank, d_out), a_dtype),
        "lora_scale": jnp.full((n,), alpha / rank, jnp.float32),
    }
  return {**params, "layers": new_layers}


def strip_lora(params: PyTree) -> PyTree:
  """``params`` without the adapter leaves (the base model's params, not
  merged; `jdistill.hf.merge_lora` merges)."""

  def strip(node):
    if not isinstance(node, Mapping):
      return node
    return {k: strip(v) for k, v in node.items() if k not in ADAPTER_KEYS}

  return strip(params)


class LoraModel(FunctionalModel):
  """A decoder `FunctionalModel` with LoRA adapters in its graph.

  Its `merge` (so `apply`) wraps every parameter that is not a
  ``lora_a`` / ``lora_b`` in ``jax.lax.stop_gradient``: their gradients are
  exact zeros and XLA skips the base kernels' weight-gradient matmuls
  (gradients still flow through them to the inputs). ``with_compute_dtype``
  and ``with_param_sharding`` keep the class.
  """

  def merge(self, params: PyTree, model_state: PyTree) -> nnx.Module:
    return super().merge(freeze_base(params), model_state)


def freeze_base(params: PyTree) -> PyTree:
  """``params`` with ``stop_gradient`` on every leaf but the adapters'."""
  mask = trainable_mask(params)
  return jax.tree.map(lambda p, m: p if m else jax.lax.stop_gradient(p),
                      params, mask)


def lora_model(model: FunctionalModel, params: PyTree,
               model_state: PyTree | None = None) -> LoraModel:
  """The `LoraModel` of the base decoder ``model`` for ``params`` (which
  hold adapters, e.g. from `init_lora`): a graph with `nnx.Param` slots
  for them. Only the tree structure, shapes and dtypes of ``params`` and
  ``model_state`` (default ``{}``) are read; they may be abstract
  (``jax.ShapeDtypeStruct``). ``compute_dtype`` is carried over;
  ``param_sharding`` is not (it would not fit the new params): call
  ``with_param_sharding`` with shardings derived from the adapted params."""
  if isinstance(model, LoraModel):
    raise ValueError("lora_model: the model already has LoRA adapters")
  if not has_lora(params):
    raise ValueError("lora_model: the params hold no LoRA adapters (make "
                     "them with init_lora)")
  model_state = {} if model_state is None else model_state
  abstract = lambda t: jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), t)
  params, model_state = abstract(params), abstract(model_state)
  adapters = {name: {k: v for k, v in group.items() if k in ADAPTER_KEYS}
              for name, group in params["layers"].items()
              if isinstance(group, Mapping) and "lora_a" in group}

  def build(base, state, adapters):
    module = nnx.merge(model.graphdef, base, state)
    layers = getattr(module, "layers", None)
    for name, leaves in adapters.items():
      group = getattr(layers, name, None)
      if group is None:
        raise ValueError(f"lora_model: the model has no layers.{name} group")
      for leaf_name, value in leaves.items():
        setattr(group, leaf_name, nnx.Param(value))
    return module

  try:
    module = nnx.eval_shape(build, strip_lora(params), model_state, adapters)
  except (KeyError, AttributeError, TypeError) as e:
    raise ValueError(f"lora_model: the params do not fit the model's graph "
                     f"({type(e).__name__}: {e})") from None
  graphdef, _, _ = nnx.split(module, nnx.Param, ...)
  return LoraModel(graphdef, model.compute_dtype)


def add_lora(model: FunctionalModel, variables: Mapping[str, PyTree], *,
             rank: int, targets: str | Iterable[str], key: jax.Array,
             alpha: float | None = None, init: str = "kaiming",
             dtype: Any = None) -> tuple[LoraModel, dict[str, PyTree]]:
  """A loaded decoder (``jdistill.hf.load_model``'s ``(model,
  {"params", "model_state"})``) with LoRA adapters: returns ``(LoraModel,
  {"params": params with adapters, "model_state": ...})``. See `init_lora`
  for the arguments; the base arrays are shared, not copied."""
  params = init_lora(variables["params"], rank=rank, targets=targets,
                     key=key, alpha=alpha, init=init, dtype=dtype)
  model_state = variables.get("model_state", {})
  out = dict(variables)
  out["params"] = params
  out["model_state"] = model_state
  return lora_model(model, params, model_state), out


def attach_lora(module: nnx.Module, *, rank: int,
                targets: str | Iterable[str], key: jax.Array | nnx.Rngs,
                alpha: float | None = None, init: str = "kaiming",
                dtype: Any = None) -> nnx.Module:
  """Adds LoRA adapters to a live `jdistill.models.decoder.Decoder` in
  place (`nnx.Param` attributes ``lora_a`` / ``lora_b`` / ``lora_scale`` of
  its ``layers.<target>`` groups) and returns it: the model-constructor
  route (``create_model`` inside ``jax.jit`` / ``nnx.eval_shape``), after
  which ``FunctionalModel.split`` (or ``LoraModel.split``, to stop the base
  gradients) gives params with the adapters. ``key`` may be an
  ``nnx.Rngs`` (its ``params`` stream is drawn once). Arguments as
  `init_lora`, which makes the same adapters from the same key."""
  if isinstance(key, nnx.Rngs):
    key = key.params()
  params = nnx.to_pure_dict(nnx.state(module, nnx.Param))
  new = init_lora(params, rank=rank, targets=targets, key=key, alpha=alpha,
                  init=init, dtype=dtype)
  for name, group in new["layers"].items():
    if "lora_a" in group and "lora_a" not in params["layers"][name]:
      target = getattr(module.layers, name)
      for leaf in ADAPTER_KEYS:
        setattr(target, leaf, nnx.Param(group[leaf]))
  return module


def _key_name(k) -> str:
  return str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))


def trainable_mask(params: PyTree) -> PyTree:
  """A pytree of bools like ``params``: True for the ``lora_a`` /
  ``lora_b`` leaves, False elsewhere (``lora_scale`` included).

  The optimizer's tree of `jdistill.train.state.trainables`,
  ``{"model": params, "projectors": ..., "combiner": ...}``, is understood
  too: the model's params are masked as above, projectors and combiner
  (new heads of the run) are trainable.
  """
  if (isinstance(params, Mapping) and "model" in params
      and set(params) <= set(_TRAINABLES_KEYS)):
    return {k: (trainable_mask(v) if k == "model"
                else jax.tree.map(lambda _: True, v))
            for k, v in params.items()}
  return jax.tree_util.tree_map_with_path(
      lambda path, _: bool(path) and _key_name(path[-1]) in TRAINABLE_KEYS,
      params)


def lora_optimizer(tx: optax.GradientTransformation,
                   params: PyTree | None = None
                   ) -> optax.GradientTransformation:
  """``tx`` on the adapters (`trainable_mask`), zero updates elsewhere.

  ``optax.multi_transform`` with ``optax.set_to_zero`` for the frozen
  leaves: ``tx``'s state (Adam's moments, ...) exists only for the
  adapters (``optax.MaskedNode`` elsewhere) and decoupled weight decay
  touches only them; a gradient clip inside ``tx`` sees only the adapters'
  gradients. The labels are computed from the tree ``init`` / ``update``
  receive, so this also works on `TrainState.trainables` with projectors.

  Args:
    tx: the optimizer (e.g. `jdistill.train.make_optimizer`'s).
    params: optional; when given it is checked to hold adapters.

  Raises:
    ValueError: ``params`` without adapters.
  """
  if params is not None and not any(jax.tree.leaves(trainable_mask(params))):
    raise ValueError("lora_optimizer: the params hold no LoRA adapters "
                     "(call add_lora first)")

  def labels(tree):
    return jax.tree.map(lambda m: "lora" if m else "frozen",
                        trainable_mask(tree))

  return optax.multi_transform({"lora": tx, "frozen": optax.set_to_zero()},
                               labels)


def adapter_settings(params: PyTree) -> dict[str, Any]:
  """``{"rank", "alpha", "targets"}`` of the adapters in ``params``.

  Raises:
    ValueError: no adapters, or adapters of differing rank or alpha.
  """
  groups = {name: g for name, g in params.get("layers", {}).items()
            if isinstance(g, Mapping) and "lora_a" in g}
  if not groups:
    raise ValueError("the params hold no LoRA adapters")
  ranks = {int(g["lora_a"].shape[-1]) for g in groups.values()}
  scales = set()
  for g in groups.values():
    scales.update(float(s) for s in np.asarray(_host(g["lora_scale"])))
  if len(ranks) != 1 or len(scales) != 1:
    raise ValueError(f"the LoRA adapters differ in rank {sorted(ranks)} or "
                     f"scale {sorted(scales)}; PEFT's format needs one")
  rank = ranks.pop()
  alpha = scales.pop() * rank
  if abs(alpha - round(alpha)) < 1e-4:
    alpha = int(round(alpha))
  return {"rank": rank, "alpha": alpha,
          "targets": tuple(t for t in LORA_TARGETS if t in groups)}


def _host(x) -> np.ndarray:
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils
    x = multihost_utils.process_allgather(x, tiled=True)
  return np.asarray(x)


def peft_name(target: str, layer: int, which: str) -> str:
  """PEFT's tensor name (``get_peft_model_state_dict``, adapter name
  removed), e.g. ``base_model.model.model.layers.0.self_attn.q_proj.
  lora_A.weight`` for ``("q_proj", 0, "A")``."""
  from jdistill.hf import hf_name
  module = hf_name(f"layers/{target}/kernel", layer).removesuffix(".weight")
  return f"base_model.model.{module}.lora_{which}.weight"


def save_peft_adapter(path: str, params: PyTree, *, rank: int | None = None,
                      alpha: float | None = None,
                      targets: Iterable[str] | None = None,
                      base_model_name_or_path: str = "",
                      dtype: Any = None) -> None:
  """Writes the adapters of ``params`` as a PEFT LoRA adapter directory
  (``PeftModel.from_pretrained(base, path)`` loads it):
  ``adapter_config.json`` and ``adapter_model.safetensors`` with
  ``...layers.{i}.self_attn.q_proj.lora_A.weight [r, in]`` and
  ``...lora_B.weight [out, r]`` (``mlp.*`` for gate/up/down; PyTorch's
  ``[out, in]`` layout, so ours transposed).

  ``rank``, ``alpha`` and ``targets`` default to those of the params
  (`adapter_settings`) and are checked against them when given. The
  directory is written into a temporary sibling and renamed (an existing
  ``path`` is replaced whole or not at all); only process 0 writes.

  Args:
    dtype: the stored dtype (default: the adapters').

  Raises:
    ValueError: one line: no adapters, or settings that disagree with them.
  """
  from safetensors.numpy import save_file
  found = adapter_settings(params)
  for name, given in (("rank", rank), ("alpha", alpha)):
    if given is not None and not math.isclose(float(given), found[name],
                                              rel_tol=1e-5):
      raise ValueError(f"save_peft_adapter: {name}={given} but the adapters "
                       f"have {name}={found[name]}")
  if targets is not None and set(_check_targets(targets)) != set(
      found["targets"]):
    raise ValueError(f"save_peft_adapter: targets={list(targets)} but the "
                     f"adapters are on {list(found['targets'])}")
  tensors: dict[str, np.ndarray] = {}
  for target in found["targets"]:
    group = params["layers"][target]
    a, b = _host(group["lora_a"]), _host(group["lora_b"])
    if dtype is not None:
      a, b = a.astype(jnp.dtype(dtype)), b.astype(jnp.dtype(dtype))
    for i in range(a.shape[0]):
      tensors[peft_name(target, i, "A")] = np.ascontiguousarray(a[i].T)
      tensors[peft_name(target, i, "B")] = np.ascontiguousarray(b[i].T)
  if jax.process_index() != 0:
    return
  config = {
      "peft_type": "LORA",
      "task_type": "CAUSAL_LM",
      "base_model_name_or_path": base_model_name_or_path or None,
      "revision": None,
      "inference_mode": True,
      "r": found["rank"],
      "lora_alpha": found["alpha"],
      "lora_dropout": 0.0,
      "target_modules": list(found["targets"]),
      "bias": "none",
      "fan_in_fan_out": False,
      "use_rslora": False,
      "use_dora": False,
      "init_lora_weights": True,
      "modules_to_save": None,
      "layers_to_transform": None,
      "layers_pattern": None,
      "rank_pattern": {},
      "alpha_pattern": {},
  }
  from jdistill.hf import write_directory

  def write(tmp: str) -> None:
    with open(os.path.join(tmp, ADAPTER_CONFIG), "w") as f:
      json.dump(config, f, indent=2)
    save_file(tensors, os.path.join(tmp, ADAPTER_WEIGHTS),
              metadata={"format": "pt"})

  write_directory(path, write)
