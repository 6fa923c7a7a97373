"""Every family's logits equal transformers' on tiny random checkpoints (float32)."""

import jax.numpy as jnp
import numpy as np
import pytest

from easytunix.models import load_model
from tests import hf_reference


@pytest.mark.parametrize("arch", hf_reference.ARCHITECTURES)
def test_logits_match_transformers(hf_tiny, arch):
  folder, torch_model = hf_tiny(arch)
  model = load_model(folder, dtype="float32")
  tokens, mask = hf_reference.prompts_batch()
  expected = hf_reference.torch_logits(torch_model, tokens, mask)
  logits, _ = model(jnp.asarray(tokens), attention_mask=jnp.asarray(mask))
  got = np.asarray(logits)
  diff = np.abs(got - expected)[mask]
  assert diff.max() <= 1e-4, f"{arch}: max |logit diff| {diff.max():.2e}"
