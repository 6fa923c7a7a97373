"""How trainers call a causal LM: one forward pass that works for easytunix models and Tunix-style ones.

Tunix's convention, which every easytunix trainer follows, is
``model(input_tokens, positions, cache, attention_mask) -> (logits, cache)`` with
a causal boolean ``attention_mask`` [B, T, T] (``[B, T, S]`` with a cache of S
slots). Any ``nnx.Module`` with that signature (Tunix's Gemma, a user's toy
transformer) trains with our SFT, DPO, GRPO and distillation trainers.

easytunix's own models also take a [B, T] padding mask and keep it factored
(causal attention over the valid keys without a [T, T] mask in memory, so
blockwise and cuDNN attention apply). A model says it accepts that fast path
with the class attribute ``accepts_padding_mask = True``
(:class:`easytunix.models.base.CausalLM` sets it); every other model gets the
full causal mask built from the padding mask.
"""

from __future__ import annotations

import inspect
from typing import Any

import jax
import jax.numpy as jnp

from easytunix.layers.cache import make_causal_mask, positions_from_mask


def accepts_padding_mask(model: Any) -> bool:
  """Whether ``model`` takes a [B, T] padding mask as ``attention_mask`` (easytunix models do)."""
  return bool(getattr(model, "accepts_padding_mask", False))


def token_mask_of_attention(attention_mask: jax.Array) -> jax.Array:
  """Which tokens are real, read off a causal [B, T, T] mask: a real token attends to itself (its diagonal)."""
  mask = jnp.asarray(attention_mask)
  if mask.ndim != 3 or mask.shape[1] != mask.shape[2]:
    raise ValueError(
        f"Expected a square causal attention mask [B, T, T], got shape {mask.shape}; pass positions explicitly."
    )
  return jnp.diagonal(mask, axis1=1, axis2=2).astype(jnp.bool_)


