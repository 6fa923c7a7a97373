"""Every guide's python code blocks run, in order, as a user would paste them."""

import importlib.util
import os
import re
from pathlib import Path

import pytest

GUIDES = sorted((Path(__file__).resolve().parent.parent / "guides").glob("*.md"))
REAL = {"real_weights.md"}
NEEDS_VLLM = {"vllm.md"}


def _blocks(path: Path) -> list[str]:
  return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)


@pytest.mark.parametrize(
    "guide",
    [pytest.param(g, marks=pytest.mark.real_weights) if g.name in REAL else g for g in GUIDES],
    ids=[g.name for g in GUIDES],
)
def test_guide_runs(guide, tmp_path, monkeypatch):
  if guide.name in NEEDS_VLLM and not os.environ.get("CI") and importlib.util.find_spec("vllm") is None:
    pytest.skip("needs vLLM: install it with `easytunix setup-vllm` (CI does)")
  blocks = _blocks(guide)
  assert blocks, f"{guide.name} has no python code blocks"
  monkeypatch.chdir(tmp_path)
  namespace = {"__name__": "__guide__"}
  for i, block in enumerate(blocks):
    try:
      exec(compile(block, f"{guide.name}[block {i}]", "exec"), namespace)
    except Exception as e:  # noqa: BLE001
      raise AssertionError(f"{guide.name}, code block {i} failed: {e!r}\n{block}") from e
