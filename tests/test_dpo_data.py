"""DPO data: record formats, EOS, truncation (counted), layout, and the errors a user can hit."""

import warnings
from pathlib import Path

import numpy as np
import pytest

from easytunix.generate.tokenizer_adapter import TokenizerAdapter
from easytunix.rl.dpo import DpoTrainingConfig, dpo_batches, process_dpo_record, tokenize_preference
from easytunix.rl.dpo.data import PreferencePair, layout_pairs, truncate_pair
from easytunix.rl.dpo.synthetic import answer_style_task
from tests.tasks import addition_preference_task

ASSETS = Path(__file__).resolve().parent.parent / "easytunix" / "presets" / "assets"


@pytest.fixture(scope="module")
def tokenizer():
  return TokenizerAdapter.from_pretrained(ASSETS / "tiny_bpe")


def test_plain_record_appends_eos_to_each_response(tokenizer):
  pair = tokenize_preference({"prompt": "12+7=", "chosen": "19", "rejected": "18"}, tokenizer)
  assert pair.prompt == tuple(tokenizer.encode("12+7="))
  assert pair.chosen == tuple(tokenizer.encode("19", add_special_tokens=False)) + (tokenizer.eos_id,)
  assert pair.rejected == tuple(tokenizer.encode("18", add_special_tokens=False)) + (tokenizer.eos_id,)


def test_process_dpo_record_lays_out_prompt_left_and_responses_right(tokenizer):
  batch = process_dpo_record({"prompt": "12+7=", "chosen": "19", "rejected": "118"}, tokenizer, max_seq_length=32)
  prompt = tokenizer.encode("12+7=")
  assert batch.prompt_ids.shape == (1, len(prompt)) and batch.prompt_mask.all()
  # Both responses share the width of the longer one; the shorter is right-padded.
  assert batch.chosen_ids.shape == batch.rejected_ids.shape == (1, 4)
  assert batch.chosen_mask.tolist() == [[True, True, True, False]]
  assert batch.rejected_mask.tolist() == [[True, True, True, True]]
  assert batch.ref_chosen_logps is None


def test_chat_records_render_with_the_template(tokenizer):
  messages = [{"role": "user", "content": "hi"}]
  record = {"prompt": messages, "chosen": "hello!", "rejected": {"role": "assistant", "content": "go away"}}
  pair = tokenize_preference(record, tokenizer)
  prompt_text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
  assert tokenizer.decode(list(pair.prompt), skip_special_tokens=False) == prompt_text
  chosen_text = tokenizer.decode(list(pair.chosen), skip_special_tokens=False)
  assert chosen_text.startswith("hello!<|im_end|>")
  # The template's end-of-turn token ends the response: no extra EOS.
  assert tokenizer.eos_id not in pair.chosen
  # A string prompt with use_chat_template becomes a user turn.
  same = tokenize_preference({"prompt": "hi", "chosen": "hello!", "rejected": "go away"}, tokenizer, use_chat_template=True)
  assert same == pair


def test_implicit_prompt_conversations(tokenizer):
  user = {"role": "user", "content": "hi"}
  record = {
      "chosen": [user, {"role": "assistant", "content": "hello!"}],
      "rejected": [user, {"role": "assistant", "content": "go away"}],
  }
  explicit = {"prompt": [user], "chosen": "hello!", "rejected": "go away"}
  assert tokenize_preference(record, tokenizer) == tokenize_preference(explicit, tokenizer)


def test_missing_rejected_names_the_keys_found(tokenizer):
  with pytest.raises(ValueError, match=r"DPO record 1 is missing 'rejected'; it has keys \['chosen', 'prompt'\]"):
    dpo_batches(
        [{"prompt": "1+1=", "chosen": "2", "rejected": "3"}, {"prompt": "1+2=", "chosen": "3"}], tokenizer, 1, 16
    )
  with pytest.raises(ValueError, match="missing 'prompt', 'chosen', 'rejected'; it has keys \\['text'\\]"):
    tokenize_preference({"text": "hello"}, tokenizer)
  with pytest.raises(TypeError, match="must be a dict with 'prompt', 'chosen' and 'rejected', got a list"):
    tokenize_preference(["1+1=", "2", "3"], tokenizer)


