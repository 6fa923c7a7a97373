"""Streaming: turning one new token per row per step into the text each row adds.

Joining a row's ``text`` pieces gives the text of the same non-streaming call.
Text is held back while the last tokens end in an incomplete character.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Iterator, Sequence

import numpy as np

__all__ = ["StreamChunk", "stream_chunks"]


@dataclasses.dataclass
class StreamChunk:
  """One step of ``Sampler.stream``: what each row added.

  Attributes:
    step: the index of the generated token (0 for the first); -1 for the echoed prompt.
    text: per row, the new text (empty when nothing new is printable yet or the row is done).
    tokens: per row, the new token ids.
    done: per row, whether the row has finished.
  """

  step: int
  text: list[str]
  tokens: list[list[int]]
  done: list[bool]


def stream_chunks(
    prompts: Sequence[list[int]],
    step_tokens: Iterable[np.ndarray],
    decode: Callable[[Sequence[int]], str],
    eos: Iterable[int],
    steps: int,
    echo: bool,
) -> Iterator[StreamChunk]:
  """The chunks of a streamed generation.

  Args:
    prompts: each row's prompt ids.
    step_tokens: per step, the token each row picked ([rows or more] host array); read lazily, and no
      further once every row is done.
    decode: ids -> text.
    eos: the ids that end a row.
    steps: the step budget.
    echo: yield the prompts first (step -1).
  """
  n = len(prompts)
  eos_set = set(eos)
  shown_ids: list[list[int]] = [list(p) if echo else [] for p in prompts]
  shown_text = ["" for _ in range(n)]
  finished = [False] * n
  if echo:
    first = [decode(p) for p in prompts]
    shown_text = list(first)
    yield StreamChunk(-1, first, [list(p) for p in prompts], [False] * n)
  for step, host in enumerate(step_tokens):
    texts, new_ids = [], []
    for row in range(n):
      if finished[row]:
        texts.append("")
        new_ids.append([])
        continue
      tid = int(host[row])
      new_ids.append([tid])
      shown_ids[row].append(tid)
      stopped = tid in eos_set
      text_ids = shown_ids[row][:-1] if stopped else shown_ids[row]
      full = decode(text_ids)
      last = stopped or step == steps - 1
      texts.append(_new_text(full, shown_text[row], last))
      shown_text[row] += texts[-1]
      finished[row] = stopped
    yield StreamChunk(step, texts, new_ids, [f or step == steps - 1 for f in finished])
    if all(finished):
      break


def _new_text(full: str, shown: str, last: bool) -> str:
  """The part of ``full`` not shown yet; waits while it ends in an incomplete character."""
  if not full.startswith(shown):
    return full[len(shown) :] if last else ""
  if not last and full.endswith("\ufffd"):
    return ""
  return full[len(shown) :]
