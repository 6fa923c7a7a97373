"""Data helpers: record formats and loss masks, truncation, batching, files, Gemma datasets, synthetic tasks."""

import json
from pathlib import Path

import numpy as np
import pytest

from easytunix.generate.tokenizer_adapter import TokenizerAdapter
from easytunix.models.gemma.data import GEMMA_INSTRUCT_TEMPLATE, GemmaTokenizer, create_datasets
from easytunix.sft import data as data_lib
from easytunix.sft.peft_trainer import TrainingInput
from easytunix.sft.synthetic import addition_task, exact_match_rate
from tests.tasks import reversal_task

ASSETS = Path(__file__).resolve().parent.parent / "easytunix" / "presets" / "assets"


@pytest.fixture(scope="module")
def tok():
  return TokenizerAdapter.from_pretrained(ASSETS / "tiny_bpe")


def _targets(tok, ex):
  return tok.decode([t for t, m in zip(ex.tokens, ex.completion_mask) if m], skip_special_tokens=False)


def test_prompt_completion_trains_on_completion_and_eos(tok):
  ex = data_lib.tokenize_record(tok, {"prompt": "12+7=", "completion": "19"})
  assert list(ex.tokens) == tok.encode("12+7=") + tok.encode("19", add_special_tokens=False) + [tok.eos_id]
  assert ex.completion_mask == (False,) * 5 + (True,) * 3
  assert ex.num_targets == 3
  no_eos = data_lib.tokenize_record(tok, {"prompt": "1+1=", "completion": "2"}, add_eos=False)
  assert no_eos.tokens[-1] != tok.eos_id


def test_text_trains_on_every_token(tok):
  ex = data_lib.tokenize_record(tok, {"text": "hello world"})
  assert all(ex.completion_mask) and ex.tokens[-1] == tok.eos_id


def test_messages_train_on_assistant_turns_only(tok):
  messages = [
      {"role": "user", "content": "hi"},
      {"role": "assistant", "content": "yo"},
      {"role": "user", "content": "again"},
      {"role": "assistant", "content": "sure"},
  ]
  ex = data_lib.tokenize_record(tok, {"messages": messages})
  rendered = tok.apply_chat_template(messages)
  assert tok.decode(list(ex.tokens), skip_special_tokens=False) == rendered
  assert _targets(tok, ex) == "yo<|im_end|>\nsure<|im_end|>\n"
  # prompt/completion pairs can be rendered as a chat too.
  chat = data_lib.tokenize_record(tok, {"prompt": "hi", "completion": "yo"}, use_chat_template=True)
  assert _targets(tok, chat) == "yo<|im_end|>\n"
  with pytest.raises(ValueError, match="needs at least one assistant turn"):
    data_lib.tokenize_messages(tok, [{"role": "user", "content": "hi"}])


def test_unknown_record_format_is_an_error(tok):
  with pytest.raises(ValueError, match=r"Cannot tell the format of a record with keys \['question'\]"):
    data_lib.tokenize_record(tok, {"question": "?"})


def test_truncation_warns_with_a_count_and_refuses_to_drop_the_completion(tok):
  records = [{"prompt": "1+1=", "completion": "2"}, {"prompt": "12345678+1=", "completion": "12345679"}]
  examples = [data_lib.tokenize_record(tok, r) for r in records]
  with pytest.warns(UserWarning, match=r"1 of 2 examples of the dataset were longer than max_length=14"):
    cut = data_lib.truncate_examples(examples, 14)
  assert [len(e) for e in cut] == [len(examples[0]), 14]
  with pytest.raises(ValueError, match=r"Example 1 of the dataset has no completion token left .* max_length=11"):
    data_lib.truncate_examples(examples, 11)


def test_supervised_dataset_batches_are_fixed_shape_and_deterministic(tok):
  records = addition_task(num_train=10, num_eval=5).train
  ds = data_lib.SupervisedDataset(records, tok, batch_size=4, max_length=12, seed=1)
  assert len(ds) == 2
  batches = list(ds)
  assert len(batches) == 2 and all(isinstance(b, TrainingInput) for b in batches)
  b = batches[0]
  assert b.input_tokens.shape == b.input_mask.shape == b.completion_mask.shape == (4, 12)
  assert b.input_tokens.dtype == np.int32
  assert (b.input_tokens[~b.input_mask] == tok.pad_id).all()
  assert not (b.completion_mask & ~b.input_mask).any()
  again = list(ds)
  np.testing.assert_array_equal(again[0].input_tokens, b.input_tokens)
  ds.set_epoch(1)
  assert not np.array_equal(list(ds)[0].input_tokens, b.input_tokens)
  # Without drop_remainder the last batch keeps the shape, padded with empty rows.
  full = data_lib.SupervisedDataset(records, tok, batch_size=4, max_length=12, drop_remainder=False, shuffle=False)
  last = list(full)[-1]
  assert len(full) == 3 and last.input_tokens.shape == (4, 12) and not last.input_mask[2:].any()
  with pytest.raises(ValueError, match="fewer than batch_size=16"):
    data_lib.SupervisedDataset(records, tok, batch_size=16, max_length=12)


