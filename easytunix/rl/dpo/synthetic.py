"""A preference task with checkable answers, bundled for the DPO guide and quick experiments.

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

from easytunix.sft.synthetic import exact_match_rate, split_records


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
    return exact_match_rate(predictions, self.eval_answers)


def _style_rate(predictions: Sequence[str], template: str) -> float:
  pattern = re.compile(re.escape(template).replace(re.escape("{answer}"), r"-?\d+"))
  return sum(bool(pattern.fullmatch(p.strip())) for p in predictions) / max(len(predictions), 1)


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
  repetition a preference step should remove). Every operand pair in ``[0, max_operand]`` appears
  once; ``num_eval`` pairs (shuffled with ``seed``) are held out, the rest (or ``num_train``) train."""
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
  train, held_out = split_records(records, num_train, num_eval, seed)
  return PreferenceTask(
      name=f"answer style ({chosen_template!r} over {rejected_template!r})",
      train=train,
      eval=held_out,
      chosen_template=chosen_template,
      rejected_template=rejected_template,
  )


__all__ = ["PreferenceTask", "answer_style_task"]
