"""The JAX sampler against transformers' generate on tiny random checkpoints, plus its own contracts.

Samplers are shared per architecture (module fixture) so each compiles its
programs once; most tests reuse the same shapes (batch bucket 4, prompt bucket
16, 32 steps).
"""

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from easytunix.generate import CacheConfig, Sampler, SamplerOutput, TokenizerAdapter, sample_best, sample_top_p
from easytunix.models import load_model
from tests import hf_reference

ASSETS = Path(__file__).resolve().parents[1] / "easytunix" / "presets" / "assets"
# Token-id prompts of different lengths (left-padded into one batch).
PROMPTS = [[5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15], [100, 200, 300, 400, 17], [42, 43]]
STEPS = 32
UNLIKELY_EOS = [3]  # passed to both sides; a random tiny model rarely emits it
TOKENIZER_OF = dict(llama3="tiny_bpe", qwen3="tiny_bpe", qwen3_moe="tiny_bpe", gemma="tiny_sp", gemma3="tiny_sp")


@pytest.fixture(scope="module")
def tiny(hf_tiny):
  """arch -> (sampler, torch model, easytunix model, folder), built once per module."""
  built = {}

  def get(arch):
    if arch not in built:
      folder, torch_model = hf_tiny(arch)
      model = load_model(folder, dtype="float32")
      tokenizer = TokenizerAdapter.from_pretrained(ASSETS / TOKENIZER_OF[arch])
      sampler = Sampler(model, tokenizer, CacheConfig.for_model(model, cache_size=128, max_batch_size=8))
      built[arch] = (sampler, torch_model, model, folder)
    return built[arch]

  return get


def hf_generate(torch_model, prompts, eos, **kwargs):
  """transformers' generate on left-padded prompts; returns each row's new tokens cut after its EOS."""
  import torch

  width = max(map(len, prompts))
  ids = torch.tensor([[0] * (width - len(p)) + list(p) for p in prompts])
  mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
  threads = torch.get_num_threads()
  torch.set_num_threads(1)  # tiny models: threads only add overhead, and stall on a busy machine
  try:
    out = torch_model.generate(
        input_ids=ids, attention_mask=mask, pad_token_id=0, eos_token_id=list(eos), return_dict_in_generate=True,
        output_scores=True, **kwargs,
    )
  finally:
    torch.set_num_threads(threads)
  rows = []
  for seq in out.sequences[:, width:].tolist():
    cut = [i for i, t in enumerate(seq) if t in eos]
    rows.append(seq[: cut[0] + 1] if cut else seq)
  return rows, out


@pytest.mark.parametrize("arch", hf_reference.ARCHITECTURES)
def test_greedy_matches_transformers(tiny, arch):
  import torch

  sampler, torch_model, _, _ = tiny(arch)
  expected, out = hf_generate(torch_model, PROMPTS, UNLIKELY_EOS, do_sample=False, max_new_tokens=STEPS)
  got = sampler(PROMPTS, STEPS, eos_tokens=UNLIKELY_EOS, return_logprobs=True)
  assert [t.tolist() for t in got.tokens] == expected
  # The per-token log-probabilities are those of transformers' step logits.
  hf_logprobs = torch.log_softmax(torch.stack(out.scores, 1), -1).numpy()
  for row, tokens in enumerate(expected):
    want = hf_logprobs[row, np.arange(len(tokens)), tokens]
    # torch vs XLA float32, through 32 cached decode steps: log-probs (|.| ~ 6) measured <= 3.6e-6 apart;
    # 2e-4 still sits far below the > 1e-2 a wrong position, cache slot or mask produces.
    np.testing.assert_allclose(got.logprobs[row], want, atol=2e-4)
  assert got.padded_prompt_tokens.shape == (3, 16)
  assert got.padded_prompt_tokens[2].tolist() == [0] * 14 + PROMPTS[2]


def test_rows_stop_at_their_eos(tiny):
  sampler, torch_model, _, _ = tiny("llama3")
  free = sampler(PROMPTS, STEPS, eos_tokens=[])
  assert all(len(t) == STEPS for t in free.tokens)
  eos = [int(free.tokens[0][3]), int(free.tokens[1][6])]
  got = sampler(PROMPTS, STEPS, eos_tokens=eos)
  expected, _ = hf_generate(torch_model, PROMPTS, eos, do_sample=False, max_new_tokens=STEPS)
  assert [t.tolist() for t in got.tokens] == expected
  assert len(got.tokens[0]) <= 4 and got.tokens[0][-1] in eos


