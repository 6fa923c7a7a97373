"""Checkpoints: exact resume after SIGKILL, LoRA-only checkpoints, clear errors on mismatch."""

import importlib.util
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from easytunix.models.qwen3 import ModelConfig, Qwen3
from easytunix.sft import lora
from easytunix.sft.checkpoint import CheckpointingOptions, CheckpointManager
from easytunix.sft.peft_trainer import PeftTrainer, TrainingConfig, TrainingInput

REPO = Path(__file__).resolve().parent.parent

WORKER = textwrap.dedent(
    """
    import os
    import signal
    import sys

    import jax
    import numpy as np
    import optax
    from flax import nnx

    from easytunix.generate.tokenizer_adapter import TokenizerAdapter
    from easytunix.models.qwen3 import ModelConfig, Qwen3
    from easytunix.sft.checkpoint import CheckpointingOptions
    from easytunix.sft.data import SupervisedDataset
    from easytunix.sft.hooks import TrainingHooks
    from easytunix.sft.peft_trainer import PeftTrainer, TrainingConfig
    from easytunix.sft.synthetic import addition_task

    TINY_BPE = "{tiny_bpe}"


    class KillAfterCheckpoint(TrainingHooks):
      def __init__(self, step):
        self.step = step

      def on_train_step_end(self, train_ctx, train_loss):
        if train_ctx.train_steps() == self.step:
          train_ctx.checkpoint_manager.wait_until_finished()  # the step-10 checkpoint is on disk
          os.kill(os.getpid(), signal.SIGKILL)


    def run(checkpoint_dir, out_path, kill_at=None):
      tokenizer = TokenizerAdapter.from_pretrained(TINY_BPE)
      task = addition_task(num_train=96, num_eval=10)
      # 12 shuffled batches per epoch: 20 steps cross an epoch boundary.
      train_ds = SupervisedDataset(task.train, tokenizer, batch_size=8, max_length=12, seed=3)
      model = Qwen3(ModelConfig.tiny(num_layers=1), rngs=nnx.Rngs(0))
      optimizer = optax.inject_hyperparams(optax.adamw)(learning_rate=optax.linear_schedule(1e-2, 1e-3, 20))
      config = TrainingConfig(
          max_steps=20,
          checkpoint_root_directory=checkpoint_dir,
          checkpointing_options=CheckpointingOptions(save_interval_steps=5, max_to_keep=2),
          show_progress_bar=False,
      )
      trainer = PeftTrainer(model, optimizer, config)
      started_at = trainer.train_steps()
      if kill_at is not None:
        trainer.with_training_hooks(KillAfterCheckpoint(kill_at))
      trainer.train(train_ds)
      trainer.close()
      params = nnx.as_pure(nnx.state(model, nnx.Param))
      flat = {{jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(params)}}
      np.savez(out_path, __started_at=started_at, __losses=np.asarray(trainer.metrics_logger.values("loss")), **flat)


    if __name__ == "__main__":
      run(sys.argv[1], sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else None)
    """
)


def _run_worker(script, *args, cache_dir):
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
  # Both subprocesses compile the same step: share it through JAX's persistent cache.
  env["JAX_COMPILATION_CACHE_DIR"] = str(cache_dir)
  env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  command = [sys.executable, str(script), *map(str, args)]
  return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)


