"""Rematerialisation of model blocks (``create_model(..., remat=...)``).

XLA:CPU compiles are the cost here, so models are built abstractly
(`nnx.eval_shape`) with NumPy-drawn variables, and one jitted program per
model differentiates all the policies side by side.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jdistill.models import REMAT_NAMES, REMAT_POLICIES, create_model
from jdistill.models.remat import remat_block

# name -> (input_shape, num_classes, constructor kwargs); tiny on purpose.
_MODELS = {
    "mlp": ((6,), 5, dict(hidden_sizes=(8, 8))),
    "cnn1d": ((24,), 5, dict(channels=(4, 4))),
    "convnet": ((8, 8, 2), 5, dict(width=4, depth=2, norm="batch")),
    "resnet8": ((8, 8, 3), 5, dict(widths=(4, 4, 8, 8))),
    "vit": ((16,), 5, dict(dim=8, depth=2, num_heads=2, patch_size=4)),
    "causal_lm": ((8,), 16, dict(dim=8, depth=2, num_heads=2, mlp_ratio=2)),
}
_POLICIES = [p for p in REMAT_NAMES if p != "none"]


def _model(name, remat="none", **over):
  input_shape, num_classes, kw = _MODELS[name]
  return create_model(name, num_classes=num_classes, input_shape=input_shape,
                      rngs=nnx.Rngs(0), remat=remat, **dict(kw, **over))


def _input(name, batch=3):
  input_shape, num_classes, _ = _MODELS[name]
  rng = np.random.default_rng(1)
  if name == "causal_lm":
    return rng.integers(0, num_classes, (batch,) + input_shape, np.int32)
  return rng.normal(size=(batch,) + input_shape).astype(np.float32)


def _split(name, remat="none"):
  """``(graphdef, params, rest)`` of an abstract model, the variables as pure
  dicts drawn with NumPy (BatchNorm variances need > 0: all in [0.5, 1.5])."""
  graphdef, params, rest = nnx.split(
      nnx.eval_shape(lambda: _model(name, remat)), nnx.Param, ...)
  rng = np.random.default_rng(0)
  params = jax.tree.map(
      lambda a: (0.5 * rng.normal(size=a.shape)).astype(a.dtype),
      nnx.to_pure_dict(params))
  rest = jax.tree.map(lambda a: rng.uniform(0.5, 1.5, a.shape).astype(a.dtype),
                      nnx.to_pure_dict(rest))
  return graphdef, params, rest


def _loss(graphdef, params, rest, x):
  """A loss on the logits and every feature, the model used as
  `jdistill.train.state.FunctionalModel` uses it (``nnx.merge`` of pure
  dicts inside the traced function)."""
  model = nnx.merge(graphdef, params, rest)
  logits, feats = model(x, train=True)
  val = jnp.mean(jnp.sin(logits))
  for f in feats.values():
    val += jnp.mean(jnp.tanh(f.astype(jnp.float32)))
  _, _, new_rest = nnx.split(model, nnx.Param, ...)
  return val, (logits, feats, nnx.to_pure_dict(new_rest))


def _close(actual, desired, rtol, msg):
  """Equal up to float reassociation: ``rtol`` of each element and of the
  array's largest magnitude (so that entries near 0 compare sensibly)."""
  desired = np.asarray(desired)
  scale = float(np.max(np.abs(desired))) if desired.size else 0.0
  np.testing.assert_allclose(actual, desired, rtol=rtol, atol=rtol * scale,
                             err_msg=msg)


# resnet8 compiles for ~20 s: in the slow run (convnet has BatchNorm too).
@pytest.mark.parametrize("name", [
    pytest.param(n, marks=pytest.mark.slow) if n == "resnet8" else n
    for n in _MODELS])
def test_remat_same_logits_features_grads_and_state(name):
  graphdef, params, rest = _split(name)
  graphdefs = {p: _split(name, p)[0] for p in REMAT_NAMES}
  assert graphdefs["none"] == graphdef
  x = _input(name)

  # One compile for all the policies; each gets its own copy of the inputs
  # so that XLA cannot merge (CSE) their computations.
  @jax.jit
  def all_policies(inputs):
    return {p: jax.value_and_grad(_loss, argnums=1, has_aux=True)(
        graphdefs[p], *inputs[p]) for p in REMAT_NAMES}

  out = jax.device_get(all_policies(
      {p: (params, rest, x) for p in REMAT_NAMES}))
  (val0, (logits0, feats0, rest0)), grads0 = out["none"]
  assert not np.allclose(val0, 0) and np.all(np.isfinite(val0))
  for remat in _POLICIES:
    (val, (logits, feats, new_rest)), grads = out[remat]
    msg = f"{name} remat={remat}"
    assert list(feats) == list(feats0), msg
    _close(val, val0, 1e-6, msg)
    _close(logits, logits0, 1e-6, msg)
    for k in feats0:
      _close(feats[k], feats0[k], 1e-6, f"{msg} feature {k}")
    # BatchNorm running statistics (convnet, resnet8): one update per forward.
    assert jax.tree.structure(new_rest) == jax.tree.structure(rest0), msg
    jax.tree.map(lambda a, b: _close(a, b, 1e-6, msg), new_rest, rest0)
    jax.tree.map(lambda a, b: _close(a, b, 1e-6, msg), grads, grads0)
  if rest0:  # the statistics did move
    assert not all(jax.tree.leaves(jax.tree.map(np.array_equal, rest0, rest)))


