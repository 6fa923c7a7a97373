"""Distillation step speed against a plain SFT step of the same student (the teacher's overhead).

Teacher: SmolLM2-135M-Instruct real weights (30 layers, converted once by
``ensure_real_model``); student: its first 4 layers (``init_student_from_teacher``),
float32, batches of 4 x 128 tokens packed from the bundled instruction set,
AdamW, full fine-tuning. Every row first runs ``--warmup`` steps (compilation
included), then the rows take turns, ``--steps`` steps each, for ``--rounds``
rounds, so that a change in the machine's load hits every row alike (the first
step of each turn also pays the turn's set-up and is not timed). A step's time runs from the end of the previous step to the end of this one (blocking on
its loss), so it includes the teacher's forward pass, which runs on the host
side of the loop before the student's compiled step. The median step time is
reported, and the teacher's compiled logits forward alone for reference.

    python benchmarks/distill.py [--steps 3] [--rounds 3] [--warmup 2] [--strategies logit,feature_pooling,attention_transfer]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

BATCH, SEQ, LR, STUDENT_LAYERS = 4, 128, 1e-4, 4


def make_batches(tokenizer, count: int):
  import numpy as np

  from easytunix.sft.data import bundled_dataset_path, load_records
  from easytunix.sft.peft_trainer import TrainingInput

  stream: list[int] = []
  records = load_records(bundled_dataset_path("instructions"))
  while len(stream) < count * BATCH * SEQ:
    for r in records:
      stream.extend(tokenizer.encode(f"{r['prompt']} {r['completion']}\n"))
  tokens = np.asarray(stream[: count * BATCH * SEQ], np.int32).reshape(count, BATCH, SEQ)
  return [TrainingInput(input_tokens=t, input_mask=np.ones_like(t, bool)) for t in tokens]


def strategy_for(name: str):
  from flax import nnx

  from easytunix import distillation as d

  return {
      "logit": lambda: d.LogitStrategy(temperature=2.0, alpha=0.5),
      "feature_pooling": lambda: d.FeaturePoolingStrategy(),
      "feature_projection": lambda: d.FeatureProjectionStrategy(rngs=nnx.Rngs(0)),
      "attention_transfer": lambda: d.AttentionTransferStrategy(),
      "attention_projection": lambda: d.AttentionProjectionStrategy(rngs=nnx.Rngs(0)),
  }[name]()


def make_trainer(teacher, strategy_name: str | None, times: list[float]):
  """A trainer for one row; its hook appends each step's time (previous step's end to this one's) to ``times``,
  except for the first step of each ``train`` call."""
  import jax
  import optax

  from easytunix.distillation import DistillationTrainer, init_student_from_teacher
  from easytunix.sft import TrainingHooks
  from easytunix.sft.peft_trainer import PeftTrainer, TrainingConfig

  student = init_student_from_teacher(teacher, num_layers=STUDENT_LAYERS)

  class Timer(TrainingHooks):
    def on_train_start(self, train_ctx):
      self.last = None  # the first step of a call also pays the call's set-up: not timed

    def on_train_step_end(self, train_ctx, train_loss):
      jax.block_until_ready(train_loss)
      now = time.perf_counter()
      if self.last is not None:
        times.append(now - self.last)
      self.last = now

  config = TrainingConfig(num_epochs=1, show_progress_bar=False)
  if strategy_name is None:
    trainer = PeftTrainer(student, optax.adamw(LR), config)
  else:
    trainer = DistillationTrainer(student, teacher, strategy_for(strategy_name), optax.adamw(LR), config)
  trainer.is_managed_externally = True  # each train() call: one pass over the batches it is given
  return trainer.with_training_hooks(Timer())


def time_teacher_forward(teacher, batch, repeats: int) -> float:
  """Median time of the teacher's compiled logits forward on one batch."""
  import jax
  from flax import nnx

  from easytunix.distillation.strategies import default_forward_fn

  graphdef, state = nnx.split(teacher)
  forward = jax.jit(lambda state, tokens, mask: default_forward_fn(nnx.merge(graphdef, state), tokens, mask))
  jax.block_until_ready(forward(state, batch.input_tokens, batch.input_mask))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(forward(state, batch.input_tokens, batch.input_mask))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=3, help="steps per row and round (the first is not timed)")
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--strategies", default="logit,feature_pooling,attention_transfer",
                      help="comma-separated: logit, feature_pooling, feature_projection, attention_transfer, attention_projection")
  args = parser.parse_args()
  if args.steps < 2 or args.warmup < 2:
    parser.error("--steps and --warmup must be at least 2.")

  import jax

  from easytunix.convert.real_models import ensure_real_model
  from easytunix.generate.tokenizer_adapter import TokenizerAdapter
  from easytunix.models import load_model

  folder = Path(ensure_real_model("smollm2-135m-instruct"))
  tokenizer = TokenizerAdapter.from_pretrained(folder)
  teacher = load_model(folder, dtype="float32")
  batches = make_batches(tokenizer, args.warmup + args.rounds * args.steps)
  print(f"device: {jax.devices()[0].device_kind} x{len(jax.devices())}; teacher SmolLM2-135M (30 layers), "
        f"student {STUDENT_LAYERS} layers; batch {BATCH} x {SEQ}; float32; AdamW full fine-tuning")

  rows = [("SFT (student only)", None)] + [(f"distill: {n}", n) for n in args.strategies.split(",") if n]
  times: dict[str, list[float]] = {label: [] for label, _ in rows}
  trainers = {label: make_trainer(teacher, name, times[label]) for label, name in rows}
  first: dict[str, float] = {}
  for label, trainer in trainers.items():  # compile
    start = time.perf_counter()
    trainer.train(batches[:1])
    first[label] = time.perf_counter() - start
    trainer.train(batches[1 : args.warmup])
    times[label].clear()
  # Rounds of a few steps per row, so that a change in the machine's load hits every row alike.
  for r in range(args.rounds):
    for label, trainer in trainers.items():
      trainer.train(batches[args.warmup + r * args.steps : args.warmup + (r + 1) * args.steps])
  results = []
  for label, _ in rows:
    step = statistics.median(times[label])
    results.append((label, dict(step_time=step, tokens_per_second=BATCH * SEQ / step, first_step_time=first[label])))
  teacher_time = time_teacher_forward(teacher, batches[0], repeats=max(args.steps, 3))

  base = results[0][1]["step_time"]
  print(f"\n| {'row':<30} | step time (s) | tokens/s | vs SFT step | first step (s) |")
  print(f"|{'-' * 32}|{'-' * 15}|{'-' * 10}|{'-' * 13}|{'-' * 16}|")
  for label, r in results:
    print(f"| {label:<30} | {r['step_time']:13.3f} | {r['tokens_per_second']:8.0f} | {r['step_time'] / base:10.2f}x "
          f"| {r['first_step_time']:14.1f} |")
  print(f"| {'teacher forward alone':<30} | {teacher_time:13.3f} | {BATCH * SEQ / teacher_time:8.0f} | "
        f"{teacher_time / base:10.2f}x | {'':>14} |")


if __name__ == "__main__":
  main()
