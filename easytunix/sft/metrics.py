"""Training metrics: TensorBoard event files, an in-memory history and a progress bar."""

from __future__ import annotations

import dataclasses
import enum
import math
import numbers
from collections import defaultdict
from typing import Any

import numpy as np

from easytunix.distributed import is_main_process


class Mode(str, enum.Enum):
  """The phase a metric belongs to (a str: ``Mode.TRAIN == "train"``)."""

  TRAIN = "train"
  EVAL = "eval"

  def __str__(self) -> str:
    return self.value


@dataclasses.dataclass(frozen=True)
class MetricsLoggerOptions:
  """Where and how often metrics are written.

  Attributes:
    log_dir: folder for TensorBoard event files (None: keep metrics in memory only).
    flush_every_n_steps: flush the event file every this many logged steps.
  """

  log_dir: str | None = None
  flush_every_n_steps: int = 100

  def __post_init__(self):
    if not isinstance(self.flush_every_n_steps, int) or self.flush_every_n_steps <= 0:
      raise ValueError(f"flush_every_n_steps must be a positive int, got {self.flush_every_n_steps!r}.")


def _scalar(value: Any) -> float | None:
  """A Python float for a 0-d number or array; None for anything else."""
  if isinstance(value, numbers.Number):
    return float(value)
  arr = np.asarray(value)
  if arr.ndim == 0 and np.issubdtype(arr.dtype, np.number):
    return float(arr)
  return None


class MetricsLogger:
  """Logs scalars under ``"<mode>/<name>"`` tags (``train/loss``, ``eval/loss``...).

  Every value is kept in :attr:`history` (``{tag: [(step, value), ...]}``) and,
  when ``options.log_dir`` is set, written to a tensorboardX event file there
  (by process 0 only when ``jax.distributed`` runs several processes).

  Args:
    metrics_logger_options: a :class:`MetricsLoggerOptions` (None: in memory only).
    options: the same (easytunix's older keyword).
  """

  def __init__(self, metrics_logger_options: MetricsLoggerOptions | None = None, *, options=None):
    self.options = metrics_logger_options or options or MetricsLoggerOptions()
    self.history: dict[str, list[tuple[int, float]]] = defaultdict(list)
    self._writer = None
    self._since_flush = 0
    if self.options.log_dir and is_main_process():  # one event file per job, not one per host
      from tensorboardX import SummaryWriter

      self._writer = SummaryWriter(logdir=self.options.log_dir, flush_secs=3600)

  def log(self, metric_name: str, scalar_value: Any, mode: Mode | str = "train", step: int | None = None) -> None:
    """Records one scalar (Tunix's argument order); values that are not 0-d numbers are ignored.

    ``log(name, value, step)`` and ``log(name, value, step, mode)`` (easytunix's
    older order) work too: an int in the third place is the step.
    """
    if not isinstance(mode, str):  # log(name, value, step[, mode])
      mode, step = ("train" if step is None else step), mode
    scalar = _scalar(scalar_value)
    if scalar is None:
      return
    tag = f"{mode}/{metric_name}"
    step = 0 if step is None else int(step)
    self.history[tag].append((step, scalar))
    if self._writer is not None:
      self._writer.add_scalar(tag, scalar, step)

  def log_dict(self, metrics: dict[str, Any], step: int, mode: Mode | str = "train") -> None:
    """Logs every scalar of ``metrics`` and counts one step towards the next flush."""
    for name, value in metrics.items():
      self.log(name, value, mode, step)
    self._since_flush += 1
    if self._since_flush >= self.options.flush_every_n_steps:
      self.flush()

  def metric_exists(self, metric_name: str, mode: Mode | str = "train") -> bool:
    """Whether anything was logged under ``mode/metric_name``."""
    return bool(self.history.get(f"{mode}/{metric_name}"))

  def get_metric_history(self, metric_name: str, mode: Mode | str = "train") -> np.ndarray:
    """Every value logged under ``mode/metric_name``, in order (a 1-D array).

    Raises:
      ValueError: nothing was logged under that name; the message lists what was.
    """
    if not self.metric_exists(metric_name, mode):
      known = sorted(t.split("/", 1)[1] for t, v in self.history.items() if v and t.startswith(f"{mode}/"))
      raise ValueError(f"Metric {metric_name!r} not found for mode {str(mode)!r}. Logged metrics: {known}.")
    return np.asarray(self.values(metric_name, mode))

  def get_metric(self, metric_name: str, mode: Mode | str = "train") -> float:
    """The mean of every value logged under ``mode/metric_name`` (the geometric mean for perplexity)."""
    values = self.get_metric_history(metric_name, mode)
    if metric_name == "perplexity":
      return float(np.exp(np.mean(np.log(values))))
    return float(np.mean(values))

  def latest(self, name: str, mode: Mode | str = "train") -> float | None:
    """The most recent value logged under ``mode/name``, or None."""
    values = self.history.get(f"{mode}/{name}")
    return values[-1][1] if values else None

  def values(self, name: str, mode: Mode | str = "train") -> list[float]:
    """Every value logged under ``mode/name``, in order."""
    return [v for _, v in self.history.get(f"{mode}/{name}", [])]

  def flush(self) -> None:
    self._since_flush = 0
    if self._writer is not None:
      self._writer.flush()

  def close(self) -> None:
    if self._writer is not None:
      self._writer.flush()
      self._writer.close()
      self._writer = None


def perplexity(loss: float) -> float:
  """``exp(loss)``, capped to stay finite."""
  return math.exp(min(loss, 80.0))


class ProgressBar:
  """A tqdm bar over optimizer steps showing loss and tokens/s (disabled with ``enabled=False``)."""

  def __init__(self, total: int | None, initial: int = 0, description: str = "Training", enabled: bool = True):
    self._bar = None
    if enabled:
      from tqdm.auto import tqdm

      self._bar = tqdm(total=total, initial=initial, desc=description, unit="step", dynamic_ncols=True)

  def update(self, step: int, metrics: dict[str, float]) -> None:
    if self._bar is None:
      return
    shown = {}
    for key in ("loss", "eval_loss", "tokens_per_second"):
      if metrics.get(key) is not None:
        shown[key.replace("tokens_per_second", "tok/s")] = f"{metrics[key]:.4g}"
    self._bar.set_postfix(shown, refresh=False)
    self._bar.update(max(0, step - self._bar.n))

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()
      self._bar = None


__all__ = ["MetricsLogger", "MetricsLoggerOptions", "Mode", "ProgressBar", "perplexity"]
