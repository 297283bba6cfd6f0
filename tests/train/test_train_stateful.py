"""jdistill.train.stateful: stateful logit losses reach the objective and the
steps only through their protocol and registry (TAID is one; a made-up one
registered here needs no change to either)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jdistill import losses
from jdistill import train as jt
from jdistill.models import create_model
from jdistill.train import stateful


@dataclasses.dataclass(frozen=True)
class ScaledKD:
  """KD times a factor that the update multiplies by ``decay``; the state
  also counts the updates and keeps the last value it was given."""

  label: str = "Scaled KD"
  options: tuple[str, ...] = ("decay",)
  needs_num_steps: bool = False

  @property
  def fn(self):
    return losses.kd

  def init(self, options):
    return {"scale": jnp.ones((), jnp.float32),
            "updates": jnp.zeros((), jnp.int32),
            "last": jnp.zeros((), jnp.float32)}

  def per_example(self, state, student_logits, teacher_logits, labels, *,
                  temperature, options):
    del labels, options
    return state["scale"] * losses.kd(student_logits, teacher_logits,
                                      temperature=temperature)

  def update(self, state, value, step, *, num_steps, options):
    del step, num_steps
    return {"scale": state["scale"] * options.get("decay", 0.5),
            "updates": state["updates"] + 1, "last": value}

  def metrics(self, state):
    return {"scaled_kd_scale": state["scale"]}


@pytest.fixture
def scaled_kd(monkeypatch):
  loss = ScaledKD()
  monkeypatch.setitem(stateful.STATEFUL_LOGIT_LOSSES, "scaled_kd", loss)
  return loss


def test_taid_is_a_registered_stateful_loss():
  taid = stateful.get_stateful_loss("taid")
  assert taid is stateful.STATEFUL_LOGIT_LOSSES["taid"]
  assert taid.fn is losses.taid and taid.label == "TAID"
  assert stateful.get_stateful_loss("kd") is None
  obj = jt.DistillObjective(loss="taid", schedule_steps=10,
                            loss_kwargs=(("t_start", 0.3),))
  assert obj.stateful_loss is taid
  assert jt.DistillObjective().stateful_loss is None
  assert jt.loss_hyperparameters("taid") == ("t_start", "t_end", "alpha",
                                             "beta")
  # The state's key (checkpoints) and the metric's name.
  state = obj.init_loss_state()
  assert list(state) == ["taid"]
  assert isinstance(state["taid"], losses.TAIDState)
  np.testing.assert_allclose(state["taid"].t, 0.3)
  zs = jnp.zeros((4, 3))
  _, parts = obj(zs, zs, jnp.zeros((4,), jnp.int32), loss_state=state)
  assert parts["taid_t"] is state["taid"].t
  assert stateful.per_step_keys({"taid": 0, "features": {}}) == ("taid",)


def test_a_new_stateful_loss_needs_no_change_to_the_objective(scaled_kd):
  assert "scaled_kd" in jt.distill_loss_names()
  assert jt.loss_hyperparameters("scaled_kd") == ("decay",)
  with pytest.raises(ValueError, match="'beta' is not a hyperparameter of "
                     "loss 'scaled_kd'"):
    jt.DistillObjective(loss="scaled_kd", loss_kwargs=(("beta", 1.0),))
  with pytest.raises(ValueError, match="--aux_loss=scaled_kd: Scaled KD "
                     "keeps a training state"):
    jt.DistillObjective(aux_loss="scaled_kd")
  with pytest.raises(ValueError, match="--loss=scaled_kd needs the number "
                     "of training steps"):
    with pytest.MonkeyPatch.context() as mp:
      mp.setitem(stateful.STATEFUL_LOGIT_LOSSES, "scaled_kd",
                 dataclasses.replace(scaled_kd, needs_num_steps=True))
      jt.DistillObjective(loss="scaled_kd")

  obj = jt.DistillObjective(loss="scaled_kd", temperature=2.0,
                            loss_kwargs=(("decay", 0.25),))
  rng = np.random.default_rng(0)
  zs, zt = jnp.asarray(rng.normal(size=(2, 6, 5)), jnp.float32)
  y = jnp.zeros((6,), jnp.int32)
  state = obj.init_loss_state()
  assert list(state) == ["scaled_kd"]
  _, parts = obj(zs, zt, y, loss_state=state)
  kd = jnp.mean(losses.kd(zs, zt, temperature=2.0))
  np.testing.assert_allclose(parts["kd"], kd, rtol=1e-6)
  assert float(parts["scaled_kd_scale"]) == 1.0
  state = obj.next_loss_state(state, parts, 0)
  assert float(state["scaled_kd"]["scale"]) == 0.25
  assert int(state["scaled_kd"]["updates"]) == 1
  assert float(state["scaled_kd"]["last"]) == float(parts["kd"])
  _, parts = obj(zs, zt, y, loss_state=state)
  np.testing.assert_allclose(parts["kd"], 0.25 * kd, rtol=1e-6)


def test_a_new_stateful_loss_advances_once_per_optimizer_step(scaled_kd):
  c, d, b = 4, 6, 8

  def split(seed, hidden):
    return jt.FunctionalModel.split(create_model(
        "mlp", num_classes=c, input_shape=(d,), rngs=nnx.Rngs(seed),
        hidden_sizes=(hidden,)))

  model, params, model_state = split(0, 8)
  teacher, tp, ts = split(1, 12)
  rng = np.random.default_rng(1)
  batch = {"x": jnp.asarray(rng.normal(size=(b, d)), jnp.float32),
           "y": jnp.asarray(rng.integers(0, c, b), jnp.int32)}
  obj = jt.DistillObjective(loss="scaled_kd", temperature=2.0,
                            loss_kwargs=(("decay", 0.5),))
  tx = optax.sgd(0.1)
  out = {}
  for k in (1, 2):
    state = jt.TrainState.create(params, model_state, tx, 0,
                                 loss_state=obj.init_loss_state())
    step = jax.jit(jt.make_distill_step(model, teacher, tx, obj,
                                        grad_accum_steps=k))
    metrics = []
    for _ in range(2):
      state, m = step(state, {"params": tp, "model_state": ts}, batch)
      metrics.append(m)
    out[k] = state.loss_state["scaled_kd"], metrics
  for k, (loss_state, metrics) in out.items():
    assert int(loss_state["updates"]) == 2, k
    assert float(loss_state["scale"]) == 0.25, k
    assert [float(m["scaled_kd_scale"]) for m in metrics] == [1.0, 0.5], k
    # The update saw the step's KD over the whole batch.
    np.testing.assert_allclose(loss_state["last"], metrics[-1]["kd"],
                               rtol=1e-6)
  np.testing.assert_allclose(out[2][0]["last"], out[1][0]["last"],
                             rtol=2e-5)
