"""Bad inputs at every facade boundary fail at the call, with an error naming the argument or file.

One table: each case is (id, exception type, words the message must contain, a function of the shared
context that makes the mistake). Almost every case fails before any compilation, so the file is fast.
"""

from __future__ import annotations

import json
import math
import shutil
from types import SimpleNamespace

import numpy as np
import pytest

from easytunix.presets import CausalLM, Qwen3
from easytunix.sft.peft_trainer import TrainingInput

TEXTS = ["the red cat sat on the mat.", "the big dog ran in the park."] * 4


@pytest.fixture(scope="module")
def ctx(tmp_path_factory):
  """A compiled tiny model, an exported folder to damage, and a scratch folder."""
  root = tmp_path_factory.mktemp("bad_inputs")
  model = Qwen3.from_preset("qwen3_tiny")
  model.compile(trainer="sft", learning_rate=1e-3, max_length=32)
  exported = model.export_safetensors(root / "exported")
  (root / "full").mkdir()
  (root / "full" / "keep.txt").write_text("already here")
  (root / "a_file").write_text("not a folder")
  return SimpleNamespace(model=model, root=root, exported=exported, n=[0])


def _folder(ctx, change):
  """A copy of the exported model folder with ``change(folder)`` applied."""
  ctx.n[0] += 1
  folder = ctx.root / f"damaged{ctx.n[0]}"
  shutil.copytree(ctx.exported, folder)
  change(folder)
  return folder


def _file(ctx, name, text):
  ctx.n[0] += 1
  path = ctx.root / f"f{ctx.n[0]}" / name
  path.parent.mkdir()
  path.write_text(text)
  return path


def _compile(**kwargs):
  return lambda c: c.model.compile(**kwargs)


def _fit(data=TEXTS, **kwargs):
  kwargs.setdefault("verbose", 0)
  return lambda c: c.model.fit(data(c) if callable(data) else data, **kwargs)


def _gen(prompts="hi", **kwargs):
  return lambda c: c.model.generate(prompts, **kwargs)


def _batch(tokens, mask=None):
  tokens = np.asarray(tokens, np.int32)
  return [TrainingInput(input_tokens=tokens, input_mask=np.ones_like(tokens) if mask is None else mask)]


def _truncate(folder):
  path = folder / "model.safetensors"
  path.write_bytes(path.read_bytes()[:-100])


def _edit_config(change):
  def apply(folder):
    config = json.loads((folder / "config.json").read_text())
    change(config)
    (folder / "config.json").write_text(json.dumps(config))
  return apply


