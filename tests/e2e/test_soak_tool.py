"""benchmarks/soak.py's analysis (`analyze`): a pure function of samples."""

import importlib.util
import os

import pytest

_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), "benchmarks", "soak.py")
_spec = importlib.util.spec_from_file_location("soak_tool", _PATH)
soak = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(soak)


def _samples(rss_of_step, num_steps=20_000, every=50, pre=5):
  out = [{"step": None, "rss_mib": 100.0 + 50 * i} for i in range(pre)]
  out += [{"step": s, "rss_mib": rss_of_step(s)}
          for s in range(every, num_steps + 1, every)]
  return out


def test_flat_after_warmup_ramp_and_noise():
  # Compilation and first-use growth during warm-up, then a plateau with
  # +-3 MiB of allocator noise: flat.
  def rss(s):
    return (500 + s / 10 if s < 2000 else 700) + (3 if s % 300 == 0 else 0)
  r = soak.analyze(_samples(rss), num_steps=20_000)
  assert r["warmup_steps"] == 2000
  assert r["verdict"] == "flat"
  assert abs(r["slope_mib_per_1k_steps"]) < 0.1
  assert r["rss_warmup_end_mib"] == 700
  assert r["rss_max_mib"] == 703
  assert r["threshold_mib"] == pytest.approx(14.0)  # 2% of 700 > 10 MiB.
  assert [row[0] for row in r["table"]] == list(range(2000, 20_001, 2000))


def test_linear_leak_is_growing_with_its_slope():
  r = soak.analyze(_samples(lambda s: 300 + s / 1000), num_steps=20_000)
  assert r["slope_mib_per_1k_steps"] == pytest.approx(1.0)
  assert r["growth_after_warmup_mib"] == pytest.approx(18.0)
  assert r["raw_growth_mib"] == pytest.approx(18.0)
  assert r["max_rise_after_warmup_mib"] == pytest.approx(18.0)
  assert r["threshold_mib"] == 10.0  # 2% of 302 MiB is less than 10 MiB.
  assert r["verdict"] == "GROWING"


def test_threshold_options_and_key():
  samples = [{**s, "anon_mib": 2 * s["rss_mib"]}
             for s in _samples(lambda s: 300 + s / 2000)]
  r = soak.analyze(samples, num_steps=20_000)  # Grows 9 MiB: under 10.
  assert r["verdict"] == "flat"
  assert soak.analyze(samples, num_steps=20_000,
                      threshold_mib=5.0)["verdict"] == "GROWING"
  anon = soak.analyze(samples, num_steps=20_000, key="anon_mib")
  assert anon["slope_mib_per_1k_steps"] == pytest.approx(1.0)
  assert anon["verdict"] == "GROWING"


def test_after_training_samples_are_not_fitted():
  samples = _samples(lambda s: 400.0, num_steps=1000, every=10)
  samples += [{"step": 1000, "rss_mib": 900.0, "after_training": True}]
  r = soak.analyze(samples, num_steps=1000)
  assert r["warmup_steps"] == 100
  assert r["verdict"] == "flat" and r["rss_end_mib"] == 400.0
  assert r["rss_max_mib"] == 900.0
  assert r["rss_max_after_warmup_mib"] == 400.0


def test_too_few_steps_is_inconclusive():
  samples = [{"step": None, "rss_mib": 1.0}, {"step": 5, "rss_mib": 2.0}]
  r = soak.analyze(samples, num_steps=1000)
  assert r["verdict"] == "inconclusive"
  assert r["slope_mib_per_1k_steps"] is None
  assert "inconclusive" in soak.format_report(r)
