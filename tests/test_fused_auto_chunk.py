"""The fused loss's automatic chunk (`jdistill.losses.fused.auto_chunk_size`,
`jdistill.train.lm.fused_chunk_size`) and the fused LM step on a mesh
(tokens split over the batch axes, the vocabulary over ``tensor``)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jdistill import train as jtrain
from jdistill.losses import fused
from jdistill.losses.fused import auto_chunk_size
from jdistill.models import CausalLM
from jdistill.train import lm

GiB = 2**30


# ---------------------------------------------------------------------------
# The rule.


@pytest.mark.parametrize("vocab,hidden,tokens,memory,want", [
    # 5 * 256 * 128256 * 4 B = 0.61 GiB <= 1 GiB (1/16 of 16): c_mem = 256;
    # ceil(2048 / 5) = 410 -> c_floor = 512.
    (128256, 2048, 8192, 16 * GiB, 512),
    # 80 GiB: 5 GiB / (5 * 128256 * 4 B) = 2093 -> 2048 (above the floor).
    (128256, 2048, 8192, 80 * GiB, 2048),
    # H = 4096: ceil(4096 / 5) = 820 -> c_floor = 1024 > c_mem = 256.
    (128256, 4096, 8192, 16 * GiB, 1024),
    # 1 GiB / (5 * 32768 * 4 B) = 1638 -> 1024; c_floor = 128.
    (32768, 512, 8192, 16 * GiB, 1024),
    # 128 MiB / (5 * 256000 * 4 B) = 26 -> 16; c_floor = 128; c_min = 256.
    (256000, 512, 65536, 2 * GiB, 256),
    # Everything fits: clamped to the tokens (one chunk).
    (300, 64, 100, 16 * GiB, 100),
    (128256, 2048, 300, 16 * GiB, 300),
])
def test_hand_computed_cases(vocab, hidden, tokens, memory, want):
  assert auto_chunk_size(vocab, hidden, num_tokens=tokens,
                         device_memory_bytes=memory) == want


def _closed_form(vocab, hidden, tokens, memory, fraction, dtype_bytes,
                 c_min):
  """The docstring's formula, by search over powers of two."""
  budget = int(fraction * memory)
  c_mem, c = 0, 1
  while 5 * c * vocab * dtype_bytes <= budget:
    c_mem, c = c, 2 * c
  c_floor = 1
  while 5 * c_floor < hidden:
    c_floor *= 2
  return min(tokens, max(c_mem, c_floor, c_min))


