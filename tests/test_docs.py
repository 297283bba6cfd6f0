"""The documentation works: README.md and docs/*.md.

* Every ```python block runs. The blocks of one file run in order in one
  namespace, so a block may use what an earlier block of the same file
  defined (e.g. a block that makes inputs, then the example that uses
  them). A block that is not meant to run is fenced as ``text``, ``bash``,
  ``sh`` or without a language.
* Every relative link and image (``[x](path)``, ``![x](path)``) names an
  existing file, and every ``#anchor`` a heading of its target.
* The README stays short and keeps the commands a checker runs verbatim.
"""

import contextlib
import json
import os
import pathlib
import re

import numpy as np
import pytest

pytestmark = pytest.mark.docs

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOC_FILES = ["README.md"] + sorted(
    str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))
README_MAX_LINES = 250
PYTHON_LANGUAGES = {"python", "py", "python3"}
# The commands of the README's "Two commands", run verbatim by a checker.
README_COMMANDS = (
    "pip install -e . && python -m experiments.main "
    "--flagfile=experiments/flags/logit_kd.flags",
    "pip install -e '.[test]' && pytest -q -n 2",
)

_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})\s*"
                    r"(?P<lang>[^\s`]*)")


def _fenced_blocks(text: str) -> list[tuple[int, str, str]]:
  """(line number of the opening fence, language, code) of every fenced
  block of ``text``, the code dedented by its fence's indentation."""
  blocks, lines, i = [], text.split("\n"), 0
  while i < len(lines):
    match = _FENCE.match(lines[i])
    if not match:
      i += 1
      continue
    indent, fence = match["indent"], match["fence"]
    start, code = i + 1, []
    i += 1
    while i < len(lines):
      stripped = lines[i].strip()
      if stripped.startswith(fence) and not stripped.strip(fence[0]):
        break
      line = lines[i]
      code.append(line[len(indent):] if line.startswith(indent) else
                  line.lstrip())
      i += 1
    blocks.append((start, match["lang"].lower(), "\n".join(code) + "\n"))
    i += 1
  return blocks


def _without_fences(text: str) -> str:
  """``text`` with the lines of its fenced blocks blanked."""
  lines, out, fence = text.split("\n"), [], None
  for line in lines:
    match = _FENCE.match(line)
    if fence is None and match:
      fence = match["fence"]
      out.append("")
    elif fence is not None:
      stripped = line.strip()
      if stripped.startswith(fence) and not stripped.strip(fence[0]):
        fence = None
      out.append("")
    else:
      out.append(line)
  return "\n".join(out)


def _without_code(text: str) -> str:
  """``text`` without its fenced blocks and inline code spans."""
  return re.sub(r"`[^`]*`", "", _without_fences(text))


def _python_blocks(doc: str) -> list[tuple[int, str]]:
  return [(line, code) for line, lang, code in
          _fenced_blocks((ROOT / doc).read_text())
          if lang in PYTHON_LANGUAGES]


PYTHON_BLOCKS = [(doc, index) for doc in DOC_FILES
                 for index in range(len(_python_blocks(doc)))]


def _write_export(namespace: dict, workdir: pathlib.Path) -> None:
  """Before the export-loading block of docs/recipes.md: an export at
  ``exports/my_student`` (an untrained MLP, as `python -m
  experiments.export` writes it) and a batch ``x``; the block's logits must
  equal the model's."""
  import orbax.checkpoint as ocp
  from flax import nnx
  from jdistill.models import create_model

  spec = {"format": "jdistill-export", "version": 1, "name": "mlp",
          "kwargs": {"hidden_sizes": [16]}, "num_classes": 10,
          "input_shape": [40]}
  model = create_model("mlp", num_classes=10, input_shape=(40,),
                       rngs=nnx.Rngs(7), hidden_sizes=(16,))
  _, params, model_state = nnx.split(model, nnx.Param, ...)
  path = workdir / "exports" / "my_student"
  path.mkdir(parents=True)
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(path / "variables",
                      {"params": nnx.to_pure_dict(params),
                       "model_state": nnx.to_pure_dict(model_state)})
    checkpointer.wait_until_finished()
  (path / "model.json").write_text(json.dumps(spec))
  x = np.random.default_rng(0).normal(size=(4, 40)).astype(np.float32)
  namespace["x"] = x
  namespace["_expected_logits"] = np.asarray(model(x, train=False)[0])


