"""Group Relative Policy Optimization (GRPO, Shao et al. 2024) and GSPO-token (Zheng et al. 2025).

One GRPO step, for a batch of B prompts:

1. **Rollout**: each prompt is completed ``num_generations`` (G) times by the
   rollout sampler (temperature sampling).
2. **Rewards**: every reward function scores every completion
   (called with keywords, as TRL: ``fn(prompts=..., completions=..., completion_ids=..., **columns)``
   ``-> list[float]``); the weighted sum is the reward.
3. **Advantages**, relative to the group of G completions of the same prompt:
   ``A_i = (r_i - mean(r_group)) / (std(r_group) + 1e-4)`` (std with ddof=1, as TRL).
4. **Log-probs** outside the gradient: the reference's (for the KL penalty,
   when ``beta > 0``) and the sampling policy's (``pi_old``), needed when the
   ratio is not 1: ``num_iterations > 1`` or asynchronous rollouts.
5. **Policy update** on the shared training loop (:class:`PeftTrainer`) with
   :func:`grpo_loss_fn`, ``num_iterations`` (mu) times on the same rollouts.

The loss per completion token t of completion i, with ``r = pi / pi_old``:

* ``grpo``: ``-min(r A_i, clip(r, 1 - eps, 1 + eps) A_i) + beta * KL_t`` with the
  k3 estimator ``KL_t = exp(ref - logp) - (ref - logp) - 1``;
* ``gspo-token``: the same with ``r`` replaced by the sequence ratio
  ``s_i = exp(mean_t(logp - old))`` carrying per-token gradients:
  ``s_it = sg[s_i] * pi_t / sg[pi_t]``;

averaged over each completion's tokens, then over completions.

**Asynchronous pipeline** (``GrpoConfig.async_rollout``): a background thread
generates the next group's rollouts (and rewards, log-probs) while the current
group trains, through a bounded queue. Rollouts of group g then use the weights
from before group g - 1's update (exactly one update behind, deterministically);
the importance ratio against those sampling weights corrects for it.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from easytunix.rl.common import bucket, completion_logps
from easytunix.rl.rl_cluster import RLCluster
from easytunix.sft.data import batch_indices, num_batches
from easytunix.sft.peft_trainer import NUM_TOKENS

logger = logging.getLogger(__name__)

LOSS_ALGOS: tuple[str, ...] = ("grpo", "gspo-token")
RewardFn = Callable[..., Sequence[float]]
ADVANTAGE_EPSILON = 1e-4
# A batch column of token ids to generate from (the ``prompts`` column stays the text reward functions see).
PROMPT_IDS = "prompt_ids"


@dataclasses.dataclass(frozen=True)
class GrpoConfig:
  """Settings of the GRPO algorithm.

  Attributes:
    num_generations: completions per prompt (G in the paper), at least 2.
    num_iterations: policy updates per batch of rollouts (mu in the paper).
    beta: weight of the KL penalty to the reference (0: no reference pass).
    epsilon: clipping range of the importance ratio.
    loss_algo: ``"grpo"`` (token-level ratio) or ``"gspo-token"`` (sequence-level ratio, per-token gradients).
    reward_weights: one weight per reward function (None: all 1).
    async_rollout: generate the next rollouts while the current ones train.
    eval_every_n_steps: score ``eval_ds`` every this many optimizer steps (None: at the end only).
    eval_temperature: sampling temperature of evaluation rollouts (0: greedy, one per prompt).
  """

  num_generations: int = 2
  num_iterations: int = 1
  beta: float = 0.04
  epsilon: float = 0.2
  loss_algo: str = "grpo"
  reward_weights: tuple[float, ...] | None = None
  async_rollout: bool = True
  eval_every_n_steps: int | None = None
  eval_temperature: float = 0.0

  def __post_init__(self):
    for name in ("num_generations", "num_iterations"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"GrpoConfig.{name} must be a positive int, got {value!r}.")
    if self.num_generations < 2:
      raise ValueError(
          f"GrpoConfig.num_generations must be >= 2: advantages compare the completions of one prompt, "
          f"got {self.num_generations}."
      )
    for name in ("beta", "epsilon"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise ValueError(f"GrpoConfig.{name} must be a number >= 0, got {value!r}.")
    if self.loss_algo not in LOSS_ALGOS:
      raise ValueError(f"GrpoConfig.loss_algo must be one of {list(LOSS_ALGOS)}, got {self.loss_algo!r}.")
    if self.reward_weights is not None:
      object.__setattr__(self, "reward_weights", tuple(float(w) for w in self.reward_weights))
    if self.eval_every_n_steps is not None and (
        isinstance(self.eval_every_n_steps, bool) or not isinstance(self.eval_every_n_steps, int)
        or self.eval_every_n_steps <= 0
    ):
      raise ValueError(f"GrpoConfig.eval_every_n_steps must be a positive int or None, got {self.eval_every_n_steps!r}.")


@flax.struct.dataclass
class TrainExample:
  """One batch of rollouts, as the loss sees it (N = prompts x num_generations rows).

  Attributes:
    prompt_ids / prompt_mask: [N, P] left-padded prompts.
    completion_ids / completion_mask: [N, C] right-padded completions (EOS included).
    advantages: [N] group-relative advantages.
    ref_per_token_logps: [N, C] reference log-probs (None when beta = 0).
    old_per_token_logps: [N, C] log-probs under the sampling weights (None: the
      current policy, detached, so the ratio is 1).
  """

  prompt_ids: Any
  prompt_mask: Any
  completion_ids: Any
  completion_mask: Any
  advantages: Any
  ref_per_token_logps: Any = None
  old_per_token_logps: Any = None


@flax.struct.dataclass
class _Step:
  """A micro-batch of the policy update: the example plus the rewards it was scored with."""

  train_example: TrainExample
  rewards: Any  # [N, num reward fns], unweighted
  total_rewards: Any  # [N]


class RepeatIterable:
  """Yields the same item(s) ``repeat`` times: the ``num_iterations`` updates on one batch of rollouts."""

  def __init__(self, items: Any, repeat: int = 1):
    self.items = items if isinstance(items, list) else [items]
    self.repeat = int(repeat)

  def __iter__(self) -> Iterator[Any]:
    for _ in range(self.repeat):
      yield from self.items

  def __len__(self) -> int:
    return len(self.items) * self.repeat


# ----------------------------------------------------------------------------- the objective


def grpo_objective(
    per_token_logps: jax.Array,
    completion_mask: jax.Array,
    advantages: jax.Array,
    old_per_token_logps: jax.Array | None,
    ref_per_token_logps: jax.Array | None,
    *,
    beta: float,
    epsilon: float,
    loss_algo: str = "grpo",
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The GRPO / GSPO-token loss from per-token log-probs [N, C] (see the module docstring).

  Returns ``(loss, aux)`` with ``kl``, ``clip_fraction``, ``completion_length``
  and ``num_tokens`` (the number of non-empty completions: the accumulation weight).
  """
  if loss_algo not in LOSS_ALGOS:
    raise ValueError(f"loss_algo must be one of {list(LOSS_ALGOS)}, got {loss_algo!r}.")
  logps = jnp.asarray(per_token_logps, jnp.float32)
  mask = jnp.asarray(completion_mask).astype(jnp.float32)
  lengths = mask.sum(-1)
  valid = lengths > 0
  per_length = jnp.maximum(lengths, 1.0)
  old = jax.lax.stop_gradient(logps) if old_per_token_logps is None else jnp.asarray(old_per_token_logps, jnp.float32)
  adv = jnp.asarray(advantages, jnp.float32)[:, None]
  on = mask > 0
  # Padding slots hold arbitrary log-probs: zero their differences before exp (inf * 0 would be NaN).
  log_ratio = jnp.where(on, logps - old, 0.0)
  if loss_algo == "grpo":
    ratio = jnp.exp(log_ratio)
  else:
    sequence_log_ratio = log_ratio.sum(-1) / per_length
    ratio = jnp.exp(jax.lax.stop_gradient(sequence_log_ratio)[:, None] + logps - jax.lax.stop_gradient(logps))
  clipped = jnp.clip(ratio, 1.0 - epsilon, 1.0 + epsilon)
  per_token = -jnp.minimum(ratio * adv, clipped * adv)
  aux: dict[str, jax.Array] = {}
  num_sequences = valid.sum().astype(jnp.float32)

  def sequence_mean(x):
    per_sequence = (x * mask).sum(-1) / per_length
    return jnp.where(valid, per_sequence, 0.0).sum() / jnp.maximum(num_sequences, 1.0)

  if ref_per_token_logps is not None and beta:
    delta = jnp.where(on, jnp.asarray(ref_per_token_logps, jnp.float32) - logps, 0.0)
    kl = jnp.exp(delta) - delta - 1.0
    per_token = per_token + beta * kl
    aux["kl"] = sequence_mean(jax.lax.stop_gradient(kl))
  loss = sequence_mean(per_token)
  clipped_tokens = ((ratio < 1.0 - epsilon) & (adv < 0)) | ((ratio > 1.0 + epsilon) & (adv > 0))
  aux["clip_fraction"] = (clipped_tokens * mask).sum() / jnp.maximum(mask.sum(), 1.0)
  aux["completion_length"] = jnp.where(valid, lengths, 0.0).sum() / jnp.maximum(num_sequences, 1.0)
  aux[NUM_TOKENS] = num_sequences
  return loss, aux


