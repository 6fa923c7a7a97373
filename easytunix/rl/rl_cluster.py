"""RLCluster: the models of an RL run, each in a role and on a mesh, and the jobs between them.

An RL loop needs several models at once: the policy being trained (``ACTOR``),
a copy that generates rollouts (``ROLLOUT``), a fixed ``REFERENCE`` for the KL
penalty, and optionally a ``CRITIC`` (PPO) and a ``REWARD`` model. Each role can
live on its own mesh (``ClusterConfig.role_to_mesh``):

* **Colocated** (no mesh given, or the same mesh for every role): the rollout
  sampler reads the actor's own variables, so there is nothing to copy.
* **Disaggregated** (the rollout on other devices, e.g. 8 CPU devices split
  4 + 4): the rollout model is a copy on the rollout mesh and
  :meth:`RLCluster.sync_weights` moves the actor's current weights there (only
  the LoRA adapters when the actor has them: the frozen base was copied once).
  The sampler's compiled programs take the weights as arguments, so a sync never
  recompiles them.

The reference is chosen by :func:`easytunix.rl.reference.choose_reference`: the
``reference`` model given; with LoRA, the actor's base weights with the adapters
switched off (no second copy); otherwise a snapshot of the actor's initial weights.

``offload_to_cpu`` keeps the reference (when it is a separate model) in pinned
host memory while it is idle and brings it back for each reference pass.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Union

import jax
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh

from easytunix.generate.sampler import CacheConfig, Sampler, SamplerOutput
from easytunix.generate.tokenizer_adapter import tokenizer_pad_id
from easytunix.layers.sharding import as_mesh, commit_model, module_mesh, path_str, shard_model, variable_placement
from easytunix.rl.common import bucket, completion_logps, left_pad, right_pad
from easytunix.rl.reference import choose_reference
from easytunix.sft.lora import is_lora_enabled, lora_disabled, trainable_filter
from easytunix.sft.peft_trainer import PeftTrainer, TrainingConfig

logger = logging.getLogger(__name__)

ModelOrPath = Union[nnx.Module, str, Path]
ROLLOUT_ENGINES = ("vanilla", "vllm")


class Role(enum.Enum):
  """What a model does in the cluster."""

  ACTOR = "actor"
  CRITIC = "critic"
  REFERENCE = "reference"
  REWARD = "reward"
  ROLLOUT = "rollout"


def _positive_int(owner: str, name: str, value: Any) -> None:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
    raise ValueError(f"{owner}.{name} must be a positive int, got {value!r}.")


@dataclasses.dataclass(frozen=True)
class RolloutConfig:
  """How rollouts are generated.

  Attributes:
    max_tokens_to_generate: the most completion tokens per rollout (the
      completion buffer's fixed width, so the update step compiles once).
    temperature: sampling temperature (> 0: GRPO needs different completions per group).
    top_p: nucleus mass in (0, 1] (None or 1.0: off).
    top_k: sample among the k most likely tokens (None: off).
    max_prompt_length: the longest prompt in tokens; a longer one is an error.
    kv_cache_size: tokens per row of the sampler's KV cache (None: enough for
      the longest prompt plus ``max_tokens_to_generate``).
    eos_tokens: ids that end a completion (None: the tokenizer's).
    seed: seed of the rollout sampling stream (each rollout draws a fresh key
      from it); an int, a JAX PRNG key (its last word is used) or None (0).
    rollout_vllm_model_version: with ``rollout_engine="vllm"``, a Hugging Face
      folder the engine starts from (None: the actor's weights; either way the
      actor's weights are pushed before the first rollout).
    rollout_vllm_hbm_utilization: fraction of GPU memory the vLLM engine may take.
    rollout_vllm_engine_kwargs: more keyword arguments for ``vllm.LLM``.
    data_type, rollout_mapping_config, tensor_parallel_size, data_parallel_size,
    rollout_vllm_lora_config, rollout_vllm_init_with_random_weights,
    rollout_vllm_tpu_backend_type: Tunix's fields, accepted so a Tunix config
      builds; the rollout runs on the actor's (or ``ROLLOUT``'s) mesh and dtype,
      so they change nothing here.
  """

  max_tokens_to_generate: int = 64
  temperature: float = 0.9
  top_p: float | None = 1.0
  top_k: int | None = None
  max_prompt_length: int = 256
  kv_cache_size: int | None = None
  eos_tokens: tuple[int, ...] | None = None
  seed: int = 0
  rollout_vllm_model_version: str | None = None
  rollout_vllm_hbm_utilization: float = 0.3
  rollout_vllm_engine_kwargs: Mapping[str, Any] | None = None
  data_type: Any = None
  rollout_mapping_config: Any = None
  tensor_parallel_size: int = -1
  data_parallel_size: int = -1
  rollout_vllm_lora_config: Mapping[str, Any] | None = None
  rollout_vllm_init_with_random_weights: bool = True
  rollout_vllm_tpu_backend_type: str | None = None

  def __post_init__(self):
    if self.seed is None:
      object.__setattr__(self, "seed", 0)
    elif isinstance(self.seed, jax.Array):
      key = jax.random.key_data(self.seed) if jax.dtypes.issubdtype(self.seed.dtype, jax.dtypes.prng_key) else self.seed
      object.__setattr__(self, "seed", int(np.asarray(key).ravel()[-1]))
    if self.rollout_vllm_model_version == "":
      object.__setattr__(self, "rollout_vllm_model_version", None)
    _positive_int("RolloutConfig", "max_tokens_to_generate", self.max_tokens_to_generate)
    _positive_int("RolloutConfig", "max_prompt_length", self.max_prompt_length)
    if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)) or self.temperature < 0:
      raise ValueError(f"RolloutConfig.temperature must be a number >= 0, got {self.temperature!r}.")
    if self.top_p is not None and not 0.0 < float(self.top_p) <= 1.0:
      raise ValueError(f"RolloutConfig.top_p must be in (0, 1] or None, got {self.top_p!r}.")
    if self.top_k is not None:
      _positive_int("RolloutConfig", "top_k", self.top_k)
    if self.kv_cache_size is not None:
      _positive_int("RolloutConfig", "kv_cache_size", self.kv_cache_size)
      if self.kv_cache_size < self.max_tokens_to_generate + 1:
        raise ValueError(
            f"RolloutConfig.kv_cache_size={self.kv_cache_size} leaves no room for a prompt next to "
            f"max_tokens_to_generate={self.max_tokens_to_generate}."
        )
    if self.eos_tokens is not None:
      object.__setattr__(self, "eos_tokens", tuple(int(t) for t in self.eos_tokens))
    if not 0.0 < float(self.rollout_vllm_hbm_utilization) <= 1.0:
      raise ValueError(
          f"RolloutConfig.rollout_vllm_hbm_utilization must be in (0, 1], got {self.rollout_vllm_hbm_utilization!r}."
      )

  def cache_size(self) -> int:
    return self.kv_cache_size or bucket(self.max_prompt_length) + self.max_tokens_to_generate


@dataclasses.dataclass(frozen=True)
class RLTrainingConfig(TrainingConfig):
  """The training loop's settings (every :class:`TrainingConfig` field) plus the optimizers.

  Attributes:
    actor_optimizer: the policy's ``optax.GradientTransformation`` (required).
    critic_optimizer: the critic's (only with a critic model).
  """

  actor_optimizer: optax.GradientTransformation | None = None
  critic_optimizer: optax.GradientTransformation | None = None

  def __post_init__(self):
    super().__post_init__()
    if not isinstance(self.actor_optimizer, optax.GradientTransformation):
      raise ValueError(
          "RLTrainingConfig.actor_optimizer must be an optax.GradientTransformation, e.g. "
          f"optax.adamw(1e-5); got {self.actor_optimizer!r}."
      )
    if self.critic_optimizer is not None and not isinstance(self.critic_optimizer, optax.GradientTransformation):
      raise ValueError("RLTrainingConfig.critic_optimizer must be an optax.GradientTransformation or None.")

  def to_training_config(self) -> TrainingConfig:
    """The :class:`TrainingConfig` part (what a :class:`PeftTrainer` takes)."""
    names = [f.name for f in dataclasses.fields(TrainingConfig)]
    return TrainingConfig(**{n: getattr(self, n) for n in names})


@dataclasses.dataclass(frozen=True)
class ClusterConfig:
  """Where the roles run and how rollouts are made.

  Attributes:
    role_to_mesh: a mesh per :class:`Role`; a role without one uses the
      actor's mesh (None everywhere: wherever the actor's weights already are).
      An empty mesh (e.g. ``pxla.thread_resources.env.physical_mesh`` outside
      any ``with mesh:``) counts as none: a single device, no sharding.
    rollout_engine: ``"vanilla"`` (easytunix's JAX Sampler) or ``"vllm"`` (a
      :class:`~easytunix.generate.vllm_sampler.VllmSampler`; needs vLLM installed).
    offload_to_cpu: keep an idle separate reference model in host memory.
    training_config: an :class:`RLTrainingConfig`.
    rollout_config: a :class:`RolloutConfig`.
  """

  training_config: RLTrainingConfig
  role_to_mesh: Mapping[Role, Mesh] | None = None
  rollout_engine: str = "vanilla"
  offload_to_cpu: bool = False
  rollout_config: RolloutConfig = dataclasses.field(default_factory=RolloutConfig)

  def __post_init__(self):
    if not isinstance(self.training_config, RLTrainingConfig):
      raise TypeError(
          "ClusterConfig.training_config must be an easytunix.rl.rl_cluster.RLTrainingConfig "
          f"(it carries the actor optimizer), got {type(self.training_config).__name__}."
      )
    if not isinstance(self.rollout_config, RolloutConfig):
      raise TypeError(f"ClusterConfig.rollout_config must be a RolloutConfig, got {type(self.rollout_config).__name__}.")
    if self.rollout_engine not in ROLLOUT_ENGINES:
      raise ValueError(f"ClusterConfig.rollout_engine must be one of {list(ROLLOUT_ENGINES)}, got {self.rollout_engine!r}.")
    meshes = dict(self.role_to_mesh or {})
    for role, mesh in meshes.items():
      if not isinstance(role, Role):
        raise TypeError(f"role_to_mesh keys must be easytunix.rl.rl_cluster.Role members, got {role!r}.")
      if mesh is not None and not isinstance(mesh, Mesh):
        raise TypeError(f"role_to_mesh[{role}] must be a jax.sharding.Mesh, got {type(mesh).__name__}.")
    meshes = {role: mesh for role, mesh in meshes.items() if as_mesh(mesh) is not None}
    object.__setattr__(self, "role_to_mesh", meshes)


@dataclasses.dataclass
class Rollout:
  """Generated completions of a batch of prompts, laid out for the loss.

  Attributes:
    prompt_ids / prompt_mask: [N, P] left-padded prompts.
    completion_ids / completion_mask: [N, C] right-padded completions, up to and
      including the EOS token that ended each one (C = max_tokens_to_generate).
    text: the completion texts (EOS not included), what reward functions read.
    seconds: how long generation took.
  """

  prompt_ids: np.ndarray
  prompt_mask: np.ndarray
  completion_ids: np.ndarray
  completion_mask: np.ndarray
  text: list[str]
  seconds: float


def same_devices(a: Mesh | None, b: Mesh | None) -> bool:
  """Whether two meshes (None: the default placement) put arrays on the same devices in the same layout."""
  a, b = as_mesh(a), as_mesh(b)
  if a is None or b is None:
    return a is b
  return a.axis_names == b.axis_names and a.devices.shape == b.devices.shape and (
      [d.id for d in a.devices.flat] == [d.id for d in b.devices.flat]
  )


def _place_like(module: nnx.Module, mesh: Mesh | None, copy: bool) -> None:
  """Puts every variable of ``module`` on ``mesh`` (following its partition metadata); ``copy``: own buffers."""
  for path, var in nnx.iter_graph(module):
    if isinstance(var, nnx.Variable) and hasattr(var[...], "shape"):
      value = var[...]
      if mesh is None:
        target = next(iter(value.devices())) if isinstance(value, jax.Array) else jax.devices()[0]
        target = jax.sharding.SingleDeviceSharding(target)
      else:
        target = variable_placement(path_str(path), var, mesh)
      var.set_value(jax.device_put(value, target, may_alias=False if copy else None))


def _supports_host_offload(module: nnx.Module) -> bool:
  for leaf in jax.tree.leaves(nnx.state(module)):
    if isinstance(leaf, jax.Array):
      device = next(iter(leaf.devices()))
      return "pinned_host" in {m.kind for m in device.addressable_memories()}
  return False


def _move_memory(module: nnx.Module, kind: str) -> None:
  """Moves every array of ``module`` to memory ``kind`` (``"pinned_host"`` or ``"device"``), sharding kept."""
  for _, var in nnx.iter_graph(module):
    if isinstance(var, nnx.Variable):
      value = var[...]
      if isinstance(value, jax.Array) and value.sharding.memory_kind != kind:
        var.set_value(jax.device_put(value, value.sharding.with_memory_kind(kind)))


class RLCluster:
  """The models of an RL run placed on their meshes, with rollout, log-prob and weight-sync jobs.

  Args:
    actor: the policy (an easytunix model, or a Hugging Face folder to load).
      Apply LoRA before passing it to train adapters only.
    critic: a value model (optional; GRPO needs none).
    reference: the KL reference (None: see the module docstring).
    reward: a reward model (optional), placed on the ``REWARD`` mesh and
      available as ``reward_model`` for reward functions to call.
    tokenizer: the tokenizer of every model (None: loaded from ``actor`` when it is a folder).
    cluster_config: a :class:`ClusterConfig`.
  """

  def __init__(
      self,
      actor: ModelOrPath,
      critic: ModelOrPath | None = None,
      reference: ModelOrPath | None = None,
      reward: ModelOrPath | None = None,
      tokenizer: Any | None = None,
      cluster_config: ClusterConfig | None = None,
  ):
    if not isinstance(cluster_config, ClusterConfig):
      raise TypeError(
          "RLCluster needs cluster_config=ClusterConfig(training_config=RLTrainingConfig(actor_optimizer=...)), "
          f"got {type(cluster_config).__name__}."
      )
    self.cluster_config = cluster_config
    self.uses_vllm = cluster_config.rollout_engine == "vllm"
    if self.uses_vllm:
      from easytunix.generate.vllm_sampler import import_vllm

      import_vllm()  # fails now, with the install command, rather than at the first rollout
    meshes = cluster_config.role_to_mesh
    self.actor = self._load(actor, meshes.get(Role.ACTOR), "actor")
    if tokenizer is None and isinstance(actor, (str, Path)):
      from easytunix.generate.tokenizer_adapter import TokenizerAdapter

      tokenizer = TokenizerAdapter.from_pretrained(actor)
    self.tokenizer = tokenizer
    actor_mesh = meshes.get(Role.ACTOR) or module_mesh(self.actor)
    self._meshes = {role: meshes.get(role, actor_mesh) for role in Role}
    self._meshes[Role.ACTOR] = actor_mesh
    self.critic = self._load(critic, self._meshes[Role.CRITIC], "critic")
    self.reward_model = self._load(reward, self._meshes[Role.REWARD], "reward")
    self.is_lora = is_lora_enabled(self.actor)
    choice = choose_reference(self.actor, reference)
    self.reference_kind = choice.kind
    if choice.kind == "model":
      self.reference = self._load(choice.model, self._meshes[Role.REFERENCE], "reference")
    else:
      self.reference = choice.model  # a snapshot shares the arrays until training replaces the actor's
      if self.reference is not None and not same_devices(self._meshes[Role.REFERENCE], actor_mesh):
        _place_like(self.reference, self._meshes[Role.REFERENCE], copy=True)
    self._offload = bool(cluster_config.offload_to_cpu) and self.reference is not None
    if self._offload:
      if _supports_host_offload(self.reference):
        _move_memory(self.reference, "pinned_host")
      else:
        logger.info("offload_to_cpu: this backend has no pinned host memory; the reference stays in place.")
        self._offload = False
    self.rollout_model: nnx.Module = self.actor
    self._sampler: Any = None
    self._actor_trainer: PeftTrainer | None = None
    self._critic_trainer: PeftTrainer | None = None
    self._logps_fns: dict[tuple[int, bool], Callable] = {}
    self._rng_lock = threading.Lock()
    self._rollout_rng = np.random.default_rng(cluster_config.rollout_config.seed)
    self.num_logps_traces = 0
    self.num_weight_syncs = 0
    self.last_sync_seconds = 0.0
    self.last_engine_sync_seconds = 0.0
    if not self.colocated:
      self.detach_rollout()
    if self.uses_vllm:
      self.rollout_sampler()  # the engine starts once, here, in the thread that owns the cluster

  # ------------------------------------------------------------------ placement

  @staticmethod
  def _load(model: ModelOrPath | None, mesh: Mesh | None, what: str) -> nnx.Module | None:
    if model is None:
      return None
    if isinstance(model, (str, Path)):
      from easytunix.models import load_model

      model = load_model(model, mesh=mesh)
    elif not isinstance(model, nnx.Module):
      raise TypeError(f"The {what} must be an nnx.Module or a model folder path, got {type(model).__name__}.")
    elif mesh is not None and not same_devices(module_mesh(model), mesh):
      shard_model(model, mesh)
    # Pinned where it is: the rollout, log-prob and train programs then see one placement throughout.
    return commit_model(model)

  def mesh(self, role: Role) -> Mesh | None:
    """The mesh of ``role`` (None: the default device)."""
    return self._meshes[role]

  @property
  def colocated(self) -> bool:
    """Whether rollouts run on the actor's devices, from the actor's own variables."""
    return same_devices(self._meshes[Role.ROLLOUT], self._meshes[Role.ACTOR])

  @property
  def rollout_is_actor(self) -> bool:
    """Whether the rollout sampler reads the actor's variables (no weight copies to sync)."""
    return self.rollout_model is self.actor

  def detach_rollout(self) -> None:
    """Gives the rollout its own copy of the weights on the rollout mesh (disaggregated or asynchronous runs).

    Frozen weights are shared when the meshes are the same; trainable ones are
    always copied, because the training step reuses (donates) the actor's buffers.
    """
    if not self.rollout_is_actor:
      return
    copy = nnx.clone(self.actor)
    mesh = self._meshes[Role.ROLLOUT]
    trainable = nnx.state(copy, trainable_filter(copy))
    trainable_ids = {id(v) for v in jax.tree.leaves(trainable, is_leaf=lambda x: isinstance(x, nnx.Variable))}
    move = not self.colocated
    for path, var in nnx.iter_graph(copy):
      if isinstance(var, nnx.Variable) and hasattr(var[...], "shape") and (move or id(var) in trainable_ids):
        value = var[...]
        target = (
            variable_placement(path_str(path), var, mesh)
            if mesh is not None
            else value.sharding
        )
        var.set_value(jax.device_put(value, target, may_alias=False))
    self.rollout_model = copy
    self._rollout_shardings = jax.tree.map(lambda x: x.sharding, nnx.as_pure(self._trainable_state(copy)))
    if not self.uses_vllm:  # a vLLM engine keeps running; it takes the copy's weights at the next sync
      self._sampler = None

  # ------------------------------------------------------------------- weights

  def _trainable_state(self, module: nnx.Module) -> nnx.State:
    return nnx.state(module, trainable_filter(self.actor))

  def snapshot_actor_weights(self) -> Any:
    """The actor's current trainable weights, copied onto the rollout model's shardings (a pure pytree).

    Safe to hand to another thread: the arrays are new buffers that training never reuses.
    """
    if self._actor_trainer is not None:
      self._actor_trainer.sync_model()
    source = nnx.as_pure(self._trainable_state(self.actor))
    if self.rollout_is_actor:
      return source
    return jax.tree.map(lambda x, s: jax.device_put(x, s, may_alias=False), source, self._rollout_shardings)

  def load_rollout_weights(self, weights: Any) -> None:
    """Writes a :meth:`snapshot_actor_weights` result into the rollout model (no recompilation),
    and from there into the vLLM engine when rollouts use one."""
    if not self.rollout_is_actor:
      nnx.update(self.rollout_model, weights)
    if self.uses_vllm:
      self.push_to_engine()

  def push_to_engine(self) -> None:
    """Sends the rollout model's weights (LoRA folded in) to the running vLLM engine."""
    start = time.perf_counter()
    self.rollout_sampler().update_params(self.rollout_model)
    self.last_engine_sync_seconds = time.perf_counter() - start

  def sync_weights(self) -> None:
    """Moves the actor's current weights (its LoRA adapters only, when it has them) to the rollout sampler."""
    start = time.perf_counter()
    if not self.rollout_is_actor:
      weights = self.snapshot_actor_weights()
      jax.block_until_ready(weights)
      self.load_rollout_weights(weights)
    else:
      if self._actor_trainer is not None:
        self._actor_trainer.sync_model()
      if self.uses_vllm:
        self.push_to_engine()
    self.num_weight_syncs += 1
    self.last_sync_seconds = time.perf_counter() - start

  # ------------------------------------------------------------------- rollout

  @property
  def rollout_config(self) -> RolloutConfig:
    return self.cluster_config.rollout_config

  def rollout_sampler(self) -> Any:
    """The sampler over the rollout model (built once; weight syncs never rebuild or recompile it): a
    JAX :class:`Sampler`, or a :class:`~easytunix.generate.vllm_sampler.VllmSampler` with ``rollout_engine="vllm"``."""
    if self._sampler is None:
      config = self.rollout_config
      if self.uses_vllm:
        from easytunix.generate.vllm_sampler import VllmSampler

        self._sampler = VllmSampler(
            self.tokenizer,
            mesh=self._meshes[Role.ROLLOUT],
            max_model_len=config.cache_size(),
            model_version=config.rollout_vllm_model_version or self.rollout_model,
            hbm_utilization=config.rollout_vllm_hbm_utilization,
            seed=config.seed,
            engine_kwargs=config.rollout_vllm_engine_kwargs,
        )
      else:
        cache = CacheConfig.for_model(self.rollout_model, cache_size=config.cache_size())
        self._sampler = Sampler(self.rollout_model, self.tokenizer, cache)
    return self._sampler

  def eos_tokens(self) -> list[int] | None:
    """The rollout's stop tokens (``RolloutConfig.eos_tokens``; None: the tokenizer's)."""
    eos = self.rollout_config.eos_tokens
    return None if eos is None else list(eos)

  def pad_id(self) -> int:
    return tokenizer_pad_id(self.tokenizer)

  def tokenize_prompts(self, prompts: Sequence[Any]) -> list[list[int]]:
    """Token ids of each prompt (strings are tokenized; id lists pass through), checked against max_prompt_length."""
    sampler = self.rollout_sampler()
    limit = self.rollout_config.max_prompt_length
    out = []
    for i, prompt in enumerate(prompts):
      if isinstance(prompt, str):
        if self.tokenizer is None:
          raise ValueError("String prompts need a tokenizer; pass tokenizer= to RLCluster.")
        ids = sampler.tokenize(prompt)
      else:
        ids = [int(t) for t in prompt]
      if not ids:
        raise ValueError(f"Prompt {i} is empty.")
      if len(ids) > limit:
        raise ValueError(
            f"Prompt {i} has {len(ids)} tokens, more than RolloutConfig.max_prompt_length={limit}. Raise "
            "max_prompt_length or shorten the prompt."
        )
      out.append(ids)
    return out

  def next_seed(self) -> int:
    """A fresh seed from the rollout stream (deterministic given RolloutConfig.seed)."""
    with self._rng_lock:
      return int(self._rollout_rng.integers(0, 2**31 - 1))

  def generate(
      self, prompts: Sequence[Any], seed: int | None = None, temperature: float | None = None, **overrides: Any
  ) -> SamplerOutput:
    """Completes ``prompts`` (strings or token ids) with the rollout model and the rollout settings.

    ``temperature`` and other sampler arguments (``top_p``, ``top_k``, ``max_generation_steps``) override
    the :class:`RolloutConfig`; ``temperature=0`` is greedy.
    """
    config = self.rollout_config
    temperature = config.temperature if temperature is None else temperature
    kwargs = dict(
        max_generation_steps=config.max_tokens_to_generate,
        temperature=temperature,
        top_p=config.top_p if temperature else None,
        top_k=config.top_k if temperature else None,
        eos_tokens=self.eos_tokens(),
        seed=self.next_seed() if seed is None else seed,
    )
    kwargs.update(overrides)
    steps = kwargs.pop("max_generation_steps")
    return self.rollout_sampler()(list(prompts), steps, **kwargs)

  def rollout(self, prompt_ids: Sequence[Sequence[int]], seed: int | None = None, width: int | None = None) -> Rollout:
    """Samples one completion per prompt (token ids) and lays the batch out for the loss.

    ``width``: the prompt columns (default: the longest prompt rounded up to a power of two).
    """
    start = time.perf_counter()
    out = self.generate([list(p) for p in prompt_ids], seed=seed)
    longest = max(len(p) for p in prompt_ids)
    if width is None:
      width = max(bucket(longest, 16, self.rollout_config.max_prompt_length), longest)
    elif width < longest:
      raise ValueError(f"width={width} is narrower than the longest prompt ({longest} tokens).")
    pad = self.pad_id()
    prompt, prompt_mask = left_pad(prompt_ids, width, pad)
    completion, completion_mask = right_pad(out.tokens, self.rollout_config.max_tokens_to_generate, pad)
    return Rollout(prompt, prompt_mask, completion, completion_mask, list(out.text), time.perf_counter() - start)

  # ------------------------------------------------------------- log-probs

  def _logps_fn(self, module: nnx.Module, adapters_off: bool) -> Callable:
    key = (id(module), adapters_off)
    if key not in self._logps_fns:
      graphdef = nnx.graphdef(module)

      def logps(state, prompt_ids, prompt_mask, completion_ids, completion_mask):
        self.num_logps_traces += 1
        model = nnx.merge(graphdef, state)
        if adapters_off:
          with lora_disabled(model):
            values = completion_logps(model, prompt_ids, prompt_mask, completion_ids, completion_mask)
        else:
          values = completion_logps(model, prompt_ids, prompt_mask, completion_ids, completion_mask)
        return jax.lax.stop_gradient(values)

      self._logps_fns[key] = jax.jit(logps)
    return self._logps_fns[key]

  def _per_token_logps(self, module, adapters_off, prompt_ids, prompt_mask, completion_ids, completion_mask):
    fn = self._logps_fn(module, adapters_off)
    return fn(nnx.as_pure(nnx.state(module)), np.asarray(prompt_ids), np.asarray(prompt_mask),
              np.asarray(completion_ids), np.asarray(completion_mask))

  def get_ref_per_token_logps(self, prompt_ids, prompt_mask, completion_ids, completion_mask) -> jax.Array:
    """The reference model's log-prob of each completion token [N, C] (no gradient)."""
    if self.reference_kind == "lora_disabled":
      return self._per_token_logps(self.rollout_model, True, prompt_ids, prompt_mask, completion_ids, completion_mask)
    if self._offload:
      _move_memory(self.reference, "device")
    try:
      values = self._per_token_logps(self.reference, False, prompt_ids, prompt_mask, completion_ids, completion_mask)
      if self._offload:
        values = jax.block_until_ready(values)
    finally:
      if self._offload:
        _move_memory(self.reference, "pinned_host")
    return values

  def get_old_per_token_logps(self, prompt_ids, prompt_mask, completion_ids, completion_mask) -> jax.Array:
    """The log-prob of each completion token [N, C] under the weights that generated it (the rollout model)."""
    return self._per_token_logps(self.rollout_model, False, prompt_ids, prompt_mask, completion_ids, completion_mask)

  # ------------------------------------------------------------------ training

  def actor_trainer(self) -> PeftTrainer:
    """The :class:`PeftTrainer` of the actor (built once, with ``actor_optimizer``)."""
    if self._actor_trainer is None:
      config = self.cluster_config.training_config
      self._actor_trainer = PeftTrainer(self.actor, config.actor_optimizer, config.to_training_config())
    return self._actor_trainer

  def critic_trainer(self) -> PeftTrainer:
    """The :class:`PeftTrainer` of the critic (set its loss with ``with_loss_fn``)."""
    if self.critic is None:
      raise ValueError("This cluster has no critic; pass critic= to RLCluster.")
    if self._critic_trainer is None:
      config = self.cluster_config.training_config
      if config.critic_optimizer is None:
        raise ValueError("A critic needs RLTrainingConfig.critic_optimizer.")
      self._critic_trainer = PeftTrainer(self.critic, config.critic_optimizer, config.to_training_config())
    return self._critic_trainer

  def update_actor(self, train_ds: Iterable[Any], eval_ds: Iterable[Any] | None = None, skip_jit: bool = False) -> None:
    """Runs the actor's training loop over ``train_ds`` (batches its loss function understands)."""
    self.actor_trainer().train(train_ds, eval_ds, skip_jit)

  def update_critic(self, train_ds: Iterable[Any], eval_ds: Iterable[Any] | None = None, skip_jit: bool = False) -> None:
    """Runs the critic's training loop over ``train_ds``."""
    self.critic_trainer().train(train_ds, eval_ds, skip_jit)

  def close_rollout_engine(self) -> None:
    """Stops a vLLM rollout engine and frees its memory (a later rollout would start a new one)."""
    if self.uses_vllm and self._sampler is not None:
      self._sampler.close()
      self._sampler = None

  def close(self) -> None:
    """Closes the trainers (their checkpoint managers and loggers) and stops a vLLM engine."""
    for trainer in (self._actor_trainer, self._critic_trainer):
      if trainer is not None:
        trainer.close()
    self.close_rollout_engine()


__all__ = ["ClusterConfig", "RLCluster", "RLTrainingConfig", "Role", "Rollout", "RolloutConfig", "same_devices"]