@pytest.mark.parametrize("early_stopping", [False, True])
def test_beam_search_matches_transformers(tiny, early_stopping):
  sampler, torch_model, _, _ = tiny("llama3")
  prompts = PROMPTS + [[40, 41, 300], [77] * 6]  # 5 prompts: the batch bucket (6) has a padding row
  greedy = sampler(prompts, 16, eos_tokens=[])
  # Stop tokens the beams actually meet, so finished hypotheses compete with running ones.
  eos = sorted({int(t) for row in greedy.tokens for t in row[2:6]})[:2]
  expected, _ = hf_generate(
      torch_model, prompts, eos, do_sample=False, num_beams=3, max_new_tokens=16, early_stopping=early_stopping
  )
  got = sampler(prompts, 16, beam_size=3, eos_tokens=eos, early_stopping=early_stopping, return_logprobs=True)
  assert [t.tolist() for t in got.tokens] == expected
  assert any(len(t) < 16 for t in got.tokens), "no beam finished early: the test lost its EOS coverage"
  assert all(len(lp) == len(t) and np.all(lp <= 0) for lp, t in zip(got.logprobs, got.tokens))


def test_beam_size_one_is_greedy(tiny):
  sampler, _, _, _ = tiny("llama3")
  greedy = sampler(PROMPTS, 16, eos_tokens=[])
  beam = sampler(PROMPTS, 16, eos_tokens=[], beam_size=1)
  assert [t.tolist() for t in beam.tokens] == [t.tolist() for t in greedy.tokens]


def test_sampling_is_deterministic_for_a_seed(tiny):
  sampler, _, _, _ = tiny("llama3")
  kw = dict(temperature=0.9, top_p=0.9, top_k=40, eos_tokens=[])
  a = sampler(PROMPTS, STEPS, seed=7, **kw)
  b = sampler(PROMPTS, STEPS, seed=7, **kw)
  c = sampler(PROMPTS, STEPS, seed=8, **kw)
  d, e = sampler(PROMPTS, STEPS, **kw), sampler(PROMPTS, STEPS, **kw)
  assert [t.tolist() for t in a.tokens] == [t.tolist() for t in b.tokens]
  assert [t.tolist() for t in a.tokens] != [t.tolist() for t in c.tokens]
  assert [t.tolist() for t in d.tokens] != [t.tolist() for t in e.tokens]  # seed=None draws fresh keys
  greedy = sampler(PROMPTS, STEPS, eos_tokens=[])
  assert [t.tolist() for t in a.tokens] != [t.tolist() for t in greedy.tokens]


def _filtered_distribution(logits, temperature, top_p, top_k):
  """The reference: softmax(logits / T), keep top-k, then the smallest top-p nucleus, renormalise."""
  z = np.asarray(logits, np.float64) / temperature
  order = np.argsort(-z, kind="stable")
  keep = np.zeros(z.shape, bool)
  keep[order[: top_k or len(z)]] = True
  p = np.where(keep, np.exp(z - z.max()), 0.0)
  p /= p.sum()
  if top_p is not None:
    sorted_p = p[order]
    mass_before = np.cumsum(sorted_p) - sorted_p
    keep_sorted = mass_before < top_p
    p = np.where(np.isin(np.arange(len(z)), order[keep_sorted]), p, 0.0)
    p /= p.sum()
  return p


@pytest.mark.parametrize(
    "temperature,top_p,top_k", [(0.7, None, 5), (1.3, 0.8, None), (1.0, 0.7, 6), (2.0, None, None)]
)
def test_sample_top_p_follows_the_filtered_distribution(temperature, top_p, top_k):
  logits = jnp.asarray([2.0, 1.5, 1.2, 1.0, 0.6, 0.3, 0.0, -0.4, -1.0, -2.0, -3.0, 0.9])
  n = 40_000
  sample = jax.jit(lambda key: sample_top_p(jnp.broadcast_to(logits, (n, 12)), key, temperature, top_p, top_k))
  draws = np.asarray(sample(jax.random.key(0)))
  freq = np.bincount(draws, minlength=12) / n
  want = _filtered_distribution(logits, temperature, top_p, top_k)
  assert np.all(freq[want == 0] == 0), "sampled a token the filters remove"
  total_variation = 0.5 * np.abs(freq - want).sum()
  assert total_variation < 0.015, (freq, want)
  assert int(sample_best(logits)) == 0


@pytest.mark.parametrize("jit", [False, True])
def test_sample_best_is_argmax_with_ties_infinities_and_nans(jit):
  rng = np.random.default_rng(0)
  rows = np.concatenate([
      rng.standard_normal((3, 9)),
      rng.integers(0, 3, (3, 9)),  # ties: the first maximum wins
      np.full((1, 9), -np.inf),
      [[1, np.inf, 2, np.inf, 0, 0, 0, 0, 0]],
      [[np.nan, 5, 1, np.nan, 9, 0, 0, 0, 0]],  # argmax answers the first NaN
      [[3, 1, 2, 8, 8, np.nan, 0, 0, 0]],
  ]).astype(np.float32)
  pick = jax.jit(sample_best) if jit else sample_best
  got = np.asarray(pick(jnp.asarray(rows)))
  assert got.dtype == np.int32
  np.testing.assert_array_equal(got, np.asarray(jnp.argmax(rows, axis=-1)))
  assert int(pick(jnp.asarray(rows[4]))) == int(np.argmax(rows[4]))  # one row, no batch axis


