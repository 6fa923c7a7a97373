"""Recipes: how ``model.compile(trainer=...)`` / ``fit`` / ``evaluate`` drive one trainer.

A :class:`Recipe` is what a trainer package tells the facade: its options
(names and defaults) and their checks, how records become its batches, how to
build it from generic settings, how many optimizer steps an epoch makes, which
metric the progress bar shows, and what to undo after ``fit``. What it
builds is a :class:`TrainingRun`, the one interface the facade trains,
evaluates and closes through, whatever sits behind it (a :class:`PeftTrainer`,
or a GRPO learner wrapping one).

Trainer packages register their recipe with :func:`register_recipe`; the
facade finds it with :func:`get_recipe`. This module holds the SFT recipe.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Iterable, Mapping
from typing import Any, ClassVar

import optax
from flax import nnx

from easytunix.sft.peft_trainer import PeftTrainer, TrainingConfig


@dataclasses.dataclass(frozen=True)
class RecipeSettings:
  """What ``compile`` decided, in terms every recipe understands.

  Attributes:
    optimizer: the optax optimizer.
    max_length: tokens per training row (prompt plus completion).
    options: this recipe's options, defaults filled in (see :attr:`Recipe.options`).
    training_config: :class:`TrainingConfig` keyword arguments (accumulation,
      checkpointing, logging, clipping, evaluation cadence).
  """

  optimizer: optax.GradientTransformation
  max_length: int
  options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  training_config: Mapping[str, Any] = dataclasses.field(default_factory=dict)

  @property
  def gradient_accumulation_steps(self) -> int:
    return int(self.training_config.get("gradient_accumulation_steps", 1))

  @property
  def eval_every_n_steps(self) -> int | None:
    return self.training_config.get("eval_every_n_steps")


class TrainingRun:
  """A built trainer as the facade sees it: train, evaluate, close, and the core loop for hooks.

  Args:
    trainer: the :class:`PeftTrainer` whose loop runs (hooks attach to it).
  """

  def __init__(self, trainer: PeftTrainer):
    self.trainer = trainer

  def train(self, train_ds: Iterable[Any], eval_ds: Iterable[Any] | None = None) -> None:
    """Trains on ``train_ds``; ``eval_ds`` is scored every ``eval_every_n_steps`` steps."""
    self.trainer.train(train_ds, eval_ds)

  def evaluate(self, eval_ds: Iterable[Any]) -> dict[str, float]:
    """The trainer's evaluation metrics on ``eval_ds``."""
    return self.trainer.evaluate(eval_ds)

  def close(self) -> None:
    """Releases what the run holds (checkpoint writers, loggers, engines)."""
    self.trainer.close()


class Recipe:
  """How the facade drives one trainer; subclass it and :func:`register_recipe` an instance.

  Attributes:
    name: the ``compile(trainer=...)`` name.
    options: every option ``compile`` accepts for this trainer, with its default.
    data_format: which record format ``fit`` checks data against (a key of
      ``easytunix.presets.data_formats.FORMATS``; None: ``name``'s, when it has one).
    main_metric: the step metric the progress bar shows beside the loss (``History`` keeps every
      metric's epoch mean anyway).
  """

  name: ClassVar[str] = ""
  options: ClassVar[Mapping[str, Any]] = {}
  data_format: ClassVar[str | None] = None
  main_metric: ClassVar[str] = "loss"

  def check_options(self, options: Mapping[str, Any]) -> dict[str, Any]:
    """The options with defaults filled in; raises on what no model is needed to reject.

    Unknown names are rejected by :func:`resolve_options` before this runs.
    """
    return {**self.options, **options}

  def validate(self, model: nnx.Module, settings: RecipeSettings) -> None:
    """Compile-time checks that need the model (e.g. a tokenizer, a compatible teacher)."""

  def batches(self, model: nnx.Module, settings: RecipeSettings, records: list[Any], batch_size: int, *,
              shuffle: bool, seed: int, name: str) -> Iterable[Any]:
    """Records (dicts, or ready batches) -> a re-iterable of this trainer's batches."""
    raise NotImplementedError

  def eval_batch_size(self, settings: RecipeSettings, batch_size: int) -> int:
    """The batch size ``evaluate(data, batch_size)`` uses."""
    return batch_size

  def build(self, model: nnx.Module, settings: RecipeSettings, config: Mapping[str, Any],
            state: dict[str, Any]) -> TrainingRun:
    """The run that trains ``model``.

    Args:
      model: the model to train.
      settings: what ``compile`` decided.
      config: :class:`TrainingConfig` keyword arguments for this run (``settings.training_config``
        plus ``num_epochs`` / ``max_steps`` / ``show_progress_bar``).
      state: this recipe's per-model state, kept from ``compile`` to the next ``compile``
        (e.g. a reference snapshot that several ``fit`` calls share).
    """
    raise NotImplementedError

  def steps_per_epoch(self, settings: RecipeSettings, num_batches: int) -> int:
    """Optimizer steps one pass over ``num_batches`` batches makes."""
    return num_batches // settings.gradient_accumulation_steps

  def after_fit(self, run: TrainingRun) -> TrainingRun | None:
    """Cleanup after ``fit``: returns the run to keep for the next ``fit`` / ``evaluate``, or None once closed."""
    return run


