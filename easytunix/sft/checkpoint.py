"""Training checkpoints with orbax: parameters, optimizer state, step and data position.

With LoRA on only the adapters are saved (a few MB instead of the whole model);
the base weights come from wherever the model was loaded. Arrays are restored
straight onto the shardings the live model and optimizer state have.

Layout of a step folder (Tunix's, so either library reads the other's
checkpoints): ``model_params/`` (the parameters, each leaf under a ``value``
key as ``nnx.state`` saves it), ``optimizer_state/`` and ``meta/`` (a JSON dict:
data position, whether LoRA was on). Folders written by older easytunix
versions (``params/``, ``opt_state/``) are still read, and so are Tunix
checkpoints, which have no ``meta/``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import nnx

from easytunix.distributed import barrier, is_main_process
from easytunix.sft.lora import is_lora_enabled

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class CheckpointingOptions:
  """When checkpoints are written and how many are kept.

  Attributes:
    save_interval_steps: save every this many optimizer steps (the last step is always saved).
    max_to_keep: keep at most this many recent checkpoints (None: keep all).
    enable_async_checkpointing: write files in a background thread after the
      arrays were copied to host memory.
  """

  save_interval_steps: int = 100
  max_to_keep: int | None = 3
  enable_async_checkpointing: bool = True

  def __post_init__(self):
    if not isinstance(self.save_interval_steps, int) or self.save_interval_steps <= 0:
      raise ValueError(f"save_interval_steps must be a positive int, got {self.save_interval_steps!r}.")
    if self.max_to_keep is not None and (not isinstance(self.max_to_keep, int) or self.max_to_keep <= 0):
      raise ValueError(f"max_to_keep must be a positive int or None, got {self.max_to_keep!r}.")

  @classmethod
  def from_orbax(cls, options: ocp.CheckpointManagerOptions) -> CheckpointingOptions:
    """The options of an ``orbax.checkpoint.CheckpointManagerOptions`` (what Tunix takes).

    Its save interval, retention and async flag are used; other Orbax fields are ignored.
    """
    return cls(
        save_interval_steps=int(options.save_interval_steps),
        max_to_keep=options.max_to_keep,
        enable_async_checkpointing=bool(options.enable_async_checkpointing),
    )


# What TrainingConfig.checkpointing_options and CheckpointManager accept.
CHECKPOINTING_OPTIONS_TYPES = (CheckpointingOptions, ocp.CheckpointManagerOptions)

# Item folders of a step: the current (Tunix) names first, then the older easytunix ones.
_PARAMS_ITEMS = ("model_params", "params")
_OPT_ITEMS = ("optimizer_state", "opt_state")


@dataclasses.dataclass(frozen=True)
class RestoredCheckpoint:
  """What :meth:`CheckpointManager.maybe_restore` brought back.

  Attributes:
    step: the optimizer step the checkpoint was taken after.
    opt_state: the optimizer state (None when none was asked for or saved).
    metadata: the JSON dict saved with it (data position and the like).
  """

  step: int
  opt_state: Any
  metadata: dict[str, Any]


def _saved_filter(model: nnx.Module, only_lora: bool | None = None) -> Any:
  """What is saved / restored: the LoRA adapters (``only_lora``; None: when the model has them) or every Param."""
  if only_lora is None:
    only_lora = is_lora_enabled(model)
  if only_lora and not is_lora_enabled(model):
    raise ValueError("save_only_lora_params / restore_only_lora_params=True but the model has no LoRA adapters.")
  return nnx.LoRAParam if only_lora else nnx.Param


def _wrap_values(tree: Any) -> Any:
  """Each leaf of a nested dict under a ``value`` key, as ``nnx.state`` is saved by Tunix."""
  if isinstance(tree, dict):
    return {k: _wrap_values(v) for k, v in tree.items()}
  return {"value": tree}


def _flat(tree: Any, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
  """``{(key, ...): leaf}`` of a nested dict."""
  if isinstance(tree, dict):
    out = {}
    for k, v in tree.items():
      out.update(_flat(v, prefix + (str(k),)))
    return out
  return {prefix: tree}


def _nest(flat: dict[tuple[str, ...], Any]) -> dict[str, Any]:
  out: dict[str, Any] = {}
  for path, leaf in flat.items():
    node = out
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = leaf
  return out


def _strip_value(path: tuple[str, ...]) -> tuple[str, ...]:
  """A saved leaf path without the trailing ``value`` key nnx adds to each variable."""
  return path[:-1] if len(path) > 1 and path[-1] == "value" else path


def _is_optimizer(obj: Any) -> bool:
  return isinstance(obj, nnx.Optimizer)


def _opt_tree(optimizer: Any) -> Any:
  """The arrays of an optimizer state: an optax state as is, an ``nnx.Optimizer``'s ``OptState`` variables."""
  if _is_optimizer(optimizer):
    return nnx.state(optimizer, nnx.optimizer.OptState)
  return optimizer