# Prompts of 9-100 tokens: left-padded they fill 8 x 112 slots, 440 of them padding.
VARIED = [list(range(1 + i, 1 + i + n)) for i, n in enumerate([100, 9, 57, 23, 71, 40, 12, 88])]
# Prompts that begin alike (a 30-token "system prompt"): one repeated, one the start of another, one
# sharing a part of it, one with it after a first token (so nothing in common), and one unrelated.
SYSTEM = list(range(200, 230))
SHARED = [
    SYSTEM + list(range(1, 71)),
    SYSTEM + list(range(1, 20)),
    SYSTEM + list(range(1, 71)),
    SYSTEM + [5] * 10,
    [300, *SYSTEM],
    SYSTEM[:12] + [7] * 40,
    SYSTEM + list(range(1, 20)) + [9, 9],
    [3] * 9,
]


@pytest.mark.parametrize("layout", ["ragged", "rows", "shared"])
@pytest.mark.parametrize("arch", ["gemma3", "qwen3_moe", "llama3"])  # gemma3: sliding window 8
def test_packed_prefill_matches_padded_prefill_and_transformers(tiny, arch, layout, monkeypatch):
  """Packed prefills (ragged, rows, ragged with shared prefixes): the padded prefill's state and transformers' tokens."""
  _, torch_model, model, _ = tiny(arch)
  sampler = Sampler(model, None, CacheConfig.for_model(model, cache_size=256, max_batch_size=8))
  sampler._ragged = layout != "rows"  # noqa: SLF001  (these lengths choose the ragged layout when allowed)
  prompts = SHARED if layout == "shared" else VARIED
  packed = sampler._pack(prompts, 8, 112)  # noqa: SLF001
  sampler._packed_layouts.clear()  # noqa: SLF001
  assert packed.ragged == (layout != "rows")
  assert packed.tokens.size < 0.8 * 8 * 112, packed.tokens.shape  # the prompts sit end to end in fewer slots
  if layout == "shared":  # 432 tokens, 240 of them in prefixes other prompts hold too: 192 slots
    assert packed.tokens.size == 192
    assert packed.last[0] == packed.last[2] and packed.last[1] == packed.src[0, 112 - 100 + 48]
  got = sampler.init_sample_state(prompts, 8)
  assert sampler.trace_counts["prefill"] == 1
  with monkeypatch.context() as patch:
    patch.setattr(sampler, "_pack", lambda *args: None)
    want = sampler.init_sample_state(prompts, 8)
  np.testing.assert_array_equal(got.key_valid, want.key_valid)
  np.testing.assert_array_equal(got.positions, want.positions)
  assert int(got.cache.index) == int(want.cache.index) == 112
  np.testing.assert_allclose(got.logits, want.logits, rtol=1e-5, atol=1e-5)
  valid = np.asarray(want.key_valid)
  for ours, padded in zip(got.cache.layers, want.cache.layers):
    k, v = np.asarray(ours.k), np.asarray(ours.v)  # keys [B, K, H, S], values [B, K, S, H]
    keys_valid, values_valid = valid[:, None, None, :], valid[:, None, :, None]
    np.testing.assert_allclose(np.where(keys_valid, k, 0), np.where(keys_valid, padded.k, 0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.where(values_valid, v, 0), np.where(values_valid, padded.v, 0), rtol=1e-5,
                               atol=1e-5)
    assert not np.any(np.where(keys_valid, 0, k)) and not np.any(np.where(values_valid, 0, v))
  expected, _ = hf_generate(torch_model, prompts, UNLIKELY_EOS, do_sample=False, max_new_tokens=8)
  assert [t.tolist() for t in sampler(prompts, 8, eos_tokens=UNLIKELY_EOS).tokens] == expected


def test_packed_layouts_are_reused_and_capped(tiny):
  from easytunix.generate.sampler import PACK_MAX_LAYOUTS

  model = tiny("llama3")[2]
  sampler = Sampler(model, None, CacheConfig.for_model(model, cache_size=256, max_batch_size=8))
  sampler(VARIED, 2, eos_tokens=[])
  assert sampler.trace_counts["prefill"] == 1 and sum(map(len, sampler._packed_layouts.values())) == 1  # noqa: SLF001
  sampler(VARIED[::-1], 2, eos_tokens=[])  # the same lengths in another order: the same program
  assert sampler.trace_counts["prefill"] == 1
  rng = np.random.default_rng(0)
  for _ in range(10):  # batches of 8 prompts of 2-100 tokens: one prefill shape, many packings
    lengths = [100, *rng.integers(2, 100, 7)]
    sampler([[7] * n for n in lengths], 2, eos_tokens=[])
  (layouts,) = sampler._packed_layouts.values()  # noqa: SLF001
  assert len(layouts) <= PACK_MAX_LAYOUTS
  assert sampler.trace_counts["prefill"] <= PACK_MAX_LAYOUTS + 1  # those layouts, and the padded program


def test_shared_prefixes_take_one_slot_per_prefix_tree_node():
  from easytunix.generate.utils import share_prefixes

  rng = np.random.default_rng(0)
  for _ in range(20):  # prompts over 3 token ids, so many begin alike; some repeat, some are the start of another
    ids = [rng.integers(0, 3, rng.integers(1, 9)).tolist() for _ in range(rng.integers(1, 12))]
    ids += [ids[0], ids[-1][:2]]
    slots, count = share_prefixes(ids)
    # The prefix tree's nodes: every distinct (prefix of a prompt) gets one slot.
    nodes = {tuple(x[: j + 1]) for x in ids for j in range(len(x))}
    assert count == len(nodes)
    owner = {}
    for x, at in zip(ids, slots):
      assert len(at) == len(x) and at.dtype == np.int64
      for j, slot in enumerate(at.tolist()):
        assert owner.setdefault(slot, tuple(x[: j + 1])) == tuple(x[: j + 1]), "one slot, two different prefixes"
    assert sorted(owner) == list(range(count))
  assert share_prefixes([]) == ([], 0)


def test_packing_plan(tiny):
  from easytunix.generate.utils import pack_rows

  lengths = [len(x) for x in VARIED]
  placed = pack_rows(lengths, 128)
  taken = set()
  for n, (row, offset) in zip(lengths, placed):
    assert offset + n <= 128
    slots = {(row, slot) for slot in range(offset, offset + n)}
    assert not slots & taken, "two prompts share a slot"
    taken |= slots
  assert max(row for row, _ in placed) + 1 == 4  # 400 tokens in 4 rows of 128 (first fit, longest first)
  with pytest.raises(ValueError, match="does not fit"):
    pack_rows([5, 200], 128)
  sampler = tiny("qwen3")[0]
  assert sampler._pack(PROMPTS, 3, 16) is None  # noqa: SLF001  (48 slots: a compile costs more than the padding)
  # Equal lengths that fill their bucket, nothing in common: nothing to save.
  assert sampler._pack([[1 + i] * 112 for i in range(8)], 8, 112) is None  # noqa: SLF001
  # One prompt for 8 samples: its 112 tokens once.
  same = sampler._pack([list(range(1, 113))] * 8, 8, 112)  # noqa: SLF001
  assert same.ragged and same.tokens.shape == (1, 112) and (same.src == np.arange(112)).all()
  assert (same.last == 111).all() and (same.dst // 112 < 8).all()
  # Chat-like lengths: 400 tokens in one row of 400 slots, attention in the 8 left-padded rows.
  ragged = sampler._pack(VARIED, 8, 112)  # noqa: SLF001
  assert ragged.ragged and ragged.tokens.shape == (1, 400)
  np.testing.assert_array_equal(ragged.tokens[0, :100], VARIED[0])
  # Each prompt's tokens go to the end of its left-padded row and come back from there.
  for i, x in enumerate(VARIED):
    slots = ragged.src[i, 112 - len(x) :]
    np.testing.assert_array_equal(ragged.tokens[0, slots], x)
    np.testing.assert_array_equal(ragged.dst[slots], i * 112 + 112 - len(x) + np.arange(len(x)))
    assert ragged.last[i] == slots[-1]
  # One long prompt among short ones: left-padded attention would cost 8 x 512^2, so rows win.
  rows = sampler._pack([[1] * 500] + [[2 + i] * 20 for i in range(7)], 8, 512)  # noqa: SLF001
  assert not rows.ragged and rows.tokens.shape[0] >= 1 and rows.tokens.size < 8 * 512


def test_compiles_once_per_bucket_and_weight_updates_do_not_recompile(tiny):
  _, _, _, folder = tiny("qwen3")
  model = load_model(folder, dtype="float32")
  sampler = Sampler(model, None, CacheConfig.for_model(model, cache_size=128))
  # 5 and 6 prompts share the batch bucket 6, prompts of 9 and 12 tokens the length bucket 16, and 20
  # and 30 steps the steps bucket 32.
  first = sampler([[1, 2, 3], [4, 5, 6, 7, 8], [9] * 9, [10], [1, 1]], 20, eos_tokens=[])
  second = sampler([[11, 12, 13, 14], [15] * 12, [16, 17], [18], [19, 20], [21, 22, 23]], 30, eos_tokens=[])
  assert sampler.trace_counts == {"prefill": 1, "decode": 1}
  assert [len(t) for t in first.tokens] == [20] * 5 and [len(t) for t in second.tokens] == [30] * 6

  def tokens():
    return [t.tolist() for t in sampler([[1, 2, 3], [4, 5], [6], [7], [8]], 20, eos_tokens=[]).tokens]

  before = tokens()
  # New weights as a state (e.g. from a trainer): used at once.
  sampler.update_params(jax.tree.map(lambda x: x * 1.5, nnx.state(model, nnx.Param)))
  assert tokens() != before
  # Another model object with the original weights gives the original tokens back.
  sampler.update_params(load_model(folder, dtype="float32"))
  assert tokens() == before
  # An optimizer-style in-place update of the model the sampler holds is seen too.
  held = sampler.transformer
  held.embedder.embedding[...] = held.embedder.embedding[...] * 0.5
  assert tokens() != before
  assert sampler.trace_counts == {"prefill": 1, "decode": 1}
  # Host arrays (as a checkpoint reader gives them) go where the old weights live: the compiled programs
  # (specialised to their inputs' placement too) run them, none is compiled again.
  expected = tokens()
  compiled = sampler._prefill_jit._cache_size(), sampler._decode_jit._cache_size()  # noqa: SLF001
  sampler.update_params(jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(held, nnx.Param))))
  assert tokens() == expected
  assert (sampler._prefill_jit._cache_size(), sampler._decode_jit._cache_size()) == compiled  # noqa: SLF001

  with pytest.raises(ValueError, match="same shapes and dtypes"):
    sampler.update_params({"embedder": {"embedding": jnp.zeros((7, 3))}})
  with pytest.raises(ValueError, match="different structure"):
    sampler.update_params(load_model(tiny("llama3")[3], dtype="float32"))


