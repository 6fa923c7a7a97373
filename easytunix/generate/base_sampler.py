"""``BaseSampler``: what every sampler shares, whatever runs the model.

Both the JAX :class:`~easytunix.generate.sampler.Sampler` and the vLLM
:class:`~easytunix.generate.vllm_sampler.VllmSampler` take the same prompts and
options and return the same :class:`SamplerOutput`. The parts that do not
depend on the engine live here, once: turning prompts (strings or token-id
lists) into checked ids, the EOS and pad ids (the tokenizer's, or
``eos_tokens=``), the checks of the common decoding options, and assembling the
generated ids into a ``SamplerOutput`` (each row cut after its EOS, text
decoded, prompt in front with ``echo``).
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Iterable, Sequence
from typing import Any

import jax
import numpy as np

from easytunix.generate.tokenizer_adapter import as_tokenizer, tokenizer_eos_ids, tokenizer_pad_id
from easytunix.generate.utils import as_id, is_python_number, is_token_id

__all__ = ["BaseSampler", "SamplerOutput"]


@dataclasses.dataclass
class SamplerOutput:
  """What a sampler call returns; lists have one entry per prompt.

  Attributes:
    text: the generated text (the prompt too with ``echo``), EOS not included;
      empty strings when the sampler has no tokenizer.
    tokens: the generated token ids, up to and including the EOS token that
      ended the row (the prompt ids first with ``echo``).
    logprobs: with ``return_logprobs``, the log-probability of each generated
      token under the model (log-softmax of the raw logits, before temperature,
      top-k and top-p); None otherwise.
    logits: with ``return_logits``, the raw logits [n_generated, vocab] each
      generated token was chosen from; None otherwise.
    padded_prompt_tokens: the left-padded prompt ids [batch, prompt bucket].

  With ``pad_output=True`` ``tokens`` (and ``logits``) are one array, each row
  right-padded. The fields are Tunix's, in its order.
  """

  text: list[str]
  logits: list[np.ndarray] | np.ndarray | None
  tokens: list[np.ndarray] | np.ndarray
  padded_prompt_tokens: np.ndarray
  logprobs: list[np.ndarray] | None = None


class BaseSampler(abc.ABC):
  """The interface of every sampler, and the prompt / EOS / output handling they share.

  Args:
    tokenizer: a TokenizerAdapter (or a ``tokenizers.Tokenizer``, a
      SentencePieceProcessor, or any object with ``encode``/``decode``); may be
      None when prompts are given as token ids.
    vocab_size: the model's vocabulary size, to check prompt ids against (None: unchecked).
  """

  def __init__(self, tokenizer: Any, vocab_size: int | None):
    self.tokenizer = as_tokenizer(tokenizer)
    self.vocab_size = vocab_size

  # ------------------------------------------------------------------ what a sampler implements

  @abc.abstractmethod
  def __call__(
      self,
      prompts: Sequence[str] | Sequence[Sequence[int]],
      max_generation_steps: int,
      **options: Any,
  ) -> SamplerOutput:
    """Generates a continuation of each prompt (options as ``Sampler.__call__``)."""

  @abc.abstractmethod
  def update_params(self, new: Any) -> None:
    """Uses new weights from now on (a model, or a state of some of its variables)."""

  # ------------------------------------------------------------------ prompts in

  def tokenize(self, input_string: str) -> list[int]:
    """The token ids of a prompt (with the tokenizer's special tokens, e.g. BOS)."""
    if self.tokenizer is None:
      raise ValueError("This sampler has no tokenizer; pass prompts as lists of token ids.")
    return [int(i) for i in self.tokenizer.encode(input_string)]

  def _prompt_ids(self, prompts: Any) -> list[list[int]]:
    """The token ids of each prompt (strings are tokenized), checked against the vocabulary."""
    if isinstance(prompts, str) or (isinstance(prompts, Sequence) and prompts and is_token_id(prompts[0])):
      raise TypeError(
          "prompts must be a list of prompts (strings or lists of token ids), e.g. ['Hi'] or [[1, 2, 3]], "
          f"not a single {'string' if isinstance(prompts, str) else 'list of ids'}."
      )
    if isinstance(prompts, np.ndarray) and prompts.ndim == 2:
      prompts = prompts.tolist()
    if not isinstance(prompts, Sequence) or isinstance(prompts, (bytes, dict)):
      raise TypeError(f"prompts must be a list of strings or of token-id lists, got {type(prompts).__name__}.")
    if len(prompts) == 0:
      raise ValueError("prompts is empty: pass at least one prompt.")
    out = []
    for i, prompt in enumerate(prompts):
      if isinstance(prompt, str):
        if self.tokenizer is None:
          raise ValueError(
              f"prompt {i} is a string but this sampler has no tokenizer; pass a tokenizer to the sampler "
              "or give prompts as lists of token ids."
          )
        ids = self.tokenize(prompt)
      else:
        try:
          if isinstance(prompt, (np.ndarray, jax.Array)):
            array = np.asarray(prompt)
            if array.ndim != 1 or not np.issubdtype(array.dtype, np.integer):
              raise TypeError
            ids = array.astype(np.int64).tolist()
          else:
            ids = [as_id(t) for t in prompt]
        except TypeError:
          raise TypeError(f"prompt {i} must be a string or a list of int token ids, got {prompt!r:.80}.") from None
      if not ids:
        raise ValueError(f"prompt {i} is empty (no tokens): every prompt needs at least one token.")
      if self.vocab_size is not None and (min(ids) < 0 or max(ids) >= self.vocab_size):
        bad = next(t for t in ids if t < 0 or t >= self.vocab_size)
        raise ValueError(f"prompt {i} has token id {bad}, outside the model's vocabulary [0, {self.vocab_size}).")
      out.append(ids)
    return out

  def _left_pad(self, ids: Sequence[Sequence[int]], width: int, rows: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(tokens int32, valid bool) [rows, width]: each prompt right-aligned after pad ids (``rows``: len(ids))."""
    rows = len(ids) if rows is None else rows
    tokens = np.full((rows, width), self._pad_id(), np.int32)
    valid = np.zeros((rows, width), bool)
    for row, x in enumerate(ids):
      tokens[row, width - len(x) :] = x
      valid[row, width - len(x) :] = True
    return tokens, valid

  # ------------------------------------------------------------------ Tunix's keywords

  @staticmethod
  def _tunix_arguments(prompts: Any, steps: Any, input_strings: Any, total_generation_steps: Any) -> tuple[Any, Any]:
    """(prompts, max_generation_steps) from either easytunix's or Tunix's keywords (one of each pair)."""
    if input_strings is not None:
      if prompts is not None:
        raise TypeError("Pass the prompts once: as prompts or as input_strings, not both.")
      prompts = [input_strings] if isinstance(input_strings, str) else input_strings
    if total_generation_steps is not None:
      if steps is not None:
        raise TypeError("Pass the step budget once: max_generation_steps or total_generation_steps, not both.")
      steps = total_generation_steps
    if prompts is None:
      raise TypeError("No prompts: pass a list of prompts (strings or token-id lists) first, or input_strings=.")
    if steps is None:
      raise TypeError("No step budget: pass max_generation_steps (or total_generation_steps).")
    return prompts, steps

  def _forbidden_ids(self, forbidden_tokens: Any) -> list[int] | None:
    """``forbidden_tokens`` as ids: ids stay, token strings (Tunix) must each be one token of the tokenizer."""
    if not forbidden_tokens:
      return None
    out = []
    for token in forbidden_tokens:
      if not isinstance(token, str):
        out.append(token)
        continue
      if self.tokenizer is None:
        raise ValueError(f"forbidden token {token!r} is a string but this sampler has no tokenizer; pass ids.")
      tid = self.tokenizer.token_to_id(token) if callable(getattr(self.tokenizer, "token_to_id", None)) else None
      if tid is None:
        try:
          ids = self.tokenizer.encode(token, add_special_tokens=False)
        except TypeError:
          ids = self.tokenizer.encode(token)
        if len(ids) != 1:
          raise ValueError(f"forbidden token {token!r} is {len(ids)} tokens {list(ids)}; each must be one token.")
        tid = ids[0]
      out.append(int(tid))
    return out

  def _pad_output(self, out: SamplerOutput, width: int) -> SamplerOutput:
    """``out`` with ``tokens`` [n, width] right-padded with the pad id (``logits`` [n, width, V] with zeros)."""
    pad = self._pad_id()
    tokens = np.full((len(out.tokens), width), pad, np.int32)
    for row, ids in enumerate(out.tokens):
      tokens[row, : min(len(ids), width)] = ids[:width]
    logits = out.logits
    if logits is not None and len(logits):
      vocab = np.asarray(logits[0]).shape[-1]
      padded = np.zeros((len(logits), width, vocab), np.asarray(logits[0]).dtype)
      for row, rows in enumerate(logits):
        padded[row, : min(len(rows), width)] = np.asarray(rows)[:width]
      logits = padded
    return dataclasses.replace(out, tokens=tokens, logits=logits)

  # ------------------------------------------------------------------ EOS, pad and options

  def _eos_ids(self, eos_tokens: Any) -> tuple[int, ...]:
    """The ids that end a row: ``eos_tokens`` (an id or a list of ids; ``[]``: never) or the tokenizer's."""
    if eos_tokens is None:
      return tokenizer_eos_ids(self.tokenizer)
    if isinstance(eos_tokens, (int, np.integer)):
      eos_tokens = [eos_tokens]
    try:
      eos = tuple(dict.fromkeys(as_id(t) for t in eos_tokens))
    except (TypeError, ValueError):
      raise TypeError(f"eos_tokens must be a list of int token ids, got {eos_tokens!r}.") from None
    if any(t < 0 for t in eos):
      raise ValueError(f"eos_tokens must be non-negative ids, got {list(eos)}.")
    return eos

  def _pad_id(self) -> int:
    """The id that pads prompts and finished rows: the tokenizer's, else 0."""
    return tokenizer_pad_id(self.tokenizer)

  @staticmethod
  def _check_sampling(temperature: Any, top_p: Any, top_k: Any) -> bool:
    """Validates temperature / top_p / top_k; returns whether decoding is greedy (temperature 0 or None)."""
    if temperature is not None and (not is_python_number(temperature) or temperature < 0):
      raise ValueError(f"temperature must be a number >= 0 (0 or None: greedy), got {temperature!r}.")
    if top_p is not None and (not is_python_number(top_p) or not 0.0 < top_p <= 1.0):
      raise ValueError(f"top_p must be in (0, 1], got {top_p!r}.")
    if top_k is not None and (not isinstance(top_k, (int, np.integer)) or isinstance(top_k, bool) or top_k < 1):
      raise ValueError(f"top_k must be a positive int, got {top_k!r}.")
    return not temperature

  # ------------------------------------------------------------------ output

  def _decode_text(self, ids: Sequence[int]) -> str:
    """The text of ``ids`` (empty without a tokenizer)."""
    if self.tokenizer is None:
      return ""
    return self.tokenizer.decode([int(i) for i in ids])

  def _assemble(
      self,
      prompts: Sequence[Sequence[int]],
      generated: Sequence[np.ndarray],
      eos: Iterable[int],
      echo: bool,
      padded_prompt_tokens: np.ndarray,
      logprobs: Sequence[np.ndarray] | None = None,
      logits: Sequence[np.ndarray] | None = None,
  ) -> SamplerOutput:
    """The SamplerOutput of generated ids: each row cut after its first EOS, text without the EOS.

    Args:
      prompts: each row's prompt ids.
      generated: each row's generated ids (anything after the first EOS is dropped).
      eos: the ids that end a row.
      echo: put the prompt in front of ``tokens`` and ``text``.
      padded_prompt_tokens: the left-padded prompts, returned as they are.
      logprobs: per row, the log-probability of each generated token (or None).
      logits: per row, the logits of each generated token (or None).
    """
    eos_set = np.asarray(list(eos), np.int32)
    out_tokens, out_lps, out_logits, texts = [], [], [], []
    for row, prompt in enumerate(prompts):
      ids = np.asarray(generated[row])
      hit = np.flatnonzero(np.isin(ids, eos_set)) if eos_set.size else np.array([], int)
      length = int(hit[0]) + 1 if hit.size else len(ids)
      kept = ids[:length]
      body = kept[:-1] if hit.size else kept
      prompt = np.asarray(prompt, np.int32)
      out_tokens.append(np.concatenate([prompt, kept]).astype(np.int32) if echo else kept.astype(np.int32))
      if logprobs is not None:
        out_lps.append(np.asarray(logprobs[row])[:length])
      if logits is not None:
        out_logits.append(np.asarray(logits[row])[:length])
      texts.append(self._decode_text(np.concatenate([prompt, body]) if echo else body))
    return SamplerOutput(
        text=texts,
        tokens=out_tokens,
        logprobs=out_lps if logprobs is not None else None,
        logits=out_logits if logits is not None else None,
        padded_prompt_tokens=padded_prompt_tokens,
    )