def test_load_records_reads_jsonl_json_and_csv(tmp_path):
  rows = [{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": "d"}]
  (tmp_path / "x.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
  (tmp_path / "x.json").write_text(json.dumps({"data": rows}))
  (tmp_path / "x.csv").write_text("prompt,completion\na,b\nc,d\n")
  for suffix in ("jsonl", "json", "csv"):
    assert data_lib.load_records(tmp_path / f"x.{suffix}") == rows
  (tmp_path / "x.txt").write_text("hi")
  with pytest.raises(ValueError, match="Unsupported data file type '.txt'"):
    data_lib.load_records(tmp_path / "x.txt")
  with pytest.raises(FileNotFoundError):
    data_lib.load_records(tmp_path / "missing.jsonl")


def test_bundled_instruction_set():
  records = data_lib.load_records(data_lib.bundled_dataset_path("instructions"))
  assert len(records) >= 300
  assert all(set(r) == {"prompt", "completion"} and r["prompt"] and r["completion"] for r in records)
  assert len({r["prompt"] for r in records}) == len(records)
  with pytest.raises(FileNotFoundError, match="available: \\['instructions'\\]"):
    data_lib.bundled_dataset_path("nope")


# ------------------------------------------------------------------------- gemma


def test_gemma_tokenizer_matches_the_adapter_and_tokenizes():
  gemma = GemmaTokenizer(ASSETS / "tiny_sp" / "tokenizer.model")
  adapter = TokenizerAdapter.from_pretrained(ASSETS / "tiny_sp")
  text = "<start_of_turn>user\nHello, 12+7=<end_of_turn>\n<start_of_turn>model\n"
  assert gemma.encode(text) == adapter.encode(text)
  assert gemma.eos_ids == adapter.eos_ids and gemma.pad_id == adapter.pad_id
  ids = gemma.tokenize("hi", prefix="> ")
  assert ids[0] == gemma.bos_id and ids[-1] == gemma.eos_id and ids.dtype == np.int32
  assert gemma.decode(gemma.encode("Hello there")) == "Hello there"
  with pytest.raises(FileNotFoundError):
    GemmaTokenizer("/no/such/tokenizer.model")


def test_create_datasets_from_a_file_and_a_datasetdict(tmp_path):
  rows = [{"src": f"word {i}", "dst": f"mot {i}"} for i in range(40)]
  path = tmp_path / "pairs.jsonl"
  path.write_text("\n".join(json.dumps(r) for r in rows))
  gemma = GemmaTokenizer()
  train_ds, eval_ds = create_datasets(str(path), global_batch_size=4, max_target_length=32, tokenizer=gemma)
  assert len(train_ds.examples) == 36 and len(eval_ds.examples) == 4
  batch = next(iter(train_ds))
  assert batch.input_tokens.shape == (4, 32)
  row = batch.input_tokens[0][batch.input_mask[0]]
  text = gemma.decode(row, skip_special_tokens=False)
  assert text.startswith("<start_of_turn>user\nword ") and "<end_of_turn>\n<start_of_turn>model\nmot " in text
  completion = gemma.decode(batch.input_tokens[0][batch.completion_mask[0]])
  assert completion.startswith("mot ")

  # Anything shaped like a DatasetDict: its validation split is the eval set.
  splits = {"train": rows[:30], "validation": rows[30:]}
  train_ds, eval_ds = create_datasets(
      splits, 8, 32, num_train_epochs=2, tokenizer=gemma, input_template={"prefix": "Q: ", "suffix": " A: "}
  )
  assert len(eval_ds.examples) == 10 and len(train_ds) == 2 * (30 // 8)
  with pytest.raises(ValueError, match="Cannot find the prompt column"):
    create_datasets([{"foo": 1, "bar": 2}], 1, 8, tokenizer=gemma)
  assert GEMMA_INSTRUCT_TEMPLATE["suffix"].endswith("<start_of_turn>model\n")


# --------------------------------------------------------------------- synthetic


def test_addition_task_splits_and_scoring():
  task = addition_task(num_eval=100, seed=0)
  assert len(task.train) + len(task.eval) == 100 * 100
  assert not {r["prompt"] for r in task.train} & set(task.eval_prompts)
  for r in task.eval[:20]:
    a, b = map(int, r["prompt"][:-1].split("+"))
    assert r["completion"] == str(a + b)
  assert addition_task(num_eval=100, seed=0).eval == task.eval
  assert addition_task(num_eval=100, seed=1).eval != task.eval
  assert task.score(task.eval_answers) == 1.0
  assert exact_match_rate([" 19 ", "3"], ["19", "4"]) == 0.5
  with pytest.raises(ValueError, match="2 predictions for 1 references"):
    exact_match_rate(["1", "2"], ["1"])


def test_reversal_task():
  task = reversal_task(num_train=200, num_eval=50, seed=0)
  assert len(task.train) == 200 and len(task.eval) == 50
  assert not {r["prompt"] for r in task.train} & set(task.eval_prompts)
  assert all(r["completion"] == r["prompt"][:-1][::-1] for r in task.train)