def test_training_between_two_calls_compiles_nothing_again():
  """Freshly initialized weights are not pinned to a device, and a jitted train step's outputs are: JAX
  compiles once per placement, so a sampler used before and after training (a GRPO rollout, ``generate``
  after ``fit``) compiled everything twice. The sampler and the trainer pin the model where it is."""
  import optax

  from easytunix.models.qwen3 import ModelConfig, Qwen3
  from easytunix.sft.peft_trainer import PeftTrainer, TrainingConfig, TrainingInput

  model = Qwen3(ModelConfig.tiny(), rngs=nnx.Rngs(0))
  assert not any(x.committed for x in jax.tree.leaves(nnx.state(model)))  # the case this test is about
  sampler = Sampler(model, None, CacheConfig.for_model(model, cache_size=32))
  prompts = [[1, 2, 3], [4, 5]]
  before = [t.tolist() for t in sampler(prompts, 8, eos_tokens=[]).tokens]
  rows = np.arange(1, 25, dtype=np.int32).reshape(2, 12)
  batch = TrainingInput(rows, np.ones_like(rows, bool), np.ones_like(rows, bool))
  PeftTrainer(model, optax.sgd(1.0), TrainingConfig(max_steps=2, show_progress_bar=False)).train([batch] * 2)
  after = [t.tolist() for t in sampler(prompts, 8, eos_tokens=[]).tokens]
  assert after != before  # the sampler runs the trained weights (it holds the model's variables)
  assert (sampler._prefill_jit._cache_size(), sampler._decode_jit._cache_size()) == (1, 1)  # noqa: SLF001


