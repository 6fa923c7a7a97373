"""The Keras-style facade: from_preset -> compile -> fit -> generate, callbacks, export, errors."""

import logging
import math
import warnings

import jax.numpy as jnp
import numpy as np
import pytest

from easytunix import callbacks
from easytunix.presets import CausalLM, Gemma3, Llama3, Qwen3, list_presets

TEXTS = [f"the {w} cat sat on the {v} mat." for w in ("red", "big", "old", "shy") for v in ("blue", "soft", "flat", "warm")]


def _losses():
  seen = []
  return seen, callbacks.LambdaCallback(on_train_batch_end=lambda batch, logs: seen.append(logs["loss"]))


def test_three_line_finetune_loss_falls():
  seen, cb = _losses()
  m = Qwen3.from_preset("qwen3_tiny")
  m.compile(trainer="sft", lora_rank=8, learning_rate=1e-2)
  history = m.fit(TEXTS * 4, epochs=1, batch_size=8, callbacks=[cb], verbose=0)
  assert len(seen) == 8 and all(math.isfinite(x) for x in seen)
  assert np.mean(seen[-3:]) < np.mean(seen[:3]) - 0.3, seen
  assert {"loss", "grad_norm", "learning_rate", "tokens_per_second"} <= set(history.history)
  assert all(len(values) == 1 for values in history.history.values()) and len(history.steps) == 8


@pytest.fixture(scope="module")
def tuned():
  """A qwen3_tiny fine-tuned with LoRA for a few steps (shared by several tests)."""
  m = Qwen3.from_preset("qwen3_tiny", seed=1)
  m.compile(trainer="sft", lora_rank=4, learning_rate=1e-2)
  m.fit(TEXTS, epochs=2, batch_size=8, verbose=0)
  return m


def test_user_callback_sees_loss_every_step_and_epoch_logs(tuned):
  batches, epochs = [], []

  class Spy(callbacks.Callback):
    def on_train_batch_end(self, batch, logs=None):
      batches.append((batch, logs["loss"], logs["step"]))

    def on_epoch_end(self, epoch, logs=None):
      epochs.append((epoch, logs))

  tuned.fit(TEXTS, epochs=2, batch_size=8, validation_data=TEXTS[:8], callbacks=[Spy()], verbose=0)
  assert [b for b, _, _ in batches] == [0, 1, 0, 1]
  assert [s for _, _, s in batches] == sorted(s for _, _, s in batches)
  assert [e for e, _ in epochs] == [0, 1]
  assert {"loss", "val_loss", "val_perplexity"} <= set(epochs[0][1])


def test_early_stopping_stops_and_restores_best():
  m = Qwen3.from_preset("qwen3_tiny", seed=2)
  # A learning rate far too high makes the validation loss rise after the first epoch.
  m.compile(trainer="sft", learning_rate=5.0, optimizer="sgd", max_grad_norm=None)
  stop = callbacks.EarlyStopping(monitor="val_loss", patience=1, restore_best_weights=True)
  history = m.fit(TEXTS, epochs=10, batch_size=16, validation_data=TEXTS[:8], callbacks=[stop], verbose=0)
  assert stop.stopped_epoch is not None and len(history.history["loss"]) < 10
  # The same float32 evaluation of the restored weights (a mean over ~100 tokens, ~1e-7 relative
  # round-off); at this learning rate a later epoch's weights give a visibly higher loss.
  assert m.evaluate(TEXTS[:8])["loss"] == pytest.approx(stop.best, rel=1e-4)


def test_model_checkpoint_save_best_only_keeps_best(tmp_path):
  m = Qwen3.from_preset("qwen3_tiny", seed=3)
  m.compile(trainer="sft", learning_rate=1e-2)
  ckpt = callbacks.ModelCheckpoint(tmp_path / "best", monitor="val_loss", save_best_only=True)
  history = m.fit(TEXTS, epochs=3, batch_size=16, validation_data=TEXTS[:8], callbacks=[ckpt], verbose=0)
  best = min(history.history["val_loss"])
  assert ckpt.best == pytest.approx(best)  # the same logged float, read twice
  fresh = Qwen3.from_preset("qwen3_tiny", seed=3)
  fresh.compile(trainer="sft")
  callbacks.ModelCheckpoint.restore(fresh, tmp_path / "best")
  # Restored weights are exact; a fresh model's evaluation may compile the same math in another order
  # (~1e-7 relative), far below the loss change of one epoch at lr 1e-2.
  assert fresh.evaluate(TEXTS[:8])["loss"] == pytest.approx(best, rel=1e-4)


