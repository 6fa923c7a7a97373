"""Keras-style callbacks for ``model.fit``.

Every method has a no-op default, so a callback overrides only what it needs::

    class PrintLoss(Callback):
      def on_train_batch_end(self, batch, logs=None):
        print(batch, logs["loss"])

``logs`` is a dict of floats: ``loss``, ``learning_rate``, ``grad_norm``,
``tokens_per_second`` (from the second step of a ``fit``: the first one compiles),
``step`` (and the trainer's extra metrics, e.g. DPO's ``rewards/accuracies``) after
each batch; the epoch means of every metric, and ``val_*`` for validation, after
each epoch. To stop training, a callback sets ``self.model.stop_training = True``.
The facade drives these through the core trainer's ``TrainingHooks``.

With several processes (``easytunix.distributed``) every process runs its callbacks with the
same logs; the built-in ones that write (progress output, CSV, TensorBoard) write on process 0 only.
"""

from __future__ import annotations

import csv
import logging
import math
import operator
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import jax
import numpy as np
from flax import nnx

from easytunix.distributed import is_main_process

logger = logging.getLogger(__name__)

Logs = dict[str, Any]


class Callback:
  """Base class: every hook is a no-op. ``self.model`` is the model being fit."""

  def __init__(self) -> None:
    self.model = None
    self.params: dict[str, Any] = {}

  def set_model(self, model: Any) -> None:
    self.model = model

  def set_params(self, params: dict[str, Any]) -> None:
    self.params = params

  def on_train_begin(self, logs: Logs | None = None) -> None:
    """Once, before the first step."""

  def on_train_end(self, logs: Logs | None = None) -> None:
    """Once, after the last step (also when a callback stopped training)."""

  def on_epoch_begin(self, epoch: int, logs: Logs | None = None) -> None:
    """Before the first batch of ``epoch`` (0-based)."""

  def on_epoch_end(self, epoch: int, logs: Logs | None = None) -> None:
    """After ``epoch``; ``logs`` holds the epoch's mean ``loss`` and ``val_*`` metrics."""

  def on_train_batch_begin(self, batch: int, logs: Logs | None = None) -> None:
    """Before optimizer step ``batch`` of the current epoch."""

  def on_train_batch_end(self, batch: int, logs: Logs | None = None) -> None:
    """After optimizer step ``batch``; ``logs['loss']`` is that step's loss."""

  def on_test_begin(self, logs: Logs | None = None) -> None:
    """Before an evaluation (validation during fit, or ``evaluate``)."""

  def on_test_end(self, logs: Logs | None = None) -> None:
    """After an evaluation; ``logs`` holds its metrics."""


class CallbackList(Callback):
  """Calls every callback in order."""

  def __init__(self, callbacks: Iterable[Callback] = ()):
    super().__init__()
    self.callbacks = list(callbacks)
    for cb in self.callbacks:
      if not isinstance(cb, Callback):
        raise TypeError(f"callbacks must be easytunix.callbacks.Callback instances, got {type(cb).__name__}.")

  def _each(name: str):  # noqa: N805
    def call(self, *args, **kwargs):
      for cb in self.callbacks:
        getattr(cb, name)(*args, **kwargs)

    call.__name__ = name
    return call

  set_model = _each("set_model")
  on_train_begin = _each("on_train_begin")
  on_train_end = _each("on_train_end")
  on_epoch_begin = _each("on_epoch_begin")
  on_epoch_end = _each("on_epoch_end")
  on_train_batch_begin = _each("on_train_batch_begin")
  on_train_batch_end = _each("on_train_batch_end")
  on_test_begin = _each("on_test_begin")
  on_test_end = _each("on_test_end")
  del _each

  def set_params(self, params: dict[str, Any]) -> None:
    """Gives every callback the same ``params`` dict (so updates during ``fit`` reach them all)."""
    self.params = params
    for cb in self.callbacks:
      cb.set_params(params)


