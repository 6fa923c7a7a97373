"""What a strategy assumes when the user passes no functions: easytunix causal LMs fed
:class:`~easytunix.sft.peft_trainer.TrainingInput` batches.

Array layouts are batch-first so the trainer can split and stack them along
the batch: logits [B, T, V], features [B, L, T, D], attention maps
[B, L, heads, T, S] (L: captured layers).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from easytunix.models.calling import call_causal_lm

T = TypeVar("T")

ModelForwardCallable = Callable[..., T]
"""``forward(model, **inputs) -> output``: one forward pass of a model (an alias of ``Callable[..., Any]``)."""


@flax.struct.dataclass
class TokenLabels:
  """Next-token targets aligned with the logits: position t predicts ``targets[:, t]``.

  Attributes:
    targets: [B, T] int token ids (the input shifted left by one; the last slot is 0).
    mask: [B, T] bool, True where a real (completion) token is predicted.
  """

  targets: Any
  mask: Any


def default_forward_fn(
    model: nnx.Module,
    input_tokens: jax.Array,
    input_mask: jax.Array | None = None,
    positions: jax.Array | None = None,
    attention_mask: jax.Array | None = None,
    **_: Any,
) -> jax.Array:
  """The logits [B, T, V] of a causal LM called the Tunix way (padding masked out of attention).

  Any ``model(input_tokens, positions, cache, attention_mask) -> (logits, cache)`` works
  (see :func:`easytunix.models.calling.call_causal_lm`); a causal ``attention_mask``
  from a Tunix-style ``gen_model_input_fn`` is used as given.
  """
  return call_causal_lm(model, input_tokens, input_mask, positions, attention_mask)


def default_labels_fn(
    input_tokens: jax.Array,
    input_mask: jax.Array | None = None,
    completion_mask: jax.Array | None = None,
    **_: Any,
) -> TokenLabels:
  """Next-token labels of a :class:`TrainingInput` batch: every real token, or the completion only."""
  tokens = jnp.asarray(input_tokens)
  mask = jnp.ones(tokens.shape, jnp.bool_) if input_mask is None else jnp.asarray(input_mask).astype(jnp.bool_)
  if completion_mask is not None:
    mask = mask & jnp.asarray(completion_mask).astype(jnp.bool_)
  pad = jnp.zeros(tokens.shape[:-1] + (1,), tokens.dtype)
  targets = jnp.concatenate([tokens[..., 1:], pad], axis=-1)
  target_mask = jnp.concatenate([mask[..., 1:], jnp.zeros(pad.shape, jnp.bool_)], axis=-1)
  return TokenLabels(targets=targets, mask=target_mask)


def default_functions() -> tuple[ModelForwardCallable[jax.Array], ModelForwardCallable[jax.Array], Callable[..., TokenLabels]]:
  """``(student_forward_fn, teacher_forward_fn, labels_fn)`` for easytunix causal LMs and TrainingInput batches."""
  return default_forward_fn, default_forward_fn, default_labels_fn


def default_dummy_input(batch_size: int = 1, length: int = 8) -> dict[str, jax.Array]:
  """A small all-real batch (token id 1) that traces a model to learn its map shapes."""
  return {
      "input_tokens": jnp.ones((batch_size, length), jnp.int32),
      "input_mask": jnp.ones((batch_size, length), jnp.bool_),
  }


def token_mask_of(inputs: dict[str, Any], batch_shape: tuple[int, ...]) -> jax.Array:
  """The real-token mask [B, T] of a batch (all True without ``input_mask``)."""
  mask = inputs.get("input_mask") if isinstance(inputs, dict) else None
  if mask is None:
    return jnp.ones(batch_shape, jnp.bool_)
  return jnp.asarray(mask).astype(jnp.bool_)


def vocab_size_of(model: nnx.Module) -> int | None:
  """The vocabulary size of an easytunix model (None when it does not say)."""
  config = getattr(model, "config", None)
  size = getattr(config, "vocab_size", None)
  if size is None:
    size = getattr(model, "num_embed", None)
  return int(size) if isinstance(size, (int, np.integer)) else None


__all__ = [
    "ModelForwardCallable",
    "TokenLabels",
    "default_dummy_input",
    "default_forward_fn",
    "default_functions",
    "default_labels_fn",
    "token_mask_of",
    "vocab_size_of",
]