def grpo_loss_fn(
    model: nnx.Module,
    train_example: TrainExample,
    beta: float,
    epsilon: float,
    loss_algo: str = "grpo",
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The GRPO loss of ``model`` on a :class:`TrainExample` (one forward pass over prompt and completion).

  Returns ``(loss, aux)``; see :func:`grpo_objective`.
  """
  ex = train_example
  logps = completion_logps(model, ex.prompt_ids, ex.prompt_mask, ex.completion_ids, ex.completion_mask)
  return grpo_objective(
      logps, ex.completion_mask, ex.advantages, ex.old_per_token_logps, ex.ref_per_token_logps,
      beta=beta, epsilon=epsilon, loss_algo=loss_algo,
  )


def compute_advantages(rewards: np.ndarray, num_generations: int) -> np.ndarray:
  """``(r - group mean) / (group std + 1e-4)`` per group of ``num_generations`` consecutive rows (std ddof=1)."""
  rewards = np.asarray(rewards, np.float64)
  if rewards.ndim != 1 or rewards.size % num_generations:
    raise ValueError(f"{rewards.size} rewards do not split into groups of num_generations={num_generations}.")
  groups = rewards.reshape(-1, num_generations)
  mean = groups.mean(axis=1, keepdims=True)
  std = groups.std(axis=1, ddof=1, keepdims=True)
  return ((groups - mean) / (std + ADVANTAGE_EPSILON)).reshape(-1).astype(np.float32)


def _fn_name(fn: Any) -> str:
  return getattr(fn, "__name__", None) or type(fn).__name__


def _is_conversation(prompt: Any) -> bool:
  return isinstance(prompt, (list, tuple)) and bool(prompt) and all(isinstance(m, dict) for m in prompt)


def compute_rewards(
    reward_fns: Sequence[RewardFn],
    prompts: Sequence[Any],
    completions: Sequence[str],
    columns: dict[str, Sequence[Any]] | None = None,
    completion_ids: Any = None,
    completion_mask: Any = None,
) -> np.ndarray:
  """Every function's rewards [N, F] (float32), each checked: a failure names the function.

  Each function is called with keywords, as TRL calls them:
  ``fn(prompts=..., completions=..., completion_ids=..., **columns)``, so both
  ``def reward(completions, **kwargs)`` and ``def reward(prompts, completions, answer, **kwargs)``
  work. When the prompts are conversations (lists of ``{"role", "content"}`` messages), each
  completion is passed as ``[{"role": "assistant", "content": text}]``, as TRL does.
  ``completion_ids`` (lists of generated token ids, EOS included) is passed when known: an
  [N, C] array is cut to each row's ``completion_mask``. Columns named ``prompt``, ``completion``
  or ``completion_ids`` are not passed (TRL's rule: they would clash with the arguments).
  """
  columns = {k: list(v) for k, v in (columns or {}).items() if k not in ("prompt", "completion", "completion_ids")}
  prompts, texts = list(prompts), list(completions)
  conversational = bool(prompts) and _is_conversation(prompts[0])
  shown = [[{"role": "assistant", "content": t}] for t in texts] if conversational else texts
  arguments: dict[str, Any] = {"prompts": prompts, "completions": shown}
  if completion_ids is not None:
    if completion_mask is not None:
      ids, mask = np.asarray(completion_ids), np.asarray(completion_mask).astype(bool)
      arguments["completion_ids"] = [row[m].tolist() for row, m in zip(ids, mask)]
    else:
      arguments["completion_ids"] = [list(np.asarray(row).tolist()) for row in completion_ids]
  out = np.zeros((len(texts), len(reward_fns)), np.float32)
  for j, fn in enumerate(reward_fns):
    name = _fn_name(fn)
    try:
      values = fn(**arguments, **columns)
    except Exception as err:
      raise RuntimeError(
          f"Reward function {name!r} raised {type(err).__name__}: {err}. Reward functions are called with "
          f"keywords {sorted([*arguments, *columns])}; accept the ones you need and **kwargs "
          "(e.g. def reward(completions, **kwargs))."
      ) from err
    try:
      values = np.asarray(list(values), np.float64)
    except (TypeError, ValueError) as err:
      raise TypeError(f"Reward function {name!r} must return a list of numbers, one per completion ({err}).") from err
    if values.shape != (len(texts),):
      raise ValueError(
          f"Reward function {name!r} returned {values.size} value(s) for {len(texts)} completions; "
          "it must return one number per completion."
      )
    if not np.all(np.isfinite(values)):
      raise ValueError(f"Reward function {name!r} returned a non-finite value: {values[~np.isfinite(values)][:4]}.")
    out[:, j] = values
  return out


# ----------------------------------------------------------------------------- the loss in the loop


def _objective(model, train_example, rewards, total_rewards, input_mask=None, *, reward_names, **settings):
  # ``input_mask`` lets the loop count input tokens (tokens/s); the loss ignores it.
  del input_mask
  loss, aux = grpo_loss_fn(model, train_example, **settings)
  rows = jnp.maximum(jnp.asarray(total_rewards.shape[0], jnp.float32), 1.0)
  aux["reward"] = total_rewards.mean()
  aux["reward_std"] = jnp.sqrt(jnp.maximum((total_rewards**2).sum() / rows - aux["reward"] ** 2, 0.0))
  for j, name in enumerate(reward_names):
    aux[f"rewards/{name}"] = rewards[:, j].mean()
  return loss, aux


def _model_inputs(step: _Step) -> dict[str, Any]:
  ex = step.train_example
  mask = jnp.concatenate([jnp.asarray(ex.prompt_mask), jnp.asarray(ex.completion_mask)], axis=1)
  return {"train_example": ex, "rewards": step.rewards, "total_rewards": step.total_rewards, "input_mask": mask}


# ----------------------------------------------------------------------------- data


def _as_prompt_batch(batch: Any) -> tuple[list[Any], dict[str, list[Any]]]:
  """``(prompts, other columns)`` of a batch: a dict of lists with ``"prompts"`` (or ``"prompt"``), or a list of records."""
  if isinstance(batch, dict):
    key = "prompts" if "prompts" in batch else "prompt" if "prompt" in batch else None
    if key is None:
      raise ValueError(f"A GRPO batch needs a 'prompts' entry (a list of prompts); got keys {sorted(batch)}.")
    prompts = list(batch[key])
    columns = {k: list(v) for k, v in batch.items() if k != key}
  elif isinstance(batch, (list, tuple)) and batch and all(isinstance(r, dict) for r in batch):
    if any("prompt" not in r for r in batch):
      raise ValueError("Every GRPO record needs a 'prompt'.")
    prompts = [r["prompt"] for r in batch]
    names = sorted({k for r in batch for k in r} - {"prompt"})
    columns = {k: [r.get(k) for r in batch] for k in names}
  else:
    raise TypeError(
        "GRPO batches must be dicts like {'prompts': [...], 'answer': [...]} or lists of {'prompt': ...} records, "
        f"got {type(batch).__name__}."
    )
  if not prompts:
    raise ValueError("A GRPO batch has no prompts.")
  for name, values in columns.items():
    if len(values) != len(prompts):
      raise ValueError(f"Column {name!r} has {len(values)} entries for {len(prompts)} prompts.")
  return prompts, columns


def _prompt_ids(cluster: RLCluster, prompts: list[Any], columns: dict[str, list[Any]]) -> list[list[int]]:
  """The prompts' token ids: a ``prompt_ids`` column when the batch has one (e.g. chat-rendered), else tokenized."""
  ids = columns.pop(PROMPT_IDS, None)
  return cluster.tokenize_prompts(ids if ids is not None else prompts)


def prompt_batches(
    records: Sequence[dict[str, Any]], batch_size: int, shuffle: bool = True, seed: int = 0,
    drop_remainder: bool = False,
):
  """Groups ``{"prompt", ...}`` records into GRPO batches ``{"prompts": [...], <column>: [...]}`` (re-iterable).

  Each epoch is reshuffled (``set_epoch``). ``drop_remainder`` drops a last
  partial batch (a batch of another size compiles the update step again).
  """
  return _PromptBatches(list(records), batch_size, shuffle, seed, drop_remainder)


class _PromptBatches:
  def __init__(self, records: list[dict[str, Any]], batch_size: int, shuffle: bool, seed: int, drop_remainder: bool):
    if batch_size <= 0:
      raise ValueError(f"batch_size must be positive, got {batch_size}.")
    if not records:
      raise ValueError("No prompt records.")
    if drop_remainder and len(records) < batch_size:
      raise ValueError(f"{len(records)} prompt records make no full batch of {batch_size}.")
    self.records, self.batch_size, self.shuffle, self.seed, self.epoch = records, batch_size, shuffle, seed, 0
    self.drop_remainder = drop_remainder

  def set_epoch(self, epoch: int) -> None:
    self.epoch = epoch

  def __len__(self) -> int:
    return num_batches(len(self.records), self.batch_size, self.drop_remainder)

  def __iter__(self):
    for indices in batch_indices(len(self.records), self.batch_size, shuffle=self.shuffle,
                                 key=(self.seed, self.epoch), drop_remainder=self.drop_remainder):
      chunk = [self.records[i] for i in indices]
      names = sorted({k for r in chunk for k in r} - {"prompt"})
      yield {"prompts": [r["prompt"] for r in chunk], **{k: [r.get(k) for r in chunk] for k in names}}


# ----------------------------------------------------------------------------- the learner


@dataclasses.dataclass
class _Group:
  """The rollouts of ``accumulation`` consecutive prompt batches (one optimizer step's worth)."""

  steps: list[_Step]
  metrics: dict[str, float]


class _Stop(Exception):
  pass


class GrpoLearner:
  """Trains the actor of ``rl_cluster`` with GRPO.

  Args:
    rl_cluster: the :class:`RLCluster` (actor, rollout, reference, tokenizer, training config).
    reward_fns: one reward function or a list; each is called as
      ``fn(prompts=..., completions=..., completion_ids=..., **columns) -> list[float]`` (keywords, as
      TRL calls them; see :func:`compute_rewards`) where ``columns``
      are the batch's other entries (e.g. ``answer``), repeated per completion.
    grpo_config: a :class:`GrpoConfig`.

  ``train(train_ds)`` takes batches of prompts: dicts ``{"prompts": [...],
  "answer": [...]}`` (see :func:`prompt_batches`) or lists of records; a
  ``prompt_ids`` column (token ids, e.g. chat-rendered) is generated from
  instead of tokenizing ``prompts``, which reward functions still see. Each
  batch of B prompts becomes B x num_generations rollouts and one micro-batch
  of the policy update; ``gradient_accumulation_steps`` of them make one
  optimizer step, repeated ``num_iterations`` times. ``max_steps`` in the
  training config counts optimizer steps.
  """

  def __init__(self, rl_cluster: RLCluster, reward_fns: RewardFn | Sequence[RewardFn], grpo_config: GrpoConfig):
    if not isinstance(rl_cluster, RLCluster):
      raise TypeError(f"rl_cluster must be an easytunix.rl.rl_cluster.RLCluster, got {type(rl_cluster).__name__}.")
    if not isinstance(grpo_config, GrpoConfig):
      raise TypeError(f"grpo_config must be a GrpoConfig, got {type(grpo_config).__name__}.")
    fns = list(reward_fns) if isinstance(reward_fns, (list, tuple)) else [reward_fns]
    if not fns:
      raise ValueError("GRPO needs at least one reward function: fn(completions, **kwargs) -> list[float].")
    for fn in fns:
      if not callable(fn):
        raise TypeError(f"Reward functions must be callables, got {fn!r}.")
    weights = grpo_config.reward_weights
    if weights is not None and len(weights) != len(fns):
      raise ValueError(f"GrpoConfig.reward_weights has {len(weights)} entries for {len(fns)} reward functions.")
    if rl_cluster.tokenizer is None:
      raise ValueError("GRPO needs a tokenizer (reward functions read completion text); pass tokenizer= to RLCluster.")
    if not rl_cluster.rollout_config.temperature:
      raise ValueError(
          "RolloutConfig.temperature is 0 (greedy): every completion of a group would be the same and every "
          "advantage 0. Use a temperature > 0 (e.g. 0.9)."
      )
    self.rl_cluster = rl_cluster
    self.reward_fns = fns
    self.reward_weights = np.asarray(weights if weights is not None else [1.0] * len(fns), np.float32)
    names = []
    for fn in fns:
      name = _fn_name(fn)
      while name in names:
        name += "_"
      names.append(name)
    self.reward_names = tuple(names)
    self.grpo_config = grpo_config
    self.trainer = rl_cluster.actor_trainer()
    self.trainer.with_loss_fn(
        functools.partial(
            _objective,
            reward_names=self.reward_names,
            beta=float(grpo_config.beta),
            epsilon=float(grpo_config.epsilon),
            loss_algo=grpo_config.loss_algo,
        ),
        has_aux=True,
    )
    self.trainer.with_gen_model_input_fn(_model_inputs)
    self.trainer.reports_perplexity = False  # the GRPO loss is not a likelihood
    if grpo_config.async_rollout:
      rl_cluster.detach_rollout()
    self.rollout_metrics: list[dict[str, float]] = []
    self._actor_sampler = None  # evaluation's sampler over the actor, when rollouts run on a copy
    # Evaluation draws from its own stream, so scoring mid-training never changes the training rollouts.
    self._eval_rng = np.random.default_rng([rl_cluster.rollout_config.seed, 1])
    self.eval_history: list[tuple[int, dict[str, float]]] = []

  # ------------------------------------------------------------------ rollouts

  @property
  def needs_old_logps(self) -> bool:
    """Whether the sampling policy can differ from the policy being updated (ratio != 1)."""
    return self.grpo_config.num_iterations > 1 or not self.rl_cluster.rollout_is_actor

  def _make_step(
      self, prompts: list[Any], columns: dict[str, list[Any]], ids: list[list[int]], width: int, seed: int
  ) -> tuple[_Step, dict[str, float]]:
    """Rollouts, rewards, advantages and log-probs of one batch of prompts (``ids`` tokenized, ``width`` wide)."""
    cluster, config = self.rl_cluster, self.grpo_config
    start = time.perf_counter()
    g = config.num_generations
    repeated_ids = [p for p in ids for _ in range(g)]
    rollout = cluster.rollout(repeated_ids, seed=seed, width=width)
    repeated_prompts = [p for p in prompts for _ in range(g)]
    repeated_columns = {k: [v for v in values for _ in range(g)] for k, values in columns.items()}
    rewards = compute_rewards(self.reward_fns, repeated_prompts, rollout.text, repeated_columns,
                              completion_ids=rollout.completion_ids, completion_mask=rollout.completion_mask)
    total = rewards @ self.reward_weights
    advantages = compute_advantages(total, g)
    reward_start = time.perf_counter()
    args = (rollout.prompt_ids, rollout.prompt_mask, rollout.completion_ids, rollout.completion_mask)
    ref = cluster.get_ref_per_token_logps(*args) if config.beta else None
    old = cluster.get_old_per_token_logps(*args) if self.needs_old_logps else None
    example = TrainExample(
        prompt_ids=rollout.prompt_ids,
        prompt_mask=rollout.prompt_mask,
        completion_ids=rollout.completion_ids,
        completion_mask=rollout.completion_mask,
        advantages=advantages,
        ref_per_token_logps=ref,
        old_per_token_logps=old,
    )
    step = _Step(train_example=example, rewards=rewards, total_rewards=total.astype(np.float32))
    jax.block_until_ready((ref, old))
    metrics = {
        "rollout/generate_seconds": rollout.seconds,
        "rollout/logps_seconds": time.perf_counter() - reward_start,
        "rollout/seconds": time.perf_counter() - start,
        "rollout/completion_length": float(rollout.completion_mask.sum(1).mean()),
        "rollout/reward": float(total.mean()),
    }
    return step, metrics

  def _groups(self, prompt_batches: Iterator[Any], epoch: int, first: int = 0) -> Iterator[tuple[int, list[Any]]]:
    """``(group index, gradient_accumulation_steps prompt batches)``; a trailing part-group is dropped."""
    accumulation = self.trainer.config.accumulation
    index, batches = first, []
    for batch in prompt_batches:
      batches.append(batch)
      if len(batches) == accumulation:
        yield index, batches
        index, batches = index + 1, []
    if batches:
      logger.warning("Dropped %d trailing prompt batch(es): fewer than gradient_accumulation_steps=%d were left.",
                     len(batches), accumulation)

  def _group_seed(self, epoch: int, index: int, micro: int) -> int:
    """The sampling seed of one rollout batch: fixed by the position in the data, so a resumed run draws the same."""
    rng = np.random.default_rng([self.rl_cluster.rollout_config.seed, epoch, index, micro])
    return int(rng.integers(0, 2**31 - 1))

  def _make_group(self, batches: list[Any], epoch: int = 0, index: int = 0) -> _Group | None:
    """The rollouts of one optimizer step's prompt batches (None when their sizes differ: the step's shapes would)."""
    start = time.perf_counter()
    parsed = []
    for batch in batches:
      prompts, columns = _as_prompt_batch(batch)
      parsed.append((prompts, columns, _prompt_ids(self.rl_cluster, prompts, columns)))
    if len({len(p) for p, _, _ in parsed}) > 1:
      logger.warning(
          "Skipped an optimizer step whose %d prompt batches have different sizes %s (gradient accumulation "
          "needs equal shapes); use prompt_batches(..., drop_remainder=True).", len(parsed), [len(p) for p, _, _ in parsed],
      )
      return None
    longest = max(len(x) for _, _, ids in parsed for x in ids)
    width = max(bucket(longest, 16, self.rl_cluster.rollout_config.max_prompt_length), longest)
    made = [self._make_step(p, c, ids, width, self._group_seed(epoch, index, i)) for i, (p, c, ids) in enumerate(parsed)]
    metrics = {k: float(np.mean([m[k] for _, m in made])) for k in made[0][1]}
    metrics["rollout/seconds"] = time.perf_counter() - start
    return _Group([s for s, _ in made], metrics)

  def prepare_dataset(self, prompt_batches: Iterable[Any], epoch: int = 0) -> Iterator[_Group]:
    """Rollouts, rewards, advantages and log-probs for each optimizer step's batches of prompts.

    Yields one group per ``gradient_accumulation_steps`` prompt batches (the
    rollouts use the rollout model's weights as they are; callers sync them).
    """
    for index, batches in self._groups(iter(prompt_batches), epoch):
      group = self._make_group(batches, epoch, index)
      if group is not None:
        yield group

  # ------------------------------------------------------------------ the stream the trainer consumes

  def rollout_stream(self, train_ds: Iterable[Any], eval_ds: Iterable[Any] | None = None) -> "_RolloutStream":
    """The policy update's micro-batches, made from ``train_ds``'s prompt batches as the trainer asks for them."""
    return _RolloutStream(self, train_ds, eval_ds)

  def train(self, train_ds: Iterable[Any], eval_ds: Iterable[Any] | None = None, skip_jit: bool = False) -> None:
    """Runs GRPO: rollouts and policy updates until ``max_steps`` or the end of ``train_ds``.

    ``eval_ds`` (batches of prompts like ``train_ds``) is scored with
    :meth:`evaluate` every ``GrpoConfig.eval_every_n_steps`` steps and at the end.
    """
    self.rl_cluster.update_actor(self.rollout_stream(train_ds, eval_ds), None, skip_jit)
    if eval_ds is not None:
      self.evaluate(eval_ds)

  # ------------------------------------------------------------------ evaluation

  def evaluate(self, eval_ds: Iterable[Any]) -> dict[str, float]:
    """Mean reward (total and per function) of one completion per prompt at ``eval_temperature`` (greedy: 0).

    Runs the current actor weights; logs ``eval/reward`` and ``eval/rewards/<fn>``.
    """
    cluster = self.rl_cluster
    self.trainer.sync_model()
    sampler = self._eval_sampler()
    totals, per_fn, count = 0.0, np.zeros(len(self.reward_fns)), 0
    for batch in eval_ds:
      prompts, columns = _as_prompt_batch(batch)
      ids = _prompt_ids(cluster, prompts, columns)
      temperature = self.grpo_config.eval_temperature
      config = cluster.rollout_config
      out = sampler(
          ids, config.max_tokens_to_generate, temperature=temperature or None,
          top_p=config.top_p if temperature else None, top_k=config.top_k if temperature else None,
          eos_tokens=cluster.eos_tokens(), seed=int(self._eval_rng.integers(0, 2**31 - 1)),
      )
      rewards = compute_rewards(self.reward_fns, prompts, out.text, columns, completion_ids=out.tokens)
      totals += float((rewards @ self.reward_weights).sum())
      per_fn += rewards.sum(0)
      count += len(prompts)
    if not count:
      return {}
    result = {"reward": totals / count, **{f"rewards/{n}": float(v) / count for n, v in zip(self.reward_names, per_fn)}}
    step = self.trainer.train_steps()
    self.trainer.metrics_logger.log_dict(result, step, mode="eval")
    self.eval_history.append((step, result))
    return result

  def close(self) -> None:
    """Closes the cluster: the trainer's checkpoints and loggers, and a vLLM engine."""
    self.rl_cluster.close()

  def _eval_sampler(self):
    cluster = self.rl_cluster
    if cluster.rollout_is_actor:
      if cluster.uses_vllm:
        cluster.push_to_engine()  # the engine may hold weights from before the last update
      return cluster.rollout_sampler()
    if self._actor_sampler is None:
      from easytunix.generate.sampler import CacheConfig, Sampler

      cache = CacheConfig.for_model(cluster.actor, cache_size=cluster.rollout_config.cache_size())
      self._actor_sampler = Sampler(cluster.actor, cluster.tokenizer, cache)
    return self._actor_sampler


class _RolloutStream:
  """Re-iterable micro-batches of the policy update, produced by rollouts (in a thread when asynchronous)."""

  def __init__(self, learner: GrpoLearner, prompts: Iterable[Any], eval_ds: Iterable[Any] | None):
    self.learner = learner
    self.prompts = prompts
    self.eval_ds = eval_ds
    self.epoch = 0
    self.evaluated_at = learner.trainer.train_steps()

  def set_epoch(self, epoch: int) -> None:
    self.epoch = epoch
    if hasattr(self.prompts, "set_epoch"):
      self.prompts.set_epoch(epoch)

  def __len__(self) -> int:
    accumulation = self.learner.trainer.config.accumulation
    return len(self.prompts) // accumulation * accumulation * self.learner.grpo_config.num_iterations

  def __iter__(self) -> Iterator[Any]:
    learner = self.learner
    trainer = learner.trainer
    accumulation = trainer.config.accumulation
    repeats = learner.grpo_config.num_iterations
    per_group = accumulation * repeats
    epoch, consumed = trainer.data_position
    skip = consumed if epoch == self.epoch else 0
    prompts = iter(self.prompts)
    # On resume, the trainer discards the micro-batches the restored run used:
    # skip whole groups without generating them.
    first = 0
    while skip >= per_group:
      for _ in range(accumulation):
        if next(prompts, None) is None:
          return
      for _ in range(per_group):
        yield None
      skip -= per_group
      first += 1
    grouped = learner._groups(prompts, self.epoch, first)
    groups = self._async_groups(grouped) if learner.grpo_config.async_rollout else self._sync_groups(grouped)
    try:
      for group in groups:
        self._log(group)
        for _ in range(repeats):
          for step in group.steps:
            if skip:
              skip -= 1
              yield None
              continue
            yield step
    finally:
      close = getattr(groups, "close", None)
      if close is not None:
        close()

  def _log(self, group: _Group) -> None:
    learner = self.learner
    trainer = learner.trainer
    step = trainer.train_steps() + 1
    metrics = dict(group.metrics)
    metrics["rollout/weight_sync_seconds"] = learner.rl_cluster.last_sync_seconds
    if learner.rl_cluster.uses_vllm:
      metrics["rollout/engine_sync_seconds"] = learner.rl_cluster.last_engine_sync_seconds
    trainer.metrics_logger.log_dict(metrics, step, mode="train")
    learner.rollout_metrics.append({"step": step, **metrics})
    every = learner.grpo_config.eval_every_n_steps
    done = trainer.train_steps()
    # Groups start every num_iterations steps: evaluate when a multiple of ``every`` was passed since the last check.
    if every and self.eval_ds is not None and done // every > self.evaluated_at // every:
      learner.evaluate(self.eval_ds)
    self.evaluated_at = done

  def _sync_groups(self, grouped: Iterator[tuple[int, list[Any]]]) -> Iterator[_Group]:
    learner = self.learner
    for index, batches in grouped:
      learner.rl_cluster.sync_weights()
      group = learner._make_group(batches, self.epoch, index)
      if group is not None:
        yield group

  def _async_groups(self, grouped: Iterator[tuple[int, list[Any]]]) -> Iterator[_Group]:
    """Groups made by a background thread; group g uses the weights published when group g - 1 started."""
    learner = self.learner
    cluster = learner.rl_cluster
    epoch = self.epoch
    ready: queue.Queue = queue.Queue(maxsize=1)
    versions: dict[int, Any] = {}
    cond = threading.Condition()
    stop = threading.Event()

    def publish(version: int) -> None:
      start = time.perf_counter()
      weights = cluster.snapshot_actor_weights()
      cluster.last_sync_seconds = time.perf_counter() - start
      with cond:
        versions[version] = weights
        for old in [v for v in versions if v < version - 1]:
          del versions[old]
        cond.notify_all()

    def wait_for(version: int) -> Any:
      with cond:
        while version not in versions:
          if stop.is_set():
            raise _Stop
          cond.wait(timeout=0.1)
        return versions[version]

    def put(item: Any) -> None:
      while not stop.is_set():
        try:
          ready.put(item, timeout=0.1)
          return
        except queue.Full:
          continue
      raise _Stop

    def produce() -> None:
      try:
        made = 0
        for index, batches in grouped:
          if stop.is_set():
            return
          weights = wait_for(max(made - 1, 0))
          cluster.load_rollout_weights(weights)
          cluster.num_weight_syncs += 1
          group = learner._make_group(batches, epoch, index)
          if group is not None:
            put(("group", group))
            made += 1
        put(("end", None))
      except _Stop:
        return
      except BaseException as err:  # handed to the training thread, which raises it
        try:
          put(("error", err))
        except _Stop:
          pass

    worker = threading.Thread(target=produce, name="grpo-rollouts", daemon=True)
    publish(0)
    worker.start()
    version = 0
    try:
      while True:
        if version:
          publish(version)
        start = time.perf_counter()
        kind, payload = ready.get()
        waited = time.perf_counter() - start
        if kind == "end":
          return
        if kind == "error":
          raise payload
        payload.metrics["rollout/wait_seconds"] = waited
        version += 1
        yield payload
    finally:
      stop.set()
      with cond:
        cond.notify_all()
      # The thread stops after the group it is making (generation, rewards, log-probs).
      # A vLLM engine must not be stopped under the thread, so with one the wait has no limit.
      worker.join(timeout=None if cluster.uses_vllm else 300)
      if worker.is_alive():
        logger.warning("The rollout thread is still busy (a slow reward function?); leaving it to finish on its own.")


def build_grpo_learner(
    model: nnx.Module,
    optimizer: Any,
    reward_fns: RewardFn | Sequence[RewardFn],
    *,
    tokenizer: Any,
    num_generations: int = 4,
    num_iterations: int = 1,
    beta: float = 0.04,
    epsilon: float = 0.2,
    loss_algo: str = "grpo",
    reward_weights: Sequence[float] | None = None,
    async_rollout: bool = True,
    max_new_tokens: int = 64,
    temperature: float = 0.9,
    top_p: float | None = 1.0,
    top_k: int | None = None,
    max_prompt_length: int = 256,
    reference: nnx.Module | None = None,
    role_to_mesh: dict | None = None,
    rollout_engine: str = "vanilla",
    seed: int = 0,
    **training_config_kwargs: Any,
) -> GrpoLearner:
  """A :class:`GrpoLearner` from flat arguments (what ``model.compile(trainer="grpo", ...)`` calls).

  ``training_config_kwargs`` are :class:`easytunix.sft.peft_trainer.TrainingConfig` fields
  (``eval_every_n_steps`` also sets how often :meth:`GrpoLearner.evaluate` scores ``eval_ds``).
  """
  from easytunix.rl.rl_cluster import ClusterConfig, RLTrainingConfig, RolloutConfig

  cluster_config = ClusterConfig(
      training_config=RLTrainingConfig(actor_optimizer=optimizer, **training_config_kwargs),
      role_to_mesh=role_to_mesh,
      rollout_engine=rollout_engine,
      rollout_config=RolloutConfig(
          max_tokens_to_generate=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
          max_prompt_length=max_prompt_length, seed=seed,
      ),
  )
  cluster = RLCluster(model, reference=reference, tokenizer=tokenizer, cluster_config=cluster_config)
  config = GrpoConfig(
      num_generations=num_generations, num_iterations=num_iterations, beta=beta, epsilon=epsilon,
      loss_algo=loss_algo, reward_weights=None if reward_weights is None else tuple(reward_weights),
      async_rollout=async_rollout, eval_every_n_steps=training_config_kwargs.get("eval_every_n_steps"),
  )
  return GrpoLearner(cluster, reward_fns, config)


__all__ = [
    "LOSS_ALGOS",
    "PROMPT_IDS",
    "GrpoConfig",
    "GrpoLearner",
    "RepeatIterable",
    "RewardFn",
    "TrainExample",
    "build_grpo_learner",
    "compute_advantages",
    "compute_rewards",
    "grpo_loss_fn",
    "grpo_objective",
    "prompt_batches",
]
