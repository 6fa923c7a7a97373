"""The training command line (``easytunix sft|dpo|distill|grpo``), generate's options, presets' weight marks,
implicit-prompt DPO records and ``datasets.Dataset`` input."""

import json
from pathlib import Path

import pytest

from easytunix import cli, cli_train
from easytunix.generate.tokenizer_adapter import TokenizerAdapter
from easytunix.presets import data_formats
from easytunix.rl.dpo import dpo_batches, tokenize_preference

ASSETS = Path(__file__).resolve().parent.parent / "easytunix" / "presets" / "assets"


def _write_jsonl(path: Path, records: list[dict]) -> Path:
  path.write_text("".join(json.dumps(r) + "\n" for r in records))
  return path


def _addition(n: int = 32) -> list[dict]:
  # Replies of several tokens, so a model trained for a few steps says more than EOS.
  return [{"prompt": f"{i % 10}+{i * 3 % 10}=", "completion": f" the sum is {i % 10 + i * 3 % 10}"} for i in range(n)]


def _one_error_line(capsys, argv: list[str]) -> str:
  assert cli.main(argv) == 2
  err = capsys.readouterr().err.strip()
  assert "Traceback" not in err and len(err.splitlines()) == 1, err
  return err


def test_sft_writes_a_preset_generate_reads_and_a_rerun_resumes(tmp_path, capsys):
  data = _write_jsonl(tmp_path / "train.jsonl", _addition())
  out = tmp_path / "run"
  argv = ["sft", "--model", "qwen3_tiny", "--data", str(data), "--steps", "4", "--batch-size", "8",
          "--max-length", "32", "--learning-rate", "3e-3", "--save-every", "2", "--out", str(out)]
  assert cli.main(argv) == 0
  text = capsys.readouterr().out
  assert "starting at step 0" in text and "Trained 4 steps (steps 1-4)" in text, text
  assert (out / "easytunix_preset.json").exists() and (out / "model.safetensors").exists()
  assert sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.isdigit()) == ["2", "4"]
  assert list((out / "logs").rglob("events.out.tfevents*")), "no TensorBoard events"

  # Sampled (four steps teach a greedy decoder little beyond EOS), so there is text to see.
  assert cli.main(["generate", "--preset", str(out), "3+4=", "--max-length", "6", "--sampler", "random",
                   "--seed", "0"]) == 0
  printed = capsys.readouterr().out
  assert printed.startswith("3+4=") and len(printed.strip()) > len("3+4="), printed

  # The same command again: it resumes from the step-4 checkpoint and has nothing left to train.
  weights = (out / "model.safetensors").read_bytes()
  assert cli.main(argv) == 0
  text = capsys.readouterr().out
  assert "resuming from step 4" in text and "Trained 0 steps" in text, text
  assert (out / "model.safetensors").read_bytes() == weights  # the restored weights, not a fresh init
  assert (out / "checkpoints" / "4").is_dir()


def test_user_mistakes_are_one_line_errors(tmp_path, capsys, monkeypatch):
  monkeypatch.chdir(tmp_path)
  good = _write_jsonl(tmp_path / "good.jsonl", _addition(4))
  base = ["--model", "qwen3_tiny", "--out", str(tmp_path / "o")]
  err = _one_error_line(capsys, ["sft", *base, "--data", "missing.jsonl"])
  assert err == "easytunix sft: error: --data: no file at 'missing.jsonl'."
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"text": "fine"}\n{"text": oops}\n')
  assert "bad.jsonl line 2 is not valid JSON" in _one_error_line(capsys, ["sft", *base, "--data", str(bad)])
  assert "Unknown preset 'qwen3_tinny'" in _one_error_line(
      capsys, ["sft", "--model", "qwen3_tinny", "--data", str(good)])
  assert "--epochs and --steps are alternatives" in _one_error_line(
      capsys, ["sft", *base, "--data", str(good), "--epochs", "1", "--steps", "3"])
  assert "--reward 'nocolon'" in _one_error_line(capsys, ["grpo", *base, "--data", str(good), "--reward", "nocolon"])
  assert "has no function 'nope'" in _one_error_line(
      capsys, ["grpo", *base, "--data", str(good), "--reward", "json:nope"])
  assert "distill needs --teacher" in _one_error_line(capsys, ["distill", *base, "--data", str(good)])
  config = tmp_path / "run.yaml"
  config.write_text("model: qwen3_tiny\nlearning_rat: 0.001\n")
  err = _one_error_line(capsys, ["sft", "--config", str(config), "--data", str(good)])
  assert "unknown key 'learning_rat'" in err and "Did you mean 'learning_rate'?" in err
  busy = tmp_path / "busy"
  busy.mkdir()
  (busy / "notes.txt").write_text("mine")
  assert "--out " + str(busy) + " already holds files that are not an easytunix run (notes.txt)" in _one_error_line(
      capsys, ["sft", "--model", "qwen3_tiny", "--data", str(good), "--out", str(busy)])
  # Data of the wrong shape for the trainer (found when the facade checks records).
  assert "expects keys 'prompt'+'chosen'+'rejected'" in _one_error_line(capsys, ["dpo", *base, "--data", str(good)])


