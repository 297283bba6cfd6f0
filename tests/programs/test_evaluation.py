"""experiments.engine.evaluation: agreement, KL(t‖s) and ECE of table rows,
against float64 numpy from the runs' logits."""

import numpy as np
import pytest

from experiments import run as run_lib
from experiments.config import Config
from experiments.engine import evaluation, setup, teachers
from experiments.programs import peers

pytestmark = pytest.mark.e2e


def _log_softmax(z):
  z = np.asarray(z, np.float64)
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _ece(logits, labels, bins=15):
  p = np.exp(_log_softmax(logits))
  conf, pred = p.max(-1), p.argmax(-1)
  edges = np.linspace(0, 1, bins + 1)
  total = 0.0
  for lo, hi in zip(edges[:-1], edges[1:]):
    inside = (conf > lo) & (conf <= hi)
    if inside.any():
      total += inside.mean() * abs((pred[inside] == labels[inside]).mean()
                                   - conf[inside].mean())
  return total


def test_rows_against_numpy(tmp_path):
  base = Config(mode="train", num_steps=6, batch_size=32, eval_batch_size=96,
                log_every=6, checkpoint_every=0)
  dirs = []
  for name, seed in (("mlp", 0), ("cnn1d", 1), ("mlp", 2)):
    dirs.append(str(tmp_path / f"{name}{seed}"))
    run_lib.run_train(base.replace(model=name, seed=seed, workdir=dirs[-1]))
  cfg = base.replace(workdir=str(tmp_path))
  dataset = setup.load_data(cfg)
  labels = np.asarray(dataset.test.y)
  runs = {"alone": [evaluation.Run(dirs[0])],
          "one": [evaluation.Run(dirs[0], teachers=(evaluation.Run(dirs[1]),))],
          "two": [evaluation.Run(dirs[0], teachers=(
              evaluation.Run(dirs[1]), evaluation.Run(dirs[2])))]}
  got = evaluation.evaluate_rows(cfg, dataset, runs)
  mesh = setup.make_mesh(cfg)
  logits = []
  for d in dirs:  # The library's own inference pass, as the reference.
    from jdistill import train as jtrain
    model, variables, _ = teachers.load_teacher_at(d, dataset, mesh)
    logits.append(jtrain.predict_logits(model, variables, dataset.test,
                                        batch_size=96, mesh=mesh))
  s = _log_softmax(logits[0])
  for row, refs in (("one", [1]), ("two", [1, 2])):
    t = np.log(np.mean([np.exp(_log_softmax(logits[k])) for k in refs], 0))
    agreement = np.mean(s.argmax(-1) == t.argmax(-1))
    kl = np.mean(np.sum(np.exp(t) * (t - s), -1))
    np.testing.assert_allclose(got[row]["agreement"], [agreement], rtol=0,
                               atol=1e-7)
    np.testing.assert_allclose(got[row]["kl"], [kl], rtol=2e-4, atol=1e-6)
  assert got["alone"]["agreement"] == [None] and got["alone"]["kl"] == [None]
  for row in runs:
    np.testing.assert_allclose(got[row]["ece"], [_ece(logits[0], labels)],
                               atol=2e-6)
  # A different reference changes the numbers (the rows are not constant).
  assert got["one"]["kl"] != got["two"]["kl"]


def test_peers_are_read_from_their_group(tmp_path):
  cfg = Config(mode="mutual", workdir=str(tmp_path / "g"), num_steps=4,
               batch_size=32, eval_batch_size=96, log_every=4,
               checkpoint_every=0, seeds=(0,))
  dataset = setup.load_data(cfg)
  summary = peers.run_group(cfg, dataset)
  labels = np.asarray(dataset.test.y)
  for i in range(2):
    z = evaluation.run_logits(cfg.workdir, i, dataset, setup.make_mesh(cfg),
                              96)
    assert z.shape == (len(labels), 10)
    np.testing.assert_allclose(np.mean(z.argmax(-1) == labels),
                               summary["test"][f"peer{i}_accuracy"],
                               atol=1e-6)
