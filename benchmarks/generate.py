"""Greedy generation speed: easytunix's Sampler against transformers' generate (and optional peers).

SmolLM2-135M-Instruct real weights (converted once by ``ensure_real_model``),
float32, 16 chat prompts of different lengths, 64 new tokens each (EOS ignored
so every row generates all 64), greedy. Both run in this process, one after the
other, each warmed up first; every figure is the best of ``--repeats`` runs.

    python benchmarks/generate.py [--repeats 5] [--rounds 2] [--threads 2 [1 ...]]

Ratios are against the fastest transformers row: on a busy 2-core machine
torch's two OpenMP threads can stall each other, so ``--threads 2 1`` times
transformers both ways.

When vLLM is installed here (``easytunix setup-vllm``) two more rows run, each in
a subprocess of this python: easytunix's VllmSampler (engine started from our
JAX weights, with the time of a full weight push, ``update_params``) and plain
vLLM reading the folder. Tunix runs in its own virtual environment when an
environment variable names that environment's python:

    EASYTUNIX_TUNIX_PYTHON=/path/to/tunix-venv/bin/python   (google-tunix)
    EASYTUNIX_VLLM_PYTHON=/path/to/vllm-venv/bin/python     (vllm elsewhere)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

QUESTIONS = [
    "What is 12 + 7?",
    "Name three primary colors.",
    "Write a haiku about the sea.",
    "Why is the sky blue? Answer in two sentences.",
    "Give me a short recipe for pancakes with the quantities of every ingredient.",
    "Translate 'good morning' into French.",
    "What is the capital of Japan, and roughly how many people live there today?",
    "List the planets of the solar system in order from the sun.",
    "Explain recursion to a ten-year-old.",
    "What is a prime number?",
    "Summarize the plot of Romeo and Juliet in a few sentences, without spoilers about the very end if possible.",
    "How do I boil an egg?",
    "Suggest a name for a black cat.",
    "What are the benefits of regular exercise for people who work at a desk all day?",
    "Convert 100 degrees Fahrenheit to Celsius.",
    "Tell me a fun fact about octopuses.",
]
NEW_TOKENS = 64


def best_time(fn, repeats: int) -> float:
  """The fastest of ``repeats`` runs: on a shared machine the least disturbed one."""
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return min(times)


def run_easytunix(folder: Path, prompt_ids: list[list[int]], repeats: int) -> dict:
  from easytunix.generate import CacheConfig, Sampler
  from easytunix.models import load_model

  model = load_model(folder, dtype="float32")
  sampler = Sampler(model, None, CacheConfig.for_model(model, cache_size=512, max_batch_size=16))

  def generate(prompts, steps):
    return sampler(prompts, steps, eos_tokens=[])

  start = time.perf_counter()
  tokens = generate(prompt_ids, NEW_TOKENS).tokens
  compile_s = time.perf_counter() - start
  for prompts in (prompt_ids, prompt_ids[:1]):  # compile the other shapes before timing
    generate(prompts, 1)
    generate(prompts, NEW_TOKENS)
  return dict(
      batch_s=best_time(lambda: generate(prompt_ids, NEW_TOKENS), repeats),
      batch_ttft_s=best_time(lambda: generate(prompt_ids, 1), repeats),
      one_s=best_time(lambda: generate(prompt_ids[:1], NEW_TOKENS), repeats),
      one_ttft_s=best_time(lambda: generate(prompt_ids[:1], 1), repeats),
      first_call_s=compile_s,
      tokens=[t.tolist() for t in tokens],
  )


def run_transformers(folder: Path, prompt_ids: list[list[int]], pad_id: int, repeats: int) -> dict:
  import torch
  import transformers

  model = transformers.AutoModelForCausalLM.from_pretrained(
      folder, dtype=torch.float32, attn_implementation="sdpa"
  ).eval()
  model.generation_config.eos_token_id = None  # generate all NEW_TOKENS on every row

  def batch(prompts):
    width = max(map(len, prompts))
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask

  def generate(prompts, steps):
    ids, mask = batch(prompts)
    with torch.no_grad():
      out = model.generate(
          input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=steps, pad_token_id=pad_id,
      )
    return out[:, ids.shape[1] :]

  tokens = generate(prompt_ids, NEW_TOKENS)
  generate(prompt_ids[:1], NEW_TOKENS)
  return dict(
      batch_s=best_time(lambda: generate(prompt_ids, NEW_TOKENS), repeats),
      batch_ttft_s=best_time(lambda: generate(prompt_ids, 1), repeats),
      one_s=best_time(lambda: generate(prompt_ids[:1], NEW_TOKENS), repeats),
      one_ttft_s=best_time(lambda: generate(prompt_ids[:1], 1), repeats),
      tokens=tokens.tolist(),
  )


# Peers: each script reads {"folder", "prompt_ids", "prompts", "new_tokens", "repeats"} as JSON on stdin and
# prints one JSON line with batch_s, batch_ttft_s, one_s, one_ttft_s.
_TIMING = textwrap.dedent(
    """
    import json, sys, time
    job = json.loads(sys.stdin.read())
    def best_time(fn):
      times = []
      for _ in range(job["repeats"]):
        start = time.perf_counter(); fn(); times.append(time.perf_counter() - start)
      return min(times)
    """
)

_VLLM = _TIMING + textwrap.dedent(
    """
    import os
    os.environ.setdefault("VLLM_HOST_IP", "127.0.0.1")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "0-1")
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    from vllm import LLM, SamplingParams
    llm = LLM(model=job["folder"], dtype="float32", max_model_len=512, seed=0, kv_cache_memory_bytes=1 << 30)
    def generate(ids, steps):
      params = SamplingParams(temperature=0.0, max_tokens=steps, ignore_eos=True)
      return llm.generate([{"prompt_token_ids": x} for x in ids], params, use_tqdm=False)
    ids, n = job["prompt_ids"], job["new_tokens"]
    generate(ids, n); generate(ids[:1], n)
    print(json.dumps(dict(
        batch_s=best_time(lambda: generate(ids, n)), batch_ttft_s=best_time(lambda: generate(ids, 1)),
        one_s=best_time(lambda: generate(ids[:1], n)), one_ttft_s=best_time(lambda: generate(ids[:1], 1)))))
    """
)

_EASYTUNIX_VLLM = _TIMING + textwrap.dedent(
    """
    from easytunix.generate.vllm_sampler import VllmSampler
    from easytunix.models import load_model
    model = load_model(job["folder"], dtype="float32")
    start = time.perf_counter()
    sampler = VllmSampler(None, max_model_len=512, model_version=model, max_num_seqs=16)
    startup = time.perf_counter() - start
    syncs = []
    for _ in range(3):
      start = time.perf_counter(); sampler.update_params(model); syncs.append(time.perf_counter() - start)
    ids, n = job["prompt_ids"], job["new_tokens"]
    generate = lambda x, steps: sampler(x, steps, eos_tokens=[])
    tokens = [t.tolist() for t in generate(ids, n).tokens]
    generate(ids[:1], n)
    print(json.dumps(dict(
        batch_s=best_time(lambda: generate(ids, n)), batch_ttft_s=best_time(lambda: generate(ids, 1)),
        one_s=best_time(lambda: generate(ids[:1], n)), one_ttft_s=best_time(lambda: generate(ids[:1], 1)),
        startup_s=startup, sync_s=min(syncs), tokens=tokens)))
    """
)

_TUNIX = _TIMING + textwrap.dedent(
    """
    import dataclasses
    import transformers
    from tunix.generate import sampler as sampler_lib
    from tunix.models.llama3 import model as model_lib, params as params_lib
    hf = json.load(open(job["folder"] + "/config.json"))
    theta = hf.get("rope_theta") or (hf.get("rope_parameters") or {}).get("rope_theta", 10000.0)
    wanted = dict(num_layers=hf["num_hidden_layers"], vocab_size=hf["vocab_size"], embed_dim=hf["hidden_size"],
                  hidden_dim=hf["intermediate_size"], num_heads=hf["num_attention_heads"], head_dim=hf["head_dim"],
                  num_kv_heads=hf["num_key_value_heads"], rope_theta=int(theta), norm_eps=hf["rms_norm_eps"],
                  weight_tying=hf.get("tie_word_embeddings", False))
    fields = {f.name for f in dataclasses.fields(model_lib.ModelConfig)}
    config = model_lib.ModelConfig(**{k: v for k, v in wanted.items() if k in fields})
    model = params_lib.create_model_from_safe_tensors(job["folder"], config)
    tokenizer = transformers.AutoTokenizer.from_pretrained(job["folder"])
    cache = sampler_lib.CacheConfig(cache_size=512, num_layers=config.num_layers, num_kv_heads=config.num_kv_heads,
                                    head_dim=config.head_dim)
    sampler = sampler_lib.Sampler(model, tokenizer, cache)
    prompts, n = job["prompts"], job["new_tokens"]
    def generate(texts, steps):
      # eos_tokens=[-1]: no token ends a row, so every row generates all the steps (as in the other rows).
      return sampler(texts, max_generation_steps=steps, temperature=0.0, echo=False, eos_tokens=[-1])
    generate(prompts, n); generate(prompts, 1); generate(prompts[:1], n); generate(prompts[:1], 1)
    print(json.dumps(dict(
        batch_s=best_time(lambda: generate(prompts, n)), batch_ttft_s=best_time(lambda: generate(prompts, 1)),
        one_s=best_time(lambda: generate(prompts[:1], n)), one_ttft_s=best_time(lambda: generate(prompts[:1], 1)))))
    """
)


def run_peer(python: str, script: str, job: dict) -> dict:
  proc = subprocess.run(
      [python, "-c", script], input=json.dumps(job), capture_output=True, text=True, timeout=1800, check=False
  )
  lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
  if proc.returncode != 0 or not lines:
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
    return dict(error=f"exit {proc.returncode}: {tail[0][:120]}")
  return json.loads(lines[-1])


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--rounds", type=int, default=1,
                      help="run every engine this many times, in turn, keeping each one's best: the machine's speed "
                           "drifts over minutes, and one engine timed in a slow spell would look slower than it is")
  parser.add_argument("--threads", type=int, nargs="+", default=[2], help="torch intra-op threads (one row each)")
  args = parser.parse_args(argv)
  if args.rounds < 1 or args.repeats < 1:
    parser.error("--rounds and --repeats must be at least 1")

  import torch

  sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
  from easytunix.convert.real_models import ensure_real_model
  from easytunix.generate import TokenizerAdapter

  folder = ensure_real_model("smollm2-135m-instruct")
  tokenizer = TokenizerAdapter.from_pretrained(folder)
  prompts = [
      tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True) for q in QUESTIONS
  ]
  prompt_ids = [tokenizer.encode(p) for p in prompts]
  lengths = [len(x) for x in prompt_ids]
  print(f"SmolLM2-135M-Instruct f32, {len(prompts)} prompts ({min(lengths)}-{max(lengths)} tokens), "
        f"{NEW_TOKENS} new tokens, greedy, best of {args.repeats} runs x {args.rounds} round(s)")

  n = len(prompt_ids) * NEW_TOKENS
  results = {}

  def record(name, result):
    if "error" not in result:  # a progress line, in case a later engine is slow
      print(f"  {name}: {n / result['batch_s']:.1f} tok/s batch, {NEW_TOKENS / result['one_s']:.1f} tok/s one prompt",
            flush=True)
    old = results.get(name)
    if old is None or "error" in old:
      results[name] = result
    elif "error" not in result:  # another round: keep each figure's best
      for key in ("batch_s", "batch_ttft_s", "one_s", "one_ttft_s"):
        old[key] = min(old[key], result[key])

  job = dict(folder=str(folder), prompt_ids=prompt_ids, prompts=prompts, new_tokens=NEW_TOKENS, repeats=args.repeats)
  import importlib.util

  here = sys.executable if importlib.util.find_spec("vllm") is not None else None
  for round_ in range(args.rounds):
    if args.rounds > 1:
      print(f"round {round_ + 1} of {args.rounds}", flush=True)
    record("easytunix", run_easytunix(folder, prompt_ids, args.repeats))
    for threads in args.threads:
      torch.set_num_threads(threads)
      record(f"transformers/{threads}t", run_transformers(folder, prompt_ids, tokenizer.pad_id, args.repeats))
    for name, python, script in (
        ("easytunix-vllm", here, _EASYTUNIX_VLLM),
        ("tunix", os.environ.get("EASYTUNIX_TUNIX_PYTHON"), _TUNIX),
        ("vllm", os.environ.get("EASYTUNIX_VLLM_PYTHON") or here, _VLLM),
    ):
      if python:
        record(name, run_peer(python, script, job))

  hf_rows = [r for name, r in results.items() if name.startswith("transformers")]
  same = all(results["easytunix"]["tokens"] == r["tokens"] for r in hf_rows)
  base = dict(batch_s=min(r["batch_s"] for r in hf_rows), one_s=min(r["one_s"] for r in hf_rows))
  header = (f"{'engine':<16} {'16x64 tok/s':>12} {'ratio':>6} {'TTFT 16 ms':>11} "
            f"{'1x64 tok/s':>11} {'ratio':>6} {'TTFT 1 ms':>10}")
  print(header)
  print("-" * len(header))
  for name, r in results.items():
    if "error" in r:
      print(f"{name:<16} {r['error']}")
      continue
    print(
        f"{name:<16} {n / r['batch_s']:>12.1f} {base['batch_s'] / r['batch_s']:>5.2f}x "
        f"{1000 * r['batch_ttft_s']:>11.1f} {NEW_TOKENS / r['one_s']:>11.1f} {base['one_s'] / r['one_s']:>5.2f}x "
        f"{1000 * r['one_ttft_s']:>10.1f}"
    )
  print(f"easytunix first call (compile + run): {results['easytunix']['first_call_s']:.1f} s; "
        f"greedy tokens identical to transformers: {same}")
  ours = results.get("easytunix-vllm", {})
  if "sync_s" in ours:
    print(f"easytunix-vllm (VllmSampler, eager): engine start {ours['startup_s']:.1f} s; weight sync "
          f"(update_params: every parameter, from JAX) {1000 * ours['sync_s']:.0f} ms; greedy tokens identical "
          f"to the JAX Sampler: {ours['tokens'] == results['easytunix']['tokens']}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