# (doc, text in the block) -> what runs before that block, in its namespace
# and working directory: inputs a reader brings (a run's export).
def _write_torch_teacher(namespace: dict, workdir: pathlib.Path) -> None:
  """``resnet32x4_vanilla.safetensors``: a random resnet32x4 in PyTorch's
  layout, standing in for mdistiller's teacher (docs/vision_zoo.md)."""
  del namespace
  from flax import nnx
  from safetensors.numpy import save_file

  from jdistill.models import create_model, torch_state_dict_shapes
  model = nnx.eval_shape(lambda: create_model(
      "resnet32x4", num_classes=100, input_shape=(32, 32, 3),
      rngs=nnx.Rngs(0)))
  rng = np.random.default_rng(0)
  save_file({k: (rng.uniform(0.5, 1.5, s) if k.endswith("running_var") else
                 rng.standard_normal(s) * 0.05).astype(np.float32)
             for k, s in torch_state_dict_shapes(model).items()
             if not k.endswith("num_batches_tracked")},
            str(workdir / "resnet32x4_vanilla.safetensors"))


SETUPS = {("docs/recipes.md", "exports/my_student"): _write_export,
          ("docs/vision_zoo.md", "resnet32x4_vanilla.safetensors"):
              _write_torch_teacher}

_SNAPSHOTS: dict[str, list[dict]] = {}  # doc -> namespace after each block
_WORKDIRS: dict[str, pathlib.Path] = {}


def _namespace_after(doc: str, index: int, tmp_path_factory) -> dict:
  """The namespace of ``doc``'s Python blocks 0..``index``, run in order
  (each block once per process) in a working directory of the doc's own."""
  snapshots = _SNAPSHOTS.setdefault(doc, [])
  if index < len(snapshots):
    return snapshots[index]
  workdir = _WORKDIRS.setdefault(
      doc, tmp_path_factory.mktemp(re.sub(r"\W", "_", doc)))
  blocks = _python_blocks(doc)
  namespace = dict(snapshots[-1]) if snapshots else {"__name__": "__main__"}
  with contextlib.chdir(workdir):
    for i in range(len(snapshots), index + 1):
      line, code = blocks[i]
      for (setup_doc, text), setup in SETUPS.items():
        if setup_doc == doc and text in code:
          setup(namespace, workdir)
      exec(compile(code, f"{doc}, block at line {line}", "exec"), namespace)
      snapshots.append(dict(namespace))
  return snapshots[index]


@pytest.mark.parametrize(
    "doc,index", PYTHON_BLOCKS,
    ids=[f"{doc}:{index}" for doc, index in PYTHON_BLOCKS])
def test_python_block_runs(doc, index, tmp_path_factory):
  namespace = _namespace_after(doc, index, tmp_path_factory)
  if "_expected_logits" in namespace and "logits" in namespace:
    np.testing.assert_allclose(namespace["logits"],
                               namespace["_expected_logits"], rtol=1e-6)


def test_every_doc_with_python_has_its_blocks_collected():
  """The parser finds the blocks that the tests below look for by marker."""
  assert {doc for doc, _ in PYTHON_BLOCKS} >= {
      "README.md", "docs/losses.md", "docs/api.md", "docs/feature.md",
      "docs/multi_teacher.md", "docs/dataset_distillation.md",
      "docs/llm.md", "docs/recipes.md"}


def _run_example(doc: str, marker: str, tmp_path_factory) -> dict:
  """The namespace after the Python block of ``doc`` that holds ``marker``
  or else follows it (``doc`` holds the marker once)."""
  text = (ROOT / doc).read_text()
  assert text.count(marker) == 1, (doc, marker)
  marker_line = text[:text.index(marker)].count("\n") + 1
  index = next(i for i, (line, code) in enumerate(_python_blocks(doc))
               if line + code.count("\n") >= marker_line)
  return _namespace_after(doc, index, tmp_path_factory)


def test_readme_loss_example_runs(tmp_path_factory):
  namespace = _run_example(
      "README.md", "## Using the losses in your own JAX code",
      tmp_path_factory)
  assert np.isfinite(namespace["loss"])
  assert namespace["grads"].shape == (32, 10)


def test_losses_page_example_runs(tmp_path_factory):
  namespace = _run_example("docs/losses.md", "TAID's interpolation",
                           tmp_path_factory)
  assert namespace["dkd"].shape == (16,)
  assert np.isfinite(namespace["taid_state"].t)


