"""Turning text, prompt/completion pairs and chat conversations into :class:`TrainingInput` batches.

Record formats (as in TRL):

* ``{"text": ...}``: language modelling, loss on every token.
* ``{"prompt": ..., "completion": ...}``: loss on the completion only; EOS is
  appended so a fine-tuned model learns to stop.
* ``{"messages": [{"role": ..., "content": ...}, ...]}``: rendered with the
  tokenizer's chat template; loss on the assistant turns (their end-of-turn
  token included).

A tokenizer needs ``encode(text, add_special_tokens=...)``, ``eos_id``, ``pad_id``
and, for chats, ``apply_chat_template(messages, add_generation_prompt=...)``:
:class:`easytunix.generate.tokenizer_adapter.TokenizerAdapter` has them all.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from easytunix.generate.tokenizer_adapter import tokenizer_eos_id, tokenizer_pad_id
from easytunix.sft.peft_trainer import TrainingInput


@dataclasses.dataclass(frozen=True)
class TokenizedExample:
  """One tokenized sequence and the tokens the loss is computed on.

  Attributes:
    tokens: token ids.
    completion_mask: True where a token is a loss target (same length as ``tokens``).
  """

  tokens: tuple[int, ...]
  completion_mask: tuple[bool, ...]

  def __post_init__(self):
    if len(self.tokens) != len(self.completion_mask):
      raise ValueError("tokens and completion_mask must have the same length.")

  def __len__(self) -> int:
    return len(self.tokens)

  @property
  def num_targets(self) -> int:
    # The first token is never predicted.
    return int(sum(self.completion_mask[1:]))


class _Builder:
  """Accumulates (text piece, is-target) segments into one TokenizedExample."""

  def __init__(self, tokenizer: Any):
    self.tokenizer = tokenizer
    self.tokens: list[int] = []
    self.mask: list[bool] = []

  def add_text(self, text: str, target: bool) -> None:
    if not text:
      return
    # Special tokens (BOS) go on the first piece only, and not when the chat
    # template already wrote the BOS string itself.
    bos = getattr(self.tokenizer, "bos_token", None)
    special = not self.tokens and not (isinstance(bos, str) and bos and text.startswith(bos))
    ids = self.tokenizer.encode(text, add_special_tokens=special)
    self.add_ids(ids, target)

  def add_ids(self, ids: Sequence[int], target: bool) -> None:
    self.tokens.extend(int(i) for i in ids)
    self.mask.extend([target] * len(ids))

  def build(self) -> TokenizedExample:
    return TokenizedExample(tuple(self.tokens), tuple(self.mask))


def _eos(tokenizer: Any) -> int:
  eos = tokenizer_eos_id(tokenizer)
  if eos is None:
    raise ValueError("The tokenizer has no EOS token; pass add_eos=False or use a tokenizer with one.")
  return int(eos)


def tokenize_text(tokenizer: Any, text: str, add_eos: bool = True) -> TokenizedExample:
  """Plain text: every token is a target."""
  b = _Builder(tokenizer)
  b.add_text(text, target=True)
  if add_eos:
    b.add_ids([_eos(tokenizer)], target=True)
  return b.build()


def tokenize_prompt_completion(
    tokenizer: Any, prompt: str, completion: str, add_eos: bool = True
) -> TokenizedExample:
  """A prompt (no loss) followed by its completion (loss), then EOS (loss)."""
  b = _Builder(tokenizer)
  b.add_text(prompt, target=False)
  b.add_text(completion, target=True)
  if add_eos:
    b.add_ids([_eos(tokenizer)], target=True)
  return b.build()


def tokenize_messages(tokenizer: Any, messages: Sequence[Mapping[str, Any]]) -> TokenizedExample:
  """A chat rendered with the tokenizer's template; the assistant turns are the targets.

  Each assistant turn is located by rendering the conversation up to it with
  the generation prompt (the text before the turn) and then with the turn
  itself; the difference is the turn, end-of-turn marker included.

  Raises:
    ValueError: without an assistant turn, or when the template renders an
      earlier part of the conversation differently once later turns are added.
  """
  messages = [dict(m) for m in messages]
  if not any(m.get("role") == "assistant" for m in messages):
    raise ValueError("A 'messages' example needs at least one assistant turn to train on.")
  def render(msgs: list[dict[str, Any]], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(msgs, add_generation_prompt=generation_prompt, tokenize=False)

  b = _Builder(tokenizer)
  done = ""
  for i, message in enumerate(messages):
    if message.get("role") != "assistant":
      continue
    before = render(messages[:i], True)
    upto = render(messages[: i + 1], False)
    if not before.startswith(done) or not upto.startswith(before):
      raise ValueError(
          "The chat template does not render conversations prefix-stably (the text before assistant turn "
          f"{i} changes once the turn is added), so assistant tokens cannot be located. Use "
          "prompt/completion records, or a template without that behaviour."
      )
    b.add_text(before[len(done):], target=False)
    b.add_text(upto[len(before):], target=True)
    done = upto
  full = render(messages, False)
  if full.startswith(done):
    b.add_text(full[len(done):], target=False)
  return b.build()


def _as_messages(record: Mapping[str, Any]) -> list[dict[str, str]]:
  messages = []
  if record.get("system"):
    messages.append({"role": "system", "content": str(record["system"])})
  messages.append({"role": "user", "content": str(record["prompt"])})
  messages.append({"role": "assistant", "content": str(record["completion"])})
  return messages


def tokenize_record(
    tokenizer: Any, record: Mapping[str, Any], *, add_eos: bool = True, use_chat_template: bool = False
) -> TokenizedExample:
  """Tokenizes one record of any supported format (see the module docstring).

  With ``use_chat_template`` a prompt/completion pair is turned into a
  user/assistant chat (plus an optional ``system`` field) and rendered with the
  template: what an instruction-tuned model expects.
  """
  if "messages" in record:
    return tokenize_messages(tokenizer, record["messages"])
  if "prompt" in record and "completion" in record:
    if use_chat_template:
      return tokenize_messages(tokenizer, _as_messages(record))
    return tokenize_prompt_completion(tokenizer, str(record["prompt"]), str(record["completion"]), add_eos=add_eos)
  if "text" in record:
    return tokenize_text(tokenizer, str(record["text"]), add_eos=add_eos)
  raise ValueError(
      f"Cannot tell the format of a record with keys {sorted(record)}: expected 'text', "
      "'prompt' and 'completion', or 'messages'."
  )


def truncate_examples(
    examples: Sequence[TokenizedExample], max_length: int, *, where: str = "the dataset",
    template_tokens: int | None = None,
) -> list[TokenizedExample]:
  """Cuts examples to ``max_length`` tokens (keeping the start), warning what was cut.

  The warning gives the count, the longest example, ``template_tokens`` (what the chat template
  adds around each turn, when one is used) and how many examples lost their last target token
  (the EOS or end-of-turn token that teaches the model to stop).

  Raises:
    ValueError: when cutting would leave an example with no target token.
  """
  if max_length < 2:
    raise ValueError(f"max_length must be at least 2, got {max_length}.")
  out, cut, lost_end = [], 0, 0
  for index, ex in enumerate(examples):
    if len(ex) > max_length:
      cut += 1
      lost_end += any(ex.completion_mask[max_length:])
      ex = TokenizedExample(ex.tokens[:max_length], ex.completion_mask[:max_length])
      if ex.num_targets == 0:
        first = ex.completion_mask.index(True) if True in ex.completion_mask else None
        raise ValueError(
            f"Example {index} of {where} has no completion token left after truncation to max_length="
            f"{max_length} (its completion starts at token {first}). Raise max_length or shorten the prompt."
        )
    out.append(ex)
  if cut:
    template = (f" (the chat template adds {template_tokens} of them to each user/assistant exchange)"
                if template_tokens else "")
    ending = (f" {lost_end} of them lost their final EOS / end-of-turn token: the model will not learn to stop "
              "after those." if lost_end else "")
    warnings.warn(
        f"{cut} of {len(examples)} examples of {where} were longer than max_length={max_length} tokens "
        f"and were truncated; the longest has {max(len(ex) for ex in examples)} tokens{template}.{ending} "
        "Raise max_length (compile(max_length=...)) or shorten the examples.",
        stacklevel=2,
    )
  return out


def pad_batch(
    examples: Sequence[TokenizedExample], max_length: int, pad_id: int, batch_size: int | None = None
) -> TrainingInput:
  """Right-pads examples into a [batch, max_length] :class:`TrainingInput` (numpy arrays).

  Rows beyond ``len(examples)`` up to ``batch_size`` are empty (all masks 0), so
  a last, short batch keeps the shape the train step was compiled for.
  """
  rows = batch_size or len(examples)
  tokens = np.full((rows, max_length), pad_id, np.int32)
  input_mask = np.zeros((rows, max_length), np.bool_)
  completion = np.zeros((rows, max_length), np.bool_)
  for r, ex in enumerate(examples):
    n = len(ex)
    if n > max_length:
      raise ValueError(f"An example of {n} tokens does not fit max_length={max_length}; truncate it first.")
    tokens[r, :n] = ex.tokens
    input_mask[r, :n] = True
    completion[r, :n] = ex.completion_mask
  return TrainingInput(input_tokens=tokens, input_mask=input_mask, completion_mask=completion)


def _template_tokens(tokenizer: Any) -> int | None:
  """Tokens the chat template adds around one empty user turn and one empty assistant turn."""
  try:
    empty = [{"role": "user", "content": ""}, {"role": "assistant", "content": ""}]
    return len(tokenizer.apply_chat_template(empty, tokenize=True))
  except Exception:  # a template that rejects empty turns: the count is only a hint
    return None


class SupervisedDataset:
  """A re-iterable, deterministic stream of padded :class:`TrainingInput` batches.

  Records are tokenized once (see :func:`tokenize_record`) and truncated to
  ``max_length``. Each pass shuffles with ``seed + epoch``; the trainer calls
  :meth:`set_epoch` before every epoch, so a resumed run sees the same order.

  Args:
    records: dicts in one of the supported formats.
    tokenizer: see the module docstring.
    batch_size: rows per batch.
    max_length: tokens per row (every batch has this shape).
    shuffle: shuffle the order each epoch.
    seed: base of the shuffling seed.
    drop_remainder: drop the last, short batch (else it is filled with empty rows).
    use_chat_template: render prompt/completion pairs as chats.
    add_eos: append EOS to text and completions.
    repeat: passes over the data per iteration.
  """

  def __init__(
      self,
      records: Sequence[Mapping[str, Any]],
      tokenizer: Any,
      batch_size: int,
      max_length: int,
      *,
      shuffle: bool = True,
      seed: int = 0,
      drop_remainder: bool = True,
      use_chat_template: bool = False,
      add_eos: bool = True,
      repeat: int = 1,
      name: str = "the dataset",
  ):
    if batch_size <= 0:
      raise ValueError(f"batch_size must be positive, got {batch_size}.")
    if repeat <= 0:
      raise ValueError(f"repeat must be positive, got {repeat}.")
    examples = [
        tokenize_record(tokenizer, r, add_eos=add_eos, use_chat_template=use_chat_template) for r in records
    ]
    uses_template = use_chat_template or any("messages" in r for r in records)
    self.num_truncated = sum(len(ex) > max_length for ex in examples)
    self.examples = truncate_examples(examples, max_length, where=name,
                                      template_tokens=_template_tokens(tokenizer) if uses_template else None)
    if not any(ex.num_targets for ex in self.examples):
      raise ValueError(
          f"{name}: none of its {len(self.examples)} examples has a token to train on (are the texts or "
          "completions empty?). Give non-empty text."
      )
    if drop_remainder and len(self.examples) < batch_size:
      raise ValueError(
          f"{name} has {len(self.examples)} examples, fewer than batch_size={batch_size}: no full batch. "
          "Use a smaller batch_size or drop_remainder=False."
      )
    self.pad_id = tokenizer_pad_id(tokenizer)
    self.batch_size = batch_size
    self.max_length = max_length
    self.shuffle = shuffle
    self.seed = seed
    self.drop_remainder = drop_remainder
    self.repeat = repeat
    self.epoch = 0

  def set_epoch(self, epoch: int) -> None:
    """Chooses the shuffle of the next pass."""
    self.epoch = int(epoch)

  def __len__(self) -> int:
    return num_batches(len(self.examples), self.batch_size, self.drop_remainder) * self.repeat

  def __iter__(self) -> Iterator[TrainingInput]:
    for r in range(self.repeat):
      for indices in batch_indices(len(self.examples), self.batch_size, shuffle=self.shuffle,
                                   key=(self.seed, self.epoch, r), drop_remainder=self.drop_remainder):
        chosen = [self.examples[i] for i in indices]
        yield pad_batch(chosen, self.max_length, self.pad_id, self.batch_size)


def num_batches(count: int, batch_size: int, drop_remainder: bool) -> int:
  """How many batches ``count`` items make (a last partial batch counts unless ``drop_remainder``)."""
  return count // batch_size if drop_remainder else -(-count // batch_size)


def batch_indices(
    count: int, batch_size: int, *, shuffle: bool, key: Sequence[int], drop_remainder: bool
) -> Iterator[np.ndarray]:
  """The item indices of each batch of one pass, shuffled with ``np.random.default_rng(key)`` when ``shuffle``.

  ``key`` holds the seed and the epoch (and anything else that should change the order), so every
  pass is reproducible on its own.
  """
  order = np.random.default_rng(list(key)).permutation(count) if shuffle else np.arange(count)
  for b in range(num_batches(count, batch_size, drop_remainder)):
    yield order[b * batch_size : (b + 1) * batch_size]


def load_records(path: str | Path) -> list[dict[str, Any]]:
  """Reads a ``.jsonl``, ``.json`` (a list of objects, or ``{"data": [...]}``) or ``.csv`` file."""
  path = Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"No data file at {str(path)!r}.")
  suffix = path.suffix.lower()
  if suffix == ".jsonl":
    with path.open(encoding="utf-8") as f:
      return [json.loads(line) for line in f if line.strip()]
  if suffix == ".json":
    try:
      data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
      raise ValueError(f"{path} is not valid JSON ({e}).") from e
    if isinstance(data, dict) and isinstance(data.get("data"), list):
      data = data["data"]
    if not isinstance(data, list):
      raise ValueError(f"{path} must hold a JSON list of records (or {{'data': [...]}}).")
    return data
  if suffix == ".csv":
    with path.open(encoding="utf-8", newline="") as f:
      return list(csv.DictReader(f))
  raise ValueError(f"Unsupported data file type {suffix!r} for {path}; use .jsonl, .json or .csv.")


def bundled_dataset_path(name: str = "instructions") -> Path:
  """Path of a small dataset shipped in ``easytunix/presets/data`` (``<name>.jsonl``)."""
  folder = Path(__file__).resolve().parent.parent / "presets" / "data"
  path = folder / f"{name}.jsonl"
  if not path.is_file():
    available = sorted(p.stem for p in folder.glob("*.jsonl"))
    raise FileNotFoundError(f"No bundled dataset {name!r}; available: {available}.")
  return path


__all__ = [
    "batch_indices",
    "num_batches",
    "SupervisedDataset",
    "TokenizedExample",
    "bundled_dataset_path",
    "load_records",
    "pad_batch",
    "tokenize_messages",
    "tokenize_prompt_completion",
    "tokenize_record",
    "tokenize_text",
    "truncate_examples",
]