NAN = float("nan")
CASES = [
    # compile: optimizer numbers
    ("lr-string", TypeError, ["learning_rate", "'1e-3'"], _compile(learning_rate="1e-3")),
    ("lr-nan", ValueError, ["learning_rate", "nan"], _compile(learning_rate=NAN)),
    ("lr-negative", ValueError, ["learning_rate", "-1"], _compile(learning_rate=-1.0)),
    ("lr-zero", ValueError, ["learning_rate"], _compile(learning_rate=0)),
    ("lr-inf", ValueError, ["learning_rate", "inf"], _compile(learning_rate=math.inf)),
    ("lr-bool", TypeError, ["learning_rate"], _compile(learning_rate=True)),
    ("lr-none", TypeError, ["learning_rate"], _compile(learning_rate=None)),
    ("weight-decay-negative", ValueError, ["weight_decay"], _compile(weight_decay=-0.1)),
    ("weight-decay-string", TypeError, ["weight_decay"], _compile(weight_decay="0.1")),
    ("weight-decay-sgd", ValueError, ["weight_decay", "sgd"], _compile(optimizer="sgd", weight_decay=0.1)),
    ("warmup-negative", ValueError, ["warmup_steps"], _compile(warmup_steps=-1)),
    ("warmup-float", ValueError, ["warmup_steps"], _compile(warmup_steps=1.5)),
    ("decay-zero", ValueError, ["decay_steps"], _compile(schedule="cosine", decay_steps=0)),
    ("warmup-over-decay", ValueError, ["warmup_steps=100", "decay_steps=10"],
     _compile(schedule="cosine", warmup_steps=100, decay_steps=10)),
    ("cosine-no-decay", ValueError, ["decay_steps"], _compile(schedule="cosine")),
    ("schedule-unknown", ValueError, ["schedule", "'exp'"], _compile(schedule="exp")),
    ("grad-norm-zero", ValueError, ["max_grad_norm"], _compile(max_grad_norm=0.0)),
    ("grad-norm-nan", ValueError, ["max_grad_norm"], _compile(max_grad_norm=NAN)),
    ("grad-norm-string", TypeError, ["max_grad_norm"], _compile(max_grad_norm="1")),
    ("optimizer-unknown", ValueError, ["optimizer", "'adamx'"], _compile(optimizer="adamx")),
    # compile: lengths, LoRA, trainer
    ("max-length-1", ValueError, ["max_length"], _compile(max_length=1)),
    ("max-length-over-positions", ValueError, ["max_length=100000", "max_position_embeddings=512"],
     _compile(max_length=100_000)),
    ("max-length-string", TypeError, ["max_length"], _compile(max_length="256")),
    ("accumulation-zero", ValueError, ["gradient_accumulation_steps"], _compile(gradient_accumulation_steps=0)),
    ("eval-every-zero", ValueError, ["eval_every_n_steps"], _compile(eval_every_n_steps=0)),
    ("lora-rank-zero", ValueError, ["lora_rank"], _compile(lora_rank=0)),
    ("lora-rank-float", ValueError, ["lora_rank"], _compile(lora_rank=2.5)),
    ("lora-alpha-nan", ValueError, ["lora_alpha"], _compile(lora_rank=4, lora_alpha=NAN)),
    ("lora-alpha-alone", ValueError, ["lora_rank"], _compile(lora_alpha=8.0)),
    ("trainer-unknown", ValueError, ["'ppo'"], _compile(trainer="ppo")),
    ("option-unknown", ValueError, ["'beta'", "dpo"], _compile(trainer="sft", beta=0.1)),
    ("distill-string", TypeError, ["distill", "'logit'", "LogitStrategy"],
     lambda c: c.model.compile(trainer="distill", teacher=c.model, distill="logit")),
    ("distill-no-teacher", ValueError, ["teacher"], lambda c: c.model.compile(trainer="distill")),
    ("save-every-zero", ValueError, ["save_every_n_steps"], _compile(save_every_n_steps=0)),
    ("keep-zero", ValueError, ["keep_checkpoints"], _compile(keep_checkpoints=0)),
    ("checkpoint-dir-file", ValueError, ["checkpoint_dir", "a_file"],
     lambda c: c.model.compile(checkpoint_dir=c.root / "a_file")),
    ("attention-unknown", ValueError, ["attention", "'flash'"], _compile(attention="flash")),
    ("remat-unknown", ValueError, ["remat", "'all'"], _compile(remat="all")),
    ("precision-unknown", ValueError, ["precision", "'fp8'"], _compile(precision="fp8")),
    # fit: counts
    ("epochs-zero", ValueError, ["epochs", "0"], _fit(epochs=0)),
    ("epochs-negative", ValueError, ["epochs"], _fit(epochs=-1)),
    ("epochs-string", TypeError, ["epochs", "'2'"], _fit(epochs="2")),
    ("epochs-float", ValueError, ["epochs", "1.5"], _fit(epochs=1.5)),
    ("steps-zero", ValueError, ["steps"], _fit(steps=0)),
    ("steps-nan", ValueError, ["steps", "nan"], _fit(steps=NAN)),
    ("batch-size-zero", ValueError, ["batch_size"], _fit(batch_size=0)),
    ("batch-size-string", TypeError, ["batch_size"], _fit(batch_size="8")),
    ("batch-size-bool", TypeError, ["batch_size"], _fit(batch_size=True)),
    ("seed-negative", ValueError, ["seed"], _fit(seed=-1)),
    ("verbose-unknown", ValueError, ["verbose"], _fit(verbose=5)),
    ("shuffle-string", TypeError, ["shuffle", "'no'"], _fit(shuffle="no")),
    # fit: data
    ("data-none", ValueError, ["training data", "None"], _fit(None)),
    ("data-empty-list", ValueError, ["training data", "empty"], _fit([])),
    ("data-missing-file", FileNotFoundError, ["missing.jsonl"], _fit("missing.jsonl")),
    ("data-single-dict", TypeError, ["single dict"], _fit({"text": "a"})),
    ("data-ints", TypeError, ["training data", "int"], _fit([1, 2])),
    ("data-mixed", TypeError, ["mixes"], _fit(["a", {"text": "b"}])),
    ("text-none", TypeError, ["record 0", "text=None"], _fit([{"text": None}])),
    ("text-int", TypeError, ["record 1", "text=5"], _fit([{"text": "a"}, {"text": 5}])),
    ("texts-all-empty", ValueError, ["training data", "token to train on"], _fit(["", ""])),
    ("prompt-without-completion", ValueError, ["record 0", "'completion'"], _fit([{"prompt": "a"}])),
    ("completion-none", TypeError, ["completion=None"], _fit([{"prompt": "a", "completion": None}])),
    ("messages-string", TypeError, ["record 0", "messages"], _fit([{"messages": "hello there"}])),
    ("messages-of-strings", TypeError, ["messages[0]", "'role'"], _fit([{"messages": ["hi", "there"]}])),
    ("messages-empty", TypeError, ["messages"], _fit([{"messages": []}])),
    ("validation-text-none", TypeError, ["validation_data", "text=None"],
     _fit(validation_data=[{"text": None}])),
    ("jsonl-bad-line", ValueError, ["bad.jsonl", "line 2"],
     _fit(lambda c: _file(c, "bad.jsonl", '{"text": "ok"}\n{"text": "broken\n{"text": "ok"}\n'))),
    ("jsonl-empty", ValueError, ["empty.jsonl"], _fit(lambda c: _file(c, "empty.jsonl", ""))),
    ("jsonl-not-object", ValueError, ["list.jsonl", "line 1"], _fit(lambda c: _file(c, "list.jsonl", "[1, 2]\n"))),
    ("json-invalid", ValueError, ["bad.json"], _fit(lambda c: _file(c, "bad.json", "{not json"))),
    ("file-unsupported", ValueError, ["data.txt", ".txt"], _fit(lambda c: _file(c, "data.txt", "hello"))),
    ("tokens-over-vocab", ValueError, ["1000", "vocab size 512"], _fit(_batch([[1, 2, 1000, 3]]))),
    ("tokens-negative", ValueError, ["-4", "vocab"], _fit(_batch([[1, 2, -4, 3]]))),
    ("mask-shape", ValueError, ["input_mask", "(1, 3)", "(1, 4)"],
     _fit(_batch([[1, 2, 3, 4]], mask=np.ones((1, 3), np.int32)))),
    ("tokens-float", TypeError, ["input_tokens", "float"],
     _fit([TrainingInput(input_tokens=np.ones((1, 4), np.float32), input_mask=np.ones((1, 4)))])),
    # generate
    ("generate-none", TypeError, ["prompts", "None"], _gen(None)),
    ("generate-int", TypeError, ["prompts", "5"], _gen(5)),
    ("generate-empty-list", TypeError, ["prompts"], _gen([])),
    ("generate-list-of-none", TypeError, ["prompts"], _gen([None])),
    ("temperature-nan", ValueError, ["temperature", "nan"], _gen(sampler="top_p", temperature=NAN)),
    ("temperature-negative", ValueError, ["temperature"], _gen(sampler="top_p", temperature=-1.0)),
    ("temperature-string", TypeError, ["temperature"], _gen(sampler="top_p", temperature="0.7")),
    ("top-p-zero", ValueError, ["top_p", "0"], _gen(sampler="top_p", top_p=0.0)),
    ("top-p-over-one", ValueError, ["top_p", "1.5"], _gen(sampler="top_p", top_p=1.5)),
    ("top-k-zero", ValueError, ["top_k"], _gen(sampler="top_k", top_k=0)),
    ("beam-size-zero", ValueError, ["beam_size"], _gen(sampler="beam", beam_size=0)),
    ("generate-max-length-zero", ValueError, ["max_length"], _gen(max_length=0)),
    ("generate-max-length-huge", ValueError, ["max_position_embeddings=512"], _gen(max_length=100_000)),
    ("sampler-unknown", ValueError, ["sampler", "'nucleus'"], _gen(sampler="nucleus")),
    ("greedy-with-temperature", ValueError, ["greedy", "temperature"], _gen(temperature=0.5)),
    # saving
    ("save-into-non-empty", FileExistsError, ["full", "overwrite=True"], lambda c: c.model.save_to_preset(c.root / "full")),
    ("export-into-non-empty", FileExistsError, ["full", "overwrite=True"],
     lambda c: c.model.export_safetensors(c.root / "full")),
    ("save-onto-file", FileExistsError, ["a_file", "not a folder"], lambda c: c.model.save_to_preset(c.root / "a_file")),
    # loading
    ("load-missing-folder", FileNotFoundError, ["nowhere"], lambda c: CausalLM.from_safetensors(c.root / "nowhere")),
    ("load-no-config", FileNotFoundError, ["config.json"],
     lambda c: CausalLM.from_safetensors(_folder(c, lambda f: (f / "config.json").unlink()))),
    ("load-invalid-config", ValueError, ["config.json", "not valid JSON"],
     lambda c: CausalLM.from_safetensors(_folder(c, lambda f: (f / "config.json").write_text("{oops")))),
    ("load-config-no-hidden-size", ValueError, ["config.json", "'hidden_size'"],
     lambda c: CausalLM.from_safetensors(_folder(c, _edit_config(lambda d: d.pop("hidden_size"))))),
    ("load-config-unknown-type", ValueError, ["model_type", "'bert'"],
     lambda c: CausalLM.from_safetensors(_folder(c, _edit_config(lambda d: d.update(model_type="bert"))))),
    ("load-empty-weights", ValueError, ["model.safetensors", "0 bytes"],
     lambda c: CausalLM.from_safetensors(_folder(c, lambda f: (f / "model.safetensors").write_bytes(b"")))),
    ("load-truncated-weights", ValueError, ["model.safetensors", "truncated"],
     lambda c: CausalLM.from_safetensors(_folder(c, _truncate))),
    ("load-no-weights", FileNotFoundError, ["safetensors"],
     lambda c: CausalLM.from_safetensors(_folder(c, lambda f: (f / "model.safetensors").unlink()))),
    ("preset-unknown", ValueError, ["qwen3_tinyy"], lambda c: Qwen3.from_preset("qwen3_tinyy")),
    ("preset-json-damaged", ValueError, ["easytunix_preset.json", "damaged"],
     lambda c: CausalLM.from_preset(_folder(c, lambda f: (f / "easytunix_preset.json").write_text("{bad")))),
    ("index-json-damaged", ValueError, ["model.safetensors.index.json"],
     lambda c: CausalLM.from_safetensors(_folder(c, lambda f: (f / "model.safetensors.index.json").write_text("{")))),
    ("ti-completion-mask-shape", ValueError, ["completion_mask", "(1, 2)"],
     _fit([TrainingInput(input_tokens=np.ones((1, 4), np.int32), input_mask=np.ones((1, 4)),
                         completion_mask=np.ones((1, 2)))])),
]


