"""Computes reference infinite-width NNGP and NTK kernels with neural-tangents.

Writes ``tests/fixtures/nt_kernels.npz`` (inputs and kernels) and
``tests/fixtures/nt_kernels.json`` (package versions, and for every case the
exact ``stax`` architecture string that was evaluated plus its parameters),
which jdistill's tests compare against without needing neural-tangents.

neural-tangents 0.6.5 does not import with current JAX, so this script runs
in its OWN virtual environment (never the system python), from the
repository root:

    python -m venv /tmp/ntenv
    /tmp/ntenv/bin/pip install --upgrade pip
    /tmp/ntenv/bin/pip install "jax==0.4.23" "jaxlib==0.4.23" "numpy<2" \
        "frozendict==2.5.1"
    /tmp/ntenv/bin/pip install --no-deps neural-tangents==0.6.5
    /tmp/ntenv/bin/python benchmarks/reference/make_nt_kernel_fixtures.py

(pip also brings ml_dtypes, opt_einsum and scipy with jax; TensorFlow and
tf2jax, which neural-tangents declares as dependencies, are NOT installed.)

STUB: ``import neural_tangents`` runs ``neural_tangents/experimental/
__init__.py``, which imports ``empirical_tf/empirical.py``, which imports
``jax.experimental.jax2tf`` (needs absl and TensorFlow), ``tensorflow`` and
``tf2jax``. That module only provides ``empirical_ntk_fn_tf`` (the empirical
NTK of TensorFlow models) and is unrelated to ``stax``. Before importing
neural_tangents this script therefore puts a stub module under the name
``neural_tangents.experimental.empirical_tf.empirical`` into ``sys.modules``
whose two functions raise ImportError. Nothing is written into the venv.

Every architecture is built by ``eval`` of the very string stored in the
JSON (``stax`` bound to ``neural_tangents.stax``), and the kernels are
``kernel_fn(x1, x2, ('nngp', 'ntk'))`` in float64 (``jax_enable_x64``).
Inputs are seeded standard-normal numpy float64 arrays.

Cross-check: for every case the script also evaluates, in plain numpy float64,
the recursion below and asserts agreement with neural-tangents to 1e-7
relative to the largest entry. It agrees to ~1e-15 everywhere except on the
diagonal of the ``x2=None`` cases, where neural-tangents' NTK is ~9e-9
(relative) below the exact value: there theta should be 0, but neural-tangents
takes sqrt(k11 k22 - nngp^2) of a rounding-level positive number, giving
theta ~ 1e-8 and a factor (pi - theta) / (2 pi) slightly under 1/2 at each
Relu (the NNGP diagonal is exact, its error is O(theta^3)). On the joint kernel of
X = [x1; x2] with spatial positions p, q (K[i, j, p, q]):

* input: nngp = sum_c x_i[p, c] x_j[q, c] / C (C = channels / features),
  ntk = 0;
* Dense / Conv (NTK parameterisation; the width is irrelevant):
  nngp <- W_std^2 * A(nngp) + b_std^2, ntk <- nngp_new + W_std^2 * A(ntk),
  where for Dense A is the identity and for Conv
  A(K)[p, q] = (1 / |filter|) * sum_d K[p + d, q + d]: the SAME offset d on
  both sides (weights are shared across positions), zero padding for SAME
  (out-of-range terms are 0 but the divisor stays |filter|, e.g. 9 for 3x3);
* Relu: with k11 = K[i, i, p, p], k22 = K[j, j, q, q],
  theta = arctan2(sqrt(k11 k22 - nngp^2), nngp),
  nngp <- sqrt(k11 k22) / (2 pi) * (sin theta + (pi - theta) cos theta),
  ntk <- ntk * (pi - theta) / (2 pi);
* AvgPool / GlobalAvgPool (deterministic linear maps P): K <- P K P^T on both
  position indices independently, i.e. K'[a, b] = mean over p in window(a),
  q in window(b) of K[p, q] (GlobalAvgPool: the mean over all (p, q) pairs),
  for nngp and ntk alike.
"""

from __future__ import annotations

import importlib.metadata
import math
import platform
import sys
import types

# --- stub for the TensorFlow-only module (see the docstring) ---------------
_STUB = "neural_tangents.experimental.empirical_tf.empirical"


def _tf_unavailable(*args, **kwargs):
  raise ImportError("TensorFlow-only neural_tangents.experimental function: "
                    "stubbed in make_nt_kernel_fixtures.py")


_stub = types.ModuleType(_STUB)
_stub.empirical_ntk_fn_tf = _tf_unavailable
_stub.get_apply_fn_and_params = _tf_unavailable
sys.modules[_STUB] = _stub
# ---------------------------------------------------------------------------

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)

