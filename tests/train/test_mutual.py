"""jdistill.models.peers and jdistill.train.mutual: online and mutual
distillation of a group of peers."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jdistill.train.step import augment_key
from flax import nnx

from jdistill.models import (GROUP_MODEL_NAMES, MODEL_NAMES, PeerGroup,
                             create_model, peer_variables)
from jdistill.train.mesh import (compile_step, make_data_mesh, put_batch,
                                 replicate)
from jdistill.train.mutual import (deep_mutual_learning,
                                   make_mutual_eval_step, make_mutual_step,
                                   online_distillation, peer_labels,
                                   per_peer_optimizer)
from jdistill.train.objective import DistillObjective
from jdistill.train.precision import DynamicLossScale
from jdistill.train.state import FunctionalModel, TrainState
from jdistill.train.step import make_distill_step, make_train_step

NUM_CLASSES = 4
IN_SHAPE = (6,)
MLPS = [{"name": "mlp", "kwargs": {"hidden_sizes": (16,)}},
        {"name": "mlp", "kwargs": {"hidden_sizes": (8, 8)}},
        {"name": "mlp", "kwargs": {"hidden_sizes": (4,)}}]


def _group(specs, input_shape=IN_SHAPE, seed=0, **kwargs):
  model = create_model("peers", peers=specs, num_classes=NUM_CLASSES,
                       input_shape=input_shape, rngs=nnx.Rngs(seed), **kwargs)
  return FunctionalModel.split(model)


def _batch(n=8, seed=1, mask=None):
  rng = np.random.default_rng(seed)
  batch = {"x": jnp.asarray(rng.normal(size=(n,) + IN_SHAPE), jnp.float32),
           "y": jnp.asarray(rng.integers(0, NUM_CLASSES, n), jnp.int32)}
  if mask is not None:
    batch["mask"] = jnp.asarray(mask, bool)
  return batch


def _log_softmax(z):
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _np_ce(z, y):
  return -_log_softmax(z)[np.arange(len(y)), y]


def _np_kl(z_student, z_teacher, T):
  """T^2 KL(p_teacher || p_student) per example, p = softmax(z / T)."""
  log_ps, log_pt = _log_softmax(z_student / T), _log_softmax(z_teacher / T)
  return T**2 * np.sum(np.exp(log_pt) * (log_pt - log_ps), -1)


def _logits64(fm, params, model_state, x):
  logits, _, _ = fm.apply(params, model_state, x, train=True)
  return np.asarray(logits, np.float64)


def _assert_trees_close(a, b, **tol):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(u), np.asarray(v), **tol)


def _one_step(fm, params, ms, tx, batch, **kwargs):
  state = TrainState.create(params, ms, tx, 0)
  step = jax.jit(make_mutual_step(fm, tx, **kwargs))
  return state, *step(state, batch)


# ------------------------------------------------------------------ models


def test_group_layout_forward_and_peer_variables_round_trip():
  specs = [{"name": "mlp", "kwargs": {"hidden_sizes": (5,)}},
           {"name": "convnet", "kwargs": {"width": 4, "depth": 1,
                                          "norm": "batch"}}]
  fm, params, ms = _group(specs, input_shape=(4, 4, 1))
  assert set(params) == {"peers"} and set(params["peers"]) == {0, 1}
  assert set(ms) == {"peers"} and set(ms["peers"]) == {1}  # MLP: no state.
  x = jax.random.normal(jax.random.key(2), (6, 4, 4, 1))
  for train in (False, True):
    logits, feats, _ = fm.apply(params, ms, x, train=train)
    assert logits.shape == (2, 6, NUM_CLASSES)
    assert set(feats) == {"peer0/hidden1", "peer0/penultimate",
                          "peer1/block1", "peer1/penultimate"}
    for i, spec in enumerate(specs):
      alone = create_model(spec["name"], num_classes=NUM_CLASSES,
                           input_shape=(4, 4, 1), rngs=nnx.Rngs(99),
                           **spec["kwargs"])
      fm_i, params_i, ms_i = FunctionalModel.split(alone)
      v = peer_variables({"params": params, "model_state": ms}, i)
      assert jax.tree.structure(v["params"]) == jax.tree.structure(params_i)
      assert jax.tree.structure(v["model_state"]) == jax.tree.structure(ms_i)
      z, f, _ = fm_i.apply(v["params"], v["model_state"], x, train=train)
      np.testing.assert_array_equal(z, logits[i])
      for name, value in f.items():
        np.testing.assert_array_equal(value, feats[f"peer{i}/{name}"])


def test_group_passes_remat_and_dtype_to_every_peer():
  model = create_model(
      "peers", num_classes=3, input_shape=IN_SHAPE, rngs=nnx.Rngs(0),
      dtype=jnp.bfloat16, remat="full",
      peers=[{"name": "mlp"}, {"name": "mlp", "kwargs": {"remat": "none"}}])
  assert isinstance(model, PeerGroup)
  assert model.peer_names == ("mlp", "mlp") and model.num_peers == 2
  assert [p.remat for p in model.peers] == ["full", "none"]
  assert all(p.dtype == jnp.bfloat16 for p in model.peers)


def test_group_model_name_is_registered_apart_from_model_names():
  assert "peers" in GROUP_MODEL_NAMES and "peers" not in MODEL_NAMES
  with pytest.raises(ValueError, match="causal_lm, decoder, peers"):
    create_model("foo", num_classes=3, input_shape=IN_SHAPE,
                 rngs=nnx.Rngs(0))


@pytest.mark.parametrize("kwargs, pattern", [
    ({}, "model 'peers' needs peers="),
    ({"peers": []}, "at least one peer"),
    ({"peers": "mlp"}, "expected a list of peer specs"),
    ({"peers": [{"name": "peers"}]}, "peers[0]: unknown model 'peers'"),
    ({"peers": [{"name": "mlp"}, {"name": "vgg"}]},
     "peers[1]: unknown model 'vgg'"),
    ({"peers": [{"name": "mlp", "kw": {}}]}, "peers[0]: unknown keys ['kw']"),
    ({"peers": [{"name": "mlp", "kwargs": {"num_classes": 3}}]},
     "peers[0]: kwargs ['num_classes'] are set by the group"),
    ({"peers": [{"name": "mlp"}], "width": 3},
     "model 'peers': unknown options ['width']"),
])
def test_group_rejects_bad_specs(kwargs, pattern):
  with pytest.raises(ValueError, match=re.escape(pattern)):
    create_model("peers", num_classes=3, input_shape=IN_SHAPE,
                 rngs=nnx.Rngs(0), **kwargs)


def test_peer_variables_rejects_bad_input():
  _, params, ms = _group(MLPS[:2])
  with pytest.raises(ValueError, match=re.escape("no peer 2")):
    peer_variables({"params": params, "model_state": ms}, 2)
  with pytest.raises(ValueError, match="not a PeerGroup's"):
    peer_variables({"params": params["peers"][0], "model_state": {}}, 0)


# ---------------------------------------------------------- losses vs numpy


@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_dml_losses_match_numpy(temperature):
  fm, params, ms = _group(MLPS)
  mask = np.array([1, 1, 0, 1, 1, 0, 1, 1], bool)
  batch = _batch(mask=mask)
  kwargs = {**deep_mutual_learning(3), "temperature": temperature}
  _, _, m = _one_step(fm, params, ms, optax.sgd(0.1), batch, **kwargs)
  z = _logits64(fm, params, ms, batch["x"])
  y = np.asarray(batch["y"])
  total = 0.0
  for i in range(3):
    ce = _np_ce(z[i], y)[mask].mean()
    kd = np.mean([_np_kl(z[i], z[j], temperature)[mask].mean()
                  for j in range(3) if j != i])
    np.testing.assert_allclose(m[f"peer{i}_ce"], ce, rtol=1e-5)
    np.testing.assert_allclose(m[f"peer{i}_kd"], kd, rtol=1e-4, atol=1e-7)
    acc = (z[i].argmax(-1) == y)[mask].mean()
    np.testing.assert_allclose(m[f"peer{i}_accuracy"], acc, rtol=1e-6)
    total += ce + kd
  np.testing.assert_allclose(m["loss"], total, rtol=1e-5)
  probs = np.exp(_log_softmax(z)).mean(0)
  np.testing.assert_allclose(m["ensemble_accuracy"],
                             (probs.argmax(-1) == y)[mask].mean(), rtol=1e-6)
  assert np.isfinite(m["grad_norm"]) and m["grad_norm"] > 0


def test_masked_examples_contribute_nothing():
  fm, params, ms = _group(MLPS[:2])
  mask = np.array([1, 0, 1, 1, 0, 1, 1, 0], bool)
  batch = _batch(mask=mask)
  other = dict(batch)
  rng = np.random.default_rng(7)
  other["x"] = jnp.where(mask[:, None], batch["x"],
                         100.0 * rng.normal(size=batch["x"].shape))
  other["y"] = jnp.where(mask, batch["y"], (batch["y"] + 1) % NUM_CLASSES)
  kept = {"x": batch["x"][mask], "y": batch["y"][mask]}
  tx = optax.sgd(0.5)
  step = jax.jit(make_mutual_step(fm, tx, **deep_mutual_learning(2)))
  state = TrainState.create(params, ms, tx, 0)
  results = [step(state, b) for b in (batch, other, kept)]
  for new, m in results[1:]:
    _assert_trees_close(new.params, results[0][0].params, rtol=1e-5,
                        atol=1e-6)
    for name in ("loss", "peer0_kd", "peer1_ce", "ensemble_accuracy"):
      np.testing.assert_allclose(m[name], results[0][1][name], rtol=1e-5)


# ------------------------------------------------------- gradient isolation


def test_online_teacher_and_student_updates_equal_separate_steps():
  """Teacher: a plain supervised step. Student: a distillation step from
  the teacher frozen at its current variables."""
  specs = MLPS[:1] + MLPS[2:]  # teacher hidden (16,), student hidden (4,)
  fm, params, ms = _group(specs)
  batch = _batch()
  tx = optax.sgd(0.5)
  T, ce_w, kd_w = 4.0, 0.3, 0.7
  kwargs = online_distillation(student_ce_weight=ce_w, kd_weight=kd_w,
                               temperature=T)
  _, new, m = _one_step(fm, params, ms, tx, batch, **kwargs)
  assert float(m["peer0_kd"]) == 0.0
  variables = {"params": params, "model_state": ms}
  alone = []
  for spec in specs:
    model = create_model("mlp", num_classes=NUM_CLASSES,
                         input_shape=IN_SHAPE, rngs=nnx.Rngs(5),
                         **spec["kwargs"])
    alone.append(FunctionalModel.split(model)[0])
  teacher_fm, student_fm = alone
  teacher_vars, student_vars = (peer_variables(variables, i) for i in (0, 1))
  # The teacher alone, from the labels.
  state = TrainState.create(teacher_vars["params"],
                            teacher_vars["model_state"], tx, 0)
  ref, ref_m = jax.jit(make_train_step(teacher_fm, tx))(state, batch)
  _assert_trees_close(new.params["peers"][0], ref.params, rtol=1e-6,
                      atol=1e-7)
  np.testing.assert_allclose(m["peer0_ce"], ref_m["loss"], rtol=1e-6)
  # The student alone, from the frozen teacher (kd's T^2 convention).
  objective = DistillObjective(loss="kd", temperature=T, ce_weight=ce_w,
                               kd_weight=kd_w)
  state = TrainState.create(student_vars["params"],
                            student_vars["model_state"], tx, 0)
  ref, ref_m = jax.jit(make_distill_step(student_fm, teacher_fm, tx,
                                         objective))(state, teacher_vars,
                                                     batch)
  _assert_trees_close(new.params["peers"][1], ref.params, rtol=1e-6,
                      atol=1e-7)
  np.testing.assert_allclose(m["peer1_kd"], ref_m["kd"], rtol=1e-6)
  np.testing.assert_allclose(m["peer1_ce"], ref_m["ce"], rtol=1e-6)
  np.testing.assert_allclose(m["loss"], m["peer0_ce"] + ref_m["loss"],
                             rtol=1e-6)


def test_per_peer_optimizer_clips_each_peer_on_its_own():
  fm, params, ms = _group(MLPS[:2])
  batch = _batch()
  dml = deep_mutual_learning(2)
  # Plain SGD at lr 1: the update is minus the gradient.
  old, new, _ = _one_step(fm, params, ms, optax.sgd(1.0), batch, **dml)
  grads = jax.tree.map(lambda a, b: np.asarray(a) - np.asarray(b),
                       old.params, new.params)
  lrs, clip = (0.5, 0.1), 1e-3
  tx = per_peer_optimizer(
      lambda i: optax.chain(optax.clip_by_global_norm(clip),
                            optax.sgd(lrs[i])), 2, params)
  _, new, _ = _one_step(fm, params, ms, tx, batch, **dml)
  for i in range(2):
    g = grads["peers"][i]
    norm = np.sqrt(sum(np.sum(v**2) for v in jax.tree.leaves(g)))
    assert norm > clip
    expected = jax.tree.map(lambda p, gi: p - lrs[i] * gi * clip / norm,
                            params["peers"][i], g)
    _assert_trees_close(new.params["peers"][i], expected, rtol=1e-5,
                        atol=1e-7)
  labels = peer_labels(2, params)
  assert set(jax.tree.leaves(labels["peers"][1])) == {"peer1"}
  with pytest.raises(ValueError, match="params of a PeerGroup of 3 peers"):
    per_peer_optimizer(lambda i: optax.sgd(0.1), 3, params)


# ------------------------------------------------- batch and step options


def test_augment_once_with_mixup_targets():
  fm, params, ms = _group(MLPS[:2])
  batch = _batch()

  def augment(key, batch):
    lam = jax.random.uniform(key, batch["y"].shape)
    perm = jnp.roll(jnp.arange(batch["y"].shape[0]), 1)
    x = lam[:, None] * batch["x"] + (1 - lam[:, None]) * batch["x"][perm]
    return {**batch, "x": x, "y_mix": batch["y"][perm], "mix_lambda": lam}

  state, _, m = _one_step(fm, params, ms, optax.sgd(0.1), batch,
                          augment=augment, **deep_mutual_learning(2))
  mixed = augment(augment_key(state), batch)
  z = _logits64(fm, params, ms, mixed["x"])
  lam = np.asarray(mixed["mix_lambda"], np.float64)
  y, y_mix = np.asarray(batch["y"]), np.asarray(mixed["y_mix"])
  dominant = np.where(lam >= 0.5, y, y_mix)
  for i in range(2):
    ce = lam * _np_ce(z[i], y) + (1 - lam) * _np_ce(z[i], y_mix)
    np.testing.assert_allclose(m[f"peer{i}_ce"], ce.mean(), rtol=1e-5)
    np.testing.assert_allclose(m[f"peer{i}_kd"],
                               _np_kl(z[i], z[1 - i], 1.0).mean(),
                               rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(m[f"peer{i}_accuracy"],
                               (z[i].argmax(-1) == dominant).mean())
  with pytest.raises(ValueError, match="needs both 'y_mix' and 'mix_lambda'"):
    _one_step(fm, params, ms, optax.sgd(0.1), {**batch, "y_mix": batch["y"]},
              **deep_mutual_learning(2))


def test_grad_accum_2_equals_1():
  fm, params, ms = _group(MLPS[:2])
  batch = _batch(mask=[1, 1, 1, 0, 1, 0, 0, 1])
  tx = optax.adam(1e-2)
  results = [_one_step(fm, params, ms, tx, batch, grad_accum_steps=k,
                       **deep_mutual_learning(2))[1:] for k in (1, 2)]
  (new1, m1), (new2, m2) = results
  _assert_trees_close(new2.params, new1.params, rtol=1e-5, atol=1e-6)
  assert set(m1) == set(m2)
  for name in m1:
    np.testing.assert_allclose(m2[name], m1[name], rtol=1e-5, atol=1e-6)


def test_loss_scale_matches_unscaled_step():
  fm, params, ms = _group(MLPS[:2])
  batch = _batch()
  tx = optax.sgd(0.5)
  loss_scale = DynamicLossScale(initial_scale=2.0**10)
  state = TrainState.create(params, ms, tx, 0,
                            precision_state={"loss_scale": loss_scale.init()})
  dml = deep_mutual_learning(2)
  new, m = jax.jit(make_mutual_step(fm, tx, loss_scale=loss_scale, **dml))(
      state, batch)
  ref, ref_m = jax.jit(make_mutual_step(fm, tx, **dml))(state, batch)
  assert float(m["overflow"]) == 0.0
  _assert_trees_close(new.params, ref.params, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(m["loss"], ref_m["loss"], rtol=1e-6)


def test_bfloat16_compute_is_finite_and_close():
  fm, params, ms = _group(MLPS[:2])
  batch = _batch()
  dml = deep_mutual_learning(2)
  _, ref, ref_m = _one_step(fm, params, ms, optax.sgd(0.5), batch, **dml)
  _, new, m = _one_step(fm.with_compute_dtype(jnp.bfloat16), params, ms,
                        optax.sgd(0.5), batch, **dml)
  for name in ("loss", "peer0_ce", "peer1_ce", "grad_norm"):
    assert np.isfinite(m[name])
    np.testing.assert_allclose(m[name], ref_m[name], rtol=5e-2)
  for leaf in jax.tree.leaves(new.params):
    assert leaf.dtype == jnp.float32 and np.all(np.isfinite(leaf))


def test_extreme_logits_stay_finite():
  fm, params, ms = _group(MLPS[:2])
  batch = _batch()
  big = jax.tree.map(lambda p: p * 30.0, params)  # logits in the 1e4s
  z = _logits64(fm, big, ms, batch["x"])
  assert np.abs(z).max() > 1e3
  for loss in ("kd", "jsd"):
    _, new, m = _one_step(fm, big, ms, optax.sgd(1e-6), batch,
                          **{**deep_mutual_learning(2), "loss": loss})
    assert all(np.isfinite(v) for v in m.values()), (loss, m)
    assert all(np.all(np.isfinite(p)) for p in jax.tree.leaves(new.params))


def test_8_devices_equal_1_device():
  fm, params, ms = _group(MLPS[:2])
  batch = _batch(n=16, mask=[1] * 13 + [0] * 3)
  tx = optax.adam(1e-2)
  dml = deep_mutual_learning(2)
  step = make_mutual_step(fm, tx, **dml)
  state = TrainState.create(params, ms, tx, 0)
  ref, ref_m = jax.jit(step)(state, batch)
  mesh = make_data_mesh(8)
  sharded = compile_step(step, mesh, on_nonfinite="skip")
  # Host copies: on a multi-device mesh `replicate` (jax.device_put with
  # may_alias=False) still shares device 0's buffers with the caller's
  # arrays, so the donation would delete `params`.
  new, m = sharded(replicate(jax.tree.map(np.array, state), mesh),
                   put_batch({k: np.asarray(v) for k, v in batch.items()},
                             mesh))
  assert float(m["nonfinite"]) == 0.0
  _assert_trees_close(new.params, ref.params, rtol=1e-5, atol=1e-6)
  for name in ref_m:
    np.testing.assert_allclose(m[name], ref_m[name], rtol=1e-5, atol=1e-6)
  # The eval step on the mesh too.
  eval_1 = jax.jit(make_mutual_eval_step(fm, 2))(params, ms, batch)
  eval_8 = compile_step(make_mutual_eval_step(fm, 2), mesh,
                        donate_state=False)(
      replicate(params, mesh), replicate(ms, mesh),
      put_batch({k: np.asarray(v) for k, v in batch.items()}, mesh))
  for name in eval_1:
    np.testing.assert_allclose(eval_8[name], eval_1[name], rtol=1e-5)


def test_eval_step_sums_match_numpy():
  fm, params, ms = _group(MLPS)
  mask = np.array([1, 1, 0, 1, 1, 1, 0, 1], bool)
  batch = _batch(mask=mask)
  sums = jax.jit(make_mutual_eval_step(fm, 3))(params, ms, batch)
  logits, _, _ = fm.apply(params, ms, batch["x"], train=False)
  z, y = np.asarray(logits, np.float64), np.asarray(batch["y"])
  assert int(sums["count"]) == mask.sum()
  for i in range(3):
    assert int(sums[f"peer{i}_correct"]) == (z[i].argmax(-1) == y)[mask].sum()
    np.testing.assert_allclose(sums[f"peer{i}_loss_sum"],
                               _np_ce(z[i], y)[mask].sum(), rtol=1e-5)
  assert int(sums["correct"]) == int(sums["peer2_correct"])
  np.testing.assert_allclose(sums["loss_sum"], sums["peer2_loss_sum"])
  probs = np.exp(_log_softmax(z)).mean(0)
  assert int(sums["ensemble_correct"]) == (probs.argmax(-1) == y)[mask].sum()
  no_mask = jax.jit(make_mutual_eval_step(fm, 3))(
      params, ms, {"x": batch["x"], "y": batch["y"]})
  assert int(no_mask["count"]) == 8


# ---------------------------------------------------------------- arguments


def test_presets():
  dml = deep_mutual_learning(3)
  assert dml["distill_from"] == ((1, 2), (0, 2), (0, 1))
  assert dml["ce_weights"] == dml["kd_weights"] == (1.0, 1.0, 1.0)
  assert dml["loss"] == "kd" and dml["temperature"] == 1.0
  online = online_distillation(kd_weight=0.9)
  assert online["distill_from"] == ((), (0,))
  assert online["kd_weights"] == (0.0, 0.9)
  with pytest.raises(ValueError, match="at least 2 peers"):
    deep_mutual_learning(1)


_GOOD = dict(num_peers=2, distill_from=((1,), (0,)), ce_weights=(1.0, 1.0),
             kd_weights=(1.0, 1.0))


@pytest.mark.parametrize("kwargs, pattern", [
    ({"num_peers": 0}, "num_peers must be a positive int; got 0"),
    ({"distill_from": ((1,),)}, "distill_from: expected 2 entries"),
    ({"distill_from": ((2,), (0,))},
     "distill_from[0]: peer index 2 is not in [0, 2)"),
    ({"distill_from": ((0,), (0,))},
     "distill_from[0]: peer 0 cannot distil from itself"),
    ({"distill_from": ((1, 1), (0,))}, "distill_from[0]: repeated peer"),
    ({"distill_from": (1, (0,))}, "distill_from[0]: expected a tuple"),
    ({"ce_weights": (1.0,)}, "ce_weights: expected 2 weights (one per peer)"),
    ({"kd_weights": (1.0, -0.5)},
     "kd_weights[1] must be a finite, non-negative number; got -0.5"),
    ({"kd_weights": (1.0, float("nan"))}, "kd_weights[1] must be a finite"),
    ({"loss": "kld"}, "loss=kld: unknown distillation loss"),
    ({"loss": "taid"}, "loss='taid' keeps a training state"),
    ({"loss_kwargs": (("beta", 0.5),)}, "'beta' is not a hyperparameter"),
    ({"temperature": 0.0}, "temperature must be a positive number"),
    ({"grad_accum_steps": 0}, "grad_accum_steps must be a positive int"),
])
def test_bad_arguments(kwargs, pattern):
  fm, _, _ = _group(MLPS[:2])
  with pytest.raises(ValueError, match=re.escape(pattern)):
    make_mutual_step(fm, optax.sgd(0.1), **{**_GOOD, **kwargs})


def test_num_peers_must_match_the_group():
  fm, params, ms = _group(MLPS[:2])
  kwargs = deep_mutual_learning(3)
  with pytest.raises(ValueError, match=re.escape(
      "expected logits [num_peers=3, batch, classes] from the group; got "
      "shape (2, 8, 4)")):
    _one_step(fm, params, ms, optax.sgd(0.1), _batch(), **kwargs)
