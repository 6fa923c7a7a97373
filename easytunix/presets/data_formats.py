"""Turning what users pass to ``fit`` into records, and checking their format."""

from __future__ import annotations

import json
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


def _is_conversation(value: Any) -> bool:
  return isinstance(value, (list, tuple)) and bool(value) and all(isinstance(m, Mapping) and "role" in m for m in value)


def _implicit_prompt(record: Mapping[str, Any]) -> bool:
  """TRL's implicit-prompt preference record: ``chosen`` and ``rejected`` conversations, no ``prompt``."""
  return "prompt" not in record and _is_conversation(record.get("chosen")) and _is_conversation(record.get("rejected"))


# Record shapes a trainer also accepts, beyond the keys in FORMATS, with how an error describes them.
IMPLICIT_FORMATS: dict[str, tuple[Any, str]] = {
    "dpo": (_implicit_prompt, "'chosen'+'rejected' conversations whose shared first messages are the prompt"),
}


def _is_training_input(item: Any) -> bool:
  from easytunix.sft.peft_trainer import TrainingInput

  return isinstance(item, TrainingInput)


def load_jsonl(path: Path) -> list[dict[str, Any]]:
  """Records of a JSON-lines file; a bad line is an error naming its number."""
  records = []
  with path.open(encoding="utf-8") as f:
    for number, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path} line {number} is not valid JSON ({e.msg}, column {e.colno}).") from None
      if not isinstance(record, dict):
        raise ValueError(f"{path} line {number} is a JSON {type(record).__name__}, not an object of fields.")
      records.append(record)
  return records


def load_file(path: Path) -> list[dict[str, Any]]:
  """Records of a .jsonl / .json / .csv / .parquet file."""
  if path.suffix.lower() == ".jsonl":
    return load_jsonl(path)
  if path.suffix.lower() == ".parquet":
    try:
      import pyarrow.parquet as pq
    except ImportError:
      raise ImportError(f"Reading {path} needs pyarrow: pip install pyarrow (or 'easytunix[datasets]')") from None
    return pq.read_table(path).to_pylist()
  from easytunix.sft.data import load_records

  try:
    return load_records(path)
  except json.JSONDecodeError as e:  # a .json file
    raise ValueError(f"{path} is not valid JSON ({e.msg}, line {e.lineno} column {e.colno}).") from None


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
    records = load_file(path)
    if not records:
      raise ValueError(f"{what}: {path} holds no records (the file is empty).")
    return records
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
  implicit, described = IMPLICIT_FORMATS.get(trainer, (lambda record: False, ""))
  for index, record in enumerate(records):
    if not any(all(k in record for k in keys) for keys in alternatives) and not implicit(record):
      expected = " or ".join("+".join(repr(k) for k in keys) for keys in alternatives)
      also = f" It also takes {described}." if described else ""
      raise ValueError(
          f"{what}: record {index} does not fit trainer={trainer!r}, which expects keys {expected}; "
          f"found keys {sorted(record)}.{also}"
      )
    check_values(record, index, what=what)


def check_values(record: Mapping[str, Any], index: int, *, what: str = "data") -> None:
  """Raises when a record's text fields are not text (e.g. None, which would train on the string "None")."""
  for key in ("text", "completion", "prompt", "chosen", "rejected"):
    if key not in record:
      continue
    value = record[key]
    conversation_ok = key != "text" and key != "completion" and isinstance(value, (list, tuple))
    if not (isinstance(value, str) or conversation_ok):
      raise TypeError(f"{what}: record {index} has {key}={_short(value)} ({type(value).__name__}); "
                      f"{key!r} must be a string.")
  if "messages" in record:
    messages = record["messages"]
    if not isinstance(messages, (list, tuple)) or not messages:
      raise TypeError(
          f"{what}: record {index} has messages={_short(messages)}; 'messages' must be a non-empty list of "
          "{'role': ..., 'content': ...} dicts."
      )
    for turn, message in enumerate(messages):
      if not isinstance(message, Mapping) or "role" not in message or not isinstance(message.get("content"), str):
        raise TypeError(
            f"{what}: record {index}, messages[{turn}] is {_short(message)}; each message must be a dict with "
            "'role' and a string 'content', e.g. {'role': 'user', 'content': 'Hi'}."
        )


def _short(value: Any) -> str:
  text = repr(value)
  return text if len(text) <= 60 else text[:57] + "..."
