"""DpoTrainer: loss formulas, one compiled step, the reference without a second copy, precomputation, config."""

import gc
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from easytunix.generate.tokenizer_adapter import TokenizerAdapter
from easytunix.layers.sharding import shard_model
from easytunix.models.qwen3 import ModelConfig, Qwen3
from easytunix.rl.dpo import (
    DpoTrainer,
    DpoTrainingConfig,
    TrainExample,
    build_dpo_trainer,
    compute_logps,
    dpo_batches,
    dpo_loss_fn,
)
from easytunix.rl.dpo.dpo_trainer import pair_rows
from tests.tasks import addition_preference_task
from easytunix.sft.lora import apply_lora
from easytunix.sft.peft_trainer import PeftTrainer, TrainingConfig

TINY_BPE = Path(__file__).resolve().parent.parent / "easytunix" / "presets" / "assets" / "tiny_bpe"


@pytest.fixture(scope="module")
def tokenizer():
  return TokenizerAdapter.from_pretrained(TINY_BPE)


@pytest.fixture(scope="module")
def task():
  return addition_preference_task(num_train=64, num_eval=16, seed=0)


_jit_logps = nnx.jit(compute_logps)

# Summed response log-probs (|.| <= ~30, a few tokens each) from two different float32 programs (padded
# [prompt | response] layout vs unpadded sequences, LoRA switched off vs a plain model, 8 shards vs one
# device): measured <= 1.4e-6 apart, ~1e-7 relative. A wrong token shift, mask, padding row or reference
# moves them by O(1).
LOGP_RTOL = 1e-5


def _model(seed=0):
  return Qwen3(ModelConfig.tiny(), rngs=nnx.Rngs(seed))


def _config(**kw):
  return DpoTrainingConfig(show_progress_bar=False, **kw)


# ----------------------------------------------------------- formulas, in numpy


def _np_logps(model, batch, rows):
  """Summed and counted response log-probs per pair, from unpadded sequences (float64 log-softmax).

  Each ``prompt + response`` is right-padded and run with plain causal attention:
  no position or mask handling shared with the library, and a causal model's
  outputs at real tokens cannot see padding to their right.
  """
  sequences, spans = [], []
  for i in range(rows):
    prompt = batch.prompt_ids[i][batch.prompt_mask[i]]
    for key in ("chosen", "rejected"):
      response = getattr(batch, f"{key}_ids")[i][getattr(batch, f"{key}_mask")[i]]
      sequences.append(np.concatenate([prompt, response]))
      spans.append((len(prompt), len(prompt) + len(response)))
  width = max(map(len, sequences))
  tokens = np.zeros((len(sequences), width), np.int32)
  for r, seq in enumerate(sequences):
    tokens[r, : len(seq)] = seq
  logits = np.asarray(nnx.jit(lambda m, t: m(t)[0])(model, jnp.asarray(tokens)), np.float64)
  logits -= logits.max(-1, keepdims=True)
  log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  sums = [sum(log_probs[r, j - 1, tokens[r, j]] for j in range(a, b)) for r, (a, b) in enumerate(spans)]
  counts = [b - a for a, b in spans]
  return {
      "chosen": (np.array(sums[0::2]), np.array(counts[0::2], np.float64)),
      "rejected": (np.array(sums[1::2]), np.array(counts[1::2], np.float64)),
  }


def _log_sigmoid(x):
  return -np.log1p(np.exp(-x))


