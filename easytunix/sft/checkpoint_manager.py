"""Tunix's module path ``tunix.sft.checkpoint_manager``: the checkpoint manager of :mod:`easytunix.sft.checkpoint`.

The one difference is what ``maybe_restore`` returns: Tunix's ``(step,
custom_metadata)`` tuple, ``(0, {})`` when there is nothing to restore (the
easytunix class returns a :class:`~easytunix.sft.checkpoint.RestoredCheckpoint`
or None). Saving, layout and options are the same code.
"""

from __future__ import annotations

from typing import Any

from flax import nnx

from easytunix.sft import checkpoint as _checkpoint
from easytunix.sft.checkpoint import CheckpointingOptions, RestoredCheckpoint

__all__ = ["CheckpointManager", "CheckpointingOptions", "RestoredCheckpoint"]


class CheckpointManager(_checkpoint.CheckpointManager):
  """:class:`easytunix.sft.checkpoint.CheckpointManager` with Tunix's ``maybe_restore`` result."""

  def maybe_restore(  # type: ignore[override]
      self,
      model: nnx.Module,
      optimizer: Any = None,
      step: int | None = None,
      restore_only_lora_params: bool = False,
  ) -> tuple[int, dict[str, Any]]:
    """Restores the newest checkpoint (or ``step``) into ``model`` (and ``optimizer``, an ``nnx.Optimizer``).

    ``restore_only_lora_params=False`` restores what fits the model: the LoRA
    adapters when it has them, else every parameter.

    Returns:
      ``(step, custom_metadata)``; ``(0, {})`` when checkpointing is off or nothing was saved yet.
    """
    restored = super().maybe_restore(model, optimizer, step, restore_only_lora_params=restore_only_lora_params or None)
    if restored is None:
      return 0, {}
    return restored.step, restored.metadata
