"""Recipes in the steps: augmentation inside the train and distill steps
(function matching and independent views), mixed-target cross-entropy,
and self-distillation from an EMA teacher."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jdistill import augment as jaug
from jdistill import train as jtrain
from jdistill.models import create_model
from flax import nnx
from tests.reference import numpy_logit as ref


def _softmax(z):
  z = z - z.max(-1, keepdims=True)
  e = np.exp(z)
  return e / e.sum(-1, keepdims=True)


def _mlp(seed, hidden=(16,), classes=5, features=12):
  model = create_model("mlp", num_classes=classes, input_shape=(features,),
                       rngs=nnx.Rngs(seed), hidden_sizes=list(hidden))
  return jtrain.FunctionalModel.split(model)


def _batch(seed=0, n=16, features=12, classes=5, mask=False):
  rng = np.random.default_rng(seed)
  batch = {"x": jnp.asarray(rng.normal(size=(n, features)), jnp.float32),
           "y": jnp.asarray(rng.integers(0, classes, n), jnp.int32)}
  if mask:
    batch["mask"] = jnp.asarray(rng.random(n) > 0.3)
  return batch


def _close(a, b, **kw):
  jax.tree.map(lambda u, v: np.testing.assert_allclose(
      np.asarray(u, np.float64), np.asarray(v, np.float64), **kw), a, b)


# ------------------------------------------------------- mixed-target CE


def test_cross_entropy_with_label_mix_is_the_mixed_target_ce():
  rng = np.random.default_rng(0)
  z = rng.normal(size=(7, 6)) * 4
  y, y2 = rng.integers(0, 6, 7), rng.integers(0, 6, 7)
  lam = rng.random(7)
  logp = np.log(_softmax(z))
  expected = -(lam * logp[np.arange(7), y] + (1 - lam) * logp[np.arange(7), y2])
  got = jtrain.cross_entropy(jnp.asarray(z, jnp.float32), jnp.asarray(y),
                             label_mix=(jnp.asarray(y2), jnp.asarray(lam)))
  np.testing.assert_allclose(got, expected, rtol=1e-5)
  # With label smoothing the smoothing applies to the mixed target.
  eps = 0.1
  target = (lam[:, None] * np.eye(6)[y] + (1 - lam[:, None]) * np.eye(6)[y2])
  target = target * (1 - eps) + eps / 6
  got = jtrain.cross_entropy(jnp.asarray(z, jnp.float32), jnp.asarray(y),
                             label_smoothing=eps,
                             label_mix=(jnp.asarray(y2), jnp.asarray(lam)))
  np.testing.assert_allclose(got, -(target * logp).sum(-1), rtol=1e-5)


def test_objective_with_label_mix_uses_dominant_labels_for_dkd():
  rng = np.random.default_rng(1)
  zs, zt = (jnp.asarray(rng.normal(size=(8, 5)) * 3, jnp.float32)
            for _ in range(2))
  y = jnp.asarray(rng.integers(0, 5, 8))
  y2 = jnp.asarray(rng.integers(0, 5, 8))
  lam = jnp.asarray([0.9, 0.1, 0.5, 0.3, 0.7, 1.0, 0.0, 0.49], jnp.float32)
  obj = jtrain.DistillObjective(loss="dkd")
  _, mixed = obj(zs, zt, y, label_mix=(y2, lam))
  dominant = jnp.where(lam >= 0.5, y, y2)
  _, plain = obj(zs, zt, dominant)
  np.testing.assert_allclose(mixed["kd"], plain["kd"], rtol=1e-6)
  ce = jtrain.cross_entropy(zs, y, label_mix=(y2, lam)).mean()
  np.testing.assert_allclose(mixed["ce"], ce, rtol=1e-6)


def test_objective_label_mix_with_extreme_logits_and_bfloat16_is_finite():
  zs = jnp.asarray([[1e4, -1e4, 0.0], [-3e4, 2e4, 1.0]], jnp.bfloat16)
  zt = jnp.asarray([[-1e4, 1e4, 0.0], [3e4, -2e4, 1.0]], jnp.bfloat16)
  y, y2 = jnp.asarray([0, 1]), jnp.asarray([1, 0])
  lam = jnp.asarray([0.3, 0.8])
  obj = jtrain.DistillObjective(loss="kd", temperature=2.0)
  total, parts = obj(zs, zt, y, label_mix=(y2, lam))
  assert np.isfinite(float(total)) and parts["ce"].dtype == jnp.float32
  grads = jax.grad(lambda z: obj(z, zt, y, label_mix=(y2, lam))[0])(
      zs.astype(jnp.float32))
  assert np.all(np.isfinite(grads))


# ------------------------------------------------- augmentation in the steps


def _noise_and_mixup():
  return jaug.parse_augmentation("noise:0.5,mixup:1.0", input_shape=(12,))


def test_train_step_applies_the_augmentation_with_the_step_key():
  model, params, model_state = _mlp(0)
  tx = optax.sgd(0.1)
  state = jtrain.TrainState.create(params, model_state, tx, seed=3)
  state = state.replace(step=jnp.asarray(5, jnp.int32))
  batch = _batch(mask=True)
  aug = _noise_and_mixup()
  new, metrics = jtrain.make_train_step(model, tx, augment=aug)(state, batch)
  # The same step on the batch augmented outside with the same key.
  outside = aug(jtrain.augment_key(state), batch)
  assert "y_mix" in outside
  ref, ref_metrics = jtrain.make_train_step(model, tx)(state, outside)
  _close(new.params, ref.params, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(metrics["loss"], ref_metrics["loss"], rtol=1e-6)
  # ... whose loss is the mixed-target CE, in numpy.
  logits = np.asarray(model.apply(params, model_state, outside["x"],
                                  train=True)[0], np.float64)
  logp = np.log(_softmax(logits))
  lam = np.asarray(outside["mix_lambda"])
  y, y2 = np.asarray(outside["y"]), np.asarray(outside["y_mix"])
  ce = -(lam * logp[np.arange(16), y] + (1 - lam) * logp[np.arange(16), y2])
  m = np.asarray(batch["mask"])
  np.testing.assert_allclose(metrics["loss"], ce[m].mean(), rtol=1e-5)
  # Another step draws another view.
  later = state.replace(step=jnp.asarray(6, jnp.int32))
  assert not np.allclose(aug(jtrain.augment_key(later), batch)["x"],
                         outside["x"])


@pytest.mark.parametrize("views", ["shared", "independent"])
def test_distill_step_feeds_teacher_the_view_it_should(views):
  student, params, model_state = _mlp(0)
  teacher, tparams, tstate = _mlp(1, hidden=(32,))
  tvars = {"params": tparams, "model_state": tstate}
  tx = optax.sgd(0.1)
  objective = jtrain.DistillObjective(loss="kd", temperature=2.0,
                                      ce_weight=0.5, kd_weight=1.0)
  state = jtrain.TrainState.create(params, model_state, tx, seed=1)
  batch = _batch(2, mask=True)
  aug = _noise_and_mixup()
  step = jtrain.make_distill_step(student, teacher, tx, objective,
                                  augment=aug, augment_views=views)
  new, metrics = jax.jit(step)(state, tvars, batch)
  student_view = aug(jtrain.augment_key(state), batch)
  teacher_x = (student_view["x"] if views == "shared" else
               aug(jtrain.augment_key(state, 1), batch)["x"])
  # Reference: no augmentation in the step, views given explicitly.
  ref_batch = {**student_view, "teacher_x": teacher_x}
  ref, ref_metrics = jtrain.make_distill_step(student, teacher, tx,
                                              objective)(state, tvars,
                                                         ref_batch)
  _close(new.params, ref.params, rtol=1e-6, atol=1e-7)
  # The KD term, in numpy, against the teacher on teacher_x.
  zs = np.asarray(student.apply(params, model_state, student_view["x"],
                                train=True)[0], np.float64)
  zt = np.asarray(teacher.apply(tparams, tstate, teacher_x,
                                train=False)[0], np.float64)
  ps, pt = _softmax(zs / 2), _softmax(zt / 2)
  kd = 4 * np.sum(pt * (np.log(pt) - np.log(ps)), -1)
  m = np.asarray(batch["mask"])
  np.testing.assert_allclose(metrics["kd"], kd[m].mean(), rtol=1e-5)
  if views == "independent":
    assert not np.allclose(teacher_x, student_view["x"])


def _kd_setup():
  """An MLP student and teacher, SGD, KD with ce_weight 0.3, the state."""
  student, params, model_state = _mlp(0)
  teacher, tparams, tstate = _mlp(1)
  tvars = {"params": tparams, "model_state": tstate}
  tx = optax.sgd(0.1)
  objective = jtrain.DistillObjective(loss="kd", ce_weight=0.3)
  state = jtrain.TrainState.create(params, model_state, tx, seed=1)
  return student, teacher, tvars, tx, objective, state


def test_distill_step_with_augmentation_and_grad_accumulation_is_exact():
  student, teacher, tvars, tx, objective, state = _kd_setup()
  batch = _batch(3)
  aug = _noise_and_mixup()
  one, m1 = jtrain.make_distill_step(student, teacher, tx, objective,
                                     augment=aug)(state, tvars, batch)
  two, m2 = jtrain.make_distill_step(student, teacher, tx, objective,
                                     augment=aug, grad_accum_steps=4)(
                                         state, tvars, batch)
  _close(one.params, two.params, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(m1["loss"], m2["loss"], rtol=1e-5)


def test_cached_teacher_logits_and_augmentation_refuse_to_mix():
  student, params, model_state = _mlp(0)
  tx = optax.sgd(0.1)
  state = jtrain.TrainState.create(params, model_state, tx, seed=1)
  batch = {**_batch(), "teacher_logits": jnp.zeros((16, 5))}
  step = jtrain.make_distill_step(student, student, tx,
                                  jtrain.DistillObjective(),
                                  augment=_noise_and_mixup())
  with pytest.raises(ValueError, match="not augmented"):
    step(state, None, batch)
  with pytest.raises(ValueError, match="augment_views"):
    jtrain.make_distill_step(student, student, tx, jtrain.DistillObjective(),
                             augment_views="both")


def test_distill_step_augmentation_on_a_mesh_equals_one_device():
  student, teacher, tvars, tx, objective, state = _kd_setup()
  batch = _batch(4)
  step = jtrain.make_distill_step(student, teacher, tx, objective,
                                  augment=_noise_and_mixup())
  ref, ref_metrics = jax.jit(step)(state, tvars, batch)
  mesh = jtrain.make_data_mesh(8)
  compiled = jtrain.compile_step(step, mesh, donate_state=False)
  new, metrics = compiled(jtrain.replicate(state, mesh),
                          jtrain.replicate(tvars, mesh),
                          jtrain.put_batch(jax.device_get(batch), mesh))
  _close(new.params, ref.params, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(metrics["loss"], ref_metrics["loss"], rtol=1e-5)


# ------------------------------------------------------------ EMA teacher


def test_ema_decay_at_matches_the_formula():
  for step in (0, 1, 5, 100, 10_000):
    np.testing.assert_allclose(
        jtrain.ema_decay_at(0.999, step), min(0.999, (1 + step) / (10 + step)),
        rtol=1e-6)
    np.testing.assert_allclose(jtrain.ema_decay_at(0.9, step, warmup=False),
                               0.9, rtol=1e-7)


F32_EPS = float(np.finfo(np.float32).eps)


def _kd64(student_logits, teacher_logits, temperature):
  """(batch-mean KD by the float64 formula, the magnitude of its terms).

  KD = T**2 mean_b sum_c p_t (log p_t - log p_s) is a small difference of
  terms of size T**2 sum_c p_t (|log p_t| + |log p_s|): float32 rounds
  each term, so its error scales with that magnitude, not with KD."""
  s = np.asarray(student_logits, np.float64) / temperature
  t = np.asarray(teacher_logits, np.float64) / temperature
  log_ps, log_pt = ref.log_softmax(s), ref.log_softmax(t)
  scale = np.mean(np.sum(np.exp(log_pt) * (np.abs(log_pt) + np.abs(log_ps)),
                         -1))
  return (np.mean(ref.kd(student_logits, teacher_logits, temperature)),
          temperature ** 2 * scale)


def _ema_error(got, average, new, decay):
  """Largest ``|got - (d a + (1 - d) n)|`` over the leaves, in units of
  float32 rounding of the two terms (``eps32 (d |a| + (1 - d) |n|)``),
  with the expectation in float64."""
  worst = 0.0
  for g, a, n in zip(jax.tree.leaves(got), jax.tree.leaves(average),
                     jax.tree.leaves(new)):
    g, a, n = (np.asarray(x, np.float64) for x in (g, a, n))
    want = decay * a + (1 - decay) * n
    room = F32_EPS * (decay * np.abs(a) + (1 - decay) * np.abs(n))
    err = np.abs(g - want)
    assert np.all((err == 0) | (room > 0)), "a change where none is allowed"
    worst = max(worst, float(np.max(err / np.where(room > 0, room, 1.0),
                                    initial=0.0)))
  return worst


def test_ema_self_distill_step_follows_the_ema_recurrence():
  """Each step is the plain distill step with the pre-update EMA as its
  teacher, followed by ``ema <- d ema + (1 - d) params`` with TF's warm-up
  ``d``. Checked one step at a time from the same inputs, so that float32
  rounding (which differs by CPU: FMA contraction, vector widths) cannot
  compound over steps, with tolerances from the magnitudes compared:

  * KD against the float64 formula on the student's and the EMA's logits,
    within 16 eps32 of the magnitude of its terms (`_kd64`); Adam at 0.1
    makes the EMA lag the student, so KD is > 50 times that bound and a
    wrong teacher (the student itself, the updated EMA) is caught;
  * the EMA against the float64 recurrence within 4 eps32 of its two terms,
    elementwise (`_ema_error`); the same check with the decay lacking its
    warm-up must fail, as a wrong recurrence must;
  * the student's update against the plain step's, within 4 eps32 of the
    parameters plus 1e-4 of a step (lr).
  """
  student, params, model_state = _mlp(0)
  lr, temperature, decay = 0.1, 2.0, 0.8
  tx = optax.adam(lr)
  objective = jtrain.DistillObjective(loss="kd", temperature=temperature,
                                      ce_weight=1.0, kd_weight=1.0)
  state = jtrain.TrainState.create(params, model_state, tx, seed=1, ema=True)
  np.testing.assert_array_equal(
      jax.tree.leaves(state.ema["params"])[0], jax.tree.leaves(params)[0])
  step = jax.jit(jtrain.make_ema_self_distill_step(
      student, tx, objective, ema_decay=decay))
  plain = jax.jit(jtrain.make_distill_step(student, student, tx, objective))
  logits = jax.jit(lambda p, m, x: student.apply(p, m, x, train=False)[0])
  for i in range(4):
    batch = _batch(10 + i)
    before = state
    state, metrics = step(state, batch)
    d = min(decay, (1 + i) / (10 + i))
    np.testing.assert_allclose(metrics["ema_decay"], d, rtol=1e-6)

    kd, scale = _kd64(
        logits(before.params, before.model_state, batch["x"]),
        logits(before.ema["params"], before.ema["model_state"], batch["x"]),
        temperature)
    tol = 16 * F32_EPS * scale
    assert abs(float(metrics["kd"]) - kd) <= tol, (i, metrics["kd"], kd, tol)
    if i > 0:  # At step 0 the EMA is the student itself.
      assert kd > 50 * tol, (i, kd, tol)

    ref, _ = plain(before, before.ema, batch)
    jax.tree.map(lambda u, v: np.testing.assert_array_less(
        np.abs(np.asarray(u, np.float64) - np.asarray(v, np.float64)),
        4 * F32_EPS * np.abs(np.asarray(v, np.float64)) + 1e-4 * lr),
        state.params, ref.params)

    new = {"params": state.params, "model_state": state.model_state}
    assert _ema_error(state.ema, before.ema, new, d) <= 4, i
    if d != decay:
      assert _ema_error(state.ema, before.ema, new, decay) > 1e3, i


def test_ema_step_needs_an_ema_and_a_valid_decay():
  student, params, model_state = _mlp(0)
  tx = optax.sgd(0.1)
  state = jtrain.TrainState.create(params, model_state, tx, seed=1)
  with pytest.raises(ValueError, match="ema_decay"):
    jtrain.make_ema_self_distill_step(student, tx, jtrain.DistillObjective(),
                                      ema_decay=1.0)
  step = jtrain.make_ema_self_distill_step(student, tx,
                                           jtrain.DistillObjective(),
                                           ema_decay=0.9)
  with pytest.raises(ValueError, match="ema=True"):
    step(state, _batch())


def test_ema_is_checkpointed_and_restored(tmp_path):
  student, params, model_state = _mlp(0)
  tx = optax.adam(1e-2)
  state = jtrain.TrainState.create(params, model_state, tx, seed=1, ema=True)
  step = jax.jit(jtrain.make_ema_self_distill_step(
      student, tx, jtrain.DistillObjective(), ema_decay=0.5))
  for i in range(3):
    state, _ = step(state, _batch(i))
  checkpointer = jtrain.Checkpointer(str(tmp_path))
  checkpointer.save(state, force=True)
  checkpointer.wait()
  fresh = jtrain.TrainState.create(params, model_state, tx, seed=1, ema=True)
  restored = checkpointer.restore(fresh)
  checkpointer.close()
  _close(restored.ema, state.ema, rtol=0, atol=0)
  assert int(restored.step) == 3
