"""Several teachers in one step: grouping, the vmapped forward against each
teacher run alone, the loop baseline, and teachers sharded over a mesh axis
(8 fake CPU devices, see conftest.py)."""

import re

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from jdistill.models import create_model
from jdistill.train import FunctionalModel
from jdistill.train.ensemble import TeacherEnsemble, shard_teachers


def _teacher(name, seed, classes=10, **kw):
  return FunctionalModel.split(create_model(
      name, num_classes=classes, input_shape=(40,), rngs=nnx.Rngs(seed), **kw))


@pytest.fixture(scope="module")
def teachers():
  # Four cnn1d teachers (one stacked group) with an mlp in the middle.
  ts = [_teacher("cnn1d", s, channels=(8, 8)) for s in range(4)]
  ts.insert(2, _teacher("mlp", 9, hidden_sizes=(16,)))
  x = np.random.default_rng(0).normal(size=(16, 40)).astype(np.float32)
  alone = [m.apply(p, s, x, train=False) for m, p, s in ts]
  return ts, x, alone


def test_groups_by_architecture_and_keeps_the_teachers_order(teachers):
  ts, x, alone = teachers
  ens, variables = TeacherEnsemble.create(ts)
  assert ens.groups == ((0, 1, 3, 4), (2,))
  assert jax.tree.leaves(variables[0])[0].shape[0] == 4
  logits, feats = jax.jit(lambda v, x: ens.apply(
      v, x, taps=("penultimate",)))(variables, x)
  assert logits.shape == (5, 16, 10)
  for i, (l, f, _) in enumerate(alone):
    np.testing.assert_allclose(logits[i], l, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(feats[i]["penultimate"], f["penultimate"],
                               rtol=1e-5, atol=1e-6)
  loop = jax.jit(ens.apply_loop)(variables, x)
  np.testing.assert_allclose(loop, logits, rtol=1e-5, atol=1e-6)


def test_sharded_teachers_equal_replicated_and_parameters_stay_local(
    teachers):
  ts, x, alone = teachers
  ens, variables = TeacherEnsemble.create(ts)
  mesh = jax.make_mesh((2, 4), ("data", "teacher"),
                       axis_types=(AxisType.Auto,) * 2)
  placed = shard_teachers(variables, mesh, "teacher")
  assert placed[0]["params"]["head"]["kernel"].sharding.spec == P("teacher")
  assert placed[1]["params"]["head"]["kernel"].sharding.spec == P()  # 1 mlp.
  xs = jax.device_put(x, NamedSharding(mesh, P("data")))
  sharded = ens.sharded(mesh, "teacher")
  fn = jax.jit(lambda v, x: sharded.apply(v, x)[0],
               out_shardings=NamedSharding(mesh, P()))
  out = fn(placed, xs)
  replicated = jax.jit(lambda v, x: ens.apply(v, x)[0])(variables, x)
  np.testing.assert_allclose(out, replicated, rtol=1e-6, atol=1e-6)
  for i, (l, _, _) in enumerate(alone):
    np.testing.assert_allclose(out[i], l, rtol=1e-5, atol=1e-6)
  # Only logits ([teachers, batch, 10]) are gathered, never a parameter.
  hlo = fn.lower(placed, xs).compile().as_text()
  gathered = re.findall(r"= f32\[([\d,]+)\][^=]*? all-gather\(", hlo)
  assert gathered and all(s.endswith(",10") for s in gathered), gathered


def test_errors():
  with pytest.raises(ValueError, match="at least one teacher"):
    TeacherEnsemble.create([])
  ens, variables = TeacherEnsemble.create(
      [_teacher("mlp", 0, hidden_sizes=(8,)),
       _teacher("mlp", 1, classes=7, hidden_sizes=(8,))])
  x = np.zeros((2, 40), np.float32)
  with pytest.raises(ValueError, match=r"teacher 0: \(2, 10\), teacher 1: "
                     r"\(2, 7\)\); every teacher must predict the same"):
    ens.apply(variables, x)
  mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
  with pytest.raises(ValueError, match="teacher axis 'model' is not an axis "
                     "of the mesh"):
    ens.sharded(mesh, "model")


def test_stacking_strategies_agree_and_auto_avoids_slow_vmaps_on_cpu():
  """On CPU, vmapping convolutions or attention over their weights is slower
  than separate forwards (benchmarks/multi_teacher_step.py), so ``auto``
  loops over those teachers and vmaps the others."""
  import dataclasses
  teachers = [FunctionalModel.split(create_model(
      "convnet", num_classes=10, input_shape=(8, 8, 1), rngs=nnx.Rngs(s),
      width=8, depth=2)) for s in range(2)]
  x = np.random.default_rng(1).normal(size=(4, 8, 8, 1)).astype(np.float32)
  ens, variables = TeacherEnsemble.create(teachers)
  assert ens._stacking(ens.models[0], variables[0], x) == "loop"
  outs = [jax.jit(lambda v, x, e=dataclasses.replace(ens, stacking=k):
                  e.apply(v, x)[0])(variables, x)
          for k in ("vmap", "map", "loop")]
  for out in outs[1:]:
    np.testing.assert_allclose(out, outs[0], rtol=1e-5, atol=1e-6)
  x1d = np.zeros((2, 40), np.float32)
  for name, kw, expected in (("cnn1d", {"channels": (8,)}, "loop"),
                             ("vit", {"dim": 8, "depth": 1, "num_heads": 2,
                                      "patch_size": 5}, "loop"),
                             ("mlp", {"hidden_sizes": (8,)}, "vmap")):
    ens1d, v1d = TeacherEnsemble.create(
        [_teacher(name, s, **kw) for s in range(2)])
    assert ens1d._stacking(ens1d.models[0], v1d[0], x1d) == expected, name
  cnn = [_teacher("cnn1d", s, channels=(8,)) for s in range(2)]
  with pytest.raises(ValueError, match="stacking='scan': expected one of"):
    TeacherEnsemble.create(cnn, stacking="scan")
