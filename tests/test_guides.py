"""Every guide's python code blocks run, in order, as a user would paste them.

One test class per guide: under ``pytest -n 2 --dist loadscope`` each class is its own unit of work, so the
guides spread over the workers instead of running one after another in a single one.
"""

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


def run_guide(guide: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
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


def _guide_class(guide: Path) -> type:
  def test_guide_runs(self, tmp_path, monkeypatch):
    run_guide(guide, tmp_path, monkeypatch)

  if guide.name in REAL:
    test_guide_runs = pytest.mark.real_weights(test_guide_runs)
  name = "TestGuide_" + re.sub(r"\W", "_", guide.stem)
  return type(name, (), {"test_guide_runs": test_guide_runs, "__doc__": f"Runs guides/{guide.name}."})


for _guide in GUIDES:
  _cls = _guide_class(_guide)
  globals()[_cls.__name__] = _cls