def test_matches_the_closed_form():
  rng = np.random.default_rng(0)
  for _ in range(500):
    vocab = int(rng.integers(1, 300_000))
    hidden = int(rng.integers(1, 20_000))
    tokens = int(rng.integers(1, 200_000))
    memory = int(rng.integers(1, 200 * GiB))
    fraction = float(rng.choice([1 / 16, 1 / 8, 0.5, 1.0]))
    dtype_bytes = int(rng.choice([2, 4]))
    c_min = int(rng.choice([1, 64, 256]))
    got = auto_chunk_size(vocab, hidden, num_tokens=tokens,
                          device_memory_bytes=memory, dtype_bytes=dtype_bytes,
                          memory_fraction=fraction, min_chunk=c_min)
    assert got == _closed_form(vocab, hidden, tokens, memory, fraction,
                               dtype_bytes, c_min), (vocab, hidden, tokens)
    budget = fraction * memory
    if c_min < got < tokens and 5 * (got // 2) >= hidden:  # By the memory:
      assert 5 * got * vocab * dtype_bytes <= budget  # it fits,
      assert 10 * got * vocab * dtype_bytes > budget  # twice would not.


def test_monotone_in_memory():
  chunks = [auto_chunk_size(128256, 2048, num_tokens=1 << 20,
                            device_memory_bytes=g * GiB)
            for g in (1, 8, 16, 40, 80, 141, 1000)]
  assert chunks == sorted(chunks) and chunks[0] == 512


@pytest.mark.parametrize("kwargs,match", [
    (dict(vocab_size=0), "vocab_size must be a positive int"),
    (dict(hidden_size=-1), "hidden_size must be a positive int"),
    (dict(num_tokens=1.5), "num_tokens must be a positive int"),
    (dict(device_memory_bytes=0), "device_memory_bytes must be a positive"),
    (dict(min_chunk=0), "min_chunk must be a positive int"),
    (dict(memory_fraction=0.0), r"memory_fraction must be in \(0, 1\]"),
    (dict(memory_fraction=2.0), r"memory_fraction must be in \(0, 1\]"),
])
def test_bad_arguments(kwargs, match):
  args = dict(vocab_size=100, hidden_size=8, num_tokens=10,
              device_memory_bytes=GiB)
  args.update(kwargs)
  with pytest.raises(ValueError, match=match):
    auto_chunk_size(args.pop("vocab_size"), args.pop("hidden_size"), **args)


# ---------------------------------------------------------------------------
# Resolution in the LM step.


def _mesh(axes):
  return jtrain.make_mesh(axes)


def test_explicit_chunk_overrides():
  obj = lm.LMDistillObjective(fused=True, chunk_size=24,
                              device_memory_bytes=GiB)
  assert lm.fused_chunk_size(obj, 128256, 2048, 65536) == 24


def test_auto_chunk_per_device():
  # 65536 tokens over data x fsdp = 8 shards: 8192 per device, 16 GiB.
  obj = lm.LMDistillObjective(fused=True, device_memory_bytes=16 * GiB,
                              mesh=_mesh("fsdp:8"))
  assert lm.fused_chunk_size(obj, 128256, 2048, 65536) == 512
  assert lm.fused_chunk_size(
      lm.LMDistillObjective(fused=True, chunk_size=0,
                            device_memory_bytes=80 * GiB,
                            mesh=_mesh("fsdp:8")), 128256, 2048, 65536) == 2048
  # Few tokens per device: one chunk of them (1000 / 8 -> 125).
  assert lm.fused_chunk_size(obj, 128256, 2048, 1000) == 125
  # The vocabulary over tensor:2 halves V per device: c_mem 256 -> 512,
  # with 4 token shards of 16384.
  obj = lm.LMDistillObjective(fused=True, device_memory_bytes=16 * GiB,
                              mesh=_mesh("data:2,fsdp:2,tensor:2"))
  assert lm.fused_sharding(obj, 128256) == {
      "mesh": obj.mesh, "token_axis": ("data", "fsdp"), "vocab_axis": "tensor"}
  assert lm.fused_chunk_size(obj, 128256, 512, 65536) == 512
  # A vocabulary that tensor does not divide stays whole.
  assert lm.fused_sharding(obj, 127)["vocab_axis"] is None


def test_default_memory_without_a_reported_one():
  if lm.reported_device_memory() is not None:
    pytest.skip("the device reports its memory")
  obj = lm.LMDistillObjective(fused=True)
  want = auto_chunk_size(128256, 2048, num_tokens=8192,
                         device_memory_bytes=lm.DEFAULT_DEVICE_MEMORY_BYTES)
  assert lm.fused_chunk_size(obj, 128256, 2048, 8192) == want == 512


@pytest.mark.parametrize("chunk", [-1, 1.5, True])
def test_objective_refuses_bad_chunks(chunk):
  with pytest.raises(ValueError, match="--lm_fused_chunk="):
    lm.LMDistillObjective(fused=True, chunk_size=chunk)


# ---------------------------------------------------------------------------
# The sharded loss and step agree with the single-device ones.


def test_tuple_token_axis_matches_unsharded():
  rng = np.random.default_rng(1)
  n, hs, ht, v = 44, 8, 12, 32
  a = [jnp.asarray(rng.standard_normal(s), jnp.float32)
       for s in ((n, hs), (hs, v), (n, ht), (ht, v))]
  labels = jnp.asarray(rng.integers(0, v, n), jnp.int32)
  mesh = _mesh("data:2,fsdp:2,tensor:2")
  f = functools.partial(fused.fused_linear_kd, labels=labels, ce_weight=0.3,
                        temperature=2.0)
  vg = lambda **kw: jax.jit(jax.value_and_grad(
      functools.partial(f, **kw), argnums=(0, 1)))(*a)
  want = vg(chunk_size=7)
  got = vg(chunk_size=3, mesh=mesh, token_axis=("data", "fsdp"),
           vocab_axis="tensor")
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=2e-5,
                               atol=2e-6)
  with pytest.raises(ValueError, match="vocab_axis and token_axis must "
                     "differ"):
    vg(chunk_size=3, mesh=mesh, token_axis=("data", "tensor"),
       vocab_axis="tensor")
  with pytest.raises(ValueError, match="token_axis 'nope' is not an axis"):
    vg(chunk_size=3, mesh=mesh, token_axis=("data", "nope"))


V, T, B = 32, 8, 8


def _model(dim, depth, seed):
  return jtrain.FunctionalModel.split(
      CausalLM(V, dim=dim, depth=depth, num_heads=2, max_len=T,
               rngs=nnx.Rngs(seed)))


@pytest.mark.parametrize("axes", ["data:2,fsdp:2,tensor:2", "fsdp:8"])
def test_fused_step_on_a_mesh_equals_one_device(axes):
  student, sp, ss = _model(16, 1, 0)
  teacher, tp, ts = _model(24, 1, 1)
  tv = {"params": tp, "model_state": ts}
  rng = np.random.default_rng(3)
  lengths = rng.integers(0, T + 1, B)
  batch = {"x": rng.integers(0, V, (B, T)).astype(np.int32),
           "y": rng.integers(0, V, (B, T)).astype(np.int32),
           "token_mask": np.arange(T)[None] < lengths[:, None]}
  tx = optax.sgd(0.1)
  state = jtrain.TrainState.create(sp, ss, tx, 0)
  kw = dict(loss="kd", temperature=2.0, ce_weight=0.5, fused=True)
  step = jax.jit(lm.make_lm_distill_step(
      student, tx, lm.LMDistillObjective(chunk_size=5, **kw), teacher))
  want_state, want = step(state, tv, batch)
  mesh = _mesh(axes)
  sharded = jtrain.compile_step(lm.make_lm_distill_step(
      student, tx, lm.LMDistillObjective(mesh=mesh, **kw), teacher), mesh,
      donate_state=False)
  got_state, got = sharded(jtrain.replicate(state, mesh),
                           jtrain.replicate(tv, mesh),
                           jtrain.put_batch(batch, mesh))
  for key in ("loss", "kd", "ce", "grad_norm"):
    np.testing.assert_allclose(float(got[key]), float(want[key]), rtol=1e-5)
  for g, w in zip(jax.tree.leaves(got_state.params),
                  jax.tree.leaves(want_state.params)):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-6)
