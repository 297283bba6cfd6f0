"""Gradient accumulation (``grad_accum_steps``) of the five update steps:
k micro-batches give the whole batch's step for per-example losses, errors
for a batch k does not divide, and memory that does not grow with k."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jdistill import train as jt
from jdistill.models import CausalLM, create_model
from jdistill.train import lm
from jdistill.train import multi_teacher as mt
from jdistill.train import step as jstep

C, D, B = 5, 12, 16
V, T, LB = 11, 6, 8
# Micro-batch i of k holds examples i, i + k, ...: with this mask micro-batch
# 1 is fully masked for k = 2 and micro-batches 1 and 3 for k = 4.
MASK = np.ones(B, bool)
MASK[1::2] = False
MASK[[0, 6]] = False
# SGD: the update is linear in the gradient (Adam's first step is about
# sign(g), which would amplify rounding in gradients near 0).
TX = optax.sgd(0.5)


def _split(name, seed, **kw):
  return jt.FunctionalModel.split(create_model(
      name, num_classes=C, input_shape=(D,), rngs=nnx.Rngs(seed), **kw))


@pytest.fixture(scope="module")
def mlps():
  rng = np.random.default_rng(0)
  batch = {"x": jnp.asarray(rng.normal(size=(B, D)), jnp.float32),
           "y": jnp.asarray(rng.integers(0, C, B), jnp.int32),
           "mask": jnp.asarray(MASK)}
  return (_split("mlp", 0, hidden_sizes=(16,)),
          [_split("mlp", s, hidden_sizes=(24,)) for s in (1, 2)], batch)


def _assert_same_step(out1, outk, *, rtol=2e-5, atol=2e-6):
  (s1, m1), (sk, mk) = out1, outk
  assert set(m1) == set(mk)
  for name in m1:
    np.testing.assert_allclose(mk[name], m1[name], rtol=rtol, atol=atol,
                               err_msg=name)
  for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(sk.params)):
    np.testing.assert_allclose(b, a, rtol=rtol, atol=atol)
  for a, b in zip(jax.tree.leaves(s1.opt_state), jax.tree.leaves(sk.opt_state)):
    np.testing.assert_allclose(b, a, rtol=rtol, atol=atol)
  assert int(sk.step) == int(s1.step)


def _run_k(make, args, ks=(1, 2, 4)):
  return {k: jax.jit(make(k))(*args) for k in ks}


def test_train_step(mlps):
  (model, params, model_state), _, batch = mlps
  state = jt.TrainState.create(params, model_state, TX, 0)
  steps = {k: jax.jit(jt.make_train_step(model, TX, label_smoothing=0.1,
                                         grad_accum_steps=k))
           for k in (1, 2, 4)}
  out = {k: step(state, batch) for k, step in steps.items()}
  assert float(out[1][1]["grad_norm"]) > 0
  for k in (2, 4):
    _assert_same_step(out[1], out[k])
  # No valid example at all: a zero step either way, no NaN.
  empty = {**batch, "mask": jnp.zeros(B, bool)}
  out = {k: step(state, empty) for k, step in steps.items()}
  assert float(out[1][1]["grad_norm"]) == 0.0
  _assert_same_step(out[1], out[4])


@pytest.mark.parametrize("loss,ks", [("kd", (1, 2, 4)), ("taid", (1, 4))])
def test_distill_step_with_a_feature_term(mlps, loss, ks):
  (model, params, model_state), teachers, batch = mlps
  teacher, tp, ts = teachers[0]
  term = jt.FeatureTerm("hint", "penultimate", "penultimate",
                        projector="linear", weight=0.5)
  obj = jt.DistillObjective(loss=loss, temperature=2.0, schedule_steps=10,
                            feature_terms=(term,))
  proj, pp = jt.build_projectors(
      (term,), jt.feature_shapes(model, params, model_state, (D,)),
      jt.feature_shapes(teacher, tp, ts, (D,)))
  state = jt.TrainState.create(params, model_state, TX, 0,
                               loss_state=obj.init_loss_state(),
                               projector_params=pp)
  tv = {"params": tp, "model_state": ts}
  out = _run_k(lambda k: jt.make_distill_step(model, teacher, TX, obj, proj,
                                              grad_accum_steps=k),
               (state, tv, batch), ks)
  for k in ks[1:]:
    _assert_same_step(out[1], out[k])
    # TAID's coefficient adapts once per step, from the step's KD loss.
    for a, b in zip(jax.tree.leaves(out[1][0].loss_state),
                    jax.tree.leaves(out[k][0].loss_state)):
      np.testing.assert_allclose(b, a, rtol=2e-5)


def test_distill_step_from_precomputed_teacher_logits(mlps):
  (model, params, model_state), _, batch = mlps
  rng = np.random.default_rng(3)
  batch = {**batch, "teacher_logits": jnp.asarray(rng.normal(size=(B, C)),
                                                  jnp.float32)}
  obj = jt.DistillObjective(loss="dkd", temperature=2.0)
  state = jt.TrainState.create(params, model_state, TX, 0)
  out = _run_k(lambda k: jt.make_distill_step(model, None, TX, obj,
                                              grad_accum_steps=k),
               (state, {}, batch), (1, 4))
  _assert_same_step(out[1], out[4])


@pytest.mark.parametrize("combiner,ks", [("confidence", (1, 2, 4)),
                                         ("per_teacher", (1, 4))])
def test_multi_teacher_step(mlps, combiner, ks):
  (model, params, model_state), teachers, batch = mlps
  obj = mt.MultiTeacherObjective.create(
      jt.DistillObjective(loss="kd", temperature=2.0, schedule_steps=10), 2,
      combiner=combiner)
  ensemble, tv = jt.TeacherEnsemble.create(teachers)
  state = jt.TrainState.create(params, model_state, TX, 0,
                               loss_state=obj.init_loss_state())
  out = _run_k(lambda k: mt.make_multi_teacher_distill_step(
      model, ensemble, TX, obj, grad_accum_steps=k), (state, tv, batch), ks)
  for k in ks[1:]:
    _assert_same_step(out[1], out[k])


@pytest.fixture(scope="module")
def lms():
  def split(dim, seed):
    # Initialised under jit: eagerly, CausalLM's init runs op by op (slow).
    make = lambda: CausalLM(V, dim=dim, depth=1, num_heads=2, max_len=T,
                            rngs=nnx.Rngs(seed))
    model = jt.FunctionalModel.split(nnx.eval_shape(make))[0]
    return (model,
            *jax.jit(lambda: jt.FunctionalModel.split(make())[1:])())
  rng = np.random.default_rng(1)
  # Micro-batch 1 of k = 2 (sequences 1, 3, 5, 7) and micro-batches 1 and 3
  # of k = 4 have no valid token.
  lengths = np.array([6, 0, 2, 0, 0, 3, 5, 0])
  batch = {"x": jnp.asarray(rng.integers(0, V, (LB, T)), jnp.int32),
           "y": jnp.asarray(rng.integers(0, V, (LB, T)), jnp.int32),
           "mask": jnp.asarray([1, 1, 1, 1, 0, 0, 1, 1], bool),
           "token_mask": jnp.asarray(np.arange(T)[None] < lengths[:, None])}
  return split(8, 0), split(12, 1), batch


def test_lm_train_step(lms):
  (model, params, model_state), _, batch = lms
  state = jt.TrainState.create(params, model_state, TX, 0)
  out = _run_k(lambda k: lm.make_lm_train_step(model, TX, grad_accum_steps=k),
               (state, batch), (1, 4))
  for k in (4,):
    _assert_same_step(out[1], out[k])


@pytest.mark.parametrize("kwargs,k", [
    # Online teacher, fused loss, weights per valid sequence.
    (dict(fused=True, chunk_size=8, reduction="batch_of_sequences"), 4),
    # Dense cache fields [B, T, V] split too; weights per valid token, and
    # CE and accuracy from the logits.
    (dict(source="dense", ce_weight=0.3, loss="reverse_kl",
          reduction="batch"), 2),
])
def test_lm_distill_step(lms, kwargs, k):
  (model, params, model_state), (teacher, tp, ts), batch = lms
  objective = lm.LMDistillObjective(temperature=2.0, **kwargs)
  tv = {"params": tp, "model_state": ts}
  if objective.source == "dense":
    batch = {**batch, "teacher_log_probs": lm.make_lm_teacher_outputs(teacher)(
        tv, batch["x"])}
  state = jt.TrainState.create(params, model_state, TX, 0)
  out = _run_k(lambda n: lm.make_lm_distill_step(
      model, TX, objective, teacher, grad_accum_steps=n), (state, tv, batch),
               (1, k))
  _assert_same_step(out[1], out[k])


def test_a_batch_k_does_not_divide_raises(mlps):
  (model, params, model_state), _, batch = mlps
  state = jt.TrainState.create(params, model_state, TX, 0)
  step = jt.make_train_step(model, TX, grad_accum_steps=3)
  with pytest.raises(ValueError, match="batch of 16 examples is not "
                     "divisible by grad_accum_steps=3"):
    jax.jit(step)(state, batch)
  for bad in (0, -2, 1.5):
    with pytest.raises(ValueError, match="grad_accum_steps must be"):
      jt.make_train_step(model, TX, grad_accum_steps=bad)


def test_micro_batches_interleave_the_examples():
  batch = {"x": jnp.arange(12).reshape(6, 2), "y": jnp.arange(6),
           "scalar": jnp.float32(3.0)}
  mb = jstep.micro_batch(batch, 3, 1)
  np.testing.assert_array_equal(mb["y"], [1, 4])
  np.testing.assert_array_equal(mb["x"], [[2, 3], [8, 9]])
  assert float(mb["scalar"]) == 3.0
  swapped = batch["x"].reshape(2, 3, 2).swapaxes(0, 1)
  for i in range(3):
    np.testing.assert_array_equal(jstep.micro_batch(batch, 3, i)["x"],
                                  swapped[i])


def test_batch_dependent_cases_run_but_differ():
  """BatchNorm statistics and relational losses are per micro-batch: k > 1
  runs, but is not the whole batch's step (so equality is not asserted)."""
  model, params, model_state = jt.FunctionalModel.split(create_model(
      "convnet", num_classes=C, input_shape=(4, 4, 1), rngs=nnx.Rngs(0),
      width=4, depth=1, norm="batch"))
  rng = np.random.default_rng(2)
  batch = {"x": jnp.asarray(rng.normal(size=(8, 4, 4, 1)), jnp.float32),
           "y": jnp.asarray(rng.integers(0, C, 8), jnp.int32)}
  state = jt.TrainState.create(params, model_state, TX, 0)
  s2, m2 = jax.jit(jt.make_train_step(model, TX, grad_accum_steps=2))(
      state, batch)
  assert np.isfinite(float(m2["loss"]))
  moved = [not np.allclose(a, b) for a, b in zip(
      jax.tree.leaves(model_state), jax.tree.leaves(s2.model_state))]
  assert any(moved)  # BatchNorm running statistics were threaded through.

  (student, sp, ss) = _split("mlp", 0, hidden_sizes=(16,))
  teacher, tp, ts = _split("mlp", 1, hidden_sizes=(24,))
  term = jt.FeatureTerm("rkd_distance", "penultimate", "penultimate")
  obj = jt.DistillObjective(loss="kd", feature_terms=(term,))
  proj, pp = jt.build_projectors(
      (term,), jt.feature_shapes(student, sp, ss, (D,)),
      jt.feature_shapes(teacher, tp, ts, (D,)))
  batch = {"x": jnp.asarray(rng.normal(size=(B, D)), jnp.float32),
           "y": jnp.asarray(rng.integers(0, C, B), jnp.int32)}
  state = jt.TrainState.create(sp, ss, TX, 0, projector_params=pp)
  _, m = jax.jit(jt.make_distill_step(student, teacher, TX, obj, proj,
                                      grad_accum_steps=4))(
      state, {"params": tp, "model_state": ts}, batch)
  assert np.isfinite(float(m[term.name]))