class History(Callback):
  """Records what ``fit`` logged.

  Attributes:
    history: one list per metric, one value per epoch: the epoch means of every training
      metric (``loss``, DPO's ``rewards/accuracies``, GRPO's ``reward``...) and the
      validation metrics as ``val_*``.
    epoch: the epochs recorded (0-based).
    steps: one dict per optimizer step, like TRL's ``log_history``:
      ``{"step": 3, "epoch": 0, "loss": ..., ...}``.
  """

  def __init__(self) -> None:
    super().__init__()
    self.history: dict[str, list[float]] = {}
    self.epoch: list[int] = []
    self.steps: list[dict[str, float]] = []

  def on_train_begin(self, logs=None):
    self.history, self.epoch, self.steps = {}, [], []

  def on_train_batch_end(self, batch, logs=None):
    self.steps.append({"step": (logs or {}).get("step", len(self.steps) + 1), "epoch": self.params.get("epoch", 0),
                       **{k: v for k, v in (logs or {}).items() if k != "step"}})

  def on_epoch_end(self, epoch, logs=None):
    self.epoch.append(epoch)
    for key, value in (logs or {}).items():
      self.history.setdefault(key, []).append(value)


class LambdaCallback(Callback):
  """A callback from plain functions, e.g. ``LambdaCallback(on_train_batch_end=lambda b, logs: ...)``."""

  def __init__(self, **hooks: Callable[..., Any]):
    super().__init__()
    known = {n for n in dir(Callback) if n.startswith("on_")}
    unknown = set(hooks) - known
    if unknown:
      raise ValueError(f"LambdaCallback got unknown hooks {sorted(unknown)}; known: {sorted(known)}.")
    for name, fn in hooks.items():
      setattr(self, name, fn)


class TerminateOnNaN(Callback):
  """Stops training as soon as a batch loss is NaN or infinite."""

  def on_train_batch_end(self, batch, logs=None):
    loss = (logs or {}).get("loss")
    if loss is not None and not math.isfinite(loss):
      if is_main_process():
        print(f"Batch {batch}: invalid loss {loss}, terminating training.")
      self.model.stop_training = True


def _monitor_op(mode: str, monitor: str) -> tuple[Callable[[float, float], bool], float]:
  if mode not in ("auto", "min", "max"):
    raise ValueError(f"mode must be 'auto', 'min' or 'max', got {mode!r}.")
  if mode == "max" or (mode == "auto" and ("acc" in monitor or monitor.endswith("reward"))):
    return operator.gt, -math.inf
  return operator.lt, math.inf


def _trainable_state(model) -> nnx.State:
  from easytunix.sft.lora import trainable_filter

  return nnx.state(model, trainable_filter(model))


def _host_copy(state: nnx.State) -> Any:
  return jax.tree.map(lambda x: np.array(x), nnx.to_pure_dict(state))


class EarlyStopping(Callback):
  """Stops when ``monitor`` has not improved by ``min_delta`` for ``patience`` epochs.

  Args:
    monitor: a key of the epoch logs ("val_loss", "loss", ...).
    min_delta: smallest change that counts as an improvement.
    patience: epochs without improvement before stopping.
    mode: "min", "max" or "auto" (max for accuracies and rewards).
    restore_best_weights: at the end, put back the trainable weights of the best epoch.
    start_from_epoch: epochs to wait before monitoring.
  """

  def __init__(self, monitor: str = "val_loss", min_delta: float = 0.0, patience: int = 0, mode: str = "auto",
               restore_best_weights: bool = False, start_from_epoch: int = 0):
    super().__init__()
    self.monitor, self.min_delta, self.patience = monitor, abs(min_delta), patience
    self.restore_best_weights, self.start_from_epoch = restore_best_weights, start_from_epoch
    self._op, self._init = _monitor_op(mode, monitor)
    self.stopped_epoch = None
    self.best_epoch = None

  def on_train_begin(self, logs=None):
    self.wait, self.best, self.best_weights, self.stopped_epoch, self.best_epoch = 0, self._init, None, None, None

  def _improved(self, value: float) -> bool:
    delta = -self.min_delta if self._op is operator.lt else self.min_delta
    return self._op(value - delta, self.best)

  def on_epoch_end(self, epoch, logs=None):
    value = (logs or {}).get(self.monitor)
    if value is None:
      logger.warning("EarlyStopping: %r is not in the epoch logs (%s).", self.monitor, sorted(logs or {}))
      return
    if epoch < self.start_from_epoch:
      return
    if self._improved(value):
      self.best, self.best_epoch, self.wait = value, epoch, 0
      if self.restore_best_weights:
        self.best_weights = _host_copy(_trainable_state(self.model))
      return
    self.wait += 1
    if self.wait >= self.patience:
      self.stopped_epoch = epoch
      self.model.stop_training = True

  def on_train_end(self, logs=None):
    if self.restore_best_weights and self.best_weights is not None and self.stopped_epoch is not None:
      state = _trainable_state(self.model)
      nnx.replace_by_pure_dict(state, jax.tree.map(jax.numpy.asarray, self.best_weights))
      nnx.update(self.model, state)


