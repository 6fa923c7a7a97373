"""Greedy decoding on real pretrained weights equals transformers' generate token for token (float32)."""

import numpy as np
import pytest

from easytunix.convert.real_models import ensure_real_model
from easytunix.generate import CacheConfig, Sampler, TokenizerAdapter
from easytunix.models import load_model

pytestmark = pytest.mark.real_weights

STEPS = 32


def chat(tokenizer, question):
  return tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True)


@pytest.mark.parametrize("name", ["smollm2-135m-instruct", "gemma3-270m"])
def test_greedy_matches_transformers_on_real_weights(name):
  import torch
  import transformers

  torch.set_num_threads(1)  # two OpenMP threads stall each other on a busy 2-core machine
  folder = ensure_real_model(name)
  tokenizer = TokenizerAdapter.from_pretrained(folder)
  prompts = [
      "The capital of France is",
      "Once upon a time, there was a",
      "Here is a short list of prime numbers and why each of them is prime: 2, 3,",
  ]
  if tokenizer.chat_template:
    prompts[1] = chat(tokenizer, "What is 12 + 7? Explain briefly.")
  ids = [tokenizer.encode(p) for p in prompts]
  assert len({len(x) for x in ids}) == 3, "the prompts should have different lengths"
  eos = list(tokenizer.eos_ids)

  model = load_model(folder, dtype="float32")
  sampler = Sampler(model, tokenizer, CacheConfig.for_model(model, cache_size=128))
  got = sampler(prompts, STEPS, eos_tokens=eos)

  reference = transformers.AutoModelForCausalLM.from_pretrained(
      folder, dtype=torch.float32, attn_implementation="sdpa"
  ).eval()
  width = max(map(len, ids))
  pad = tokenizer.pad_id
  input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in ids])
  mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids])
  with torch.no_grad():
    out = reference.generate(
        input_ids=input_ids, attention_mask=mask, do_sample=False, max_new_tokens=STEPS, pad_token_id=pad,
        eos_token_id=eos,
    )
  for row, seq in enumerate(out[:, width:].tolist()):
    cut = [i for i, t in enumerate(seq) if t in eos]
    expected = seq[: cut[0] + 1] if cut else seq
    assert got.tokens[row].tolist() == expected, f"{name} row {row}: {got.text[row]!r}"
    body = expected[:-1] if cut else expected
    assert got.text[row] == tokenizer.decode(body)
  assert max(len(t) for t in got.tokens) >= 16, "generation stopped too early to compare much"
  assert np.all([t.dtype == np.int32 for t in got.tokens])