def test_contrastive_memory_bank_fills_consecutive_slots():
  student, sp, ss = _split("mlp", 0, hidden_sizes=(16,))
  teacher, tp, ts = _split("mlp", 1, hidden_sizes=(24,))
  term = jt.FeatureTerm("contrastive", "penultimate", "penultimate",
                        projector="linear", loss_kwargs=(("memory_size", 32),))
  obj = jt.DistillObjective(loss="kd", feature_terms=(term,))
  proj, pp = jt.build_projectors(
      (term,), jt.feature_shapes(student, sp, ss, (D,)),
      jt.feature_shapes(teacher, tp, ts, (D,)))
  bank0 = jnp.zeros((32, 24), jnp.float32)
  state = jt.TrainState.create(sp, ss, TX, 0, projector_params=pp,
                               loss_state=obj.init_loss_state([bank0]))
  x = jnp.asarray(np.random.default_rng(4).normal(size=(B, D)), jnp.float32)
  batch = {"x": x, "y": jnp.zeros((B,), jnp.int32)}
  new, _ = jax.jit(jt.make_distill_step(student, teacher, TX, obj, proj,
                                        grad_accum_steps=4))(
      state, {"params": tp, "model_state": ts}, batch)
  bank = np.asarray(new.loss_state["features"]["0"])
  # The step's 4 micro-batches of 4 fill rows 0..15 (micro-batch i in rows
  # 4i..4i+3, examples i, i + 4, ...), rows 16.. stay as they were.
  _, feats, _ = teacher.apply(tp, ts, x, train=False)
  want = np.asarray(feats["penultimate"]).reshape(4, 4, -1).swapaxes(0, 1)
  np.testing.assert_allclose(bank[:16], want.reshape(16, -1), rtol=1e-5,
                             atol=1e-6)
  np.testing.assert_array_equal(bank[16:], 0.0)