def _np_loss(loss_type, beta, eps, pc, pr, rc, rr, nc, nr, rpo_alpha=None):
  """The published formulas, written independently of the library."""
  if rpo_alpha is not None:  # Pang et al. 2024: plus the chosen responses' per-token NLL.
    loss, reward_c, reward_r = _np_loss(loss_type, beta, eps, pc, pr, rc, rr, nc, nr)
    return loss - rpo_alpha * pc.sum() / nc.sum(), reward_c, reward_r
  if loss_type == "orpo":  # Hong et al. 2024, Eq. 6-7; beta plays lambda.
    ac, ar = pc / nc, pr / nr
    log_odds = (ac - np.log1p(-np.exp(ac))) - (ar - np.log1p(-np.exp(ar)))
    nll = -pc.sum() / nc.sum()
    return nll - beta * _log_sigmoid(log_odds).mean(), beta * ac, beta * ar
  if loss_type == "ipo":  # Azar et al. 2023, with per-token mean log-probs.
    cr, rj = (pc - rc) / nc, (pr - rr) / nr
    return (((cr - rj) - 1 / (2 * beta)) ** 2).mean(), beta * cr, beta * rj
  cr, rj = pc - rc, pr - rr
  h = beta * (cr - rj)
  if loss_type == "sigmoid":  # Rafailov et al. 2023; eps > 0: conservative DPO.
    losses = -(1 - eps) * _log_sigmoid(h) - eps * _log_sigmoid(-h)
  elif loss_type == "robust":  # Chowdhury et al. 2024.
    losses = (-(1 - eps) * _log_sigmoid(h) + eps * _log_sigmoid(-h)) / (1 - 2 * eps)
  else:  # hinge / SLiC
    losses = np.maximum(0.0, 1 - h)
  return losses.mean(), beta * cr, beta * rj


class _FixedLogits:
  """Stands in for a model: returns logits computed once, so each loss variant runs eagerly without recompiling."""

  def __init__(self, logits):
    self.logits = logits

  def __call__(self, tokens, attention_mask=None, **_):
    assert tokens.shape == self.logits.shape[:2]
    return self.logits, None


@pytest.fixture(scope="module")
def formula_case(tokenizer):
  """Three pairs of different lengths plus a padding row, a random model's logits on them, and
  random reference log-probs; and the log-probs computed independently in numpy."""
  records = [
      {"prompt": "12+7=", "chosen": "19", "rejected": "21"},
      {"prompt": "3+40=", "chosen": "43", "rejected": "4"},
      {"prompt": "1+1=", "chosen": "2", "rejected": "111"},
  ]
  batch = next(iter(dpo_batches(records, tokenizer, batch_size=4, max_length=16, shuffle=False, drop_remainder=False)))
  assert not batch.chosen_mask[3].any()  # a padding row, which the loss must ignore
  model = _model(1)
  rng = np.random.default_rng(0)
  ref_c, ref_r = rng.normal(-12, 2, 4).astype(np.float32), rng.normal(-12, 2, 4).astype(np.float32)
  batch = batch.replace(ref_chosen_logps=ref_c, ref_rejected_logps=ref_r)
  ids, attention, completion = pair_rows(batch)
  logits = nnx.jit(lambda m, t, a: m(t, attention_mask=a)[0])(model, ids, attention)
  example = TrainExample(ids, attention, completion, jnp.asarray(ref_c), jnp.asarray(ref_r))
  return _FixedLogits(logits), example, batch, _np_logps(model, batch, rows=3)


LOSS_CASES = [("sigmoid", 0.1, 0.0, None), ("sigmoid", 0.1, 0.1, None), ("robust", 0.3, 0.1, None),
              ("ipo", 0.1, 0.0, None), ("hinge", 0.5, 0.0, None), ("orpo", 0.2, 0.0, None), ("sigmoid", 0.1, 0.0, 1.0)]


