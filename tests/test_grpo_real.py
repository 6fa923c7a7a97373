"""LoRA GRPO of real pretrained weights (SmolLM2-135M-Instruct) on CPU with a format and a correctness reward."""

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from easytunix.convert.real_models import ensure_real_model
from easytunix.generate.tokenizer_adapter import TokenizerAdapter
from easytunix.models import load_model
from easytunix.rl.grpo import GrpoConfig, GrpoLearner
from easytunix.rl.grpo.rewards import last_number_match, regex_format
from easytunix.rl.rl_cluster import ClusterConfig, RLCluster, RLTrainingConfig, RolloutConfig
from easytunix.sft import lora

pytestmark = pytest.mark.real_weights


def test_lora_grpo_of_smollm2_runs_several_steps():
  folder = ensure_real_model("smollm2-135m-instruct")
  tokenizer = TokenizerAdapter.from_pretrained(folder)
  model = load_model(folder, dtype="float32")
  lora.apply_lora(model, rank=8, alpha=16.0)
  base_before = jax.tree.map(np.asarray, nnx.to_pure_dict(lora.base_params(model)))

  def batch(pairs):
    prompts = [[{"role": "user", "content": f"What is {a} + {b}? Reply with the number only."}] for a, b in pairs]
    ids = [tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=True) for p in prompts]
    return {"prompts": [p[0]["content"] for p in prompts], "prompt_ids": ids, "answer": [a + b for a, b in pairs]}

  batches = [batch([(3, 4), (10, 5)]), batch([(7, 8), (2, 9)]), batch([(12, 1), (6, 6)])]
  config = ClusterConfig(
      training_config=RLTrainingConfig(actor_optimizer=optax.adamw(1e-4), max_steps=3, show_progress_bar=False),
      rollout_config=RolloutConfig(max_tokens_to_generate=12, max_prompt_length=64, temperature=0.9),
  )
  cluster = RLCluster(model, tokenizer=tokenizer, cluster_config=config)
  assert cluster.reference_kind == "lora_disabled"
  rewards = [regex_format(r"^\s*\d+\s*$", reward=0.5, name="number_only"), last_number_match]
  learner = GrpoLearner(cluster, rewards, GrpoConfig(num_generations=4, beta=0.04, async_rollout=False))
  learner.train(batches)
  log = learner.trainer.metrics_logger
  print("reward", log.values("reward"), "kl", log.values("kl"), "lengths", log.values("completion_length"))
  assert learner.trainer.train_steps() == 3
  assert all(np.isfinite(log.values("loss")))
  assert log.values("kl")[0] == 0.0 and log.values("kl")[-1] > 0.0  # adapters start at zero, then move
  assert np.mean(log.values("rewards/last_number_match")) > 0.2  # the instruct model can add small numbers
  assert cluster.rollout_sampler().trace_counts == {"prefill": 1, "decode": 1}
  base_after = jax.tree.map(np.asarray, nnx.to_pure_dict(lora.base_params(model)))
  assert all(jax.tree.leaves(jax.tree.map(np.array_equal, base_before, base_after)))