def test_terminate_on_nan_keeps_checkpoint_before_nan(tmp_path):
  m = Qwen3.from_preset("qwen3_tiny", seed=4)
  m.compile(trainer="sft", optimizer="sgd", learning_rate=1e12, max_grad_norm=None)
  ckpt = callbacks.ModelCheckpoint(tmp_path / "step_{step}", save_freq=1, monitor="loss")
  seen, spy = _losses()
  m.fit(TEXTS * 4, epochs=5, batch_size=8, callbacks=[spy, callbacks.TerminateOnNaN(), ckpt], verbose=0)
  assert not math.isfinite(seen[-1]) and all(math.isfinite(x) for x in seen[:-1])
  assert len(seen) < 40
  # The loss of step k is computed with the weights saved after step k - 1: the
  # last checkpoint whose loss was finite is the one before the NaN step's weights.
  assert len(seen) >= 3, seen
  before = [p for p in ckpt.saved if p.endswith(f"step_{len(seen) - 2}")]
  assert before, ckpt.saved
  fresh = Qwen3.from_preset("qwen3_tiny", seed=4)
  callbacks.ModelCheckpoint.restore(fresh, before[0])
  logits, _ = fresh(jnp.ones((1, 4), jnp.int32))
  assert np.isfinite(np.asarray(logits)).all()


def test_generate_shapes_and_streaming(tuned):
  one = tuned.generate("the red cat", max_length=6)
  many = tuned.generate(["the red cat", "the old"], max_length=6)
  assert isinstance(one, str) and isinstance(many, list) and len(many) == 2
  assert many[0] == one
  pieces = list(tuned.generate("the red cat", max_length=6, stream=True))
  assert "".join(pieces) == one
  sampled = tuned.generate(["the red cat"] * 2, max_length=6, sampler="top_p", seed=3, temperature=1.0)
  assert sampled == tuned.generate(["the red cat"] * 2, max_length=6, sampler="top_p", seed=3, temperature=1.0)


def test_export_merged_lora_loads_in_transformers(tuned, tmp_path):
  torch = pytest.importorskip("torch")
  import transformers

  folder = tuned.export_safetensors(tmp_path / "hf", merge_lora=True)
  hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager")
  tokens = np.array([tuned.tokenizer.encode("the red cat sat on")], np.int32)
  with torch.no_grad():
    expected = hf(torch.tensor(tokens, dtype=torch.long)).logits.numpy()
  got = np.asarray(tuned(jnp.asarray(tokens))[0])
  # torch on merged weights vs XLA with adapters: float32 round-off of 2 layers of 64-512-term sums,
  # ~1e-6 of the largest |logit| (as in test_models_parity); unmerged or mis-scaled adapters are > 1e-3 off.
  assert np.abs(got - expected).max() <= 2e-5 * np.abs(expected).max()
  assert transformers.AutoTokenizer.from_pretrained(folder)("the red cat")["input_ids"] == tuned.tokenizer.encode("the red cat")
  with pytest.raises(ValueError, match="would drop them"):
    tuned.export_safetensors(tmp_path / "nolora", merge_lora=False)


def test_save_to_preset_round_trip_with_adapters(tuned, tmp_path, caplog):
  folder = tuned.save_to_preset(tmp_path / "preset")
  with caplog.at_level(logging.WARNING):
    again = CausalLM.from_preset(folder)
  assert not caplog.records, [r.getMessage() for r in caplog.records]  # the adapters file is not base weights
  assert type(again) is Qwen3
  tokens = jnp.asarray([tuned.tokenizer.encode("the big cat")])
  # Saved float32 weights come back bit for bit and run the same eager forward: bitwise equal.
  np.testing.assert_array_equal(np.asarray(again(tokens)[0]), np.asarray(tuned(tokens)[0]))
  assert "LoRA" in again.summary(print_fn=None)


