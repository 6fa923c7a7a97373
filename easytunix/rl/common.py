"""Pieces every RL algorithm shares: per-token log-probs of completions, padding, masks.

A rollout batch is laid out as ``[prompt | completion]`` per row: prompts are
LEFT-padded to a common width (so every prompt's last token sits in the same
column) and completions RIGHT-padded, so the completion of every row starts at
the same column and ``logits[:, P - 1 : P + C - 1]`` predict it.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from easytunix.generate.utils import bucket
from easytunix.layers.cache import positions_from_mask
from easytunix.models.calling import next_token_log_probs


def completion_logps(
    model: nnx.Module,
    prompt_ids: jax.Array,
    prompt_mask: jax.Array,
    completion_ids: jax.Array,
    completion_mask: jax.Array,
) -> jax.Array:
  """log p(completion token | everything before it) for every completion slot: [B, C] (float32).

  The model is called the Tunix way (:func:`easytunix.models.calling.call_causal_lm`),
  so any ``model(tokens, positions, cache, attention_mask) -> (logits, cache)`` works.
  Padding slots hold whatever the model gives there; multiply by
  ``completion_mask`` before using them.
  """
  prompt_ids = jnp.asarray(prompt_ids, jnp.int32)
  completion_ids = jnp.asarray(completion_ids, jnp.int32)
  tokens = jnp.concatenate([prompt_ids, completion_ids], axis=1)
  mask = jnp.concatenate(
      [jnp.asarray(prompt_mask).astype(jnp.bool_), jnp.asarray(completion_mask).astype(jnp.bool_)], axis=1
  )
  return next_token_log_probs(model, tokens, mask, keep=completion_ids.shape[1])


def left_pad(rows: Sequence[Sequence[int]], width: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
  """``(ids, mask)`` [len(rows), width]: each row right-aligned, padded on the left with ``pad_id``."""
  ids = np.full((len(rows), width), pad_id, np.int32)
  mask = np.zeros((len(rows), width), np.int32)
  for i, row in enumerate(rows):
    if len(row) > width:
      raise ValueError(f"Row {i} has {len(row)} tokens, more than the width {width}.")
    if len(row):
      ids[i, width - len(row) :] = row
      mask[i, width - len(row) :] = 1
  return ids, mask


def right_pad(rows: Sequence[Sequence[int]], width: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
  """``(ids, mask)`` [len(rows), width]: each row left-aligned, padded on the right with ``pad_id``."""
  ids = np.full((len(rows), width), pad_id, np.int32)
  mask = np.zeros((len(rows), width), np.int32)
  for i, row in enumerate(rows):
    row = list(row)[:width]
    ids[i, : len(row)] = row
    mask[i, : len(row)] = 1
  return ids, mask


__all__ = ["bucket", "completion_logps", "left_pad", "positions_from_mask", "right_pad"]