@pytest.mark.parametrize("name", [
    "convnet", pytest.param("resnet8", marks=pytest.mark.slow)])
def test_remat_batchnorm_running_stats_update_once_nnx_jit(name):
  """Stateful NNX use: ``nnx.jit`` around the model, BatchNorm updated in
  place through `nnx.remat`."""
  x = _input(name)
  graphdef, params, rest = _split(name)
  plain = nnx.merge(graphdef, params, rest)
  full = nnx.merge(_split(name, "full")[0], params, rest)
  before = nnx.to_pure_dict(nnx.state(plain, nnx.BatchStat))
  step = nnx.jit(lambda m, x: m(x, train=True))
  for _ in range(2):
    jax.tree.map(np.testing.assert_array_equal, step(full, x), step(plain, x))
    jax.tree.map(np.testing.assert_array_equal,
                 nnx.to_pure_dict(nnx.state(full, nnx.BatchStat)),
                 nnx.to_pure_dict(nnx.state(plain, nnx.BatchStat)))
  after = nnx.to_pure_dict(nnx.state(full, nnx.BatchStat))
  changed = jax.tree.map(lambda a, b: not np.array_equal(a, b), after, before)
  assert all(jax.tree.leaves(changed))


@pytest.mark.parametrize("name", ["mlp", "resnet8", "vit", "causal_lm"])
def test_remat_unknown_policy(name):
  with pytest.raises(ValueError, match="remat") as err:
    _model(name, "everything")
  for valid in REMAT_NAMES:
    assert valid in str(err.value)
  with pytest.raises(ValueError, match="remat"):
    remat_block(lambda m, x: m(x), "bogus")


def test_remat_policy_table():
  assert REMAT_NAMES[0] == "none" and REMAT_POLICIES["none"] is None
  assert {"none", "full", "dots", "dots_saveable"} == set(REMAT_NAMES)
  assert all(callable(REMAT_POLICIES[p]) for p in _POLICIES)


def test_remat_model_under_eval_shape_and_jit_init():
  model = nnx.eval_shape(lambda: _model("causal_lm", "full"))
  assert model.remat == "full"
  graphdef, state = nnx.split(model)
  x = jax.ShapeDtypeStruct((2, 8), jnp.int32)
  logits, feats = jax.eval_shape(
      lambda s, x: nnx.merge(graphdef, s)(x, train=True), state, x)
  assert logits.shape == (2, 8, 16) and feats["hidden"].shape == (2, 8, 8)

  @jax.jit
  def init():  # as a jitted initialisation with out_shardings would
    return [nnx.to_pure_dict(nnx.split(_model("mlp", r), nnx.Param)[1])
            for r in ("dots", "none")]

  jax.tree.map(np.testing.assert_array_equal, *init())


def _lm_loss(remat, seq_len=256, depth=4, batch=4):
  """An abstract causal_lm loss: ``(loss(params, tokens), params, tokens)``
  with shape-only ``params`` and ``tokens``."""
  graphdef, params, rest = nnx.split(nnx.eval_shape(lambda: create_model(
      "causal_lm", num_classes=64, input_shape=(seq_len,), rngs=nnx.Rngs(0),
      dim=32, depth=depth, num_heads=2, remat=remat)), nnx.Param, ...)

  def loss(params, tokens):
    logits, _ = nnx.merge(graphdef, params, rest)(tokens)
    return -jnp.mean(jax.nn.log_softmax(logits)[..., 0])

  tokens = jax.ShapeDtypeStruct((batch, seq_len), jnp.int32)
  return loss, nnx.to_pure_dict(params), tokens


def test_remat_saved_residuals_shrink():
  """What autodiff keeps for the backward pass (backend independent): the
  leaves of the VJP closure, parameters included."""
  nbytes = {}
  for remat in REMAT_NAMES:
    loss, params, tokens = _lm_loss(remat, seq_len=64)
    vjp_fn = jax.eval_shape(lambda p, t: jax.vjp(loss, p, t)[1], params,
                            tokens)
    nbytes[remat] = sum(a.size * a.dtype.itemsize
                        for a in jax.tree.leaves(vjp_fn))
  print("causal_lm (4 blocks, T=64) saved residual bytes:", nbytes)
  assert nbytes["full"] < nbytes["dots"] < nbytes["dots_saveable"]
  assert nbytes["dots_saveable"] < nbytes["none"]


def test_remat_compiled_temp_memory():
  """The compiled value_and_grad needs less scratch memory with remat.

  XLA:CPU's default scheduler optimises for concurrency and computes the
  rematerialised values early, next to the forward pass, which undoes the
  saving; its memory-optimised scheduler keeps them in the backward pass.
  """
  opts = None
  if jax.default_backend() == "cpu":
    opts = {"xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"}
  temp = {}
  for remat in ("none", "full", "dots"):
    loss, params, tokens = _lm_loss(remat)
    compiled = jax.jit(jax.value_and_grad(loss)).lower(
        params, tokens).compile(compiler_options=opts)
    temp[remat] = compiled.memory_analysis().temp_size_in_bytes
  print("causal_lm (4 blocks, T=256) value_and_grad temp bytes:", temp)
  assert temp["full"] < temp["none"]
  assert temp["dots"] <= temp["none"]