def test_sharded_batch_needs_no_resharding(mlps):
  """With the batch sharded along dim 0, micro-batches stay spread over the
  devices: the compiled step moves no batch data between devices (only the
  gradient all-reduces of data parallelism), and equals k = 1."""
  if jax.device_count() < 4:
    pytest.skip("needs 4 devices")
  (model, params, model_state), _, batch = mlps
  mesh = Mesh(np.array(jax.devices()[:4]), ("data",))
  replicated = NamedSharding(mesh, P())
  state = jax.device_put(jt.TrainState.create(params, model_state, TX, 0),
                         replicated)
  batch = jax.device_put(batch, NamedSharding(mesh, P("data")))
  out = {}
  for k in (1, 2):
    step = jax.jit(jt.make_train_step(model, TX, grad_accum_steps=k),
                   out_shardings=replicated)
    hlo = step.lower(state, batch).compile().as_text()
    for op in ("all-gather", "all-to-all", "collective-permute"):
      assert op not in hlo, op
    out[k] = step(state, batch)
  _assert_same_step(out[1], out[2])


def test_temp_memory_does_not_grow_with_k():
  """At a fixed micro-batch size, the compiled step's temporary buffers do
  not grow with k: the scan keeps one micro-batch's activations and the
  float32 gradient sums (what k = 1 does not need)."""
  b, width = 64, 256
  model, params, model_state = jt.FunctionalModel.split(create_model(
      "mlp", num_classes=10, input_shape=(32,), rngs=nnx.Rngs(0),
      hidden_sizes=(width, width)))
  state = jt.TrainState.create(params, model_state, TX, 0)
  param_bytes = sum(x.size * 4 for x in jax.tree.leaves(params))
  temp = {}
  for k in (1, 2, 4, 8):
    batch = {"x": jax.ShapeDtypeStruct((k * b, 32), jnp.float32),
             "y": jax.ShapeDtypeStruct((k * b,), jnp.int32),
             "mask": jax.ShapeDtypeStruct((k * b,), jnp.bool_)}
    compiled = jax.jit(jt.make_train_step(
        model, TX, grad_accum_steps=k)).lower(state, batch).compile()
    analysis = compiled.memory_analysis()
    if analysis is None:
      pytest.skip("this backend reports no memory analysis")
    temp[k] = analysis.temp_size_in_bytes
  print("temp bytes by k:", temp)
  # k = 2 adds at most the float32 gradient sums to k = 1.
  assert temp[2] <= 1.1 * temp[1] + param_bytes + 4096, temp
  for k in (4, 8):
    assert temp[k] <= 1.1 * temp[2] + 4096, temp
