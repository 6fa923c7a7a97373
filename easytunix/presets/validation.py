"""Argument checks of the facade (``compile``, ``fit``, ``generate``, saving), in one place.

Each check raises before any work is done, with an error that names the
argument, the value it got and what would be accepted.
"""

from __future__ import annotations

import hashlib
import json
import math
import numbers
import os
from pathlib import Path
from typing import Any

import numpy as np


def _is_int(value: Any) -> bool:
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
  return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_int(name: str, value: Any, *, minimum: int = 1, allow_none: bool = False) -> None:
  """Raises unless ``value`` is an int >= ``minimum`` (or None when ``allow_none``)."""
  if value is None and allow_none:
    return
  if not _is_int(value) or value < minimum:
    need = "a positive int" if minimum == 1 else f"an int >= {minimum}"
    hint = " (a number, not a string)" if isinstance(value, str) else ""
    raise (TypeError if not _is_int(value) and not _is_real(value) else ValueError)(
        f"{name} must be {need}{' or None' if allow_none else ''}{hint}, got {value!r}."
    )


def check_float(name: str, value: Any, *, low: float | None = 0.0, low_open: bool = True,
                high: float | None = None, high_open: bool = False, allow_none: bool = False) -> None:
  """Raises unless ``value`` is a finite real number in the given range (or None when ``allow_none``)."""
  if value is None and allow_none:
    return
  if not _is_real(value) and not isinstance(value, (str, bytes, bool)) and hasattr(value, "__float__") \
      and np.ndim(value) == 0:
    value = float(value)  # a 0-d array, e.g. jnp.float32(1e-3)
  if not _is_real(value):
    hint = f" (write {name}={value}, a number, not a string)" if isinstance(value, str) else ""
    raise TypeError(f"{name} must be a number{' or None' if allow_none else ''}{hint}, got {value!r}.")
  value = float(value)
  bad = not math.isfinite(value)
  bad |= low is not None and (value <= low if low_open else value < low)
  bad |= high is not None and (value >= high if high_open else value > high)
  if bad:
    lo = "" if low is None else f"{'(' if low_open else '['}{low:g}, "
    hi = "inf)" if high is None else f"{high:g}{')' if high_open else ']'}"
    raise ValueError(f"{name} must be a finite number in {lo or '(-inf, '}{hi}, got {value!r}.")


def check_learning_rate(value: Any) -> None:
  """A learning rate is a positive finite number or an optax schedule (a callable)."""
  if callable(value):
    return
  check_float("learning_rate", value)


def check_schedule(schedule: str, warmup_steps: Any, decay_steps: Any) -> None:
  """Warm-up / decay lengths that a schedule can use."""
  check_int("warmup_steps", warmup_steps, minimum=0)
  check_int("decay_steps", decay_steps, allow_none=True)
  if schedule in ("cosine", "linear") and decay_steps is not None and warmup_steps > decay_steps:
    raise ValueError(
        f"warmup_steps={warmup_steps} is larger than decay_steps={decay_steps}: schedule={schedule!r} would "
        "never decay. decay_steps is the total number of steps, warm-up included; make it >= warmup_steps."
    )


def check_compile_args(model: Any, *, learning_rate: Any, weight_decay: Any, warmup_steps: Any,
                       decay_steps: Any, schedule: str, max_grad_norm: Any, max_length: Any,
                       gradient_accumulation_steps: Any, eval_every_n_steps: Any, lora_rank: Any,
                       lora_alpha: Any, distill: Any) -> None:
  """``compile``'s numbers and objects, checked before the model is changed."""
  check_learning_rate(learning_rate)
  check_float("weight_decay", weight_decay, low=0.0, low_open=False, allow_none=True)
  check_schedule(schedule, warmup_steps, decay_steps)
  check_float("max_grad_norm", max_grad_norm, allow_none=True)
  check_int("max_length", max_length, minimum=2)
  limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
  if limit is not None and max_length > limit:
    raise ValueError(
        f"max_length={max_length} is more than the model's max_position_embeddings={limit}: positions past "
        f"{limit} were never trained. Use max_length <= {limit}."
    )
  check_int("gradient_accumulation_steps", gradient_accumulation_steps)
  check_int("eval_every_n_steps", eval_every_n_steps, allow_none=True)
  check_int("lora_rank", lora_rank, allow_none=True)
  check_float("lora_alpha", lora_alpha, allow_none=True)
  if distill is not None and not hasattr(distill, "check_compatible"):
    raise TypeError(
        f"distill must be a strategy object, got {distill!r}: e.g. "
        "distill=easytunix.distillation.LogitStrategy(temperature=2.0, alpha=0.5)."
    )