def test_config_file_holds_the_settings_and_flags_override_it(tmp_path):
  config = tmp_path / "run.yaml"
  config.write_text("model: qwen3_tiny\ndata: train.jsonl\nepochs: 3\nlearning-rate: 1e-3\nlora_rank: 4\n"
                    "reward: [exact_match]\n")
  parser_args = lambda *argv: cli_train_args("grpo", "--config", str(config), *argv)  # noqa: E731
  s = cli_train.resolve_settings("grpo", parser_args())
  assert (s["model"], s["data"], s["epochs"], s["steps"], s["learning_rate"], s["lora_rank"]) == (
      "qwen3_tiny", "train.jsonl", 3, None, 1e-3, 4)
  assert s["reward"] == ["exact_match"] and s["out"] == "easytunix_grpo" and s["batch_size"] == 8
  # --steps on the command line replaces the file's epochs; other flags override their keys.
  s = cli_train.resolve_settings("grpo", parser_args("--steps", "7", "--lora-rank", "8"))
  assert (s["epochs"], s["steps"], s["lora_rank"]) == (None, 7, 8)
  json_config = tmp_path / "run.json"
  json_config.write_text(json.dumps({"model": "m", "data": "d", "teacher": "t"}))
  with pytest.raises(cli_train.UsageError, match="'teacher' is a setting of distill, not sft"):
    cli_train.resolve_settings("sft", cli_train_args("sft", "--config", str(json_config)))
  with pytest.raises(cli_train.UsageError, match="--epochs must be int, got .two."):
    cli_train.resolve_settings("sft", cli_train_args("sft", "--model", "m", "--data", "d", "--epochs", "two"))


def cli_train_args(*argv: str):
  """The parsed namespace of ``easytunix ARGV`` (without running it)."""
  import argparse

  parser = argparse.ArgumentParser()
  cli_train.add_parsers(parser.add_subparsers(dest="command"))
  return parser.parse_args(list(argv))


def test_reward_specs_load_from_modules_files_and_the_builtins(tmp_path):
  from easytunix.rl.grpo import rewards

  assert cli_train.load_reward("exact_match") is rewards.exact_match
  assert cli_train.load_reward("easytunix.rl.grpo.rewards:last_number_match") is rewards.last_number_match
  file = tmp_path / "my_rewards.py"
  file.write_text("def short(completions, **kwargs):\n  return [-len(c) for c in completions]\n")
  fn = cli_train.load_reward(f"{file}:short")
  assert fn(completions=["ab", "a"]) == [-2, -1]
  with pytest.raises(cli_train.UsageError, match="importing 'no_such_module_xyz' failed"):
    cli_train.load_reward("no_such_module_xyz:f")
  with pytest.raises(cli_train.UsageError, match="no file at"):
    cli_train.load_reward(f"{tmp_path / 'absent.py'}:f")


