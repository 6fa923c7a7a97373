"""DPO changes what a tiny preset generates on prompts it never trained on."""

import optax

from easytunix.generate.sampler import CacheConfig, Sampler
from easytunix.presets import Qwen3
from easytunix.rl.dpo import DpoTrainer, DpoTrainingConfig, dpo_batches
from easytunix.rl.dpo.synthetic import answer_style_task
from easytunix.sft.data import SupervisedDataset
from easytunix.sft.lora import apply_lora
from easytunix.sft.peft_trainer import PeftTrainer, TrainingConfig


def test_lora_dpo_teaches_the_preferred_style_on_held_out_prompts():
  """SFT on noisy data (90% of answers repeat the number three times), then LoRA DPO preferring the
  answer said once: greedy answers to held-out prompts stop repeating, held-out reward accuracy >= 0.9."""
  model = Qwen3.from_preset("qwen3_tiny")
  tokenizer = model.tokenizer
  task = answer_style_task(num_eval=64, seed=0)

  def greedy_answers():
    sampler = Sampler(model, tokenizer, CacheConfig.for_model(model, cache_size=32, max_batch_size=64))
    return sampler(task.eval_prompts, max_generation_steps=10).text

  warmup = SupervisedDataset(task.sft_records(chosen_fraction=0.1), tokenizer, batch_size=32, max_length=16, seed=0)
  PeftTrainer(model, optax.adamw(3e-3, weight_decay=0.0), TrainingConfig(max_steps=80, show_progress_bar=False)).train(
      warmup
  )
  before = greedy_answers()
  assert task.chosen_style_rate(before) <= 0.2 and task.rejected_style_rate(before) >= 0.6, before[:8]

  apply_lora(model, rank=8)
  train = dpo_batches(task.train, tokenizer, batch_size=16, max_length=24, seed=0)
  held_out = dpo_batches(task.eval, tokenizer, batch_size=64, max_length=24, shuffle=False)
  config = DpoTrainingConfig(max_steps=40, beta=0.1, show_progress_bar=False)
  trainer = DpoTrainer(model, None, optax.adamw(5e-4, weight_decay=0.0), config)
  trainer.train(train, eval_ds=held_out)

  train_accuracy = trainer.metrics_logger.values("rewards/accuracies")
  assert sum(train_accuracy[-10:]) / 10 >= 0.9, train_accuracy
  assert trainer.metrics_logger.latest("rewards/accuracies", mode="eval") >= 0.9
  assert trainer.metrics_logger.latest("rewards/margins", mode="eval") > 0.3
  # The preferred answers became more likely, not only the dispreferred ones less likely.
  assert trainer.metrics_logger.latest("rewards/chosen", mode="eval") > 0
  after = greedy_answers()
  print("before:", before[:4], "after:", after[:4])
  assert task.chosen_style_rate(after) >= 0.8, after[:8]
