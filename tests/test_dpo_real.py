"""LoRA DPO of real pretrained weights (SmolLM2-135M-Instruct) on CPU: the reward margin grows."""

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from easytunix.convert.real_models import ensure_real_model
from easytunix.generate.tokenizer_adapter import TokenizerAdapter
from easytunix.models import load_model
from easytunix.rl.dpo import DpoTrainer, DpoTrainingConfig, dpo_batches
from easytunix.sft import lora
from easytunix.sft.data import bundled_dataset_path, load_records

pytestmark = pytest.mark.real_weights


def _pairs(records, shift):
  """Chosen: the record's answer; rejected: the answer to another question."""
  return [
      {
          "prompt": [{"role": "user", "content": r["prompt"]}],
          "chosen": r["completion"],
          "rejected": records[(i + shift) % len(records)]["completion"],
      }
      for i, r in enumerate(records)
  ]


def test_lora_dpo_of_smollm2_grows_the_reward_margin():
  folder = ensure_real_model("smollm2-135m-instruct")
  tokenizer = TokenizerAdapter.from_pretrained(folder)
  model = load_model(folder, dtype="float32")
  lora.apply_lora(model, rank=8, alpha=16.0)
  base_before = jax.tree.map(np.asarray, nnx.to_pure_dict(lora.base_params(model)))

  records = load_records(bundled_dataset_path("instructions"))
  held_out, train = _pairs(records[:4], shift=1), _pairs(records[4:40], shift=5)
  train_ds = dpo_batches(train, tokenizer, batch_size=4, max_length=64, seed=0)
  eval_ds = dpo_batches(held_out, tokenizer, batch_size=4, max_length=64, shuffle=False)

  config = DpoTrainingConfig(max_steps=6, beta=0.1, max_seq_length=64, show_progress_bar=False)
  trainer = DpoTrainer(model, None, optax.adamw(1e-3), config)
  assert trainer.ref_model is None and trainer.reference == "lora_disabled"
  trainer.train(train_ds, eval_ds=eval_ds)
  margins = trainer.metrics_logger.values("rewards/margins")
  held_out_margin = trainer.metrics_logger.latest("rewards/margins", mode="eval")
  print(f"train margins {np.round(margins, 3)}; held-out margin {held_out_margin:.3f}")
  # The first step is measured before any update: adapters at zero, policy == reference, up to float32
  # round-off between two compiled programs in sums of <= 64 token log-probs (~1e-5 after beta = 0.1);
  # 1e-3 is 100x that and still far below the trained margins (> 0.3 below).
  assert abs(margins[0]) < 1e-3
  assert np.mean(margins[-2:]) > 0.3 and np.mean(margins[-2:]) > np.mean(margins[:2])
  assert held_out_margin > 0.1
  assert trainer.num_train_step_traces == 1

  # Only the adapters moved.
  base_after = jax.tree.map(np.asarray, nnx.to_pure_dict(lora.base_params(model)))
  assert all(jax.tree.leaves(jax.tree.map(np.array_equal, base_before, base_after)))