def test_generate_samples_with_a_seed_and_a_system_message(tmp_path, capsys, monkeypatch):
  from easytunix.presets import CausalLM

  model = CausalLM.from_preset("qwen3_tiny")
  loaded = []
  def load_once(preset, dtype=None):  # one model for every call, so its sampler compiles once
    loaded.append((preset, dtype))
    return model

  argv = ["generate", "--preset", "qwen3_tiny", "hello", "--max-length", "4", "--top-k", "20", "--temperature",
          "1.5", "--system", "Answer briefly.", "--dtype", "float32", "--seed"]
  with monkeypatch.context() as patch:
    patch.setattr(CausalLM, "from_preset", load_once)
    assert cli.main([*argv, "3"]) == 0
    first = capsys.readouterr().out
    assert cli.main([*argv, "3"]) == 0
    assert capsys.readouterr().out == first  # the same seed samples the same reply
    assert cli.main([*argv, "4"]) == 0
    other = capsys.readouterr().out
  assert loaded[0] == ("qwen3_tiny", "float32")
  assert first.strip() and other != first, (first, other)  # another seed, another sample
  assert "Answer briefly" not in first  # the reply alone: the template's text is not echoed

  folder = CausalLM.from_preset("qwen3_tiny").save_to_preset(tmp_path / "no_template")
  config = json.loads((folder / "tokenizer_config.json").read_text())
  config.pop("chat_template", None)
  (folder / "tokenizer_config.json").write_text(json.dumps(config))
  err = _one_error_line(capsys, ["generate", "--preset", str(folder), "hi", "--system", "Be brief."])
  assert "--system needs a chat template" in err
  assert "sampler='greedy' takes no temperature" in _one_error_line(
      capsys, ["generate", "--preset", "qwen3_tiny", "hi", "--sampler", "greedy", "--temperature", "0.7"])


def test_presets_marks_which_real_weights_are_here(tmp_path, capsys, monkeypatch):
  monkeypatch.setenv("EASYTUNIX_CACHE", str(tmp_path))
  monkeypatch.delenv("EASYTUNIX_MODELS", raising=False)
  (tmp_path / "models" / "gemma3-270m").mkdir(parents=True)
  (tmp_path / "models" / "gemma3-270m" / "config.json").write_text("{}")
  assert cli.main(["presets"]) == 0
  lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line.strip()}
  assert lines["gemma3_270m"].split()[1] == "local" and str(tmp_path / "models" / "gemma3-270m") in lines["gemma3_270m"]
  assert lines["smollm2_135m_instruct"].split()[1] == "missing"
  assert lines["qwen3_tiny"].split()[1] == "random"


def test_dpo_accepts_trl_implicit_prompt_records():
  tokenizer = TokenizerAdapter.from_pretrained(ASSETS / "tiny_bpe")
  system, user = {"role": "system", "content": "Be exact."}, {"role": "user", "content": "1+1="}
  implicit = {"chosen": [system, user, {"role": "assistant", "content": "2"}],
              "rejected": [system, user, {"role": "assistant", "content": "3"}]}
  explicit = {"prompt": [system, user], "chosen": "2", "rejected": "3"}
  assert tokenize_preference(implicit, tokenizer) == tokenize_preference(explicit, tokenizer)
  data_formats.check_format([implicit], "dpo")  # the facade's format check lets them through
  batch = next(iter(dpo_batches([implicit, explicit], tokenizer, 2, 64, shuffle=False)))
  assert (batch.chosen_ids[0] == batch.chosen_ids[1]).all() and (batch.prompt_ids[0] == batch.prompt_ids[1]).all()

  disjoint = {"chosen": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
              "rejected": [{"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]}
  with pytest.raises(ValueError, match="share no first message, so there is no prompt"):
    tokenize_preference(disjoint, tokenizer)
  with pytest.raises(ValueError, match="also takes 'chosen'\\+'rejected' conversations"):
    data_formats.check_format([{"chosen": "2", "rejected": "3"}], "dpo")


class _ColumnDataset:
  """What fit needs of a ``datasets.Dataset``: column names, a length and rows by index."""

  column_names = ["text"]

  def __init__(self, texts):
    self.texts = texts

  def __len__(self):
    return len(self.texts)

  def __getitem__(self, i):
    return {"text": self.texts[i]}


def test_dataset_like_input_becomes_records():
  assert data_formats.as_records(_ColumnDataset(["a", "b"])) == [{"text": "a"}, {"text": "b"}]


def test_fit_takes_a_hugging_face_dataset():
  import datasets  # the `datasets` extra, part of the test extra: a real Dataset object, not a stand-in
  from easytunix.presets import Qwen3

  model = Qwen3.from_preset("qwen3_tiny").compile(trainer="sft", learning_rate=1e-2, max_length=32)
  history = model.fit(datasets.Dataset.from_list(_addition(16)), steps=2, batch_size=8, verbose=0)
  assert len(history.history["loss"]) >= 1
