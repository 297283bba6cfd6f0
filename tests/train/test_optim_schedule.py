"""The step learning-rate schedule and torch.optim.SGD-equivalent SGD."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jdistill import train as jtrain
from jdistill.train import optim


def _closed_form(step, *, lr, boundaries, rate, warmup):
  if step < warmup:
    return lr * step / warmup
  return lr * rate ** sum(step >= b for b in boundaries)


@pytest.mark.parametrize("warmup", [0, 5])
def test_step_schedule_matches_closed_form_around_boundaries(warmup):
  lr, rate, boundaries = 0.05, 0.1, (150, 180, 210)
  sched = jtrain.make_schedule(lr, schedule="step", num_steps=240,
                               warmup_steps=warmup,
                               decay_boundaries=boundaries, decay_rate=rate)
  steps = sorted({0, 1, warmup - 1, warmup, warmup + 1, 239, 240, 10_000}
                 | {b + d for b in boundaries for d in (-1, 0, 1)})
  got = [float(sched(s)) for s in steps if s >= 0]
  want = [_closed_form(s, lr=lr, boundaries=boundaries, rate=rate,
                       warmup=warmup) for s in steps if s >= 0]
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-12)
  # The first decayed step of each boundary, explicitly.
  np.testing.assert_allclose(
      [float(sched(149)), float(sched(150)), float(sched(180)),
       float(sched(210))], [0.05, 0.005, 0.0005, 0.00005], rtol=1e-6)


def test_step_schedule_counts_steps_in_jit():
  sched = jtrain.make_schedule(1.0, schedule="step", num_steps=10,
                               decay_boundaries=(3, 6), decay_rate=0.5)
  got = jax.jit(jax.vmap(sched))(jnp.arange(8))
  np.testing.assert_allclose(got, [1, 1, 1, .5, .5, .5, .25, .25])


@pytest.mark.parametrize("kwargs, match", [
    (dict(decay_boundaries=(5, 5)), r"--lr_decay_boundaries=5,5: expected "
     r"strictly increasing"),
    (dict(decay_boundaries=(6, 3)), r"strictly increasing"),
    (dict(decay_boundaries=(0, 3)), r"--lr_decay_boundaries=0,3: expected "
     r"positive"),
    (dict(decay_boundaries=(-2,)), r"positive"),
    (dict(decay_boundaries=()), r"required by --lr_schedule=step"),
    (dict(decay_boundaries=(3,), warmup_steps=3), r"after the warm-up"),
    (dict(decay_boundaries=(3,), decay_rate=0.0), r"--lr_decay_rate=0.0"),
    (dict(decay_boundaries=(3,), schedule="cosine"),
     r"--lr_decay_boundaries=3: expected unset unless --lr_schedule=step"),
])
def test_step_schedule_errors_are_one_line(kwargs, match):
  kwargs = {"schedule": "step", "num_steps": 10, **kwargs}
  with pytest.raises(ValueError, match=match) as e:
    jtrain.make_schedule(0.1, **kwargs)
  assert "\n" not in str(e.value)


def _torch_sgd_numpy(params, grads, *, lr, momentum, weight_decay, nesterov):
  """torch.optim.SGD's documented update (dampening 0, maximize False),
  in float64; ``lr`` is a list, one rate per step."""
  p = {k: np.asarray(v, np.float64).copy() for k, v in params.items()}
  buf = {}
  for t, g_step in enumerate(grads):
    for k in p:
      g = np.asarray(g_step[k], np.float64) + weight_decay * p[k]
      if momentum:
        buf[k] = g.copy() if t == 0 else momentum * buf[k] + g
        g = g + momentum * buf[k] if nesterov else buf[k]
      p[k] = p[k] - lr[t] * g
  return p


def _apply_float64(tx, params, grads):
  """``params`` after ``tx``'s updates for each of ``grads``, in float64."""
  with jax.enable_x64(True):
    p = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), params)
    state = tx.init(p)
    for g in grads:
      g = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), g)
      updates, state = tx.update(g, state, p)
      p = optax.apply_updates(p, updates)
    return jax.tree.map(np.asarray, p)


