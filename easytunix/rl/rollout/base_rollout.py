"""Tunix's module path ``tunix.rl.rollout.base_rollout``: rollout configuration, output and interface.

``RolloutConfig`` is :class:`easytunix.rl.rl_cluster.RolloutConfig` (it takes
Tunix's field names); ``CacheConfig`` is the sampler's. In easytunix the
rollout engine lives inside :class:`~easytunix.rl.rl_cluster.RLCluster`
(``rollout_engine="vanilla"`` or ``"vllm"``); :class:`BaseRollout` is the
interface for an engine of your own.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Any

import jax
import numpy as np

from easytunix.generate.sampler import CacheConfig
from easytunix.rl.rl_cluster import RolloutConfig

__all__ = ["BaseRollout", "CacheConfig", "RolloutConfig", "RolloutOutput"]


@dataclasses.dataclass
class RolloutOutput:
  """What a rollout engine returns for a batch of prompts.

  Attributes:
    text: the generated texts.
    logits: per generated token, the logits it was drawn from (may be None or empty).
    tokens: the generated token ids.
    left_padded_prompt_tokens: the prompts, left-padded to one width.
    logprobs: per generated token, its log-probability (None when not computed).
  """

  text: list[str]
  logits: Any
  tokens: Any
  left_padded_prompt_tokens: np.ndarray
  logprobs: Any = None


class BaseRollout(abc.ABC):
  """The interface of a rollout engine: generate, score, take new weights."""

  @abc.abstractmethod
  def generate(self, prompts: list[str], rollout_config: RolloutConfig, **kwargs: Any) -> RolloutOutput:
    """Generates one completion per prompt."""

  @abc.abstractmethod
  def get_per_token_logps(
      self, prompt_tokens: jax.Array, completion_tokens: jax.Array, completion_mask: jax.Array | None = None
  ) -> jax.Array:
    """log p(completion token | everything before it) for every completion slot [B, C]."""

  @abc.abstractmethod
  def update_params(self, params: Any, filter_types: tuple[Any, ...] | None = None) -> None:
    """Uses new weights from now on."""

  @abc.abstractmethod
  def pad_id(self) -> int:
    """The id that pads prompts and completions."""

  @abc.abstractmethod
  def eos_id(self) -> int:
    """The id that ends a completion."""

  @abc.abstractmethod
  def model(self) -> Any:
    """The model that generates."""
