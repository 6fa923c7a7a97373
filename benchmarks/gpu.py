"""GPU speed: LoRA and full fine-tuning steps and greedy decoding at Qwen3-0.6B shapes vs issue #18's H200.

Random weights at Qwen3-0.6B's shapes, bf16. Training rows: ``PeftTrainer``
(the core trainer ``fit`` runs) with AdamW, gradient clipping at 1.0 and
``attention="auto"`` on batches of 8 x 1024 tokens; "lora" adds rank-16
adapters (alpha 32) to every attention and MLP projection, "full" trains every
parameter (bf16 weights; ``--full-precision bf16-mixed`` for float32 master
weights). Each row times ``--steps`` optimizer steps after the first step
(trace + compile + run, reported) and ``--warmup`` more, and blocks on the
result. Decoding: the library's ``Sampler``, greedy, 32 prompts of 128 tokens,
128 new tokens each (no early stop), median of ``--repeats`` runs after a
warm-up, prefill included.

MFU = 6 * N * tokens/s / peak (2 * N for decoding), N the parameters that take
part in the matmuls (every projection, LoRA adapters included, and the output
head; not the embedding lookup), attention's own FLOPs not counted. Peak dense
bf16 FLOP/s comes from a table by device kind (``--peak-tflops`` overrides).
Each row runs in its own process, so its peak memory (the device's
``peak_bytes_in_use``, or the process's peak RSS off GPU) is its own.

    python benchmarks/gpu.py [--require-gpu] [--steps 20] [--warmup 3] [--repeats 5] [--rows lora full decode]
    python benchmarks/gpu.py --tiny        # tiny shapes on CPU, in well under a minute (smoke test)
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import _workers

RANK, ALPHA, LR = 16, 32.0, 1e-5
ROWS = ("lora", "full", "decode")

# Dense bf16 tensor-core peak by device kind (first substring match wins, so specific names go first).
PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    ("GH200", 989.0),
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # SXM
    ("B200", 2250.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
)

# Issue #18: one H200, the same workloads.
REFERENCE = "reference (issue #18, H200)"
REFERENCES: dict[str, list[tuple[str, float]]] = {
    "lora": [("transformers+peft", 33_400), ("Tunix 0.1.7", 66_700), ("plain JAX, cuDNN attention", 86_200)],
    "full": [("transformers", 47_800), ("plain JAX, cuDNN attention", 81_400), ("plain JAX, XLA attention", 39_800)],
    "decode": [("transformers (static cache, compiled)", 6_800), ("Tunix", 13_000)],
}
TARGETS = {"lora": 120_000, "decode": 26_000}
TUNIX_COMPILE_S, TARGET_COMPILE_S = 32.5, 10.0


@dataclasses.dataclass(frozen=True)
class Shapes:
  """The workload: model size, training batch and decoding shape."""

  name: str
  batch: int
  seq: int
  prompts: int
  prompt_len: int
  new_tokens: int

  def config(self):
    from easytunix.models.qwen3.model import ModelConfig

    if self.name == "tiny":
      return ModelConfig.tiny(num_layers=1, dtype="bfloat16", param_dtype="bfloat16")
    return ModelConfig.qwen3_0_6b()  # bf16 weights and compute


FULL_SHAPES = Shapes("Qwen3-0.6B", batch=8, seq=1024, prompts=32, prompt_len=128, new_tokens=128)
TINY_SHAPES = Shapes("tiny", batch=2, seq=64, prompts=4, prompt_len=16, new_tokens=16)


# ----------------------------------------------------------------------------- measurements


def peak_memory() -> tuple[float, str]:
  """(GiB, what it is): the default device's peak allocation, or the process's peak RSS where there is none."""
  import jax

  try:
    stats = jax.devices()[0].memory_stats() or {}
  except Exception:  # noqa: BLE001 - backends without memory stats
    stats = {}
  if "peak_bytes_in_use" in stats:
    return stats["peak_bytes_in_use"] / 2**30, "device peak"
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "process peak RSS"


def matmul_params(model: Any) -> int:
  """Parameters that take part in the matmuls: projections (with adapters) and the output head."""
  from flax import nnx

  from easytunix.layers.linear import Linear

  n = 0
  for _, module in nnx.iter_graph(model):
    if isinstance(module, Linear):
      n += module.in_features * module.out_features
      if module.lora_a is not None:
        n += (module.in_features + module.out_features) * module.lora_a[...].shape[-1]
  config = model.config
  if getattr(model, "lm_head", None) is None:  # tied: the embedding is also the output matmul
    n += config.vocab_size * config.hidden_size
  return n


@contextlib.contextmanager
def record_attention(choices: list[dict[str, Any]]):
  """Records what ``attention="auto"`` resolves to in every attention layer traced inside the block."""
  from easytunix.layers import attention as attention_layer
  from easytunix.layers import blockwise_attention

  original = attention_layer.select_implementation

  def recording(q, k, **kwargs):
    chosen = original(q, k, **kwargs)
    case = {name: value for name, value in kwargs.items() if name != "implementation"}
    is_nvidia = getattr(blockwise_attention, "_is_nvidia_gpu", lambda: False)()
    reason = None
    if chosen != "cudnn":
      reason = blockwise_attention.cudnn_unsupported_reason(q, k, **case) if is_nvidia else "not an NVIDIA GPU"
    choices.append(dict(implementation=chosen, cudnn_not_used_because=reason))
    return chosen

  attention_layer.select_implementation = recording
  try:
    yield choices
  finally:
    attention_layer.select_implementation = original


def random_model(config: Any, lora: bool) -> Any:
  """The library's Qwen3 (with rank-16 adapters when ``lora``), random weights filled from numpy.

  The module is built abstractly (``nnx.eval_shape``) and every variable then gets host-made values:
  normal(0, 0.02) kernels, embeddings and ``lora_a``, zero ``lora_b`` and biases, unit norm scales. That
  is one host-to-device copy per variable and no XLA compile, where the initialisers would compile
  dozens of small programs (most of a tiny run's time on CPU).
  """
  import jax
  import numpy as np
  from flax import nnx

  from easytunix.models.qwen3.model import Qwen3
  from easytunix.sft.lora import apply_lora

  def build():
    model = Qwen3(config, rngs=nnx.Rngs(0))
    return apply_lora(model, RANK, ALPHA) if lora else model

  model = nnx.eval_shape(build)
  rng = np.random.default_rng(0)
  for path, var in nnx.iter_graph(model):
    if not isinstance(var, nnx.Variable) or not isinstance(var.get_value(), jax.ShapeDtypeStruct):
      continue
    value, name = var.get_value(), str(path[-1])
    if name == "scale":
      host = np.ones(value.shape, np.float32)
    elif name in ("lora_b", "bias"):
      host = np.zeros(value.shape, np.float32)
    else:
      host = rng.standard_normal(value.shape, dtype=np.float32) * np.float32(0.02)
    var.set_value(jax.device_put(host.astype(value.dtype)))
  return model


def adamw():
  """AdamW with a loggable learning rate, as ``compile`` builds it, but with float32 hyperparameters.

  ``optax.inject_hyperparams`` otherwise stores them in the parameters' dtype: in bf16, b2 = 0.999
  rounds to 1.0, Adam's bias correction 1 - b2**t is 0 and full fine-tuning of bf16 weights gives NaN
  from the second step.
  """
  import jax.numpy as jnp
  import optax

  return optax.inject_hyperparams(optax.adamw, hyperparam_dtype=jnp.float32)(learning_rate=LR)


def train_row(mode: str, shapes: Shapes, steps: int, warmup: int, precision: str) -> dict[str, Any]:
  """Times PeftTrainer steps: the first (trace + compile + run), then ``steps`` after ``warmup``."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  from easytunix.layers.attention import set_attention_implementation
  from easytunix.sft.peft_trainer import PeftTrainer, TrainingConfig, TrainingInput

  config = shapes.config()
  mixed = mode == "full" and precision == "bf16-mixed"
  if mixed:
    config = config.replace(dtype=jnp.float32, param_dtype=jnp.float32)
  model = random_model(config, lora=mode == "lora")
  set_attention_implementation(model, "auto")  # what compile(attention="auto") sets
  if mixed:
    model.set_compute_dtype(jnp.bfloat16)
  tokens = np.random.default_rng(0).integers(1, config.vocab_size, (shapes.batch, shapes.seq), dtype=np.int32)
  data = [TrainingInput(input_tokens=tokens, input_mask=np.ones_like(tokens, dtype=bool))]
  trainer = PeftTrainer(model, adamw(), TrainingConfig(max_steps=1, max_grad_norm=1.0, show_progress_bar=False))

  def run(n: int) -> float:
    trainer.config = dataclasses.replace(trainer.config, max_steps=trainer.train_steps() + n)
    start = time.perf_counter()
    trainer.train(data)
    jax.block_until_ready(trainer.opt_state)
    return time.perf_counter() - start

  choices: list[dict[str, Any]] = []
  with record_attention(choices):
    first = run(1)
  if warmup:
    run(warmup)
  elapsed = run(steps)
  memory, memory_kind = peak_memory()
  tokens_per_s = steps * shapes.batch * shapes.seq / elapsed
  return dict(tokens_per_s=tokens_per_s, step_s=elapsed / steps, first_s=first, flop_params=matmul_params(model),
              flops_per_token=6, memory_gib=memory, memory_kind=memory_kind, attention=choices[:1],
              final_loss=float(trainer.last_metrics.get("loss", float("nan"))))


def decode_row(shapes: Shapes, repeats: int) -> dict[str, Any]:
  """Times greedy generation with the Sampler: first call, then the median of ``repeats`` after a warm-up."""
  import jax
  import numpy as np

  from easytunix.generate import CacheConfig, Sampler

  config = shapes.config()
  model = random_model(config, lora=False)
  cache = CacheConfig.for_model(model, cache_size=shapes.prompt_len + shapes.new_tokens, max_batch_size=shapes.prompts)
  sampler = Sampler(model, None, cache)
  prompts = np.random.default_rng(0).integers(1, config.vocab_size, (shapes.prompts, shapes.prompt_len)).tolist()

  def generate() -> float:
    start = time.perf_counter()
    out = sampler(prompts, shapes.new_tokens, eos_tokens=[])
    jax.block_until_ready(out.tokens)
    elapsed = time.perf_counter() - start
    if any(len(t) != shapes.new_tokens for t in out.tokens):
      raise RuntimeError(f"expected {shapes.new_tokens} new tokens per prompt, got {[len(t) for t in out.tokens]}")
    return elapsed

  first = generate()
  generate()  # warm-up
  elapsed = statistics.median(generate() for _ in range(repeats))
  memory, memory_kind = peak_memory()
  return dict(tokens_per_s=shapes.prompts * shapes.new_tokens / elapsed, call_s=elapsed, first_s=first,
              flop_params=matmul_params(model), flops_per_token=2, memory_gib=memory, memory_kind=memory_kind)


def run_row(row: str, args: argparse.Namespace) -> dict[str, Any]:
  shapes = TINY_SHAPES if args.tiny else FULL_SHAPES
  if row == "decode":
    return decode_row(shapes, args.repeats)
  return train_row(row, shapes, args.steps, args.warmup, args.full_precision)


# ----------------------------------------------------------------------------- report


def peak_flops(kind: str, override: float | None) -> float | None:
  if override:
    return override * 1e12
  for name, tflops in PEAK_TFLOPS:
    if name.lower() in kind.lower():
      return tflops * 1e12
  return None


def _k(x: float) -> str:
  return f"{x / 1000:.1f}k tok/s" if x >= 1000 else f"{x:.1f} tok/s"


def report(results: dict[str, dict[str, Any]], device: str, peak: float | None, tiny: bool, args) -> list[str]:
  """The markdown table: our rows, issue #18's references and the targets, with our figure divided by each."""
  titles = {"lora": f"LoRA r{RANK} train", "full": f"full FT train ({args.full_precision})", "decode": "greedy decode"}
  lines = ["| workload | system | figure | ours / this | MFU | first step or call (s) | peak memory |",
           "|---|---|---|---|---|---|---|"]

  def ratio(ours: float, theirs: float) -> str:
    return "-" if tiny else f"{ours / theirs:.2f}x"

  for row in ROWS:
    r = results.get(row)
    if r is None:
      continue
    if "error" in r:
      lines.append(f"| {titles[row]} | easytunix (this run) | failed: {' '.join(r['error'])[:140]} | | | | |")
      continue
    ours = r["tokens_per_s"]
    mfu = "n/a" if peak is None else f"{100 * r['flops_per_token'] * r['flop_params'] * ours / peak:.1f}%"
    lines.append(f"| {titles[row]} | easytunix (this run, {device}) | {_k(ours)} | 1.00x | {mfu} | "
                 f"{r['first_s']:.1f} | {r['memory_gib']:.2f} GiB ({r['memory_kind']}) |")
    for name, value in REFERENCES[row]:
      lines.append(f"| {titles[row]} | {REFERENCE}: {name} | {_k(value)} | {ratio(ours, value)} | | | |")
    if row in TARGETS:
      met = "" if tiny else (" (met)" if ours >= TARGETS[row] else " (not met)")
      lines.append(f"| {titles[row]} | target | >= {_k(TARGETS[row])} | {ratio(ours, TARGETS[row])}{met} | | | |")
  firsts = [(row, results[row]["first_s"]) for row in ("lora", "full") if "first_s" in results.get(row, {})]
  for row, first in firsts:
    lines.append(f"| first train step, {row} (trace + compile + run) | easytunix (this run) | {first:.1f} s | 1.00x "
                 "(lower is better) | | | |")
  if firsts:
    first = firsts[0][1]
    met = "" if tiny else (" (met)" if first <= TARGET_COMPILE_S else " (not met)")
    lines.append(f"| first train step | {REFERENCE}: Tunix 0.1.7 compile | {TUNIX_COMPILE_S:.1f} s | "
                 f"{ratio(first, TUNIX_COMPILE_S)} | | | |")
    lines.append(f"| first train step | target | <= {TARGET_COMPILE_S:.0f} s | {ratio(first, TARGET_COMPILE_S)}{met} | "
                 "| | |")
  return lines


def _check_platform(require_gpu: bool) -> tuple[Any, str] | int:
  """The default device and its description, or an exit code when ``--require-gpu`` finds no GPU."""
  if require_gpu:
    os.environ.setdefault("JAX_PLATFORMS", "cuda")  # no silent fall back to CPU
  import jax

  try:
    device = jax.devices()[0]
  except Exception as err:  # noqa: BLE001 - jax raises RuntimeError or AssertionError when no backend starts
    wanted = f"JAX_PLATFORMS={os.environ.get('JAX_PLATFORMS')!r}" if os.environ.get("JAX_PLATFORMS") else "JAX"
    why = str(err) or "JAX could not start it; is the CUDA plugin installed?"
    print(f"ERROR: {'--require-gpu: ' if require_gpu else ''}no usable backend for {wanted} "
          f"({type(err).__name__}: {why}). On an NVIDIA machine: pip install 'jax[cuda12]'.", file=sys.stderr)
    return 2
  if require_gpu and device.platform != "gpu":
    print(f"ERROR: --require-gpu: no GPU found; JAX runs on {device.platform!r} ({device.device_kind}). "
          "Install jax[cuda12] on a machine with an NVIDIA GPU, or drop --require-gpu.", file=sys.stderr)
    return 2
  return device, f"{device.device_kind} ({device.platform})"


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, help="timed optimizer steps (default 20; 3 with --tiny)")
  parser.add_argument("--warmup", type=int, help="untimed steps after the first (default 3; 1 with --tiny)")
  parser.add_argument("--repeats", type=int, help="timed decoding runs (default 5; 2 with --tiny)")
  parser.add_argument("--rows", nargs="+", choices=ROWS, default=list(ROWS))
  parser.add_argument("--full-precision", choices=("bf16", "bf16-mixed"), default="bf16",
                      help="full FT weights: bf16, or float32 master weights with bf16 compute")
  parser.add_argument("--peak-tflops", type=float, help="peak dense bf16 TFLOP/s of the device (else from a table)")
  parser.add_argument("--require-gpu", action="store_true", help="exit with an error unless JAX runs on a GPU")
  parser.add_argument("--tiny", action="store_true", help="tiny shapes, in-process: a smoke test that runs on CPU")
  parser.add_argument("--in-process", action="store_true", help="run every row in this process (peaks accumulate)")
  parser.add_argument("--worker", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  args.steps = args.steps or (2 if args.tiny else 20)
  args.warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 3)
  args.repeats = args.repeats or (1 if args.tiny else 5)
  if args.tiny and "jax" not in sys.modules:
    # Faster CPU code generation for the smoke test (XLA's HLO passes, hence the programs, are the same).
    flags = os.environ.get("XLA_FLAGS", "")
    for flag in ("--xla_backend_optimization_level=0", "--xla_llvm_disable_expensive_passes=true"):
      if flag.split("=")[0] not in flags:
        flags = f"{flags} {flag}".strip()
    os.environ["XLA_FLAGS"] = flags

  checked = _check_platform(args.require_gpu)
  if isinstance(checked, int):
    return checked
  device, device_text = checked
  if args.worker:
    print("RESULT " + json.dumps(run_row(args.worker, args)))
    return 0

  import jax

  shapes = TINY_SHAPES if args.tiny else FULL_SHAPES
  if device.platform != "gpu" and not args.tiny:
    print(f"WARNING: no GPU ({device_text}): {shapes.name} shapes on this backend will take very long; "
          "--tiny runs tiny shapes.", file=sys.stderr)
  in_process = args.in_process or args.tiny
  results: dict[str, dict[str, Any]] = {}
  passthrough = ["--steps", str(args.steps), "--warmup", str(args.warmup), "--repeats", str(args.repeats),
                 "--full-precision", args.full_precision] + (["--tiny"] if args.tiny else []) + (
                     ["--require-gpu"] if args.require_gpu else [])
  for row in args.rows:
    if in_process:
      results[row] = run_row(row, args)
    else:
      results[row] = _workers.run_worker(Path(__file__).resolve(), passthrough + ["--worker", row])
    r = results[row]
    if "error" not in r:
      print(f"  {row}: {_k(r['tokens_per_s'])}, first {r['first_s']:.1f} s", file=sys.stderr, flush=True)

  peak = None if device.platform != "gpu" else peak_flops(device.device_kind, args.peak_tflops)
  n_params = next((r["flop_params"] for r in results.values() if "flop_params" in r), None)
  print(f"\n{shapes.name} shapes, random weights, bf16; jax {jax.__version__} on {device_text}; "
        f"train: batch {shapes.batch} x {shapes.seq} tokens, AdamW, attention='auto', mean over {args.steps} "
        f"timed steps after the first and {args.warmup} warm-up; decode: {shapes.prompts} prompts x "
        f"({shapes.prompt_len} prompt + {shapes.new_tokens} new) tokens, greedy, median of {args.repeats} runs, "
        "new tokens / wall time.")
  print(f"MFU: 6 * N * tok/s (2 * N for decode) / peak, N = {n_params / 1e6 if n_params else float('nan'):.0f}M "
        f"matmul parameters; peak {'n/a' if peak is None else f'{peak / 1e12:.0f} TFLOP/s (dense bf16)'}"
        f"{'' if peak or device.platform != 'gpu' else ' (unknown device kind: pass --peak-tflops)'}.")
  print("LoRA's frozen weights get no weight gradients, so its real matmul work is nearer 4 * N per token: "
        "by the 6 * N convention its MFU reads about 1.5x the hardware's actual use.")
  if args.tiny:
    print("TINY SHAPES: a smoke test of this script; the ratios to the H200 references are not meaningful.")
  for row in ("lora", "full"):
    attention = (results.get(row) or {}).get("attention") or []
    if attention:
      a = attention[0]
      why = f" (cuDNN not used: {a['cudnn_not_used_because']})" if a["cudnn_not_used_because"] else ""
      print(f"attention='auto' in the {row} step: {a['implementation']}{why}")
    loss = (results.get(row) or {}).get("final_loss")
    if loss is not None and not loss == loss:
      print(f"WARNING: the {row} run's loss is NaN: its speed is that of a diverged run.")
  print()
  print("\n".join(report(results, device.device_kind, peak, args.tiny, args)))
  failed = [row for row, r in results.items() if "error" in r]
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
