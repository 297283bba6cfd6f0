"""The machine a result came from, for the tables the programs write.

Results computed in float32 depend on the CPU: XLA:CPU compiles for the
host's instruction set, and the vector width (AVX-512, AVX2, SSE) and fused
multiply-adds change the rounding of every reduction and product. A table
therefore names the CPU model and the instruction set XLA compiled for (the
``--xla_cpu_max_isa`` cap in ``XLA_FLAGS``, if one is set, else the best the
CPU has). See docs/numerics.md.
"""

from __future__ import annotations

import os
import platform
import re

# XLA's --xla_cpu_max_isa names, weakest first, with the /proc/cpuinfo flag
# that a CPU needs for each.
ISA_LEVELS = (("SSE4_2", "sse4_2"), ("AVX", "avx"), ("AVX2", "avx2"),
              ("AVX512", "avx512f"))


def _cpuinfo() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      return f.read()
  except OSError:
    return ""


def cpu_model() -> str:
  """The CPU's model name from /proc/cpuinfo, else what ``platform``
  knows."""
  match = re.search(r"^model name\s*:\s*(.+)$", _cpuinfo(), re.M)
  if match:
    return match.group(1).strip()
  return platform.processor() or platform.machine()


def cpu_isa() -> str | None:
  """The best of `ISA_LEVELS` that this CPU has (None: not an x86 CPU, or
  no /proc/cpuinfo)."""
  match = re.search(r"^flags\s*:\s*(.+)$", _cpuinfo(), re.M)
  if not match:
    return None
  flags = set(match.group(1).split())
  best = None
  for name, flag in ISA_LEVELS:
    if flag in flags:
      best = name
  return best


def xla_isa(xla_flags: str | None = None) -> str | None:
  """The instruction set XLA:CPU compiles for: the CPU's (`cpu_isa`),
  lowered to the ``--xla_cpu_max_isa`` cap of ``xla_flags`` (default: the
  ``XLA_FLAGS`` environment variable) where one is set."""
  native = cpu_isa()
  flags = os.environ.get("XLA_FLAGS", "") if xla_flags is None else xla_flags
  cap = re.findall(r"--xla_cpu_max_isa=(\w+)", flags)
  names = [name for name, _ in ISA_LEVELS]
  if not cap or native is None:
    return native
  cap_name = cap[-1].upper()
  if cap_name not in names:
    return cap_name  # A finer level (AVX512_VNNI, ...): as given.
  return names[min(names.index(cap_name), names.index(native))]


def describe() -> dict:
  """``{"cpu", "xla_isa", "backend", "jax"}`` of this process."""
  import jax
  backend = jax.default_backend()
  if backend != "cpu":
    backend = f"{backend} ({jax.devices()[0].device_kind})"
  return {"cpu": cpu_model(), "xla_isa": xla_isa(), "backend": backend,
          "jax": jax.__version__}


def one_line(info: dict | None = None) -> str:
  """`describe` as the ``Machine:`` line under a table."""
  info = describe() if info is None else info
  isa = f", XLA:CPU compiling for {info['xla_isa']}" if info["xla_isa"] else ""
  backend = "" if info["backend"] == "cpu" else f", {info['backend']}"
  return (f"Machine: {info['cpu']}{isa}{backend}; jax {info['jax']}. "
          "float32 results vary with the CPU's instruction set, within the "
          "spread over seeds (docs/numerics.md).")


def annotate(results: dict, table: str) -> tuple[dict, str]:
  """A program's results and table with the machine added: ``results``
  gains ``"machine"`` (`describe`), the table a ``Machine:`` line."""
  info = describe()
  return {**results, "machine": info}, f"{table}\n\n{one_line(info)}"