class ModelCheckpoint(Callback):
  """Saves the trainable weights with Orbax.

  Args:
    filepath: a folder; may hold ``{epoch}``, ``{step}`` or log keys (``{val_loss:.3f}``).
    monitor: the log key compared with ``save_best_only``.
    save_best_only: save only when ``monitor`` improves (the newest best overwrites ``filepath``
      when it has no placeholders).
    mode: "min", "max" or "auto".
    save_freq: "epoch", or an int: every that many steps (with the batch logs).

  ``ModelCheckpoint.restore(model, path)`` loads a saved folder back into a model.
  """

  def __init__(self, filepath: str | Path, monitor: str = "val_loss", save_best_only: bool = False,
               mode: str = "auto", save_freq: str | int = "epoch"):
    super().__init__()
    if save_freq != "epoch" and not (isinstance(save_freq, int) and save_freq > 0):
      raise ValueError(f"save_freq must be 'epoch' or a positive int, got {save_freq!r}.")
    self.filepath, self.monitor, self.save_best_only, self.save_freq = str(filepath), monitor, save_best_only, save_freq
    self._op, self.best = _monitor_op(mode, monitor)
    self.saved: list[str] = []
    self._step = 0

  def on_train_begin(self, logs=None):
    self._step = 0

  def _maybe_save(self, epoch: int, logs: Logs) -> None:
    if self.save_best_only:
      value = logs.get(self.monitor)
      if value is None:
        logger.warning("ModelCheckpoint: %r is not in the logs (%s); not saving.", self.monitor, sorted(logs))
        return
      if not (math.isfinite(value) and self._op(value, self.best)):
        return
      self.best = value
    path = Path(self.filepath.format(**{**logs, "epoch": epoch, "step": self._step})).absolute()
    self.save(self.model, path)
    self.saved.append(str(path))

  @staticmethod
  def save(model, path: str | Path) -> None:
    import orbax.checkpoint as ocp

    path = Path(path).absolute()
    with ocp.StandardCheckpointer() as checkpointer:
      checkpointer.save(path, nnx.to_pure_dict(_trainable_state(model)), force=True)

  @staticmethod
  def restore(model, path: str | Path) -> None:
    """Loads trainable weights saved by :meth:`save` into ``model`` in place."""
    import orbax.checkpoint as ocp

    state = _trainable_state(model)
    target = nnx.to_pure_dict(state)
    with ocp.StandardCheckpointer() as checkpointer:
      restored = checkpointer.restore(Path(path).absolute(), target)
    nnx.replace_by_pure_dict(state, restored)
    nnx.update(model, state)

  def on_train_batch_end(self, batch, logs=None):
    self._step += 1
    if isinstance(self.save_freq, int) and self._step % self.save_freq == 0:
      self._maybe_save(self.params.get("epoch", 0), dict(logs or {}))

  def on_epoch_end(self, epoch, logs=None):
    if self.save_freq == "epoch":
      self._maybe_save(epoch, dict(logs or {}))


