"""Preemption-safe, bit-exact resume and the non-finite guard, tested by
killing real ``python -m experiments.main`` processes.

Every scenario is compared with one uninterrupted run of the same flags:
the final checkpoint's arrays must be bitwise equal and ``metrics.jsonl``
must hold the same records (apart from wall-clock fields).
"""

import json
import os
import pathlib
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jdistill import models as jmodels
from jdistill import train as jtrain
from tests.programs.test_experiments import _tree_digest

pytestmark = pytest.mark.e2e

ROOT = pathlib.Path(__file__).resolve().parents[2]
# About 5 s of training on 2 cores: long enough to be killed at many points.
RUN = ["--mode=train", "--model=cnn1d", "--batch_size=128", "--num_steps=240",
       "--log_every=5", "--checkpoint_every=20", "--eval_every=60",
       "--max_to_keep=3", "--eval_batch_size=500"]
TIME_FIELDS = ("steps_per_sec",)


def _env():
  env = dict(os.environ)
  env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
  return env


def _cmd(workdir, *extra):
  return [sys.executable, "-m", "experiments.main", *RUN,
          f"--workdir={workdir}", *extra]


def _run(workdir, *extra, timeout=300):
  return subprocess.run(_cmd(workdir, *extra), cwd=ROOT, env=_env(),
                        capture_output=True, text=True, timeout=timeout)


def _start(workdir, *extra):
  return subprocess.Popen(_cmd(workdir, *extra), cwd=ROOT, env=_env(),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, bufsize=1)


def _checkpoint_arrays(workdir):
  """Every array of the newest checkpoint, by path (numpy, exact)."""
  ocp = pytest.importorskip("orbax.checkpoint")
  directory = pathlib.Path(workdir) / "checkpoints"
  step = max(int(p.name) for p in directory.iterdir() if p.name.isdigit())
  out = {"step": step}
  with ocp.StandardCheckpointer() as ckpt:
    for item in ("model", "train"):
      tree = ckpt.restore(directory / str(step) / item)
      for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        out[item + jax.tree_util.keystr(path)] = np.asarray(leaf)
  return out


def _records(workdir):
  """metrics.jsonl without wall-clock fields and timing records."""
  out = []
  for line in (pathlib.Path(workdir) / "metrics.jsonl").read_text(
      ).splitlines():
    record = json.loads(line)
    if record["split"] == "timing":
      continue
    out.append({k: v for k, v in record.items() if k not in TIME_FIELDS})
  return out


def _assert_same_run(workdir, reference):
  got, want = _checkpoint_arrays(workdir), _checkpoint_arrays(reference)
  assert got.keys() == want.keys()
  for key in want:
    np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    assert np.asarray(got[key]).tobytes() == np.asarray(want[key]).tobytes()
  assert _records(workdir) == _records(reference)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """The uninterrupted run."""
  workdir = tmp_path_factory.mktemp("reference")
  proc = _run(workdir)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return workdir


def _wait_for_line(proc, pattern, timeout=120):
  """Reads ``proc``'s stdout until a line matches; returns it."""
  deadline = time.time() + timeout
  for line in proc.stdout:
    if re.search(pattern, line):
      return line
    if time.time() > deadline:
      break
  raise AssertionError(f"no line matching {pattern!r} before the process "
                       f"ended (status {proc.poll()})")


def _finish(workdir):
  proc = _run(workdir)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc


def test_sigterm_saves_exits_and_resumes_bitwise(reference, tmp_path):
  proc = _start(tmp_path)
  _wait_for_line(proc, r"step 35/240")
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 143, err[-3000:]
  lines = [l for l in err.splitlines() if l.startswith("jdistill:")]
  assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
  assert "stopped by SIGTERM at step" in lines[0]
  step = int(re.search(r"at step (\d+)", lines[0]).group(1))
  # A checkpoint at the step it stopped, not only at the last multiple of
  # --checkpoint_every.
  assert 35 <= step < 240 and (tmp_path / "checkpoints" / str(step)).is_dir()
  resumed = _finish(tmp_path)
  assert f"resumed from {tmp_path / 'checkpoints'} at step {step}" in (
      resumed.stdout)
  _assert_same_run(tmp_path, reference)


def _kill_during_checkpoint_write(proc, directory, done):
  """Kills ``proc`` as soon as orbax's temporary directory of a checkpoint
  being written appears."""
  while not done.is_set() and proc.poll() is None:
    try:
      names = os.listdir(directory)
    except FileNotFoundError:
      names = []
    if any("tmp" in n for n in names):
      proc.kill()
      return
    time.sleep(0.0005)