def test_presets_listing_and_families():
  names = list_presets()
  for tiny in ("gemma_tiny", "gemma3_tiny", "llama3_tiny", "qwen3_tiny", "qwen3_moe_tiny"):
    assert tiny in names
  assert type(CausalLM.from_preset("gemma3_tiny")) is Gemma3
  a = Llama3.from_preset("llama3_tiny", seed=5)
  b = Llama3.from_preset("llama3_tiny", seed=5)
  np.testing.assert_array_equal(np.asarray(a.embedder.embedding[...]), np.asarray(b.embedder.embedding[...]))


def test_error_messages(tmp_path):
  with pytest.raises(ValueError, match=r"Unknown preset 'qwen3_tiyn'.*Did you mean 'qwen3_tiny'"):
    Qwen3.from_preset("qwen3_tiyn")
  with pytest.raises(ValueError, match=r"'gemma3_tiny' is a gemma3 preset.*Gemma3\.from_preset"):
    Qwen3.from_preset("gemma3_tiny")
  m = Qwen3.from_preset("qwen3_tiny")
  with pytest.raises(RuntimeError, match=r"Call compile\(\) before fit\(\)"):
    m.fit(TEXTS)
  with pytest.raises(ValueError, match=r"Unknown trainer 'ppo'"):
    m.compile(trainer="ppo")
  with pytest.raises(ValueError, match=r"unknown option\(s\) \['beta'\].*options of trainer \['dpo', 'grpo'\]"):
    m.compile(trainer="sft", beta=0.1)
  with pytest.raises(ValueError, match=r"trainer='distill'\) needs teacher and distill"):
    m.compile(trainer="distill")
  m.compile(trainer="sft")
  with pytest.raises(ValueError, match=r"record 1 does not fit trainer='sft'.*found keys \['answer', 'question'\]"):
    m.fit([{"text": "ok"}, {"question": "q", "answer": "a"}])


def test_truncation_warns_and_refuses_to_drop_a_whole_completion():
  m = Qwen3.from_preset("qwen3_tiny")
  m.compile(trainer="sft", max_length=16)
  long_text = "word " * 40
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    m.fit([long_text] * 8 + ["short"] * 8, batch_size=8, verbose=0)
  assert any("8 of 16 examples" in str(w.message) and "truncated" in str(w.message) for w in caught)
  with pytest.raises(ValueError, match="no completion token left after truncation"):
    m.fit([{"prompt": long_text, "completion": "yes"}] * 8, batch_size=8, verbose=0)


def test_compile_distill_behind_the_facade():
  from easytunix.distillation import LogitStrategy

  teacher = Qwen3.from_preset("qwen3_tiny", seed=7)
  student = Qwen3.from_preset("qwen3_tiny", seed=8, num_layers=1)
  seen, spy = _losses()
  student.compile(trainer="distill", teacher=teacher, distill=LogitStrategy(temperature=1.0, alpha=0.0),
                  learning_rate=1e-2)
  history = student.fit(TEXTS, epochs=3, batch_size=8, callbacks=[spy], verbose=0)
  assert np.mean(seen[-2:]) < np.mean(seen[:2]), seen
  assert {"loss", "task_loss", "distill_loss"} <= set(history.history)
  assert len(history.history["distill_loss"]) == 3 and len(history.steps) == 6
  other = Gemma3.from_preset("gemma3_tiny")
  with pytest.raises(ValueError, match="teacher's tokenizer"):
    student.compile(trainer="distill", teacher=other, distill=LogitStrategy())


