"""Feature distillation in the train layer: projectors, feature terms of the
objective, the distill step with projector parameters, and checkpoints."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jdistill import losses
from jdistill import train as jtrain


class TapModel(nnx.Module):
  """A user model with two taps: ``map`` [B, 4, C] and ``vec`` [B, C]."""

  def __init__(self, channels, classes=3, *, rngs):
    self.conv = nnx.Conv(2, channels, kernel_size=(3,), rngs=rngs)
    self.head = nnx.Linear(channels, classes, rngs=rngs)
    self.feature_names = ("map", "vec")

  def __call__(self, x, *, train=False):
    h = jax.nn.relu(self.conv(x))
    v = jnp.mean(h, axis=1)
    return self.head(v), {"map": h, "vec": v}


def _setup(student_channels=5, teacher_channels=7):
  student, sp, sms = jtrain.FunctionalModel.split(
      TapModel(student_channels, rngs=nnx.Rngs(0)))
  teacher, tp, tms = jtrain.FunctionalModel.split(
      TapModel(teacher_channels, rngs=nnx.Rngs(1)))
  rng = np.random.default_rng(0)
  batch = {"x": rng.normal(size=(8, 4, 2)).astype(np.float32),
           "y": rng.integers(0, 3, 8).astype(np.int32)}
  return student, (sp, sms), teacher, {"params": tp, "model_state": tms}, batch


@pytest.mark.parametrize("kind, s, t, pattern", [
    ("identity", (4, 5), (4, 7), r"--projector=identity: student feature "
     r"'map' has shape \(4, 5\) and teacher feature 'tmap' has shape \(4, 7\)"
     r"; expected equal shapes"),
    ("linear", (8, 5), (4, 7), r"maps the channel \(last\) axis only"),
    ("conv1x1", (5,), (7,), r"a 1x1 convolution needs a spatial feature"),
    ("fancy", (5,), (7,), r"--projector=fancy: expected one of: identity, "
     r"linear, conv1x1, mlp, orthogonal"),
])
def test_projector_shape_errors(kind, s, t, pattern):
  with pytest.raises(ValueError, match=pattern):
    jtrain.check_projectable(kind, s, t, student_tap="map", teacher_tap="tmap")


@pytest.mark.parametrize("kind", ["linear", "conv1x1", "mlp", "orthogonal"])
def test_projectors_map_channels(kind):
  proj, params = jtrain.FunctionalProjectors.create([(kind, (4, 5), (4, 7))])
  x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 4, 5)), jnp.float32)
  (y,) = proj.apply(params, [x])
  assert y.shape == (2, 4, 7)
  if kind == "linear":
    p = params["layers"][0]
    np.testing.assert_allclose(y, x @ p["kernel"] + p["bias"], rtol=1e-5,
                               atol=1e-6)
  if kind == "orthogonal":
    # Starts at the truncated identity and keeps orthonormal columns.
    np.testing.assert_allclose(y[..., :5], x, atol=1e-6)
    w = jnp.asarray(np.random.default_rng(2).normal(size=(7, 5)), jnp.float32)
    q = losses.orthogonal_projection(w)
    np.testing.assert_allclose(q.T @ q, np.eye(5), atol=1e-5)


def _objective(weight=0.5, projector="linear"):
  return jtrain.DistillObjective(
      loss="kd", temperature=2.0, ce_weight=1.0, kd_weight=1.0,
      feature_terms=(
          jtrain.FeatureTerm("hint", "map", "map", weight=weight,
                             projector=projector),
          jtrain.FeatureTerm("rkd_distance", "vec", "vec", weight=2.0,
                             projector="identity")))


def test_feature_step_loss_and_projector_gradients():
  student, (sp, sms), teacher, tvars, batch = _setup()
  obj = _objective()
  proj, pparams = jtrain.FunctionalProjectors.create(
      [("linear", (4, 5), (4, 7)), ("identity", (5,), (7,))])
  tx = optax.sgd(0.1)
  state = jtrain.TrainState.create(sp, sms, tx, 0, projector_params=pparams)
  step = jax.jit(jtrain.make_distill_step(student, teacher, tx, obj, proj))
  new, m = step(state, tvars, batch)

  # The loss is the sum of its parts, each computed here independently.
  s_logits, s_feats, _ = student.apply(sp, sms, batch["x"], train=True)
  t_logits, t_feats, _ = teacher.apply(tvars["params"], tvars["model_state"],
                                       batch["x"], train=False)
  proj_map = (s_feats["map"] @ pparams["layers"][0]["kernel"]
              + pparams["layers"][0]["bias"])
  hint = np.mean((np.asarray(proj_map) - np.asarray(t_feats["map"])) ** 2)
  rkd = losses.rkd_distance(s_feats["vec"], t_feats["vec"])
  ce = optax.softmax_cross_entropy_with_integer_labels(s_logits,
                                                       batch["y"]).mean()
  kd = losses.kd(s_logits, t_logits, temperature=2.0).mean()
  np.testing.assert_allclose(m["hint:map:map"], hint, rtol=1e-5)
  np.testing.assert_allclose(m["rkd_distance:vec:vec"], rkd, rtol=1e-5)
  np.testing.assert_allclose(m["loss"], ce + kd + 0.5 * hint + 2.0 * rkd,
                             rtol=1e-5)
  # Gradients reach the projector, which SGD moves; the teacher is frozen.
  moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))),
                       new.projector_params, pparams)
  assert min(jax.tree.leaves(moved)) > 0
  # The projector's gradient is the hint term's alone (RKD uses identity).
  g = jax.grad(lambda k: 0.5 * jnp.mean(
      (s_feats["map"] @ k + pparams["layers"][0]["bias"]
       - t_feats["map"]) ** 2))(pparams["layers"][0]["kernel"])
  np.testing.assert_allclose(
      new.projector_params["layers"][0]["kernel"],
      pparams["layers"][0]["kernel"] - 0.1 * g, rtol=1e-4, atol=1e-6)


def test_state_without_projectors_keeps_the_optimizer_layout():
  _, (sp, sms), _, _, _ = _setup()
  tx = optax.adam(1e-3)
  state = jtrain.TrainState.create(sp, sms, tx, 0)
  assert (jax.tree.structure(state.opt_state)
          == jax.tree.structure(tx.init(sp)))
  assert state.trainables() is sp


def test_feature_weight_schedule():
  term = jtrain.FeatureTerm("hint", "a", "b", weight=0.0,
                            weight_schedule="linear", weight_end=4.0,
                            weight_schedule_steps=10)
  sched = term.schedule(100)
  np.testing.assert_allclose([sched(0), sched(5), sched(50)], [0, 2, 4])


@pytest.mark.parametrize("kwargs, pattern", [
    (dict(loss="fitnet"), r"--feature_loss=fitnet: unknown feature loss; "
     r"expected one of: hint, "),
    (dict(loss="hint", loss_kwargs=(("p", 2.0),)),
     r"--feature_loss_kwargs: 'p' is not a hyperparameter of feature loss "
     r"'hint'; expected one of: beta"),
    (dict(loss="hint", weight=-1.0), r"--feature_weight must be >= 0"),
])
def test_feature_term_errors(kwargs, pattern):
  with pytest.raises(ValueError, match=pattern):
    jtrain.FeatureTerm(student_tap="a", teacher_tap="b", **kwargs)


def test_checkpoint_keeps_projectors_out_of_the_model_item(tmp_path):
  student, (sp, sms), _, _, _ = _setup()
  _, pparams = jtrain.FunctionalProjectors.create([("mlp", (4, 5), (4, 7))])
  tx = optax.adam(1e-3)
  state = jtrain.TrainState.create(sp, sms, tx, 3, projector_params=pparams)
  ckpt = jtrain.Checkpointer(str(tmp_path))
  ckpt.save(state, force=True)
  ckpt.wait()
  zero = jax.tree.map(jnp.zeros_like, state)
  restored = ckpt.restore(zero)
  ckpt.close()
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored)):
    np.testing.assert_array_equal(a, b)
  # The model item (what a teacher or an export reads) is the student only.
  variables = jtrain.load_model_variables(str(tmp_path), sp, sms)
  assert (jax.tree.structure(variables["params"])
          == jax.tree.structure(sp))


def test_ofa_branch_maps_a_feature_map_to_logits_against_the_teacher():
  student, (sp, sms), teacher, tvars, batch = _setup()
  term = jtrain.FeatureTerm("ofa", "map", "logits", projector="ofa",
                            loss_kwargs=(("eps", 1.5),))
  obj = jtrain.DistillObjective(loss="kd", ce_weight=1.0, kd_weight=0.0,
                                feature_terms=(term,))
  shapes_s = jtrain.feature_shapes(student, sp, sms, (4, 2))
  shapes_t = jtrain.feature_shapes(teacher, tvars["params"],
                                   tvars["model_state"], (4, 2))
  assert shapes_t["logits"] == (3,)
  proj, pparams = jtrain.build_projectors((term,), shapes_s, shapes_t)
  tx = optax.sgd(0.1)
  state = jtrain.TrainState.create(sp, sms, tx, 0, projector_params=pparams)
  new, m = jax.jit(jtrain.make_distill_step(student, teacher, tx, obj, proj))(
      state, tvars, batch)
  _, s_feats, _ = student.apply(sp, sms, batch["x"], train=True)
  t_logits, _, _ = teacher.apply(tvars["params"], tvars["model_state"],
                                 batch["x"], train=False)
  (branch_logits,) = proj.apply(pparams, [s_feats["map"]])
  assert branch_logits.shape == (8, 3)
  expected = losses.ofa(branch_logits, t_logits, batch["y"], eps=1.5).mean()
  np.testing.assert_allclose(m["ofa:map:logits"], expected, rtol=1e-5)
  assert all(float(jnp.max(jnp.abs(a - b))) > 0 for a, b in zip(
      jax.tree.leaves(new.projector_params), jax.tree.leaves(pparams)))
  with pytest.raises(ValueError, match=r"--projector=ofa: .*the teacher tap "
                                       r"must be 'logits'"):
    jtrain.build_projectors(
        (jtrain.FeatureTerm("ofa", "map", "map", projector="ofa"),),
        shapes_s, shapes_t)


def test_contrastive_memory_bank_lives_in_the_loss_state():
  """The bank is a FIFO of the teacher's embeddings: each step reads the
  bank as it was before the step and writes the batch (masked rows kept)."""
  student, (sp, sms), teacher, tvars, batch = _setup(5, 5)
  term = jtrain.FeatureTerm("contrastive", "vec", "vec", weight=1.0,
                            loss_kwargs=(("temperature", 0.5),
                                         ("memory_size", 16)))
  assert term.state_kind == "memory_bank"
  obj = jtrain.DistillObjective(loss="kd", kd_weight=0.0,
                                feature_terms=(term,))
  with pytest.raises(ValueError, match=r"keep a state; pass feature_states"):
    obj.init_loss_state()
  bank0 = term.init_state((5,), key=jax.random.key(3))
  assert bank0.shape == (16, 5)
  proj, pparams = jtrain.FunctionalProjectors.create(
      [("identity", (5,), (5,))])
  tx = optax.sgd(0.0)  # Frozen student: the features are known.
  state = jtrain.TrainState.create(sp, sms, tx, 0, projector_params=pparams,
                                   loss_state=obj.init_loss_state([bank0]))
  step = jax.jit(jtrain.make_distill_step(student, teacher, tx, obj, proj))
  _, s_feats, _ = student.apply(sp, sms, batch["x"], train=False)
  _, t_feats, _ = teacher.apply(tvars["params"], tvars["model_state"],
                                batch["x"], train=False)
  s_vec, t_vec = np.asarray(s_feats["vec"]), np.asarray(t_feats["vec"])
  expected_bank = np.asarray(bank0).copy()
  mask = np.array([True] * 6 + [False] * 2)
  for i in range(3):
    b = dict(batch, mask=mask) if i == 1 else batch
    new, m = step(state, tvars, b)
    ref = losses.contrastive(s_vec, t_vec, temperature=0.5,
                             negatives=expected_bank,
                             example_mask=b.get("mask"))
    np.testing.assert_allclose(m["contrastive:vec:vec"], ref, rtol=1e-5)
    rows = slice((i % 2) * 8, (i % 2) * 8 + 8)
    keep = b.get("mask", np.ones(8, bool))
    expected_bank[rows] = np.where(keep[:, None], t_vec,
                                   expected_bank[rows])
    np.testing.assert_allclose(new.loss_state["features"]["0"],
                               expected_bank, rtol=1e-6)
    state = new


def test_nd_term_uses_class_centres_from_the_loss_state():
  student, (sp, sms), teacher, tvars, batch = _setup(7, 7)
  term = jtrain.FeatureTerm("nd", "vec", "vec", weight=2.0)
  assert term.state_kind == "class_centers"
  obj = jtrain.DistillObjective(loss="kd", feature_terms=(term,))
  # Class sums of the teacher's tap over the data, as the program does.
  sums = jax.jit(jtrain.make_class_sums_step(teacher, ["vec"]))(
      tvars["params"], tvars["model_state"], batch)
  _, t_feats, _ = teacher.apply(tvars["params"], tvars["model_state"],
                                batch["x"], train=False)
  t_vec = np.asarray(t_feats["vec"], np.float64)
  onehot = np.eye(3)[batch["y"]]
  np.testing.assert_allclose(sums["count"], onehot.sum(0))
  np.testing.assert_allclose(sums["vec"], onehot.T @ t_vec, rtol=1e-5)
  centers = np.asarray(sums["vec"]) / np.maximum(sums["count"], 1)[:, None]
  with pytest.raises(ValueError, match=r"expected \[num_classes, 7\]"):
    term.init_state((7,), class_centers=centers[:, :3])
  proj, pparams = jtrain.FunctionalProjectors.create(
      [("identity", (7,), (7,))])
  tx = optax.sgd(0.1)
  state = jtrain.TrainState.create(
      sp, sms, tx, 0, projector_params=pparams,
      loss_state=obj.init_loss_state([term.init_state(
          (7,), class_centers=centers)]))
  new, m = jax.jit(jtrain.make_distill_step(student, teacher, tx, obj, proj))(
      state, tvars, batch)
  # Paper formula in numpy: 1 - <f_s, mu_y/|mu_y|> / max(|f_s|, |f_t|).
  _, s_feats, _ = student.apply(sp, sms, batch["x"], train=False)
  s_vec = np.asarray(s_feats["vec"], np.float64)
  with np.errstate(invalid="ignore"):  # A class absent from the batch.
    unit = centers / np.linalg.norm(centers, axis=1, keepdims=True)
  nd = 1 - np.sum(s_vec * unit[batch["y"]], 1) / np.maximum(
      np.linalg.norm(s_vec, axis=1), np.linalg.norm(t_vec, axis=1))
  np.testing.assert_allclose(m["nd:vec:vec"], nd.mean(), rtol=1e-5)
  # The centres are constant.
  np.testing.assert_array_equal(new.loss_state["features"]["0"],
                                state.loss_state["features"]["0"])


def test_integer_hyperparameters_from_flags_are_cast():
  """Flags give floats; ``num_heads`` must reach the loss as an int."""
  term = jtrain.FeatureTerm("token_relation", "q", "q",
                            loss_kwargs=(("num_heads", 2.0),))
  rng = np.random.default_rng(3)
  s = rng.normal(size=(3, 5, 4)).astype(np.float32)
  t = rng.normal(size=(3, 5, 8)).astype(np.float32)
  np.testing.assert_allclose(
      term.value(s, t, None),
      np.mean(losses.token_relation(s, t, num_heads=2)), rtol=1e-6)
