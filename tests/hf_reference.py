"""Tiny random transformers models of every supported architecture: the numerics reference."""

from __future__ import annotations

from pathlib import Path

import numpy as np

ARCHITECTURES = ("llama3", "qwen3", "qwen3_moe", "gemma", "gemma3")

_COMMON = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_attention_heads=4, head_dim=16,
               max_position_embeddings=512, initializer_range=0.2)


def hf_config(name: str):
  import transformers as tf

  if name == "llama3":
    return tf.LlamaConfig(**_COMMON, num_hidden_layers=2, num_key_value_heads=2, rms_norm_eps=1e-5,
                          tie_word_embeddings=False,
                          rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=8.0,
                                               low_freq_factor=1.0, high_freq_factor=4.0,
                                               original_max_position_embeddings=64))
  if name == "qwen3":
    return tf.Qwen3Config(**_COMMON, num_hidden_layers=2, num_key_value_heads=2, tie_word_embeddings=True)
  if name == "qwen3_moe":
    return tf.Qwen3MoeConfig(**_COMMON, num_hidden_layers=2, num_key_value_heads=2, num_experts=4,
                             num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True,
                             tie_word_embeddings=False)
  if name == "gemma":
    return tf.GemmaConfig(**_COMMON, num_hidden_layers=2, num_key_value_heads=1)
  if name == "gemma3":
    return tf.Gemma3TextConfig(**_COMMON, num_hidden_layers=3, num_key_value_heads=2, sliding_window=8,
                               layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                               query_pre_attn_scalar=16)
  raise ValueError(f"unknown architecture {name}")


def build_tiny(name: str, folder: Path, seed: int = 0):
  """Builds, randomises (norm weights too) and saves a tiny model; returns (folder, model)."""
  import torch
  import transformers as tf

  torch.manual_seed(seed)
  config = hf_config(name)
  config._attn_implementation = "eager"
  model = tf.AutoModelForCausalLM.from_config(config, attn_implementation="eager").float().eval()
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for pname, p in model.named_parameters():
      if p.ndim == 1:
        p.copy_(torch.rand(p.shape, generator=gen) * 0.5 + 0.75 if "gemma" not in name else torch.rand(p.shape, generator=gen) * 0.5 - 0.25)
  model.save_pretrained(folder)
  return Path(folder), model


def prompts_batch(seed: int = 0, batch: int = 3, max_len: int = 20):
  """Left-padded token ids [B, T] and their validity mask, rows of different lengths."""
  rng = np.random.default_rng(seed)
  step = min(7, (max_len - 2) // max(batch - 1, 1))
  lengths = [max_len - step * i for i in range(batch)]
  tokens = np.zeros((batch, max_len), np.int32)
  mask = np.zeros((batch, max_len), bool)
  for i, n in enumerate(lengths):
    tokens[i, max_len - n :] = rng.integers(3, 512, size=n)
    mask[i, max_len - n :] = True
  return tokens, mask


def torch_logits(model, tokens: np.ndarray, mask: np.ndarray) -> np.ndarray:
  """Reference logits with positions counted from each row's first real token."""
  import torch

  ids = torch.tensor(tokens, dtype=torch.long)
  am = torch.tensor(mask, dtype=torch.long)
  pos = torch.clamp(am.cumsum(-1) - 1, min=0)
  with torch.no_grad():
    out = model(input_ids=ids, attention_mask=am, position_ids=pos)
  return out.logits.float().numpy()
