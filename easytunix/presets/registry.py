"""The preset registry: tiny random presets that work offline, and named real sizes.

A preset names a family, a config and a tokenizer. Tiny presets initialise
random weights deterministically and use the tokenizers shipped in
``easytunix/presets/assets``; real presets read weights from a local folder
(no model hub is contacted).
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from pathlib import Path
from typing import Callable

from easytunix.convert.real_models import cache_root
from easytunix.models import gemma, gemma3, llama3, qwen3
from easytunix.models.base import DecoderConfig

ASSETS = Path(__file__).parent / "assets"


@dataclasses.dataclass(frozen=True)
class PresetSpec:
  """One entry of the registry.

  Attributes:
    name: what users pass to ``from_preset``.
    family: "llama3", "qwen3", "gemma" or "gemma3".
    config: builds the architecture config.
    description: one line for ``list_presets``.
    tokenizer_asset: shipped tokenizer folder (tiny presets).
    local_names: folder names searched for real weights (see :func:`weights_search_paths`).
    convert_command: how to produce the weights folder locally, when we know.
  """

  name: str
  family: str
  config: Callable[[], DecoderConfig]
  description: str
  tokenizer_asset: str | None = None
  local_names: tuple[str, ...] = ()
  convert_command: str | None = None

  @property
  def is_random(self) -> bool:
    return self.tokenizer_asset is not None


def _tiny(name, family, config, tok, what):
  return PresetSpec(name, family, config, f"{what}, random weights, shipped {tok} tokenizer (tests, demos)", tok)


def _real(name, family, config, description, *local_names, convert=None):
  return PresetSpec(name, family, config, description, None, (name, *local_names), convert)


_SMOLLM_CONVERT = "python -m easytunix.convert.real_models smollm2-135m-instruct"
_GEMMA3_CONVERT = "python -m easytunix.convert.real_models gemma3-270m"

PRESETS: dict[str, PresetSpec] = {
    p.name: p
    for p in [
        _tiny("llama3_tiny", "llama3", llama3.ModelConfig.tiny, "tiny_bpe", "2-layer Llama 3"),
        _tiny("qwen3_tiny", "qwen3", qwen3.ModelConfig.tiny, "tiny_bpe", "2-layer Qwen 3"),
        _tiny("qwen3_moe_tiny", "qwen3", qwen3.ModelConfig.tiny_moe, "tiny_bpe", "2-layer Qwen 3 MoE (4 experts, top-2)"),
        _tiny("gemma_tiny", "gemma", gemma.TransformerConfig.tiny, "tiny_sp", "2-layer Gemma"),
        _tiny("gemma3_tiny", "gemma3", gemma3.Gemma3Config.tiny, "tiny_sp", "3-layer Gemma 3 (sliding + global)"),
        _real("smollm2_135m_instruct", "llama3", llama3.ModelConfig.smollm2_135m, "SmolLM2-135M-Instruct (Llama)",
              "smollm2-135m-instruct", convert=_SMOLLM_CONVERT),
        _real("llama3.2_1b", "llama3", llama3.ModelConfig.llama3_2_1b, "Llama 3.2 1B", "Llama-3.2-1B"),
        _real("llama3.2_3b", "llama3", llama3.ModelConfig.llama3_2_3b, "Llama 3.2 3B", "Llama-3.2-3B"),
        _real("llama3.1_8b", "llama3", llama3.ModelConfig.llama3_1_8b, "Llama 3.1 8B", "Llama-3.1-8B"),
        _real("qwen3_0.6b", "qwen3", qwen3.ModelConfig.qwen3_0_6b, "Qwen3 0.6B", "Qwen3-0.6B"),
        _real("qwen3_1.7b", "qwen3", qwen3.ModelConfig.qwen3_1_7b, "Qwen3 1.7B", "Qwen3-1.7B"),
        _real("qwen3_4b", "qwen3", qwen3.ModelConfig.qwen3_4b, "Qwen3 4B", "Qwen3-4B"),
        _real("qwen3_8b", "qwen3", qwen3.ModelConfig.qwen3_8b, "Qwen3 8B", "Qwen3-8B"),
        _real("qwen3_14b", "qwen3", qwen3.ModelConfig.qwen3_14b, "Qwen3 14B", "Qwen3-14B"),
        _real("qwen3_30b_a3b", "qwen3", qwen3.ModelConfig.qwen3_30b_a3b, "Qwen3 30B-A3B (MoE)", "Qwen3-30B-A3B"),
        _real("gemma_2b", "gemma", gemma.TransformerConfig.gemma_2b, "Gemma 2B", "gemma-2b"),
        _real("gemma_7b", "gemma", gemma.TransformerConfig.gemma_7b, "Gemma 7B", "gemma-7b"),
        _real("gemma3_270m", "gemma3", gemma3.Gemma3Config.gemma3_270m, "Gemma 3 270M", "gemma3-270m",
              "gemma-3-270m", convert=_GEMMA3_CONVERT),
        _real("gemma3_1b", "gemma3", gemma3.Gemma3Config.gemma3_1b, "Gemma 3 1B", "gemma-3-1b-it", "gemma-3-1b-pt"),
        _real("gemma3_4b", "gemma3", gemma3.Gemma3Config.gemma3_4b, "Gemma 3 4B", "gemma-3-4b-it", "gemma-3-4b-pt"),
    ]
}


def list_presets(family: str | None = None) -> dict[str, str]:
  """Preset names and one-line descriptions (optionally of one family)."""
  return {n: p.description for n, p in PRESETS.items() if family is None or p.family == family}


def weights_search_paths() -> list[Path]:
  """Folders searched for real presets' weights: $EASYTUNIX_MODELS, then ~/.cache/easytunix/models."""
  roots = []
  if os.environ.get("EASYTUNIX_MODELS"):
    roots.append(Path(os.environ["EASYTUNIX_MODELS"]).expanduser())
  roots.append(cache_root() / "models")
  return roots


