"""Ready-made reward functions with the signature GRPO calls: ``fn(prompts, completions, **columns) -> list[float]``.

Write your own the same way: a plain function of the prompts, the completion
texts and the batch's other columns (repeated once per completion), returning
one number per completion.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def exact_match(prompts: Sequence[Any], completions: Sequence[str], answer: Sequence[Any], **_: Any) -> list[float]:
  """1.0 when the completion, stripped, equals the ``answer`` column (as a string), else 0.0."""
  return [1.0 if c.strip() == str(a).strip() else 0.0 for c, a in zip(completions, answer)]


def last_number_match(
    prompts: Sequence[Any], completions: Sequence[str], answer: Sequence[Any], **_: Any
) -> list[float]:
  """1.0 when the last number in the completion equals the ``answer`` column numerically, else 0.0."""
  out = []
  for completion, expected in zip(completions, answer):
    numbers = _NUMBER.findall(completion)
    try:
      out.append(1.0 if numbers and float(numbers[-1]) == float(expected) else 0.0)
    except (TypeError, ValueError):
      out.append(0.0)
  return out


def regex_format(pattern: str, reward: float = 1.0, name: str | None = None) -> Callable[..., list[float]]:
  """A reward function giving ``reward`` to completions that match ``pattern`` (``re.search``, DOTALL), else 0.

  Example: ``regex_format(r"<answer>\\d+</answer>")`` rewards answers in the expected tags.
  """
  compiled = re.compile(pattern, re.DOTALL)

  def format_reward(prompts: Sequence[Any], completions: Sequence[str], **_: Any) -> list[float]:
    return [reward if compiled.search(c) else 0.0 for c in completions]

  format_reward.__name__ = name or "format_reward"
  return format_reward


__all__ = ["exact_match", "last_number_match", "regex_format"]
