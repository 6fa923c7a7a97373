"""Smoke test of the benchmark scripts: ``memory.py --tiny`` and ``gpu.py --tiny`` print tables of numbers.

Each script runs in its own process (memory.py sets XLA_FLAGS before importing jax); the two run side
by side, as each compiles on one core most of the time.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?")


def _start(script: str, *args: str) -> subprocess.Popen:
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
  env.pop("XLA_FLAGS", None)  # the scripts choose their own
  return subprocess.Popen([sys.executable, str(REPO / "benchmarks" / script), *args], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _row(table: str, *starts: str) -> list[str]:
  """The cells of the first markdown row whose cells begin with ``starts``."""
  for line in table.splitlines():
    cells = [c.strip() for c in line.strip().strip("|").split("|")]
    if line.startswith("|") and all(c.startswith(s) for c, s in zip(cells, starts)):
      return cells
  raise AssertionError(f"no table row starting with {starts} in:\n{table}")


def _number(cell: str) -> float:
  match = NUMBER.search(cell.replace(",", ""))
  assert match, f"no number in table cell {cell!r}"
  return float(match.group())


def test_tiny_benchmarks_print_tables_of_numbers():
  procs = {
      "memory": _start("memory.py", "--tiny"),
      "gpu": _start("gpu.py", "--tiny"),
      "require": _start("gpu.py", "--require-gpu"),
  }
  out = {}
  for name, proc in procs.items():
    stdout, stderr = proc.communicate(timeout=600)
    out[name] = (proc.returncode, stdout, stderr)

  code, memory, err = out["memory"]
  assert code == 0, err[-2000:]
  row = _row(memory, "Qwen3-tiny", "", "lora", "256", "1")
  weights, analytic, temp, total = (_number(row[i]) for i in (5, 8, 10, 11))
  assert 0 < weights <= analytic < total and temp > 0
  assert "Qwen3-tiny" in _row(memory, "lora", "256", "1")[3]  # the fits table
  error = re.search(r"relative error ([-+]\d+\.\d)%", memory)
  assert error and abs(float(error.group(1))) < 25, memory

  code, gpu, err = out["gpu"]
  assert code == 0, err[-2000:]
  for workload in ("LoRA r16 train", "full FT train", "greedy decode"):
    ours = _row(gpu, workload, "easytunix (this run")
    assert _number(ours[2]) > 0 and ours[2].endswith("tok/s"), ours
    assert _number(ours[5]) > 0, ours  # first step or call, seconds
    assert "GiB" in ours[6], ours
    assert _number(_row(gpu, workload, "reference (issue #18, H200)")[2]) > 0
  assert _number(_row(gpu, "first train step", "reference (issue #18, H200): Tunix")[2]) == 32.5

  code, _, err = out["require"]
  assert code == 2 and "--require-gpu" in err, err[-2000:]
