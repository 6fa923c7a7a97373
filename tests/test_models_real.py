"""Real weights (SmolLM2-135M-Instruct, Gemma-3-270M): logits and token ids equal transformers'."""

import jax.numpy as jnp
import numpy as np
import pytest

from easytunix.models import load_model

pytestmark = pytest.mark.real_weights

PROMPTS = {
    "smollm2-135m-instruct": ["The capital of France is", "def fibonacci(n):", "Water boils at a temperature of 100"],
    "gemma3-270m": ["Once upon a time, there was a", "The three primary colors are", "1, 2, 3, 4,"],
}


@pytest.mark.parametrize("name", sorted(PROMPTS))
def test_real_logits_match_transformers(name):
  torch = pytest.importorskip("torch")
  import transformers

  from easytunix.convert.real_models import ensure_real_model
  from easytunix.generate.tokenizer_adapter import TokenizerAdapter

  folder = ensure_real_model(name)
  hf_tok = transformers.AutoTokenizer.from_pretrained(folder)
  ours_tok = TokenizerAdapter.from_pretrained(folder)
  ids = [ours_tok.encode(p) for p in PROMPTS[name]]
  assert ids == [hf_tok(p)["input_ids"] for p in PROMPTS[name]]

  length = max(map(len, ids))
  tokens = np.zeros((len(ids), length), np.int32)
  mask = np.zeros((len(ids), length), bool)
  for i, row in enumerate(ids):
    tokens[i, length - len(row):] = row
    mask[i, length - len(row):] = True

  hf_model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager")
  with torch.no_grad():
    am = torch.tensor(mask, dtype=torch.long)
    expected = hf_model(
        input_ids=torch.tensor(tokens, dtype=torch.long), attention_mask=am,
        position_ids=torch.clamp(am.cumsum(-1) - 1, min=0),
    ).logits.numpy()
  del hf_model

  model = load_model(folder, dtype="float32")
  got = np.asarray(model(jnp.asarray(tokens), attention_mask=jnp.asarray(mask))[0])
  diff = np.abs(got - expected)[mask]
  scale = np.abs(expected[mask]).max()
  # Real checkpoints (up to thousands of hidden units and dozens of layers) sum far more float32 terms
  # than the tiny parity models (2e-5 there): 1e-3 of the largest |logit| still separates round-off from a
  # wrong convention, and the argmax check below must hold everywhere.
  assert diff.max() / scale <= 1e-3, f"{name}: max |diff| {diff.max():.3e}, max |logit| {scale:.2f}"
  # Same next-token choice everywhere.
  assert (got.argmax(-1)[mask] == expected.argmax(-1)[mask]).mean() == 1.0
