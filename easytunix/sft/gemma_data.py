"""Gemma data utilities: a SentencePiece tokenizer and train/eval datasets for instruction tuning.

Seed names (``GemmaTokenizer``, ``create_datasets``), also importable from their seed
path ``easytunix.models.gemma.data``; the batching itself is
:class:`easytunix.sft.data.SupervisedDataset`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from easytunix.sft.data import SupervisedDataset, load_records

_DEFAULT_TOKENIZER = Path(__file__).resolve().parents[1] / "presets" / "assets" / "tiny_sp" / "tokenizer.model"

# Gemma's instruction format: a user turn, then the model turn the completion fills.
GEMMA_INSTRUCT_TEMPLATE = {
    "prefix": "<start_of_turn>user\n",
    "suffix": "<end_of_turn>\n<start_of_turn>model\n",
}

_PROMPT_KEYS = ("prompt", "input", "question", "instruction", "src")
_COMPLETION_KEYS = ("completion", "output", "answer", "response", "target", "dst")


class GemmaTokenizer:
  """SentencePiece tokenizer with the interface the data helpers and the sampler use.

  Args:
    model_path: a SentencePiece ``.model`` file, or a folder holding
      ``tokenizer.model`` (default: the tiny test tokenizer shipped with easytunix).
  """

  def __init__(self, model_path: str | Path | None = None):
    import sentencepiece as spm

    path = Path(model_path) if model_path is not None else _DEFAULT_TOKENIZER
    if path.is_dir():
      path = path / "tokenizer.model"
    if not path.is_file():
      raise FileNotFoundError(f"No SentencePiece model at {str(path)!r} (give a .model file or a folder holding one).")
    self.model_path = path
    self.processor = spm.SentencePieceProcessor(model_file=str(path))
    # Control pieces (<bos>, <eos>, <pad>) are never matched in text by SentencePiece
    # itself; user-defined ones (<start_of_turn>) are.
    self._control = {
        self.processor.id_to_piece(i): i for i in range(self.processor.get_piece_size()) if self.processor.is_control(i)
    }
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto.FromString(self.processor.serialized_model_proto())
    user_defined = sentencepiece_model_pb2.ModelProto.SentencePiece.USER_DEFINED
    self._special_ids = set(self._control.values()) | {
        i for i, piece in enumerate(proto.pieces) if piece.type == user_defined
    }

  @property
  def bos_id(self) -> int:
    return int(self.processor.bos_id())

  @property
  def eos_id(self) -> int:
    return int(self.processor.eos_id())

  @property
  def eos_ids(self) -> tuple[int, ...]:
    """EOS and, when present, ``<end_of_turn>`` (where Gemma's chat turns end)."""
    end_of_turn = self.processor.piece_to_id("<end_of_turn>")
    has_it = end_of_turn != self.processor.unk_id() and end_of_turn != self.eos_id
    return (self.eos_id,) + ((int(end_of_turn),) if has_it else ())

  @property
  def pad_id(self) -> int:
    pad = int(self.processor.pad_id())
    return pad if pad >= 0 else self.eos_id

  @property
  def bos_token(self) -> str:
    return self.processor.id_to_piece(self.bos_id)

  @property
  def vocab_size(self) -> int:
    return int(self.processor.get_piece_size())

  def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
    """Token ids of ``text`` (BOS first when ``add_special_tokens``); control tokens in the text map to their ids."""
    ids: list[int] = [self.bos_id] if add_special_tokens else []
    pieces = [text]
    for token in sorted(self._control, key=len, reverse=True):
      pieces = [part for piece in pieces for part in _split_keep(piece, token)]
    for piece in pieces:
      if piece in self._control:
        ids.append(self._control[piece])
      elif piece:
        ids.extend(self.processor.encode(piece))
    return ids

  def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
    ids = [int(i) for i in ids]
    if skip_special_tokens:
      ids = [i for i in ids if i not in self._special_ids]
    return self.processor.decode(ids)

  def tokenize(self, example: str, prefix: str = "", suffix: str = "", add_eos: bool = True) -> np.ndarray:
    """``[BOS] + prefix + example + suffix (+ [EOS])`` as an int32 array (the seed's helper)."""
    ids = self.encode(prefix + example + suffix)
    if add_eos:
      ids.append(self.eos_id)
    return np.asarray(ids, np.int32)


def _split_keep(text: str, token: str) -> list[str]:
  if token not in text:
    return [text]
  parts = text.split(token)
  out = [parts[0]]
  for part in parts[1:]:
    out.extend([token, part])
  return out


def _pick(columns: Sequence[str], candidates: Sequence[str], given: str | None, what: str) -> str:
  if given is not None:
    if given not in columns:
      raise ValueError(f"{what} column {given!r} is not in the dataset columns {list(columns)}.")
    return given
  for name in candidates:
    if name in columns:
      return name
  raise ValueError(
      f"Cannot find the {what} column among {list(columns)}; name it with "
      f"{'prompt_key' if what == 'prompt' else 'completion_key'}=... (looked for {list(candidates)})."
  )


def _records_of(dataset: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
  """(train records, eval records or None) from a path, a list, or a Hugging Face (Dataset|DatasetDict)."""
  if isinstance(dataset, (str, Path)):
    return load_records(dataset), None
  if isinstance(dataset, Mapping) and "train" in dataset:  # a DatasetDict or {"train": ..., "validation": ...}
    evaluation = next((dataset[k] for k in ("validation", "test", "eval") if k in dataset), None)
    return [dict(r) for r in dataset["train"]], None if evaluation is None else [dict(r) for r in evaluation]
  if hasattr(dataset, "column_names") or isinstance(dataset, Sequence):
    return [dict(r) for r in dataset], None
  raise TypeError(
      "dataset must be a path to a .jsonl/.json/.csv file, a list of dicts, a Hugging Face Dataset, or a "
      f"DatasetDict with a 'train' split; got {type(dataset).__name__}."
  )


def create_datasets(
    dataset: Any,
    global_batch_size: int,
    max_target_length: int,
    num_train_epochs: int | None = None,
    tokenizer: Any = None,
    instruct_tuning: bool = True,
    input_template: Mapping[str, str] | None = None,
    *,
    prompt_key: str | None = None,
    completion_key: str | None = None,
    eval_fraction: float = 0.1,
    seed: int = 0,
) -> tuple[Any, Any]:
  """Train and eval streams of :class:`~easytunix.sft.peft_trainer.TrainingInput` batches.

  Args:
    dataset: a ``.jsonl``/``.json``/``.csv`` path, a list of dicts, a Hugging
      Face ``datasets.Dataset``, or a ``DatasetDict`` (its ``validation`` or
      ``test`` split becomes the eval set). ``datasets`` is not a dependency:
      pass an object you loaded yourself.
    global_batch_size: rows per batch.
    max_target_length: tokens per row (prompt + completion).
    num_train_epochs: passes over the training data per iteration of the train stream (None: 1).
    tokenizer: a :class:`GemmaTokenizer` (default: the tiny one) or any tokenizer with ``encode``/``eos_id``/``pad_id``.
    instruct_tuning: wrap each prompt in Gemma's user/model turn markers.
    input_template: ``{"prefix": ..., "suffix": ...}`` around each prompt (overrides ``instruct_tuning``).
    prompt_key / completion_key: column names (default: sniffed, e.g. prompt/completion, input/output, src/dst).
    eval_fraction: share of the data held out for eval when there is no eval split.
    seed: shuffling and splitting seed.

  Returns:
    ``(train_ds, eval_ds)``: re-iterable ``SupervisedDataset`` objects; the loss
    covers the completion tokens and EOS.
  """

  tokenizer = tokenizer if tokenizer is not None else GemmaTokenizer()
  train, evaluation = _records_of(dataset)
  if not train:
    raise ValueError("The dataset is empty.")
  columns = list(train[0])
  if "messages" in columns or ("text" in columns and not any(k in columns for k in _PROMPT_KEYS)):
    convert = dict
  else:
    p_key = _pick(columns, _PROMPT_KEYS, prompt_key, "prompt")
    c_key = _pick(columns, _COMPLETION_KEYS, completion_key, "completion")
    template = input_template if input_template is not None else (GEMMA_INSTRUCT_TEMPLATE if instruct_tuning else {})
    prefix, suffix = template.get("prefix", ""), template.get("suffix", "")

    def convert(r):
      return {"prompt": f"{prefix}{r[p_key]}{suffix}", "completion": str(r[c_key])}

  if evaluation is None:
    if not 0.0 < eval_fraction < 1.0:
      raise ValueError(f"eval_fraction must be in (0, 1), got {eval_fraction}.")
    order = np.random.default_rng(seed).permutation(len(train))
    n_eval = max(1, int(round(len(train) * eval_fraction)))
    evaluation = [train[i] for i in order[:n_eval]]
    train = [train[i] for i in order[n_eval:]]
    if not train:
      raise ValueError(f"Holding out {n_eval} of {len(order)} records for eval leaves nothing to train on.")
  common = dict(tokenizer=tokenizer, max_length=max_target_length, seed=seed)
  train_ds = SupervisedDataset(
      [convert(r) for r in train],
      batch_size=global_batch_size,
      repeat=num_train_epochs or 1,
      name="the train split",
      **common,
  )
  eval_ds = SupervisedDataset(
      [convert(r) for r in evaluation],
      batch_size=global_batch_size,
      shuffle=False,
      drop_remainder=False,
      name="the eval split",
      **common,
  )
  return train_ds, eval_ds


__all__ = ["GEMMA_INSTRUCT_TEMPLATE", "GemmaTokenizer", "create_datasets"]