def check_quantize_base(model: Any, quantize_base: Any, lora_rank: Any) -> None:
  """``compile(quantize_base=...)``: a known method, LoRA to train on it, and a base that can take it.

  A quantized base is frozen, so it needs LoRA adapters: ``lora_rank`` now, or adapters the
  model already has (a second ``compile``). Kernels quantized by an earlier compile stay
  quantized; asking for another method then is an error (nothing undoes quantization).
  Everything is checked before the model is changed.
  """
  from easytunix.layers.quantization import QUANTIZATION_METHODS, check_method
  from easytunix.presets import lora_io
  from easytunix.sft import lora

  has_adapters = lora_io.has_adapters(model)
  current = lora.quantization_method(model)
  if quantize_base is None:
    if current is not None and lora_rank is None and not has_adapters:
      raise ValueError(
          f"This model's base is quantized ({current}), so it cannot be fully fine-tuned: only LoRA adapters "
          "can train on it. Pass lora_rank (e.g. compile(lora_rank=16)), or load the model again for full "
          "fine-tuning."
      )
    return
  if not isinstance(quantize_base, str):
    raise TypeError(
        f"quantize_base must be None or one of {list(QUANTIZATION_METHODS)} (a string), got {quantize_base!r}."
    )
  try:
    check_method(quantize_base)
  except ValueError as e:
    raise ValueError(f"quantize_base: {e}") from None
  if lora_rank is None and not has_adapters:
    raise ValueError(
        f"quantize_base={quantize_base!r} needs lora_rank: a quantized base is frozen and cannot be fully "
        f"fine-tuned, only LoRA adapters train on it. Pass e.g. compile(lora_rank=16, "
        f"quantize_base={quantize_base!r})."
    )
  if current is not None and current != quantize_base:
    raise ValueError(
        f"This model's base is already quantized with {current!r} (by an earlier compile or quantize_base); "
        f"compile does not undo quantization, so it cannot become {quantize_base!r}. Pass "
        f"quantize_base={current!r} (or None), or load the model again to quantize it with {quantize_base!r}."
    )
  if current is None:
    try:
      lora.check_quantizable(model, quantize_base)
    except ValueError as e:
      raise ValueError(
          f"{e} compile quantizes in blocks of 64; for another block size call "
          f"easytunix.sft.lora.quantize_base(model, {quantize_base!r}, block_size=...) first, then "
          f"compile(lora_rank=..., quantize_base={quantize_base!r})."
      ) from None


def check_fit_args(*, epochs: Any, steps: Any, batch_size: Any, seed: Any, shuffle: Any = True) -> None:
  """``fit``'s counts and switches, checked before any data is read."""
  if not isinstance(shuffle, (bool, np.bool_)):
    raise TypeError(f"shuffle must be True or False, got {shuffle!r}.")
  check_int("epochs", epochs)
  check_int("steps", steps, allow_none=True)
  check_int("batch_size", batch_size)
  check_int("seed", seed, minimum=0)


def check_generate_args(prompts: Any, *, max_length: Any, temperature: Any, top_p: Any, top_k: Any,
                        beam_size: Any, seed: Any) -> None:
  """``generate``'s prompts and sampling settings."""
  if prompts is None or not isinstance(prompts, (str, list, tuple)):
    raise TypeError(f"generate(prompts) got {prompts!r}; pass a string or a non-empty list of strings.")
  if not isinstance(prompts, str) and (not prompts or not all(isinstance(p, str) for p in prompts)):
    raise TypeError(f"generate(prompts) must be a string or a non-empty list of strings, got {prompts!r}.")
  check_int("max_length", max_length)
  check_float("temperature", temperature, allow_none=True)
  check_float("top_p", top_p, low=0.0, low_open=True, high=1.0, allow_none=True)
  check_int("top_k", top_k, allow_none=True)
  check_int("beam_size", beam_size, allow_none=True)
  check_int("seed", seed, minimum=0, allow_none=True)