class CSVLogger(Callback):
  """Writes one row of epoch logs per epoch to ``filename``."""

  def __init__(self, filename: str | Path, separator: str = ",", append: bool = False):
    super().__init__()
    self.filename, self.separator, self.append = Path(filename), separator, append
    self._keys: list[str] | None = None

  def on_train_begin(self, logs=None):
    self._keys = None
    if not self.append and self.filename.exists() and is_main_process():
      self.filename.unlink()

  def on_epoch_end(self, epoch, logs=None):
    if not is_main_process():  # one file per job
      return
    logs = dict(logs or {})
    new = not self.filename.exists() or self.filename.stat().st_size == 0
    if self._keys is None:
      self._keys = sorted(logs)
    with open(self.filename, "a", newline="") as f:
      writer = csv.DictWriter(f, fieldnames=["epoch", *self._keys], delimiter=self.separator, extrasaction="ignore")
      if new:
        writer.writeheader()
      writer.writerow({"epoch": epoch, **logs})


class TensorBoard(Callback):
  """Writes batch and epoch logs (and generated samples) as TensorBoard scalars.

  Args:
    log_dir: folder for the event files.
    update_freq: "batch" (every step), "epoch", or an int (every that many steps).
  """

  def __init__(self, log_dir: str | Path = "logs", update_freq: str | int = "epoch"):
    super().__init__()
    self.log_dir, self.update_freq = str(log_dir), update_freq
    self.writer = None
    self._step = 0

  def on_train_begin(self, logs=None):
    from tensorboardX import SummaryWriter

    self.writer = SummaryWriter(self.log_dir) if is_main_process() else None  # one event file per job
    self._step = 0

  def _write(self, prefix: str, logs: Logs, step: int) -> None:
    if self.writer is None:
      return
    for key, value in logs.items():
      if isinstance(value, (int, float)) and math.isfinite(float(value)):
        self.writer.add_scalar(f"{prefix}/{key}", float(value), step)

  def on_train_batch_end(self, batch, logs=None):
    self._step += 1
    every = 1 if self.update_freq == "batch" else self.update_freq
    if isinstance(every, int) and self._step % every == 0:
      self._write("batch", dict(logs or {}), self._step)

  def on_epoch_end(self, epoch, logs=None):
    self._write("epoch", dict(logs or {}), epoch)
    if self.writer is not None:
      self.writer.flush()

  def on_train_end(self, logs=None):
    if self.writer is not None:
      self.writer.close()


def _interactive(stream: Any) -> bool:
  """Whether progress-bar redraws show as one line (a terminal or a notebook), not as a line each."""
  return bool(getattr(stream, "isatty", lambda: False)()) or "ipykernel" in sys.modules


def _fmt(value: Any) -> str:
  return f"{value:.4g}" if isinstance(value, float) else str(value)


