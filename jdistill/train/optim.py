"""Optimizers and learning-rate schedules built from a few named options."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import optax

OPTIMIZERS = ("adamw", "adam", "sgd")
SCHEDULES = ("constant", "cosine", "step")
# Which parameters --weight_decay applies to: all, or all but the biases
# and normalisation scales/offsets (the parameters of at most one
# dimension; timm's filter_bias_and_bn, used by DIST's ImageNet recipe).
WEIGHT_DECAY_FILTERS = ("none", "bias_and_norm")


def check_step_schedule(schedule: str, boundaries: Sequence[int],
                        decay_rate: float, *, warmup_steps: int = 0) -> None:
  """Raises a one-line ``ValueError`` for bad ``--lr_decay_boundaries`` /
  ``--lr_decay_rate`` (shared by `make_schedule` and the config check)."""
  shown = ",".join(str(b) for b in boundaries)
  if schedule != "step":
    if boundaries:
      raise ValueError(f"--lr_decay_boundaries={shown}: expected unset "
                       f"unless --lr_schedule=step (got {schedule})")
    return
  if not boundaries:
    raise ValueError("--lr_decay_boundaries=: expected one or more steps "
                     "(required by --lr_schedule=step)")
  if any(int(b) != b or b <= 0 for b in boundaries):
    raise ValueError(f"--lr_decay_boundaries={shown}: expected positive "
                     "integer steps")
  if any(b <= a for a, b in zip(boundaries, boundaries[1:])):
    raise ValueError(f"--lr_decay_boundaries={shown}: expected strictly "
                     "increasing steps")
  if boundaries[0] <= warmup_steps:
    raise ValueError(f"--lr_decay_boundaries={shown}: expected steps after "
                     f"the warm-up (> --warmup_steps={warmup_steps})")
  if not decay_rate > 0:
    raise ValueError(f"--lr_decay_rate={decay_rate}: expected a positive "
                     "number (the factor applied at each boundary)")


def make_schedule(learning_rate: float, *, schedule: str, num_steps: int,
                  warmup_steps: int = 0,
                  decay_boundaries: Sequence[int] = (),
                  decay_rate: float = 0.1) -> optax.Schedule:
  """Linear warm-up from 0 to ``learning_rate``, then constant, cosine or
  step.

  ``step`` is the piecewise-constant schedule of mdistiller/CRD: the rate is
  ``learning_rate * decay_rate**k`` where ``k`` is the number of
  ``decay_boundaries`` at or below the step, so step ``b`` is the first at
  the decayed rate. Boundaries count from step 0 (warm-up included) and must
  lie after the warm-up; boundaries at or past ``num_steps`` never apply.
  (mdistiller decays at the start of epoch ``e + 1`` for each stage ``e``:
  boundary ``e * steps_per_epoch``.)
  """
  if learning_rate <= 0:
    raise ValueError(f"--learning_rate must be positive; got {learning_rate}")
  if warmup_steps < 0 or warmup_steps >= max(num_steps, 1):
    raise ValueError(f"--warmup_steps={warmup_steps} must be in "
                     f"[0, --num_steps={num_steps})")
  if schedule not in SCHEDULES:
    raise ValueError(f"--lr_schedule={schedule}: expected one of: "
                     f"{', '.join(SCHEDULES)}")
  decay_boundaries = tuple(decay_boundaries)
  check_step_schedule(schedule, decay_boundaries, decay_rate,
                      warmup_steps=warmup_steps)
  if schedule == "constant":
    main = optax.constant_schedule(learning_rate)
  elif schedule == "cosine":
    main = optax.cosine_decay_schedule(learning_rate,
                                       max(num_steps - warmup_steps, 1))
  else:
    # join_schedules hands the later schedule ``step - warmup_steps``.
    main = optax.piecewise_constant_schedule(
        learning_rate,
        {int(b) - warmup_steps: float(decay_rate) for b in decay_boundaries})
  if not warmup_steps:
    return main
  warmup = optax.linear_schedule(0.0, learning_rate, warmup_steps)
  return optax.join_schedules([warmup, main], [warmup_steps])


def weight_decay_mask(weight_decay_filter: str):
  """``None`` (decay every parameter) or the optax mask function of
  ``weight_decay_filter`` (`WEIGHT_DECAY_FILTERS`)."""
  if weight_decay_filter == "none":
    return None
  if weight_decay_filter == "bias_and_norm":
    return lambda params: jax.tree.map(lambda p: jnp.ndim(p) > 1, params)
  raise ValueError(f"--weight_decay_filter={weight_decay_filter}: expected "
                   f"one of {', '.join(WEIGHT_DECAY_FILTERS)}")


def make_optimizer(name: str, schedule: optax.Schedule, *,
                   weight_decay: float = 0.0, momentum: float = 0.9,
                   nesterov: bool = True, grad_clip_norm: float = 0.0,
                   weight_decay_filter: str = "none"
                   ) -> optax.GradientTransformation:
  """``adamw`` (decoupled decay), ``adam``, or ``sgd`` with (by default
  Nesterov) momentum and L2 decay added to the gradient before the momentum
  (as PyTorch's SGD ``weight_decay``). ``weight_decay_filter``:
  ``bias_and_norm`` exempts the parameters of at most one dimension
  (biases, normalisation scales and offsets) from the decay.

  ``sgd`` with ``nesterov=False`` is ``torch.optim.SGD(lr, momentum,
  weight_decay)`` (dampening 0), mdistiller's/CRD's optimiser:
  ``g = grad + wd * p; buf = momentum * buf + g`` (``buf = g`` at the first
  step); ``p -= lr * buf``. ``momentum=0`` is plain SGD.
  """
  mask = weight_decay_mask(weight_decay_filter)
  if name == "adamw":
    tx = optax.adamw(schedule, weight_decay=weight_decay, mask=mask)
  elif name == "adam":
    tx = optax.adam(schedule)
  elif name == "sgd":
    if not 0 <= momentum < 1:
      raise ValueError(f"--sgd_momentum={momentum}: expected a number in "
                       "[0, 1)")
    tx = optax.chain(optax.add_decayed_weights(weight_decay, mask=mask),
                     optax.sgd(schedule, momentum=momentum,
                               nesterov=nesterov))
  else:
    raise ValueError(f"--optimizer={name}: expected one of: "
                     f"{', '.join(OPTIMIZERS)}")
  if grad_clip_norm > 0:
    tx = optax.chain(optax.clip_by_global_norm(grad_clip_norm), tx)
  return tx
