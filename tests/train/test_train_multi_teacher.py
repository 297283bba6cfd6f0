"""The multi-teacher objective and step (`jdistill.train.multi_teacher`):
each combiner against the numpy reference of tests/reference, the
big_vision identity inside the step, one teacher reducing to the
single-teacher step, teacher dropping, feature heads per teacher, running
standardisation, learned weights and sharded teachers (8 fake CPU
devices)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from jdistill import train as jt
from jdistill.models import create_model
from jdistill.train import multi_teacher as mt
from tests.reference import numpy_teachers as ref

K, B, C = 3, 16, 10


def _logits(seed, scale=3.0):
  rng = np.random.default_rng(seed)
  s = rng.normal(size=(B, C)).astype(np.float32) * scale
  t = rng.normal(size=(K, B, C)).astype(np.float32) * scale
  y = rng.integers(0, C, size=B).astype(np.int32)
  return s, t, y


def _objective(combiner, loss="kd", temperature=2.0, **kw):
  base = jt.DistillObjective(loss=loss, temperature=temperature,
                             ce_weight=0.0, kd_weight=1.0, schedule_steps=10)
  return mt.MultiTeacherObjective.create(base, K, combiner=combiner, **kw)


def _kd(obj, s, t, y, params=None):
  _, parts, _ = obj(jnp.asarray(s), jnp.asarray(t), jnp.asarray(y),
                    combiner_params=params)
  return float(parts["kd"])


@pytest.mark.parametrize("combiner,weights", [
    ("mean_probs", None), ("mean_probs", (0.2, 0.3, 0.5)),
    ("confidence", "camkd"), ("entropy", "entropy"), ("best", "best"),
    ("learned", None)])
def test_probability_combiners_match_numpy(combiner, weights):
  s, t, y = _logits(1)
  kw = {"teacher_weights": weights} if isinstance(weights, tuple) else {}
  obj = _objective(combiner, **kw)
  w = {None: None, "camkd": ref.camkd_attention(list(t), y),
       "entropy": ref.entropy_softmax_weights(t, 2.0),
       "best": ref.best_teacher_weights(t, y)}.get(weights, weights)
  expected = ref.ensemble_kd(s, t, 2.0, w).mean()
  got = _kd(obj, s, t, y, obj.init_combiner_params())
  np.testing.assert_allclose(got, expected, rtol=2e-5)


def test_mean_logits_and_per_teacher_match_numpy():
  s, t, y = _logits(2)
  expected = ref.kd(s, ref.ensemble_logits(t, (1, 1, 2)), 2.0).mean()
  got = _kd(_objective("mean_logits", teacher_weights=(1, 1, 2)), s, t, y)
  np.testing.assert_allclose(got, expected, rtol=2e-5)
  expected = ref.multi_teacher_kd(s, t, 2.0, (1, 1, 2)).mean()
  got = _kd(_objective("per_teacher", teacher_weights=(1, 1, 2)), s, t, y)
  np.testing.assert_allclose(got, expected, rtol=2e-5)


def test_per_teacher_kd_has_the_gradient_of_the_probability_ensemble():
  # big_vision: KL averaged over teachers trains the student like KD from
  # the probability ensemble (documented in jdistill.losses.multi_teacher).
  s, t, y = _logits(3)

  def grad(combiner):
    obj = _objective(combiner, teacher_weights=(0.5, 0.2, 0.3))
    return jax.grad(lambda s: obj(s, jnp.asarray(t), jnp.asarray(y))[0])(
        jnp.asarray(s))

  np.testing.assert_allclose(grad("per_teacher"), grad("mean_probs"),
                             rtol=1e-4, atol=1e-6)


def test_weights_sum_to_one_and_extreme_bf16_logits_stay_finite():
  s, t, y = _logits(4, scale=1e4)
  for combiner in mt.COMBINERS:
    obj = _objective(combiner)
    params = obj.init_combiner_params()
    loss, parts, combined = obj(jnp.asarray(s, jnp.bfloat16),
                                jnp.asarray(t, jnp.bfloat16), jnp.asarray(y),
                                combiner_params=params)
    total = sum(float(parts[f"teacher_weight{k}"]) for k in range(K))
    assert abs(total - 1) < 1e-5, (combiner, total)
    assert np.isfinite(float(loss)) and np.all(np.isfinite(combined)), combiner
    g = jax.grad(lambda s: obj(s, jnp.asarray(t), jnp.asarray(y),
                               combiner_params=params)[0])(jnp.asarray(s))
    assert np.all(np.isfinite(g)), combiner


def test_learned_weights_follow_the_labels_not_the_student():
  s, t, y = _logits(5)
  t[1] = np.eye(C, dtype=np.float32)[y] * 8  # Teacher 1 is always right.
  obj = _objective("learned")
  params = obj.init_combiner_params()

  def parts_of(params):
    return obj(jnp.asarray(s), jnp.asarray(t), jnp.asarray(y),
               combiner_params=params)[1]

  # The student's loss does not reach the weights (stop_gradient) ...
  g_kd = jax.grad(lambda p: parts_of(p)["kd"])(params)
  assert not np.any(np.asarray(g_kd["teacher_weight_logits"]))
  # ... the ensemble's label NLL does, and matches numpy.
  w = jax.nn.softmax(params["teacher_weight_logits"])
  p = ref.ensemble_probs(t, 1.0, np.asarray(w))
  nll = -np.log(p[np.arange(B), y]).mean()
  np.testing.assert_allclose(float(parts_of(params)["ensemble_nll"]), nll,
                             rtol=1e-5)
  g = jax.grad(lambda p: parts_of(p)["ensemble_nll"])(params)
  assert int(np.argmin(g["teacher_weight_logits"])) == 1  # Grows teacher 1.


def test_masked_examples_do_not_count():
  s, t, y = _logits(6)
  mask = np.arange(B) < 10
  for combiner in ("mean_probs", "confidence", "per_teacher"):
    obj = _objective(combiner)
    full = obj(jnp.asarray(s[:10]), jnp.asarray(t[:, :10]),
               jnp.asarray(y[:10]))[0]
    junk_s, junk_t = s.copy(), t.copy()
    junk_s[10:], junk_t[:, 10:] = 1e4, -1e4
    masked = obj(jnp.asarray(junk_s), jnp.asarray(junk_t), jnp.asarray(y),
                 jnp.asarray(mask))[0]
    np.testing.assert_allclose(masked, full, rtol=1e-5)


def test_teacher_dropping_keeps_a_teacher_and_the_worst_matched_one():
  s, t, y = _logits(7)
  obj = _objective("mean_probs", drop_rate=0.9)
  per_teacher = np.stack([ref.kd(s, t[k], 2.0) for k in range(K)])
  for seed in range(5):
    keep = np.asarray(obj.keep_mask(jax.random.key(seed), jnp.asarray(s),
                                    jnp.asarray(t), 2.0))
    assert keep.shape == (K, B) and keep.any(axis=0).all()
    assert keep[np.argmax(per_teacher, 0), np.arange(B)].all()
  # With dropping, the best combiner never loses every teacher of an example.
  obj = _objective("best", drop_rate=0.9)
  for seed in range(5):
    loss, parts, _ = obj(jnp.asarray(s), jnp.asarray(t), jnp.asarray(y),
                         key=jax.random.key(seed))
    assert np.isfinite(float(loss))
    assert 1 <= float(parts["teachers_kept"]) <= K
  with pytest.raises(ValueError, match="needs a PRNG key"):
    obj(jnp.asarray(s), jnp.asarray(t), jnp.asarray(y))


def test_options_are_checked():
  base = jt.DistillObjective()
  with pytest.raises(ValueError, match="--combiner=median: expected one of"):
    mt.MultiTeacherObjective.create(base, 2, combiner="median")
  with pytest.raises(ValueError, match="expected 3 non-negative numbers"):
    mt.MultiTeacherObjective.create(base, 3, teacher_weights=(1.0, 2.0))
  with pytest.raises(ValueError, match="computes its own weights"):
    mt.MultiTeacherObjective.create(base, 2, combiner="confidence",
                                    teacher_weights=(1.0, 2.0))
  with pytest.raises(ValueError, match="--teacher_drop_rate=1.0"):
    mt.MultiTeacherObjective.create(base, 2, drop_rate=1.0)
  obj = _objective("mean_probs")
  s, t, y = _logits(8)
  with pytest.raises(ValueError, match=r"expected \[3 teachers"):
    obj(jnp.asarray(s), jnp.asarray(t[:2]), jnp.asarray(y))
  with pytest.raises(ValueError, match="must predict the same classes"):
    obj(jnp.asarray(s[:, :7]), jnp.asarray(t), jnp.asarray(y))


# --- The step, with real models. --------------------------------------------


def _split(name, seed, **kw):
  return jt.FunctionalModel.split(create_model(
      name, num_classes=C, input_shape=(40,), rngs=nnx.Rngs(seed), **kw))


@pytest.fixture(scope="module")
def models():
  teachers = [_split("cnn1d", s, channels=(8, 8)) for s in range(K)]
  student = _split("mlp", 7, hidden_sizes=(32,))
  rng = np.random.default_rng(0)
  batch = {"x": jnp.asarray(rng.normal(size=(B, 40)), jnp.float32),
           "y": jnp.asarray(rng.integers(0, C, B), jnp.int32)}
  return teachers, student, batch


def _state(student, tx, obj, projector_params=None, teacher_shapes=None,
           feature_states=None):
  _, params, model_state = student
  return jt.TrainState.create(
      params, model_state, tx, 0,
      loss_state=obj.init_loss_state(feature_states, teacher_shapes),
      projector_params=projector_params,
      combiner_params=obj.init_combiner_params())


def test_one_teacher_is_the_single_teacher_step(models):
  teachers, student, batch = models
  tx = optax.adam(1e-2)
  term = jt.FeatureTerm("hint", "penultimate", "penultimate",
                        projector="linear")
  base = jt.DistillObjective(loss="kd", temperature=4.0, schedule_steps=10,
                             feature_terms=(term,))
  obj = mt.MultiTeacherObjective.create(base, 1)
  t_model, t_params, t_state = teachers[0]
  s_shapes = jt.feature_shapes(student[0], student[1], student[2], (40,))
  t_shapes = jt.feature_shapes(t_model, t_params, t_state, (40,))
  proj, pp = jt.build_projectors((term,), s_shapes, t_shapes)
  single = jax.jit(jt.make_distill_step(student[0], t_model, tx, base, proj))
  ensemble, tv = jt.TeacherEnsemble.create([teachers[0]])
  multi = jax.jit(mt.make_multi_teacher_distill_step(student[0], ensemble, tx,
                                                     obj, proj))
  a = jt.TrainState.create(student[1], student[2], tx, 0,
                           projector_params=pp)
  b = _state(student, tx, obj, pp)
  for _ in range(3):
    a, ma = single(a, {"params": t_params, "model_state": t_state}, batch)
    b, mb = multi(b, tv, batch)
  for key in ("loss", "kd", "ce", "accuracy", "teacher_accuracy"):
    np.testing.assert_allclose(mb[key], ma[key], rtol=2e-5, atol=1e-6)
  np.testing.assert_allclose(
      mb["hint:penultimate:penultimate@0"], ma["hint:penultimate:penultimate"],
      rtol=2e-5)
  for x, z in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
    np.testing.assert_allclose(x, z, rtol=1e-4, atol=1e-6)


def test_feature_heads_per_teacher_and_running_standardisation(models):
  teachers, student, batch = models
  tx = optax.adam(1e-3)
  term = jt.FeatureTerm("hint", "penultimate", "penultimate", weight=3.0,
                        projector="linear")
  base = jt.DistillObjective(schedule_steps=10, feature_terms=(term,))
  obj = mt.MultiTeacherObjective.create(base, K, drop_rate=0.5,
                                        feature_standardize="running")
  terms = obj.objective.feature_terms
  assert [t.teacher_tap for t in terms] == [
      "penultimate@0", "penultimate@1", "penultimate@2"]
  assert all(t.weight == 1.0 for t in terms)  # 3.0 over 3 teachers.
  t_shapes = mt.per_teacher_shapes(
      [jt.feature_shapes(m, p, s, (40,)) for m, p, s in teachers])
  s_shapes = jt.feature_shapes(student[0], student[1], student[2], (40,))
  proj, pp = jt.build_projectors(terms, s_shapes, t_shapes)
  assert len(pp["layers"]) == K  # One head per teacher.
  ensemble, tv = jt.TeacherEnsemble.create(teachers)
  step = jax.jit(mt.make_multi_teacher_distill_step(student[0], ensemble, tx,
                                                    obj, proj))
  state = _state(student, tx, obj, pp, t_shapes)
  for _ in range(2):
    state, metrics = step(state, tv, batch)
  assert 1 <= float(metrics["teachers_kept"]) <= K
  for k, (m, p, s) in enumerate(teachers):
    feats = np.asarray(m.apply(p, s, batch["x"], train=False)[1][
        "penultimate"], np.float64)
    mean, var, n = ref.running_stats_exact([feats[None], feats[None]])
    stats = state.loss_state["teacher_stats"][str(k)]
    np.testing.assert_allclose(stats.mean, mean, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(stats.var, var, rtol=1e-4, atol=1e-5)
    assert float(stats.count[0]) == n


def test_learned_weights_are_trained_and_stacked_teachers_match_the_loop(
    models):
  teachers, student, batch = models
  tx = optax.adam(0.1)
  obj = mt.MultiTeacherObjective.create(
      jt.DistillObjective(schedule_steps=10), K, combiner="learned")
  ensemble, tv = jt.TeacherEnsemble.create(teachers)
  step = jax.jit(mt.make_multi_teacher_distill_step(student[0], ensemble, tx,
                                                    obj))
  state = _state(student, tx, obj)
  state, metrics = step(state, tv, batch)
  alpha = np.asarray(state.combiner_params["teacher_weight_logits"])
  assert np.any(alpha != 0)
  np.testing.assert_allclose(
      sum(float(metrics[f"teacher_weight{k}"]) for k in range(K)), 1.0,
      rtol=1e-6)
  loop = jax.jit(ensemble.apply_loop)(tv, batch["x"])
  for k in range(K):
    acc = np.mean(np.argmax(loop[k], -1) == np.asarray(batch["y"]))
    np.testing.assert_allclose(metrics[f"teacher{k}_accuracy"], acc)


def test_sharded_teachers_give_the_replicated_step(models):
  teachers, student, batch = models
  tx = optax.adam(1e-2)
  obj = mt.MultiTeacherObjective.create(
      jt.DistillObjective(schedule_steps=10), 4, combiner="confidence")
  four = teachers + [_split("cnn1d", 11, channels=(8, 8))]
  ensemble, tv = jt.TeacherEnsemble.create(four)
  fn = mt.make_multi_teacher_distill_step(student[0], ensemble, tx, obj)
  ref_state, ref_metrics = jax.jit(fn)(_state(student, tx, obj), tv, batch)

  mesh = jt.make_data_teacher_mesh(8, teacher_shards=4)
  assert dict(mesh.shape) == {"data": 2, "teacher": 4}
  placed = jt.shard_teachers(tv, mesh, jt.TEACHER_AXIS)
  assert placed[0]["params"]["head"]["kernel"].sharding.spec == P("teacher")
  sharded = mt.make_multi_teacher_distill_step(
      student[0], ensemble.sharded(mesh, jt.TEACHER_AXIS), tx, obj)
  step = jt.compile_step(sharded, mesh)
  state, metrics = step(jt.replicate(_state(student, tx, obj), mesh), placed,
                        jt.put_batch(jax.device_get(batch), mesh))
  for key in ("loss", "kd", "teacher_accuracy", "teacher3_accuracy"):
    np.testing.assert_allclose(metrics[key], ref_metrics[key], rtol=1e-5,
                               atol=1e-6)
  for x, z in zip(jax.tree.leaves(ref_state.params),
                  jax.tree.leaves(state.params)):
    np.testing.assert_allclose(x, z, rtol=1e-4, atol=1e-6)


def test_mismatched_teachers_are_refused(models):
  teachers, student, _ = models
  with pytest.raises(ValueError, match="has 3 teachers but the objective "
                     "expects 2"):
    ensemble, _ = jt.TeacherEnsemble.create(teachers)
    mt.make_multi_teacher_distill_step(
        student[0], ensemble, optax.adam(1e-3),
        mt.MultiTeacherObjective.create(jt.DistillObjective(), 2))
  with pytest.raises(ValueError, match="names no teacher"):
    term = jt.FeatureTerm("hint", "penultimate", "penultimate")
    mt.MultiTeacherObjective(
        dataclasses.replace(jt.DistillObjective(), feature_terms=(term,)), 2)


def test_per_teacher_dropping_keeps_the_label_loss_on_every_example():
  s, t, y = _logits(9)
  base = jt.DistillObjective(loss="kd", temperature=2.0, ce_weight=0.7,
                             kd_weight=1.0, schedule_steps=10)
  obj = mt.MultiTeacherObjective.create(base, K, combiner="per_teacher",
                                        drop_rate=0.5)
  key = jax.random.key(3)
  loss, parts, _ = obj(jnp.asarray(s), jnp.asarray(t), jnp.asarray(y),
                       key=key)
  keep = np.asarray(obj.keep_mask(key, jnp.asarray(s), jnp.asarray(t), 2.0))
  ce = -ref.log_softmax(s)[np.arange(B), y]
  kd = np.mean([ref.kd(s[keep[k]], t[k][keep[k]], 2.0).mean()
                for k in range(K)])
  np.testing.assert_allclose(parts["ce"], ce.mean(), rtol=1e-5)
  np.testing.assert_allclose(parts["kd"], kd, rtol=1e-5)
  np.testing.assert_allclose(loss, 0.7 * ce.mean() + kd, rtol=1e-5)
