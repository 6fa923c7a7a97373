"""Tasks only the tests use (the quickstart's and guides' tasks ship in easytunix.sft.synthetic and
easytunix.rl.dpo.synthetic)."""

from __future__ import annotations

import string

import numpy as np

from easytunix.rl.dpo.synthetic import PreferenceTask
from easytunix.sft.synthetic import SyntheticTask, split_records


def reversal_task(
    num_train: int = 4000,
    num_eval: int = 500,
    seed: int = 0,
    min_length: int = 3,
    max_length: int = 6,
    alphabet: str = string.ascii_lowercase,
) -> SyntheticTask:
  """``"abcd>"`` -> ``"dcba"``: distinct random strings, reversed."""
  if not 0 < min_length <= max_length:
    raise ValueError(f"Need 0 < min_length <= max_length, got {min_length} and {max_length}.")
  rng = np.random.default_rng(seed)
  wanted = num_train + num_eval
  seen: dict[str, None] = {}
  letters = np.array(list(alphabet))
  for _ in range(wanted * 20):
    if len(seen) == wanted:
      break
    n = int(rng.integers(min_length, max_length + 1))
    seen["".join(rng.choice(letters, n))] = None
  if len(seen) < wanted:
    raise ValueError(f"Could not draw {wanted} distinct strings; lower num_train/num_eval or allow longer strings.")
  records = [{"prompt": f"{s}>", "completion": s[::-1]} for s in seen]
  train, held_out = split_records(records, num_train, num_eval, seed + 1)
  return SyntheticTask(name=f"reversal({min_length}..{max_length})", train=train, eval=held_out)


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
  train, held_out = split_records(records, num_train, num_eval, rng)
  return PreferenceTask(name=f"addition preference (0..{max_operand}, off by <= {max_offset})", train=train, eval=held_out)
