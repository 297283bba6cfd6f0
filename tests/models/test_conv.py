"""The matmul-VJP convolution against lax.conv_general_dilated and numpy."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import lax

from jdistill import train as jtrain
from jdistill.models import create_model
from jdistill.models.conv import (FORWARDS, INPUT_GRADS,
                                  MATMUL_ALGORITHM, TRAIN_MATMUL_ALGORITHM,
                                  WEIGHT_GRADS,
                                  XLA_ALGORITHM, ConvAlgorithm,
                                  choose_algorithm, conv_fn,
                                  matmul_conv_general_dilated)

# (input shape, kernel shape, strides, padding): 2-D 3x3 stride 1 and 2, the
# ResNet 1x1 stride-2 shortcut, odd sizes with asymmetric padding and unequal
# strides, and the 1-D MNIST-1D conv (kernel 5, stride 2, padding 1).
CASES = [
    ((2, 7, 9, 3), (3, 3, 3, 5), (1, 1), ((1, 1), (1, 1))),
    ((2, 8, 8, 4), (3, 3, 4, 6), (2, 2), ((1, 1), (1, 1))),
    ((2, 9, 7, 4), (1, 1, 4, 6), (2, 2), ((0, 0), (0, 0))),
    ((2, 10, 11, 2), (3, 2, 2, 3), (2, 3), ((2, 0), (0, 1))),
    ((3, 40, 1), (5, 1, 4), (2,), ((1, 1),)),
    ((3, 19, 4), (5, 4, 4), (2,), ((1, 1),)),
]
ALGORITHMS = [ConvAlgorithm(*a) for a in itertools.product(
    FORWARDS, INPUT_GRADS, WEIGHT_GRADS)] + [
        ConvAlgorithm("im2col", "col2im", "im2col", "im2col")]


def _numbers(ndim):
  return lax.conv_dimension_numbers(
      (1,) * ndim, (1,) * ndim,
      ("NHWC", "HWIO", "NHWC") if ndim == 4 else ("NWC", "WIO", "NWC"))


def _numpy_conv(x, w, strides, padding):
  """Direct sum from the definition (float64), channels-last."""
  x = np.pad(np.asarray(x, np.float64),
             [(0, 0)] + [tuple(p) for p in padding] + [(0, 0)])
  w = np.asarray(w, np.float64)
  ks = w.shape[:-2]
  out = tuple((n - k) // s + 1 for n, k, s in zip(x.shape[1:-1], ks, strides))
  y = np.zeros((x.shape[0],) + out + (w.shape[-1],))
  for pos in itertools.product(*(range(o) for o in out)):
    window = tuple(slice(p * s, p * s + k) for p, s, k in zip(pos, strides,
                                                               ks))
    patch = x[(slice(None),) + window]  # [B, *ks, Cin]
    y[(slice(None),) + pos] = np.tensordot(
        patch, w, axes=(list(range(1, len(ks) + 2)),
                        list(range(len(ks) + 1))))
  return y


def _inputs(case, seed=0, dtype=jnp.float32):
  xs, ws, strides, padding = case
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=xs), dtype)
  w = jnp.asarray(rng.normal(size=ws), dtype)
  return x, w, strides, padding


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}*{c[1]}s{c[2]}")
def test_forward_matches_the_definition(case):
  x, w, strides, padding = _inputs(case)
  want = _numpy_conv(x, w, strides, padding)
  for alg in (ConvAlgorithm(), ConvAlgorithm(forward="im2col")):
    got = matmul_conv_general_dilated(x, w, strides, padding,
                                      dimension_numbers=_numbers(x.ndim),
                                      algorithm=alg)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}*{c[1]}s{c[2]}")
def test_every_algorithm_has_xlas_values_and_gradients(case):
  x, w, strides, padding = _inputs(case, seed=1)
  dn = _numbers(x.ndim)

  def xla(x, w):
    return lax.conv_general_dilated(x, w, strides, padding,
                                    dimension_numbers=dn)

  y, vjp = jax.vjp(xla, x, w)
  g = jnp.asarray(np.random.default_rng(2).normal(size=y.shape), jnp.float32)
  want_dx, want_dw = vjp(g)
  for alg in ALGORITHMS:
    f = jax.jit(lambda x, w, g, alg=alg: jax.vjp(
        lambda x, w: matmul_conv_general_dilated(
            x, w, strides, padding, dimension_numbers=dn, algorithm=alg),
        x, w)[1](g))
    dx, dw = f(x, w, g)
    np.testing.assert_allclose(dx, want_dx, rtol=1e-5, atol=2e-4,
                               err_msg=str(alg))
    np.testing.assert_allclose(dw, want_dw, rtol=1e-5, atol=2e-4,
                               err_msg=str(alg))


def test_weight_gradient_matches_a_numpy_correlation():
  """dW[i, j] = sum_{b, p} x_pad[b, s*p + (i, j)] dy[b, p] from the
  definition, independently of XLA."""
  x, w, strides, padding = _inputs(CASES[1], seed=3)
  dn = _numbers(4)
  y = matmul_conv_general_dilated(x, w, strides, padding,
                                  dimension_numbers=dn)
  g = np.random.default_rng(4).normal(size=y.shape)
  dw = jax.grad(lambda w: jnp.sum(matmul_conv_general_dilated(
      x, w, strides, padding, dimension_numbers=dn) * g))(w)
  x_pad = np.pad(np.asarray(x, np.float64),
                 [(0, 0)] + [tuple(p) for p in padding] + [(0, 0)])
  want = np.zeros(w.shape)
  ho, wo = y.shape[1:3]
  for i, j in itertools.product(range(3), range(3)):
    patch = x_pad[:, i:i + strides[0] * (ho - 1) + 1:strides[0],
                  j:j + strides[1] * (wo - 1) + 1:strides[1]]
    want[i, j] = np.einsum("bhwc,bhwo->co", patch, g)
  np.testing.assert_allclose(dw, want, rtol=1e-5, atol=1e-4)


def test_bfloat16_inputs_keep_their_dtype_and_stay_close():
  x, w, strides, padding = _inputs(CASES[0], seed=5, dtype=jnp.bfloat16)
  dn = _numbers(4)

  def loss(fn, x, w):
    return jnp.sum(fn(x, w, strides, padding, dimension_numbers=dn)
                   .astype(jnp.float32) ** 2)

  dx, dw = jax.grad(lambda x, w: loss(matmul_conv_general_dilated, x, w),
                    argnums=(0, 1))(x, w)
  assert dx.dtype == jnp.bfloat16 and dw.dtype == jnp.bfloat16
  x32, w32 = x.astype(jnp.float32), w.astype(jnp.float32)
  rdx, rdw = jax.grad(lambda x, w: loss(lax.conv_general_dilated, x, w),
                      argnums=(0, 1))(x32, w32)
  for got, want in ((dx, rdx), (dw, rdw)):
    got = np.asarray(got, np.float32)
    assert np.all(np.isfinite(got))
    rel = np.linalg.norm(got - want) / np.linalg.norm(want)
    assert rel < 2e-2, rel


def test_unsupported_configurations_fall_back_to_lax():
  x, w, _, _ = _inputs(CASES[0])
  dn = _numbers(4)
  want = lax.conv_general_dilated(x, w, (1, 1), "SAME", rhs_dilation=(2, 2),
                                  dimension_numbers=dn)
  got = matmul_conv_general_dilated(x, w, (1, 1), "SAME",
                                    rhs_dilation=(2, 2), dimension_numbers=dn)
  np.testing.assert_allclose(got, want, rtol=1e-6)
  # A string padding is resolved like lax does it.
  np.testing.assert_allclose(
      matmul_conv_general_dilated(x, w, (2, 2), "SAME", dimension_numbers=dn),
      lax.conv_general_dilated(x, w, (2, 2), "SAME", dimension_numbers=dn),
      rtol=1e-5, atol=1e-5)
  # NCHW is not channels-last: lax handles it.
  xc = jnp.transpose(x, (0, 3, 1, 2))
  wc = jnp.transpose(w, (3, 2, 0, 1))
  np.testing.assert_allclose(
      matmul_conv_general_dilated(xc, wc, (1, 1), ((1, 1), (1, 1)),
                                  dimension_numbers=("NCHW", "OIHW", "NCHW")),
      lax.conv_general_dilated(xc, wc, (1, 1), ((1, 1), (1, 1)),
                               dimension_numbers=("NCHW", "OIHW", "NCHW")),
      rtol=1e-6)


def test_bad_algorithm_names_are_refused():
  with pytest.raises(ValueError, match="weight_grad='fft'"):
    ConvAlgorithm(weight_grad="fft")
  with pytest.raises(ValueError, match="conv_impl='cudnn'"):
    conv_fn("cudnn")
  assert conv_fn("xla") is lax.conv_general_dilated
  assert conv_fn("auto") is conv_fn(None)
  with pytest.raises(ValueError, match="algorithm='fast'"):
    matmul_conv_general_dilated(jnp.ones((1, 4, 4, 2)), jnp.ones((3, 3, 2, 2)),
                                (1, 1), "SAME", dimension_numbers=_numbers(4),
                                algorithm="fast")


def test_auto_choices_and_the_inference_forward():
  assert choose_algorithm((1, 1, 64, 128), "cpu") == MATMUL_ALGORITHM
  assert choose_algorithm((3, 3, 3, 32), "cpu") == MATMUL_ALGORITHM
  assert choose_algorithm((3, 3, 64, 64), "cpu") == TRAIN_MATMUL_ALGORITHM
  assert choose_algorithm((3, 3, 64, 64), "gpu") == XLA_ALGORITHM
  # Undifferentiated, TRAIN_MATMUL runs XLA's convolution itself.
  x, w, strides, padding = _inputs(CASES[1], seed=8)
  dn = _numbers(4)
  np.testing.assert_array_equal(
      matmul_conv_general_dilated(x, w, strides, padding,
                                  dimension_numbers=dn,
                                  algorithm=TRAIN_MATMUL_ALGORITHM),
      lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=dn))
  # 'auto' (the models' default) gives XLA's values and gradients.
  for case in CASES:
    x, w, strides, padding = _inputs(case, seed=7)
    dn = _numbers(x.ndim)
    outs = []
    for alg in ("auto", XLA_ALGORITHM):
      f = lambda x, w, alg=alg: jnp.sum(matmul_conv_general_dilated(
          x, w, strides, padding, dimension_numbers=dn, algorithm=alg) ** 2)
      outs.append(jax.grad(f, argnums=(0, 1))(x, w))
    for a, b in zip(*outs):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-3)


@pytest.mark.slow  # CI budget; run with -m slow.
def test_resnet_gradients_do_not_depend_on_conv_impl():
  """The whole model: values and parameter gradients (train-mode BN) equal
  for every part by matmuls and for XLA's own."""
  x = jnp.asarray(np.random.default_rng(6).normal(size=(4, 8, 8, 3)),
                  jnp.float32)

  def grads(impl):
    model = create_model("resnet8", num_classes=5, input_shape=(8, 8, 3),
                         rngs=nnx.Rngs(0), conv_impl=impl)
    fmodel, params, model_state = jtrain.FunctionalModel.split(model)

    def loss(p):
      logits, _, _ = fmodel.apply(p, model_state, x, train=True)
      return jnp.sum(jax.nn.log_softmax(logits)[:, 0]), logits

    return jax.grad(loss, has_aux=True)(params)

  (g_m, y_m), (g_x, y_x) = grads("matmul"), grads("xla")
  np.testing.assert_allclose(y_m, y_x, rtol=1e-5, atol=1e-5)
  for a, b in zip(jax.tree.leaves(g_m), jax.tree.leaves(g_x)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