def _str_keys(tree: Any) -> Any:
  if isinstance(tree, dict):
    return {str(k): _str_keys(v) for k, v in tree.items()}
  return tree


def _like(reference: Any, restored: Any) -> Any:
  """``restored`` (string keys) re-keyed like ``reference`` (int keys for list entries)."""
  if isinstance(reference, dict):
    return {k: _like(v, restored[str(k)]) for k, v in reference.items()}
  return restored


def _abstract(tree: Any) -> Any:
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def _opt_leaves(opt_state: Any) -> dict[str, Any]:
  return {str(i): leaf for i, leaf in enumerate(jax.tree.leaves(opt_state))}


def check_checkpoint_directory(root_directory: str | Path, what: str = "checkpoint_root_directory") -> Path:
  """The absolute folder checkpoints will go to, or a ValueError naming what is in the way.

  Called before any training, so a path that is (or is under) a regular file
  fails at once instead of at the first save, hours later.
  """
  path = Path(root_directory).expanduser().absolute()
  for candidate in (path, *path.parents):
    if candidate.exists() and not candidate.is_dir():
      where = "is" if candidate == path else f"is under {str(candidate)!r}, which is"
      raise ValueError(
          f"{what}={str(root_directory)!r} {where} a file, not a folder: checkpoints need a folder. "
          "Pass a folder path (it is created if missing)."
      )
  return path


def _step_problem(folder: Path, has_opt_state: bool | None = None) -> str | None:
  """Why the step folder ``folder`` cannot be restored (None when it is complete)."""
  if not (folder / "_CHECKPOINT_METADATA").is_file():
    return "no _CHECKPOINT_METADATA (the save never finished)"
  params_item = _item(folder, _PARAMS_ITEMS)
  meta: Any = {}
  if (folder / "meta").exists() or params_item != "model_params":  # a Tunix checkpoint has no meta/
    try:
      meta = json.loads((folder / "meta" / "metadata").read_text())
    except (OSError, ValueError) as err:
      return f"meta/metadata is missing or not JSON ({type(err).__name__})"
    if not isinstance(meta, dict):
      return "meta/metadata is not a JSON object"
  items = [params_item] + ([_item(folder, _OPT_ITEMS)] if meta.get("has_opt_state") else [])
  for item in items:
    if not (folder / item / "_METADATA").is_file():
      return f"{item}/ is incomplete"
  return None


def _item(folder: Path, names: tuple[str, ...]) -> str:
  """The first of ``names`` that ``folder`` holds (the first name when none)."""
  return next((n for n in names if (folder / n).exists()), names[0])


def _read_meta(folder: Path) -> dict[str, Any]:
  """The step's meta JSON; {} for a checkpoint without one (written by Tunix)."""
  path = folder / "meta" / "metadata"
  return json.loads(path.read_text()) if path.is_file() else {}


