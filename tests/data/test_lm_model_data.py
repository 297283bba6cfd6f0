"""The causal LM (`jdistill.models.CausalLM`), the embedded byte corpus
(`jdistill.data.text`) and `ZippedSource`."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jdistill import data as jdata
from jdistill.data import text
from jdistill.models import CausalLM, count_params, create_model


def _lm(**kw):
  cfg = dict(dim=16, depth=2, num_heads=2, max_len=12)
  cfg.update(kw)
  return CausalLM(37, rngs=nnx.Rngs(0), **cfg)


def test_causal_lm_is_causal_and_logits_are_hidden_times_unembedding():
  model = _lm()
  x = jax.random.randint(jax.random.key(0), (3, 12), 0, 37)
  logits, feats = model(x)
  assert logits.shape == (3, 12, 37) and feats["hidden"].shape == (3, 12, 16)
  w, b = model.unembedding()
  np.testing.assert_allclose(np.asarray(feats["hidden"] @ w + b),
                             np.asarray(logits), atol=1e-5)
  for pos in (0, 5, 11):
    changed = x.at[:, pos].set((x[:, pos] + 1) % 37)
    new, _ = model(changed)
    # Positions before `pos` cannot see the change; `pos` itself does.
    np.testing.assert_array_equal(np.asarray(new[:, :pos]),
                                  np.asarray(logits[:, :pos]))
    assert float(jnp.max(jnp.abs(new[:, pos] - logits[:, pos]))) > 0


def test_causal_lm_first_position_matches_a_single_token_model_run():
  """With one token of context, attention is the identity on that token."""
  model = _lm()
  x = jax.random.randint(jax.random.key(1), (2, 12), 0, 37)
  full, _ = model(x)
  one, _ = model(x[:, :1])
  np.testing.assert_allclose(np.asarray(one[:, 0]), np.asarray(full[:, 0]),
                             atol=1e-5)


def test_causal_lm_registry_bfloat16_and_errors():
  model = create_model("causal_lm", num_classes=256, input_shape=(32,),
                       rngs=nnx.Rngs(0), dim=32, depth=1, num_heads=4)
  assert isinstance(model, CausalLM) and model.max_len == 32
  # 256*32 embed + 32*32 pos + block (4*32*32*3... ) + head: count is exact.
  dim, v, t = 32, 256, 32
  block = (2 * 2 * dim) + (dim * 3 * dim + 3 * dim) + (dim * dim + dim) + (
      dim * 4 * dim + 4 * dim) + (4 * dim * dim + dim)
  assert count_params(model) == v * dim + t * dim + block + 2 * dim + (
      dim * v + v)
  lm16 = create_model("causal_lm", num_classes=256, input_shape=(32,),
                      rngs=nnx.Rngs(0), dtype=jnp.bfloat16, dim=32, depth=1,
                      num_heads=4)
  logits, _ = lm16(jnp.zeros((2, 32), jnp.int32))
  assert logits.dtype == jnp.bfloat16
  assert np.all(np.isfinite(np.asarray(logits, np.float32)))
  with pytest.raises(ValueError, match="expects input_shape"):
    create_model("causal_lm", num_classes=256, input_shape=(8, 8, 1),
                 rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="not divisible by num_heads"):
    _lm(num_heads=3)
  with pytest.raises(ValueError, match="exceeds the model's max_len"):
    _lm()(jnp.zeros((1, 13), jnp.int32))
  with pytest.raises(ValueError, match=r"tokens \[batch, time\]"):
    _lm()(jnp.zeros((12,), jnp.int32))


def _write(root, rel, data: bytes):
  path = os.path.join(root, rel)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "wb") as f:
    f.write(data)


def test_corpus_split_is_by_path_hash_and_deterministic(tmp_path):
  root = str(tmp_path)
  files = {f"pkg/m{i:02d}.py": bytes([65 + i % 26]) * (50 + i)
           for i in range(40)}
  for rel, data in files.items():
    _write(root, rel, data)
  _write(root, "pkg/test/skip.py", b"x" * 1000)  # test packages are skipped
  _write(root, "pkg/notes.txt", b"y" * 1000)  # only .py files
  c = text.stdlib_corpus(root=root, max_train_bytes=10**6,
                         max_validation_bytes=10**6, validation_percent=25)
  val = [r for r in sorted(files) if text._is_validation(r, 25)]
  train = [r for r in sorted(files) if not text._is_validation(r, 25)]
  assert 0 < len(val) < len(files)
  assert bytes(c.validation) == b"".join(files[r] for r in val)
  assert bytes(c.train) == b"".join(files[r] for r in train)
  assert c.num_files == (len(train), len(val))
  again = text.stdlib_corpus(root=root, max_train_bytes=10**6,
                             max_validation_bytes=10**6,
                             validation_percent=25)
  assert again.fingerprint == c.fingerprint
  short = text.stdlib_corpus(root=root, max_train_bytes=100,
                             max_validation_bytes=60, validation_percent=25)
  assert len(short.train) == 100 and len(short.validation) == 60
  assert bytes(short.train) == bytes(c.train[:100])
  assert short.fingerprint != c.fingerprint


def test_byte_windows_are_next_token_pairs():
  stream = np.arange(23, dtype=np.uint8)
  src = text.byte_windows(stream, 5)
  assert len(src) == 4
  b = src.get_batch(np.array([0, 3]))
  np.testing.assert_array_equal(b["x"][1], [15, 16, 17, 18, 19])
  np.testing.assert_array_equal(b["y"][1], [16, 17, 18, 19, 20])
  assert b["x"].dtype == np.int32
  with pytest.raises(ValueError, match="too few for one sequence"):
    text.byte_windows(stream[:4], 5, name="validation")


def test_stdlib_corpus_loads_offline():
  dataset, corpus = text.load_stdlib_text(64, max_train_bytes=20_000,
                                          max_validation_bytes=5_000)
  assert dataset.num_classes == 256 and dataset.input_shape == (64,)
  assert len(dataset.train) == (20_000 - 1) // 64
  assert len(corpus.fingerprint) == 64 and corpus.num_files[1] >= 1
  x = dataset.train.get_batch(np.arange(4))["x"]
  assert x.min() >= 0 and x.max() < 256


def test_corpus_errors(tmp_path):
  with pytest.raises(ValueError, match="does not exist"):
    text.stdlib_corpus(root=str(tmp_path / "missing"))
  with pytest.raises(ValueError, match="too few .py bytes"):
    text.stdlib_corpus(root=str(tmp_path))
  with pytest.raises(ValueError, match="validation_percent"):
    text.stdlib_corpus(validation_percent=0)


def test_zipped_source():
  a = jdata.ArraySource(x=np.arange(6).reshape(3, 2), y=np.arange(3))
  b = jdata.ArraySource(x=np.zeros((3, 1)), y=np.zeros(3))

  class Extra:
    def __len__(self):
      return 3

    def get_batch(self, idx):
      return {"t": np.asarray(idx) * 10}

  z = jdata.ZippedSource(a, Extra())
  batch = z.get_batch(np.array([2, 0]))
  np.testing.assert_array_equal(batch["t"], [20, 0])
  np.testing.assert_array_equal(batch["y"], [2, 0])
  with pytest.raises(ValueError, match="arrays \\['x', 'y'\\]"):
    jdata.ZippedSource(a, b, name="cache").get_batch(np.array([0]))
  with pytest.raises(ValueError, match="cache has 2 examples"):
    jdata.ZippedSource(a, jdata.ArraySource(x=np.zeros((2, 1)),
                                            y=np.zeros(2)), name="cache")
