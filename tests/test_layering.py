"""The house's layering: imports point down (presets -> trainers -> generate -> models -> layers),
and the seed's module paths whose code lives in a higher layer still resolve."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "easytunix"

# Higher numbers may import lower ones, never the reverse nor a sibling of the same rank.
RANK = {
    "layers": 0, "convert": 0, "host_memory": 0,
    "models": 1,
    "generate": 2,
    "sft": 3,
    "distillation": 4, "rl": 4,
    "callbacks": 5,
    "presets": 6,
    "cli": 7,
}


def _subpackage(module: str) -> str:
  parts = module.split(".")
  return parts[1] if len(parts) > 1 else "easytunix"


def _imports(path: Path) -> set[str]:
  """Every easytunix module ``path`` imports, at module level or inside functions."""
  found = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("easytunix"):
      found.update(f"{node.module}.{a.name}" if node.module == "easytunix" else node.module for a in node.names)
    elif isinstance(node, ast.Import):
      found.update(a.name for a in node.names if a.name.startswith("easytunix."))
  return found


def test_imports_point_down():
  upward = []
  for path in PACKAGE.rglob("*.py"):
    module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    me = _subpackage(module)
    if me not in RANK:
      continue  # easytunix/__init__.py
    for target in _imports(path):
      other = _subpackage(target)
      if other != me and other in RANK and RANK[other] >= RANK[me]:
        upward.append(f"{module} imports {target}")
  assert not upward, "imports that point up or sideways:\n" + "\n".join(sorted(upward))


def test_importing_the_models_loads_no_higher_layer():
  code = ("import sys, easytunix.models, easytunix.models.gemma.data, easytunix.models.gemma.sampler, "
          "easytunix.models.gemma3.params; "
          "print(sorted({m.split('.')[1] for m in sys.modules if m.startswith('easytunix.') and m.count('.')}))")
  loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
  assert set(eval(loaded)) <= {"models", "layers"}, loaded


def test_seed_paths_resolve_to_the_code_where_it_lives(tmp_path):
  from easytunix.generate.tokenizer_adapter import TokenizerAdapter
  from easytunix.models.gemma import data as seed_data
  from easytunix.models.gemma3 import params as gemma3_params
  from easytunix.sft import gemma_data

  assert seed_data.GemmaTokenizer is gemma_data.GemmaTokenizer
  assert seed_data.create_datasets is gemma_data.create_datasets
  assert set(dir(seed_data)) >= {"GemmaTokenizer", "create_datasets", "GEMMA_INSTRUCT_TEMPLATE"}
  tokenizer = gemma3_params.create_tokenizer(PACKAGE / "presets" / "assets" / "tiny_bpe")
  assert isinstance(tokenizer, TokenizerAdapter) and tokenizer.encode("hello") == tokenizer.encode("hello")
  try:
    seed_data.no_such_name
  except AttributeError as err:
    assert "no_such_name" in str(err)
  else:
    raise AssertionError("an unknown name must raise AttributeError")
