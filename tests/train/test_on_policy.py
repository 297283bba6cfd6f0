"""On-policy LM distillation (`jdistill.train.on_policy`): GKD's mixed
batches, DistiLLM's adaptive replay (against a transcription of its
``finetune.py`` rule), determinism from ``(seed, step)``, composition with
the fused loss and gradient accumulation, and the sample scorer."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jdistill import generate as gen_lib
from jdistill import train as jtrain
from jdistill.models import CausalLM
from jdistill.train import lm
from jdistill.train import on_policy as op

V, T, B, P = 23, 8, 6, 3


def _model(dim, depth, seed):
  return jtrain.FunctionalModel.split(
      CausalLM(V, dim=dim, depth=depth, num_heads=2, max_len=T,
               rngs=nnx.Rngs(seed)))


@pytest.fixture(scope="module")
def models():
  student, sp, ss = _model(16, 1, 0)
  teacher, tp, ts = _model(24, 2, 1)
  return student, sp, ss, teacher, {"params": tp, "model_state": ts}


def _batch(seed=0, b=B):
  rng = np.random.default_rng(seed)
  x = rng.integers(0, V, size=(b, T)).astype(np.int32)
  y = np.concatenate([x[:, 1:], rng.integers(0, V, (b, 1))], 1).astype(
      np.int32)
  return {"x": x, "y": y, "token_mask": np.ones((b, T), bool)}


def _objective(**kw):
  return lm.LMDistillObjective(loss="jsd", loss_kwargs=(("beta", 0.5),), **kw)


def _state(sp, ss, tx, loss_state=None):
  state = jtrain.TrainState.create(sp, ss, tx, 0)
  return state.replace(loss_state=loss_state or {})


def _assert_trees_equal(a, b):
  jax.tree.map(lambda u, v: np.testing.assert_array_equal(
      np.asarray(u), np.asarray(v)), a, b)


def test_completion_targets_masks_the_prompt():
  batch = _batch()
  batch["token_mask"][1, 6:] = False
  out = op.completion_targets(jax.tree.map(jnp.asarray, batch), P)
  want = (np.arange(T)[None] >= P - 1) & batch["token_mask"]
  np.testing.assert_array_equal(np.asarray(out["token_mask"]), want)


def test_fraction_zero_is_off_policy_kd_on_completions(models):
  student, sp, ss, teacher, tv = models
  tx = optax.adam(1e-2)
  batch = _batch(1)
  on = op.OnPolicy(fraction=0.0, prompt_len=P)
  got = jax.jit(op.make_on_policy_distill_step(
      student, tx, _objective(), teacher, on))(_state(sp, ss, tx), tv, batch)
  masked = dict(batch, token_mask=np.asarray(
      op.completion_targets(jax.tree.map(jnp.asarray, batch), P)[
          "token_mask"]))
  want = jax.jit(lm.make_lm_distill_step(student, tx, _objective(),
                                         teacher))(_state(sp, ss, tx), tv,
                                                   masked)
  _assert_trees_equal(got[0].params, want[0].params)


def test_fraction_one_trains_on_the_students_samples(models):
  """λ = 1: the step equals the plain KD step on the batch that
  `student_batch` samples with the key of (seed, step)."""
  student, sp, ss, teacher, tv = models
  tx = optax.adam(1e-2)
  batch = jax.tree.map(jnp.asarray, _batch(2))
  on = op.OnPolicy(fraction=1.0, prompt_len=P, seed=5)
  state = _state(sp, ss, tx)
  got_state, metrics = jax.jit(op.make_on_policy_distill_step(
      student, tx, _objective(), teacher, on))(state, tv, batch)
  assert float(metrics["on_policy"]) == 1.0
  key = jax.random.fold_in(jax.random.key(5 + 104729), 0)
  _, k_gen, _ = jax.random.split(key, 3)
  sampled = op.student_batch(student, sp, ss, op.completion_targets(batch, P),
                             k_gen, on)
  # The prompt is kept, the completion is the student's.
  np.testing.assert_array_equal(np.asarray(sampled["x"][:, :P]),
                                np.asarray(batch["x"][:, :P]))
  np.testing.assert_array_equal(np.asarray(sampled["x"][:, 1:]),
                                np.asarray(sampled["y"][:, :-1]))
  assert not np.asarray(sampled["token_mask"][:, :P - 1]).any()
  assert np.asarray(sampled["token_mask"][:, P - 1:]).all()  # No EOS.
  want_state, _ = jax.jit(lm.make_lm_distill_step(
      student, tx, _objective(), teacher))(state, tv, sampled)
  _assert_trees_equal(got_state.params, want_state.params)


def test_branches_follow_fraction_and_are_deterministic(models):
  student, sp, ss, teacher, tv = models
  tx = optax.sgd(0.0)
  batch = _batch(3)
  on = op.OnPolicy(fraction=0.3, prompt_len=P, seed=1)
  step = jax.jit(op.make_on_policy_distill_step(student, tx, _objective(),
                                                teacher, on))
  n = 40
  flags = []
  state = _state(sp, ss, tx)
  for _ in range(n):
    state, m = step(state, tv, batch)
    flags.append(float(m["on_policy"]))
  # Binomial(40, 0.3): mean 12, sd 2.9; 4 sd either side (p < 1e-4).
  assert 0 < sum(flags) < 24
  again = []
  state = _state(sp, ss, tx)
  for _ in range(n):
    state, m = step(state, tv, batch)
    again.append(float(m["on_policy"]))
  assert flags == again  # The key is (seed, step): a rerun is identical.


def _distillm_rule(r, theta, size, cap, step, total, bs):
  """finetune.py of jongwooko/distillm @ 17c0f98, replay_ratio=decreasing."""
  samp = theta * (1 - step / total)
  if r < samp or (r < theta and size < cap):
    return op.GENERATED
  if r < theta and size >= bs:
    return op.REPLAY
  return op.DATA


def test_distillm_branch_rule_matches_reference():
  on = op.OnPolicy(schedule="distillm", prompt_len=P, capacity=8,
                   num_steps=100)
  rng = np.random.default_rng(0)
  for _ in range(300):
    r, theta = rng.uniform(), rng.choice([0.0, 0.1, 0.5, 1.0])
    size, step = int(rng.integers(0, 9)), int(rng.integers(0, 100))
    state = dict(op.init_replay(T, on), threshold=jnp.float32(theta),
                 replay_size=jnp.int32(size))
    got = int(op._distillm_branch(state, jnp.float32(r), jnp.int32(step), on,
                                  B))
    assert got == _distillm_rule(r, theta, size, 8, step, 100, B), (
        r, theta, size, step)


def test_replay_buffer_is_a_ring_and_draws_filled_rows_without_replacement():
  on = op.OnPolicy(schedule="distillm", prompt_len=P, capacity=5)
  state = op.init_replay(T, on)
  for i in range(3):  # 3 x 2 rows into 5 slots: the first row is evicted.
    x = jnp.full((2, T), 10 * i + jnp.arange(2)[:, None], jnp.int32)
    state = op._push(state, {"x": x, "y": x + 1,
                             "token_mask": jnp.ones((2, T), bool)})
  assert int(state["replay_size"]) == 5 and int(state["replay_next"]) == 1
  np.testing.assert_array_equal(np.asarray(state["replay_x"][:, 0]),
                                [21, 1, 10, 11, 20])
  template = {"x": jnp.zeros((4, T), jnp.int32),
              "y": jnp.zeros((4, T), jnp.int32),
              "token_mask": jnp.zeros((4, T), bool)}
  small = op.init_replay(T, on)
  small = op._push(small, {"x": jnp.arange(3)[:, None] + jnp.zeros(
      (3, T), jnp.int32), "y": jnp.zeros((3, T), jnp.int32),
                           "token_mask": jnp.ones((3, T), bool)})
  seen = set()
  for k in range(20):
    out = op._replayed(small, dict(template, x=template["x"][:3],
                                   y=template["y"][:3],
                                   token_mask=template["token_mask"][:3]),
                       jax.random.key(k))
    rows = np.asarray(out["x"][:, 0])
    assert sorted(rows) == [0, 1, 2]  # Only filled rows, each once.
    seen.add(tuple(rows))
  assert len(seen) > 1  # And in random order.


def test_update_threshold_follows_reference():
  on = op.OnPolicy(schedule="distillm", prompt_len=P, loss_eps=0.1)
  losses = [3.0, 2.5, 2.65, 2.61, 2.8, 2.7, 2.95, 3.5, 9, 9.5, 10, 11, 12,
            13, 14, 15, 16, 17]
  state = op.init_replay(T, on)
  theta, prev = 0.0, None
  for loss in losses:
    state = op.update_threshold(state, loss, on)
    if prev is None:
      prev = loss
    elif loss >= prev + 0.1:
      theta, prev = min(theta + 0.1, 1.0), loss
    np.testing.assert_allclose(float(state["threshold"]), theta, atol=1e-6)
    np.testing.assert_allclose(float(state["reference_loss"]), prev,
                               rtol=1e-6)
  assert float(state["threshold"]) == pytest.approx(1.0)


def test_distillm_step_fills_replays_and_resumes_identically(models):
  student, sp, ss, teacher, tv = models
  tx = optax.adam(1e-3)
  batch = _batch(4)
  on = op.OnPolicy(schedule="distillm", prompt_len=P, capacity=2 * B,
                   init_threshold=1.0, num_steps=6, seed=3)
  step = jax.jit(op.make_on_policy_distill_step(student, tx, _objective(),
                                                teacher, on))
  state = _state(sp, ss, tx, op.init_replay(T, on))
  log = []
  states = []
  for _ in range(6):
    state, m = step(state, tv, batch)
    states.append(state)
    log.append((float(m["on_policy"]), float(m["replay"]),
                float(m["replay_size"])))
  # θ = 1: generate until the buffer is full, then the decreasing ratio.
  assert log[0][0] == 1.0 and log[1][0] == 1.0 and log[1][2] == 2 * B
  assert all(a + b <= 1 for a, b, _ in log)
  # Resume from step 3 reproduces steps 4..6 exactly.
  resumed = states[2]
  for i in range(3, 6):
    resumed, _ = step(resumed, tv, batch)
  _assert_trees_equal(resumed.params, states[-1].params)
  _assert_trees_equal(resumed.loss_state, states[-1].loss_state)


def test_fused_and_grad_accum_compose(models):
  student, sp, ss, teacher, tv = models
  tx = optax.sgd(0.1)
  batch = _batch(5)
  on = op.OnPolicy(fraction=1.0, prompt_len=P, seed=2)
  outs = []
  for fused, k in ((False, 1), (True, 2)):
    step = jax.jit(op.make_on_policy_distill_step(
        student, tx, _objective(fused=fused, chunk_size=8), teacher, on,
        grad_accum_steps=k))
    outs.append(step(_state(sp, ss, tx), tv, batch))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(
      np.asarray(a), np.asarray(b), rtol=2e-4, atol=1e-6),
               outs[0][0].params, outs[1][0].params)
  np.testing.assert_allclose(float(outs[0][1]["kd"]), float(outs[1][1]["kd"]),
                             rtol=1e-4)


def test_sample_scorer_is_the_teachers_nll_of_the_samples(models):
  student, sp, ss, teacher, tv = models
  sv = {"params": sp, "model_state": ss}
  batch = jax.tree.map(jnp.asarray, _batch(6))
  new = T + 1 - P
  key = jax.random.key(0)
  got = jax.jit(op.make_sample_scorer(student, teacher, prompt_len=P,
                                      max_new_tokens=new))(sv, tv, batch, key)
  full = gen_lib.generate(student, sv, batch["x"][:, :P], max_new_tokens=new,
                          temperature=1.0, key=key)
  logits, _, _ = teacher.apply(tv["params"], tv["model_state"],
                               full[:, :-1], train=False)
  logp = jax.nn.log_softmax(np.asarray(logits, np.float64), -1)
  nll = -np.take_along_axis(np.asarray(logp), np.asarray(full)[:, 1:, None],
                            -1)[..., 0]
  want = nll[:, P - 1:].sum()
  assert int(got["count"]) == B * new
  np.testing.assert_allclose(float(got["teacher_nll_sum"]), want, rtol=1e-5)


@pytest.mark.parametrize("kwargs, match", [
    (dict(fraction=1.5), "--on_policy_fraction=1.5"),
    (dict(fraction=-0.1), "--on_policy_fraction"),
    (dict(temperature=0.0, top_k=5), "--gen_top_k=5"),
    (dict(top_p=0.0), "--gen_top_p must be None or a number in"),
    (dict(schedule="nope"), "--on_policy_schedule"),
    (dict(prompt_len=0), "--lm_prompt_len=0"),
])
def test_bad_settings_are_one_line_errors(kwargs, match):
  with pytest.raises(ValueError, match=match) as e:
    op.OnPolicy(**{"prompt_len": P, **kwargs})
  assert "\n" not in str(e.value)


def test_prompt_must_leave_completion_and_cache_sources_are_refused(models):
  student, _, _, teacher, _ = models
  with pytest.raises(ValueError, match="--lm_prompt_len=8"):
    op.OnPolicy(fraction=0.5, prompt_len=T).max_new_tokens(T)
  with pytest.raises(ValueError, match="online teacher"):
    op.make_on_policy_distill_step(
        student, optax.sgd(0.1), _objective(source="topk"), teacher,
        op.OnPolicy(fraction=0.5, prompt_len=P))


def test_bfloat16_student_samples_and_trains(models):
  """A bfloat16-compute student generates (cache in bf16) and trains; the
  loss is finite and float32."""
  student, sp, ss, teacher, tv = models
  bf16 = jtrain.FunctionalModel(student.graphdef, jnp.bfloat16)
  tx = optax.adam(1e-3)
  on = op.OnPolicy(fraction=1.0, prompt_len=P, seed=4, top_k=5)
  state, metrics = jax.jit(op.make_on_policy_distill_step(
      bf16, tx, _objective(), teacher, on))(_state(sp, ss, tx), tv,
                                            _batch(7))
  assert metrics["loss"].dtype == jnp.float32
  assert np.isfinite(float(metrics["loss"])) and float(metrics["kd"]) > 0
  assert float(metrics["on_policy"]) == 1.0


def test_distillm_step_on_8_devices_equals_1_device(models):
  """The batch sharded over 8 devices: the same samples (the key does not
  depend on the sharding), the same buffer and the same update."""
  student, sp, ss, teacher, tv = models
  on = op.OnPolicy(schedule="distillm", prompt_len=P, capacity=16,
                   init_threshold=1.0, num_steps=4, seed=6)
  tx = optax.sgd(0.5)
  batch = _batch(8, b=8)
  results = []
  for n in (1, 8):
    mesh = jtrain.make_data_mesh(n)
    step = jtrain.compile_step(op.make_on_policy_distill_step(
        student, tx, _objective(), teacher, on), mesh)
    state = jtrain.replicate(_state(sp, ss, tx, op.init_replay(T, on)), mesh)
    for _ in range(2):
      state, metrics = step(state, jtrain.replicate(tv, mesh),
                            jtrain.put_batch(batch, mesh))
    results.append(jax.device_get((state, metrics)))
  (s1, m1), (s8, m8) = results
  np.testing.assert_array_equal(s1.loss_state["replay_x"],
                                s8.loss_state["replay_x"])
  assert float(m1["on_policy"]) == float(m8["on_policy"]) == 1.0
  np.testing.assert_allclose(m8["loss"], m1["loss"], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s8.params)):
    np.testing.assert_allclose(a, b, atol=2e-6)
