"""benchmarks/device_check.py --cpu_smoke: every part runs at tiny sizes on
the CPU and its JSON holds every part, with finite numbers or an explicit
skip reason (torch's columns are skipped where torch is not installed)."""

import json
import math
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import device_check  # noqa: E402


def _numbers(tree, path=""):
  """(path, value) of every number in a JSON tree."""
  if isinstance(tree, dict):
    for k, v in tree.items():
      yield from _numbers(v, f"{path}/{k}")
  elif isinstance(tree, list):
    for i, v in enumerate(tree):
      yield from _numbers(v, f"{path}[{i}]")
  elif isinstance(tree, (int, float)) and not isinstance(tree, bool):
    yield path, tree


def _finite_positive(r, *keys):
  for key in keys:
    assert isinstance(r.get(key), (int, float)), (key, r.get(key))
    assert math.isfinite(r[key]) and r[key] > 0, (key, r[key])


def _ok_or_reason(r, where):
  assert r.get("status") in ("ok", "skipped"), (where, r.get("status"),
                                                r.get("error"))
  if r["status"] == "skipped":
    assert r.get("reason"), where
  return r["status"] == "ok"


def test_cpu_smoke_json(tmp_path):
  out = tmp_path / "device_check.json"
  assert device_check.main(["--cpu_smoke", f"--out={out}"]) == 0
  result = json.loads(out.read_text())

  assert result["cpu_smoke"] is True
  assert result["device"]["platform"] == "cpu"
  assert set(result["parts"]) == set(device_check.PARTS)
  bad = [(p, v) for p, v in _numbers(result) if not math.isfinite(v)]
  assert not bad, bad
  for part, r in result["parts"].items():
    assert r["status"] == "ok", (part, r.get("error"), r.get("log_tail"))

  llm = result["parts"]["llm_distill"]
  _finite_positive(llm, "tokens_per_s", "flops_per_step_xla_unrolled",
                   "flops_per_step_model", "loss_last")
  assert llm["seconds_per_step"]["step"]
  # The unrolled count is XLA's whole step: within 25% of the model FLOPs.
  ratio = llm["flops_per_step_xla_unrolled"] / llm["flops_per_step_model"]
  assert 0.75 < ratio < 1.25, ratio
  # No peak is known for a CPU: the MFU is absent with its reason.
  assert llm["mfu"] is None and llm["mfu_skip_reason"]

  fused = result["parts"]["fused_loss"]
  assert set(fused["cases"]) == {"naive", fused["goal_case"]}
  for case in fused["cases"].values():
    _finite_positive(case, "temp_mib", "time_s", "temp_ratio", "time_ratio")

  _finite_positive(result["parts"]["kip"], "steps_per_s", "compile_s")

  vs = result["parts"]["vs_pytorch"]
  assert set(vs["items"]) == {"resnet/bfloat16", "mlp/float32",
                              "vit/bfloat16", "lm/float32"}
  for key, item in vs["items"].items():
    assert item["status"] == "ok", (key, item.get("error"))
    _finite_positive(item, "flops_per_step_xla")
    for column in device_check.VS_COLUMNS:
      col = item["columns"][column]
      if _ok_or_reason(col, f"{key}/{column}"):
        _finite_positive(col, "samples_per_s")
        assert col["seconds_per_step"]
    assert item["columns"]["jdistill"]["status"] == "ok"

  names = [g["goal"] for g in result["goals"]]
  assert any("MFU" in n for n in names)
  assert any("fused_loss" in n for n in names)
  assert sum("torch.compile" in n for n in names) == 4
  for g in result["goals"]:
    assert g["pass"] in (True, False, None)
    if g["pass"] is None:
      assert g.get("note"), g
