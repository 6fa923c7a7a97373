"""Checkpoints a user can trust: bad folders fail before training, damaged steps are skipped with a
warning that names them, and closing waits for the last save to be committed."""

from __future__ import annotations

import logging
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from easytunix.sft.checkpoint import CheckpointingOptions, CheckpointManager, check_checkpoint_directory


class _Tiny(nnx.Module):
  def __init__(self, value: float):
    self.w = nnx.Param(jnp.full((4,), value, jnp.float32))


def _save_steps(root: Path, steps: list[int]) -> None:
  manager = CheckpointManager(root, CheckpointingOptions(save_interval_steps=1))
  for step in steps:
    assert manager.save(step, _Tiny(float(step)), metadata={"position": step})
  manager.close()


def test_a_file_in_the_way_fails_before_any_work(tmp_path: Path) -> None:
  blocker = tmp_path / "ckpt"
  blocker.write_text("not a folder")
  with pytest.raises(ValueError, match=r"checkpoint_root_directory=.*ckpt.* is a file, not a folder"):
    CheckpointManager(blocker)
  with pytest.raises(ValueError, match=r"is under .*ckpt.*, which is a file"):
    CheckpointManager(blocker / "run1")
  with pytest.raises(ValueError, match=r"checkpoint_dir="):
    check_checkpoint_directory(blocker, what="checkpoint_dir")
  assert check_checkpoint_directory(tmp_path / "new" / "dir") == (tmp_path / "new" / "dir").absolute()


def test_damaged_steps_are_skipped_with_a_warning_and_can_be_saved_again(tmp_path: Path, caplog) -> None:
  _save_steps(tmp_path, [1, 2, 3])
  (tmp_path / "3" / "meta" / "metadata").write_text('{"step": 3, "lo')  # truncated by a crash
  (tmp_path / "4").mkdir()  # a step folder the save never filled
  with caplog.at_level(logging.WARNING, logger="easytunix.sft.checkpoint"):
    manager = CheckpointManager(tmp_path, CheckpointingOptions(save_interval_steps=1))
  warned = " ".join(r.getMessage() for r in caplog.records)
  assert "step 3" in warned and "step 4" in warned and "not JSON" in warned and "_CHECKPOINT_METADATA" in warned
  assert manager.latest_step() == 2
  model = _Tiny(0.0)
  restored = manager.maybe_restore(model)
  assert restored.step == 2 and restored.metadata["position"] == 2
  np.testing.assert_array_equal(np.asarray(model.w[...]), 2.0)  # a copy of saved values: exact
  assert manager.save(3, _Tiny(30.0))  # the damaged step is moved aside, so it can be written again
  manager.close()
  assert sorted(p.name.split(".")[0] for p in tmp_path.iterdir() if ".incomplete-" in p.name) == ["3", "4"]
  again = CheckpointManager(tmp_path)
  assert again.latest_step() == 3
  again.close()


def test_close_commits_the_last_async_save(tmp_path: Path) -> None:
  manager = CheckpointManager(tmp_path, CheckpointingOptions(save_interval_steps=1, enable_async_checkpointing=True))
  assert manager.save(7, _Tiny(7.0))
  manager.close()
  assert sorted(p.name for p in tmp_path.iterdir()) == ["7"]  # no *.orbax-checkpoint-tmp left behind
  assert (tmp_path / "7" / "_CHECKPOINT_METADATA").is_file()
  manager.close()  # closing twice is harmless


def test_no_root_directory_disables_checkpointing() -> None:
  manager = CheckpointManager(None)
  assert manager.save(1, _Tiny(1.0), force=True) is False
  assert manager.maybe_restore(_Tiny(0.0)) is None
  assert manager.latest_step() is None and manager.all_steps() == [] and not manager.should_save(100)
  manager.close()


def test_fit_returns_with_its_last_checkpoint_committed(tmp_path: Path) -> None:
  from easytunix.presets import Qwen3

  model = Qwen3.from_preset("qwen3_tiny", num_layers=1)
  model.compile(trainer="sft", learning_rate=1e-3, max_length=16, checkpoint_dir=str(tmp_path / "ckpt"))
  model.fit(["12+7=19", "3+4=7", "1+1=2", "5+5=10"], steps=3, batch_size=2, verbose=0)
  folders = sorted(p.name for p in (tmp_path / "ckpt").iterdir() if p.name != "easytunix_run.json")
  assert folders == ["3"], folders  # committed: no N.orbax-checkpoint-tmp-* folder left
  assert (tmp_path / "ckpt" / "3" / "_CHECKPOINT_METADATA").is_file()


def test_compile_sets_the_save_interval_and_retention(tmp_path: Path) -> None:
  from easytunix.presets import Qwen3

  model = Qwen3.from_preset("qwen3_tiny", num_layers=1)
  with pytest.raises(ValueError, match="save_every_n_steps must be a positive int"):
    model.compile(checkpoint_dir=str(tmp_path / "c"), save_every_n_steps=0)
  blocker = tmp_path / "file"
  blocker.write_text("x")
  with pytest.raises(ValueError, match="checkpoint_dir=.* is a file"):
    model.compile(checkpoint_dir=str(blocker))  # before any training
  model.compile(learning_rate=1e-3, max_length=16, checkpoint_dir=str(tmp_path / "c"), save_every_n_steps=2,
                keep_checkpoints=2)
  model.fit(["12+7=19", "3+4=7"] * 2, steps=7, batch_size=2, verbose=0)
  assert sorted(int(p.name) for p in (tmp_path / "c").iterdir() if p.name.isdigit()) == [6, 7]  # 2, 4, 6 saved; the last 2 kept