def check_training_inputs(batches: list[Any], vocab_size: int, *, what: str) -> None:
  """User-built ``TrainingInput`` batches: masks shaped like the tokens, ids inside the vocabulary."""
  for index, batch in enumerate(batches):
    tokens = np.asarray(batch.input_tokens)
    if tokens.ndim != 2:
      raise ValueError(f"{what}: batch {index} has input_tokens of shape {tokens.shape}; expected [batch, seq].")
    if not np.issubdtype(tokens.dtype, np.integer):
      raise TypeError(f"{what}: batch {index} has input_tokens of dtype {tokens.dtype}; token ids are ints.")
    for field in ("input_mask", "completion_mask", "positions"):
      value = getattr(batch, field)
      if value is None:
        if field == "input_mask":
          raise ValueError(f"{what}: batch {index} has no input_mask (1 for real tokens, 0 for padding).")
        continue
      shape = np.shape(value)
      if shape != tokens.shape:
        raise ValueError(
            f"{what}: batch {index} has {field} of shape {shape} but input_tokens of shape {tokens.shape}; "
            "they must match."
        )
    if tokens.size and (tokens.max() >= vocab_size or tokens.min() < 0):
      bad = int(tokens.max()) if tokens.max() >= vocab_size else int(tokens.min())
      raise ValueError(
          f"{what}: batch {index} has token id {bad} (max id {int(tokens.max())}), outside the model's "
          f"vocabulary of vocab size {vocab_size} (ids 0..{vocab_size - 1})."
      )


def check_output_folder(folder: Path, overwrite: bool, what: str) -> None:
  """Refuses to write into a non-empty folder (or over a file) unless ``overwrite``."""
  if folder.exists() and not folder.is_dir():
    raise FileExistsError(f"{what}: {folder} is a file, not a folder. Choose a folder path.")
  if folder.is_dir() and any(folder.iterdir()) and not overwrite:
    raise FileExistsError(
        f"{what}: {folder} is not empty. Pass overwrite=True to replace its contents (the folder is written "
        "aside and swapped in only when complete), or choose an empty folder."
    )


# ------------------------------------------------------------------ run metadata
RUN_FILE = "easytunix_run.json"


def data_fingerprint(records: list[Any]) -> dict[str, Any]:
  """How many records there are and a hash of the first and last few (to notice changed data on resume)."""
  digest = hashlib.sha256()
  sample = list(records[:4]) + list(records[-4:]) if len(records) > 8 else list(records)
  for record in sample:
    if isinstance(record, dict):
      digest.update(json.dumps(record, sort_keys=True, default=str).encode())
    else:
      for leaf in (getattr(record, "input_tokens", None), getattr(record, "completion_mask", None)):
        if leaf is not None:
          digest.update(np.ascontiguousarray(np.asarray(leaf)).tobytes())
  return {"count": len(records), "hash": digest.hexdigest()[:16]}


def describe_value(value: Any) -> Any:
  """A JSON-able description of a setting (callables by their name)."""
  if value is None or isinstance(value, (bool, int, float, str)):
    return value
  if callable(value):
    return f"<{getattr(value, '__name__', type(value).__name__)}>"
  return repr(value)


def compare_run(folder: Path, current: dict[str, Any], step: int) -> list[str]:
  """Differences between the run recorded in ``folder`` and ``current``, as sentences (empty when none)."""
  path = folder / RUN_FILE
  try:
    saved = json.loads(path.read_text())
  except (OSError, ValueError):
    return []
  notes = []
  for key, value in current.items():
    if key not in saved or saved[key] == value:
      continue
    if key == "data":
      notes.append(
          f"the training data differs from the checkpoint's ({saved[key].get('count')} records, hash "
          f"{saved[key].get('hash')}; now {value.get('count')} records, hash {value.get('hash')}): the run "
          f"continues at step {step} with the new data, skipping the batches the old run consumed"
      )
    else:
      notes.append(f"{key} was {saved[key]!r} in the checkpoint's run and is {value!r} now; "
                   f"the new value applies from step {step}")
  return notes


def write_run(folder: Path, current: dict[str, Any]) -> None:
  """Records ``current`` (settings and data fingerprint) next to the checkpoints, atomically."""
  folder.mkdir(parents=True, exist_ok=True)
  tmp = folder / f".{RUN_FILE}.tmp-{os.getpid()}"
  tmp.write_text(json.dumps(current, indent=2, sort_keys=True) + "\n")
  os.replace(tmp, folder / RUN_FILE)


__all__ = ["RUN_FILE", "check_compile_args", "check_fit_args", "check_float", "check_generate_args", "check_int",
           "check_learning_rate", "check_output_folder", "check_quantize_base", "check_schedule",
           "check_training_inputs", "compare_run", "data_fingerprint", "describe_value", "write_run"]
