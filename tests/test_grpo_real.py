"""LoRA GRPO of real pretrained weights (SmolLM2-135M-Instruct) on CPU with a format and a correctness reward,
rolled out through vLLM: its greedy output equals the JAX Sampler's before and after training."""


import jax
import numpy as np
import optax
import pytest
from flax import nnx

from easytunix.convert.real_models import ensure_real_model
from easytunix.generate import CacheConfig, Sampler
from easytunix.generate.tokenizer_adapter import TokenizerAdapter
from easytunix.models import load_model
from easytunix.rl.grpo import GrpoConfig, GrpoLearner
from easytunix.rl.grpo.rewards import last_number_match, regex_format
from easytunix.rl.rl_cluster import ClusterConfig, RLCluster, RLTrainingConfig, RolloutConfig
from easytunix.sft import lora

pytestmark = pytest.mark.real_weights


def test_lora_grpo_of_smollm2_with_vllm_rollouts(vllm_installed):
  folder = ensure_real_model("smollm2-135m-instruct")
  tokenizer = TokenizerAdapter.from_pretrained(folder)
  model = load_model(folder, dtype="float32")
  reference = Sampler(load_model(folder, dtype="float32"), tokenizer, CacheConfig.for_model(model, 96))
  chat = [[{"role": "user", "content": q}] for q in ("What is 3 + 4?", "Name a colour.")]
  probe = [tokenizer.encode("The capital of France is")] + [
      tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=True) for c in chat]
  lora.apply_lora(model, rank=8, alpha=16.0)
  base_before = jax.tree.map(np.asarray, nnx.to_pure_dict(lora.base_params(model)))

  def batch(pairs):
    prompts = [[{"role": "user", "content": f"What is {a} + {b}? Reply with the number only."}] for a, b in pairs]
    ids = [tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=True) for p in prompts]
    return {"prompts": [p[0]["content"] for p in prompts], "prompt_ids": ids, "answer": [a + b for a, b in pairs]}

  batches = [batch([(3, 4), (10, 5)]), batch([(7, 8), (2, 9)]), batch([(12, 1), (6, 6)])]
  config = ClusterConfig(
      training_config=RLTrainingConfig(actor_optimizer=optax.adamw(1e-4), max_steps=3, show_progress_bar=False),
      rollout_config=RolloutConfig(max_tokens_to_generate=12, max_prompt_length=64, temperature=0.9,
                                   rollout_vllm_model_version=str(folder)),
      rollout_engine="vllm",
  )
  cluster = RLCluster(model, tokenizer=tokenizer, cluster_config=config)
  assert cluster.reference_kind == "lora_disabled"

  def same_greedy():
    want = reference(probe, 16, eos_tokens=[])
    got = cluster.generate(probe, temperature=0.0, eos_tokens=[], max_generation_steps=16)
    assert got.text == want.text
    assert all(np.array_equal(a, b) for a, b in zip(want.tokens, got.tokens))
    return got.text

  before = same_greedy()
  assert before[0].startswith(" Paris.")
  rewards = [regex_format(r"^\s*\d+\s*$", reward=0.5, name="number_only"), last_number_match]
  learner = GrpoLearner(cluster, rewards, GrpoConfig(num_generations=4, beta=0.04, async_rollout=False))
  learner.train(batches)
  log = learner.trainer.metrics_logger
  print("reward", log.values("reward"), "kl", log.values("kl"), "lengths", log.values("completion_length"))
  assert learner.trainer.train_steps() == 3
  assert all(np.isfinite(log.values("loss")))
  # Adapters start at zero, so the first step's policy is the reference, but computed by another compiled
  # program (train step vs reference pass): log-probs differ by float32 round-off d, and exp(d) - d - 1
  # cancels to 0 or +-6e-8 per token rather than exactly 0. Non-zero starting adapters (d ~ 1e-1) give
  # KL ~ 5e-3. Then the adapters move.
  assert abs(log.values("kl")[0]) <= 1e-6 and log.values("kl")[-1] > 0.0
  assert np.mean(log.values("rewards/last_number_match")) > 0.2  # the instruct model can add small numbers
  base_after = jax.tree.map(np.asarray, nnx.to_pure_dict(lora.base_params(model)))
  assert all(jax.tree.leaves(jax.tree.map(np.array_equal, base_before, base_after)))
  assert cluster.num_weight_syncs == 3 and cluster.last_engine_sync_seconds > 0
  # The engine holds the trained policy: LoRA folded in, equal to the JAX Sampler over the merged weights.
  from easytunix.models.loader import model_params

  merged = {tuple(int(k) if k.isdigit() else k for k in path.split(".")): value
            for path, value in model_params(model, merge_lora=True)}
  reference.update_params(nnx.from_flat_state(merged))
  cluster.sync_weights()
  same_greedy()
  cluster.close()