@pytest.mark.parametrize("error, needles, make_mistake", [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_bad_input_fails_with_a_message_naming_it(ctx, error, needles, make_mistake):
  with pytest.raises(error) as info:
    make_mistake(ctx)
  message = str(info.value)
  missing = [n for n in needles if n not in message]
  assert not missing, f"{missing} not in: {message}"


def test_overwrite_replaces_atomically_with_umask_permissions(ctx):
  from easytunix.models.safetensors_io import current_umask

  target = ctx.root / "replace_me"
  target.mkdir()
  (target / "model.safetensors.index.json").write_text("{}")  # stale, from an older sharded save
  ctx.model.export_safetensors(target, overwrite=True)
  names = sorted(p.name for p in target.iterdir())
  assert "model.safetensors.index.json" not in names and "model.safetensors" in names
  assert not [p for p in ctx.root.iterdir() if ".tmp-" in p.name or ".old-" in p.name]
  expected = 0o666 & ~current_umask()
  assert (target / "model.safetensors").stat().st_mode & 0o777 == expected
  assert (target / "config.json").stat().st_mode & 0o777 == expected
  ctx.model.save_to_preset(target, overwrite=True)
  assert (target / "easytunix_preset.json").is_file()
  assert (target / "model.safetensors").stat().st_mode & 0o777 == expected


def test_table_size():
  assert len(CASES) >= 60


def test_first_non_finite_loss_warns_with_its_step(ctx):
  """Runs last on the shared model: every failed call above left it trainable (and this makes it NaN)."""
  ctx.model.compile(trainer="sft", optimizer="sgd", learning_rate=1e30, max_grad_norm=None, max_length=32)
  with pytest.warns(RuntimeWarning, match=r"training loss is (nan|inf) at step \d+") as caught:
    ctx.model.fit(TEXTS, steps=3, batch_size=8, verbose=0)
  assert len([w for w in caught if "training loss is" in str(w.message)]) == 1  # only the first one
