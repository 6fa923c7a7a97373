"""Ready-made reward functions, called as GRPO (and TRL) calls them, with keywords:
``fn(prompts=..., completions=..., completion_ids=..., **columns) -> list[float]``.

Write your own the same way: take the arguments you need by name and ``**kwargs``
for the rest, and return one number per completion. TRL's reward functions work
unchanged, e.g. ``def reward_len(completions, **kwargs): return [-abs(20 - len(c)) for c in completions]``.
``columns`` are the dataset's other fields (e.g. ``answer``), repeated once per
completion. With conversational prompts (lists of messages) each completion is
``[{"role": "assistant", "content": text}]``; these built-ins accept both forms.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def completion_text(completion: Any) -> str:
  """The text of a completion: a string, or the content of a conversational completion's last message."""
  if isinstance(completion, str):
    return completion
  if isinstance(completion, (list, tuple)) and completion and isinstance(completion[-1], dict):
    return str(completion[-1].get("content", ""))
  raise TypeError(f"A completion must be a string or a list of messages, got {type(completion).__name__}.")


def exact_match(prompts: Sequence[Any], completions: Sequence[Any], answer: Sequence[Any], **_: Any) -> list[float]:
  """1.0 when the completion, stripped, equals the ``answer`` column (as a string), else 0.0."""
  return [1.0 if completion_text(c).strip() == str(a).strip() else 0.0 for c, a in zip(completions, answer)]


def last_number_match(
    prompts: Sequence[Any], completions: Sequence[Any], answer: Sequence[Any], **_: Any
) -> list[float]:
  """1.0 when the last number in the completion equals the ``answer`` column numerically, else 0.0."""
  out = []
  for completion, expected in zip(completions, answer):
    numbers = _NUMBER.findall(completion_text(completion))
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

  def format_reward(prompts: Sequence[Any], completions: Sequence[Any], **_: Any) -> list[float]:
    return [reward if compiled.search(completion_text(c)) else 0.0 for c in completions]

  format_reward.__name__ = name or "format_reward"
  return format_reward


__all__ = ["completion_text", "exact_match", "last_number_match", "regex_format"]
