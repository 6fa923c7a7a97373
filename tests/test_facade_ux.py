"""What a facade user sees: TRL-style rewards, History, progress output, the banner and clear errors."""

import io
import re
import warnings

import jax
import numpy as np
import pytest

from easytunix import callbacks
from easytunix.presets import Qwen3
from easytunix.rl.grpo.grpo_learner import compute_rewards
from easytunix.rl.grpo.rewards import exact_match, last_number_match, regex_format
from easytunix.sft.data import SupervisedDataset

TEXTS = [f"the {w} cat sat on the {v} mat." for w in ("red", "big", "old", "shy") for v in ("blue", "soft", "flat")]


def reward_len(completions, **kwargs):
  """TRL's GRPO quickstart reward, unchanged."""
  return [-abs(20 - len(completion)) for completion in completions]


class _Terminal(io.StringIO):
  def isatty(self):
    return True


@pytest.fixture(scope="module")
def sft_run():
  """One short SFT fit (3 steps of 5-step epochs), with a progress bar drawn on a fake terminal."""
  model = Qwen3.from_preset("qwen3_tiny", num_layers=1, seed=11)
  model.compile(trainer="sft", learning_rate=1e-2, max_length=24)
  terminal = _Terminal()
  history = model.fit(TEXTS, epochs=4, steps=3, batch_size=2, validation_split=0.25, verbose=1,
                      callbacks=[callbacks.ProgbarLogger(stream=terminal)])
  return model, history, terminal.getvalue()


def test_progress_bar_counts_the_steps_run_and_the_banner_says_what_trains(sft_run):
  _, _, shown = sft_run
  assert "3/3" in shown and "/5" not in shown, shown
  assert "Epoch 1/1" in shown
  for part in ("trainer='sft'", "parameters:", "9 examples", "5 steps per epoch, 3 steps in all",
               "effective batch: 2 examples per optimizer step", "Compiled the train step in"):
    assert part in shown, (part, shown)
  assert re.search(r"max_length: 24 \(\d+ of 9 examples truncated\)", shown), shown


def test_history_keeps_epoch_means_and_a_per_step_log_without_compile_time(sft_run):
  _, history, _ = sft_run
  assert {"loss", "grad_norm", "tokens_per_second", "val_loss", "val_perplexity"} <= set(history.history)
  assert all(len(v) == 1 for v in history.history.values())
  assert [entry["step"] for entry in history.steps] == [1, 2, 3]
  assert history.history["loss"][0] == pytest.approx(np.mean([e["loss"] for e in history.steps]))
  # The first step compiles: it reports no throughput, so it cannot drag the mean down.
  assert "tokens_per_second" not in history.steps[0]
  assert all(e["tokens_per_second"] > 0 for e in history.steps[1:])


def test_generate_counts_new_tokens_under_either_name(sft_run):
  model, _, _ = sft_run
  text = model.generate("the red cat", max_new_tokens=3, strip_prompt=False)
  assert text.startswith("the red cat")
  assert model.generate("the red cat", max_length=3) == text[len("the red cat"):]
  with pytest.raises(ValueError, match="both count new tokens only"):
    model.generate("the red cat", max_length=3, max_new_tokens=3)


def test_validation_split_errors(sft_run):
  model, _, _ = sft_run
  with pytest.raises(ValueError, match="validation_data or validation_split, not both"):
    model.fit(TEXTS, validation_split=0.1, validation_data=TEXTS[:2], verbose=0)
  with pytest.raises(ValueError, match=r"validation_split=0.5 of 1 example\(s\) leaves 0 for training and 1"):
    model.fit(TEXTS[:1], validation_split=0.5, verbose=0)
  with pytest.raises(ValueError, match=r"validation_split must be a float in \[0, 1\)"):
    model.fit(TEXTS, validation_split=1.5, verbose=0)


def _drive(progbar, epochs=2, steps=4):
  progbar.set_params({"epochs": epochs, "steps": steps, "verbose": progbar.params.get("verbose", 1),
                      "main_metric": "rewards/accuracies"})
  for epoch in range(epochs):
    progbar.on_epoch_begin(epoch)
    for batch in range(steps):
      progbar.on_train_batch_end(batch, {"loss": 1.0 / (batch + 1), "rewards/accuracies": 0.5, "step": batch})
    progbar.on_epoch_end(epoch, {"loss": 0.5, "rewards/accuracies": 0.75, "val_loss": 0.6})


@pytest.mark.parametrize("verbose, stream", [(2, _Terminal), (1, io.StringIO)])
def test_one_line_per_epoch_at_verbose_2_and_without_a_terminal(verbose, stream):
  out = stream()
  progbar = callbacks.ProgbarLogger(stream=out)
  progbar.params = {"verbose": verbose}
  _drive(progbar)
  lines = out.getvalue().splitlines()
  assert len(lines) == 2 and "\r" not in out.getvalue(), out.getvalue()
  assert lines[0].startswith("Epoch 1/2 - 4 steps") and "rewards/accuracies: 0.75" in lines[0]
  assert "val_loss: 0.6" in lines[1]


