"""Running one benchmark row in its own process, so its time and peak memory are its own."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def run_worker(script: str | Path, args: list[str], python: str = sys.executable) -> dict:
  """Runs ``python script *args``; returns the JSON its ``RESULT {...}`` line carries, or ``{"error": [last line]}``."""
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
  proc = subprocess.run([python, str(script)] + args, env=env, capture_output=True, text=True)
  for line in proc.stdout.splitlines():
    if line.startswith("RESULT "):
      return json.loads(line[len("RESULT "):])
  return {"error": (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [f"exit {proc.returncode}"]}