def test_kernel_copies_for_decoding_follow_the_weights(tiny, monkeypatch):
  """On CPU the sampler multiplies a decode step's few rows by [out, in] copies of the Linear kernels
  (``OUT_MAJOR_MAX_BYTES``): made once, reused while the kernels stay, made again as soon as one changes
  (here in place, as an optimizer step does), so the tokens always come from the current weights."""
  import easytunix.generate.sampler as sampler_lib
  from easytunix.layers.linear import out_major_targets

  _, _, _, folder = tiny("llama3")

  def scaled_model():
    model = load_model(folder, dtype="float32")
    for _, m in out_major_targets(model):
      m.kernel[...] = m.kernel[...] * 1.5
    return model

  model = load_model(folder, dtype="float32")
  sampler = Sampler(model, None, CacheConfig.for_model(model, cache_size=128, max_batch_size=8))
  generate = lambda s: s(PROMPTS, STEPS, eos_tokens=UNLIKELY_EOS, return_logprobs=True)  # noqa: E731
  before = generate(sampler)
  copies = sampler._out_major_kernels()  # noqa: SLF001
  targets = out_major_targets(sampler.transformer)
  assert copies is not None and sampler._out_major_kernels() is copies  # noqa: SLF001
  assert sorted(copies) == sorted(path for path, _ in targets)
  for path, m in targets:
    np.testing.assert_array_equal(copies[path], np.asarray(m.kernel[...]).T)
  # The decode program takes them (a product with a copy is fenced by an optimization barrier).
  state = sampler.init_sample_state(PROMPTS, STEPS)
  mode, knobs, _ = sampler._setup(None, None, None, None, UNLIKELY_EOS, [], False, False)  # noqa: SLF001
  lowered = sampler._decode_jit.lower(  # noqa: SLF001
      sampler._weights(), state.cache, state.logits, state.key_valid, state.positions,  # noqa: SLF001
      jnp.zeros(state.logits.shape[0], bool), jax.random.key(0), jnp.int32(STEPS), knobs, mode=mode,
      out_len=state.steps_bucket,
  ).as_text()
  assert lowered.count("optimization_barrier") >= len(targets)

  for path, m in targets:  # in place, as an optimizer step does
    m.kernel[...] = m.kernel[...] * 1.5
  after = generate(sampler)
  fresh = scaled_model()
  expected = generate(Sampler(fresh, None, CacheConfig.for_model(fresh, cache_size=128, max_batch_size=8)))
  assert [t.tolist() for t in after.tokens] == [t.tolist() for t in expected.tokens]
  assert [t.tolist() for t in after.tokens] != [t.tolist() for t in before.tokens]
  for a, b in zip(after.logprobs, expected.logprobs):
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)
  assert sampler._out_major_kernels() is not copies  # noqa: SLF001

  monkeypatch.setattr(sampler_lib, "OUT_MAJOR_MAX_BYTES", 0)  # over the limit: no copies, none kept
  assert sampler._out_major_kernels() is None and sampler._out_major is None  # noqa: SLF001


