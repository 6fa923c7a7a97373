"""Preference tasks with checkable answers, for tests, guides and quick experiments.

* ``addition_preference_task``: ``{"prompt": "12+7=", "chosen": "19", "rejected": "21"}``,
  the rejected answer a wrong sum near the right one (a preference about content).
* ``answer_style_task``: ``{"prompt": "12+7=", "chosen": "19", "rejected": "19 19 19"}``
  (a preference about style: say it once and stop; a tiny model picks it up in a few dozen steps).

Train and held-out pairs share no prompt, so a held-out preference shows what
the model learned, not what it memorised.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class PreferenceTask:
  """A task's ``{"prompt", "chosen", "rejected"}`` records.

  Attributes:
    name: what the task is.
    train: training pairs.
    eval: held-out pairs (no prompt in common with ``train``).
    chosen_template / rejected_template: how the answer is written in each
      response (``"{answer}"`` where it goes).
  """

  name: str
  train: list[dict[str, str]]
  eval: list[dict[str, str]]
  chosen_template: str = "{answer}"
  rejected_template: str = "{answer}"

  @property
  def eval_prompts(self) -> list[str]:
    return [r["prompt"] for r in self.eval]

  @property
  def eval_answers(self) -> list[str]:
    return [r["chosen"] for r in self.eval]

  def sft_records(self, split: str = "train", chosen_fraction: float = 1.0, seed: int = 0) -> list[dict[str, str]]:
    """``{"prompt", "completion"}`` records for an SFT warm-up: the chosen response
    with probability ``chosen_fraction``, else the rejected one (noisy data that DPO then cleans up)."""
    rng = np.random.default_rng(seed)
    return [
        {"prompt": r["prompt"], "completion": r["chosen"] if rng.random() < chosen_fraction else r["rejected"]}
        for r in getattr(self, split)
    ]

  def chosen_style_rate(self, predictions: Sequence[str]) -> float:
    """Fraction of ``predictions`` written in the chosen style (any number in the answer's place)."""
    return _style_rate(predictions, self.chosen_template)

  def rejected_style_rate(self, predictions: Sequence[str]) -> float:
    """Fraction of ``predictions`` written in the rejected style."""
    return _style_rate(predictions, self.rejected_template)

  def score(self, predictions: Sequence[str]) -> float:
    """Fraction of ``predictions`` equal to the held-out chosen answers (surrounding whitespace ignored)."""
    if len(predictions) != len(self.eval):
      raise ValueError(f"Got {len(predictions)} predictions for {len(self.eval)} held-out pairs.")
    return sum(p.strip() == a.strip() for p, a in zip(predictions, self.eval_answers)) / max(len(self.eval), 1)


def _style_rate(predictions: Sequence[str], template: str) -> float:
  pattern = re.compile(re.escape(template).replace(re.escape("{answer}"), r"-?\d+"))
  return sum(bool(pattern.fullmatch(p.strip())) for p in predictions) / max(len(predictions), 1)


def _split(records: list[dict[str, str]], num_train: int | None, num_eval: int, rng: np.random.Generator):
  order = rng.permutation(len(records))
  if num_eval >= len(records):
    raise ValueError(f"num_eval={num_eval} leaves no training pairs out of {len(records)}.")
  held_out = [records[i] for i in order[:num_eval]]
  train = [records[i] for i in order[num_eval:]]
  if num_train is not None:
    if num_train > len(train):
      raise ValueError(f"num_train={num_train} exceeds the {len(train)} pairs left after the held-out split.")
    train = train[:num_train]
  return train, held_out


def addition_preference_task(
    num_train: int | None = None,
    num_eval: int = 200,
    seed: int = 0,
    max_operand: int = 49,
    max_offset: int = 3,
) -> PreferenceTask:
  """``"a+b="``: chosen the sum, rejected a wrong sum off by 1 to ``max_offset`` (never negative).

  Every operand pair in ``[0, max_operand]`` appears once; the pairs are shuffled
  with ``seed``, the first ``num_eval`` are held out and the rest (or
  ``num_train`` of them) train.
  """
  if max_operand < 1 or max_offset < 1:
    raise ValueError(f"max_operand and max_offset must be >= 1, got {max_operand} and {max_offset}.")
  rng = np.random.default_rng(seed)
  records = []
  for a in range(max_operand + 1):
    for b in range(max_operand + 1):
      total = a + b
      offset = int(rng.integers(1, max_offset + 1))
      wrong = total - offset if total - offset >= 0 and rng.random() < 0.5 else total + offset
      records.append({"prompt": f"{a}+{b}=", "chosen": str(total), "rejected": str(wrong)})
  train, held_out = _split(records, num_train, num_eval, rng)
  return PreferenceTask(name=f"addition preference (0..{max_operand}, off by <= {max_offset})", train=train, eval=held_out)


def answer_style_task(
    num_train: int | None = None,
    num_eval: int = 200,
    seed: int = 0,
    max_operand: int = 49,
    chosen_template: str = "{answer}",
    rejected_template: str = "{answer} {answer} {answer}",
) -> PreferenceTask:
  """``"a+b="``: both responses hold the right sum; chosen writes it as ``chosen_template``
  (by default: once), rejected as ``rejected_template`` (by default: three times, the
  repetition a preference step should remove). Split as :func:`addition_preference_task`."""
  for name, template in (("chosen_template", chosen_template), ("rejected_template", rejected_template)):
    if "{answer}" not in template:
      raise ValueError(f"{name} must contain '{{answer}}', got {template!r}.")
  if chosen_template == rejected_template:
    raise ValueError("chosen_template and rejected_template are the same: there is no preference to learn.")
  if max_operand < 1:
    raise ValueError(f"max_operand must be >= 1, got {max_operand}.")
  records = [
      {
          "prompt": f"{a}+{b}=",
          "chosen": chosen_template.replace("{answer}", str(a + b)),
          "rejected": rejected_template.replace("{answer}", str(a + b)),
      }
      for a in range(max_operand + 1)
      for b in range(max_operand + 1)
  ]
  train, held_out = _split(records, num_train, num_eval, np.random.default_rng(seed))
  return PreferenceTask(
      name=f"answer style ({chosen_template!r} over {rejected_template!r})",
      train=train,
      eval=held_out,
      chosen_template=chosen_template,
      rejected_template=rejected_template,
  )


__all__ = ["PreferenceTask", "addition_preference_task", "answer_style_task"]
