"""Training checkpoints with orbax: parameters, optimizer state, step and data position.

With LoRA on only the adapters are saved (a few MB instead of the whole model);
the base weights come from wherever the model was loaded. Arrays are restored
straight onto the shardings the live model and optimizer state have.
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


def _saved_filter(model: nnx.Module) -> Any:
  return nnx.LoRAParam if is_lora_enabled(model) else nnx.Param


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
  try:
    meta = json.loads((folder / "meta" / "metadata").read_text())
  except (OSError, ValueError) as err:
    return f"meta/metadata is missing or not JSON ({type(err).__name__})"
  if not isinstance(meta, dict):
    return "meta/metadata is not a JSON object"
  items = ["params"] + (["opt_state"] if meta.get("has_opt_state") else [])
  for item in items:
    if not (folder / item / "_METADATA").is_file():
      return f"{item}/ is incomplete"
  return None


class CheckpointManager:
  """Saves and restores a model (or its LoRA adapters), optimizer state and metadata.

  Step folders that an interrupted save left incomplete (or that were damaged
  later) are skipped with a warning that names them, and moved aside to
  ``<step>.incomplete-<time>`` so the step can be saved again.

  Args:
    root_directory: folder holding one sub-folder per saved step; None
      disables checkpointing (``save`` returns False, nothing is restored).
    options: save interval, retention and async writing.
  """

  def __init__(self, root_directory: str | Path | None, options: CheckpointingOptions | None = None):
    self.options = options or CheckpointingOptions()
    self.root_directory = None if root_directory is None else check_checkpoint_directory(root_directory)
    self._manager = None
    self._closed = False
    if self.root_directory is None:
      return
    self._set_aside_incomplete_steps()
    self._manager = ocp.CheckpointManager(
        self.root_directory,
        options=ocp.CheckpointManagerOptions(
            save_interval_steps=self.options.save_interval_steps,
            max_to_keep=self.options.max_to_keep,
            enable_async_checkpointing=self.options.enable_async_checkpointing,
            create=True,
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
      opt_state: Any = None,
      metadata: dict[str, Any] | None = None,
      force: bool = False,
  ) -> bool:
    """Saves at multiples of ``save_interval_steps`` (any step with ``force``); returns whether it saved."""
    if self._manager is None:
      return False
    if not force and step % self.options.save_interval_steps:
      return False
    if step in self._manager.all_steps():
      return False
    params = _str_keys(nnx.to_pure_dict(nnx.state(model, _saved_filter(model))))
    meta = dict(metadata or {})
    meta.update(step=int(step), lora=is_lora_enabled(model), has_opt_state=opt_state is not None)
    items = dict(params=ocp.args.StandardSave(params), meta=ocp.args.JsonSave(meta))
    if opt_state is not None:
      items["opt_state"] = ocp.args.StandardSave(_opt_leaves(opt_state))
    saved = self._manager.save(int(step), args=ocp.args.Composite(**items), force=True)
    if saved:
      logger.info("Checkpoint for step %d written to %s", step, self.root_directory)
    return saved

  def maybe_restore(
      self, model: nnx.Module, opt_state: Any = None, step: int | None = None
  ) -> RestoredCheckpoint | None:
    """Restores the newest checkpoint (or ``step``) into ``model``; None when there is none.

    ``opt_state`` is the freshly initialised optimizer state: it gives the
    structure and shardings to restore into, and the restored state is
    returned (the input is not modified).
    """
    if self._manager is None:
      return None
    step = self._manager.latest_step() if step is None else step
    if step is None:
      return None
    meta = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    lora_now = is_lora_enabled(model)
    if bool(meta.get("lora")) != lora_now:
      raise ValueError(
          f"The checkpoint at {self.root_directory}/{step} was saved "
          f"{'with' if meta.get('lora') else 'without'} LoRA adapters but the model has "
          f"{'them' if lora_now else 'none'}. Apply (or don't apply) apply_lora with the same targets "
          "before restoring, or point checkpoint_root_directory at a fresh folder."
      )
    state = nnx.state(model, _saved_filter(model))
    reference = nnx.to_pure_dict(state)
    items = dict(params=ocp.args.StandardRestore(_abstract(_str_keys(reference))))
    restore_opt = opt_state is not None and meta.get("has_opt_state", False)
    if restore_opt:
      items["opt_state"] = ocp.args.StandardRestore(_abstract(_opt_leaves(opt_state)))
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    except (ValueError, KeyError) as err:
      raise ValueError(
          f"Checkpoint {self.root_directory}/{step} does not fit this model/optimizer ({err}). "
          "Was it written for another model, LoRA rank or optimizer? Use a fresh checkpoint_root_directory."
      ) from err
    nnx.replace_by_pure_dict(state, _like(reference, restored["params"]))
    nnx.update(model, state)
    new_opt_state = None
    if restore_opt:
      leaves = restored["opt_state"]
      new_opt_state = jax.tree.unflatten(
          jax.tree.structure(opt_state), [leaves[str(i)] for i in range(len(leaves))]
      )
    logger.info("Restored checkpoint of step %d from %s", step, self.root_directory)
    return RestoredCheckpoint(step=int(step), opt_state=new_opt_state, metadata=dict(meta))

  def saved_parameter_paths(self, step: int | None = None) -> list[str]:
    """Dotted paths of the parameters stored at ``step`` (default: the newest)."""
    step = self.latest_step() if step is None else step
    if step is None:
      return []
    tree = self._manager.item_metadata(step)["params"]
    paths = []

    def walk(node, prefix):
      if isinstance(node, dict):
        for key, value in node.items():
          walk(value, f"{prefix}.{key}" if prefix else str(key))
      else:
        paths.append(prefix)

    walk(dict(tree), "")
    return sorted(paths)

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


__all__ = ["CheckpointManager", "CheckpointingOptions", "RestoredCheckpoint", "check_checkpoint_directory"]