@pytest.mark.parametrize("kills", [
    # (trigger, argument): after the progress line of a step plus a random
    # delay, or during a checkpoint write.
    [("line", 25), ("checkpoint", None), ("line", 150)],
    pytest.param([("checkpoint", None), ("line", 70), ("checkpoint", None),
                  ("line", 185), ("line", 200)], marks=pytest.mark.slow),
])
def test_sigkill_at_random_moments_loses_nothing_but_recent_steps(
    reference, tmp_path, kills):
  rng = random.Random(len(kills))
  stops = []
  for trigger, step in kills:
    proc = _start(tmp_path)
    done = threading.Event()
    if trigger == "checkpoint":
      watcher = threading.Thread(target=_kill_during_checkpoint_write,
                                 args=(proc, tmp_path / "checkpoints", done))
      watcher.start()
      proc.communicate(timeout=300)
      done.set()
      watcher.join()
    else:
      _wait_for_line(proc, rf"step {step}/240")
      time.sleep(rng.uniform(0, 0.05))
      proc.kill()
      proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, (trigger, proc.returncode)
    latest = [int(p.name) for p in (tmp_path / "checkpoints").iterdir()
              if p.name.isdigit()]
    stops.append((trigger, max(latest, default=0)))
  resumed = _finish(tmp_path)
  assert "resumed from" in resumed.stdout
  _assert_same_run(tmp_path, reference)
  # A kill never took away a finished checkpoint (a write it interrupted is
  # ignored), so the newest checkpoint only moves forward.
  latest = [s for _, s in stops]
  assert latest == sorted(latest), stops


def _largest_file(directory):
  files = [p for p in pathlib.Path(directory).rglob("*") if p.is_file()]
  return max(files, key=lambda p: p.stat().st_size)


