"""Turning what users pass to ``fit`` into records, and checking their format."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

# Which record keys each trainer accepts (any one alternative).
FORMATS: dict[str, tuple[tuple[str, ...], ...]] = {
    "sft": (("text",), ("prompt", "completion"), ("messages",)),
    "distill": (("text",), ("prompt", "completion"), ("messages",)),
    "dpo": (("prompt", "chosen", "rejected"),),
    "grpo": (("prompt",),),
}


def _is_training_input(item: Any) -> bool:
  from easytunix.sft.peft_trainer import TrainingInput

  return isinstance(item, TrainingInput)


def load_file(path: Path) -> list[dict[str, Any]]:
  """Records of a .jsonl / .json / .csv / .parquet file."""
  if path.suffix.lower() == ".parquet":
    try:
      import pyarrow.parquet as pq
    except ImportError:
      raise ImportError(f"Reading {path} needs pyarrow: pip install pyarrow") from None
    return pq.read_table(path).to_pylist()
  from easytunix.sft.data import load_records

  return load_records(path)


def as_records(data: Any, *, what: str = "data") -> list[dict[str, Any]] | list[Any]:
  """Normalises ``fit`` data to a list of record dicts (or of ``TrainingInput`` batches).

  Accepts a list of strings, a list of dicts, a path to a data file, a Hugging
  Face ``datasets.Dataset`` (anything with ``column_names`` and row access), or an
  iterable of ``TrainingInput``.
  """
  if data is None:
    raise ValueError(f"{what} is None; pass a list of strings or records, a data file path, or a dataset.")
  if isinstance(data, (str, Path)):
    path = Path(data).expanduser()
    if not path.exists():
      raise FileNotFoundError(
          f"{what}: no file at {str(path)!r}. A single training text must be wrapped in a list: fit([text])."
      )
    return load_file(path)
  if hasattr(data, "column_names") and hasattr(data, "__getitem__") and hasattr(data, "__len__"):
    return [dict(data[i]) for i in range(len(data))]
  if isinstance(data, Mapping):
    raise TypeError(f"{what} is a single dict; pass a list of records instead: fit([record, ...]).")
  items = list(data) if isinstance(data, Iterable) else None
  if items is None:
    raise TypeError(f"{what} must be a list of strings or dicts, a file path or a dataset, got {type(data).__name__}.")
  if not items:
    raise ValueError(f"{what} is empty.")
  if all(isinstance(x, str) for x in items):
    return [{"text": x} for x in items]
  if all(_is_training_input(x) for x in items):
    return items
  if all(isinstance(x, Mapping) for x in items):
    return [dict(x) for x in items]
  kinds = sorted({type(x).__name__ for x in items})
  raise TypeError(f"{what} mixes item types {kinds}; use all strings, all dicts, or all TrainingInput batches.")


def check_format(records: list[Any], trainer: str, *, what: str = "data") -> None:
  """Raises when records lack the keys ``trainer`` needs, naming expected and found keys."""
  if not records or not isinstance(records[0], Mapping):
    return
  alternatives = FORMATS[trainer]
  for index, record in enumerate(records):
    if not any(all(k in record for k in keys) for keys in alternatives):
      expected = " or ".join("+".join(repr(k) for k in keys) for keys in alternatives)
      raise ValueError(
          f"{what}: record {index} does not fit trainer={trainer!r}, which expects keys {expected}; "
          f"found keys {sorted(record)}."
      )
