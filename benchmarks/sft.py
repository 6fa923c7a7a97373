"""SFT step speed and peak memory: easytunix's PeftTrainer against transformers (+ peft) and, optionally, Tunix.

SmolLM2-135M-Instruct real weights (converted once by ``ensure_real_model``),
float32, batches of 4 x 256 tokens packed from the bundled instruction set,
AdamW. Rows: LoRA rank 16 (alpha 32) on every attention and MLP projection, and
full fine-tuning. Each row runs in its own subprocess so that its peak resident
memory (``ru_maxrss``) is its own; each times ``--steps`` optimizer steps after
``--warmup`` steps (compilation included in the warm-up), blocking on every
step's loss, and reports the median step time.

    python benchmarks/sft.py [--steps 5] [--warmup 2] [--rounds 2] [--threads 2] [--no-full]

transformers LoRA needs ``peft`` (pure Python; ``pip install peft``); without it
that row is skipped. Tunix runs from its own virtual environment when
``EASYTUNIX_TUNIX_PYTHON=/path/to/tunix-venv/bin/python`` is set.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import textwrap
from pathlib import Path

import _workers

BATCH, SEQ, RANK, ALPHA, LR = 4, 256, 16, 32.0, 1e-4
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_batches(folder: Path, count: int, out: Path) -> None:
  """Packs the bundled instructions into ``count`` batches of [BATCH, SEQ] token ids."""
  import numpy as np

  from easytunix.generate.tokenizer_adapter import TokenizerAdapter
  from easytunix.sft.data import bundled_dataset_path, load_records

  tokenizer = TokenizerAdapter.from_pretrained(folder)
  stream: list[int] = []
  records = load_records(bundled_dataset_path("instructions"))
  while len(stream) < count * BATCH * SEQ:
    for r in records:
      stream.extend(tokenizer.encode(f"{r['prompt']} {r['completion']}\n"))
  np.save(out, np.asarray(stream[: count * BATCH * SEQ], np.int32).reshape(count, BATCH, SEQ))


def _summary(times: list[float], cpu_times: list[float], warmup: int) -> dict:
  import resource
  import statistics

  step = statistics.median(times[warmup:])
  cpu = statistics.median(cpu_times[warmup:])
  return dict(
      step_time=step,
      tokens_per_second=BATCH * SEQ / step,
      tokens_per_cpu_second=BATCH * SEQ / cpu,
      peak_rss_gib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
      first_step_time=times[0],
  )


def worker_easytunix(folder: Path, batches_file: Path, warmup: int, steps: int, lora: bool) -> dict:
  import time

  import jax
  import numpy as np
  import optax

  from easytunix.models import load_model
  from easytunix.sft import TrainingHooks
  from easytunix.sft.lora import apply_lora
  from easytunix.sft.peft_trainer import PeftTrainer, TrainingConfig, TrainingInput

  tokens = np.load(batches_file)
  model = load_model(folder, dtype="float32")
  if lora:
    apply_lora(model, rank=RANK, alpha=ALPHA, targets=TARGETS)
  batches = [TrainingInput(input_tokens=t, input_mask=np.ones_like(t, bool)) for t in tokens]
  times: list[float] = []
  cpu_times: list[float] = []

  class Timer(TrainingHooks):
    def on_train_step_start(self, train_ctx):
      self.start, self.cpu = time.perf_counter(), time.process_time()

    def on_train_step_end(self, train_ctx, train_loss):
      jax.block_until_ready(train_loss)
      times.append(time.perf_counter() - self.start)
      cpu_times.append(time.process_time() - self.cpu)

  config = TrainingConfig(max_steps=warmup + steps, show_progress_bar=False)
  trainer = PeftTrainer(model, optax.adamw(LR), config).with_training_hooks(Timer())
  trainer.train(batches)
  out = _summary(times, cpu_times, warmup)
  out["final_loss"] = trainer.metrics_logger.values("loss")[-1]
  return out


def worker_transformers(folder: Path, batches_file: Path, warmup: int, steps: int, lora: bool, threads: int) -> dict:
  import time

  import numpy as np
  import torch
  import transformers

  torch.set_num_threads(threads)
  tokens = torch.from_numpy(np.load(batches_file)).long()
  model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
  if lora:
    import peft

    config = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS, lora_dropout=0.0, bias="none")
    model = peft.get_peft_model(model, config)
  model.train()
  optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
  times, cpu_times, loss = [], [], None
  for i in range(warmup + steps):
    start, cpu = time.perf_counter(), time.process_time()
    batch = tokens[i % len(tokens)]
    loss = model(input_ids=batch, labels=batch).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    times.append(time.perf_counter() - start)
    cpu_times.append(time.process_time() - cpu)
  out = _summary(times, cpu_times, warmup)
  out["final_loss"] = float(loss)
  return out


TUNIX_WORKER = textwrap.dedent(
    """
    # Runs inside a Tunix virtual environment (google-tunix, qwix). Best effort:
    # written against Tunix's documented API, not run on the machine that wrote it.
    import json, resource, statistics, sys, time
    import jax, numpy as np, optax, qwix
    from tunix.models.llama3 import model as llama3_model, params as llama3_params
    from tunix.sft import peft_trainer, utils
    from tunix.sft.hooks import TrainingHooks

    folder, batches_file, warmup, steps, lora = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5] == "1"
    hf = json.load(open(folder + "/config.json"))
    config = llama3_model.ModelConfig(
        num_layers=hf["num_hidden_layers"], vocab_size=hf["vocab_size"], embed_dim=hf["hidden_size"],
        hidden_dim=hf["intermediate_size"], num_heads=hf["num_attention_heads"],
        head_dim=hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"],
        num_kv_heads=hf["num_key_value_heads"], rope_theta=int((hf.get("rope_parameters") or hf).get("rope_theta", 10000)),
        norm_eps=hf["rms_norm_eps"], weight_tying=hf.get("tie_word_embeddings", False))
    mesh = jax.make_mesh((1, 1), ("fsdp", "tp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)  # jax 0.10: Explicit by default
    model = llama3_params.create_model_from_safe_tensors(folder, config, mesh)
    if lora:
      provider = qwix.LoraProvider(module_path="|".join(".*" + t for t in {targets}), rank={rank}, alpha={alpha})
      model = qwix.apply_lora_to_model(model, provider, **model.get_model_input())
    tokens = np.load(batches_file)
    batches = [peft_trainer.TrainingInput(input_tokens=t, input_mask=np.ones_like(t, bool)) for t in tokens]

    def gen_model_input(x):
      mask = x.input_tokens >= 0
      return dict(input_tokens=x.input_tokens, input_mask=x.input_mask,
                  positions=utils.build_positions_from_mask(mask), attention_mask=utils.make_causal_attn_mask(mask))

    times, cpu_times = [], []
    class Timer(TrainingHooks):
      def on_train_start(self, ctx): pass
      def on_train_end(self, ctx): pass
      def on_train_step_start(self, ctx): self.start, self.cpu = time.perf_counter(), time.process_time()
      def on_train_step_end(self, ctx, *step_and_loss):  # Tunix 0.1.7 passes (ctx, step, loss); its docs (ctx, loss)
        jax.block_until_ready(step_and_loss[-1]); times.append(time.perf_counter() - self.start)
        cpu_times.append(time.process_time() - self.cpu)
      def on_eval_step_start(self, ctx): pass
      def on_eval_step_end(self, ctx, loss): pass

    cfg = peft_trainer.TrainingConfig(eval_every_n_steps=10**6, max_steps=warmup + steps)
    trainer = peft_trainer.PeftTrainer(model, optax.adamw({lr}), cfg).with_gen_model_input_fn(gen_model_input)
    trainer.with_training_hooks(Timer())  # returns None in Tunix 0.1.7 (our with_* return the trainer)
    trainer.train(batches)
    step = statistics.median(times[warmup:])
    cpu = statistics.median(cpu_times[warmup:])
    print("RESULT " + json.dumps(dict(step_time=step, tokens_per_second={batch} * {seq} / step,
          tokens_per_cpu_second={batch} * {seq} / cpu,
          peak_rss_gib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, first_step_time=times[0])))
    """
).format(targets=TARGETS, rank=RANK, alpha=ALPHA, lr=LR, batch=BATCH, seq=SEQ)


def run_worker(args: list[str], python: str = sys.executable, script: Path | None = None) -> dict:
  return _workers.run_worker(script or Path(__file__).resolve(), args, python)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--threads", type=int, default=2, help="torch threads (XLA uses every core)")
  parser.add_argument("--no-full", action="store_true", help="skip the full fine-tuning rows")
  parser.add_argument("--rounds", type=int, default=1,
                      help="run every row this many times, in turn, keeping each row's fastest run: the machine's "
                           "speed drifts over minutes")
  parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.rounds < 1 or args.steps < 1 or args.warmup < 0:
    parser.error("--rounds and --steps must be at least 1, --warmup at least 0")

  if args.worker:
    kind, folder, batches_file, mode = args.worker[0], Path(args.worker[1]), Path(args.worker[2]), args.worker[3]
    lora = mode == "lora"
    if kind == "easytunix":
      result = worker_easytunix(folder, batches_file, args.warmup, args.steps, lora)
    else:
      result = worker_transformers(folder, batches_file, args.warmup, args.steps, lora, args.threads)
    print("RESULT " + json.dumps(result))
    return

  from easytunix.convert.real_models import ensure_real_model

  folder = ensure_real_model("smollm2-135m-instruct")
  modes = ["lora"] + ([] if args.no_full else ["full"])
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    batches_file = Path(tmp) / "batches.npy"
    make_batches(folder, args.warmup + args.steps, batches_file)
    common = ["--steps", str(args.steps), "--warmup", str(args.warmup), "--threads", str(args.threads)]
    for mode in [m for _ in range(args.rounds) for m in modes]:
      rows.append(("easytunix", mode, run_worker(common + ["--worker", "easytunix", str(folder), str(batches_file), mode])))
      try:
        import peft  # noqa: F401

        has_peft = True
      except ImportError:
        has_peft = False
      if mode == "lora" and not has_peft:
        rows.append(("transformers+peft", mode, {"error": ["peft is not installed (pip install peft)"]}))
      else:
        name = "transformers+peft" if mode == "lora" else "transformers"
        rows.append((name, mode, run_worker(common + ["--worker", "transformers", str(folder), str(batches_file), mode])))
      tunix_python = os.environ.get("EASYTUNIX_TUNIX_PYTHON")
      if tunix_python:
        script = Path(tmp) / "tunix_worker.py"
        script.write_text(TUNIX_WORKER)
        worker_args = [str(folder), str(batches_file), str(args.warmup), str(args.steps), "1" if mode == "lora" else "0"]
        rows.append(("tunix", mode, run_worker(worker_args, python=tunix_python, script=script)))

  best: dict[tuple[str, str], dict] = {}  # each row's fastest round (an error only if every round failed)
  for name, mode, r in rows:
    have = best.get((name, mode))
    if have is None or "error" in have or ("error" not in r and r["tokens_per_second"] > have["tokens_per_second"]):
      best[(name, mode)] = r
  rows = [(name, mode, r) for (name, mode), r in best.items()]
  print(f"\nSFT step, SmolLM2-135M-Instruct, float32, batch {BATCH} x {SEQ} tokens, LoRA rank {RANK} on "
        f"{len(TARGETS)} projections, AdamW; median of {args.steps} steps after {args.warmup} warm-up, the fastest "
        f"of {args.rounds} round(s); CPU. "
        "tokens/CPU-s divides by the process's CPU time, which a busy shared machine disturbs less than wall time.\n")
  columns = ["framework", "mode", "tokens/s", "step (s)", "tokens/CPU-s", "peak RSS (GiB)", "easytunix speed-up",
             "easytunix CPU efficiency", "first step (s)"]
  print("| " + " | ".join(columns) + " |")
  print("|" + "|".join("---" for _ in columns) + "|")
  ours = {mode: r for name, mode, r in rows if name == "easytunix"}
  for name, mode, r in rows:
    if "error" in r:
      print(f"| {name} | {mode} | failed: {' '.join(r['error'])[:120]} |")
      continue
    mine = ours.get(mode, {})
    speed = mine.get("tokens_per_second", float("nan")) / r["tokens_per_second"]
    efficiency = mine.get("tokens_per_cpu_second", float("nan")) / r["tokens_per_cpu_second"]
    print(
        f"| {name} | {mode} | {r['tokens_per_second']:.1f} | {r['step_time']:.2f} | {r['tokens_per_cpu_second']:.1f} | "
        f"{r['peak_rss_gib']:.2f} | {speed:.2f}x | {efficiency:.2f}x | {r['first_step_time']:.1f} |"
    )


if __name__ == "__main__":
  main()