def test_the_bar_shows_the_trainers_main_metric():
  out = _Terminal()
  progbar = callbacks.ProgbarLogger(stream=out)
  _drive(progbar, epochs=1)
  assert "rewards/accuracies=" in out.getvalue() and "4/4" in out.getvalue()


def test_trl_reward_len_trains_grpo_unchanged_and_history_has_rewards():
  records = [{"prompt": f"{a}+{b}=", "answer": str(a + b)} for a in range(2) for b in range(2)]
  model = Qwen3.from_preset("qwen3_tiny", num_layers=1, seed=12)
  model.compile(trainer="grpo", reward_fns=[reward_len], num_generations=2, max_new_tokens=4, lora_rank=4,
                max_length=16, async_rollout=False)
  history = model.fit(records, epochs=2, batch_size=4, verbose=0)
  for key in ("reward", "reward_std", "rewards/reward_len", "kl", "loss"):
    assert len(history.history[key]) == 2, (key, history.history)
  assert all(r <= 0 for r in history.history["reward"])
  assert len(history.steps) == 4


def test_reward_functions_get_trl_keywords_and_conversations_as_messages():
  seen = {}

  def spy(prompts, completions, completion_ids, answer, **kwargs):
    seen.update(prompts=prompts, completions=completions, completion_ids=completion_ids, answer=answer, **kwargs)
    return [0.0] * len(completions)

  chat = [[{"role": "user", "content": "1+1="}]] * 2
  ids, mask = np.array([[5, 6, 0], [7, 0, 0]]), np.array([[1, 1, 0], [1, 0, 0]])
  rewards = compute_rewards([spy, exact_match, last_number_match, regex_format(r"^\d$")], chat, ["2", "it is 3"],
                            {"answer": ["2", "2"], "level": ["easy", "hard"]}, completion_ids=ids,
                            completion_mask=mask)
  assert seen["prompts"] == chat and seen["level"] == ["easy", "hard"]
  assert seen["completions"] == [[{"role": "assistant", "content": "2"}], [{"role": "assistant", "content": "it is 3"}]]
  assert seen["completion_ids"] == [[5, 6], [7]]
  np.testing.assert_array_equal(rewards, [[0, 1, 1, 1], [0, 0, 0, 0]])
  plain = compute_rewards([reward_len], ["1+1="], ["2"])
  assert plain.tolist() == [[-19.0]]

  def positional_only(prompts, completions, /):
    return [0.0]

  with pytest.raises(RuntimeError, match=r"called with keywords \['completions', 'prompts'\].*\*\*kwargs"):
    compute_rewards([positional_only], ["1+1="], ["2"])


def test_unknown_compile_option_lists_valid_ones_and_suggests_the_closest():
  model = Qwen3.from_preset("qwen3_tiny", num_layers=1)
  with pytest.raises(ValueError, match=r"Did you mean 'learning_rate' for 'learnig_rate'\?.*'lora_rank'.*'beta'"):
    model.compile(trainer="dpo", learnig_rate=1e-3)
  with pytest.raises(ValueError, match=r"Did you mean 'num_generations'.*'reward_fns'"):
    model.compile(trainer="grpo", num_generation=4)


def test_summary_collapses_repeated_layers_and_names_the_preset():
  text = Qwen3.from_preset("qwen3_tiny", num_layers=3).summary(print_fn=None)
  assert text.startswith('Qwen3 "qwen3_tiny"')
  assert "layers.0-2 x3" in text and "layers.1 " not in text


@pytest.mark.multi_device
def test_mesh_errors_say_how_to_fix_them():
  explicit = jax.make_mesh((2,), ("data",), devices=jax.devices()[:2])
  with pytest.raises(ValueError, match=r"Explicit.*axis_types=\(jax.sharding.AxisType.Auto,\) \* 1"):
    Qwen3.from_preset("qwen3_tiny", num_layers=1, mesh=explicit)
  auto = jax.make_mesh((4,), ("data",), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:4])
  model = Qwen3.from_preset("qwen3_tiny", num_layers=1, mesh=auto)
  model.compile(trainer="sft")
  with pytest.raises(ValueError, match=r"batch_size=6 does not split over the 4 data-parallel devices.*e.g. 4 or 8"):
    model.fit(TEXTS, batch_size=6, verbose=0)


def test_truncation_warning_explains_itself():
  tokenizer = Qwen3.from_preset("qwen3_tiny", num_layers=1).tokenizer
  records = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yes " * 40}]},
             {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yes"}]}]
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    dataset = SupervisedDataset(records, tokenizer, batch_size=2, max_length=40, drop_remainder=False)
  message = " ".join(str(w.message) for w in caught)
  assert dataset.num_truncated == 1
  assert "1 of 2 examples" in message and "the longest has" in message
  assert "the chat template adds" in message and "will not learn to stop" in message
