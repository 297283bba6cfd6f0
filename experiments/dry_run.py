"""``--dry_run``: everything a run checks before its first write, and
nothing else.

It parses and validates the flags (already done by `Config`), the method
files and tune grid, the data (loaded: its shapes decide the models'), the
mesh, the augmentation, every model the run builds (constructed on
abstract shapes: nothing is allocated) and the teacher checkpoints' model
descriptions, then returns the resolved config as a flagfile. It writes
nothing and trains nothing.
"""

from __future__ import annotations

from experiments import machine
from experiments.config import LM_MODES, PEER_MODES, Config
from experiments.engine import setup, teachers
from jdistill import train as jtrain


def _models(cfg: Config) -> list[tuple[str, str, tuple]]:
  """``(flag, name, kwargs)`` of every model the run constructs itself."""
  out = [("--model", cfg.model, cfg.model_kwargs)]
  if cfg.mode in ("compare", "tune", "online_distill", "distill_lm") and (
      not cfg.teacher_seeds):
    out.append(("--teacher_model", cfg.teacher_model,
                cfg.teacher_model_kwargs))
  for name in cfg.teacher_models:
    out.append(("--teacher_models", name, ()))
  if cfg.mode in PEER_MODES:
    from experiments.programs import peers
    specs = peers.peer_specs(cfg)
    flags_ = (["--teacher_model", "--model"] if cfg.mode == "online_distill"
              else ["--peer_models" if cfg.peer_models else "--model"]
              * len(specs))
    out = [(flag, s["name"], tuple(s["kwargs"].items()))
           for flag, s in zip(flags_, specs)]
  return out


def check(cfg: Config) -> str:
  """Checks ``cfg`` as the run would before writing anything; returns the
  resolved config as a flagfile (non-default settings, one per line)."""
  setup.check_backend_dtypes(cfg)
  checked = []
  if cfg.mode in ("compare", "tune"):
    from experiments.programs import compare, tune
    methods = compare.compare_methods(cfg)
    checked.append(f"{len(methods)} method(s)")
    if cfg.mode == "tune":
      grid = tune.load_tune_grid(cfg.tune_grid, [n for n, _ in methods])
      checked.append(f"{sum(map(len, grid.values()))} tuning candidates")
  if cfg.mode in LM_MODES:
    from experiments.programs import lm
    dataset, _ = lm.load_lm_data(cfg)
  else:
    dataset = setup.load_data(cfg)
  checked.append(f"data {dataset.name} {tuple(dataset.input_shape)}, "
                 f"{dataset.num_classes} classes")
  mesh = (jtrain.make_data_mesh(cfg.num_devices) if cfg.mode == "kip"
          else setup.make_mesh(cfg))
  checked.append(f"mesh {jtrain.format_mesh(mesh)}")
  setup.make_augmentation(cfg, dataset)
  for flag, name, kwargs in _models(cfg):
    spec = setup.model_spec(name, kwargs, dataset)
    setup.build_model(spec, cfg.seed, flag=flag, abstract=True,
                      remat=cfg.remat)
    checked.append(f"{flag}={name}")
  paths = ([("--teacher_checkpoint", cfg.teacher_checkpoint)]
           if cfg.teacher_checkpoint else [])
  paths += [("--teacher_checkpoints", p) for p in cfg.teacher_checkpoints]
  for flag, path in paths:
    spec = teachers.read_teacher_spec(path, dataset, flag=flag,
                                      dataset_flag=cfg.dataset)
    setup.build_model(spec, 0, flag=flag, abstract=True)
    checked.append(f"teacher {spec['name']} ({path})")
  if cfg.teacher_torch_checkpoint:
    teachers.load_torch_teacher(cfg, dataset, mesh, check_only=True)
    checked.append(f"teacher {cfg.teacher_model} "
                   f"({cfg.teacher_torch_checkpoint})")
  header = (f"# --dry_run: checked {'; '.join(checked)}; nothing written.\n"
            f"# {machine.one_line()}\n")
  return header + f"--mode={cfg.mode}\n" + "".join(
      line + "\n" for line in cfg.to_flagfile().splitlines()
      if not line.startswith("--mode="))
