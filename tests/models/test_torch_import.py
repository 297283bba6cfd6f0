"""jdistill.models.torch_import and TorchBatchNorm, against float64 numpy
formulas of PyTorch's layers (no torch needed). The zoo's agreement with the
PyTorch modules themselves is tests/models/test_zoo_reference.py."""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jdistill.models import (TorchBatchNorm, create_model,
                             from_torch_state_dict, load_torch_state_dict,
                             read_torch_checkpoint, torch_module_names,
                             torch_state_dict)


def _resnet8(seed=0, num_classes=10):
  return create_model("resnet8", num_classes=num_classes,
                      input_shape=(8, 8, 3), rngs=nnx.Rngs(seed))


def _random_state_dict(model, seed=1):
  rng = np.random.default_rng(seed)
  out = {}
  for key, value in torch_state_dict(model).items():
    if key.endswith("num_batches_tracked"):
      out[key] = value
    elif key.endswith("running_var") or key.endswith(".weight") and (
        value.ndim == 1):
      out[key] = rng.uniform(0.5, 1.5, value.shape).astype(np.float32)
    else:
      scale = 1.0 / np.sqrt(max(np.prod(value.shape[1:]), 1))
      out[key] = (rng.standard_normal(value.shape) * scale).astype(
          np.float32)
  return out


def _np_conv2d_nchw(x, w, stride, pad):
  """PyTorch's Conv2d (cross-correlation), float64, NCHW / OIHW."""
  x = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
  n, _, h, wd = x.shape
  o, _, kh, kw = w.shape
  ho, wo = (h - kh) // stride + 1, (wd - kw) // stride + 1
  y = np.zeros((n, o, ho, wo))
  for i in range(ho):
    for j in range(wo):
      patch = x[:, :, i * stride:i * stride + kh, j * stride:j * stride + kw]
      y[:, :, i, j] = np.einsum("nchw,ochw->no", patch, w)
  return y


def test_mdistiller_names_of_the_cifar_resnet():
  names = set(torch_module_names(_resnet8()))
  # mdistiller cifar/resnet.py resnet8: conv1/bn1, layer1..3 of one
  # BasicBlock, downsample in layer2/3 (stride 2 / width change), fc.
  assert {"conv1", "bn1", "layer1.0.conv1", "layer1.0.bn2",
          "layer2.0.downsample.0", "layer2.0.downsample.1",
          "layer3.0.conv2", "fc"} <= names
  assert len(names) == 2 + 3 * 4 + 2 * 2 + 1


def test_round_trip_is_exact_and_keys_are_pytorch_layout():
  model = _resnet8()
  sd = _random_state_dict(model)
  fm, variables = from_torch_state_dict("resnet8", sd, num_classes=10,
                                        input_shape=(8, 8, 3))
  back = torch_state_dict(fm.merge(variables["params"],
                                   variables["model_state"]))
  assert set(back) == set(sd)
  for k in sd:
    np.testing.assert_array_equal(back[k], sd[k], err_msg=k)
  assert sd["conv1.weight"].shape == (16, 3, 3, 3)  # OIHW
  assert sd["fc.weight"].shape == (10, 64)  # [out, in]