def get_preset(name: str, family: str | None = None) -> PresetSpec:
  """The registry entry called ``name``; a close-match suggestion if there is none."""
  if name in PRESETS and family is not None and PRESETS[name].family != family:
    from easytunix.presets.models import BY_FAMILY

    other = PRESETS[name].family
    raise ValueError(
        f"{name!r} is a {other} preset, not a {family} one: load it with easytunix.presets."
        f"{BY_FAMILY[other].__name__}.from_preset({name!r}) or easytunix.presets.CausalLM.from_preset({name!r})."
    )
  if name not in PRESETS:
    candidates = [n for n, p in PRESETS.items() if family is None or p.family == family]
    close = difflib.get_close_matches(name, candidates, n=3, cutoff=0.4)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    scope = f" for the {family} family" if family else ""
    raise ValueError(
        f"Unknown preset {name!r}{scope}.{hint} Known presets: {', '.join(sorted(candidates))}. "
        "A path to a model folder works too."
    )
  return PRESETS[name]


def find_weights(spec: PresetSpec) -> Path:
  """The local folder holding a real preset's weights, or an error saying where to put them."""
  roots = weights_search_paths()
  for root in roots:
    for local in spec.local_names:
      folder = root / local
      if (folder / "config.json").exists():
        return folder
  where = " or ".join(str(roots[-1] / n) for n in spec.local_names[:2])
  how = f" Create it with: {spec.convert_command}." if spec.convert_command else ""
  raise FileNotFoundError(
      f"No local weights for preset {spec.name!r} (easytunix never downloads from a model hub). "
      f"Put a Hugging Face folder (config.json, *.safetensors, tokenizer files) at {where}, "
      f"set EASYTUNIX_MODELS to a folder holding {spec.local_names[0]!r}, or pass the folder path "
      f"to from_preset/from_safetensors.{how}"
  )