class CheckpointManager:
  """Saves and restores a model (or its LoRA adapters), optimizer state and metadata.

  Step folders that an interrupted save left incomplete (or that were damaged
  later) are skipped with a warning that names them, and moved aside to
  ``<step>.incomplete-<time>`` so the step can be saved again.

  With several processes (``jax.distributed``) every process creates the
  manager and calls ``save``/``maybe_restore`` (Orbax coordinates the writes;
  the folder must be on storage every host sees); process 0 alone moves
  incomplete steps aside.

  Args:
    root_directory: folder holding one sub-folder per saved step; None
      disables checkpointing (``save`` returns False, nothing is restored).
    options: save interval, retention and async writing: a
      :class:`CheckpointingOptions` or Orbax's ``CheckpointManagerOptions``.
      Without options ``save`` writes whenever it is asked (as Tunix), while
      :meth:`should_save` (what the trainer asks) keeps the default interval.
  """

  def __init__(
      self,
      root_directory: str | Path | None = None,
      options: CheckpointingOptions | ocp.CheckpointManagerOptions | None = None,
  ):
    if isinstance(options, ocp.CheckpointManagerOptions):
      options = CheckpointingOptions.from_orbax(options)
    elif options is not None and not isinstance(options, CheckpointingOptions):
      raise TypeError(
          "options must be a CheckpointingOptions or an orbax.checkpoint.CheckpointManagerOptions, "
          f"got {type(options).__name__}."
      )
    self._interval_policy = options is not None
    self.options = options or CheckpointingOptions()
    self.root_directory = None if not root_directory else check_checkpoint_directory(root_directory)
    self._manager = None
    self._closed = False
    if self.root_directory is None:
      return
    if is_main_process():  # one process moves folders; the others wait and then see the result
      self._set_aside_incomplete_steps()
    barrier("easytunix_checkpoint_manager_set_aside")
    self._manager = ocp.CheckpointManager(
        self.root_directory,
        options=ocp.CheckpointManagerOptions(
            save_interval_steps=1,  # the interval is applied here, in save / should_save
            max_to_keep=self.options.max_to_keep,
            enable_async_checkpointing=self.options.enable_async_checkpointing,
            create=True,
        ),
        item_handlers=dict(
            model_params=ocp.PyTreeCheckpointHandler(),
            optimizer_state=ocp.StandardCheckpointHandler(),
            meta=ocp.JsonCheckpointHandler(),
            params=ocp.StandardCheckpointHandler(),
            opt_state=ocp.StandardCheckpointHandler(),
        ),
    )

  def _set_aside_incomplete_steps(self) -> None:
    """Moves step folders that cannot be restored out of the way, warning with their names."""
    if not self.root_directory.is_dir():
      return
    for folder in sorted(self.root_directory.iterdir()):
      if not (folder.is_dir() and folder.name.isdigit()):
        continue
      problem = _step_problem(folder)
      if problem is not None:
        aside = folder.with_name(f"{folder.name}.incomplete-{time.strftime('%Y%m%d-%H%M%S')}")
        folder.rename(aside)
        logger.warning(
            "Skipping checkpoint step %s in %s: %s. Moved it to %s; resuming from the newest complete step.",
            folder.name, self.root_directory, problem, aside.name,
        )

  def latest_step(self) -> int | None:
    """The newest saved step, or None."""
    return None if self._manager is None else self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return [] if self._manager is None else list(self._manager.all_steps())

  def should_save(self, step: int) -> bool:
    """Whether ``step`` is a multiple of the save interval that has not been saved yet."""
    return (self._manager is not None and step % self.options.save_interval_steps == 0
            and step not in self._manager.all_steps())

  def save(
      self,
      step: int,
      model: nnx.Module,
      optimizer: Any = None,
      save_only_lora_params: bool | None = None,
      force: bool = False,
      custom_metadata: dict[str, Any] | None = None,
      *,
      metadata: dict[str, Any] | None = None,
  ) -> bool:
    """Saves ``model`` (and the optimizer state) as ``step``; returns whether it saved.

    Args:
      step: the optimizer step.
      model: the model; with LoRA on only its adapters are saved by default.
      optimizer: an optax state or an ``nnx.Optimizer`` (None: not saved).
      save_only_lora_params: True: only the LoRA adapters; False: every
        parameter; None: the adapters when the model has them.
      force: save even when the interval (set through ``options``) skips ``step``.
      custom_metadata: a JSON-able dict stored with it (data position and the like).
      metadata: the same as ``custom_metadata`` (easytunix's older name).

    Returns:
      False when checkpointing is off, the interval skips ``step`` or it is
      already saved; True when the save was written (or started, when async).
    """
    if isinstance(save_only_lora_params, dict):  # save(step, model, opt_state, metadata) of older callers
      metadata, save_only_lora_params = save_only_lora_params, None
    if self._manager is None:
      return False
    if not force and self._interval_policy and step % self.options.save_interval_steps:
      return False
    if step in self._manager.all_steps():
      return False
    only_lora = is_lora_enabled(model) if save_only_lora_params is None else bool(save_only_lora_params)
    params = _str_keys(nnx.to_pure_dict(nnx.state(model, _saved_filter(model, only_lora))))
    meta = dict(custom_metadata or {})
    meta.update(metadata or {})
    meta.update(
        step=int(step), lora=is_lora_enabled(model), only_lora=only_lora, has_opt_state=optimizer is not None
    )
    items = dict(model_params=ocp.args.PyTreeSave(_wrap_values(params)), meta=ocp.args.JsonSave(meta))
    if optimizer is not None:
      items["optimizer_state"] = ocp.args.StandardSave(_opt_leaves(_opt_tree(optimizer)))
    saved = self._manager.save(int(step), args=ocp.args.Composite(**items), force=True)
    if saved:
      logger.info("Checkpoint for step %d written to %s", step, self.root_directory)
    return saved

  def _restore_params(self, step: int, state: Any, reference: dict[str, Any]) -> dict[str, Any]:
    """The saved values of the variables in ``reference`` (a pure dict), placed like the live ones."""
    folder = self.root_directory / str(step)
    item = _item(folder, _PARAMS_ITEMS)
    if item == "params":  # the older easytunix layout: exactly the saved variables
      restored = self._manager.restore(
          step, args=ocp.args.Composite(params=ocp.args.StandardRestore(_abstract(_str_keys(reference))))
      )
      return restored["params"]
    saved = {_strip_value(path): path for path in _flat(dict(self._manager.item_metadata(step)[item].tree))}
    want = _flat(_str_keys(reference))
    missing = [".".join(path) for path in want if path not in saved]
    if missing:
      raise ValueError(
          f"{len(missing)} variable(s) of the model are not in the checkpoint, e.g. {missing[:3]}."
      )
    target = _nest({saved[path]: _abstract(leaf) for path, leaf in want.items()})
    restore_args = jax.tree.map(lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding), target)
    restored = self._manager.restore(
        step,
        args=ocp.args.Composite(
            model_params=ocp.args.PyTreeRestore(item=target, restore_args=restore_args, partial_restore=True)
        ),
    )
    values = _flat(restored[item])
    return _nest({path: values[saved[path]] for path in want})

  def maybe_restore(
      self,
      model: nnx.Module,
      optimizer: Any = None,
      step: int | None = None,
      restore_only_lora_params: bool | None = None,
  ) -> RestoredCheckpoint | None:
    """Restores the newest checkpoint (or ``step``) into ``model``; None when there is none.

    Args:
      model: the model to write the saved values into (in place).
      optimizer: the freshly initialised optax state (it gives the structure
        and shardings to restore into; the restored state is returned, the
        input is not modified), or an ``nnx.Optimizer`` (updated in place).
      step: the step to restore (None: the newest).
      restore_only_lora_params: True: only the LoRA adapters; None: the
        adapters when the model has them, else every parameter.

    Raises:
      ValueError: the checkpoint does not fit the model (another architecture,
        LoRA on one side only, another optimizer).
    """
    if self._manager is None:
      return None
    step = self._manager.latest_step() if step is None else step
    if step is None:
      return None
    folder = self.root_directory / str(step)
    meta = _read_meta(folder)
    lora_now = is_lora_enabled(model)
    if "lora" in meta and bool(meta.get("lora")) != lora_now:
      raise ValueError(
          f"The checkpoint at {self.root_directory}/{step} was saved "
          f"{'with' if meta.get('lora') else 'without'} LoRA adapters but the model has "
          f"{'them' if lora_now else 'none'}. Apply (or don't apply) apply_lora with the same targets "
          "before restoring, or point checkpoint_root_directory at a fresh folder."
      )
    state = nnx.state(model, _saved_filter(model, restore_only_lora_params))
    reference = nnx.to_pure_dict(state)
    opt_tree = _opt_tree(optimizer)
    restore_opt = optimizer is not None and meta.get("has_opt_state", False)
    try:
      params = self._restore_params(step, state, reference)
      if restore_opt:
        opt_item = _item(folder, _OPT_ITEMS)
        leaves = self._manager.restore(
            step,
            args=ocp.args.Composite(**{opt_item: ocp.args.StandardRestore(_abstract(_opt_leaves(opt_tree)))}),
        )[opt_item]
    except (ValueError, KeyError) as err:
      raise ValueError(
          f"Checkpoint {self.root_directory}/{step} does not fit this model/optimizer ({err}). "
          "Was it written for another model, LoRA rank or optimizer? Use a fresh checkpoint_root_directory."
      ) from err
    nnx.replace_by_pure_dict(state, _like(reference, params))
    nnx.update(model, state)
    new_opt_state = None
    if restore_opt:
      new_opt_state = jax.tree.unflatten(
          jax.tree.structure(opt_tree), [leaves[str(i)] for i in range(len(leaves))]
      )
      if _is_optimizer(optimizer):
        nnx.update(optimizer, new_opt_state)
    elif optimizer is not None and (folder / "optimizer_state").exists():
      logger.info("Checkpoint %s/%d has an optimizer state of another layout; it was not restored.",
                  self.root_directory, step)
    logger.info("Restored checkpoint of step %d from %s", step, self.root_directory)
    return RestoredCheckpoint(step=int(step), opt_state=new_opt_state, metadata=dict(meta))

  def saved_parameter_paths(self, step: int | None = None) -> list[str]:
    """Dotted paths of the parameters stored at ``step`` (default: the newest)."""
    step = self.latest_step() if step is None else step
    if step is None:
      return []
    item = _item(self.root_directory / str(step), _PARAMS_ITEMS)
    tree = self._manager.item_metadata(step)[item]
    tree = getattr(tree, "tree", tree)
    return sorted(".".join(_strip_value(path)) for path in _flat(dict(tree)))

  def wait_until_finished(self) -> None:
    """Blocks until an asynchronous save has been written completely."""
    if self._manager is not None:
      self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for a pending save to be committed, then ends Orbax's background threads."""
    if self._manager is None or self._closed:
      return
    self._closed = True
    try:
      self._manager.wait_until_finished()
    finally:
      self._manager.close()


__all__ = [
    "CHECKPOINTING_OPTIONS_TYPES",
    "CheckpointManager",
    "CheckpointingOptions",
    "RestoredCheckpoint",
    "check_checkpoint_directory",
]