def test_conv_linear_and_bn_follow_pytorch_formulas():
  model = _resnet8()
  sd = _random_state_dict(model)
  load_torch_state_dict(model, sd)
  x = np.random.default_rng(2).standard_normal((2, 8, 8, 3))
  got = np.asarray(model.stem_conv(jnp.asarray(x, jnp.float32)))
  want = _np_conv2d_nchw(x.transpose(0, 3, 1, 2), sd["conv1.weight"].astype(
      np.float64), 1, 1).transpose(0, 2, 3, 1)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  # The stride-2 1x1 downsample conv, PyTorch's alignment (top-left).
  h = np.random.default_rng(3).standard_normal((2, 8, 8, 16))
  block = model.stages[1][0]
  got = np.asarray(block.down_conv(jnp.asarray(h, jnp.float32)))
  want = _np_conv2d_nchw(h.transpose(0, 3, 1, 2),
                         sd["layer2.0.downsample.0.weight"].astype(
                             np.float64), 2, 0).transpose(0, 2, 3, 1)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  v = np.random.default_rng(4).standard_normal((3, 64))
  got = np.asarray(model.head(jnp.asarray(v, jnp.float32)))
  want = v @ sd["fc.weight"].T.astype(np.float64) + sd["fc.bias"]
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  # Eval BatchNorm: (x - running_mean) / sqrt(running_var + eps) * w + b.
  c = np.random.default_rng(5).standard_normal((2, 8, 8, 16))
  got = np.asarray(model.stem_bn(jnp.asarray(c, jnp.float32),
                                 use_running_average=True))
  want = ((c - sd["bn1.running_mean"]) / np.sqrt(
      sd["bn1.running_var"].astype(np.float64) + 1e-5) * sd["bn1.weight"]
          + sd["bn1.bias"])
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_torch_batchnorm_updates_running_statistics_like_pytorch(dtype):
  rng = np.random.default_rng(0)
  x = rng.standard_normal((4, 5, 3, 6)) * 3 + 2
  bn = TorchBatchNorm(6, dtype=dtype, rngs=nnx.Rngs(0))
  mean0 = rng.standard_normal(6)
  var0 = rng.uniform(0.5, 1.5, 6)
  bn.mean[...] = jnp.asarray(mean0, jnp.float32)
  bn.var[...] = jnp.asarray(var0, jnp.float32)
  y = bn(jnp.asarray(x, dtype), use_running_average=False)
  flat = x.reshape(-1, 6)
  if dtype == jnp.bfloat16:
    flat = np.asarray(jnp.asarray(flat, jnp.bfloat16).astype(jnp.float32),
                      np.float64)
  n = flat.shape[0]
  # torch: running = (1 - 0.1) * running + 0.1 * batch, unbiased variance.
  np.testing.assert_allclose(np.asarray(bn.mean[...]),
                             0.9 * mean0 + 0.1 * flat.mean(0),
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(bn.var[...]),
                             0.9 * var0 + 0.1 * flat.var(0, ddof=1),
                             rtol=2e-2 if dtype == jnp.bfloat16 else 1e-5)
  # The forward normalises with the biased batch variance.
  want = (flat - flat.mean(0)) / np.sqrt(flat.var(0) + 1e-5)
  tol = 5e-2 if dtype == jnp.bfloat16 else 1e-4
  np.testing.assert_allclose(np.asarray(y, np.float64).reshape(n, 6), want,
                             atol=tol, rtol=tol)
  assert y.dtype == dtype
  bn.var[...] = jnp.asarray(var0, jnp.float32)
  bn(jnp.asarray(x, dtype), use_running_average=True)
  np.testing.assert_array_equal(np.asarray(bn.var[...]),
                                var0.astype(np.float32))
  assert n == 4 * 5 * 3


def test_torch_batchnorm_gradient_matches_finite_differences():
  bn = TorchBatchNorm(3, rngs=nnx.Rngs(0))
  g, p, s = nnx.split(bn, nnx.Param, ...)
  p, s = nnx.to_pure_dict(p), nnx.to_pure_dict(s)
  x = jnp.asarray(np.random.default_rng(1).standard_normal((5, 3)) + 1.0)
  w = jnp.asarray(np.random.default_rng(2).standard_normal((5, 3)))

  def f(x):
    m = nnx.merge(g, p, s)
    return jnp.sum(m(x, use_running_average=False) * w)

  grad = jax.grad(f)(x)
  eps = 1e-3
  fd = np.zeros((5, 3))
  for i in range(5):
    for j in range(3):
      e = jnp.zeros((5, 3)).at[i, j].set(eps)
      fd[i, j] = (f(x + e) - f(x - e)) / (2 * eps)
  np.testing.assert_allclose(np.asarray(grad), fd, atol=2e-2)


