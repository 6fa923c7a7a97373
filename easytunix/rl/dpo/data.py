"""Preference records (``{"prompt", "chosen", "rejected"}``) -> :class:`TrainingInput` batches.

A record's fields are plain strings, or chat messages rendered with the
tokenizer's chat template:

* ``{"prompt": "12+7=", "chosen": "19", "rejected": "18"}``: the prompt is encoded
  as is (with the tokenizer's BOS, if it adds one), each response after it; EOS is
  appended to every response so a tuned model learns to stop.
* ``{"prompt": [{"role": "user", "content": ...}], "chosen": "...", "rejected": ...}``:
  the prompt is rendered with the generation prompt; a response is a string (the
  assistant's reply), an assistant message dict, or a list of messages. The
  template's end-of-turn token ends the response (EOS is added if it has none).
* ``{"chosen": [messages...], "rejected": [messages...]}`` (no ``prompt``): the
  messages the two conversations share are the prompt (TRL's implicit prompt).

Layout (the one Tunix uses): prompts are left-padded to a width P, responses
right-padded to a width R, so ``[prompt | response]`` rows are one concatenation
and every response starts at the same column.

Truncation, when a pair is longer than ``max_seq_length`` tokens (prompt plus
the longer response): the prompt is cut first, from the left (the end of a
prompt, where the question usually is, survives), but not below its share
(``max_prompt_length``, default half of ``max_seq_length``); then the responses
are cut at the end. Every cut is counted and reported in one warning per dataset.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import flax.struct
import numpy as np

from easytunix.generate.tokenizer_adapter import tokenizer_eos_id, tokenizer_eos_ids, tokenizer_pad_id
from easytunix.sft.data import batch_indices, num_batches


@flax.struct.dataclass
class TrainingInput:
  """A batch of tokenized preference pairs (a pytree; arrays lead with the batch).

  Attributes:
    prompt_ids: [B, P] prompt tokens, left-padded.
    prompt_mask: [B, P] 1 for real prompt tokens.
    chosen_ids: [B, R] preferred response tokens, right-padded.
    chosen_mask: [B, R] 1 for real chosen tokens.
    rejected_ids: [B, R'] dispreferred response tokens, right-padded.
    rejected_mask: [B, R'] 1 for real rejected tokens.
    ref_chosen_logps: [B] reference log-probs of the chosen responses, when
      already known (``DpoTrainer.precompute_ref_logps``); None: the trainer
      computes them per batch.
    ref_rejected_logps: [B] the same for the rejected responses.

  A row whose masks are all zero is padding (a short last batch) and is ignored.
  """

  prompt_ids: Any
  prompt_mask: Any
  chosen_ids: Any
  chosen_mask: Any
  rejected_ids: Any
  rejected_mask: Any
  ref_chosen_logps: Any = None
  ref_rejected_logps: Any = None


@dataclasses.dataclass(frozen=True)
class PreferencePair:
  """One record's token ids before truncation and padding (responses end with EOS)."""

  prompt: tuple[int, ...]
  chosen: tuple[int, ...]
  rejected: tuple[int, ...]


@dataclasses.dataclass
class TruncationStats:
  """How many pairs were cut to fit, and where.

  Attributes:
    pairs: pairs seen.
    pairs_truncated: pairs that lost any token.
    prompts_truncated: pairs whose prompt lost tokens from the left.
    responses_truncated: pairs whose chosen or rejected response lost tokens at
      the end (their EOS is gone: the model is not taught to stop there).
  """

  pairs: int = 0
  pairs_truncated: int = 0
  prompts_truncated: int = 0
  responses_truncated: int = 0

  @property
  def any(self) -> bool:
    return bool(self.prompts_truncated or self.responses_truncated)

  def message(self, max_seq_length: int, where: str) -> str:
    return (
        f"{self.pairs_truncated} of {self.pairs} preference pairs of {where} did not fit max_seq_length={max_seq_length}: "
        f"{self.prompts_truncated} prompt(s) were cut from the left and {self.responses_truncated} pair(s) of "
        "responses were cut at the end (losing their EOS). Raise max_seq_length, or max_prompt_length for "
        "long prompts."
    )


# ------------------------------------------------------------------ tokenizing


def _record_label(index: int | None) -> str:
  return "A DPO record" if index is None else f"DPO record {index}"


def _is_message(value: Any) -> bool:
  return isinstance(value, Mapping) and "role" in value


def _is_message_list(value: Any) -> bool:
  return isinstance(value, (list, tuple)) and len(value) > 0 and all(_is_message(m) for m in value)


def _content_is_empty(response: Any) -> bool:
  if isinstance(response, str):
    return not response.strip()
  if _is_message(response):
    response = [response]
  if isinstance(response, (list, tuple)):
    return not any(str(m.get("content") or "").strip() for m in response if _is_message(m))
  return response is None


def _split_implicit_prompt(record: Mapping[str, Any], label: str) -> tuple[list, list, list]:
  """TRL's implicit-prompt format: the messages both conversations share are the prompt."""
  chosen, rejected = list(record["chosen"]), list(record["rejected"])
  shared = 0
  while shared < min(len(chosen), len(rejected)) - 1 and dict(chosen[shared]) == dict(rejected[shared]):
    shared += 1
  if shared == 0:
    raise ValueError(
        f"{label} has no 'prompt' and its 'chosen' and 'rejected' conversations share no first message, "
        "so there is no prompt to condition on. Add a 'prompt' field."
    )
  return chosen[:shared], chosen[shared:], rejected[shared:]


def _validate(record: Any, label: str) -> None:
  if not isinstance(record, Mapping):
    raise TypeError(
        f"{label} must be a dict with 'prompt', 'chosen' and 'rejected', got a {type(record).__name__}."
    )
  needed = ("chosen", "rejected") if ("prompt" not in record and _is_message_list(record.get("chosen"))) else (
      "prompt", "chosen", "rejected")
  missing = [k for k in needed if k not in record]
  if missing:
    raise ValueError(
        f"{label} is missing {', '.join(repr(k) for k in missing)}; it has keys {sorted(map(str, record))}. "
        "Each record needs 'prompt', 'chosen' and 'rejected' (strings, or chat messages)."
    )
  for key in ("chosen", "rejected"):
    if _content_is_empty(record[key]):
      raise ValueError(
          f"{label} has an empty {key!r} response ({record[key]!r}). Every pair needs a non-empty chosen "
          "and rejected response: drop the record or fill it in."
      )


def _encode(tokenizer: Any, text: str, first: bool) -> list[int]:
  """Encodes text; special tokens (BOS) only at the start, and not twice when a template wrote BOS."""
  bos = getattr(tokenizer, "bos_token", None)
  special = first and not (isinstance(bos, str) and bos and text.startswith(bos))
  return [int(t) for t in tokenizer.encode(text, add_special_tokens=special)]


def _with_eos(tokens: list[int], tokenizer: Any, chat: bool, label: str) -> tuple[int, ...]:
  eos = tokenizer_eos_id(tokenizer)
  if chat and any(t in tokenizer_eos_ids(tokenizer) for t in tokens):
    return tuple(tokens)  # the template's end-of-turn token ends the response
  if eos is None:
    raise ValueError(f"{label}: the tokenizer has no EOS token to end responses with.")
  return tuple(tokens) + (int(eos),)


def _as_messages(response: Any) -> list[dict[str, Any]]:
  if isinstance(response, str):
    return [{"role": "assistant", "content": response}]
  if _is_message(response):
    return [dict(response)]
  return [dict(m) for m in response]


def tokenize_preference(
    record: Mapping[str, Any], tokenizer: Any, *, use_chat_template: bool = False, index: int | None = None
) -> PreferencePair:
  """Tokenizes one record (see the module docstring) into untruncated prompt and response ids.

  Args:
    record: ``{"prompt", "chosen", "rejected"}`` as strings or chat messages.
    tokenizer: needs ``encode``, ``eos_id`` and, for chats, ``apply_chat_template``.
    use_chat_template: render string records as a user turn and an assistant reply.
    index: the record's position, named in error messages.

  Raises:
    TypeError / ValueError: a record that is not a dict, misses a key, has an
      empty response or prompt, or a chat template that is not prefix-stable.
  """
  label = _record_label(index)
  _validate(record, label)
  prompt = record.get("prompt")
  chosen, rejected = record["chosen"], record["rejected"]
  if "prompt" not in record:
    prompt, chosen, rejected = _split_implicit_prompt(record, label)
    for key, response in (("chosen", chosen), ("rejected", rejected)):
      if _content_is_empty(response):
        raise ValueError(f"{label} has an empty {key!r} reply after the messages both conversations share.")
  chat = use_chat_template or not isinstance(prompt, str) or not isinstance(chosen, str) or not isinstance(rejected, str)
  if not chat:
    prompt_ids = _encode(tokenizer, prompt, first=True)
    responses = [_encode(tokenizer, r, first=False) for r in (chosen, rejected)]
  else:
    if isinstance(prompt, str):
      prompt = [{"role": "user", "content": prompt}]
    elif _is_message(prompt):
      prompt = [prompt]
    if not _is_message_list(prompt):
      raise ValueError(
          f"{label}: 'prompt' must be a string or a list of {{'role', 'content'}} messages, got {prompt!r}."
      )
    prompt = [dict(m) for m in prompt]
    render = lambda msgs, gen: tokenizer.apply_chat_template(msgs, add_generation_prompt=gen, tokenize=False)  # noqa: E731
    prompt_text = render(prompt, True)
    prompt_ids = _encode(tokenizer, prompt_text, first=True)
    responses = []
    for key, response in (("chosen", chosen), ("rejected", rejected)):
      full = render(prompt + _as_messages(response), False)
      if not full.startswith(prompt_text):
        raise ValueError(
            f"{label}: the chat template renders the prompt differently once the {key!r} reply is added, "
            "so the reply cannot be located. Use plain-string records, or a prefix-stable template."
        )
      responses.append(_encode(tokenizer, full[len(prompt_text):], first=False))
  if not prompt_ids:
    raise ValueError(
        f"{label} has an empty prompt (no tokens): the first response token would have nothing to be "
        "predicted from. Give every pair a prompt."
    )
  for key, ids in zip(("chosen", "rejected"), responses):
    if not ids:
      raise ValueError(f"{label}: the {key!r} response encodes to no tokens.")
  chosen_ids, rejected_ids = (_with_eos(ids, tokenizer, chat, label) for ids in responses)
  return PreferencePair(tuple(prompt_ids), chosen_ids, rejected_ids)


# ------------------------------------------------------------- truncating / padding


def check_lengths(max_seq_length: int, max_prompt_length: int | None) -> int:
  """Validates the length settings; returns the prompt share (``max_prompt_length`` or half)."""
  if not isinstance(max_seq_length, int) or isinstance(max_seq_length, bool) or max_seq_length < 2:
    raise ValueError(f"max_seq_length must be an int >= 2 (prompt plus response tokens), got {max_seq_length!r}.")
  if max_prompt_length is None:
    return max_seq_length // 2
  if not isinstance(max_prompt_length, int) or isinstance(max_prompt_length, bool) or max_prompt_length < 1:
    raise ValueError(f"max_prompt_length must be a positive int or None, got {max_prompt_length!r}.")
  if max_prompt_length >= max_seq_length:
    raise ValueError(
        f"max_prompt_length={max_prompt_length} leaves no room for the responses in max_seq_length="
        f"{max_seq_length}: a response would vanish entirely. Use max_prompt_length < max_seq_length."
    )
  return max_prompt_length


def truncate_pair(pair: PreferencePair, max_seq_length: int, max_prompt_length: int | None = None) -> tuple[PreferencePair, bool, bool]:
  """Cuts a pair to fit ``max_seq_length``: the prompt first (from the left, down to its share), then the responses.

  Returns ``(pair, prompt_was_cut, responses_were_cut)``.
  """
  share = check_lengths(max_seq_length, max_prompt_length)
  p, longest = len(pair.prompt), max(len(pair.chosen), len(pair.rejected))
  keep = min(p, share) if max_prompt_length is not None else p
  if keep + longest > max_seq_length:
    keep = min(keep, max(max_seq_length - longest, share))
  room = max_seq_length - keep
  prompt = pair.prompt[p - keep:]
  chosen, rejected = pair.chosen[:room], pair.rejected[:room]
  cut_prompt = keep < p
  cut_response = len(chosen) < len(pair.chosen) or len(rejected) < len(pair.rejected)
  return PreferencePair(prompt, chosen, rejected), cut_prompt, cut_response


def layout_pairs(
    pairs: Sequence[PreferencePair], max_seq_length: int, max_prompt_length: int | None = None
) -> tuple[list[PreferencePair], int, int, TruncationStats]:
  """Truncates pairs and picks the padded widths ``(P, R)`` they share, with ``P + R <= max_seq_length``.

  Each pair is cut by :func:`truncate_pair`; the widths are the longest prompt
  and the longest response left. When a long-prompt pair and a long-response
  pair together need more than ``max_seq_length`` columns, responses are cut
  further to ``max_seq_length - P`` (counted).
  """
  stats = TruncationStats(pairs=len(pairs))
  out, cut_prompts, cut_responses = [], [], []
  for pair in pairs:
    pair, cut_p, cut_r = truncate_pair(pair, max_seq_length, max_prompt_length)
    out.append(pair)
    cut_prompts.append(cut_p)
    cut_responses.append(cut_r)
  width_p = max((len(x.prompt) for x in out), default=1)
  width_r = max((max(len(x.chosen), len(x.rejected)) for x in out), default=1)
  if width_p + width_r > max_seq_length:
    width_r = max_seq_length - width_p
    for i, x in enumerate(out):
      if max(len(x.chosen), len(x.rejected)) > width_r:
        out[i] = PreferencePair(x.prompt, x.chosen[:width_r], x.rejected[:width_r])
        cut_responses[i] = True
  stats.prompts_truncated = sum(cut_prompts)
  stats.responses_truncated = sum(cut_responses)
  stats.pairs_truncated = sum(p or r for p, r in zip(cut_prompts, cut_responses))
  return out, width_p, width_r, stats


def pad_pairs(
    pairs: Sequence[PreferencePair], prompt_width: int, response_width: int, pad_id: int, batch_size: int | None = None
) -> TrainingInput:
  """Pads pairs into a numpy :class:`TrainingInput`: prompts on the left, responses on the right.

  Rows past ``len(pairs)`` up to ``batch_size`` are empty (all masks 0).
  """
  rows = batch_size or len(pairs)
  prompt = np.full((rows, prompt_width), pad_id, np.int32)
  prompt_mask = np.zeros((rows, prompt_width), np.bool_)
  responses = {k: np.full((rows, response_width), pad_id, np.int32) for k in ("chosen", "rejected")}
  masks = {k: np.zeros((rows, response_width), np.bool_) for k in ("chosen", "rejected")}
  for r, pair in enumerate(pairs):
    n = len(pair.prompt)
    if n > prompt_width or max(len(pair.chosen), len(pair.rejected)) > response_width:
      raise ValueError(
          f"A pair of {n} prompt and {max(len(pair.chosen), len(pair.rejected))} response tokens does not fit "
          f"the widths ({prompt_width}, {response_width}); truncate it first (layout_pairs)."
      )
    if n:
      prompt[r, prompt_width - n:] = pair.prompt
      prompt_mask[r, prompt_width - n:] = True
    for key in ("chosen", "rejected"):
      ids = getattr(pair, key)
      responses[key][r, : len(ids)] = ids
      masks[key][r, : len(ids)] = True
  return TrainingInput(
      prompt_ids=prompt,
      prompt_mask=prompt_mask,
      chosen_ids=responses["chosen"],
      chosen_mask=masks["chosen"],
      rejected_ids=responses["rejected"],
      rejected_mask=masks["rejected"],
  )


def process_dpo_record(
    record: Mapping[str, Any],
    tokenizer: Any,
    max_seq_length: int,
    max_prompt_length: int | None = None,
    *,
    use_chat_template: bool = False,
) -> TrainingInput:
  """Tokenizes, truncates and lays out one record as a batch of one (numpy arrays, no padding).

  Truncation is counted: a warning says what was cut. To batch many records
  with shared widths use :class:`DpoDataset` / ``dpo_batches``.
  """
  pair = tokenize_preference(record, tokenizer, use_chat_template=use_chat_template)
  (pair,), width_p, width_r, stats = layout_pairs([pair], max_seq_length, max_prompt_length)
  if stats.any:
    warnings.warn(stats.message(max_seq_length, "this record"), stacklevel=2)
  return pad_pairs([pair], width_p, width_r, tokenizer_pad_id(tokenizer, fallback_to_eos=True))


class DpoDataset:
  """A re-iterable, deterministic stream of padded preference batches.

  Records are tokenized once, truncated (see the module docstring), and laid out
  with widths shared by the whole dataset, so every batch has one shape and the
  train step compiles once. Each pass shuffles with ``seed + epoch``; the trainer
  calls :meth:`set_epoch` before every epoch, so a resumed run sees the same order.

  Attributes:
    pairs: the truncated :class:`PreferencePair` s.
    prompt_width / response_width: the padded widths P and R.
    truncation: a :class:`TruncationStats`.
    ref_chosen_logps / ref_rejected_logps: per-pair reference log-probs once
      ``DpoTrainer.precompute_ref_logps(dataset)`` filled them in (then every
      batch carries them and the trainer skips the reference forward pass).
  """

  def __init__(
      self,
      records: Sequence[Mapping[str, Any]],
      tokenizer: Any,
      batch_size: int,
      max_seq_length: int,
      *,
      max_prompt_length: int | None = None,
      shuffle: bool = True,
      seed: int = 0,
      drop_remainder: bool = True,
      use_chat_template: bool = False,
      name: str = "the dataset",
  ):
    if not isinstance(batch_size, int) or batch_size <= 0:
      raise ValueError(f"batch_size must be a positive int (pairs per batch), got {batch_size!r}.")
    check_lengths(max_seq_length, max_prompt_length)
    records = list(records)
    if not records:
      raise ValueError(f"{name} has no records.")
    pairs = [tokenize_preference(r, tokenizer, use_chat_template=use_chat_template, index=i) for i, r in enumerate(records)]
    self.pairs, self.prompt_width, self.response_width, self.truncation = layout_pairs(
        pairs, max_seq_length, max_prompt_length
    )
    if self.truncation.any:
      warnings.warn(self.truncation.message(max_seq_length, name), stacklevel=2)
    if drop_remainder and len(self.pairs) < batch_size:
      raise ValueError(
          f"{name} has {len(self.pairs)} pairs, fewer than batch_size={batch_size}: no full batch. "
          "Use a smaller batch_size or drop_remainder=False."
      )
    self.pad_id = tokenizer_pad_id(tokenizer, fallback_to_eos=True)
    self.batch_size = batch_size
    self.max_seq_length = max_seq_length
    self.shuffle = shuffle
    self.seed = seed
    self.drop_remainder = drop_remainder
    self.name = name
    self.epoch = 0
    self.ref_chosen_logps: np.ndarray | None = None
    self.ref_rejected_logps: np.ndarray | None = None

  def set_epoch(self, epoch: int) -> None:
    """Chooses the shuffle of the next pass."""
    self.epoch = int(epoch)

  def __len__(self) -> int:
    return num_batches(len(self.pairs), self.batch_size, self.drop_remainder)

  def _batch(self, indices: Sequence[int]) -> TrainingInput:
    batch = pad_pairs([self.pairs[i] for i in indices], self.prompt_width, self.response_width, self.pad_id, self.batch_size)
    if self.ref_chosen_logps is None:
      return batch
    rows = self.batch_size
    chosen, rejected = np.zeros(rows, np.float32), np.zeros(rows, np.float32)
    chosen[: len(indices)] = self.ref_chosen_logps[list(indices)]
    rejected[: len(indices)] = self.ref_rejected_logps[list(indices)]
    return batch.replace(ref_chosen_logps=chosen, ref_rejected_logps=rejected)

  def ordered_batches(self) -> Iterator[tuple[list[int], TrainingInput]]:
    """Every pair once, in dataset order (last batch padded): ``(indices, batch)``."""
    n = len(self.pairs)
    for start in range(0, n, self.batch_size):
      indices = list(range(start, min(start + self.batch_size, n)))
      yield indices, self._batch(indices)

  def set_ref_logps(self, chosen: np.ndarray, rejected: np.ndarray) -> None:
    """Stores per-pair reference log-probs (in dataset order); batches carry them from now on."""
    chosen, rejected = np.asarray(chosen, np.float32), np.asarray(rejected, np.float32)
    if chosen.shape != (len(self.pairs),) or rejected.shape != (len(self.pairs),):
      raise ValueError(f"Expected {len(self.pairs)} reference log-probs each, got {chosen.shape} and {rejected.shape}.")
    self.ref_chosen_logps, self.ref_rejected_logps = chosen, rejected

  def __iter__(self) -> Iterator[TrainingInput]:
    for indices in batch_indices(len(self.pairs), self.batch_size, shuffle=self.shuffle, key=(self.seed, self.epoch),
                                 drop_remainder=self.drop_remainder):
      yield self._batch([int(i) for i in indices])


def dpo_batches(
    records: Sequence[Mapping[str, Any]],
    tokenizer: Any,
    batch_size: int,
    max_length: int,
    shuffle: bool = True,
    seed: int = 0,
    *,
    max_prompt_length: int | None = None,
    drop_remainder: bool = True,
    use_chat_template: bool = False,
    name: str = "the dataset",
) -> DpoDataset:
  """Preference records -> a re-iterable :class:`DpoDataset` of padded :class:`TrainingInput` batches.

  ``max_length`` bounds prompt plus response tokens of a pair; see
  :class:`DpoDataset` for the rest.
  """
  return DpoDataset(
      records, tokenizer, batch_size, max_length, max_prompt_length=max_prompt_length, shuffle=shuffle,
      seed=seed, drop_remainder=drop_remainder, use_chat_template=use_chat_template, name=name,
  )


__all__ = [
    "DpoDataset",
    "PreferencePair",
    "TrainingInput",
    "TruncationStats",
    "check_lengths",
    "dpo_batches",
    "layout_pairs",
    "pad_pairs",
    "process_dpo_record",
    "tokenize_preference",
    "truncate_pair",
]