def model_inputs(
    model: Any,
    input_tokens: jax.Array,
    input_mask: jax.Array | None = None,
    positions: jax.Array | None = None,
    attention_mask: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """``(tokens, positions, attention_mask)`` for ``model(tokens, positions, None, attention_mask)``.

  Args:
    model: the module to be called (decides between the [B, T] and the [B, T, T] mask).
    input_tokens: [B, T] token ids.
    input_mask: [B, T] 1 for real tokens, 0 for padding (None: all real). Ignored for
      attention when ``attention_mask`` is given.
    positions: [B, T] position ids (None: counted from each row's first real token).
    attention_mask: a ready mask ([B, T, T] causal, or [B, T] padding), passed through as given
      (a [B, T] one is expanded for models that need the full mask).
  """
  tokens = jnp.asarray(input_tokens)
  if tokens.ndim != 2:
    raise ValueError(f"input_tokens must be [batch, seq] token ids, got shape {tokens.shape}.")
  if attention_mask is None:
    mask = jnp.ones(tokens.shape, jnp.bool_) if input_mask is None else jnp.asarray(input_mask).astype(jnp.bool_)
  else:
    mask = jnp.asarray(attention_mask).astype(jnp.bool_)
    if mask.ndim not in (2, 3) or mask.shape[:2] != tokens.shape:
      raise ValueError(
          f"attention_mask must be [B, T] or [B, T, T] for input_tokens {tokens.shape}, got {mask.shape}."
      )
  if positions is None:
    valid = mask if mask.ndim == 2 else token_mask_of_attention(mask)
    positions = positions_from_mask(valid)
  if mask.ndim == 2 and not accepts_padding_mask(model):
    mask = make_causal_mask(mask)
  return tokens, jnp.asarray(positions, jnp.int32), mask


def _takes_four_positional(model: Any, *args: Any) -> bool:
  """Whether ``model(tokens, positions, cache, attention_mask, **kwargs)`` binds (True when it cannot be told)."""
  tokens, positions, mask, kwargs = args
  try:
    signature = inspect.signature(model)
  except (TypeError, ValueError):
    return True
  try:
    signature.bind(tokens, positions, None, mask, **kwargs)
  except TypeError:
    return False
  return True


def call_causal_lm(
    model: Any,
    input_tokens: jax.Array,
    input_mask: jax.Array | None = None,
    positions: jax.Array | None = None,
    attention_mask: jax.Array | None = None,
    **kwargs: Any,
) -> jax.Array:
  """The logits [B, T, V] of one full (uncached) forward pass, called the Tunix way.

  ``model(tokens, positions, None, attention_mask, **kwargs)``: easytunix models get
  the factored [B, T] padding mask, any other model a causal [B, T, T] mask built
  from it (see :func:`model_inputs`). A callable that does not take four positional
  arguments gets Tunix's names as keywords (``positions=``, ``cache=``, ``attention_mask=``).
  The model returns ``(logits, cache)`` or logits.
  """
  tokens, positions, mask = model_inputs(model, input_tokens, input_mask, positions, attention_mask)
  if _takes_four_positional(model, tokens, positions, mask, kwargs):
    out = model(tokens, positions, None, mask, **kwargs)
  else:  # e.g. ``__call__(self, tokens, attention_mask=None, **kwargs)``: Tunix's names, by keyword
    out = model(tokens, positions=positions, cache=None, attention_mask=mask, **kwargs)
  if isinstance(out, (tuple, list)):
    if not out:
      raise ValueError(f"{type(model).__name__} returned an empty tuple; expected (logits, cache).")
    out = out[0]
  if not hasattr(out, "shape") or out.ndim != 3:
    raise ValueError(
        f"{type(model).__name__}(input_tokens, positions, cache, attention_mask) must return (logits [B, T, V], cache); "
        f"got {type(out).__name__} with shape {getattr(out, 'shape', None)}."
    )
  return out


def logits_log_probs(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """log p(target) per position, computed in float32: [B, T, V], [B, T] -> [B, T]."""
  logits = jnp.asarray(logits).astype(jnp.float32)
  picked = jnp.take_along_axis(logits, jnp.asarray(targets, jnp.int32)[..., None], axis=-1)[..., 0]
  return picked - jax.nn.logsumexp(logits, axis=-1)


def next_token_log_probs(
    model: Any,
    input_tokens: jax.Array,
    input_mask: jax.Array | None = None,
    positions: jax.Array | None = None,
    attention_mask: jax.Array | None = None,
    *,
    keep: int | None = None,
) -> jax.Array:
  """log p(input_tokens[:, j] | input_tokens[:, :j]) for the last ``keep`` columns j: [B, keep] (float32).

  ``keep`` defaults to T - 1 (every token after the first). One forward pass, called
  the Tunix way (:func:`call_causal_lm`). An easytunix model (with ``token_log_probs``)
  returns its hidden states and computes the log-probs in chunks of positions, so the
  float32 [B, T, vocab] logits never exist at once (see ``CausalLM.token_log_probs``);
  any other model's logits are used as they are.
  """
  tokens = jnp.asarray(input_tokens)
  t = tokens.shape[-1]
  keep = t - 1 if keep is None else keep
  if not 0 < keep < t:
    raise ValueError(f"keep must be in [1, {t - 1}] for {t} input tokens, got {keep}.")
  targets = tokens[:, t - keep:]
  if accepts_padding_mask(model) and hasattr(model, "token_log_probs"):
    tokens, positions, mask = model_inputs(model, tokens, input_mask, positions, attention_mask)
    _, _, hidden = model(tokens, positions, None, mask, return_hidden_states=True)
    return model.token_log_probs(hidden[:, t - keep - 1 : -1], targets)
  logits = call_causal_lm(model, tokens, input_mask, positions, attention_mask)
  return logits_log_probs(logits[:, t - keep - 1 : -1], targets)


__all__ = [
    "accepts_padding_mask",
    "call_causal_lm",
    "logits_log_probs",
    "model_inputs",
    "next_token_log_probs",
    "token_mask_of_attention",
]
