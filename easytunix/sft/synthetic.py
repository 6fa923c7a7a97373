"""Small tasks with checkable answers, bundled for the quickstart and the guides.

Each task is a fixed-seed list of prompt/completion records split into train
and held-out parts that share no prompt; ``task.score`` is the held-out
exact-match rate of generations.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class SyntheticTask:
  """A task's records (``{"prompt", "completion"}`` dicts).

  Attributes:
    name: what the task is.
    train: training records.
    eval: held-out records (no prompt in common with ``train``).
  """

  name: str
  train: list[dict[str, str]]
  eval: list[dict[str, str]]

  @property
  def eval_prompts(self) -> list[str]:
    return [r["prompt"] for r in self.eval]

  @property
  def eval_answers(self) -> list[str]:
    return [r["completion"] for r in self.eval]

  def score(self, predictions: Sequence[str]) -> float:
    """Exact-match accuracy of ``predictions`` against the held-out completions."""
    return exact_match_rate(predictions, self.eval_answers)


def split_records(
    records: list[dict[str, str]], num_train: int | None, num_eval: int, seed: int | np.random.Generator
) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
  """Shuffles ``records`` and returns ``(train, held_out)``: ``num_eval`` held out, the rest
  (or ``num_train`` of it) to train on. ``seed`` may be a Generator to continue its stream."""
  order = np.random.default_rng(seed).permutation(len(records))
  if num_eval >= len(records):
    raise ValueError(f"num_eval={num_eval} leaves no training data out of {len(records)} examples.")
  held_out = [records[i] for i in order[:num_eval]]
  rest = [records[i] for i in order[num_eval:]]
  if num_train is not None:
    if num_train > len(rest):
      raise ValueError(f"num_train={num_train} exceeds the {len(rest)} examples left after the held-out split.")
    rest = rest[:num_train]
  return rest, held_out


def _split(records: list[dict[str, str]], num_train: int | None, num_eval: int, seed: int, name: str) -> SyntheticTask:
  train, held_out = split_records(records, num_train, num_eval, seed)
  return SyntheticTask(name=name, train=train, eval=held_out)


def addition_task(
    num_train: int | None = None, num_eval: int = 500, seed: int = 0, max_operand: int = 99
) -> SyntheticTask:
  """``"12+7="`` -> ``"19"`` for every pair of operands in ``[0, max_operand]``.

  All ``(max_operand + 1) ** 2`` pairs are shuffled with ``seed``; the first
  ``num_eval`` are held out and the rest (or ``num_train`` of them) train.
  """
  records = [
      {"prompt": f"{a}+{b}=", "completion": str(a + b)}
      for a in range(max_operand + 1)
      for b in range(max_operand + 1)
  ]
  return _split(records, num_train, num_eval, seed, f"addition(0..{max_operand})")


def with_label_noise(
    task: SyntheticTask,
    fraction: float,
    corrupt: Callable[[str], str] | None = None,
    seed: int = 0,
) -> SyntheticTask:
  """A copy of ``task`` whose training completions are wrong for ``fraction`` of the records.

  The held-out records stay correct. ``corrupt`` maps a right answer to the
  wrong one (default: an integer answer plus one, a systematic off-by-one bug),
  so a model fit to the noisy data prefers the wrong answer while still giving
  the right one real probability: what a verifier-based reward (GRPO) can fix.
  Each record's training copy also carries the correct answer as ``"answer"``.
  """
  if not 0.0 <= fraction <= 1.0:
    raise ValueError(f"fraction must be in [0, 1], got {fraction!r}.")
  corrupt = corrupt or (lambda answer: str(int(answer) + 1))
  rng = np.random.default_rng(seed)
  train = []
  for record in task.train:
    noisy = rng.random() < fraction
    train.append({**record, "completion": corrupt(record["completion"]) if noisy else record["completion"],
                  "answer": record["completion"]})
  return SyntheticTask(name=f"{task.name} with {fraction:.0%} wrong labels", train=train, eval=list(task.eval))


def exact_match_rate(predictions: Sequence[str], references: Sequence[str]) -> float:
  """Fraction of predictions equal to their reference after stripping surrounding whitespace."""
  if len(predictions) != len(references):
    raise ValueError(f"Got {len(predictions)} predictions for {len(references)} references.")
  if not references:
    return 0.0
  return sum(p.strip() == r.strip() for p, r in zip(predictions, references)) / len(references)


__all__ = ["SyntheticTask", "addition_task", "exact_match_rate", "split_records", "with_label_noise"]
