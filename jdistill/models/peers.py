"""A group of peer models trained together (online and mutual distillation).

`PeerGroup` holds several models of the registry, possibly of different
architectures but with the same classes and inputs, and runs them all on
the same batch. It is an ordinary jdistill model: ``create_model("peers",
peers=[...], ...)`` builds it and `jdistill.train.FunctionalModel.split`
splits it, so one `TrainState` and one optimizer hold every peer
(`jdistill.train.mutual`).

Variables layout: the peers sit in an ``nnx.List`` attribute ``peers``, so
``nnx.split`` / ``nnx.to_pure_dict`` give ``{"peers": {0: <peer 0>, 1:
<peer 1>, ...}}`` with int keys, each ``<peer i>`` laid out exactly as the
variables of that model built alone. A peer without model state (no
BatchNorm) has no entry in the group's model state. `peer_variables`
extracts one peer's ``{"params", "model_state"}``, e.g. to export the peer
as a student or load it as a teacher.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jdistill.models.registry import MODEL_NAMES, create_model

PyTree = Any

# Keywords that the group sets for every peer; a peer's own kwargs may not.
_GROUP_KEYWORDS = ("num_classes", "input_shape", "rngs", "dtype")
_SPEC_KEYS = ("name", "kwargs")


def _check_spec(index: int, spec: Any) -> tuple[str, dict[str, Any]]:
  """``(name, kwargs)`` of peer spec ``index``, checked."""
  if not isinstance(spec, Mapping):
    raise ValueError(f"peers[{index}]: expected a dict with 'name' and "
                     f"optional 'kwargs'; got {spec!r}")
  unknown = [k for k in spec if k not in _SPEC_KEYS]
  if unknown:
    raise ValueError(f"peers[{index}]: unknown keys {unknown}; expected "
                     f"'name' and optional 'kwargs'")
  name = spec.get("name")
  if name not in MODEL_NAMES:
    raise ValueError(f"peers[{index}]: unknown model {name!r}; expected one "
                     f"of: {', '.join(MODEL_NAMES)}")
  kwargs = spec.get("kwargs") or {}
  if not isinstance(kwargs, Mapping):
    raise ValueError(f"peers[{index}]: 'kwargs' must be a dict; got "
                     f"{kwargs!r}")
  fixed = [k for k in kwargs if k in _GROUP_KEYWORDS]
  if fixed:
    raise ValueError(f"peers[{index}]: kwargs {fixed} are set by the group "
                     f"for every peer")
  return name, dict(kwargs)


class PeerGroup(nnx.Module):
  """Several models run side by side on the same inputs.

  ``__call__(x, *, train=False)`` returns ``(logits, features)``:

  * ``logits``: ``[num_peers, B, num_classes]`` float32, peer ``i``'s
    logits at index ``i``.
  * ``features``: ``{"peer{i}/{name}": value}`` for every feature ``name``
    of peer ``i``.

  Attributes:
    peers: ``nnx.List`` of the peer modules.
    peer_names: the registry name of each peer.
    num_peers: ``len(peers)``.
    feature_names: keys of the returned feature dict, in order.

  Example:
    >>> group = PeerGroup(
    ...     [{"name": "mlp", "kwargs": {"hidden_sizes": (64,)}},
    ...      {"name": "mlp", "kwargs": {"hidden_sizes": (16,)}}],
    ...     num_classes=10, input_shape=(40,), rngs=nnx.Rngs(0))
    >>> group(jnp.zeros((4, 40)))[0].shape
    (2, 4, 10)
  """

  def __init__(self, peers: Sequence[Mapping[str, Any]], *, num_classes: int,
               input_shape: tuple[int, ...], rngs: nnx.Rngs,
               dtype: Any = jnp.float32, remat: str | None = None):
    """Builds each peer with ``create_model``.

    Args:
      peers: one spec per peer, ``{"name": <model name>, "kwargs": {...}}``
        (``kwargs`` optional: the constructor options of that model, as in
        ``create_model(name, **kwargs)``).
      num_classes: the classes of every peer.
      input_shape: shape of one example, shared by every peer.
      rngs: initialisation RNGs (the peers draw from them in order).
      dtype: computation dtype of every peer.
      remat: if given, the ``remat`` policy of every peer whose kwargs do
        not set their own.

    Raises:
      ValueError: no peers, a malformed spec, an unknown model name, or a
        spec that sets a keyword the group sets (``num_classes``,
        ``input_shape``, ``rngs``, ``dtype``).
    """
    if isinstance(peers, (str, Mapping)) or not isinstance(peers, Sequence):
      raise ValueError(f"peers: expected a list of peer specs; got {peers!r}")
    if not peers:
      raise ValueError("peers: expected at least one peer spec")
    specs = [_check_spec(i, spec) for i, spec in enumerate(peers)]
    modules = []
    for name, kwargs in specs:
      if remat is not None:
        kwargs = {"remat": remat, **kwargs}
      modules.append(create_model(name, num_classes=num_classes,
                                  input_shape=input_shape, rngs=rngs,
                                  dtype=dtype, **kwargs))
    self.peers = nnx.List(modules)
    self.peer_names = tuple(name for name, _ in specs)
    self.num_peers = len(modules)
    self.num_classes = int(num_classes)
    self.feature_names = tuple(
        f"peer{i}/{f}" for i, m in enumerate(modules)
        for f in getattr(m, "feature_names", ()))

  def __call__(self, x: jax.Array, *, train: bool = False
               ) -> tuple[jax.Array, dict[str, jax.Array]]:
    logits, features = [], {}
    for i, peer in enumerate(self.peers):
      z, feats = peer(x, train=train)
      logits.append(z)
      features.update({f"peer{i}/{k}": v for k, v in feats.items()})
    return jnp.stack(logits), features


def peer_variables(variables: Mapping[str, PyTree], index: int
                   ) -> dict[str, PyTree]:
  """Peer ``index``'s variables out of a `PeerGroup`'s.

  Args:
    variables: ``{"params": ..., "model_state": ...}`` of the group, as
      `jdistill.train.FunctionalModel.split` gives them (pure dicts with
      the layout ``{"peers": {0: ..., 1: ...}}``).
    index: the peer.

  Returns:
    ``{"params": ..., "model_state": ...}`` laid out exactly as the
    variables of ``create_model(name, **kwargs)`` of that peer alone
    (``model_state`` is ``{}`` for a peer without model state), so they
    merge into the peer's own graph, e.g. as a teacher's variables.

  Raises:
    ValueError: ``variables`` is not a group's, or has no peer ``index``.
  """
  if (not isinstance(variables, Mapping) or "params" not in variables
      or "model_state" not in variables):
    raise ValueError("peer_variables: expected {'params': ..., "
                     "'model_state': ...} of a PeerGroup")
  params = variables["params"]
  if not isinstance(params, Mapping) or set(params) != {"peers"}:
    raise ValueError("peer_variables: params are not a PeerGroup's (expected "
                     "the single key 'peers')")
  if isinstance(index, bool) or index not in params["peers"]:
    raise ValueError(f"peer_variables: no peer {index!r}; the group has "
                     f"peers {sorted(params['peers'])}")
  model_state = variables["model_state"] or {}
  return {"params": params["peers"][index],
          "model_state": model_state.get("peers", {}).get(index, {})}
