"""Every family's logits equal transformers' on tiny random checkpoints (float32)."""

import jax.numpy as jnp
import numpy as np
import pytest

from easytunix.models import load_model
from tests import hf_reference

# torch and XLA run the same float32 model with their own summation orders (2-3 layers of 64-512-term
# sums): logits agree to <= 2e-6 of the largest |logit| (measured), whatever the logits' size; a wrong
# rope, norm, mask or position convention moves them by > 1e-3 of it.
LOGIT_TOL = 2e-5


@pytest.mark.parametrize("arch", hf_reference.ARCHITECTURES)
def test_logits_match_transformers(hf_tiny, arch):
  folder, torch_model = hf_tiny(arch)
  model = load_model(folder, dtype="float32")
  tokens, mask = hf_reference.prompts_batch()
  expected = hf_reference.torch_logits(torch_model, tokens, mask)
  logits, _ = model(jnp.asarray(tokens), attention_mask=jnp.asarray(mask))
  got = np.asarray(logits)
  diff = np.abs(got - expected)[mask]
  scale = np.abs(expected[mask]).max()
  assert diff.max() <= LOGIT_TOL * scale, f"{arch}: max |logit diff| {diff.max():.2e}, max |logit| {scale:.2f}"