def test_steps_example_runs(tmp_path_factory):
  namespace = _run_example("docs/api.md", "jtrain.make_distill_step(student",
                           tmp_path_factory)
  assert np.isfinite(namespace["metrics"]["loss"])
  assert int(namespace["state"].step) == 1


def test_llm_example_runs(tmp_path_factory):
  namespace = _run_example("docs/llm.md", "losses.sequence_kd(",
                           tmp_path_factory)
  ns = namespace
  assert np.isfinite(ns["kd"]) and ns["per_tok"].shape == (ns["B"], ns["T"])


def test_feature_distillation_example_runs(tmp_path_factory):
  namespace = _run_example("docs/feature.md",
                           "`tests/test_docs.py` runs it", tmp_path_factory)
  metrics = namespace["metrics"]
  assert {"hint:map:map", "contrastive:embedding:embedding"} <= set(metrics)
  bank = namespace["state"].loss_state["features"]["1"]
  assert bank.shape == (256, 32)


def test_multi_teacher_example_runs(tmp_path_factory):
  namespace = _run_example("docs/multi_teacher.md",
                           "`tests/test_docs.py` runs this one too",
                           tmp_path_factory)
  metrics = namespace["metrics"]
  assert {"kd", "ensemble_nll", "teacher_weight3", "teachers_kept",
          "teacher3_accuracy"} <= set(metrics)
  assert namespace["ensemble"].groups == ((0, 1, 2), (3,))
  weights = namespace["state"].combiner_params["teacher_weight_logits"]
  assert weights.shape == (4,) and np.any(np.asarray(weights) != 0)


def test_kip_example_runs(tmp_path_factory):
  namespace = _run_example("docs/dataset_distillation.md",
                           "`tests/test_docs.py` runs this block",
                           tmp_path_factory)
  assert namespace["state"].support_x.shape == (10, 64)
  assert namespace["accuracy"] > 0.8  # One learned image per class.


def _slug(heading: str) -> str:
  """GitHub's anchor for a heading (before de-duplication)."""
  heading = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # Link text.
  return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(path: pathlib.Path) -> set[str]:
  anchors, seen = set(), {}
  for line in _without_fences(path.read_text()).split("\n"):
    match = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
    if match:
      slug = _slug(match[1])
      anchors.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
      seen[slug] = seen.get(slug, 0) + 1
  return anchors


_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)")


def _links(doc: str) -> list[str]:
  return _LINK.findall(_without_code((ROOT / doc).read_text()))


@pytest.mark.parametrize("doc", DOC_FILES)
def test_relative_links_resolve(doc):
  source = ROOT / doc
  broken = []
  for target in _links(doc):
    if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, mailto:
      continue
    path, _, anchor = target.partition("#")
    resolved = (source.parent / path).resolve() if path else source
    if not resolved.exists():
      broken.append(f"{target}: no file {resolved}")
    elif anchor and resolved.suffix == ".md" and (
        anchor not in _anchors(resolved)):
      broken.append(f"{target}: no heading #{anchor} in {resolved.name}")
  assert not broken, f"{doc}: " + "; ".join(broken)


def test_the_link_checker_sees_links_and_images():
  assert "docs/losses.md" in _links("README.md")
  assert "kip_digits_ipc10.png" in _links("docs/dataset_distillation.md")
  assert "performance.md#benchmarks" in _links("docs/known_gaps.md")
  # Two-line link text, and links inside inline code are not links.
  assert _LINK.findall(_without_code("[a\nb](x.md) `[c](y.md)`")) == ["x.md"]


def test_readme_is_short():
  lines = (ROOT / "README.md").read_text().splitlines()
  assert len(lines) <= README_MAX_LINES, (
      f"README.md has {len(lines)} lines; at most {README_MAX_LINES}: move "
      "text into docs/")


def test_readme_keeps_the_two_commands():
  blocks = [code.strip() for _, lang, code in
            _fenced_blocks((ROOT / "README.md").read_text()) if not lang]
  for command in README_COMMANDS:
    assert command in blocks, command


def test_flag_reference_is_current():
  from experiments.config import reference
  doc = ROOT / "docs" / "program.md"
  block = reference.current_block(doc.read_text(), str(doc))
  assert block == reference.flag_reference_markdown(), (
      "docs/program.md: the flag reference between "
      f"{reference.BEGIN} and {reference.END} is out of date with the "
      "config sections; regenerate it with: python -m "
      "experiments.config.reference --write docs/program.md")