import numpy as np  # noqa: E402
from neural_tangents import stax  # noqa: E402

from fixture_io import write_fixture  # noqa: E402

FIXTURE = "nt_kernels"  # tests/fixtures/nt_kernels.*
SEED = 20240917
SQRT2 = math.sqrt(2.0)
WB = [("sqrt2_b0", SQRT2, 0.0, "sqrt(2)"), ("w1p5_b0p2", 1.5, 0.2, "1.5")]

# ------------------------------- architectures ------------------------------


def fc_layers(depth, w, b):
  return ([("dense", 512, w, b), ("relu",)] * depth) + [("dense", 1, w, b)]


def conv_layers(depth, w, b, filt, pool=False):
  body = [("conv", 64, filt, w, b), ("relu",)]
  if pool:
    body.append(("avgpool", (2, 2), (2, 2)))
  return body * depth + [("gap",), ("dense", 1, w, b)]


def layer_str(layer) -> str:
  kind = layer[0]
  if kind == "dense":
    _, width, w, b = layer
    return (f"stax.Dense({width}, W_std={w!r}, b_std={b!r}, "
            f"parameterization='ntk')")
  if kind == "conv":
    _, ch, filt, w, b = layer
    return (f"stax.Conv({ch}, {tuple(filt)!r}, padding='SAME', W_std={w!r}, "
            f"b_std={b!r}, parameterization='ntk')")
  if kind == "relu":
    return "stax.Relu()"
  if kind == "avgpool":
    _, window, strides = layer
    return (f"stax.AvgPool({tuple(window)!r}, strides={tuple(strides)!r}, "
            f"padding='VALID')")
  if kind == "gap":
    return "stax.GlobalAvgPool()"
  raise ValueError(kind)


def arch_str(layers) -> str:
  return "stax.serial(" + ", ".join(layer_str(l) for l in layers) + ")"


# ----------------------------------- cases ----------------------------------


def build_cases(rng):
  """(name, layers, x1, x2 or None, params dict)."""
  cases = []
  fc_x1 = lambda: rng.standard_normal((5, 12))
  fc_x2 = lambda: rng.standard_normal((4, 12))

  x1, x2 = fc_x1(), fc_x2()
  cases.append(("fc_d0_w1p5_b0p2", fc_layers(0, 1.5, 0.2), x1, x2,
                dict(family="fc", depth=0, W_std=1.5, b_std=0.2,
                     W_std_expr="1.5")))
  for depth in (1, 3):
    for tag, w, b, wexpr in WB:
      x1, x2 = fc_x1(), fc_x2()
      cases.append((f"fc_d{depth}_{tag}", fc_layers(depth, w, b), x1, x2,
                    dict(family="fc", depth=depth, W_std=w, b_std=b,
                         W_std_expr=wexpr)))
  # Kernel of x1 with itself (x2=None): diagonal = variances.
  for tag, w, b, wexpr in WB:
    x1 = fc_x1()
    cases.append((f"fc_d3_{tag}_self", fc_layers(3, w, b), x1, None,
                  dict(family="fc", depth=3, W_std=w, b_std=b,
                       W_std_expr=wexpr)))
  # Extreme scales, FC depth 2: x1 * 100 (x2 unscaled) and both * 1e-3.
  for tag, w, b, wexpr in WB:
    x1, x2 = fc_x1(), fc_x2()
    cases.append((f"fc_d2_{tag}_x1large", fc_layers(2, w, b), 100.0 * x1, x2,
                  dict(family="fc", depth=2, W_std=w, b_std=b,
                       W_std_expr=wexpr, x1_scale=100.0, x2_scale=1.0)))
  for tag, w, b, wexpr in WB:
    x1, x2 = fc_x1(), fc_x2()
    cases.append((f"fc_d2_{tag}_tiny", fc_layers(2, w, b), 1e-3 * x1,
                  1e-3 * x2,
                  dict(family="fc", depth=2, W_std=w, b_std=b,
                       W_std_expr=wexpr, x1_scale=1e-3, x2_scale=1e-3)))
  # 2-D conv + ReLU, GlobalAvgPool, Dense; NHWC.
  for depth in (1, 2):
    for tag, w, b, wexpr in WB:
      x1 = rng.standard_normal((3, 6, 6, 2))
      x2 = rng.standard_normal((2, 6, 6, 2))
      cases.append((f"conv2d_d{depth}_{tag}",
                    conv_layers(depth, w, b, (3, 3)), x1, x2,
                    dict(family="conv2d", depth=depth, W_std=w, b_std=b,
                         W_std_expr=wexpr, filter_shape=[3, 3],
                         padding="SAME", layout="NHWC")))
  # 2-D conv + ReLU + AvgPool(2x2, stride 2, VALID), depth 2, 8x8 inputs.
  for tag, w, b, wexpr in WB:
    x1 = rng.standard_normal((3, 8, 8, 2))
    x2 = rng.standard_normal((2, 8, 8, 2))
    cases.append((f"conv2d_pool_d2_{tag}",
                  conv_layers(2, w, b, (3, 3), pool=True), x1, x2,
                  dict(family="conv2d_avgpool", depth=2, W_std=w, b_std=b,
                       W_std_expr=wexpr, filter_shape=[3, 3],
                       padding="SAME", layout="NHWC",
                       avgpool=dict(window=[2, 2], strides=[2, 2],
                                    padding="VALID"))))
  # 1-D conv, depth 2, (sqrt(2), 0.1); [batch, length, channels].
  x1 = rng.standard_normal((3, 10, 1))
  x2 = rng.standard_normal((2, 10, 1))
  cases.append(("conv1d_d2_sqrt2_b0p1", conv_layers(2, SQRT2, 0.1, (3,)),
                x1, x2,
                dict(family="conv1d", depth=2, W_std=SQRT2, b_std=0.1,
                     W_std_expr="sqrt(2)", filter_shape=[3],
                     padding="SAME", layout="NWC")))
  return cases


