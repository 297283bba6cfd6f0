"""Language-model steps (`jdistill.train.lm`): next-token training,
token-level distillation from an online teacher (naive and fused), from
dense / top-k / sampled caches, evaluation, and sharding."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jdistill import train as jtrain
from jdistill.losses import sparse
from jdistill.models import CausalLM
from jdistill.train import lm

V, T, B = 29, 8, 8


def _model(dim, depth, seed):
  return jtrain.FunctionalModel.split(
      CausalLM(V, dim=dim, depth=depth, num_heads=2, max_len=T,
               rngs=nnx.Rngs(seed)))


def _batch(seed=0, lengths=None):
  rng = np.random.default_rng(seed)
  x = rng.integers(0, V, size=(B, T)).astype(np.int32)
  y = rng.integers(0, V, size=(B, T)).astype(np.int32)
  batch = {"x": x, "y": y}
  if lengths is not None:
    batch["token_mask"] = np.arange(T)[None, :] < np.asarray(lengths)[:, None]
  return batch


def _np_log_softmax(z):
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


@pytest.fixture(scope="module")
def models():
  student, sp, ss = _model(16, 1, 0)
  teacher, tp, ts = _model(24, 2, 1)
  return student, sp, ss, teacher, {"params": tp, "model_state": ts}


def _state(sp, ss, tx):
  return jtrain.TrainState.create(sp, ss, tx, 0)


def test_train_step_loss_is_masked_mean_nll_and_decreases(models):
  student, sp, ss, _, _ = models
  tx = optax.adam(1e-2)
  batch = _batch(0, lengths=[T, 3, 5, 0, T, 1, 2, T])
  logits, _, _ = student.apply(sp, ss, batch["x"], train=False)
  logp = _np_log_softmax(np.asarray(logits, np.float64))
  nll = -np.take_along_axis(logp, batch["y"][..., None], -1)[..., 0]
  m = batch["token_mask"]
  step = jax.jit(lm.make_lm_train_step(student, tx))
  state, metrics = step(_state(sp, ss, tx), batch)
  np.testing.assert_allclose(float(metrics["loss"]), nll[m].mean(), rtol=1e-5)
  first = float(metrics["loss"])
  for _ in range(10):
    state, metrics = step(state, batch)
  assert float(metrics["loss"]) < first - 0.5


def test_eval_step_sums_over_valid_tokens(models):
  student, sp, ss, _, _ = models
  batch = _batch(1, lengths=[T, 3, 5, 0, T, 1, 2, T])
  batch["mask"] = np.array([True] * 6 + [False] * 2)
  sums = jax.jit(lm.make_lm_eval_step(student))(sp, ss, batch)
  logits, _, _ = student.apply(sp, ss, batch["x"], train=False)
  logp = _np_log_softmax(np.asarray(logits, np.float64))
  nll = -np.take_along_axis(logp, batch["y"][..., None], -1)[..., 0]
  m = batch["token_mask"] & batch["mask"][:, None]
  assert int(sums["count"]) == m.sum()
  np.testing.assert_allclose(float(sums["loss_sum"]), nll[m].sum(), rtol=1e-5)
  correct = (np.asarray(logits).argmax(-1) == batch["y"])[m].sum()
  assert int(sums["correct"]) == correct


def _one_step(models, objective, batch, tx=None):
  student, sp, ss, teacher, tv = models
  tx = tx or optax.sgd(0.1)
  step = jax.jit(lm.make_lm_distill_step(student, tx, objective,
                                         teacher if objective.source ==
                                         "online" else None))
  return step(_state(sp, ss, tx), tv if objective.source == "online" else {},
              batch)


def _teacher_log_probs(models, batch):
  _, _, _, teacher, tv = models
  fn = jax.jit(lm.make_lm_teacher_outputs(teacher))
  return np.asarray(fn(tv, batch["x"]))


@pytest.mark.parametrize("reduction", [
    "batch", pytest.param("batch_of_sequences", marks=pytest.mark.slow)])
def test_online_kd_matches_numpy_and_dense_cache(models, reduction):
  batch = _batch(2, lengths=[T, 3, 5, 0, T, 1, 2, T])
  obj = lm.LMDistillObjective(loss="kd", temperature=2.0, ce_weight=0.5,
                              reduction=reduction)
  state, metrics = _one_step(models, obj, batch)
  # numpy: T^2 KL(p_t || p_s) at T=2 per token, reduced as asked.
  student, sp, ss = models[:3]
  logits, _, _ = student.apply(sp, ss, batch["x"], train=False)
  lt = _teacher_log_probs(models, batch).astype(np.float64)
  ls = _np_log_softmax(np.asarray(logits, np.float64) / 2)
  lt2 = _np_log_softmax(lt / 2)
  per = 4 * (np.exp(lt2) * (lt2 - ls)).sum(-1)
  m = batch["token_mask"]
  if reduction == "batch":
    ref = per[m].mean()
  else:
    lens = m.sum(1)
    ref = np.mean([per[b][m[b]].mean() for b in range(B) if lens[b]])
  np.testing.assert_allclose(float(metrics["kd"]), ref, rtol=1e-5)
  # The same step from a dense cache of the teacher's log-probs.
  dense = lm.LMDistillObjective(loss="kd", temperature=2.0, ce_weight=0.5,
                                reduction=reduction, source="dense")
  cached = dict(batch, teacher_log_probs=lt.astype(np.float32))
  state2, metrics2 = _one_step(models, dense, cached)
  np.testing.assert_allclose(float(metrics2["loss"]), float(metrics["loss"]),
                             rtol=1e-6)
  for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(state2.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


@pytest.mark.parametrize("loss", [
    "kd", pytest.param("reverse_kl", marks=pytest.mark.slow),
    pytest.param("jsd", marks=pytest.mark.slow)])
def test_fused_online_step_equals_naive(models, loss):
  batch = _batch(3, lengths=[T, 3, 5, 0, T, 1, 2, T])
  naive = lm.LMDistillObjective(loss=loss, temperature=1.5)
  fused = lm.LMDistillObjective(loss=loss, temperature=1.5, fused=True,
                                chunk_size=24)
  s1, m1 = _one_step(models, naive, batch)
  s2, m2 = _one_step(models, fused, batch)
  np.testing.assert_allclose(float(m2["kd"]), float(m1["kd"]), rtol=1e-5)
  np.testing.assert_allclose(float(m2["grad_norm"]), float(m1["grad_norm"]),
                             rtol=1e-4)
  for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s2.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


def test_fused_step_with_ce_equals_naive(models):
  # The fused loss's CE term (Liger's fused linear CE) is the naive step's.
  batch = _batch(5, lengths=[T, 3, 5, 0, T, 1, 2, T])
  naive = lm.LMDistillObjective(loss="kd", temperature=2.0, ce_weight=0.5,
                                kd_weight=0.7)
  fused = lm.LMDistillObjective(loss="kd", temperature=2.0, ce_weight=0.5,
                                kd_weight=0.7, fused=True, chunk_size=24)
  s1, m1 = _one_step(models, naive, batch)
  s2, m2 = _one_step(models, fused, batch)
  for key in ("loss", "kd", "ce"):
    np.testing.assert_allclose(float(m2[key]), float(m1[key]), rtol=1e-5)
  for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s2.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


def test_topk_with_full_vocabulary_equals_dense(models):
  batch = _batch(4)
  logp = _teacher_log_probs(models, batch)
  values, ids = sparse.topk_teacher_targets(logp, V, temperature=1.0)
  dense = lm.LMDistillObjective(source="dense")
  _, m_dense = _one_step(models, dense, dict(batch, teacher_log_probs=logp))
  for variant in ("renormalized", "tail"):
    topk = lm.LMDistillObjective(source="topk", topk_variant=variant)
    _, m_topk = _one_step(models, topk, dict(
        batch, teacher_log_probs=np.asarray(values),
        teacher_ids=np.asarray(ids)))
    np.testing.assert_allclose(float(m_topk["kd"]), float(m_dense["kd"]),
                               rtol=1e-5)


def test_sampled_step_uses_the_importance_weighted_cross_entropy(models):
  batch = _batch(5, lengths=[T, 3, 5, 0, T, 1, 2, T])
  logp = _teacher_log_probs(models, batch)
  ids, weights = sparse.sample_teacher_tokens(jax.random.key(0), logp, 6)
  obj = lm.LMDistillObjective(source="sampled")
  _, metrics = _one_step(models, obj, dict(
      batch, teacher_ids=np.asarray(ids), teacher_weights=np.asarray(weights)))
  student, sp, ss = models[:3]
  logits, _, _ = student.apply(sp, ss, batch["x"], train=False)
  ls = _np_log_softmax(np.asarray(logits, np.float64))
  per = -(np.asarray(weights) * np.take_along_axis(ls, np.asarray(ids),
                                                   -1)).sum(-1)
  m = batch["token_mask"]
  np.testing.assert_allclose(float(metrics["kd"]), per[m].mean(), rtol=1e-5)


def test_step_on_8_devices_equals_1_device(models):
  student, sp, ss, teacher, tv = models
  batch = _batch(6, lengths=[T, 3, 5, 0, T, 1, 2, T])
  obj = lm.LMDistillObjective(loss="jsd", ce_weight=0.3)
  tx = optax.sgd(0.5)  # Adam's first step is sign(g): 1e-9 noise flips it.
  results = []
  for n in (1, 8):
    mesh = jtrain.make_data_mesh(n)
    step = jtrain.compile_step(
        lm.make_lm_distill_step(student, tx, obj, teacher), mesh)
    state = jtrain.replicate(_state(sp, ss, tx), mesh)
    state, metrics = step(state, jtrain.replicate(tv, mesh),
                          jtrain.put_batch(batch, mesh))
    results.append((jax.device_get(state.params), jax.device_get(metrics)))
  (p1, m1), (p8, m8) = results
  np.testing.assert_allclose(m8["loss"], m1["loss"], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p8)):
    np.testing.assert_allclose(a, b, atol=2e-6)


@pytest.mark.parametrize("kwargs,match", [
    (dict(source="cache"), "--lm_teacher_source='cache'"),
    (dict(reduction="token"), "--lm_reduction='token'"),
    (dict(fused=True, source="dense"), "--lm_fused_kd needs"),
    (dict(loss="nope"), "unknown logit loss"),
    (dict(temperature=0.0), "--temperature must be > 0"),
])
def test_objective_errors(kwargs, match):
  with pytest.raises(ValueError, match=match):
    lm.LMDistillObjective(**kwargs)


def test_online_step_needs_a_teacher(models):
  with pytest.raises(ValueError, match="needs a teacher"):
    lm.make_lm_distill_step(models[0], optax.sgd(0.1),
                            lm.LMDistillObjective())


def test_uld_step_reads_the_teachers_tokens_and_aligned_positions(models):
  """--loss=uld: the teacher (another vocabulary) runs on ``teacher_x``; each
  student position is compared with its aligned teacher position
  (``teacher_index``; -1 dropped) by the L1 of the sorted softmaxes."""
  student, sp, ss, _, _ = models
  vt, tt = 37, 11
  teacher, tp, ts = jtrain.FunctionalModel.split(
      CausalLM(vt, dim=16, depth=1, num_heads=2, max_len=tt,
               rngs=nnx.Rngs(3)))
  rng = np.random.default_rng(4)
  batch = _batch(2, lengths=[T, 3, 5, 0, T, 1, 2, T])
  batch["teacher_x"] = rng.integers(0, vt, (B, tt)).astype(np.int32)
  index = rng.integers(-1, tt, (B, T)).astype(np.int32)
  batch["teacher_index"] = index
  tx = optax.sgd(0.0)
  objective = lm.LMDistillObjective(loss="uld", temperature=2.0)
  _, metrics = jax.jit(lm.make_lm_distill_step(student, tx, objective,
                                               teacher))(
      _state(sp, ss, tx), {"params": tp, "model_state": ts}, batch)
  s_logits = np.asarray(student.apply(sp, ss, batch["x"], train=False)[0], np.float64)
  t_logits = np.asarray(teacher.apply(tp, ts, batch["teacher_x"], train=False)[0],
                        np.float64)

  def sorted_probs(z):
    p = np.exp(z / 2.0 - (z / 2.0).max(-1, keepdims=True))
    return -np.sort(-p / p.sum(-1, keepdims=True), -1)

  values = []
  for b in range(B):
    for t in range(T):
      if batch["token_mask"][b, t] and index[b, t] >= 0:
        ps = np.pad(sorted_probs(s_logits[b, t]), (0, vt - V))
        pt = sorted_probs(t_logits[b, index[b, t]])
        values.append(np.abs(ps - pt).sum())
  np.testing.assert_allclose(float(metrics["kd"]), np.mean(values),
                             rtol=1e-5)
  with pytest.raises(ValueError, match="--loss=uld"):
    lm.LMDistillObjective(loss="uld", fused=True)