@pytest.mark.parametrize("nesterov", [False, True])
def test_sgd_matches_torch_sgd_update_rule_for_three_steps(nesterov):
  rng = np.random.default_rng(0)
  params = {"w": rng.normal(size=(3, 4)), "b": rng.normal(size=(4,))}
  grads = [{k: rng.normal(size=v.shape) for k, v in params.items()}
           for _ in range(3)]
  # A step schedule that decays between the 2nd and 3rd update.
  sched = jtrain.make_schedule(0.05, schedule="step", num_steps=3,
                               decay_boundaries=(2,), decay_rate=0.1)
  tx = jtrain.make_optimizer("sgd", sched, weight_decay=5e-4, momentum=0.9,
                             nesterov=nesterov)
  got = _apply_float64(tx, params, grads)
  want = _torch_sgd_numpy(params, grads, lr=[0.05, 0.05, 0.005],
                          momentum=0.9, weight_decay=5e-4, nesterov=nesterov)
  for k in params:
    np.testing.assert_allclose(got[k], want[k], rtol=1e-12, atol=1e-14)
  # And the two differ, so the flag matters.
  other = _torch_sgd_numpy(params, grads, lr=[0.05, 0.05, 0.005],
                           momentum=0.9, weight_decay=5e-4,
                           nesterov=not nesterov)
  assert not np.allclose(got["w"], other["w"], rtol=1e-6)


def test_sgd_momentum_out_of_range():
  with pytest.raises(ValueError, match=r"--sgd_momentum=1.0"):
    optim.make_optimizer("sgd", optax.constant_schedule(0.1), momentum=1.0)


def test_config_flags_for_the_step_schedule():
  from experiments.config.core import OptimSection
  s = OptimSection(lr_schedule="step", lr_decay_boundaries=(10, 20),
                   optimizer="sgd", sgd_nesterov=False)
  s.validate()
  with pytest.raises(ValueError, match=r"^--lr_decay_boundaries=10: expected "
                     r"unset unless --lr_schedule=step"):
    OptimSection(lr_decay_boundaries=(10,)).validate()
  with pytest.raises(ValueError, match=r"^--lr_decay_boundaries=20,10"):
    OptimSection(lr_schedule="step", lr_decay_boundaries=(20, 10)).validate()
  with pytest.raises(ValueError, match=r"^--sgd_momentum=-0.1"):
    OptimSection(sgd_momentum=-0.1).validate()


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_weight_decay_filter_exempts_biases_and_norms(name):
  """bias_and_norm: the 1-D parameters get the update of weight decay 0,
  the others that of the full decay (float64)."""
  rng = np.random.default_rng(1)
  params = {"conv": rng.normal(size=(3, 3, 2, 4)), "bias": rng.normal(size=4),
            "bn": {"scale": rng.normal(size=4)}}
  grads = [jax.tree.map(lambda a: rng.normal(size=a.shape), params)
           for _ in range(2)]

  def run(weight_decay, weight_decay_filter):
    tx = jtrain.make_optimizer(name, optax.constant_schedule(0.1),
                               weight_decay=weight_decay, momentum=0.9,
                               nesterov=True,
                               weight_decay_filter=weight_decay_filter)
    return _apply_float64(tx, params, grads)

  filtered = run(0.05, "bias_and_norm")
  decayed, undecayed = run(0.05, "none"), run(0.0, "none")
  np.testing.assert_allclose(filtered["conv"], decayed["conv"], rtol=1e-12)
  for got, want in ((filtered["bias"], undecayed["bias"]),
                    (filtered["bn"]["scale"], undecayed["bn"]["scale"])):
    np.testing.assert_allclose(got, want, rtol=1e-12)
  assert not np.allclose(decayed["bias"], undecayed["bias"], rtol=1e-9)
  with pytest.raises(ValueError, match=r"^--weight_decay_filter=bn: expected"):
    jtrain.make_optimizer(name, 0.1, weight_decay_filter="bn")