def test_empty_responses_and_prompts_are_errors(tokenizer):
  with pytest.raises(ValueError, match="empty 'chosen' response"):
    tokenize_preference({"prompt": "1+1=", "chosen": "  ", "rejected": "3"}, tokenizer)
  with pytest.raises(ValueError, match="empty 'rejected' response"):
    tokenize_preference({"prompt": [{"role": "user", "content": "x"}], "chosen": "2",
                         "rejected": {"role": "assistant", "content": ""}}, tokenizer)
  with pytest.raises(ValueError, match="empty prompt"):
    tokenize_preference({"prompt": "", "chosen": "2", "rejected": "3"}, tokenizer)
  with pytest.raises(ValueError, match="'prompt' must be a string or a list of \\{'role', 'content'\\} messages, got None"):
    tokenize_preference({"prompt": None, "chosen": "2", "rejected": "3"}, tokenizer)
  user = {"role": "user", "content": "1+1="}
  with pytest.raises(ValueError, match="empty 'chosen' reply after the messages both conversations share"):
    tokenize_preference({"chosen": [user, {"role": "assistant", "content": ""}],
                         "rejected": [user, {"role": "assistant", "content": "3"}]}, tokenizer)
  with pytest.raises(ValueError, match="no 'prompt' and its 'chosen' and 'rejected' conversations share no first"):
    tokenize_preference({"chosen": [{"role": "user", "content": "a"}], "rejected": [{"role": "user", "content": "b"}]},
                        tokenizer)


def test_truncation_cuts_the_prompt_from_the_left_first():
  pair = PreferencePair(prompt=tuple(range(10, 40)), chosen=(1, 2, 3, 9), rejected=(4, 9))
  cut, cut_prompt, cut_response = truncate_pair(pair, max_seq_length=20)
  assert (cut_prompt, cut_response) == (True, False)
  assert cut.prompt == tuple(range(24, 40))  # the end of the prompt survives
  assert cut.chosen == pair.chosen and cut.rejected == pair.rejected
  # A long response too: the prompt keeps its share (half), the responses are cut at the end.
  long = PreferencePair(prompt=tuple(range(10, 40)), chosen=tuple(range(100, 130)), rejected=(4, 9))
  cut, cut_prompt, cut_response = truncate_pair(long, max_seq_length=20)
  assert (cut_prompt, cut_response) == (True, True)
  assert cut.prompt == tuple(range(30, 40)) and cut.chosen == tuple(range(100, 110)) and cut.rejected == (4, 9)
  # max_prompt_length caps the prompt even when everything would fit.
  cut, cut_prompt, _ = truncate_pair(pair, max_seq_length=64, max_prompt_length=8)
  assert cut_prompt and cut.prompt == tuple(range(32, 40))


def test_dataset_widths_fit_max_length_and_cuts_are_counted(tokenizer):
  pairs = [
      PreferencePair(prompt=tuple(range(1, 15)), chosen=(5, 2), rejected=(6, 2)),  # long prompt
      PreferencePair(prompt=(7,), chosen=tuple(range(20, 34)), rejected=(6, 2)),  # long response
  ]
  out, width_p, width_r, stats = layout_pairs(pairs, max_seq_length=16)
  assert width_p + width_r <= 16
  assert width_p == 14 and width_r == 2
  assert out[1].chosen == (20, 21)
  assert (stats.pairs, stats.pairs_truncated, stats.prompts_truncated, stats.responses_truncated) == (2, 1, 0, 1)


