"""Tunix's module path ``tunix.sft.profiler``: trace a window of training steps with ``jax.profiler``.

``PeftTrainer`` traces the window of ``TrainingConfig.profiler_options`` by
itself; :class:`Profiler` is the same window for a loop of your own.
"""

from __future__ import annotations

import logging

import jax

from easytunix.sft.peft_trainer import ProfilerOptions

__all__ = ["Profiler", "ProfilerOptions"]

logger = logging.getLogger(__name__)


class Profiler:
  """Starts a ``jax.profiler`` trace at one step and stops it some steps later.

  Tracing starts at ``initial_step + skip_first_n_steps`` and stops
  ``profiler_steps`` later (no later than ``max_step``). Only process 0 traces;
  with ``profiler_options=None`` every method does nothing.

  Args:
    initial_step: the step the loop starts (or resumes) at.
    max_step: the last step of the run (None: unbounded).
    profiler_options: where to write the trace and which steps to trace.

  Example::

    profiler = Profiler(0, max_steps, ProfilerOptions(log_dir="/tmp/trace"))
    for step in range(max_steps):
      if profiler.should_activate(step):
        profiler.activate()
      train_step()
      if profiler.should_deactivate(step):
        profiler.deactivate()
  """

  def __init__(self, initial_step: int, max_step: int | None, profiler_options: ProfilerOptions | None):
    self._options = profiler_options
    self._enabled = profiler_options is not None and jax.process_index() == 0
    self._active = False
    if profiler_options is None:
      self.first_step = self.last_step = None
      return
    self.first_step = int(initial_step) + int(profiler_options.skip_first_n_steps)
    last = self.first_step + int(profiler_options.profiler_steps)
    self.last_step = last if max_step is None else min(last, int(max_step))

  @property
  def active(self) -> bool:
    """Whether a trace is running."""
    return self._active

  def should_activate(self, step: int) -> bool:
    """Whether tracing starts at ``step``."""
    return self._enabled and not self._active and step == self.first_step

  def should_deactivate(self, step: int) -> bool:
    """Whether tracing stops at ``step``."""
    return self._enabled and self._active and step == self.last_step

  def activate(self) -> None:
    """Starts the trace (no-op when disabled or already running)."""
    if not self._enabled or self._active:
      return
    logger.info("Starting the JAX profiler, writing to %s.", self._options.log_dir)
    jax.profiler.start_trace(self._options.log_dir)
    self._active = True

  def deactivate(self) -> None:
    """Stops the trace (no-op when none is running)."""
    if not self._active:
      return
    logger.info("Stopping the JAX profiler.")
    jax.profiler.stop_trace()
    self._active = False
