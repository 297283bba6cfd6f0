"""experiments.machine: the ``Machine:`` line under the programs' tables."""

import pytest

from experiments import machine


def test_xla_isa_is_the_cpu_capped_by_xla_flags(monkeypatch):
  monkeypatch.setattr(machine, "cpu_isa", lambda: "AVX2")
  assert machine.xla_isa("") == "AVX2"
  assert machine.xla_isa("--xla_cpu_max_isa=SSE4_2") == "SSE4_2"
  assert machine.xla_isa("--foo --xla_cpu_max_isa=avx512") == "AVX2"
  # The last of several caps wins, as in XLA's flag parsing.
  assert machine.xla_isa("--xla_cpu_max_isa=AVX --xla_cpu_max_isa=AVX2") == (
      "AVX2")
  monkeypatch.setattr(machine, "cpu_isa", lambda: "AVX512")
  assert machine.xla_isa("--xla_cpu_max_isa=AVX2") == "AVX2"
  monkeypatch.setattr(machine, "cpu_isa", lambda: None)  # Not x86.
  assert machine.xla_isa("--xla_cpu_max_isa=AVX2") is None


def test_cpu_isa_reads_the_flags(monkeypatch):
  flags = "fpu sse sse2 sse4_1 sse4_2 avx f16c fma avx2"
  monkeypatch.setattr(machine, "_cpuinfo",
                      lambda: f"model name\t: Some CPU\nflags\t\t: {flags}\n")
  assert machine.cpu_isa() == "AVX2" and machine.cpu_model() == "Some CPU"
  monkeypatch.setattr(machine, "_cpuinfo",
                      lambda: f"flags\t\t: {flags} avx512f avx512bw\n")
  assert machine.cpu_isa() == "AVX512"
  monkeypatch.setattr(machine, "_cpuinfo", lambda: "")
  assert machine.cpu_isa() is None


@pytest.mark.parametrize("info, words", [
    ({"cpu": "AMD EPYC", "xla_isa": "AVX2", "backend": "cpu",
      "jax": "0.10.2"},
     "Machine: AMD EPYC, XLA:CPU compiling for AVX2; jax 0.10.2."),
    ({"cpu": "Intel Xeon", "xla_isa": "AVX512", "backend": "gpu (H100)",
      "jax": "0.11.2"},
     "Machine: Intel Xeon, XLA:CPU compiling for AVX512, gpu (H100); jax"),
])
def test_one_line_names_the_cpu_and_its_isa(info, words):
  line = machine.one_line(info)
  assert line.startswith(words) and "docs/numerics.md" in line


def test_annotate_adds_the_machine_to_results_and_table():
  results, table = machine.annotate({"rows": {}}, "| a |")
  assert results["rows"] == {} and set(results["machine"]) == {
      "cpu", "xla_isa", "backend", "jax"}
  assert table.startswith("| a |\n\nMachine: ")
