"""LoRA SFT of real pretrained weights (SmolLM2-135M-Instruct) on the bundled instruction set, on CPU."""

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from easytunix.convert.real_models import ensure_real_model
from easytunix.generate.sampler import CacheConfig, Sampler
from easytunix.generate.tokenizer_adapter import TokenizerAdapter
from easytunix.models import load_model
from easytunix.sft import lora
from easytunix.sft.data import SupervisedDataset, bundled_dataset_path, load_records
from easytunix.sft.peft_trainer import PeftTrainer, TrainingConfig

pytestmark = pytest.mark.real_weights


def _ask(tokenizer, question):
  return tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True)


def test_lora_sft_of_smollm2_lowers_the_loss_and_keeps_generating():
  folder = ensure_real_model("smollm2-135m-instruct")
  tokenizer = TokenizerAdapter.from_pretrained(folder)
  model = load_model(folder, dtype="float32")
  lora.apply_lora(model, rank=8, alpha=16.0)
  base_before = jax.tree.map(np.asarray, nnx.to_pure_dict(lora.base_params(model)))

  records = load_records(bundled_dataset_path("instructions"))
  held_out, train = records[:8], records[8:]
  common = dict(tokenizer=tokenizer, batch_size=4, max_length=64, use_chat_template=True)
  train_ds = SupervisedDataset(train, seed=0, **common)
  eval_ds = SupervisedDataset(held_out, shuffle=False, **common)

  optimizer = optax.inject_hyperparams(optax.adamw)(learning_rate=2e-3)
  trainer = PeftTrainer(model, optimizer, TrainingConfig(max_steps=10, show_progress_bar=False))
  before = trainer.evaluate(eval_ds)["loss"]
  trainer.train(train_ds, eval_ds=eval_ds)
  after = trainer.metrics_logger.latest("loss", mode="eval")
  losses = trainer.metrics_logger.values("loss")
  print(f"held-out loss {before:.3f} -> {after:.3f}; train loss {losses[0]:.3f} -> {losses[-1]:.3f}")
  assert trainer.train_steps() == 10
  # Per-batch train losses are noisy (4 short completions each); the fixed held-out set is not.
  assert after < 0.8 * before

  # Only the adapters moved.
  base_after = jax.tree.map(np.asarray, nnx.to_pure_dict(lora.base_params(model)))
  assert all(jax.tree.leaves(jax.tree.map(np.array_equal, base_before, base_after)))

  sampler = Sampler(model, tokenizer, CacheConfig.for_model(model, cache_size=128))
  out = sampler([_ask(tokenizer, "What is the capital of France?"), _ask(tokenizer, "What is the opposite of up?")], 16)
  print(out.text)
  assert "Paris" in out.text[0]
  assert "down" in out.text[1].lower()