@pytest.mark.parametrize("loss_type,beta,eps,rpo_alpha", LOSS_CASES)
def test_dpo_loss_fn_matches_the_published_formulas(formula_case, loss_type, beta, eps, rpo_alpha):
  model, example, batch, logps = formula_case
  ref_c, ref_r = batch.ref_chosen_logps, batch.ref_rejected_logps
  loss, aux = dpo_loss_fn(model, example, beta, eps, loss_type=loss_type, rpo_alpha=rpo_alpha)

  (pc, nc), (pr, nr) = logps["chosen"], logps["rejected"]
  want, reward_c, reward_r = _np_loss(loss_type, beta, eps, pc, pr, ref_c[:3], ref_r[:3], nc, nr, rpo_alpha)
  # The loss inherits the log-probs' relative accuracy (x2 for the squared IPO term); the atol covers a
  # hinge loss at 0. A wrong formula, beta or eps changes it by > 1e-2 relative (measured: 1% of it used).
  np.testing.assert_allclose(float(loss), want, rtol=2 * LOGP_RTOL, atol=1e-6)
  # Rewards are beta * (log-prob - reference) and can cancel to ~0 in the margin: bound them by the
  # absolute error of beta times two summed log-probs, LOGP_RTOL * max|log-prob| each (5e-5 to 3e-4
  # here, measured <= 3e-7); a missing reference shifts them by beta * |ref| >= 1.
  reward_atol = 2 * beta * LOGP_RTOL * np.abs(np.concatenate([pc, pr])).max()
  np.testing.assert_allclose(float(aux["rewards/chosen"]), reward_c.mean(), rtol=0, atol=reward_atol)
  np.testing.assert_allclose(float(aux["rewards/rejected"]), reward_r.mean(), rtol=0, atol=reward_atol)
  np.testing.assert_allclose(float(aux["rewards/margins"]), (reward_c - reward_r).mean(), rtol=0, atol=2 * reward_atol)
  assert float(aux["rewards/accuracies"]) == pytest.approx(np.mean(reward_c > reward_r))  # a fraction of 3 pairs
  np.testing.assert_allclose(float(aux["logps/chosen"]), pc.mean(), rtol=LOGP_RTOL)
  np.testing.assert_allclose(float(aux["logps/rejected"]), pr.mean(), rtol=LOGP_RTOL)
  assert float(aux["num_tokens"]) == 3.0  # a count, exact in float32
  if loss_type == "orpo" or rpo_alpha is not None:
    np.testing.assert_allclose(float(aux["nll"]), -pc.sum() / nc.sum(), rtol=LOGP_RTOL)



def test_compute_logps_sums_or_averages_the_response_tokens(formula_case):
  # The logits come from the padded [prompt | response] layout; the numpy log-probs from unpadded sequences.
  model, example, _, logps = formula_case
  (pc, nc), (pr, _) = logps["chosen"], logps["rejected"]
  rows = (example.input_ids, example.attention_mask, example.completion_mask)
  chosen, rejected = compute_logps(model, *rows)
  np.testing.assert_allclose(np.asarray(chosen)[:3], pc, rtol=LOGP_RTOL)
  np.testing.assert_allclose(np.asarray(rejected)[:3], pr, rtol=LOGP_RTOL)
  mean_c, _ = compute_logps(model, *rows, average_log_prob=True)
  np.testing.assert_allclose(np.asarray(mean_c)[:3], pc / nc, rtol=LOGP_RTOL)


# --------------------------------------------------------------- the trainer


def test_full_finetuning_trains_against_a_snapshot_and_compiles_once(tokenizer, task):
  model = _model()
  model_bytes = sum(x.nbytes for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  before = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  train = dpo_batches(task.train, tokenizer, batch_size=8, max_length=16, seed=0)
  ev = dpo_batches(task.eval, tokenizer, batch_size=8, max_length=16, shuffle=False)
  baseline = _live_bytes()
  trainer = DpoTrainer(model, None, optax.sgd(3e-2), _config(max_steps=6, beta=0.5, eval_every_n_steps=3))
  assert trainer.reference == "snapshot" and trainer.ref_model is not model
  trainer.train(train, eval_ds=ev)
  assert trainer.num_train_step_traces == 1 and trainer.num_eval_step_traces == 1
  assert trainer.num_ref_traces == 1  # train and eval batches share one shape
  logged = trainer.metrics_logger
  for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
              "logps/rejected"):
    assert len(logged.values(key)) == 6, key
  assert len(logged.values("tokens_per_second")) == 5  # the first step compiles: its time is not a throughput
  assert len(logged.values("rewards/margins", mode="eval")) == 2
  # One more copy of the weights is held (the snapshot); SGD keeps no optimizer state.
  grown = _live_bytes() - baseline
  assert 0.9 * model_bytes < grown < 1.5 * model_bytes, (grown, model_bytes)
  # The reference kept the initial weights while the policy moved.
  ref = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(trainer.ref_model, nnx.Param)))
  after = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  assert all(jax.tree.leaves(jax.tree.map(np.array_equal, before, ref)))
  assert not all(jax.tree.leaves(jax.tree.map(np.array_equal, before, after)))