@pytest.mark.parametrize("arch,sampling", [("llama3", False), ("llama3", True), ("gemma", False)])
def test_stream_joins_to_the_same_text(tiny, arch, sampling):
  sampler, _, _, _ = tiny(arch)
  prompts = ["Hello world, the cat", "Once upon a time there was a little", "Why"]
  kw = dict(temperature=0.8, top_k=50, seed=3) if sampling else {}
  full = sampler(prompts, STEPS, eos_tokens=[], **kw)
  pieces = ["" for _ in prompts]
  tokens = [[] for _ in prompts]
  for chunk in sampler.stream(prompts, STEPS, eos_tokens=[], **kw):
    for row in range(len(prompts)):
      pieces[row] += chunk.text[row]
      tokens[row] += chunk.tokens[row]
  assert pieces == full.text
  assert tokens == [t.tolist() for t in full.tokens]
  assert any(text.strip() for text in full.text)


def test_stream_stops_rows_at_eos_and_echoes(tiny):
  sampler, _, _, _ = tiny("llama3")
  prompts = ["Hello world, the cat", "Why"]
  free = sampler(prompts, STEPS, eos_tokens=[])
  eos = [int(free.tokens[0][2])]
  full = sampler(prompts, STEPS, eos_tokens=eos, echo=True)
  chunks = list(sampler.stream(prompts, STEPS, eos_tokens=eos, echo=True))
  assert chunks[0].step == -1 and chunks[0].text[0] == sampler.tokenizer.decode(sampler.tokenize(prompts[0]))
  assert ["".join(c.text[row] for c in chunks) for row in range(2)] == full.text
  assert chunks[-1].done == [True, True]
  assert full.tokens[0][-1] == eos[0] and full.text[0].startswith("Hello world, the cat")


def test_echo_logits_and_logprobs_agree(tiny):
  sampler, _, _, _ = tiny("llama3")
  out = sampler(PROMPTS, STEPS, eos_tokens=UNLIKELY_EOS, echo=True, return_logits=True, return_logprobs=True)
  assert isinstance(out, SamplerOutput)
  for row, prompt in enumerate(PROMPTS):
    generated = out.tokens[row][len(prompt) :]
    assert out.tokens[row][: len(prompt)].tolist() == prompt
    assert out.logits[row].shape == (len(generated), 512)
    assert out.logits[row].argmax(-1).tolist() == generated.tolist()
    want = jax.nn.log_softmax(jnp.asarray(out.logits[row]), -1)[np.arange(len(generated)), generated]
    # The same float32 logits, log-softmaxed in the decode program and here: a 512-term logsumexp in
    # another order (measured 2.4e-7, ulp(6) = 4.8e-7); a log-prob of another step or token is > 1e-2 off.
    np.testing.assert_allclose(out.logprobs[row], np.asarray(want), atol=1e-5)


