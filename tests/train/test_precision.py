"""Mixed precision (`jdistill.train.precision`): policies, casts,
`FunctionalModel.compute_dtype` and dynamic loss scaling in the steps."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jdistill import train as jt
from jdistill.models import CausalLM, create_model
from jdistill.train import lm
from jdistill.train import precision as prec

C, D, B = 5, 12, 8


def _split(name, seed, input_shape=(D,), **kw):
  return jt.FunctionalModel.split(create_model(
      name, num_classes=C, input_shape=input_shape, rngs=nnx.Rngs(seed), **kw))


@pytest.fixture(scope="module")
def mlp():
  rng = np.random.default_rng(0)
  batch = {"x": jnp.asarray(rng.normal(size=(B, D)), jnp.float32),
           "y": jnp.asarray(rng.integers(0, C, B), jnp.int32)}
  return _split("mlp", 0, hidden_sizes=(32, 32)), batch


def _rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-12)


# --- Policies and casts. ------------------------------------------------------


def test_get_policy():
  assert prec.get_policy("float32").model_compute_dtype is None
  bf16 = prec.get_policy("bfloat16")
  assert bf16.model_compute_dtype == jnp.bfloat16
  assert bf16.param_dtype == jnp.float32 and bf16.output_dtype == jnp.float32
  assert bf16.loss_scale is None and bf16.init_precision_state() == {}
  with pytest.raises(ValueError, match=r"--precision='fp8'.*float32, "
                     r"bfloat16, float16"):
    prec.get_policy("fp8")


@pytest.mark.float16
def test_get_float16_policy():
  assert prec.float16_supported()
  f16 = prec.get_policy("float16")
  assert f16.model_compute_dtype == jnp.float16
  state = f16.init_precision_state()["loss_scale"]
  assert float(state["scale"]) == 2.0**15 and int(state["good_steps"]) == 0


def test_float16_policy_is_refused_where_the_backend_has_no_float16(
    monkeypatch):
  monkeypatch.setattr(prec, "float16_supported", lambda: False)
  with pytest.raises(ValueError, match=r"--precision=float16: this "
                     r"machine's XLA backend cannot compile float16 .*F16C"):
    prec.get_policy("float16")
  assert prec.get_policy("bfloat16").model_compute_dtype == jnp.bfloat16


def test_float16_supported_matches_a_float16_computation():
  """The probe agrees with an actual float16 computation on this backend
  (True on CPUs with F16C, False e.g. under --xla_cpu_max_isa=SSE4_2)."""
  try:
    x = jax.jit(lambda x: (x.astype(jnp.float16) * 3).astype(jnp.float32))(
        jnp.arange(3.0))
    works = bool(np.all(np.asarray(x) == [0.0, 3.0, 6.0]))
  except jax.errors.JaxRuntimeError:
    works = False
  assert prec.float16_supported() is works


@pytest.mark.float16  # The tree holds a float16 leaf.
def test_cast_to_compute_casts_floating_leaves_only():
  tree = {"x": jnp.ones((2, 3)), "ids": jnp.arange(4), "mask": jnp.ones(
      2, bool), "key": jax.random.key(0), "raw": jax.random.key_data(
          jax.random.key(1)), "half": jnp.ones(2, jnp.float16)}
  out = prec.get_policy("bfloat16").cast_to_compute(tree)
  assert out["x"].dtype == jnp.bfloat16
  assert out["half"].dtype == jnp.bfloat16
  assert out["ids"].dtype == tree["ids"].dtype
  assert out["mask"].dtype == jnp.bool_
  assert out["raw"].dtype == jnp.uint32
  assert jax.dtypes.issubdtype(out["key"].dtype, jax.dtypes.prng_key)
  back = prec.get_policy("bfloat16").cast_to_output(out)
  assert back["x"].dtype == jnp.float32 and back["ids"].dtype == jnp.int32
  assert prec.get_policy("float32").cast_to_compute(tree)["x"].dtype == (
      jnp.float32)


def test_dynamic_loss_scale_against_a_reference():
  ls = prec.DynamicLossScale(initial_scale=8.0, period=3, min_scale=2.0)
  finite = [1, 1, 1, 1, 0, 1, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 0]
  scale, good, want = 8.0, 0, []
  for f in finite:  # Reference: halve on overflow, double after 3 good.
    if f:
      good += 1
      if good == 3:
        scale, good = scale * 2, 0
    else:
      scale, good = max(scale / 2, 2.0), 0
    want.append((scale, good))
  state = ls.init()
  adjust = jax.jit(ls.adjust)
  for f, (s, g) in zip(finite, want):
    state = adjust(state, jnp.asarray(bool(f)))
    assert (float(state["scale"]), int(state["good_steps"])) == (s, g)
    assert state["scale"].dtype == jnp.float32
    assert state["good_steps"].dtype == jnp.int32
  # Scale and unscale.
  state = ls.init()
  np.testing.assert_allclose(ls.scale(state, jnp.float32(1.5)), 12.0)
  grads = {"a": jnp.full((2,), 16.0), "b": jnp.full((2,), 4.0, jnp.bfloat16)}
  out = ls.unscale(state, grads)
  np.testing.assert_allclose(out["a"], 2.0)
  assert out["b"].dtype == jnp.bfloat16 and float(out["b"][0]) == 0.5
  # Never doubles to inf.
  big = {"scale": jnp.float32(3e38), "good_steps": jnp.int32(2)}
  assert float(ls.adjust(big, jnp.asarray(True))["scale"]) == np.float32(3e38)
  with pytest.raises(ValueError, match="period"):
    prec.DynamicLossScale(period=0)


# --- FunctionalModel with a compute dtype. -----------------------------------


def test_bfloat16_model_outputs_float32_and_float32_gradients(mlp):
  (model, params, model_state), batch = mlp
  bf16 = model.with_compute_dtype(jnp.bfloat16)
  assert bf16.compute_dtype == jnp.bfloat16 and model.compute_dtype is None
  assert hash(bf16) == hash(model.with_compute_dtype("bfloat16"))
  assert bf16 == model.with_compute_dtype("bfloat16") and bf16 != model
  assert jt.FunctionalModel.split(
      create_model("mlp", num_classes=C, input_shape=(D,),
                   rngs=nnx.Rngs(0), hidden_sizes=(8,)),
      compute_dtype=jnp.bfloat16)[0].compute_dtype == jnp.bfloat16
  with pytest.raises(ValueError, match="floating"):
    model.with_compute_dtype(jnp.int32)

  def loss(m, p, x):
    logits, feats, _ = m.apply(p, model_state, x, train=True)
    return jt.cross_entropy(logits, batch["y"]).mean(), (logits, feats)

  (l32, (z32, _)), g32 = jax.value_and_grad(
      lambda p: loss(model, p, batch["x"]), has_aux=True)(params)
  (l16, (z16, f16)), g16 = jax.jit(jax.value_and_grad(
      lambda p: loss(bf16, p, batch["x"]), has_aux=True))(params)
  assert z16.dtype == jnp.float32
  assert all(v.dtype == jnp.float32 for v in f16.values())
  assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(g16))
  assert _rel_err(z16, z32) < 2e-2
  np.testing.assert_allclose(l16, l32, rtol=2e-2)
  for a, b in zip(jax.tree.leaves(g16), jax.tree.leaves(g32)):
    assert _rel_err(a, b) < 5e-2
  # The matmuls really run in bfloat16.
  jaxpr = str(jax.make_jaxpr(lambda p: bf16.apply(
      p, model_state, batch["x"], train=False))(params))
  assert "dot_general" in jaxpr and "bf16[8,32]" in jaxpr
  # bfloat16 inputs give the same as float32 inputs cast to bfloat16.
  z_in, _, _ = bf16.apply(params, model_state,
                          batch["x"].astype(jnp.bfloat16), train=False)
  z_cast, _, _ = bf16.apply(params, model_state, batch["x"], train=False)
  np.testing.assert_array_equal(z_in, z_cast)


def test_batchnorm_statistics_stay_float32():
  model, params, model_state = _split("convnet", 0, (4, 4, 1), width=4,
                                      depth=1, norm="batch")
  x = jnp.asarray(np.random.default_rng(1).normal(size=(B, 4, 4, 1)),
                  jnp.float32)
  _, _, s32 = model.apply(params, model_state, x, train=True)
  logits, _, s16 = jax.jit(
      lambda p, s, x: model.with_compute_dtype(jnp.bfloat16).apply(
          p, s, x, train=True))(params, model_state, x)
  assert logits.dtype == jnp.float32
  for a, b in zip(jax.tree.leaves(s16), jax.tree.leaves(s32)):
    assert a.dtype == b.dtype == jnp.float32
    np.testing.assert_allclose(a, b, rtol=3e-2, atol=3e-3)


def test_causal_lm_tokens_stay_int_and_fused_path_casts():
  model, params, model_state = jt.FunctionalModel.split(CausalLM(
      11, dim=8, depth=1, num_heads=2, max_len=6, rngs=nnx.Rngs(0)))
  tokens = jnp.asarray(np.random.default_rng(2).integers(0, 11, (2, 6)),
                       jnp.int32)
  bf16 = model.with_compute_dtype(jnp.bfloat16)

  @jax.jit
  def run(params, model_state, tokens):
    z16, _, _ = bf16.apply(params, model_state, tokens, train=False)
    z32, _, _ = model.apply(params, model_state, tokens, train=False)
    h, w, b, cap = lm._hidden_and_unembedding(bf16, params, model_state,
                                              {"x": tokens})
    assert cap is None
    return z16, z32, (h, w, b)

  z16, z32, (h, w, b) = run(params, model_state, tokens)
  assert z16.dtype == jnp.float32 and _rel_err(z16, z32) < 3e-2
  assert h.dtype == w.dtype == b.dtype == jnp.bfloat16
  assert h.shape == (12, 8) and w.shape == (8, 11)


# --- Steps. -------------------------------------------------------------------


def test_bfloat16_distill_step_keeps_float32_master_weights(mlp):
  (model, params, model_state), batch = mlp
  teacher, tp, ts = _split("mlp", 1, hidden_sizes=(48,))
  tx = optax.adam(1e-2)
  obj = jt.DistillObjective(loss="kd", temperature=2.0)
  policy = prec.get_policy("bfloat16")
  state = jt.TrainState.create(params, model_state, tx, 0,
                               precision_state=policy.init_precision_state())
  assert state.precision_state == {}
  assert len(jax.tree.leaves(state)) == len(jax.tree.leaves(
      jt.TrainState.create(params, model_state, tx, 0)))
  tv = {"params": tp, "model_state": ts}
  step16 = jax.jit(jt.make_distill_step(
      model.with_compute_dtype(policy.model_compute_dtype),
      teacher.with_compute_dtype(jnp.bfloat16), tx, obj))
  step32 = jax.jit(jt.make_distill_step(model, teacher, tx, obj))
  s16, m16 = step16(state, tv, batch)
  s32, m32 = step32(state, tv, batch)
  for leaf in jax.tree.leaves((s16.params, s16.opt_state)):
    assert leaf.dtype in (jnp.float32, jnp.int32)
  np.testing.assert_allclose(m16["loss"], m32["loss"], rtol=3e-2)
  np.testing.assert_allclose(m16["grad_norm"], m32["grad_norm"], rtol=5e-2)


@pytest.mark.float16
@pytest.mark.parametrize("grad_accum_steps", [1, 2])
def test_float16_step_skips_an_overflow_and_halves_the_scale(
    mlp, grad_accum_steps):
  (model, params, model_state), batch = mlp
  tx = optax.sgd(0.1)
  f16 = model.with_compute_dtype(jnp.float16)
  loss_scale = prec.DynamicLossScale(initial_scale=2.0**100, period=2)
  state = jt.TrainState.create(
      params, model_state, tx, 0,
      precision_state={"loss_scale": loss_scale.init()})
  step = jax.jit(jt.guard_nonfinite(jt.make_train_step(
      f16, tx, loss_scale=loss_scale, grad_accum_steps=grad_accum_steps),
      "skip"))
  # 2**100 overflows the float16 backward pass: the update is skipped, the
  # scale halves; the loss itself is finite, so it is no non-finite step.
  new, m = step(state, batch)
  assert float(m["overflow"]) == 1.0 and float(m["nonfinite"]) == 0.0
  assert np.isfinite(float(m["loss"]))
  assert float(m["loss_scale"]) == 2.0**100
  assert int(new.step) == 1
  assert float(new.precision_state["loss_scale"]["scale"]) == 2.0**99
  for a, b in zip(jax.tree.leaves(new.params), jax.tree.leaves(params)):
    np.testing.assert_array_equal(a, b)
  # Inputs that overflow float16: a non-finite loss, skipped as well.
  bad = {**batch, "x": batch["x"] * 1e6}
  new2, m2 = step(new, bad)
  assert float(m2["overflow"]) == 1.0 and float(m2["nonfinite"]) == 1.0
  assert float(new2.precision_state["loss_scale"]["scale"]) == 2.0**98
  for a, b in zip(jax.tree.leaves(new2.params), jax.tree.leaves(params)):
    np.testing.assert_array_equal(a, b)
  # A sane scale: the update is applied and matches the float32 step.
  state = state.replace(precision_state={"loss_scale": {
      "scale": jnp.float32(2.0**10), "good_steps": jnp.int32(1)}})
  new3, m3 = step(state, batch)
  assert float(m3["overflow"]) == 0.0
  assert float(new3.precision_state["loss_scale"]["scale"]) == 2.0**11
  assert int(new3.precision_state["loss_scale"]["good_steps"]) == 0
  ref, _ = jax.jit(jt.make_train_step(model, tx))(state, batch)
  for a, b, p in zip(jax.tree.leaves(new3.params), jax.tree.leaves(ref.params),
                     jax.tree.leaves(params)):
    assert a.dtype == jnp.float32
    assert _rel_err(a - p, b - p) < 2e-2


def test_loss_scaling_needs_its_state(mlp):
  (model, params, model_state), batch = mlp
  tx = optax.sgd(0.1)
  state = jt.TrainState.create(params, model_state, tx, 0)
  step = jt.make_train_step(model, tx, loss_scale=prec.DynamicLossScale())
  with pytest.raises(ValueError, match="precision_state"):
    jax.jit(step)(state, batch)
