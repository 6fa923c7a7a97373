"""Rotary position embeddings: default, linear and Llama-3 frequency scaling."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

_ROPE_TYPES = ("default", "linear", "llama3")


@dataclasses.dataclass(frozen=True)
class RopeConfig:
  """How rotary frequencies are computed.

  Attributes:
    theta: the base of the geometric frequency progression.
    rope_type: "default", "linear" (positions divided by ``factor``) or
      "llama3" (Llama 3.1 long-context frequency smoothing).
    factor: scaling factor for "linear" and "llama3".
    low_freq_factor: Llama-3 scaling parameter.
    high_freq_factor: Llama-3 scaling parameter.
    original_max_position_embeddings: Llama-3 scaling parameter.
  """

  theta: float = 10_000.0
  rope_type: str = "default"
  factor: float = 1.0
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position_embeddings: int = 8192

  def __post_init__(self):
    if self.rope_type not in _ROPE_TYPES:
      raise ValueError(
          f"Unsupported rope_type {self.rope_type!r}; expected one of {_ROPE_TYPES}."
      )
    if self.theta <= 0:
      raise ValueError(f"RopeConfig.theta must be positive, got {self.theta}.")
    if self.factor <= 0:
      raise ValueError(f"RopeConfig.factor must be positive, got {self.factor}.")

  @classmethod
  def from_hf(cls, params: dict[str, Any] | None, default_theta: float = 10_000.0) -> "RopeConfig":
    """Builds a config from a Hugging Face ``rope_scaling``/``rope_parameters`` dict."""
    params = dict(params or {})
    rope_type = params.get("rope_type", params.get("type", "default")) or "default"
    theta = float(params.get("rope_theta", default_theta))
    if rope_type == "default":
      return cls(theta=theta)
    if rope_type == "linear":
      return cls(theta=theta, rope_type="linear", factor=float(params["factor"]))
    if rope_type == "llama3":
      return cls(
          theta=theta,
          rope_type="llama3",
          factor=float(params["factor"]),
          low_freq_factor=float(params["low_freq_factor"]),
          high_freq_factor=float(params["high_freq_factor"]),
          original_max_position_embeddings=int(params["original_max_position_embeddings"]),
      )
    raise ValueError(
        f"Unsupported rope scaling type {rope_type!r} in the checkpoint config; "
        f"easytunix supports {_ROPE_TYPES}."
    )


def rope_inv_freq(head_dim: int, config: RopeConfig) -> np.ndarray:
  """Inverse frequencies (float32, shape [head_dim // 2]) for a rope config."""
  exponents = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
  inv_freq = (1.0 / (np.float32(config.theta) ** exponents)).astype(np.float32)
  if config.rope_type == "linear":
    inv_freq = (inv_freq / np.float32(config.factor)).astype(np.float32)
  elif config.rope_type == "llama3":
    old_len = config.original_max_position_embeddings
    low_wavelen = old_len / config.low_freq_factor
    high_wavelen = old_len / config.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / config.factor, inv_freq)
    smooth = (old_len / wavelen - config.low_freq_factor) / (
        config.high_freq_factor - config.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / config.factor + smooth * scaled
    is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    inv_freq = np.where(is_medium, smoothed, scaled).astype(np.float32)
  return inv_freq


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray | jax.Array) -> jax.Array:
  """Rotates ``x`` [B, T, N, D] by ``positions`` [B, T] (rotate-half convention)."""
  freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)
  # cos and sin of the [B, T, D/2] angles, then duplicated: taken after the concatenation, XLA:CPU
  # evaluated them inside every fused rotation, element by element (a SmolLM2 LoRA step spent ~4%
  # of its time there). Same angles; the values agree up to float rounding.
  cos, sin = (jnp.concatenate([t, t], axis=-1)[:, :, None, :].astype(x.dtype) for t in (jnp.cos(freqs), jnp.sin(freqs)))
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  return x * cos + rotated * sin