def test_forbidden_tokens_are_never_generated(tiny):
  sampler, _, _, _ = tiny("llama3")
  free = sampler(PROMPTS, STEPS, eos_tokens=[])
  banned = sorted({int(t) for row in free.tokens for t in row[:3]})
  out = sampler(PROMPTS, STEPS, eos_tokens=[], forbidden_tokens=banned)
  assert not set(banned) & {int(t) for row in out.tokens for t in row}


def test_gemma_sampler_names_wrap_the_shared_sampler(tiny):
  import sentencepiece as spm

  from easytunix.models.gemma import sampler as gemma_sampler

  shared, _, model, _ = tiny("gemma")
  vocab = spm.SentencePieceProcessor(model_file=str(ASSETS / "tiny_sp" / "tokenizer.model"))
  sampler = gemma_sampler.Sampler(model, vocab, cache_size=128, max_batch_size=8)
  assert isinstance(sampler, Sampler) and gemma_sampler.SamplerOutput is SamplerOutput
  assert gemma_sampler.sample_best is sample_best and gemma_sampler.sample_top_p is sample_top_p
  prompts = ["Hello world, the cat", "Why"]
  out = sampler(prompts, total_generation_steps=STEPS, eos_tokens=[])
  want = shared(prompts, STEPS, eos_tokens=[])
  assert [t.tolist() for t in out.tokens] == [t.tolist() for t in want.tokens]
  assert out.text == want.text
  with pytest.raises(ValueError, match="exactly one of total_generation_steps"):
    sampler(prompts)


def test_bad_inputs_say_what_to_fix(tiny):
  sampler, _, model, _ = tiny("llama3")
  bare = Sampler(model, None, CacheConfig.for_model(model, cache_size=64, max_batch_size=2))
  cases = [
      (lambda: sampler([], 8), ValueError, "prompts is empty"),
      (lambda: sampler("a single string", 8), TypeError, "list of prompts"),
      (lambda: sampler([1, 2, 3], 8), TypeError, "list of prompts"),
      (lambda: sampler([[1, 2], []], 8), ValueError, "prompt 1 is empty"),
      (lambda: sampler([[1, 2, 9999]], 8), ValueError, "outside the model's vocabulary"),
      (lambda: sampler([[1, 2.5]], 8), TypeError, "list of int token ids"),
      (lambda: bare(["hello"], 8), ValueError, "no tokenizer"),
      (lambda: bare.tokenize("hello"), ValueError, "no tokenizer"),
      (lambda: bare([[1] * 70], 8), ValueError, "more than the cache holds"),
      (lambda: bare([[1] * 60], 8), ValueError, "cache_size=64"),
      (lambda: bare([[1], [2], [3]], 8), ValueError, "max_batch_size is 2"),
      (lambda: sampler([[1, 2]], 0), ValueError, "max_generation_steps must be a positive int"),
      (lambda: sampler([[1, 2]], 8, beam_size=2, temperature=0.7), ValueError, "cannot be combined with sampling"),
      (lambda: sampler([[1, 2]], 8, beam_size=2, top_k=5), ValueError, "cannot be combined with sampling"),
      (lambda: sampler([[1, 2]], 8, beam_size=0), ValueError, "beam_size must be a positive int"),
      (lambda: sampler([[1, 2]], 8, beam_size=2, early_stopping="soon"), ValueError, "early_stopping must be"),
      (lambda: sampler([[1, 2]], 8, beam_size=2, return_logits=True), ValueError, "not supported with beam"),
      (lambda: sampler([[1, 2]], 8, temperature=-1.0), ValueError, "temperature must be a number >= 0"),
      (lambda: sampler([[1, 2]], 8, temperature=1.0, top_p=1.5), ValueError, r"top_p must be in \(0, 1\]"),
      (lambda: sampler([[1, 2]], 8, temperature=1.0, top_k=0), ValueError, "top_k must be a positive int"),
      (lambda: sampler([[1, 2]], 8, eos_tokens=["x"]), TypeError, "eos_tokens must be a list of int"),
      (lambda: sampler([[1, 2]], 8, forbidden_tokens=[600]), ValueError, "forbidden_tokens must be ids"),
      (lambda: sampler([[1, 2]], 8, seed="x"), TypeError, "seed must be an int"),
      (lambda: sampler.stream([], 8), ValueError, "prompts is empty"),
      (lambda: Sampler(model, None, {"cache_size": 8}), TypeError, "cache_config must be a CacheConfig"),
      (lambda: Sampler("model", None, None), TypeError, "transformer must be an nnx.Module"),
      (lambda: Sampler(model, 42, CacheConfig.for_model(model, 64)), TypeError, "tokenizer must be"),
      (lambda: Sampler(model, None, CacheConfig(64, 3, 2, 16)), ValueError, "num_layers=3 does not match"),
      (lambda: CacheConfig(0, 2, 2, 16), ValueError, "cache_size must be a positive int"),
      (lambda: CacheConfig(64, 2, 2, 16, max_batch_size=0), ValueError, "max_batch_size must be"),
      (lambda: CacheConfig(64, 2, 2, 16, dtype=jnp.int32), ValueError, "floating dtype"),
      (lambda: CacheConfig.for_model(object(), 64), TypeError, "num_layers, num_kv_heads and head_dim"),
      (lambda: sample_top_p(jnp.zeros(4), jax.random.key(0), 0.0), ValueError, "temperature must be > 0"),
      (lambda: sample_top_p(jnp.zeros(4), jax.random.key(0), 1.0, 0.0), ValueError, "top_p must be in"),
  ]
  for call, error, message in cases:
    with pytest.raises(error, match=message):
      call()
  config = CacheConfig.for_model(model, cache_size=64)
  assert config.max_sequence_length == 64 and config.dtype == jnp.float32
  with pytest.raises(dataclasses.FrozenInstanceError):
    config.cache_size = 5


