"""Hooks that let users add behaviour to :class:`~easytunix.sft.peft_trainer.PeftTrainer`.

Every method is a no-op by default: subclass and override only what you need.
``train_ctx`` is the trainer itself, so a hook can read ``train_ctx.model``,
``train_ctx.config``, ``train_ctx.train_steps()``, ``train_ctx.last_metrics``,
``train_ctx.metrics_logger`` or ``train_ctx.checkpoint_manager``, and end
training early by setting ``train_ctx.stop_training = True``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
  from easytunix.sft.peft_trainer import PeftTrainer


class TrainingHooks:
  """Callbacks at points of the training loop (all no-ops by default).

  ``on_train_step_end`` receives the step's loss as a 0-d ``jax.Array`` so the
  loop does not wait for the device; ``float(train_loss)`` reads it (and waits).
  """

  def on_train_start(self, train_ctx: "PeftTrainer") -> None:
    """Called once in ``train``, after any checkpoint is restored, before the first step."""

  def on_train_end(self, train_ctx: "PeftTrainer") -> None:
    """Called once when ``train`` finishes (max steps reached or data exhausted)."""

  def on_train_step_start(self, train_ctx: "PeftTrainer") -> None:
    """Called before the forward/backward pass of each optimizer step."""

  def on_train_step_end(self, train_ctx: "PeftTrainer", train_loss: Any) -> None:
    """Called after the parameters were updated (and a due checkpoint was saved)."""

  def on_eval_step_start(self, train_ctx: "PeftTrainer") -> None:
    """Called before each evaluation batch."""

  def on_eval_step_end(self, train_ctx: "PeftTrainer", eval_loss: Any) -> None:
    """Called after each evaluation batch with its loss (a 0-d ``jax.Array``)."""


class DataHooks:
  """A data source owned by user code instead of an iterable passed to ``train``.

  When a trainer has data hooks, ``train`` asks them for every batch; returning
  None ends training (or, for eval, ends the evaluation pass). The default
  methods return None.
  """

  def load_next_train_batch(self, train_ctx: "PeftTrainer") -> Any:
    """Returns the next training batch (one micro-batch), or None when there is none."""
    return None

  def load_next_eval_batch(self, train_ctx: "PeftTrainer") -> Any:
    """Returns the next evaluation batch, or None to end the evaluation pass."""
    return None


__all__ = ["DataHooks", "TrainingHooks"]
