"""Small helpers of the generate package: shape buckets and checks of token ids and step counts.

Shapes are rounded up to buckets so that a later call with inputs of a similar
size reuses the compiled programs.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = [
    "MIN_PROMPT_BUCKET",
    "MIN_STEPS_BUCKET",
    "as_id",
    "bucket",
    "check_steps",
    "fine_bucket",
    "is_python_number",
    "is_token_id",
]

# Smallest buckets: prompts are padded to at least this many tokens and the
# generated-token buffer holds at least this many steps.
MIN_PROMPT_BUCKET = 16
MIN_STEPS_BUCKET = 16


def bucket(n: int, minimum: int = 16, maximum: int | None = None) -> int:
  """The next power of two >= ``n`` (at least ``minimum``, at most ``maximum``): few distinct shapes to compile."""
  value = 1 << (max(int(n), int(minimum), 1) - 1).bit_length()
  return min(value, maximum) if maximum is not None else value


def fine_bucket(n: int, minimum: int) -> int:
  """The bucket of ``n`` (at least ``minimum``): the next of 1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, ...

  Two buckets per octave (powers of two and three quarters of them) keep the
  padding under a third of the work, with few distinct shapes to compile.
  """
  power = bucket(n, minimum)
  three_quarters = power // 2 + power // 4
  return three_quarters if power >= 4 and max(n, minimum) <= three_quarters else power


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