def test_bad_state_dicts_are_one_line_errors():
  model = _resnet8()
  sd = _random_state_dict(model)
  cases = []
  extra = dict(sd, **{"layer4.0.conv1.weight": np.zeros((1, 1, 1, 1))})
  cases.append((extra, "key 'layer4.0.conv1.weight'"))
  missing = {k: v for k, v in sd.items() if k != "layer1.0.bn1.running_var"}
  cases.append((missing, "missing key 'layer1.0.bn1.running_var'"))
  wrong = dict(sd, **{"layer1.0.conv1.weight": np.zeros((16, 16, 1, 1),
                                                        np.float32)})
  cases.append((wrong, "'layer1.0.conv1.weight' has shape (16, 16, 1, 1) but "
                "model 'resnet8' expects (16, 16, 3, 3)"))
  ints = dict(sd, **{"fc.bias": np.zeros(10, np.int64)})
  cases.append((ints, "'fc.bias' has dtype int64"))
  for bad, pattern in cases:
    with pytest.raises(ValueError) as e:
      from_torch_state_dict("resnet8", bad, num_classes=10,
                            input_shape=(8, 8, 3))
    assert pattern in str(e.value) and "\n" not in str(e.value)
  with pytest.raises(ValueError, match="'fc.weight' has shape .10, 64. but "
                     "model 'resnet8' expects .100, 64."):
    from_torch_state_dict("resnet8", sd, num_classes=100,
                          input_shape=(8, 8, 3))
  with pytest.raises(ValueError, match="unknown model 'resnet9'"):
    from_torch_state_dict("resnet9", sd, num_classes=10,
                          input_shape=(8, 8, 3))


def test_optional_counters_and_data_parallel_prefix():
  model = _resnet8()
  sd = _random_state_dict(model)
  plain = {k: v for k, v in sd.items() if "num_batches_tracked" not in k}
  wrapped = {f"module.{k}": v for k, v in sd.items()}
  a = from_torch_state_dict("resnet8", plain, num_classes=10,
                            input_shape=(8, 8, 3))[1]
  b = from_torch_state_dict("resnet8", wrapped, num_classes=10,
                            input_shape=(8, 8, 3))[1]
  jax.tree.map(np.testing.assert_array_equal, a, b)


def test_checkpoint_files(tmp_path, monkeypatch):
  from safetensors.numpy import save_file
  sd = _random_state_dict(_resnet8())
  save_file(sd, str(tmp_path / "t.safetensors"))
  np.savez(tmp_path / "t.npz", **sd)
  for name in ("t.safetensors", "t.npz"):
    got = read_torch_checkpoint(str(tmp_path / name))
    assert set(got) == set(sd)
    np.testing.assert_array_equal(got["fc.weight"], sd["fc.weight"])
  (tmp_path / "t.pth").write_bytes(b"not read")
  monkeypatch.setitem(sys.modules, "torch", None)  # torch not installed
  with pytest.raises(ValueError) as e:
    read_torch_checkpoint(str(tmp_path / "t.pth"), what="--x=t.pth")
  msg = str(e.value)
  assert msg.startswith("--x=t.pth: reading a .pth file needs PyTorch")
  assert "safetensors" in msg and "\n" not in msg
  with pytest.raises(ValueError, match="no such file"):
    read_torch_checkpoint(str(tmp_path / "missing.safetensors"))
  (tmp_path / "t.ckpt").write_bytes(b"")
  with pytest.raises(ValueError, match="expected a .safetensors"):
    read_torch_checkpoint(str(tmp_path / "t.ckpt"))
  (tmp_path / "bad.safetensors").write_bytes(b"garbage")
  with pytest.raises(ValueError, match="not a readable safetensors"):
    read_torch_checkpoint(str(tmp_path / "bad.safetensors"))
  assert os.path.getsize(tmp_path / "t.pth") == len(b"not read")
