"""GRPO step time on SmolLM2-135M-Instruct: easytunix (synchronous and asynchronous rollouts, and rollouts
through vLLM) against TRL.

Every row runs the same work per step: 4 prompts (the same chat-rendered
arithmetic questions, 36-40 tokens) x 4 generations = 16 completions of exactly
32 new tokens (EOS ignored, so lengths match), temperature 0.9, rewards from one
numeric-answer function, LoRA rank 16 on every projection, AdamW, beta 0.04 (a
reference pass with the adapters off), one policy update per batch of rollouts.

Columns: the median wall time of a whole step (rollouts, rewards, log-probs and
update), and of its parts: the rollout phase (generation, rewards, reference
log-probs) and the update (the rest of the step). With asynchronous rollouts
easytunix generates the next batch while the current one trains, so its step
time is shorter than rollout + update; "waited" is how long the update loop sat
idle waiting for rollouts. TRL's rollout time is its ``_generate_and_score_completions``.

Each row runs in its own subprocess; TRL needs ``trl`` and ``peft``, the vLLM row
vLLM (``easytunix setup-vllm``); otherwise the row says "not installed". The vLLM
row pushes the LoRA-merged actor weights into the engine before every batch of
rollouts; that push is part of its rollout time and is also printed on its own.

A second table compares the learning curves of synchronous and asynchronous
rollouts on the tiny arithmetic task of ``guides/grpo.md`` (a model fit by SFT
to addition labels that are 60% off by one, then 100 GRPO steps with a
correctness reward): rollout reward per 20 steps, held-out exact match, and the
median step time.

    python benchmarks/grpo.py [--steps 3] [--warmup 1] [--threads 2] [--skip-curves]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import _workers

PROMPTS_PER_STEP, GENERATIONS, NEW_TOKENS, RANK, ALPHA, LR, BETA = 4, 4, 32, 16, 32.0, 1e-5, 0.04
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def prompts(count: int) -> list[dict]:
  return [{"question": f"What is {7 + 3 * i} + {11 + 5 * i}? Answer with a number.", "answer": str(18 + 8 * i)}
          for i in range(count)]


def reward_numeric(prompts, completions, answer, **_):
  import re

  out = []
  for completion, expected in zip(completions, answer):
    text = completion if isinstance(completion, str) else completion[-1]["content"]
    numbers = re.findall(r"-?\d+", text)
    out.append(1.0 if numbers and numbers[-1] == str(expected) else 0.0)
  return out


def _render(folder: Path, records: list[dict]) -> list[str]:
  from easytunix.generate.tokenizer_adapter import TokenizerAdapter

  tokenizer = TokenizerAdapter.from_pretrained(folder)
  return [tokenizer.apply_chat_template([{"role": "user", "content": r["question"]}], add_generation_prompt=True)
          for r in records]


def _summary(step_ends: list[float], start: float, rollout: list[float], waited: list[float], warmup: int) -> dict:
  import resource

  marks = [start] + step_ends
  steps = [b - a for a, b in zip(marks[:-1], marks[1:])][warmup:]
  roll = rollout[warmup : warmup + len(steps)]
  step, roll_med = statistics.median(steps), statistics.median(roll)
  return dict(
      step_time=step,
      rollout_time=roll_med,
      update_time=statistics.median([s - r for s, r in zip(steps, roll)]) if not waited else None,
      waited=statistics.median(waited[warmup : warmup + len(steps)]) if waited else None,
      completions_per_second=PROMPTS_PER_STEP * GENERATIONS / step,
      first_step_time=marks[1] - marks[0],
      peak_rss_gib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
  )


def worker_easytunix(folder: Path, warmup: int, steps: int, async_rollout: bool, engine: str = "vanilla") -> dict:
  import jax
  import optax

  from easytunix.generate.tokenizer_adapter import TokenizerAdapter
  from easytunix.models import load_model
  from easytunix.rl.grpo import GrpoConfig, GrpoLearner
  from easytunix.rl.rl_cluster import ClusterConfig, RLCluster, RLTrainingConfig, RolloutConfig
  from easytunix.sft.hooks import TrainingHooks
  from easytunix.sft.lora import apply_lora

  tokenizer = TokenizerAdapter.from_pretrained(folder)
  model = load_model(folder, dtype="float32")
  apply_lora(model, rank=RANK, alpha=ALPHA, targets=TARGETS)
  total = warmup + steps
  records = prompts(PROMPTS_PER_STEP * total)
  texts = _render(folder, records)
  batches = []
  for s in range(total):
    chunk = slice(s * PROMPTS_PER_STEP, (s + 1) * PROMPTS_PER_STEP)
    batches.append({"prompts": [r["question"] for r in records[chunk]],
                    "prompt_ids": [tokenizer.encode(t, add_special_tokens=False) for t in texts[chunk]],
                    "answer": [r["answer"] for r in records[chunk]]})
  config = ClusterConfig(
      training_config=RLTrainingConfig(actor_optimizer=optax.adamw(LR), max_steps=total, show_progress_bar=False),
      rollout_config=RolloutConfig(max_tokens_to_generate=NEW_TOKENS, temperature=0.9, max_prompt_length=64,
                                   eos_tokens=()),
      rollout_engine=engine,
  )
  cluster = RLCluster(model, tokenizer=tokenizer, cluster_config=config)
  learner = GrpoLearner(cluster, reward_numeric,
                        GrpoConfig(num_generations=GENERATIONS, beta=BETA, async_rollout=async_rollout))
  ends: list[float] = []

  class Timer(TrainingHooks):
    def on_train_step_end(self, train_ctx, train_loss):
      jax.block_until_ready(train_loss)
      ends.append(time.perf_counter())

  learner.trainer.with_training_hooks(Timer())
  start = time.perf_counter()
  learner.train(batches)
  rollout = [m["rollout/seconds"] for m in learner.rollout_metrics]
  waited = [m["rollout/wait_seconds"] for m in learner.rollout_metrics] if async_rollout else []
  result = _summary(ends, start, rollout, waited, warmup)
  result["rewards"] = learner.trainer.metrics_logger.values("reward")
  if engine == "vllm":
    pushes = [m["rollout/engine_sync_seconds"] for m in learner.rollout_metrics][warmup:]
    result["note"] = (f"weight push into the vLLM engine (LoRA merged, every parameter) "
                      f"{statistics.median(pushes):.2f} s per step, inside the rollout time")
  cluster.close()
  return result


def worker_trl(folder: Path, warmup: int, steps: int, threads: int) -> dict:
  import tempfile

  import datasets
  import peft
  import torch
  import transformers
  import trl

  torch.set_num_threads(threads)
  total = warmup + steps
  records = prompts(PROMPTS_PER_STEP * total)
  texts = _render(folder, records)
  dataset = datasets.Dataset.from_list([{"prompt": t, "answer": r["answer"]} for t, r in zip(texts, records)])
  tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
  model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
  lora = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS, lora_dropout=0.0, bias="none",
                         task_type="CAUSAL_LM")
  ends: list[float] = []
  started: list[float] = []
  rollout: list[float] = []

  class Timer(transformers.TrainerCallback):
    def on_train_begin(self, args, state, control, **kwargs):
      started.append(time.perf_counter())

    def on_step_end(self, args, state, control, **kwargs):
      ends.append(time.perf_counter())

  with tempfile.TemporaryDirectory() as tmp:
    config = trl.GRPOConfig(
        output_dir=tmp, per_device_train_batch_size=PROMPTS_PER_STEP * GENERATIONS, num_generations=GENERATIONS,
        max_completion_length=NEW_TOKENS, temperature=0.9, beta=BETA, learning_rate=LR, max_steps=total,
        num_iterations=1, logging_steps=1, report_to=[], use_cpu=True, bf16=False, shuffle_dataset=False,
        save_strategy="no", generation_kwargs={"min_new_tokens": NEW_TOKENS}, disable_tqdm=True,
    )
    trainer = trl.GRPOTrainer(model=model, reward_funcs=reward_numeric, args=config, train_dataset=dataset,
                              processing_class=tokenizer, peft_config=lora, callbacks=[Timer()])
    original = trainer._generate_and_score_completions

    def timed(*args, **kwargs):
      begin = time.perf_counter()
      out = original(*args, **kwargs)
      rollout.append(time.perf_counter() - begin)
      return out

    trainer._generate_and_score_completions = timed
    trainer.train()
  result = _summary(ends, started[0], rollout, [], warmup)
  result["note"] = f"trl {trl.__version__}, torch {torch.__version__}"
  return result


def worker_curve(async_rollout: bool, verifier_seconds: float = 0.0, steps: int = 100) -> dict:
  import optax

  from easytunix.generate.sampler import CacheConfig, Sampler
  from easytunix.presets import Qwen3
  from easytunix.rl.grpo import GrpoConfig, GrpoLearner, prompt_batches
  from easytunix.rl.grpo.rewards import exact_match
  from easytunix.rl.rl_cluster import ClusterConfig, RLCluster, RLTrainingConfig, RolloutConfig
  from easytunix.sft.data import SupervisedDataset
  from easytunix.sft.peft_trainer import PeftTrainer, TrainingConfig
  from easytunix.sft.synthetic import addition_task, with_label_noise

  model = Qwen3.from_preset("qwen3_tiny", intermediate_size=256)
  tokenizer = model.tokenizer
  task = with_label_noise(addition_task(num_eval=200, seed=0, max_operand=49), 0.6)
  schedule = optax.warmup_cosine_decay_schedule(0.0, 3e-3, 50, 600, 1.5e-4)
  PeftTrainer(model, optax.adamw(schedule, weight_decay=0.0),
              TrainingConfig(max_steps=600, show_progress_bar=False, max_grad_norm=1.0)).train(
                  SupervisedDataset(task.train, tokenizer, batch_size=64, max_length=10, seed=0))

  def accuracy():
    sampler = Sampler(model, tokenizer, CacheConfig.for_model(model, cache_size=32))
    return task.score(sampler(task.eval_prompts, max_generation_steps=4).text)

  before = accuracy()
  config = ClusterConfig(
      training_config=RLTrainingConfig(actor_optimizer=optax.adamw(1e-4), max_steps=steps, show_progress_bar=False),
      rollout_config=RolloutConfig(max_tokens_to_generate=4, max_prompt_length=16, temperature=1.0),
  )
  def verified(prompts, completions, answer, **_):
    time.sleep(verifier_seconds)  # a verifier's latency (a sandbox, a service): host time, no compute
    return exact_match(prompts, completions, answer)

  learner = GrpoLearner(RLCluster(model, tokenizer=tokenizer, cluster_config=config), verified,
                        GrpoConfig(num_generations=8, beta=0.04, async_rollout=async_rollout))
  records = [{"prompt": r["prompt"], "answer": r["answer"]} for r in task.train]
  start = time.perf_counter()
  learner.train(prompt_batches(records, 16))
  seconds = time.perf_counter() - start
  log = learner.trainer.metrics_logger
  rewards = log.values("reward")
  return dict(
      before=before, after=accuracy(), seconds=seconds,
      curve=[float(sum(rewards[i : i + 20]) / len(rewards[i : i + 20])) for i in range(0, len(rewards), 20)],
      step_time=statistics.median(log.values("step_time")[1:]),
  )


def run_worker(args: list[str]) -> dict:
  return _workers.run_worker(Path(__file__).resolve(), args)


def main() -> None:
  import importlib.util

  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=3)
  parser.add_argument("--warmup", type=int, default=1)
  parser.add_argument("--threads", type=int, default=2, help="torch threads (XLA uses every core)")
  parser.add_argument("--skip-curves", action="store_true", help="skip the sync/async learning-curve table")
  parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
  args = parser.parse_args()

  if args.worker:
    kind, folder = args.worker[0], Path(args.worker[1])
    if kind.startswith("curve"):
      result = worker_curve(async_rollout="async" in kind, verifier_seconds=0.05 if kind.endswith("slow") else 0.0)
    elif kind == "trl":
      result = worker_trl(folder, args.warmup, args.steps, args.threads)
    else:
      result = worker_easytunix(folder, args.warmup, args.steps, async_rollout=kind == "easytunix-async",
                                engine="vllm" if kind.endswith("vllm") else "vanilla")
    print("RESULT " + json.dumps(result))
    return

  from easytunix.convert.real_models import ensure_real_model

  folder = ensure_real_model("smollm2-135m-instruct")
  common = ["--steps", str(args.steps), "--warmup", str(args.warmup), "--threads", str(args.threads)]
  missing = [n for n in ("trl", "peft", "datasets") if importlib.util.find_spec(n) is None]
  rows = []
  for name, kind in (("easytunix sync", "easytunix-sync"), ("easytunix async", "easytunix-async"),
                     ("easytunix+vLLM", "easytunix-sync-vllm"), ("TRL", "trl")):
    if kind == "trl" and missing:
      rows.append((name, {"error": [f"not installed ({', '.join(missing)}; pip install trl peft datasets)"]}))
      continue
    if kind.endswith("vllm") and importlib.util.find_spec("vllm") is None:
      rows.append((name, {"error": ["not installed (easytunix setup-vllm)"]}))
      continue
    rows.append((name, run_worker(common + ["--worker", kind, str(folder)])))

  print(f"\nGRPO step, SmolLM2-135M-Instruct, float32, {PROMPTS_PER_STEP} prompts x {GENERATIONS} generations x "
        f"{NEW_TOKENS} new tokens, LoRA rank {RANK}, beta {BETA}; median of {args.steps} steps after {args.warmup} "
        f"warm-up; CPU, {os.cpu_count()} cores, torch threads {args.threads}\n")
  header = (f"| {'framework':<15} | {'step (s)':>8} | {'rollout (s)':>11} | {'update (s)':>10} | {'waited (s)':>10} | "
            f"{'completions/s':>13} | {'TRL step / this':>15} | {'peak RSS (GiB)':>14} | {'first step (s)':>14} |")
  print(header)
  print("|" + "|".join("-" * len(c) for c in header.split("|")[1:-1]) + "|")
  trl_step = dict(rows).get("TRL", {}).get("step_time", float("nan"))

  def cell(value, width, fmt=".2f"):
    return f"{'-':>{width}}" if value is None else f"{value:>{width}{fmt}}"

  for name, r in rows:
    if "error" in r:
      print(f"| {name:<15} | {' '.join(r['error'])[:140]} |")
      continue
    print(f"| {name:<15} | {cell(r['step_time'], 8)} | {cell(r['rollout_time'], 11)} | {cell(r['update_time'], 10)} | "
          f"{cell(r['waited'], 10)} | {cell(r['completions_per_second'], 13)} | "
          f"{cell(trl_step / r['step_time'], 14)}x | {cell(r['peak_rss_gib'], 14)} | {cell(r['first_step_time'], 14, '.1f')} |")
  for name, r in rows:
    if r.get("note"):
      print(f"{name}: {r['note']}")
  print("\nWith asynchronous rollouts the update column is not shown: rollouts and updates overlap, and the step "
        "time is the measure.")
  if args.skip_curves:
    return
  curves = [(name, run_worker(["--worker", kind, str(folder)])) for name, kind in
            (("sync", "curve-sync"), ("async", "curve-async"), ("sync, 50 ms verifier", "curve-sync-slow"),
             ("async, 50 ms verifier", "curve-async-slow"))]
  print("\nLearning curves, qwen3_tiny on addition after SFT on 60%-wrong labels, 100 GRPO steps, 16 prompts x 8 "
        "generations, correctness reward (the last two rows: a reward function that also waits 50 ms, as a "
        "sandboxed verifier or a remote service would)\n")
  header = (f"| {'rollouts':<21} | {'reward per 20 steps':<36} | {'held-out before -> after':<24} | "
            f"{'median step (s)':>15} | {'total (s)':>9} |")
  print(header)
  print("|" + "|".join("-" * len(c) for c in header.split("|")[1:-1]) + "|")
  for name, r in curves:
    if "error" in r:
      print(f"| {name:<21} | {' '.join(r['error'])[:120]} |")
      continue
    curve = " ".join(f"{x:.2f}" for x in r["curve"])
    print(f"| {name:<21} | {curve:<36} | {r['before']:>10.1%} -> {r['after']:<10.1%} | {r['step_time']:>15.3f} | "
          f"{r['seconds']:>9.1f} |")


if __name__ == "__main__":
  main()