def test_the_sampler_modules_and_their_shared_pieces(tiny):
  from easytunix.generate import BaseSampler, beam_search, sampler as sampler_module, utils
  from easytunix.generate.base_sampler import SamplerOutput as BaseOutput
  from easytunix.generate.vllm_sampler import VllmSampler
  from easytunix.layers.cache import positions_from_mask

  assert issubclass(Sampler, BaseSampler) and issubclass(VllmSampler, BaseSampler)
  assert BaseOutput is SamplerOutput and callable(beam_search.beam_search)
  assert all(hasattr(sampler_module, name) for name in sampler_module.__all__)
  with pytest.raises(TypeError, match="abstract"):
    BaseSampler(None, None)
  # Buckets: powers of two (at least the minimum, at most the maximum), and two per octave.
  assert [utils.bucket(n, 1) for n in (1, 2, 3, 5, 9)] == [1, 2, 4, 8, 16]
  assert utils.bucket(3) == 16 and utils.bucket(40, 16, 32) == 32
  assert [utils.fine_bucket(n, 1) for n in (1, 3, 4, 5, 7, 9, 13, 17)] == [1, 3, 4, 6, 8, 12, 16, 24]
  assert [utils.fine_bucket(n, 16, 4) for n in (3, 17, 33, 41, 54, 57, 100)] == [16, 20, 40, 48, 56, 64, 112]
  assert [utils.fine_bucket(n, 1, 4) for n in (1, 2, 3, 5, 9)] == [1, 2, 3, 5, 10]
  with pytest.raises(ValueError, match="power of two"):
    utils.fine_bucket(5, 1, 3)
  mask = jnp.asarray([[0, 0, 1, 1, 1], [1, 1, 1, 1, 0]])
  assert positions_from_mask(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 3]]
  # The model owns its output head: logits(hidden) is what the forward pass returns.
  _, _, model, _ = tiny("gemma3")
  tokens = jnp.asarray([PROMPTS[0]])
  logits, _, hidden = model(tokens, return_hidden_states=True)
  np.testing.assert_array_equal(np.asarray(model.logits(hidden)), np.asarray(logits))


@pytest.mark.multi_device
def test_a_model_on_a_mesh_samples_under_it_like_on_one_device(tiny):
  """The programs are traced under the model's mesh (as the trainers' steps are), so its activation
  constraints apply, and they generate what the one-device model does."""
  from jax.sharding import AxisType

  sampler, _, _, folder = tiny("llama3")
  mesh = jax.make_mesh((2, 4), ("fsdp", "tp"), axis_types=(AxisType.Auto, AxisType.Auto))
  model = load_model(folder, dtype="float32", mesh=mesh)
  sharded = Sampler(model, sampler.tokenizer, CacheConfig.for_model(model, cache_size=128, max_batch_size=8))
  assert sharded.mesh == mesh and sampler.mesh is None
  want = sampler(PROMPTS, STEPS, eos_tokens=UNLIKELY_EOS, return_logprobs=True)
  got = sharded(PROMPTS, STEPS, eos_tokens=UNLIKELY_EOS, return_logprobs=True)
  for a, b in zip(want.tokens, got.tokens):
    np.testing.assert_array_equal(a, b)
  # Log-probs (|.| ~ 6) with the matmuls' sums split over 4 tensor-parallel shards: float32 round-off
  # (measured <= 5e-7); a wrong layout is off by far more than 1e-5.
  for a, b in zip(want.logprobs, got.logprobs):
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)
  # A batch of 4 splits over fsdp=2 (3 rows would be replicated, and so left unconstrained).
  tokens, valid = jnp.zeros((4, 16), jnp.int32), jnp.ones((4, 16), bool)
  lowered = sharded._prefill_jit.lower(sharded._weights(), tokens, valid, cache_len=48).as_text()
  assert "sharding_constraint" in lowered  # the model's activation constraints (none without the mesh)