def _live_bytes():
  gc.collect()
  return sum(x.nbytes for x in jax.live_arrays() if not x.is_deleted())


def test_lora_reference_reuses_the_base_weights_without_a_copy(tokenizer, task):
  model = _model(2)
  model_bytes = sum(x.nbytes for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  batch = next(iter(dpo_batches(task.eval, tokenizer, batch_size=8, max_length=16, shuffle=False)))
  base_chosen, base_rejected = _jit_logps(model, *pair_rows(batch))  # the base model, before LoRA exists

  apply_lora(model, rank=4)
  baseline = _live_bytes()
  train = dpo_batches(task.train, tokenizer, batch_size=8, max_length=16, seed=0)
  trainer = DpoTrainer(model, None, optax.adam(1e-2), _config(max_steps=4, beta=0.5))
  trainer.train(train)
  grown = _live_bytes() - baseline

  assert trainer.ref_model is None and trainer.reference == "lora_disabled"
  assert not [name for name, v in vars(trainer).items() if isinstance(v, nnx.Module) and v is not model]
  # Adapters, their Adam moments, metrics and a batch: far less than one more copy of the model.
  assert grown < 0.3 * model_bytes, (grown, model_bytes)

  ref_chosen, ref_rejected = trainer.compute_ref_logps(batch)
  # Adapters switched off inside another compiled program than the plain model's: float32 round-off
  # only (~2e-4 allowed on |log-prob| ~ 19), while the trained adapters move them by > 1e-3 (below).
  np.testing.assert_allclose(np.asarray(ref_chosen), np.asarray(base_chosen), rtol=LOGP_RTOL, atol=1e-5)
  np.testing.assert_allclose(np.asarray(ref_rejected), np.asarray(base_rejected), rtol=LOGP_RTOL, atol=1e-5)
  policy_chosen, _ = _jit_logps(model, *pair_rows(batch))
  assert np.abs(np.asarray(policy_chosen) - np.asarray(base_chosen)).max() > 1e-3  # the adapters did train



def test_precomputed_reference_logps_are_used_instead_of_a_forward_pass(tokenizer, task):
  train = dpo_batches(task.train, tokenizer, batch_size=8, max_length=16, seed=1)
  trainer = DpoTrainer(_model(3), _model(4), optax.sgd(1e-2), _config(max_steps=3))
  assert trainer.reference == "model"
  indices, batch = next(train.ordered_batches())
  live_chosen, live_rejected = trainer.compute_ref_logps(batch)
  assert trainer.precompute_ref_logps(train) is train
  assert train.ref_chosen_logps.shape == (len(task.train),)
  # The same compiled reference pass on the same batch, stored as float32: bitwise equal.
  np.testing.assert_array_equal(train.ref_chosen_logps[indices], np.asarray(live_chosen))
  np.testing.assert_array_equal(train.ref_rejected_logps[indices], np.asarray(live_rejected))
  assert all(b.ref_chosen_logps is not None for b in train)
  # Any other iterable of batches comes back as a list with the log-probs filled in.
  listed = trainer.precompute_ref_logps([batch])
  np.testing.assert_array_equal(np.asarray(listed[0].ref_chosen_logps), np.asarray(live_chosen))

  def no_reference_pass(*args):
    raise AssertionError("the reference model ran although its log-probs were precomputed")

  trainer._ref_fn = no_reference_pass
  trainer.train(train)
  assert trainer.train_steps() == 3


def test_orpo_needs_no_reference(tokenizer, task):
  model = _model(6)
  apply_lora(model, rank=4)
  train = dpo_batches(task.train, tokenizer, batch_size=8, max_length=16, seed=0)
  trainer = build_dpo_trainer(model, optax.adam(1e-2), loss_type="orpo", beta=0.2, max_length=16, max_steps=3,
                              show_progress_bar=False)
  assert trainer.reference == "none" and trainer.ref_model is None
  trainer.train(train)
  assert trainer.num_ref_traces == 0
  nll = trainer.metrics_logger.values("nll")
  assert len(nll) == 3 and nll[-1] < nll[0]
  assert len(trainer.metrics_logger.values("log_odds_ratio")) == 3


def test_build_dpo_trainer_maps_flat_arguments():
  model = _model()
  trainer = build_dpo_trainer(model, optax.sgd(1e-3), beta=0.2, loss_type="ipo", max_length=64, max_prompt_length=16,
                              max_steps=5, show_progress_bar=False)
  assert isinstance(trainer, PeftTrainer) and isinstance(trainer.config, DpoTrainingConfig)
  assert (trainer.config.beta, trainer.config.loss_type, trainer.config.max_seq_length) == (0.2, "ipo", 64)
  assert (trainer.config.max_prompt_length, trainer.config.max_steps) == (16, 5)


def test_config_and_trainer_errors_say_how_to_fix_them(tokenizer):
  with pytest.raises(ValueError, match=r"loss_type must be one of \['sigmoid', 'robust', 'ipo', 'hinge', 'orpo'\], got 'kto'"):
    DpoTrainingConfig(loss_type="kto")
  with pytest.raises(ValueError, match="beta must be a number > 0"):
    DpoTrainingConfig(beta=0.0)
  with pytest.raises(ValueError, match=r"label_smoothing must be in \[0, 0.5\)"):
    DpoTrainingConfig(label_smoothing=0.5)
  with pytest.raises(ValueError, match="label_smoothing=0.1 applies to loss_type 'sigmoid' or 'robust' only, not 'ipo'"):
    DpoTrainingConfig(loss_type="ipo", label_smoothing=0.1)
  with pytest.raises(ValueError, match="rpo_alpha does not apply to loss_type='orpo'"):
    DpoTrainingConfig(loss_type="orpo", rpo_alpha=1.0)
  with pytest.raises(ValueError, match="rpo_alpha must be a number >= 0 or None, got -1"):
    DpoTrainingConfig(rpo_alpha=-1)
  with pytest.raises(ValueError, match="max_steps must be a positive int"):
    DpoTrainingConfig(max_steps=0)
  model = _model()
  with pytest.raises(TypeError, match="DpoTrainer needs an easytunix.rl.dpo.dpo_trainer.DpoTrainingConfig"):
    DpoTrainer(model, None, optax.sgd(1e-3), TrainingConfig())
  with pytest.raises(ValueError, match="ref_model is the policy itself"):
    DpoTrainer(model, model, optax.sgd(1e-3), _config())
  trainer = DpoTrainer(model, None, optax.sgd(1e-3), _config(max_steps=1))
  with pytest.raises(TypeError, match=r"batches must be easytunix.rl.dpo.TrainingInput, got dict.*dpo_batches"):
    trainer.train([{"prompt": "1+1=", "chosen": "2", "rejected": "3"}])


@pytest.mark.multi_device
def test_sharded_lora_dpo_places_the_reference_pass_on_the_mesh(tokenizer, task):
  """fsdp=2 x tp=4 on 8 CPU devices: reference log-probs match one device; one compiled step."""
  assert jax.device_count() >= 8, "conftest sets 8 CPU devices"
  batch = next(iter(dpo_batches(task.eval, tokenizer, batch_size=8, max_length=16, shuffle=False)))
  base_chosen, _ = _jit_logps(_model(7), *pair_rows(batch))
  mesh = jax.make_mesh((2, 4), ("fsdp", "tp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  model = apply_lora(shard_model(_model(7), mesh), rank=4)
  train = dpo_batches(task.train, tokenizer, batch_size=8, max_length=16, seed=0)
  trainer = DpoTrainer(model, None, optax.adam(1e-2), _config(max_steps=2))
  ref_chosen, _ = trainer.compute_ref_logps(batch)
  assert isinstance(ref_chosen.sharding, jax.sharding.NamedSharding) and ref_chosen.sharding.mesh == mesh
  # Sums split across 8 devices vs one: float32 round-off only (measured 1.9e-6 on |log-prob| ~ 19).
  np.testing.assert_allclose(np.asarray(ref_chosen), np.asarray(base_chosen), rtol=LOGP_RTOL, atol=1e-5)
  trainer.train(train)
  assert trainer.num_train_step_traces == 1
  assert np.isfinite(trainer.metrics_logger.values("loss")).all()