# ------------------------- numpy cross-check (float64) -----------------------


def _conv_avg(k, filt, n_sp):
  """A(K)[.., p, q] = mean_d K[.., p + d, q + d], SAME zero padding."""
  pads = [(0, 0)] * 2 + [((f - 1) // 2, f // 2) for f in filt] * 2
  kp = np.pad(k, pads)
  sp = k.shape[2:2 + n_sp]
  out = np.zeros_like(k)
  for d in np.ndindex(*filt):
    sl = tuple(slice(di, di + s) for di, s in zip(d, sp))
    out += kp[(slice(None), slice(None)) + sl + sl]
  return out / np.prod(filt)


def _pool_matrix(sp, window, strides):
  """P [P_out, P_in] of a VALID average pool on the flattened positions."""
  out_sp = tuple((s - w) // st + 1 for s, w, st in zip(sp, window, strides))
  p = np.zeros((int(np.prod(out_sp)), int(np.prod(sp))))
  for a, oa in enumerate(np.ndindex(*out_sp)):
    for d in np.ndindex(*window):
      q = tuple(o * st + di for o, st, di in zip(oa, strides, d))
      p[a, np.ravel_multi_index(q, sp)] += 1.0 / np.prod(window)
  return p, out_sp


def numpy_kernels(layers, x):
  """Joint (nngp, ntk) [N, N] of the rows of x = [x1; x2]."""
  n = x.shape[0]
  sp = x.shape[1:-1]
  xf = x.reshape(n, -1, x.shape[-1])
  nngp = np.einsum("ipc,jqc->ijpq", xf, xf) / x.shape[-1]
  ntk = np.zeros_like(nngp)
  for layer in layers:
    kind = layer[0]
    npos = int(np.prod(sp))
    if kind == "dense":
      assert npos == 1
      _, _, w, b = layer
      nngp = w**2 * nngp + b**2
      ntk = nngp + w**2 * ntk
    elif kind == "conv":
      _, _, filt, w, b = layer
      shp = (n, n) + sp + sp
      a_nngp = _conv_avg(nngp.reshape(shp), filt, len(sp)).reshape(nngp.shape)
      a_ntk = _conv_avg(ntk.reshape(shp), filt, len(sp)).reshape(ntk.shape)
      nngp = w**2 * a_nngp + b**2
      ntk = nngp + w**2 * a_ntk
    elif kind == "relu":
      var = np.einsum("iipp->ip", nngp)  # [N, P]
      prod = var[:, None, :, None] * var[None, :, None, :]
      sq = np.sqrt(prod)
      theta = np.arctan2(np.sqrt(np.maximum(prod - nngp**2, 0.0)), nngp)
      nngp = sq / (2 * np.pi) * (np.sin(theta) + (np.pi - theta) * np.cos(theta))
      ntk = ntk * (np.pi - theta) / (2 * np.pi)
    elif kind in ("avgpool", "gap"):
      if kind == "gap":
        pm, sp = np.full((1, npos), 1.0 / npos), ()
      else:
        pm, sp = _pool_matrix(sp, layer[1], layer[2])
      nngp = np.einsum("ap,ijpq,bq->ijab", pm, nngp, pm)
      ntk = np.einsum("ap,ijpq,bq->ijab", pm, ntk, pm)
    else:
      raise ValueError(kind)
  assert int(np.prod(sp)) == 1
  return nngp[:, :, 0, 0], ntk[:, :, 0, 0]


# ------------------------------------ main -----------------------------------


def versions() -> dict:
  v = {"python": platform.python_version()}
  for pkg in ("jax", "jaxlib", "neural-tangents", "numpy", "scipy",
              "frozendict", "ml_dtypes", "opt_einsum"):
    v[pkg] = importlib.metadata.version(pkg)
  return v


def main():
  rng = np.random.default_rng(SEED)
  arrays, cases_meta = {}, []
  for name, layers, x1, x2, params in build_cases(rng):
    worst = 0.0
    arch = arch_str(layers)
    _, _, kernel_fn = eval(arch, {"stax": stax})  # the stored string itself
    k = kernel_fn(x1, x2, ("nngp", "ntk"))
    nngp = np.asarray(k.nngp, dtype=np.float64)
    ntk = np.asarray(k.ntk, dtype=np.float64)
    n1 = x1.shape[0]
    n2 = n1 if x2 is None else x2.shape[0]
    assert nngp.shape == ntk.shape == (n1, n2), (name, nngp.shape)
    assert nngp.dtype == np.float64

    xj = x1 if x2 is None else np.concatenate([x1, x2], axis=0)
    ref_nngp, ref_ntk = numpy_kernels(layers, xj)
    cols = slice(0, n1) if x2 is None else slice(n1, n1 + n2)
    for got, ref, what in ((nngp, ref_nngp[:n1, cols], "nngp"),
                           (ntk, ref_ntk[:n1, cols], "ntk")):
      err = np.max(np.abs(got - ref)) / np.max(np.abs(ref))
      assert err < 1e-7, (name, what, err)
      worst = max(worst, err)
    if x2 is None:
      np.testing.assert_allclose(nngp, nngp.T, rtol=1e-12)
      np.testing.assert_allclose(ntk, ntk.T, rtol=1e-12)

    arrays[f"{name}/x1"] = x1
    if x2 is not None:
      arrays[f"{name}/x2"] = x2
    arrays[f"{name}/nngp"] = nngp
    arrays[f"{name}/ntk"] = ntk
    cases_meta.append(dict(
        name=name,
        architecture=arch,
        kernel_call=("kernel_fn(x1, None, ('nngp', 'ntk'))" if x2 is None
                     else "kernel_fn(x1, x2, ('nngp', 'ntk'))"),
        x2_is_none=x2 is None,
        x1_shape=list(x1.shape),
        x2_shape=None if x2 is None else list(x2.shape),
        params=params,
        keys=[f"{name}/{s}" for s in
              (("x1", "nngp", "ntk") if x2 is None
               else ("x1", "x2", "nngp", "ntk"))],
    ))
    print(f"{name}: {nngp.shape}, numpy cross-check max rel err {worst:.1e}")

  meta = dict(
      generator="benchmarks/reference/make_nt_kernel_fixtures.py",
      seed=SEED,
      versions=versions(),
      reference="neural_tangents.stax (infinite-width kernel_fn), float64",
      notes=[
          "Arrays are float64; '<case>/nngp' and '<case>/ntk' are [n1, n2] "
          "= kernel_fn(x1, x2, ('nngp', 'ntk')).nngp / .ntk.",
          "Cases with x2_is_none=true have no '<case>/x2' key: the kernel is "
          "kernel_fn(x1, None), i.e. x1 against itself ([n1, n1], symmetric; "
          "its diagonal holds the output variances).",
          "'architecture' is the exact string eval'ed with stax = "
          "neural_tangents.stax; widths (512, 64, 1) do not enter the "
          "infinite-width kernels in the NTK parameterisation.",
          "Inputs: seeded numpy default_rng standard normals, scaled by "
          "x1_scale / x2_scale where given. Conv inputs are channels-last "
          "(NHWC for 2-D, NWC for 1-D), neural-tangents' default.",
          "Conventions (checked in numpy in the script, agreement ~1e-15, except "
          "~9e-9 relative on the NTK diagonal of the x2_is_none cases, where "
          "neural-tangents gets theta ~ 1e-8 instead of 0 from rounding): "
          "input nngp = x.x'/C per position pair (C = channels); Dense/Conv: "
          "nngp <- W^2 A(nngp) + b^2, ntk <- nngp_new + W^2 A(ntk), Conv "
          "A(K)[p,q] = (1/|filter|) sum_d K[p+d, q+d] with SAME zero padding "
          "(divisor stays |filter|); Relu: arc-cosine formulas with "
          "k11 = K[i,i,p,p], k22 = K[j,j,q,q]; AvgPool/GlobalAvgPool: "
          "K'[a,b] = mean_{p in win(a), q in win(b)} K[p,q].",
      ],
      cases=cases_meta,
  )
  write_fixture(FIXTURE, arrays, meta)


if __name__ == "__main__":
  main()
