"""Direct Preference Optimization (and IPO, hinge/SLiC, robust DPO, ORPO) on the shared training loop.

``DpoTrainer`` is a :class:`easytunix.sft.peft_trainer.PeftTrainer`: it sets the
loss function and the input function and overrides ``_prepare_inputs``; the
loop, accumulation, clipping, checkpoints and metrics are the SFT ones.

* Chosen and rejected rows go through the policy in one forward pass
  (concatenated along the batch, in the traced input function).
* Reference log-probs are computed outside the gradient, on the host side of the
  loop (``_prepare_inputs``), in one forward pass too, or once per dataset with
  :meth:`DpoTrainer.precompute_ref_logps`.
* The reference: ``ref_model`` when given; with LoRA and no ``ref_model``, the
  policy's own base weights with the adapters switched off
  (:func:`easytunix.sft.lora.lora_disabled`), so no second copy exists; with full
  fine-tuning and no ``ref_model``, a snapshot of the initial weights (one copy).
  ORPO needs no reference.

Losses, with ``h = (log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l))`` summed
over response tokens:

* ``sigmoid`` (DPO, Rafailov et al. 2023): ``-log sigmoid(beta h)``; with label
  smoothing eps (conservative DPO): ``-(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)``.
* ``robust`` (rDPO, Chowdhury et al. 2024): ``((1 - eps) (-log sigmoid(beta h)) + eps log sigmoid(-beta h)) / (1 - 2 eps)``.
* ``ipo`` (Azar et al. 2023): ``(h' - 1 / (2 beta))^2`` with ``h'`` from per-token mean log-probs.
* ``hinge`` (SLiC, Zhao et al. 2023): ``max(0, 1 - beta h)``.
* ``orpo`` (Hong et al. 2024, reference-free): ``NLL(y_w) + beta * -log sigmoid(log odds(y_w) - log odds(y_l))``
  with ``odds(y) = p / (1 - p)``, ``p`` the per-token mean probability; ``beta`` is the paper's lambda.

``rpo_alpha`` adds ``rpo_alpha * NLL(y_w)`` (per-token mean) to the other losses
(RPO, Pang et al. 2024): it keeps the chosen responses likely while the margin
grows, which guards against the policy lowering both.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Iterable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from easytunix.layers.cache import positions_from_mask
from easytunix.models.calling import next_token_log_probs
from easytunix.rl.dpo.data import (
    DpoDataset,
    TrainingInput,
    check_lengths,
    dpo_batches,
    process_dpo_record,
)
from easytunix.rl.reference import choose_reference
from easytunix.sft.lora import lora_disabled
from easytunix.sft.peft_trainer import NUM_TOKENS, PeftTrainer, TrainingConfig

logger = logging.getLogger(__name__)

LOSS_TYPES: tuple[str, ...] = ("sigmoid", "robust", "ipo", "hinge", "orpo")
REFERENCE_FREE: frozenset[str] = frozenset({"orpo"})


@dataclasses.dataclass(frozen=True)
class DpoTrainingConfig(TrainingConfig):
  """Training settings plus the preference objective's.

  Attributes:
    beta: strength of the preference term. For DPO/IPO/hinge it is the inverse
      temperature of the implicit reward ``beta * log(pi / ref)`` (smaller keeps the
      policy closer to the reference); for ORPO it is the weight lambda of the
      odds-ratio term next to the chosen NLL.
    label_smoothing: probability eps that a preference label is flipped
      (``sigmoid``: conservative DPO; ``robust``: rDPO). 0 for the other losses.
    max_seq_length: prompt plus response tokens of one pair (the data pipeline
      truncates to it; see :mod:`easytunix.rl.dpo.data`).
    max_prompt_length: the prompt's share of ``max_seq_length`` when a pair is
      too long (None: half).
    loss_type: one of ``LOSS_TYPES``.
    rpo_alpha: weight of the chosen responses' NLL added to the loss (None: none;
      1.0 in the RPO paper). ORPO has its own NLL term.
  """

  beta: float = 0.1
  label_smoothing: float = 0.0
  max_seq_length: int = 2048
  max_prompt_length: int | None = None
  loss_type: str = "sigmoid"
  rpo_alpha: float | None = None

  def __post_init__(self):
    super().__post_init__()
    if self.loss_type not in LOSS_TYPES:
      raise ValueError(f"DpoTrainingConfig.loss_type must be one of {list(LOSS_TYPES)}, got {self.loss_type!r}.")
    if isinstance(self.beta, bool) or not isinstance(self.beta, (int, float)) or not self.beta > 0:
      raise ValueError(f"DpoTrainingConfig.beta must be a number > 0 (typically 0.01 to 0.5), got {self.beta!r}.")
    eps = self.label_smoothing
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0.0 <= eps < 0.5:
      raise ValueError(
          f"DpoTrainingConfig.label_smoothing must be in [0, 0.5) (the probability that a label is flipped), "
          f"got {eps!r}."
      )
    if eps and self.loss_type not in ("sigmoid", "robust"):
      raise ValueError(
          f"label_smoothing={eps} applies to loss_type 'sigmoid' or 'robust' only, not {self.loss_type!r}; "
          "set it to 0.0."
      )
    alpha = self.rpo_alpha
    if alpha is not None:
      if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or alpha < 0:
        raise ValueError(f"DpoTrainingConfig.rpo_alpha must be a number >= 0 or None, got {alpha!r}.")
      if self.loss_type == "orpo":
        raise ValueError("rpo_alpha does not apply to loss_type='orpo', which has its own NLL term; set it to None.")
    check_lengths(self.max_seq_length, self.max_prompt_length)


@flax.struct.dataclass
class TrainExample:
  """What the loss sees: chosen rows then rejected rows, each ``[prompt | response]``.

  Tunix's fields, in our order (keywords work for both). The model is called as
  ``model(input_ids, positions, None, attention_mask)`` (see
  :func:`easytunix.models.calling.call_causal_lm`).

  Attributes:
    input_ids: [2B, T] token ids (rows 0..B-1 chosen, B..2B-1 rejected).
    attention_mask: [2B, T] 1 for real tokens (kept factored for easytunix models), or a
      causal [2B, T, T] mask as Tunix builds it.
    completion_mask: 1 for the response tokens whose log-probs count: [2B, T], or
      [2B, logits_to_keep] covering the last ``logits_to_keep`` columns (Tunix's layout).
    ref_chosen_logps: [B] summed reference log-probs of the chosen responses.
    ref_rejected_logps: [B] the same for the rejected ones.
    positions: [2B, T] position ids (None: counted from each row's first real token).
    logits_to_keep: how many trailing columns hold responses (a static int): only their
      log-probs are computed (None: every column).
  """

  input_ids: jax.Array
  attention_mask: jax.Array
  completion_mask: jax.Array
  ref_chosen_logps: jax.Array
  ref_rejected_logps: jax.Array
  positions: jax.Array | None = None
  logits_to_keep: int | None = flax.struct.field(pytree_node=False, default=None)


def _pad_columns(x: jax.Array, width: int) -> jax.Array:
  return x if x.shape[1] == width else jnp.pad(x, ((0, 0), (0, width - x.shape[1])))


def response_width(batch: TrainingInput) -> int:
  """The response columns of :func:`pair_rows`' rows (the wider of chosen and rejected): ``logits_to_keep``."""
  return int(max(batch.chosen_ids.shape[1], batch.rejected_ids.shape[1]))


def pair_rows(batch: TrainingInput) -> tuple[jax.Array, jax.Array, jax.Array]:
  """``(input_ids, attention_mask, completion_mask)`` [2B, P + R] of a batch: chosen rows, then rejected rows."""
  width = response_width(batch)
  prompt_ids = jnp.asarray(batch.prompt_ids, jnp.int32)
  prompt_mask = jnp.asarray(batch.prompt_mask).astype(jnp.bool_)
  ids, attention, completion = [], [], []
  for tokens, mask in ((batch.chosen_ids, batch.chosen_mask), (batch.rejected_ids, batch.rejected_mask)):
    tokens = _pad_columns(jnp.asarray(tokens, jnp.int32), width)
    mask = _pad_columns(jnp.asarray(mask).astype(jnp.bool_), width)
    ids.append(jnp.concatenate([prompt_ids, tokens], axis=1))
    attention.append(jnp.concatenate([prompt_mask, mask], axis=1))
    completion.append(jnp.concatenate([jnp.zeros_like(prompt_mask), mask], axis=1))
  return jnp.concatenate(ids), jnp.concatenate(attention), jnp.concatenate(completion)


def to_train_example(batch: TrainingInput) -> TrainExample:
  """Builds the loss input from a batch whose reference log-probs are filled in (traced in the step)."""
  if batch.ref_chosen_logps is None or batch.ref_rejected_logps is None:
    raise ValueError("The batch has no reference log-probs; DpoTrainer._prepare_inputs fills them in.")
  input_ids, attention_mask, completion_mask = pair_rows(batch)
  return TrainExample(
      input_ids=input_ids,
      attention_mask=attention_mask,
      completion_mask=completion_mask,
      ref_chosen_logps=jnp.asarray(batch.ref_chosen_logps, jnp.float32),
      ref_rejected_logps=jnp.asarray(batch.ref_rejected_logps, jnp.float32),
      positions=positions_from_mask(attention_mask),
      logits_to_keep=response_width(batch),
  )


def sequence_logps(
    model: nnx.Module,
    input_ids: jax.Array,
    attention_mask: jax.Array,
    completion_mask: jax.Array,
    positions: jax.Array | None = None,
    logits_to_keep: int | None = None,
) -> tuple[jax.Array, jax.Array]:
  """Per row: the summed log-probs of the completion tokens, and how many there are ([N], [N]).

  ``attention_mask`` is [N, T] (padding) or [N, T, T] (causal); ``completion_mask`` is
  [N, T] or [N, logits_to_keep] (see :class:`TrainExample`).
  """
  input_ids = jnp.asarray(input_ids)
  attention_mask = jnp.asarray(attention_mask).astype(jnp.bool_)
  completion_mask = jnp.asarray(completion_mask).astype(jnp.bool_)
  t, width = input_ids.shape[1], completion_mask.shape[1]
  keep = logits_to_keep if logits_to_keep is not None else (width if width < t else t - 1)
  if not 0 < keep < t or width not in (t, keep):
    raise ValueError(
        f"completion_mask [N, {width}] does not fit input_ids [N, {t}] with logits_to_keep={logits_to_keep}: it "
        "covers every column (width T) or the last logits_to_keep columns (0 < logits_to_keep < T)."
    )
  logps = next_token_log_probs(model, input_ids, positions=positions, attention_mask=attention_mask, keep=keep)
  mask = completion_mask[:, -keep:]
  if attention_mask.ndim == 2:
    mask = mask & attention_mask[:, -keep:]
  return jnp.where(mask, logps, 0.0).sum(-1), mask.sum(-1).astype(jnp.float32)


def compute_logps(
    model: nnx.Module,
    input_ids: jax.Array,
    attention_mask: jax.Array,
    completion_mask: jax.Array,
    average_log_prob: bool = False,
    *,
    positions: jax.Array | None = None,
    logits_to_keep: int | None = None,
) -> tuple[jax.Array, jax.Array]:
  """``(chosen_logps, rejected_logps)`` [B] of rows laid out as chosen then rejected (one forward pass).

  Each is the sum of the response tokens' log-probs (their mean with ``average_log_prob``).
  """
  sums, counts = sequence_logps(model, input_ids, attention_mask, completion_mask, positions, logits_to_keep)
  values = sums / jnp.maximum(counts, 1.0) if average_log_prob else sums
  half = input_ids.shape[0] // 2
  return values[:half], values[half:]


def _log1mexp(x: jax.Array) -> jax.Array:
  """log(1 - exp(x)) for x < 0, accurate near 0 and for very negative x."""
  x = jnp.minimum(x, -1e-7)
  return jnp.where(x > -0.6931472, jnp.log(-jnp.expm1(x)), jnp.log1p(-jnp.exp(x)))


def preference_loss(
    policy_chosen_logps: jax.Array,
    policy_rejected_logps: jax.Array,
    ref_chosen_logps: jax.Array,
    ref_rejected_logps: jax.Array,
    chosen_counts: jax.Array,
    rejected_counts: jax.Array,
    *,
    beta: float,
    label_smoothing: float = 0.0,
    loss_type: str = "sigmoid",
    rpo_alpha: float | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The preference loss from summed per-pair log-probs and response token counts ([B] each).

  Pairs with no chosen or no rejected token (padding rows) are ignored; the loss
  is the mean over the others. Returns ``(loss, aux)``; ``aux`` holds the reward
  metrics and ``num_tokens`` = the number of real pairs (the accumulation weight).
  """
  if loss_type not in LOSS_TYPES:
    raise ValueError(f"loss_type must be one of {list(LOSS_TYPES)}, got {loss_type!r}.")
  f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
  pc, pr, rc, rr = map(f32, (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps))
  nc, nr = f32(chosen_counts), f32(rejected_counts)
  valid = (nc > 0) & (nr > 0)
  num_pairs = valid.sum().astype(jnp.float32)
  denominator = jnp.maximum(num_pairs, 1.0)

  def mean(x):
    return jnp.where(valid, x, 0.0).sum() / denominator

  extra: dict[str, jax.Array] = {}
  # The chosen responses' negative log-likelihood per token (ORPO's SFT term, RPO's regulariser).
  nll = -jnp.where(valid, pc, 0.0).sum() / jnp.maximum(jnp.where(valid, nc, 0.0).sum(), 1.0)
  if loss_type == "orpo":
    mean_c, mean_r = pc / jnp.maximum(nc, 1.0), pr / jnp.maximum(nr, 1.0)
    log_odds = (mean_c - mean_r) - (_log1mexp(mean_c) - _log1mexp(mean_r))
    odds_ratio_loss = mean(-jax.nn.log_sigmoid(log_odds))
    loss = nll + beta * odds_ratio_loss
    reward_c, reward_r = beta * mean_c, beta * mean_r
    extra = {"nll": nll, "log_odds_ratio": mean(log_odds), "odds_ratio_loss": odds_ratio_loss}
  else:
    if loss_type == "ipo":
      chosen_ratio, rejected_ratio = (pc - rc) / jnp.maximum(nc, 1.0), (pr - rr) / jnp.maximum(nr, 1.0)
    else:
      chosen_ratio, rejected_ratio = pc - rc, pr - rr
    h = chosen_ratio - rejected_ratio
    eps = label_smoothing
    if loss_type == "sigmoid":
      losses = -(1.0 - eps) * jax.nn.log_sigmoid(beta * h) - eps * jax.nn.log_sigmoid(-beta * h)
    elif loss_type == "robust":
      losses = (-(1.0 - eps) * jax.nn.log_sigmoid(beta * h) + eps * jax.nn.log_sigmoid(-beta * h)) / (1.0 - 2.0 * eps)
    elif loss_type == "ipo":
      losses = (h - 1.0 / (2.0 * beta)) ** 2
    else:  # hinge
      losses = jax.nn.relu(1.0 - beta * h)
    loss = mean(losses)
    if rpo_alpha is not None:
      loss = loss + rpo_alpha * nll
      extra = {"nll": nll}
    reward_c, reward_r = beta * chosen_ratio, beta * rejected_ratio
  aux = {
      "rewards/chosen": mean(reward_c),
      "rewards/rejected": mean(reward_r),
      "rewards/margins": mean(reward_c - reward_r),
      "rewards/accuracies": mean((reward_c > reward_r).astype(jnp.float32)),
      "logps/chosen": mean(pc),
      "logps/rejected": mean(pr),
      **extra,
      NUM_TOKENS: num_pairs,
  }
  return loss, aux


def dpo_loss_fn(
    model: nnx.Module,
    train_example: TrainExample,
    beta: float,
    label_smoothing: float,
    loss_type: str = "sigmoid",
    rpo_alpha: float | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The preference loss of ``model`` on a :class:`TrainExample`: one forward pass over chosen and rejected rows.

  Returns ``(loss, aux)`` with ``rewards/{chosen,rejected,margins,accuracies}`` (TRL's names),
  ``logps/{chosen,rejected}`` and ``num_tokens`` (real pairs); see
  :func:`preference_loss` and the module docstring for the formulas.
  """
  ex = train_example
  sums, counts = sequence_logps(
      model, ex.input_ids, ex.attention_mask, ex.completion_mask, ex.positions, ex.logits_to_keep
  )
  half = sums.shape[0] // 2
  return preference_loss(
      sums[:half], sums[half:], ex.ref_chosen_logps, ex.ref_rejected_logps, counts[:half], counts[half:],
      beta=beta, label_smoothing=label_smoothing, loss_type=loss_type, rpo_alpha=rpo_alpha,
  )


def _objective(model, train_example, input_mask=None, **settings):
  # ``input_mask`` is only there so the loop counts input tokens (tokens/s); the loss ignores it.
  del input_mask
  return dpo_loss_fn(model, train_example, **settings)


def _model_inputs(batch: TrainingInput) -> dict[str, Any]:
  example = to_train_example(batch)
  return {"train_example": example, "input_mask": example.attention_mask}


def _pure_state(module: nnx.Module) -> Any:
  return nnx.as_pure(nnx.state(module))


class DpoTrainer(PeftTrainer):
  """Preference tuning of ``model`` against a fixed reference, on the shared training loop.

  Args:
    model: the policy, trained in place (its LoRA adapters when it has them).
    ref_model: the fixed reference. None: with LoRA, the policy's base weights
      with the adapters off (no second copy); without LoRA, a snapshot of the
      policy's weights as they are now (one copy of the weights). Ignored by ORPO.
    optimizer: an ``optax.GradientTransformation``.
    training_config: a :class:`DpoTrainingConfig`.

  Batches are :class:`TrainingInput` s (see :func:`dpo_batches`); every metric
  of :func:`dpo_loss_fn` is logged as ``train/...`` and ``eval/...``.
  """

  def __init__(
      self,
      model: nnx.Module,
      ref_model: nnx.Module | None,
      optimizer: optax.GradientTransformation,
      training_config: DpoTrainingConfig,
  ):
    if not isinstance(training_config, DpoTrainingConfig):
      raise TypeError(
          "DpoTrainer needs an easytunix.rl.dpo.dpo_trainer.DpoTrainingConfig (it has beta, loss_type, ...), "
          f"got {type(training_config).__name__}."
      )
    loss_type = training_config.loss_type
    needed = loss_type not in REFERENCE_FREE
    if not needed and ref_model is not None and ref_model is not model:
      logger.warning("loss_type=%r needs no reference model; ref_model is ignored.", loss_type)
    # Before PeftTrainer restores a checkpoint into the model: a snapshot holds the initial weights.
    choice = choose_reference(model, ref_model, needed=needed, name="ref_model")
    self.reference, self.ref_model = choice.kind, choice.model
    self.num_ref_traces = 0
    self._ref_fn = None
    super().__init__(model, optimizer, training_config)
    self.with_loss_fn(
        functools.partial(
            _objective,
            beta=float(training_config.beta),
            label_smoothing=float(training_config.label_smoothing),
            loss_type=loss_type,
            rpo_alpha=None if training_config.rpo_alpha is None else float(training_config.rpo_alpha),
        ),
        has_aux=True,
    )
    self.with_gen_model_input_fn(_model_inputs)
    self.reports_perplexity = False  # a preference loss is not a likelihood

  def clear_jit_cache(self) -> None:
    """Drops the compiled train/eval steps and the compiled reference pass."""
    super().clear_jit_cache()
    self._ref_fn = None

  # ----------------------------------------------------------------- reference

  def _reference_module(self) -> nnx.Module:
    return self.model if self.reference == "lora_disabled" else self.ref_model

  def _reference_fn(self):
    """The compiled ``(state, batch) -> (ref_chosen, ref_rejected)`` of the reference (built once)."""
    if self._ref_fn is None:
      graphdef = nnx.graphdef(self._reference_module())
      adapters_off = self.reference == "lora_disabled"

      def reference_logps(state, batch):
        self.num_ref_traces += 1
        model = nnx.merge(graphdef, state)
        input_ids, attention_mask, completion_mask = pair_rows(batch)
        args = (input_ids, attention_mask, completion_mask, None, response_width(batch))
        if adapters_off:
          with lora_disabled(model):
            sums, _ = sequence_logps(model, *args)
        else:
          sums, _ = sequence_logps(model, *args)
        sums = jax.lax.stop_gradient(sums)
        half = input_ids.shape[0] // 2
        return sums[:half], sums[half:]

      self._ref_fn = jax.jit(reference_logps)
    return self._ref_fn

  def compute_ref_logps(self, batch: TrainingInput) -> tuple[jax.Array, jax.Array]:
    """The reference's summed log-probs ``(chosen, rejected)`` [B] of a batch (one forward pass, no gradient)."""
    if self.reference == "none":
      rows = np.shape(batch.prompt_ids)[0]
      return jnp.zeros((rows,), jnp.float32), jnp.zeros((rows,), jnp.float32)
    refs_free = batch.replace(ref_chosen_logps=None, ref_rejected_logps=None)
    placed = self._place_batch(refs_free, stacked=False)
    return self._reference_fn()(_pure_state(self._reference_module()), placed)

  def _prepare_inputs(self, batch: Any) -> TrainingInput:
    if not isinstance(batch, TrainingInput):
      raise TypeError(
          f"DpoTrainer batches must be easytunix.rl.dpo.TrainingInput, got {type(batch).__name__}. Turn "
          "{'prompt', 'chosen', 'rejected'} records into batches with easytunix.rl.dpo.dpo_batches(...)."
      )
    if batch.ref_chosen_logps is not None and batch.ref_rejected_logps is not None:
      return batch
    chosen, rejected = self.compute_ref_logps(batch)
    return batch.replace(ref_chosen_logps=chosen, ref_rejected_logps=rejected)

  def precompute_ref_logps(self, dataset: Iterable[TrainingInput]) -> Any:
    """Computes the reference log-probs once, so training skips the reference forward pass.

    A :class:`DpoDataset` gets them stored per pair (it keeps shuffling each
    epoch) and is returned; any other iterable of batches is returned as a list
    of batches with the log-probs filled in. With ORPO there is nothing to do.
    """
    if self.reference == "none":
      return dataset
    if isinstance(dataset, DpoDataset):
      chosen = np.zeros(len(dataset.pairs), np.float32)
      rejected = np.zeros(len(dataset.pairs), np.float32)
      dataset.ref_chosen_logps = dataset.ref_rejected_logps = None
      for indices, batch in dataset.ordered_batches():
        c, r = jax.device_get(self.compute_ref_logps(batch))
        chosen[indices], rejected[indices] = np.asarray(c)[: len(indices)], np.asarray(r)[: len(indices)]
      dataset.set_ref_logps(chosen, rejected)
      return dataset
    out = []
    for batch in dataset:
      c, r = jax.device_get(self.compute_ref_logps(batch))
      out.append(batch.replace(ref_chosen_logps=np.asarray(c), ref_rejected_logps=np.asarray(r)))
    return out


def build_dpo_trainer(
    model: nnx.Module,
    optimizer: optax.GradientTransformation,
    *,
    ref_model: nnx.Module | None = None,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    max_length: int = 2048,
    max_prompt_length: int | None = None,
    rpo_alpha: float | None = None,
    **training_config_kwargs: Any,
) -> DpoTrainer:
  """A :class:`DpoTrainer` from flat arguments (what ``model.compile(trainer="dpo", ...)`` calls).

  ``training_config_kwargs`` are :class:`easytunix.sft.peft_trainer.TrainingConfig`
  fields (``max_steps``, ``eval_every_n_steps``, ``gradient_accumulation_steps``, ...).
  Apply LoRA to ``model`` before calling to train adapters against the base weights.
  """
  config = DpoTrainingConfig(
      beta=beta,
      loss_type=loss_type,
      label_smoothing=label_smoothing,
      max_seq_length=max_length,
      max_prompt_length=max_prompt_length,
      rpo_alpha=rpo_alpha,
      **training_config_kwargs,
  )
  return DpoTrainer(model, ref_model, optimizer, config)


__all__ = [
    "LOSS_TYPES",
    "DpoTrainer",
    "DpoTrainingConfig",
    "TrainExample",
    "TrainingInput",
    "build_dpo_trainer",
    "compute_logps",
    "dpo_batches",
    "dpo_loss_fn",
    "pair_rows",
    "preference_loss",
    "process_dpo_record",
    "response_width",
    "sequence_logps",
    "to_train_example",
]