def test_resume_after_sigkill_matches_an_uninterrupted_run(tmp_path):
  script = tmp_path / "worker.py"
  script.write_text(WORKER.format(tiny_bpe=REPO / "easytunix/presets/assets/tiny_bpe"))
  cache = tmp_path / "jax_cache"

  killed = _run_worker(script, tmp_path / "ckpt", tmp_path / "killed.npz", 10, cache_dir=cache)
  assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
  assert not (tmp_path / "killed.npz").exists()
  assert sorted(int(p.name) for p in (tmp_path / "ckpt").iterdir() if p.name.isdigit()) == [5, 10]

  resumed = _run_worker(script, tmp_path / "ckpt", tmp_path / "resumed.npz", cache_dir=cache)
  assert resumed.returncode == 0, resumed.stderr[-3000:]

  spec = importlib.util.spec_from_file_location("sft_resume_worker", script)
  worker = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(worker)
  worker.run(str(tmp_path / "ckpt_ref"), str(tmp_path / "reference.npz"))

  got = np.load(tmp_path / "resumed.npz")
  want = np.load(tmp_path / "reference.npz")
  assert int(got["__started_at"]) == 10 and int(want["__started_at"]) == 0
  # The resumed run logged steps 11..20; they continue the reference curve. Exactly: both runs execute
  # the same compiled step on this machine, on the same batches, from bit-exact restored parameters and
  # Adam state, so every float32 sum runs in the same order. (Were the runs not bitwise equal, 10 Adam
  # steps would amplify the difference far beyond any round-off tolerance anyway.)
  np.testing.assert_array_equal(got["__losses"], want["__losses"][10:])
  params = [k for k in want.files if not k.startswith("__")]
  assert params and sorted(params) == sorted(k for k in got.files if not k.startswith("__"))
  for key in params:
    np.testing.assert_array_equal(got[key], want[key], err_msg=key)
  assert sorted(int(p.name) for p in (tmp_path / "ckpt").iterdir() if p.name.isdigit()) == [15, 20]


def _batches(n, seed=0):
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(n):
    start = rng.integers(3, 400, (4, 1))
    tokens = (start + np.arange(10)).astype(np.int32)
    out.append(TrainingInput(input_tokens=tokens, input_mask=np.ones_like(tokens, bool)))
  return out


@pytest.fixture(scope="module")
def base_model():
  return Qwen3(ModelConfig.tiny(num_layers=1), rngs=nnx.Rngs(0))


def _lora_model(base_model):
  return lora.apply_lora(nnx.clone(base_model), rank=2, targets=("q_proj", "v_proj"), seed=1)


def test_lora_checkpoint_holds_only_the_adapters_and_restores_them(base_model, tmp_path):
  root = tmp_path / "ckpt"
  model = _lora_model(base_model)
  config = TrainingConfig(max_steps=3, checkpoint_root_directory=str(root), show_progress_bar=False)
  trainer = PeftTrainer(model, optax.adam(1e-2), config)
  trainer.train(_batches(3))
  trainer.close()

  saved = trainer.checkpoint_manager.saved_parameter_paths(3)
  expected = [f"layers.{i}.attn.{p}.lora_{ab}" for i in range(1) for p in ("q_proj", "v_proj") for ab in "ab"]
  assert saved == sorted(expected)
  size = sum(p.stat().st_size for p in (root / "3").rglob("*") if p.is_file())
  assert size < 200_000, f"a LoRA checkpoint of a tiny model should be small, got {size} bytes"

  fresh = _lora_model(base_model)
  resumed = PeftTrainer(fresh, optax.adam(1e-2), config)
  assert resumed.train_steps() == 3
  want = nnx.as_pure(lora.lora_params(model))
  got = nnx.as_pure(lora.lora_params(fresh))
  for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  for a, b in zip(jax.tree.leaves(trainer.opt_state), jax.tree.leaves(resumed.opt_state)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  resumed.close()

  # A checkpoint with adapters cannot be restored into a model without them.
  with pytest.raises(ValueError, match="saved with LoRA adapters but the model has none"):
    PeftTrainer(nnx.clone(base_model), optax.adam(1e-2), config)


def test_checkpoint_manager_interval_and_retention(base_model, tmp_path):
  manager = CheckpointManager(tmp_path / "m", CheckpointingOptions(save_interval_steps=2, max_to_keep=2))
  model = nnx.clone(base_model)
  saved = [manager.save(step, model, metadata={"note": step}) for step in range(1, 8)]
  assert saved == [False, True, False, True, False, True, False]
  assert manager.save(7, model, force=True)
  manager.wait_until_finished()
  assert manager.all_steps() == [6, 7]
  assert manager.latest_step() == 7
  restored = manager.maybe_restore(nnx.clone(base_model), step=6)
  assert restored.step == 6 and restored.metadata["note"] == 6 and restored.opt_state is None
  manager.close()
  with pytest.raises(ValueError, match="save_interval_steps must be a positive int"):
    CheckpointingOptions(save_interval_steps=0)
