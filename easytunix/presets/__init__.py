"""The Keras-style facade: presets, compile / fit / evaluate / generate.

    from easytunix.presets import Qwen3
    model = Qwen3.from_preset("qwen3_tiny")
    model.compile(trainer="sft", lora_rank=8)
    model.fit(["some text", "more text"], epochs=1)
    print(model.generate("What is 2+3?"))
"""

from easytunix.presets.models import BY_FAMILY, CausalLM, Gemma, Gemma3, Llama3, Qwen3
from easytunix.presets.registry import PRESETS, PresetSpec, list_presets

__all__ = ["BY_FAMILY", "CausalLM", "Gemma", "Gemma3", "Llama3", "PRESETS", "PresetSpec", "Qwen3", "list_presets"]