def _flip_bytes(path):
  data = bytearray(path.read_bytes())
  for i in range(len(data) // 2, min(len(data), len(data) // 2 + 64)):
    data[i] ^= 0xFF
  path.write_bytes(bytes(data))


def _truncate(path):
  path.write_bytes(path.read_bytes()[:path.stat().st_size // 3])


@pytest.mark.parametrize("damage", [_flip_bytes, _truncate])
def test_damaged_latest_checkpoint_falls_back_to_the_previous_one(
    reference, tmp_path, damage):
  workdir = tmp_path / "run"
  shutil.copytree(reference, workdir)
  # The uninterrupted run ended at 240; drop its final evaluation-only
  # records by resuming from 220 instead: damage checkpoint 240.
  damage(_largest_file(workdir / "checkpoints" / "240"))
  proc = _finish(workdir)
  assert "checkpoints/240 is damaged" in proc.stdout, proc.stdout[-3000:]
  assert "resumed from" in proc.stdout and "at step 220" in proc.stdout
  assert (workdir / "checkpoints_damaged" / "240").is_dir()
  _assert_same_run(workdir, reference)


def test_every_checkpoint_damaged_is_an_error_not_a_fresh_start(reference,
                                                                 tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(reference, workdir)
  for step in ("200", "220", "240"):
    _flip_bytes(_largest_file(workdir / "checkpoints" / step))
  before = _tree_digest(workdir / "checkpoints")
  proc = _run(workdir)
  assert proc.returncode == 2, proc.stderr[-3000:]
  lines = [l for l in proc.stderr.splitlines() if l.startswith("jdistill:")]
  assert len(lines) == 1 and "Traceback" not in proc.stderr
  assert "every checkpoint" in lines[0] and "damaged" in lines[0]
  assert "--workdir" in lines[0]
  assert _tree_digest(workdir / "checkpoints") == before


def test_diverging_run_stops_with_the_step_and_term(tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "experiments.main", "--mode=train",
       "--model=mlp", "--optimizer=sgd", "--learning_rate=1e30",
       "--lr_schedule=constant", "--num_steps=40", "--batch_size=64",
       "--log_every=10", "--checkpoint_every=10",
       f"--workdir={tmp_path}"],
      cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2, proc.stderr[-3000:]
  lines = [l for l in proc.stderr.splitlines() if l.startswith("jdistill:")]
  assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
  assert re.search(r"step \d+: non-finite", lines[0]), lines[0]
  assert "--on_nonfinite" in lines[0]
  bad = int(re.search(r"step (\d+): non-finite", lines[0]).group(1))
  # Nothing was saved at or after the non-finite step.
  saved = [int(p.name) for p in (tmp_path / "checkpoints").iterdir()
           if p.name.isdigit()] if (tmp_path / "checkpoints").is_dir() else []
  assert all(s < bad for s in saved), (saved, bad)


def _tiny_train_step(mode):
  model, params, model_state = jtrain.FunctionalModel.split(
      jmodels.create_model("mlp", num_classes=3, input_shape=(5,),
                           rngs=nnx.Rngs(0), hidden_sizes=[8]))
  tx = optax.adam(1e-2)
  state = jtrain.TrainState.create(params, model_state, tx, seed=0)
  step = jax.jit(jtrain.guard_nonfinite(jtrain.make_train_step(model, tx),
                                        mode))
  return state, step


def _batch(nan=False):
  x = np.random.default_rng(0).normal(size=(4, 5)).astype(np.float32)
  if nan:
    x[2, 1] = np.nan
  return {"x": jnp.asarray(x), "y": jnp.asarray([0, 1, 2, 0])}


@pytest.mark.parametrize("mode", ["skip", "stop"])
def test_guard_skips_a_nonfinite_update(mode):
  state, step = _tiny_train_step(mode)
  _, plain = _tiny_train_step("ignore")
  after, metrics = step(state, _batch(nan=True))
  assert float(metrics["nonfinite"]) == 1.0
  assert int(after.step) == int(state.step) + 1
  for a, b in zip(jax.tree.leaves((after.params, after.opt_state)),
                  jax.tree.leaves((state.params, state.opt_state))):
    np.testing.assert_array_equal(a, b)
  # A finite batch is the unguarded update, bit for bit.
  good, metrics = step(state, _batch())
  want, _ = plain(state, _batch())
  assert float(metrics["nonfinite"]) == 0.0
  for a, b in zip(jax.tree.leaves(good), jax.tree.leaves(want)):
    np.testing.assert_array_equal(a, b)


def test_guard_ignore_applies_and_reports():
  state, step = _tiny_train_step("ignore")
  after, metrics = step(state, _batch(nan=True))
  assert float(metrics["nonfinite"]) == 1.0
  assert not np.isfinite(np.asarray(
      jax.tree.leaves(after.params)[0])).all()


def test_guard_rejects_unknown_mode():
  with pytest.raises(ValueError, match="mode='sometimes'"):
    jtrain.guard_nonfinite(lambda s, b: (s, {}), "sometimes")


def test_describe_nonfinite_names_the_term_first():
  from jdistill.train.loop import describe_nonfinite
  text = describe_nonfinite({"loss": float("nan"), "ce": 1.0,
                             "kd": float("nan"), "accuracy": 0.5,
                             "grad_norm": float("nan")})
  assert text.startswith("loss term 'kd' = nan")
  assert "grad_norm=nan" in text
  assert describe_nonfinite({"loss": 1.0, "grad_norm": float("inf")}
                            ).startswith("gradients (grad_norm = inf)")


def test_checkpoint_whose_values_differ_from_its_digest_is_skipped(tmp_path):
  state, step = _tiny_train_step("skip")
  checkpointer = jtrain.Checkpointer(str(tmp_path), max_to_keep=3)
  saved = []
  for _ in range(2):
    state, _ = step(state, _batch())
    checkpointer.save(state, host_state={"loop": {"window_count": 1}})
    checkpointer.wait()
    saved.append(jax.device_get(state))
  assert checkpointer.all_steps() == [1, 2]
  assert checkpointer.host_state(2) == {"loop": {"window_count": 1}}
  # Readable by orbax, but not what was saved.
  digest = tmp_path / "checkpoint_digests" / "2.json"
  record = json.loads(digest.read_text())
  record["sha256"] = "0" * 64
  digest.write_text(json.dumps(record))
  messages = []
  restored = checkpointer.restore(state, log=messages.append)
  assert int(restored.step) == 1
  assert "differ from the SHA-256 digest" in messages[0]
  for a, b in zip(jax.tree.leaves(restored.params),
                  jax.tree.leaves(saved[0].params)):
    np.testing.assert_array_equal(a, b)
  assert checkpointer.all_steps() == [1]
  assert (tmp_path / "checkpoints_damaged" / "2").is_dir()
  checkpointer.close()
