"""DPO step speed and peak memory: easytunix's DpoTrainer against TRL's DPOTrainer (torch, CPU).

SmolLM2-135M-Instruct real weights (converted once by ``ensure_real_model``),
float32, LoRA rank 16 (alpha 32) on every attention and MLP projection, AdamW,
sigmoid DPO loss with beta 0.1. Each step sees 2 preference pairs whose prompt
and responses are exactly 64 tokens each, so every sequence (prompt + response)
is 128 tokens and a step runs 2 x 2 x 128 = 512 tokens through the policy
(and again through the reference: the base weights with the adapters off, in
both frameworks).

Rows: each framework computing the reference log-probs every step, and with
them precomputed once before training (easytunix's ``precompute_ref_logps``,
TRL's ``precompute_ref_log_probs``). TRL needs ``trl`` and ``peft``; without
them its rows say "not installed". Each row runs in its own
subprocess so its peak resident memory is its own. A step's time is from the
end of one optimizer step to the end of the next (data preparation and the
reference pass included), blocking on the loss; the table reports the median
after ``--warmup`` steps (compilation happens in the first), both in wall-clock
seconds and in CPU seconds of the process (all its threads): on a shared
machine the CPU time is the steadier measure of the work a step costs.

``--threads`` sets torch's threads; ``--threads 1`` also pins each worker to one
core (``sched_setaffinity``, before jax or torch start their thread pools): a
one-core comparison that other load on the machine disturbs least.

    python benchmarks/dpo.py [--steps 6] [--warmup 2] [--threads 2] [--repeats 1]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

import _workers

PAIRS, PROMPT_TOKENS, RESPONSE_TOKENS, RANK, ALPHA, LR, BETA = 2, 64, 64, 16, 32.0, 1e-4, 0.1
SEQ = PROMPT_TOKENS + RESPONSE_TOKENS
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
WORDS = ["apple", "river", "stone", "cloud", "green", "music", "table", "light"]


def make_records(folder: Path, count: int, out: Path) -> None:
  """``count`` plain-text pairs whose prompt is 64 tokens and whose responses are 63 tokens + EOS."""
  from easytunix.generate.tokenizer_adapter import TokenizerAdapter

  tokenizer = TokenizerAdapter.from_pretrained(folder)

  def text(offset: int, n: int) -> str:
    out = "".join(" " + WORDS[(offset + i) % len(WORDS)] for i in range(n))
    if len(tokenizer.encode(out, add_special_tokens=False)) != n:
      raise RuntimeError("The benchmark's words no longer encode to one token each with this tokenizer.")
    return out

  records = [
      {"prompt": text(i, PROMPT_TOKENS), "chosen": text(i + 1, RESPONSE_TOKENS - 1),
       "rejected": text(i + 3, RESPONSE_TOKENS - 1)}
      for i in range(count)
  ]
  out.write_text(json.dumps(records))


def _clock() -> tuple[float, float]:
  """(wall seconds, CPU seconds of this process)."""
  import time

  return time.perf_counter(), time.process_time()


def _summary(ends: list[tuple[float, float]], start: tuple[float, float], warmup: int) -> dict:
  import resource

  marks = [start] + ends
  wall = [b[0] - a[0] for a, b in zip(marks[:-1], marks[1:])]
  cpu = [b[1] - a[1] for a, b in zip(marks[:-1], marks[1:])]
  step, cpu_step = statistics.median(wall[warmup:]), statistics.median(cpu[warmup:])
  return dict(
      step_time=step,
      cpu_step_time=cpu_step,
      tokens_per_second=2 * PAIRS * SEQ / step,
      tokens_per_cpu_second=2 * PAIRS * SEQ / cpu_step,
      peak_rss_gib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
      first_step_time=wall[0],
  )


def worker_easytunix(folder: Path, records_file: Path, warmup: int, steps: int, precompute: bool) -> dict:
  import time

  import jax
  import optax

  from easytunix.generate.tokenizer_adapter import TokenizerAdapter
  from easytunix.models import load_model
  from easytunix.rl.dpo import DpoTrainer, DpoTrainingConfig, dpo_batches
  from easytunix.sft import TrainingHooks
  from easytunix.sft.lora import apply_lora

  tokenizer = TokenizerAdapter.from_pretrained(folder)
  records = json.loads(records_file.read_text())
  data = dpo_batches(records, tokenizer, batch_size=PAIRS, max_length=SEQ, shuffle=False)
  assert (data.prompt_width, data.response_width) == (PROMPT_TOKENS, RESPONSE_TOKENS), (data.prompt_width, data.response_width)
  model = load_model(folder, dtype="float32")
  apply_lora(model, rank=RANK, alpha=ALPHA, targets=TARGETS)
  ends: list[tuple[float, float]] = []
  started: list[tuple[float, float]] = []

  class Timer(TrainingHooks):
    def on_train_start(self, train_ctx):
      started.append(_clock())

    def on_train_step_end(self, train_ctx, train_loss):
      jax.block_until_ready(train_loss)
      ends.append(_clock())

  config = DpoTrainingConfig(max_steps=warmup + steps, beta=BETA, max_seq_length=SEQ, show_progress_bar=False)
  trainer = DpoTrainer(model, None, optax.adamw(LR), config).with_training_hooks(Timer())
  precompute_time = None
  if precompute:
    begin = time.perf_counter()
    trainer.precompute_ref_logps(data)
    precompute_time = time.perf_counter() - begin
  trainer.train(data)
  out = _summary(ends, started[0], warmup)
  out["final_loss"] = trainer.metrics_logger.values("loss")[-1]
  if precompute_time is not None:
    out["note"] = f"precompute {precompute_time:.1f}s for {len(records)} pairs"
  return out


def worker_trl(folder: Path, records_file: Path, warmup: int, steps: int, threads: int, precompute: bool) -> dict:

  import datasets
  import peft
  import torch
  import transformers
  import trl

  torch.set_num_threads(threads)
  records = json.loads(records_file.read_text())
  tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
  model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
  lora = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS, lora_dropout=0.0, bias="none",
                         task_type="CAUSAL_LM")
  ends: list[tuple[float, float]] = []
  started: list[tuple[float, float]] = []

  class Timer(transformers.TrainerCallback):
    def on_train_begin(self, args, state, control, **kwargs):
      started.append(_clock())

    def on_step_end(self, args, state, control, **kwargs):
      ends.append(_clock())

  with tempfile.TemporaryDirectory() as tmp:
    config = trl.DPOConfig(
        output_dir=tmp, per_device_train_batch_size=PAIRS, max_length=SEQ, beta=BETA, learning_rate=LR,
        max_steps=warmup + steps, logging_steps=10**6, save_strategy="no", report_to="none", use_cpu=True,
        bf16=False, fp16=False, dataloader_num_workers=0, lr_scheduler_type="constant", warmup_steps=0,
        precompute_ref_log_probs=precompute, seed=0,
    )
    trainer = trl.DPOTrainer(model=model, args=config, train_dataset=datasets.Dataset.from_list(records),
                             processing_class=tokenizer, peft_config=lora, callbacks=[Timer()])
    first = trainer.train_dataset[0]
    lengths = (len(first["prompt_ids"]), len(first["chosen_ids"]), len(first["rejected_ids"]))
    assert lengths == (PROMPT_TOKENS, RESPONSE_TOKENS, RESPONSE_TOKENS), lengths
    result = trainer.train()
  out = _summary(ends, started[0], warmup)
  out["final_loss"] = float(result.training_loss)
  return out


def run_worker(args: list[str]) -> dict:
  return _workers.run_worker(Path(__file__).resolve(), args)


def _installed(*names: str) -> list[str]:
  import importlib.util

  return [n for n in names if importlib.util.find_spec(n) is None]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=6)
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--threads", type=int, default=2, help="torch threads (XLA uses every core)")
  parser.add_argument("--no-precompute", action="store_true", help="skip the rows with precomputed reference log-probs")
  parser.add_argument("--repeats", type=int, default=1,
                      help="run every row this many times, round robin, and keep each row's fastest run (the CPU "
                           "may be shared: this evens out load that comes and goes)")
  parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
  args = parser.parse_args()

  if args.worker:
    if args.threads == 1 and hasattr(os, "sched_setaffinity"):
      os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    kind, folder, records_file, mode = args.worker[0], Path(args.worker[1]), Path(args.worker[2]), args.worker[3]
    precompute = mode == "precomputed"
    if kind == "easytunix":
      result = worker_easytunix(folder, records_file, args.warmup, args.steps, precompute)
    else:
      result = worker_trl(folder, records_file, args.warmup, args.steps, args.threads, precompute)
    print("RESULT " + json.dumps(result))
    return

  from easytunix.convert.real_models import ensure_real_model

  folder = ensure_real_model("smollm2-135m-instruct")
  modes = ["per-step"] + ([] if args.no_precompute else ["precomputed"])
  missing = _installed("trl", "peft", "datasets")
  plan = [(name, mode) for mode in modes for name in ("easytunix", "TRL")]
  best: dict[tuple[str, str], dict] = {}
  with tempfile.TemporaryDirectory() as tmp:
    records_file = Path(tmp) / "records.json"
    make_records(folder, PAIRS * (args.warmup + args.steps), records_file)
    common = ["--steps", str(args.steps), "--warmup", str(args.warmup), "--threads", str(args.threads)]
    for _ in range(max(args.repeats, 1)):
      for name, mode in plan:
        if name == "TRL" and missing:
          result = {"error": [f"not installed ({', '.join(missing)}; pip install trl peft)"]}
        else:
          kind = "easytunix" if name == "easytunix" else "trl"
          result = run_worker(common + ["--worker", kind, str(folder), str(records_file), mode])
        previous = best.get((name, mode))
        if previous is None or "error" in previous or result.get("cpu_step_time", float("inf")) < previous["cpu_step_time"]:
          best[(name, mode)] = result
  rows = [(name, mode, best[(name, mode)]) for name, mode in plan]

  print(f"\nDPO step, SmolLM2-135M-Instruct, float32, {PAIRS} pairs x {SEQ} tokens ({PROMPT_TOKENS} prompt + "
        f"{RESPONSE_TOKENS} response), LoRA rank {RANK} on {len(TARGETS)} projections, AdamW, sigmoid loss; reference = "
        f"base weights with adapters off; median of {args.steps} steps after {args.warmup} warm-up, best of {max(args.repeats, 1)} run(s); CPU, "
        f"{os.cpu_count()} cores, {'one core per run' if args.threads == 1 else f'torch threads {args.threads}, XLA all cores'}\n")
  header = (f"| {'framework':<9} | {'reference logps':<15} | {'tokens/s':>8} | {'step (s)':>8} | {'CPU s/step':>10} | "
            f"{'tokens/CPU-s':>12} | {'easytunix / this (CPU)':>22} | {'peak RSS (GiB)':>14} | {'first step (s)':>14} |")
  print(header)
  print("|" + "|".join("-" * len(c) for c in header.split("|")[1:-1]) + "|")
  ours = {mode: r for name, mode, r in rows if name == "easytunix"}
  for name, mode, r in rows:
    if "error" in r:
      print(f"| {name:<9} | {mode:<15} | {' '.join(r['error'])[:120]} |")
      continue
    ratio = ours.get(mode, {}).get("tokens_per_cpu_second", float("nan")) / r["tokens_per_cpu_second"]
    print(
        f"| {name:<9} | {mode:<15} | {r['tokens_per_second']:>8.1f} | {r['step_time']:>8.2f} | "
        f"{r['cpu_step_time']:>10.2f} | {r['tokens_per_cpu_second']:>12.1f} | {ratio:>21.2f}x | "
        f"{r['peak_rss_gib']:>14.2f} | {r['first_step_time']:>14.1f} |"
    )
  print("\ntokens/s counts the policy's tokens: 2 sequences (chosen, rejected) x pairs x tokens per step.")
  for name, mode, r in rows:
    if r.get("note"):
      print(f"{name} ({mode}): {r['note']}")


if __name__ == "__main__":
  main()
