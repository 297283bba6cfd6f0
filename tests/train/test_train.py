"""jdistill.train: objective, steps, sharding, checkpoints and the loop."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jdistill import data as jdata
from jdistill import losses
from jdistill import train as jtrain
from jdistill.models import create_model


class Linear(nnx.Module):
  """The smallest model with the jdistill call convention."""

  def __init__(self, din, dout, *, rngs):
    self.dense = nnx.Linear(din, dout, rngs=rngs)

  def __call__(self, x, *, train=False):
    del train
    return self.dense(x), {}


def _softmax(z):
  z = z - z.max(-1, keepdims=True)
  e = np.exp(z)
  return e / e.sum(-1, keepdims=True)


def _np_kd(zs, zt, T):
  ps, pt = _softmax(zs / T), _softmax(zt / T)
  return T**2 * np.sum(pt * (np.log(pt) - np.log(ps)), -1)


def _np_ce(z, y):
  return -np.log(_softmax(z)[np.arange(len(y)), y])


# ---------------------------------------------------------------- objective


def test_objective_is_weighted_ce_plus_kd_with_example_mask():
  rng = np.random.default_rng(0)
  zs, zt = rng.normal(size=(2, 6, 5)) * 3
  y = rng.integers(0, 5, 6)
  mask = np.array([1, 1, 0, 1, 0, 1], bool)
  obj = jtrain.DistillObjective(loss="kd", temperature=2.0, ce_weight=0.3,
                                kd_weight=0.7)
  total, parts = obj(jnp.asarray(zs), jnp.asarray(zt), jnp.asarray(y),
                     jnp.asarray(mask))
  ce = _np_ce(zs, y)[mask].mean()
  kd = _np_kd(zs, zt, 2.0)[mask].mean()
  np.testing.assert_allclose(parts["ce"], ce, rtol=1e-5)
  np.testing.assert_allclose(parts["kd"], kd, rtol=1e-5)
  np.testing.assert_allclose(total, 0.3 * ce + 0.7 * kd, rtol=1e-5)


def test_objective_options_reach_the_losses():
  rng = np.random.default_rng(1)
  zs, zt = jnp.asarray(rng.normal(size=(2, 4, 7)) * 3, jnp.float32)
  y = jnp.asarray(rng.integers(0, 7, 4))
  _, p = jtrain.DistillObjective(loss="jsd", loss_kwargs=(("beta", 0.3),),
                                 temperature=1.5)(zs, zt, y)
  np.testing.assert_allclose(
      p["kd"], losses.jsd(zs, zt, beta=0.3, temperature=1.5).mean(), rtol=1e-6)
  _, p = jtrain.DistillObjective(loss="kd", standardize_logits=True)(zs, zt, y)
  np.testing.assert_allclose(
      p["kd"], losses.kd(losses.standardize_logits(zs),
                         losses.standardize_logits(zt),
                         temperature=4.0).mean(), rtol=1e-6)
  _, p = jtrain.DistillObjective(loss="dkd")(zs, zt, y)
  np.testing.assert_allclose(p["kd"], losses.dkd(zs, zt, y).mean(), rtol=1e-6)
  _, p = jtrain.DistillObjective(loss="dist")(zs, zt, y)
  np.testing.assert_allclose(p["kd"], losses.dist(zs, zt, temperature=4.0),
                             rtol=1e-6)
  _, p = jtrain.DistillObjective(loss="pld", temperature=2.0)(zs, zt, y)
  np.testing.assert_allclose(
      p["kd"], losses.pld(zs, zt, y, temperature=2.0).mean(), rtol=1e-6)
  obj = jtrain.DistillObjective(loss="sinkhorn", temperature=2.0,
                                loss_kwargs=(("num_iters", 5.0),))
  mask = jnp.array([True, True, False, True])
  _, p = jax.jit(lambda a, b: obj(a, b, y, mask))(zs, zt)
  np.testing.assert_allclose(
      p["kd"], losses.sinkhorn(zs[mask], zt[mask], temperature=2.0,
                               num_iters=5), rtol=1e-5)
  _, p = jtrain.DistillObjective(loss="mlkd")(zs, zt, y)
  np.testing.assert_allclose(p["kd"], losses.mlkd(zs, zt), rtol=1e-6)
  _, p = jtrain.DistillObjective(loss="bdkd", loss_kwargs=(("weight", 3.0),),
                                 temperature=2.0)(zs, zt, y)
  np.testing.assert_allclose(
      p["kd"], losses.bdkd(zs, zt, weight=3.0, temperature=2.0).mean(),
      rtol=1e-6)
  _, p = jtrain.DistillObjective(label_smoothing=0.1)(zs, zt, y)
  onehot = np.eye(7)[np.asarray(y)] * 0.9 + 0.1 / 7
  logp = np.log(_softmax(np.asarray(zs, np.float64)))
  np.testing.assert_allclose(p["ce"], -(onehot * logp).sum(-1).mean(),
                             rtol=1e-5)


@pytest.mark.parametrize("kwargs, match", [
    (dict(loss="kld"), r"--loss=kld: unknown distillation loss; expected one "
                       r"of: kd, "),
    (dict(loss="jsd", loss_kwargs=(("alpha", 1.0),)),
     r"--loss_kwargs: 'alpha' is not a hyperparameter of loss 'jsd'; "
     r"expected one of: beta"),
    (dict(temperature=0.0), r"--temperature must be positive"),
])
def test_objective_rejects_bad_settings(kwargs, match):
  with pytest.raises(ValueError, match=match):
    jtrain.DistillObjective(**kwargs)


def test_objective_rejects_mismatched_class_counts():
  obj = jtrain.DistillObjective()
  with pytest.raises(ValueError, match=r"student logits have shape \(2, 10\) "
                     r"but teacher logits have shape \(2, 100\)"):
    obj(jnp.zeros((2, 10)), jnp.zeros((2, 100)), jnp.zeros(2, jnp.int32))


# -------------------------------------------------------------------- steps


def _linear_setup(din=6, classes=4, seed=0):
  model, params, ms = jtrain.FunctionalModel.split(
      Linear(din, classes, rngs=nnx.Rngs(seed)))
  return model, params, ms


def test_distill_step_gradient_matches_closed_form_and_teacher_is_frozen():
  """d/dz [T^2 KL(p_t || p_s)] = T (p_s - p_t); SGD(lr=1) applies it."""
  T = 3.0
  student, params, ms = _linear_setup(seed=0)
  teacher, tparams, tms = _linear_setup(seed=1)
  tx = optax.sgd(1.0)
  obj = jtrain.DistillObjective(loss="kd", temperature=T, ce_weight=0.0,
                                kd_weight=1.0)
  step = jax.jit(jtrain.make_distill_step(student, teacher, tx, obj))
  rng = np.random.default_rng(0)
  x = rng.normal(size=(8, 6)).astype(np.float32)
  y = rng.integers(0, 4, 8).astype(np.int32)
  state = jtrain.TrainState.create(params, ms, tx, seed=0)
  teacher_vars = {"params": tparams, "model_state": tms}
  before = jax.tree.map(np.asarray, teacher_vars)
  new, metrics = step(state, teacher_vars, {"x": x, "y": y})

  W, b = (np.asarray(params["dense"][k], np.float64) for k in ("kernel", "bias"))
  Wt, bt = (np.asarray(tparams["dense"][k], np.float64)
            for k in ("kernel", "bias"))
  zs, zt = x @ W + b, x @ Wt + bt
  g = T * (_softmax(zs / T) - _softmax(zt / T)) / len(x)
  np.testing.assert_allclose(new.params["dense"]["kernel"], W - x.T @ g,
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(new.params["dense"]["bias"], b - g.sum(0),
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(metrics["kd"], _np_kd(zs, zt, T).mean(),
                             rtol=1e-5)
  assert int(new.step) == 1
  jax.tree.map(np.testing.assert_array_equal, before,
               jax.tree.map(np.asarray, teacher_vars))
  # The optimizer state covers the student's parameters only.
  assert jax.tree.structure(new.params) == jax.tree.structure(params)


def test_distill_step_with_given_teacher_logits_skips_the_teacher():
  """batch['teacher_logits'] (precomputed once, no augmentation) gives the
  closed-form update of the step that runs the teacher, whatever teacher
  variables are passed."""
  T = 2.0
  student, params, ms = _linear_setup(seed=0)
  teacher, tparams, tms = _linear_setup(seed=1)
  tx = optax.sgd(1.0)
  obj = jtrain.DistillObjective(loss="kd", temperature=T, ce_weight=0.5,
                                kd_weight=1.0)
  step = jax.jit(jtrain.make_distill_step(student, teacher, tx, obj))
  rng = np.random.default_rng(1)
  x = rng.normal(size=(8, 6)).astype(np.float32)
  y = rng.integers(0, 4, 8).astype(np.int32)
  state = jtrain.TrainState.create(params, ms, tx, seed=0)
  tvars = {"params": tparams, "model_state": tms}
  online, m_online = step(state, tvars, {"x": x, "y": y})
  zt = (x @ np.asarray(tparams["dense"]["kernel"])
        + np.asarray(tparams["dense"]["bias"]))
  wrong = jax.tree.map(lambda a: a * 0 + 7.0, tvars)
  cached, m_cached = step(state, wrong, {"x": x, "y": y,
                                         "teacher_logits": zt})
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6,
                                                       atol=1e-6),
               online.params, cached.params)
  for k in ("loss", "kd", "ce", "teacher_accuracy", "agreement"):
    np.testing.assert_allclose(m_online[k], m_cached[k], rtol=1e-6)
  # Feature terms need the teacher's features: refused.
  fobj = jtrain.DistillObjective(
      loss="kd", feature_terms=(jtrain.FeatureTerm("hint", "logits",
                                                   "logits"),))
  projectors, _ = jtrain.FunctionalProjectors.create(
      [("identity", (4,), (4,))])
  fstep = jtrain.make_distill_step(student, teacher, tx, fobj, projectors)
  with pytest.raises(ValueError, match="teacher_logits"):
    fstep(state, tvars, {"x": x, "y": y, "teacher_logits": zt})


def test_train_step_updates_batchnorm_statistics_and_eval_uses_them():
  model, params, ms = jtrain.FunctionalModel.split(create_model(
      "resnet8", num_classes=3, input_shape=(8, 8, 1), rngs=nnx.Rngs(0)))
  tx = optax.adam(1e-3)
  state = jtrain.TrainState.create(params, ms, tx, seed=0)
  x = np.random.default_rng(0).normal(size=(4, 8, 8, 1)).astype(np.float32)
  batch = {"x": x, "y": np.array([0, 1, 2, 0], np.int32)}
  new, m = jax.jit(jtrain.make_train_step(model, tx))(state, batch)
  changed = jax.tree.map(lambda a, b: not np.allclose(a, b), ms,
                         new.model_state)
  assert any(jax.tree.leaves(changed))
  assert np.isfinite(m["loss"]) and 0 <= m["accuracy"] <= 1
  sums = jax.jit(jtrain.make_eval_step(model))(
      new.params, new.model_state, {**batch, "mask": np.array([1, 1, 1, 0],
                                                             bool)})
  logits, _, _ = model.apply(new.params, new.model_state, x, train=False)
  correct = (np.argmax(logits, -1) == batch["y"])[:3].sum()
  assert int(sums["count"]) == 3 and int(sums["correct"]) == correct


# ----------------------------------------------------------------- sharding


def _resnet_distill_case(mesh_devices):
  ds = jdata.load_digits()
  student, sp, sms = jtrain.FunctionalModel.split(create_model(
      "resnet8", num_classes=10, input_shape=(8, 8, 1), rngs=nnx.Rngs(0)))
  teacher, tp, tms = jtrain.FunctionalModel.split(create_model(
      "convnet", num_classes=10, input_shape=(8, 8, 1),
      rngs=nnx.Rngs(1), width=16, depth=2))
  # SGD rather than Adam: Adam divides by sqrt(v), which turns float32
  # round-off in near-zero gradients into O(lr) differences in the update.
  tx = optax.sgd(0.1, momentum=0.9)
  mesh = jtrain.make_data_mesh(mesh_devices)
  obj = jtrain.DistillObjective(loss="kd", temperature=4.0)
  step = jtrain.compile_step(jtrain.make_distill_step(student, teacher, tx,
                                                      obj), mesh)
  state = jtrain.replicate(jtrain.TrainState.create(sp, sms, tx, 0), mesh)
  tvars = jtrain.replicate({"params": tp, "model_state": tms}, mesh)
  batches = jdata.TrainBatches(ds.train, 32, seed=0)
  metrics = []
  for s in range(2):
    state, m = step(state, tvars, jtrain.put_batch(batches.local_batch(s),
                                                   mesh))
    metrics.append(jax.device_get(m))
  return jax.device_get(state), metrics, state


def test_distill_step_on_8_devices_equals_1_device():
  assert jax.device_count() >= 8, "conftest sets 8 fake CPU devices"
  one, m1, _ = _resnet_distill_case(1)
  eight, m8, placed = _resnet_distill_case(8)
  assert len(placed.params["head"]["kernel"].sharding.device_set) == 8
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5,
                                                       atol=1e-5),
               one.params, eight.params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5,
                                                       atol=1e-5),
               one.model_state, eight.model_state)
  for a, b in zip(m1, m8):
    for k in a:
      np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-6)


def test_put_batch_rejects_indivisible_batch():
  mesh = jtrain.make_data_mesh(8)
  with pytest.raises(ValueError, match=r"batch array 'x' has 12 examples"):
    jtrain.put_batch({"x": np.zeros((12, 3))}, mesh)
  with pytest.raises(ValueError, match=r"--num_devices=99"):
    jtrain.make_data_mesh(99)


# ---------------------------------------------------- checkpoints and loop


def _loop_run(workdir, num_steps, *, checkpoint_every=0, stop_at=None,
              eval_every=0, after_eval=None):
  """Trains an MLP on digits for `num_steps`, optionally stopping early."""
  ds = jdata.load_digits(as_images=False)
  model, params, ms = jtrain.FunctionalModel.split(create_model(
      "mlp", num_classes=10, input_shape=(64,), rngs=nnx.Rngs(0),
      hidden_sizes=(32,)))
  mesh = jtrain.make_data_mesh(8)
  tx = jtrain.make_optimizer("adamw", jtrain.make_schedule(
      1e-2, schedule="cosine", num_steps=num_steps, warmup_steps=3),
      weight_decay=1e-4)
  state = jtrain.TrainState.create(params, ms, tx, 0)
  if after_eval is not None:
    state = state.replace(loss_state={"accuracy_sum": jnp.zeros(())})
  state = jtrain.replicate(state, mesh)
  ckpt = jtrain.Checkpointer(str(workdir), max_to_keep=2)
  if ckpt.latest_step() is not None:
    state = ckpt.restore(state)
  step = jtrain.compile_step(jtrain.make_train_step(model, tx), mesh)
  batches = jdata.TrainBatches(ds.train, 64, seed=5)
  eval_step = jtrain.compile_step(jtrain.make_eval_step(model), mesh,
                                  donate_state=False)
  logs = []
  state, summary = jtrain.train_loop(
      state, step, batches, mesh, num_steps=stop_at or num_steps,
      log_every=1000, evaluate_fn=lambda s: jtrain.evaluate(
          eval_step, s.params, s.model_state, ds.test, batch_size=64,
          mesh=mesh),
      checkpointer=ckpt, checkpoint_every=checkpoint_every,
      writer=jtrain.MetricsWriter(str(workdir)), log=logs.append,
      eval_every=eval_every, after_eval=after_eval)
  ckpt.close()
  return jax.device_get(state), summary


def test_resume_from_checkpoint_is_bitwise_identical(tmp_path):
  # 48 steps on 8 devices also exercises the loop's periodic host sync: with
  # no sync, ~40 queued steps with collectives abort the process on CPU.
  full, full_summary = _loop_run(tmp_path / "full", 48)
  _loop_run(tmp_path / "split", 48, checkpoint_every=10, stop_at=25)
  resumed, summary = _loop_run(tmp_path / "split", 48)
  assert summary["start_step"] == 25 and summary["steps_run"] == 23
  for a, b in zip(jax.tree.leaves(full), jax.tree.leaves(resumed)):
    np.testing.assert_array_equal(a, b)
  assert summary["test"] == full_summary["test"]
  assert full_summary["test"]["count"] == len(jdata.load_digits().test)


def test_after_eval_updates_the_state_before_a_same_step_save(tmp_path):
  """An after_eval hook (DistiLLM's adaptive ratio) changes the state; an
  evaluation due at a checkpoint's step runs before the save, so a resumed
  run equals an uninterrupted one, hook updates included."""

  def hook(state, result):
    return state.replace(loss_state={
        "accuracy_sum": state.loss_state["accuracy_sum"]
        + result["accuracy"]})

  import shutil
  from jdistill.train.checkpoint import CHECKPOINT_SUBDIR
  kw = dict(eval_every=10, after_eval=hook)
  full, _ = _loop_run(tmp_path / "full", 30, **kw)
  _loop_run(tmp_path / "split", 30, checkpoint_every=10, stop_at=25, **kw)
  # Resume from the step-20 checkpoint, saved where an evaluation was due.
  shutil.rmtree(tmp_path / "split" / CHECKPOINT_SUBDIR / "25")
  resumed, summary = _loop_run(tmp_path / "split", 30, **kw)
  assert summary["start_step"] == 20
  for a, b in zip(jax.tree.leaves(full), jax.tree.leaves(resumed)):
    np.testing.assert_array_equal(a, b)
  # Evaluations at steps 10 and 20 (not the final one) were added.
  assert 0.5 < float(full.loss_state["accuracy_sum"]) <= 2.0


def test_metrics_jsonl_records_train_and_test(tmp_path):
  import json
  _loop_run(tmp_path, 20)
  records = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  assert {r["split"] for r in records} == {"train", "test"}
  assert records[-1]["step"] == 20 and "accuracy" in records[-1]
  assert any("steps_per_sec" in r for r in records)


def test_schedule_and_optimizer_errors():
  with pytest.raises(ValueError, match=r"--lr_schedule=linear"):
    jtrain.make_schedule(1e-3, schedule="linear", num_steps=10)
  with pytest.raises(ValueError, match=r"--warmup_steps=10 must be in"):
    jtrain.make_schedule(1e-3, schedule="cosine", num_steps=10,
                         warmup_steps=10)
  with pytest.raises(ValueError, match=r"--optimizer=lamb"):
    jtrain.make_optimizer("lamb", optax.constant_schedule(1.0))
  sched = jtrain.make_schedule(1.0, schedule="cosine", num_steps=10,
                               warmup_steps=2)
  np.testing.assert_allclose([sched(0), sched(2), sched(10)], [0, 1, 0],
                             atol=1e-6)


@pytest.mark.parametrize("num_devices", [1, 8])
def test_donating_a_replicated_state_keeps_the_callers_arrays(num_devices):
  model, params, ms = _linear_setup()
  params = jax.tree.map(jnp.asarray, params)  # Device arrays (device 0).
  tx = optax.sgd(0.1)
  mesh = jtrain.make_data_mesh(num_devices)
  step = jtrain.compile_step(jtrain.make_train_step(model, tx), mesh)
  batch = jtrain.put_batch({"x": np.ones((8, 6), np.float32),
                            "y": np.zeros(8, np.int32)}, mesh)
  for _ in range(2):  # A second state from the same params must still work.
    state = jtrain.replicate(jtrain.TrainState.create(params, ms, tx, 0), mesh)
    step(state, batch)
  np.asarray(params["dense"]["kernel"])  # Not deleted by the donation.


# ---------------------------------------------------------------- schedules


@pytest.mark.parametrize("kind", ["constant", "linear", "cosine"])
def test_value_schedules_match_closed_forms(kind):
  from jdistill.train.schedules import make_value_schedule
  sched = jax.jit(make_value_schedule(kind, 4.0, 1.0, num_steps=10))
  for step in (0, 3, 5, 10, 15):
    f = min(step / 10, 1.0)
    expected = {"constant": 4.0, "linear": 4.0 - 3.0 * f,
                "cosine": 1.0 + 3.0 * 0.5 * (1 + np.cos(np.pi * f))}[kind]
    np.testing.assert_allclose(sched(step), expected, rtol=1e-6)


def test_value_schedule_errors():
  from jdistill.train.schedules import make_value_schedule
  with pytest.raises(ValueError, match=r"--temperature_schedule=step: "):
    make_value_schedule("step", 1.0, 2.0, num_steps=5, name="temperature")
  with pytest.raises(ValueError, match=r"needs --kd_weight_end"):
    make_value_schedule("linear", 1.0, None, num_steps=5, name="kd_weight")


def test_objective_applies_schedules_at_the_given_step():
  rng = np.random.default_rng(2)
  zs, zt = jnp.asarray(rng.normal(size=(2, 5, 6)) * 2, jnp.float32)
  y = jnp.asarray(rng.integers(0, 6, 5))
  obj = jtrain.DistillObjective(
      loss="kd", temperature=4.0, temperature_schedule="linear",
      temperature_end=1.0, ce_weight=1.0, ce_weight_schedule="cosine",
      ce_weight_end=0.0, kd_weight=0.5, schedule_steps=10)
  total, parts = jax.jit(lambda s: obj(zs, zt, y, step=s))(5)
  np.testing.assert_allclose(parts["temperature"], 2.5, rtol=1e-6)
  np.testing.assert_allclose(parts["ce_weight"], 0.5, rtol=1e-6)
  kd = _np_kd(np.asarray(zs, np.float64), np.asarray(zt, np.float64),
              2.5).mean()
  ce = _np_ce(np.asarray(zs, np.float64), np.asarray(y)).mean()
  np.testing.assert_allclose(parts["kd"], kd, rtol=1e-5)
  np.testing.assert_allclose(total, 0.5 * ce + 0.5 * kd, rtol=1e-5)


def test_schedule_with_its_own_length_holds_its_end_value():
  # DKD's warm-up: kd weight 0 -> 1 over the first 10 of 100 steps.
  obj = jtrain.DistillObjective(
      loss="kd", kd_weight=0.0, kd_weight_schedule="linear", kd_weight_end=1.0,
      kd_weight_schedule_steps=10, temperature_schedule="linear",
      temperature_end=2.0, schedule_steps=100)
  zs = jnp.zeros((4, 3))
  y = jnp.zeros((4,), jnp.int32)
  weights = [float(obj(zs, zs, y, step=k)[1]["kd_weight"])
             for k in (0, 5, 10, 50)]
  np.testing.assert_allclose(weights, [0.0, 0.5, 1.0, 1.0], rtol=1e-6)
  # The temperature schedule keeps the default length (100 steps).
  np.testing.assert_allclose(obj(zs, zs, y, step=50)[1]["temperature"], 3.0,
                             rtol=1e-6)


def test_objective_adds_a_second_logit_loss():
  from tests.reference import numpy_pld_sinkhorn_mlkd as ref
  rng = np.random.default_rng(5)
  zs, zt = (rng.normal(size=(2, 12, 7)) * 3).astype(np.float32)
  y = rng.integers(0, 7, 12)
  mask = np.arange(12) < 10
  # SinKD's recipe: alpha * KD + (1 - alpha) * CE + beta * Sinkhorn.
  obj = jtrain.DistillObjective(
      loss="kd", temperature=4.0, ce_weight=0.3, kd_weight=0.7,
      aux_loss="sinkhorn", aux_weight=0.01, aux_temperature=2.0,
      aux_loss_kwargs=(("epsilon", 0.1), ("num_iters", 20.0)))
  total, parts = jax.jit(lambda a, b: obj(a, b, y, mask))(zs, zt)
  s64, t64 = np.asarray(zs, np.float64), np.asarray(zt, np.float64)
  kd = _np_kd(s64, t64, 4.0)[mask].mean()
  ce = _np_ce(s64, y)[mask].mean()
  aux = ref.sinkhorn(s64[mask], t64[mask], temperature=2.0, epsilon=0.1,
                     n_iters=20)
  np.testing.assert_allclose(parts["aux"], aux, rtol=1e-5)
  np.testing.assert_allclose(total, 0.3 * ce + 0.7 * kd + 0.01 * aux,
                             rtol=1e-5)
  # Without --aux_temperature the second loss follows the first's.
  obj = jtrain.DistillObjective(loss="kd", temperature=4.0, aux_loss="jsd",
                                aux_loss_kwargs=(("beta", 0.5),))
  _, parts = obj(zs, zt, y)
  np.testing.assert_allclose(
      parts["aux"], np.mean(losses.jsd(zs, zt, temperature=4.0, beta=0.5)),
      rtol=1e-6)


@pytest.mark.parametrize("kwargs, pattern", [
    (dict(aux_loss="kld"), r"--aux_loss=kld: unknown distillation loss"),
    (dict(aux_loss="taid"), r"--aux_loss=taid: TAID keeps a training state"),
    (dict(aux_loss="kd", aux_loss_kwargs=(("beta", 1.0),)),
     r"--aux_loss_kwargs: 'beta' is not a hyperparameter of loss 'kd'"),
    (dict(aux_loss_kwargs=(("beta", 1.0),)),
     r"--aux_loss_kwargs is set but --aux_loss is not"),
    (dict(aux_loss="kd", aux_temperature=0.0), r"--aux_temperature must be"),
    (dict(kd_weight_schedule_steps=-1), r"--kd_weight_schedule_steps must be"),
])
def test_objective_rejects_bad_second_loss_and_schedule(kwargs, pattern):
  with pytest.raises(ValueError, match=pattern):
    jtrain.DistillObjective(schedule_steps=10, **kwargs)


def test_taid_coefficient_lives_in_the_state_and_follows_its_schedule():
  student, params, ms = _linear_setup(seed=0)
  teacher, tparams, tms = _linear_setup(seed=1)
  tx = optax.sgd(0.5)
  obj = jtrain.DistillObjective(loss="taid", temperature=1.0, ce_weight=0.0,
                                loss_kwargs=(("t_start", 0.2),),
                                schedule_steps=10)
  step = jax.jit(jtrain.make_distill_step(student, teacher, tx, obj))
  state = jtrain.TrainState.create(params, ms, tx, 0,
                                   loss_state=obj.init_loss_state())
  rng = np.random.default_rng(0)
  batch = {"x": rng.normal(size=(8, 6)).astype(np.float32),
           "y": rng.integers(0, 4, 8).astype(np.int32)}
  tvars = {"params": tparams, "model_state": tms}
  ts, taid_state = [], losses.taid_init(t_start=0.2)
  for i in range(10):
    logits_s = np.asarray(student.apply(state.params, ms, batch["x"],
                                        train=False)[0])
    logits_t = np.asarray(teacher.apply(tparams, tms, batch["x"],
                                        train=False)[0])
    expected = losses.taid(logits_s, logits_t, t=taid_state.t).mean()
    state, m = step(state, tvars, batch)
    np.testing.assert_allclose(m["kd"], expected, rtol=1e-5)
    np.testing.assert_allclose(m["taid_t"], taid_state.t, rtol=1e-6)
    taid_state = losses.taid_update(taid_state, expected, i, num_steps=10,
                                    t_start=0.2)
    ts.append(float(state.loss_state["taid"].t))
  np.testing.assert_allclose(ts[-1], float(taid_state.t), rtol=1e-6)
  assert all(b >= a for a, b in zip(ts, ts[1:])) and ts[-1] >= 0.2 + 0.8 * 0.9