_RECIPES: dict[str, Recipe] = {}


def register_recipe(recipe: Recipe) -> Recipe:
  """Makes ``recipe`` available as ``compile(trainer=recipe.name)`` (a later one replaces an earlier)."""
  if not isinstance(recipe, Recipe) or not recipe.name:
    raise TypeError(f"register_recipe needs a Recipe instance with a name, got {recipe!r}.")
  _RECIPES[recipe.name] = recipe
  return recipe


def recipe_names() -> tuple[str, ...]:
  """The registered trainer names, in registration order."""
  return tuple(_RECIPES)


def get_recipe(name: str) -> Recipe:
  """The recipe registered as ``name``."""
  if name not in _RECIPES:
    raise ValueError(f"Unknown trainer {name!r}; choose one of {recipe_names()}.")
  return _RECIPES[name]


def resolve_options(name: str, options: Mapping[str, Any], common: Iterable[str] = ()) -> dict[str, Any]:
  """``options`` checked against recipe ``name``'s.

  An unknown name is an error that lists every valid option (``common``: those of every
  trainer, e.g. ``compile``'s own arguments), says which other trainer has it, and
  suggests the closest valid name (a typo such as ``learnig_rate``).
  """
  recipe = get_recipe(name)
  unknown = set(options) - set(recipe.options)
  if unknown:
    others = {n for n, r in _RECIPES.items() if unknown & set(r.options)}
    hint = f" (those are options of trainer {sorted(others)})" if others else ""
    valid = sorted({*common, *recipe.options})
    close = {u: difflib.get_close_matches(u, valid, n=1) for u in sorted(unknown)}
    suggestions = "".join(f" Did you mean {m[0]!r} for {u!r}?" for u, m in close.items() if m)
    common_part = f"common options: {sorted(common)}; " if common else ""
    raise ValueError(
        f"compile(trainer={name!r}) got unknown option(s) {sorted(unknown)}{hint}.{suggestions} "
        f"Valid options: {common_part}options for {name!r}: {sorted(recipe.options) or 'none'}."
    )
  return recipe.check_options(options)


class SftRecipe(Recipe):
  """Supervised fine-tuning: ``text``, ``prompt``+``completion`` or ``messages`` records on :class:`PeftTrainer`."""

  name = "sft"
  options = {"use_chat_template": None}

  def batches(self, model, settings, records, batch_size, *, shuffle, seed, name):
    from easytunix.sft.data import SupervisedDataset

    if records and not isinstance(records[0], dict):
      return records  # TrainingInput batches, used as they are
    use_chat = settings.options.get("use_chat_template")
    dataset = SupervisedDataset(records, model.tokenizer, batch_size, settings.max_length, shuffle=shuffle, seed=seed,
                                drop_remainder=False, use_chat_template=False if use_chat is None else use_chat,
                                name=name)
    # Rows are padded to the longest example (in steps of 8), not to max_length: short data trains fast.
    longest = max(len(ex) for ex in dataset.examples)
    dataset.max_length = min(settings.max_length, -(-longest // 8) * 8)
    return dataset

  def build(self, model, settings, config, state):
    return TrainingRun(PeftTrainer(model, settings.optimizer, TrainingConfig(**config)))


register_recipe(SftRecipe())

__all__ = [
    "Recipe",
    "RecipeSettings",
    "SftRecipe",
    "TrainingRun",
    "get_recipe",
    "recipe_names",
    "register_recipe",
    "resolve_options",
]