def test_too_long_pairs_warn_with_counts_and_keep_one_shape(tokenizer):
  records = [
      {"prompt": "1+1=" * 20, "chosen": "2", "rejected": "3"},
      {"prompt": "1+2=", "chosen": "3", "rejected": "4"},
      {"prompt": "1+3=", "chosen": "4" * 40, "rejected": "5"},
  ]
  with pytest.warns(UserWarning, match=r"2 of 3 preference pairs of the dataset did not fit max_seq_length=24: "
                                       r"1 prompt\(s\) were cut from the left and 1 pair\(s\) of responses"):
    ds = dpo_batches(records, tokenizer, batch_size=2, max_length=24, shuffle=False, drop_remainder=False)
  assert ds.truncation.prompts_truncated == 1 and ds.truncation.responses_truncated == 1
  shapes = {(b.prompt_ids.shape, b.chosen_ids.shape, b.rejected_ids.shape) for b in ds}
  assert len(shapes) == 1
  (prompt_shape, chosen_shape, _), = shapes
  assert prompt_shape[1] + chosen_shape[1] <= 24
  # The last batch is padded with an empty row.
  last = list(ds)[-1]
  assert not last.chosen_mask[1].any() and not last.prompt_mask[1].any()
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    process_dpo_record(records[1], tokenizer, max_seq_length=24)
  with pytest.warns(UserWarning, match="1 of 1 preference pairs of this record did not fit"):
    process_dpo_record(records[0], tokenizer, max_seq_length=24)


def test_length_settings_are_validated(tokenizer):
  record = {"prompt": "1+1=", "chosen": "2", "rejected": "3"}
  with pytest.raises(ValueError, match="max_prompt_length=8 leaves no room for the responses in max_seq_length=8: "
                                       "a response would vanish entirely"):
    process_dpo_record(record, tokenizer, max_seq_length=8, max_prompt_length=8)
  with pytest.raises(ValueError, match="max_seq_length must be an int >= 2"):
    dpo_batches([record], tokenizer, 1, 1)
  with pytest.raises(ValueError, match="fewer than batch_size=4: no full batch"):
    dpo_batches([record], tokenizer, 4, 16)
  with pytest.raises(ValueError, match="leaves no room for the responses"):
    DpoTrainingConfig(max_seq_length=64, max_prompt_length=64)


def test_dataset_shuffles_per_epoch_deterministically(tokenizer):
  task = addition_preference_task(num_train=40, num_eval=10)
  ds = dpo_batches(task.train, tokenizer, batch_size=8, max_length=16, seed=3)
  first = np.concatenate([b.prompt_ids for b in ds])
  assert np.array_equal(first, np.concatenate([b.prompt_ids for b in ds]))
  ds.set_epoch(1)
  second = np.concatenate([b.prompt_ids for b in ds])
  assert not np.array_equal(first, second)
  assert sorted(map(tuple, first)) == sorted(map(tuple, second))
  assert len(ds) == 5


def test_synthetic_tasks_hold_out_prompts():
  for task in (addition_preference_task(num_eval=50), answer_style_task(num_eval=50)):
    assert not {r["prompt"] for r in task.train} & set(task.eval_prompts)
    assert all(r["chosen"] != r["rejected"] for r in task.train)
  add = addition_preference_task(num_eval=50)
  a, b = add.train[0]["prompt"].rstrip("=").split("+")
  assert add.train[0]["chosen"] == str(int(a) + int(b))
  style = answer_style_task(num_eval=50)
  assert style.train[0]["rejected"] == " ".join([style.train[0]["chosen"]] * 3)
  assert style.chosen_style_rate(["12", " 7 ", "12 12 12", "x"]) == 0.5
  assert style.rejected_style_rate(["12 12 12", "12"]) == 0.5
  mixed = style.sft_records(chosen_fraction=0.25, seed=0)
  share = sum(" " not in r["completion"] for r in mixed) / len(mixed)
  assert 0.2 < share < 0.3
  sentences = answer_style_task(num_eval=50, chosen_template="The answer is {answer}.", rejected_template="{answer}")
  assert sentences.chosen_style_rate(["The answer is 12.", "12", "The answer is x."]) == pytest.approx(1 / 3)
  with pytest.raises(ValueError, match="must contain '\\{answer\\}'"):
    answer_style_task(chosen_template="yes")