class ProgbarLogger(Callback):
  """Progress per epoch, with Keras's ``verbose`` levels.

  ``verbose=1`` draws a progress bar (the steps this epoch runs, the loss, the trainer's main
  metric, tokens/s) when the output is a terminal or a notebook; written to a file or a pipe it
  prints one line per epoch instead of redraws. ``verbose=2`` prints one line per epoch.
  The facade sets ``params``: ``steps`` (this epoch's), ``epochs``, ``verbose``, ``main_metric``.

  Args:
    stream: where to write (default: ``sys.stdout`` at the time of writing).
  """

  def __init__(self, stream: Any = None) -> None:
    super().__init__()
    self.stream = stream
    self._bar = None
    self._start = 0.0
    self._done = 0

  @property
  def _out(self) -> Any:
    return self.stream if self.stream is not None else sys.stdout

  def write(self, text: str) -> None:
    """Prints ``text`` as its own line, above the bar when one is drawn (on process 0 only)."""
    if not is_main_process():
      return
    if self._bar is not None:
      self._bar.write(text, file=self._out)
    else:
      print(text, file=self._out, flush=True)

  def _title(self, epoch: int) -> str:
    epochs = self.params.get("epochs")
    return f"Epoch {epoch + 1}/{epochs}" if epochs else f"Epoch {epoch + 1}"

  def on_epoch_begin(self, epoch, logs=None):
    self._start, self._done = time.perf_counter(), 0
    if self.params.get("verbose", 1) == 1 and _interactive(self._out) and is_main_process():
      from tqdm.auto import tqdm

      self._bar = tqdm(total=self.params.get("steps"), desc=self._title(epoch), unit="step", leave=True,
                       dynamic_ncols=True, file=self._out)

  def on_train_batch_end(self, batch, logs=None):
    self._done += 1
    if self._bar is None:
      return
    logs = logs or {}
    post = {"loss": f"{logs.get('loss', float('nan')):.4f}"}
    main = self.params.get("main_metric")
    if main and main != "loss" and main in logs:
      post[main] = f"{logs[main]:.4f}"
    if logs.get("tokens_per_second"):
      post["tok/s"] = f"{logs['tokens_per_second']:.0f}"
    self._bar.set_postfix(post, refresh=False)
    self._bar.update(1)

  def on_epoch_end(self, epoch, logs=None):
    logs = logs or {}
    main = self.params.get("main_metric") or "loss"
    keys = ["loss", main, "val_loss", f"val_{main}"]
    shown = {k: logs[k] for k in dict.fromkeys(keys) if isinstance(logs.get(k), float)}
    if self._bar is not None:
      self._bar.set_postfix({k: f"{v:.4f}" for k, v in shown.items()})
      self._bar.close()
      self._bar = None
      return
    if not self.params.get("verbose", 1) or not is_main_process():
      return
    seconds = time.perf_counter() - self._start
    rest = {k: v for k, v in logs.items() if k not in shown and k != "step" and isinstance(v, float)}
    parts = [self._title(epoch), f"{self._done} steps", f"{seconds:.1f}s",
             *(f"{k}: {_fmt(v)}" for k, v in {**shown, **rest}.items())]
    print(" - ".join(parts), file=self._out, flush=True)


class SampleGenerations(Callback):
  """Generates from fixed prompts every ``every_n_steps`` steps and logs the text.

  The samples go to ``self.samples`` as ``(step, prompt, text)``, to ``print_fn``
  (None to silence) and, with ``log_dir``, to TensorBoard as text.

  Args:
    prompts: a string or list of strings.
    every_n_steps: how often; the end of training always samples too.
    max_length: new tokens per sample.
    print_fn: where to show samples.
    log_dir: TensorBoard folder for ``add_text``.
    **generate_kwargs: passed to ``model.generate`` (e.g. ``sampler="top_p"``).
  """

  def __init__(self, prompts: str | Sequence[str], every_n_steps: int = 100, max_length: int = 32,
               print_fn: Callable[[str], Any] | None = print, log_dir: str | Path | None = None, **generate_kwargs):
    super().__init__()
    if every_n_steps <= 0:
      raise ValueError(f"every_n_steps must be positive, got {every_n_steps}.")
    self.prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    self.every_n_steps, self.max_length, self.print_fn = every_n_steps, max_length, print_fn
    self.log_dir, self.generate_kwargs = log_dir, generate_kwargs
    self.samples: list[tuple[int, str, str]] = []
    self._step = 0
    self._writer = None

  def on_train_begin(self, logs=None):
    self._step = 0
    if self.log_dir is not None and is_main_process():
      from tensorboardX import SummaryWriter

      self._writer = SummaryWriter(str(self.log_dir))

  def _sample(self) -> None:
    texts = self.model.generate(self.prompts, max_length=self.max_length, **self.generate_kwargs)
    for prompt, text in zip(self.prompts, texts):
      self.samples.append((self._step, prompt, text))
      if self.print_fn is not None and is_main_process():
        self.print_fn(f"[step {self._step}] {prompt!r} -> {text!r}")
      if self._writer is not None:
        self._writer.add_text("samples", f"**{prompt}** {text}", self._step)

  def on_train_batch_end(self, batch, logs=None):
    self._step += 1
    if self._step % self.every_n_steps == 0:
      self._sample()

  def on_train_end(self, logs=None):
    if not self.samples or self.samples[-1][0] != self._step:
      self._sample()
    if self._writer is not None:
      self._writer.close()
