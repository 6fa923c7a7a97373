"""Small helpers of the generate package: shape buckets and checks of token ids and step counts.

Shapes are rounded up to buckets so that a later call with inputs of a similar
size reuses the compiled programs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

from easytunix.layers.cache import make_causal_mask, positions_from_mask

__all__ = [
    "MIN_PROMPT_BUCKET",
    "MIN_STEPS_BUCKET",
    "as_id",
    "bucket",
    "check_steps",
    "fine_bucket",
    "is_python_number",
    "is_token_id",
    "pack_rows",
    "share_prefixes",
]

# Smallest buckets: prompts are padded to at least this many tokens and the
# generated-token buffer holds at least this many steps.
MIN_PROMPT_BUCKET = 16
MIN_STEPS_BUCKET = 16


def bucket(n: int, minimum: int = 16, maximum: int | None = None) -> int:
  """The next power of two >= ``n`` (at least ``minimum``, at most ``maximum``): few distinct shapes to compile."""
  value = 1 << (max(int(n), int(minimum), 1) - 1).bit_length()
  return min(value, maximum) if maximum is not None else value


def fine_bucket(n: int, minimum: int, per_octave: int = 2) -> int:
  """The bucket of ``n`` (at least ``minimum``): ``per_octave`` evenly spaced sizes in each octave.

  Two per octave (the default) is the next of 1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, ...:
  powers of two and three quarters of them, padding under a third of the work with few
  distinct shapes to compile. Four per octave (..., 32, 40, 48, 56, 64, 80, ...) pads under
  a quarter, for more shapes. ``per_octave`` is a power of two.
  """
  if per_octave < 1 or per_octave & (per_octave - 1):
    raise ValueError(f"per_octave must be a power of two, got {per_octave}.")
  n = max(int(n), int(minimum), 1)
  power = bucket(n, 1)
  step = power // (2 * per_octave)
  if step < 1:  # a small octave has fewer whole sizes than per_octave
    return fine_bucket(n, 1, per_octave // 2) if per_octave > 1 else power
  return power // 2 + step * -(-(n - power // 2) // step)


def pack_rows(lengths: Sequence[int], width: int) -> list[tuple[int, int]]:
  """Places sequences end to end in rows of ``width`` slots: each one's (row, offset).

  First fit, longest first (every length at most ``width``). A row holds whole
  sequences only, so a packed prefill attends within each sequence's own slots.
  """
  if max(lengths, default=0) > width:
    raise ValueError(f"a sequence of {max(lengths)} tokens does not fit in rows of {width} slots.")
  free: list[int] = []  # slots left in each row
  placed: list[tuple[int, int]] = [(0, 0)] * len(lengths)
  for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
    row = next((r for r, left in enumerate(free) if left >= lengths[i]), len(free))
    if row == len(free):
      free.append(width)
    placed[i] = (row, width - free[row])
    free[row] -= lengths[i]
  return placed


def share_prefixes(ids: Sequence[Sequence[int]]) -> tuple[list[np.ndarray], int]:
  """Slots in one row where prompts that begin alike share the tokens they have in common.

  Token ``j`` of a prompt depends on that prompt's tokens ``0..j`` only, so prompts with a common
  prefix (a chat template's system prompt, one prompt repeated for several samples) need it
  computed once. Sorted, each prompt shares its longest common prefix with the prompt before
  it; that gives as few slots as a prefix tree of the prompts has nodes.

  Returns:
    Each prompt's slots (int array, one per token; a shared token has one slot in every prompt
    that holds it), and how many slots there are.
  """
  slots: list[np.ndarray] = [np.zeros((0,), np.int64)] * len(ids)
  count, previous = 0, None
  for i in sorted(range(len(ids)), key=lambda i: list(ids[i])):
    x = np.asarray(ids[i], np.int64)
    head = np.zeros((0,), np.int64)
    if previous is not None:
      p = np.asarray(ids[previous], np.int64)
      m = min(len(p), len(x))
      differ = np.flatnonzero(p[:m] != x[:m])
      head = slots[previous][: int(differ[0]) if differ.size else m]
    slots[i] = np.concatenate([head, count + np.arange(len(x) - len(head))])
    count += len(x) - len(head)
    previous = i
  return slots, count


def is_python_number(x: Any) -> bool:
  """Whether ``x`` is a host-side int or float (not a bool, not a traced array)."""
  return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool)


def is_token_id(x: Any) -> bool:
  """Whether ``x`` is an int token id (not a bool)."""
  return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def as_id(x: Any) -> int:
  """``x`` as an int token id (ints and 0-d integer arrays).

  Raises:
    TypeError: if ``x`` is not an integer.
  """
  if isinstance(x, bool) or not isinstance(x, (int, np.integer)):
    if isinstance(x, np.ndarray) and x.ndim == 0 and np.issubdtype(x.dtype, np.integer):
      return int(x)
    raise TypeError(f"token ids must be ints, got {x!r}")
  return int(x)


def check_steps(steps: Any) -> int:
  """``max_generation_steps`` as an int, or a ValueError saying it must be a positive int."""
  if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
    raise ValueError(f"max_generation_steps must be a positive int, got {steps!r}.")
  return int(steps)


# ----------------------------------------------------------------------------- Tunix's ``generate.utils`` helpers
#
# Tunix scripts import these from ``tunix.generate.utils``; the sampler itself
# uses the bucket helpers above.


def next_power_of_2(x: int) -> int:
  """The smallest power of two >= ``x`` (1 for 0)."""
  return 1 if x <= 1 else 1 << (int(x) - 1).bit_length()


def pad_to_length(
    x: np.ndarray, target_length: int, pad_value: int = 0, left: bool = False, axis: int = 0
) -> np.ndarray:
  """``x`` padded with ``pad_value`` to ``target_length`` along ``axis`` (on the left with ``left``).

  An array already that long or longer is returned as it is.
  """
  x = np.asarray(x)
  length = x.shape[axis]
  if length >= target_length:
    return x
  shape = list(x.shape)
  shape[axis] = target_length - length
  padding = np.full(shape, pad_value, dtype=x.dtype)
  return np.concatenate([padding, x] if left else [x, padding], axis=axis)


def find_first_non_pad_idx(ids: Any, pad_id: int) -> Any:
  """The index of the first id that is not ``pad_id`` in a 1-D array (0 when all are padding)."""
  ids = jnp.asarray(ids)
  if ids.ndim != 1:
    raise ValueError(f"ids must be a 1-D array, got shape {ids.shape}.")
  mask = ids != pad_id
  return jnp.where(jnp.any(mask), jnp.argmax(mask), 0)


def find_last_non_pad_idx(ids: Any, pad_id: int) -> Any:
  """The index of the last id that is not ``pad_id`` in a 1-D array (its length when all are padding)."""
  ids = jnp.asarray(ids)
  if ids.ndim != 1:
    raise ValueError(f"ids must be a 1-D array, got shape {ids.shape}.")
  mask = ids != pad_id
  return jnp.where(jnp.any(mask), ids.shape[0] - 1 - jnp.argmax(mask[::-1]), ids.shape[0])


def find_first_eos_idx(ids: Any, eos_id: Any) -> Any:
  """The index of the first id in ``eos_id`` (an id or ids) in a 1-D array (its length when there is none)."""
  ids = jnp.asarray(ids)
  if ids.ndim != 1:
    raise ValueError(f"ids must be a 1-D array, got shape {ids.shape}.")
  mask = jnp.isin(ids, jnp.atleast_1d(jnp.asarray(eos_id)))
  return jnp.where(jnp.any(mask), jnp.argmax(mask), ids.shape[0])


def build_positions_from_mask(input_mask: Any) -> Any:
  """Positions counting only real (``input_mask``) tokens from 0; padding before them gets 0."""
  return positions_from_mask(input_mask)


def make_causal_attn_mask(input_mask: Any, cache_size: int) -> Any:
  """The prefill mask [B, T, cache_size]: token i sees real tokens j <= i; cache slots past T are masked.

  Raises:
    ValueError: ``cache_size`` is smaller than the prompt length T.
  """
  length = input_mask.shape[-1]
  if cache_size < length:
    raise ValueError(f"cache_size={cache_size} is smaller than the prompt length {length}.")
  mask = make_causal_mask(input_mask)
  return jnp.pad(mask, ((0, 0), (0, 0), (0, cache_size - length)))


def compute_attention_masks(time_step: Any, seq_len: int, input_mask: Any) -> Any:
  """The decode-step mask [B, 1, seq_len]: cache slots <= ``time_step`` that are not padding.

  Args:
    time_step: the slot of the token being decoded.
    seq_len: the KV cache length.
    input_mask: [B, L] True where a slot holds PADDING (Tunix's convention here).
  """
  input_mask = jnp.asarray(input_mask, jnp.bool_)
  batch, width = input_mask.shape
  future = jnp.arange(seq_len)[None, :] > time_step
  pad = jnp.zeros((batch, seq_len), jnp.bool_).at[:, : min(width, seq_len)].set(input_mask[:, :seq_len])
  return ~(future | pad)[:, None, :]


def check_sampling_mode_conflict(original_sampling_mode: list[str | None], new_sampling_mode: str) -> None:
  """Sets ``original_sampling_mode[0]`` to ``new_sampling_mode``; a ValueError when it was already set."""
  if original_sampling_mode[0] is not None:
    raise ValueError(
        f"Conflicting sampling modes: {original_sampling_mode[0]!r} is set and {new_sampling_mode!r} was asked "
        "for. Pass top_p / top_k (sampling) or beam_size (beam search), not both."
    )
  original_sampling_mode[0] = new_sampling_mode


def get_logprobs_from_vllm_output(token_ids: list[int], logprobs: list[Any]) -> list[float]:
  """The log-probability of each chosen token from vLLM's per-step ``{id: Logprob}`` dicts ([] when absent)."""
  if not logprobs or logprobs[0] is None:
    return []
  if len(logprobs) != len(token_ids):
    raise ValueError(f"{len(logprobs)} log-prob entries for {len(token_ids)} token ids.")
  out = []
  for token, options in zip(token_ids, logprobs):
    if token not in options:
      raise ValueError(f"The chosen token id {token} is not among the returned log-probs {list(options)}.")
    entry = options[token]
    out.append(float(getattr(entry, "logprob", entry)))
  return out


__all__ += [
    "build_positions_from_mask",
    "check_sampling_mode_conflict",
    "compute_attention_masks",
    "find_first_eos_idx",
    "find_first_non_pad_idx",
    "find_last_non_pad_idx",
    "get_logprobs_from_vllm_output",
    "make_causal_attn_mask",
    "next_power_of_2",
    "pad_to_length",
]