def test_compile_dpo_behind_the_facade():
  from easytunix.rl.dpo.synthetic import answer_style_task

  records = answer_style_task(num_train=64, num_eval=8, seed=0).train
  m = Qwen3.from_preset("qwen3_tiny", seed=9)
  m.compile(trainer="dpo", beta=0.5, lora_rank=4, learning_rate=1e-2, max_length=16)
  accuracy = []
  cb = callbacks.LambdaCallback(on_train_batch_end=lambda b, logs: accuracy.append(logs["rewards/accuracies"]))
  history = m.fit(records, epochs=2, batch_size=16, callbacks=[cb], verbose=0)
  assert len(accuracy) == 8 and np.mean(accuracy[-2:]) > np.mean(accuracy[:2])
  # TRL's metric names, as epoch means in History.
  assert {"rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected"} <= set(history.history)
  assert history.history["rewards/accuracies"][-1] >= 0.85, history.history
  with pytest.raises(ValueError, match=r"expects keys 'prompt'\+'chosen'\+'rejected'; found keys \['chosen', 'prompt'\]"):
    m.fit([{"prompt": "1+1=", "chosen": "2"}], verbose=0)


def test_compile_grpo_behind_the_facade():
  from easytunix.rl.grpo.rewards import exact_match

  records = [{"prompt": f"{a}+{b}=", "answer": str(a + b)} for a in range(4) for b in range(4)]
  m = Qwen3.from_preset("qwen3_tiny", seed=3)
  with pytest.raises(ValueError, match="needs reward_fns"):
    m.compile(trainer="grpo")
  with pytest.raises(ValueError, match="temperature must be > 0"):
    m.compile(trainer="grpo", reward_fns=[exact_match], temperature=0.0)
  m.compile(trainer="grpo", reward_fns=[exact_match], num_generations=4, max_new_tokens=4, lora_rank=4,
            learning_rate=1e-3, max_length=24)
  with pytest.raises(ValueError, match="batch_size=6 is not a multiple of num_generations=4"):
    m.fit(records, steps=1, batch_size=6, verbose=0)
  with pytest.raises(ValueError, match="record 0 does not fit trainer='grpo'"):
    m.fit([{"question": "1+1="}], steps=1, batch_size=8, verbose=0)
  seen, cb = [], callbacks.LambdaCallback(on_train_batch_end=lambda batch, logs: seen.append(logs))
  chat = [{"prompt": [{"role": "user", "content": "2+2="}], "answer": "4"}] * 2
  history = m.fit(records + chat, steps=3, batch_size=8, validation_data=records[:4], callbacks=[cb], verbose=0)
  assert len(seen) == 3
  assert {"loss", "reward", "rewards/exact_match", "kl", "clip_fraction", "completion_length"} <= set(seen[0])
  assert {"loss", "reward", "kl", "val_reward"} <= set(history.history)
  assert set(m.evaluate(records[:4], batch_size=4)) == {"reward", "rewards/exact_match"}


def test_a_registered_recipe_drives_compile_fit_and_cleanup(monkeypatch):
  from easytunix.sft import recipe as recipe_lib

  monkeypatch.setattr(recipe_lib, "_RECIPES", dict(recipe_lib._RECIPES))

  class CountingSft(recipe_lib.SftRecipe):
    name = "sft_counting"
    data_format = "sft"
    options = {"use_chat_template": None, "tag": "x"}

    def __init__(self):
      self.finished = []

    def after_fit(self, run):
      self.finished.append(run.trainer.train_steps())
      run.close()
      return None

  recipe = recipe_lib.register_recipe(CountingSft())
  m = Qwen3.from_preset("qwen3_tiny", num_layers=1)
  with pytest.raises(ValueError, match=r"unknown option\(s\) \['beta'\].*options for 'sft_counting': \['tag', 'use_chat_template'\]"):
    m.compile(trainer="sft_counting", beta=0.1)
  with pytest.raises(ValueError, match=r"Unknown trainer 'nope'.*'sft_counting'"):
    m.compile(trainer="nope")
  m.compile(trainer="sft_counting", tag="y", learning_rate=1e-2)
  history = m.fit(TEXTS, epochs=1, batch_size=8, verbose=0)
  assert recipe.finished == [2] and len(history.history["loss"]) == 1
  with pytest.raises(ValueError, match="record 0 does not fit trainer='sft'"):
    m.fit([{"question": "q"}], verbose=0)
