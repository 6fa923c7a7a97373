"""Tunix's module path ``tunix.sft.utils``: attention masks, positions, LoRA check, timing, memory use."""

from __future__ import annotations

import gc
import logging

import jax

from easytunix.layers.cache import make_causal_mask, positions_from_mask
from easytunix.sft.lora import is_lora_enabled
from easytunix.sft.peft_trainer import time_measure

__all__ = [
    "build_positions_from_mask",
    "is_lora_enabled",
    "make_causal_attn_mask",
    "show_hbm_usage",
    "time_measure",
]

logger = logging.getLogger(__name__)


def make_causal_attn_mask(input_mask: jax.Array) -> jax.Array:
  """The [B, T, T] bool mask where token i sees the real (``input_mask``) tokens j <= i.

  Args:
    input_mask: [B, T], True (or 1) for real tokens, False for padding.

  Raises:
    ValueError: ``input_mask`` is not 2-D.
  """
  if len(input_mask.shape) != 2:
    raise ValueError(f"input_mask must be 2-D [batch, length], got shape {tuple(input_mask.shape)}.")
  return make_causal_mask(input_mask)


def build_positions_from_mask(input_mask: jax.Array) -> jax.Array:
  """The position of each token counting only real (``input_mask``) tokens from 0; padding before them gets 0."""
  return positions_from_mask(input_mask)


def show_hbm_usage(title: str = "") -> None:
  """Logs (INFO) the memory in use and its limit on each local device, where the backend reports it."""
  gc.collect()
  for device in jax.local_devices():
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if not stats:
      logger.info("%s: %s reports no memory statistics.", title, device)
      continue
    used, limit = stats.get("bytes_in_use", 0), stats.get("bytes_limit")
    share = f" ({used / limit:.1%})" if limit else ""
    logger.info("%s: %.2f GiB / %s on %s%s", title, used / 2**30,
                f"{limit / 2**30:.2f} GiB" if limit else "?", device, share)
