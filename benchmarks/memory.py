"""Memory plan: per-device bytes of the compiled train step for real model sizes.

For each model (real hyperparameters; abstract weights from ``nnx.eval_shape``,
so nothing is allocated or downloaded), sequence length (one sequence per
device), mode and device count, the library's own train step (``PeftTrainer``'s
jitted step, AdamW, block remat, ``attention="auto"``, no gradient clipping (see ``CLIP_NOTE``),
which picks blockwise attention beyond 1024 keys) is lowered on
ShapeDtypeStruct inputs, compiled for CPU devices, and its
``memory_analysis()`` is read: arguments + outputs not aliased to donated
arguments + temporaries, per device. Modes:

* ``lora``: bf16 base weights (frozen), rank-16 float32 adapters on every attention and MLP projection.
* ``qlora``: the same on an NF4 base (``easytunix.sft.lora.quantize_base(model, method="nf4", block_size=64)``).
* ``full``: every parameter trains; float32 master weights, bf16 compute (``compile(precision="bf16-mixed")``).

Devices: 1, or 8 with FSDP (``--xla_force_host_platform_device_count=8`` CPU
devices; mesh ``("fsdp", "tp") = (8, 1)``, Auto axes, the library's default
ShardingConfig; the batch of 8 is split over ``fsdp``).

Compiling a 36-layer train step takes minutes on a small CPU, so by default each
cell compiles 1-, 2- and 3-layer copies of the model (a 4-layer one too when the
per-layer steps disagree) and extrapolates linearly in the layer count (the
decoder layers are identical, so each adds the same bytes); one full-depth
compile checks the extrapolation (``--full-depth`` compiles every cell at full
depth instead). A simple analytic estimate (weights + gradients +
optimizer state, from the abstract state's shapes and shardings) is printed
beside the compiled figure.

    python benchmarks/memory.py [--models qwen3-0.6b ...] [--seq 2048 8192 32768]
        [--modes lora qlora full] [--devices 1 8] [--full-depth] [--tiny]

XLA:CPU is a stand-in for the GPU compiler here; see ``CPU_FLAGS`` for what is
adjusted so that the figures track a GPU compile, and the printed caveats.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

# XLA:CPU's own pipeline removes the optimization barriers that jax.checkpoint
# (block remat) relies on before common-subexpression elimination runs, so CSE
# merges every recomputed block back into the forward pass and remat saves nothing
# (XLA:GPU keeps the barriers until after scheduling). Without CSE and with the
# memory-optimised CPU scheduler the compiled figures show remat's effect as a
# GPU compile has it. The last two flags only shorten LLVM code generation (the
# buffer assignment, hence the figures, are the same).
CPU_FLAGS = (
    "--xla_disable_hlo_passes=cse",
    "--xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED",
    "--xla_cpu_enable_concurrency_optimized_scheduler=false",  # easytunix.models.base.CPU_REMAT_FLAG
    "--xla_backend_optimization_level=0",
    "--xla_llvm_disable_expensive_passes=true",
)

RANK, ALPHA, LR = 16, 32.0, 1e-4
# The grid compiles without gradient clipping (``--clip 1.0`` adds it, as ``compile`` does by default). On
# XLA:CPU an update that waits on the global gradient norm used to make the scheduler keep every block's
# activations (Qwen3-0.6B LoRA, 6 layers, 8192 tokens: 4.07 vs 2.15 GiB of temporaries); the trainer now
# computes the gradients in a branch scheduled apart (easytunix.sft.peft_trainer._scheduled_apart), and the
# figures are the same with and without clipping (Qwen3-0.6B LoRA, 8192 tokens, 1 device: 3.71 GiB both).
CLIP: list[float | None] = [None]  # the max_grad_norm of the compiled steps (--clip)
CLIP_NOTE = ("No gradient clipping in these compiles (--clip 1.0 adds it): the figures are the same with it "
             "(Qwen3-0.6B LoRA, 8192 tokens, 1 device: 3.71 GiB both), the trainer scheduling the backward pass "
             "apart from the clipping's global norm.")
GIB = 2**30
BUDGETS_GB = (24, 40, 80)


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """A named real model size: its family class and config constructor."""

  label: str
  family: str
  config: Callable[..., Any]


def _models() -> dict[str, ModelSpec]:
  from easytunix.models.gemma3.model import Gemma3Config
  from easytunix.models.llama3.model import ModelConfig as Llama3Config
  from easytunix.models.qwen3.model import ModelConfig as Qwen3Config

  return {
      "llama3.2-1b": ModelSpec("Llama-3.2-1B", "llama3", Llama3Config.llama3_2_1b),
      "qwen3-0.6b": ModelSpec("Qwen3-0.6B", "qwen3", Qwen3Config.qwen3_0_6b),
      "qwen3-1.7b": ModelSpec("Qwen3-1.7B", "qwen3", Qwen3Config.qwen3_1_7b),
      "qwen3-8b": ModelSpec("Qwen3-8B", "qwen3", Qwen3Config.qwen3_8b),
      "gemma3-1b": ModelSpec("Gemma-3-1B", "gemma3", Gemma3Config.gemma3_1b),
      "gemma3-4b": ModelSpec("Gemma-3-4B", "gemma3", Gemma3Config.gemma3_4b),
      # --tiny: a 3-layer Qwen3 of the test suite's sizes.
      "tiny": ModelSpec("Qwen3-tiny", "qwen3", lambda: Qwen3Config.tiny(num_layers=3)),
  }


def _model_class(family: str):
  from easytunix.models.gemma3.model import Gemma3
  from easytunix.models.llama3.model import Llama3
  from easytunix.models.qwen3.model import Qwen3

  return {"llama3": Llama3, "qwen3": Qwen3, "gemma3": Gemma3}[family]


def with_depth(config: Any, depth: int) -> Any:
  """The config with only its first ``depth`` decoder layers (sliding/global pattern cut to match)."""
  types = None if config.layer_types is None else tuple(config.layer_types[:depth])
  moe = None if config.moe_layers is None else tuple(config.moe_layers[:depth])
  return config.replace(num_layers=depth, layer_types=types, moe_layers=moe)


def quantize_base_fn() -> Callable[..., Any] | None:
  """``easytunix.sft.lora.quantize_base`` when the library has it (QLoRA), else None."""
  try:
    from easytunix.sft import lora
  except ImportError:
    return None
  return getattr(lora, "quantize_base", None)


# ----------------------------------------------------------------------------- abstract model and step


def _bits(dtype: Any) -> int:
  import jax.numpy as jnp

  dtype = jnp.dtype(dtype)
  for info in (jnp.finfo, jnp.iinfo):
    try:
      return int(info(dtype).bits)
    except (TypeError, ValueError):
      continue
  return 8 * dtype.itemsize


def device_bytes(x: Any) -> int:
  """Bytes of one device's shard of an abstract array (4-bit dtypes count half a byte)."""
  shape = x.shape
  sharding = getattr(x, "sharding", None)
  if sharding is not None:
    shape = sharding.shard_shape(shape)
  return math.ceil(math.prod(shape) * _bits(x.dtype) / 8)


def make_mesh(devices: int):
  """None for one device; an ("fsdp", "tp") = (devices, 1) mesh with Auto axes otherwise."""
  import jax

  if devices == 1:
    return None
  auto = jax.sharding.AxisType.Auto
  return jax.make_mesh((devices, 1), ("fsdp", "tp"), axis_types=(auto, auto), devices=jax.devices()[:devices])


def place_abstract(model: Any, mesh: Any) -> list[str]:
  """Gives every abstract variable the sharding its partition metadata asks for on ``mesh``.

  Returns the paths that could not be sharded that way (they stay replicated).
  """
  import jax
  from flax import nnx

  from easytunix.layers import sharding as sharding_lib

  unsharded = []
  if mesh is None:
    return unsharded
  for path, var in nnx.iter_graph(model):
    if not isinstance(var, nnx.Variable):
      continue
    value = var.get_value()
    if not isinstance(value, jax.ShapeDtypeStruct):
      continue
    name = sharding_lib.path_str(path)
    meta = var.get_metadata()
    axes = meta.get("partition")
    if meta.get("replicate_indivisible") and hasattr(sharding_lib, "divisible_axes"):
      # Quantized codes and scales: replicated along mesh axes that do not divide them, as shard_model does.
      axes = sharding_lib.divisible_axes(tuple(value.shape), axes, mesh)
    try:
      sharding = sharding_lib.variable_sharding(name, value.shape, axes, mesh)
    except ValueError:
      unsharded.append(name)
      sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    var.set_value(jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=sharding))
  return unsharded


def abstract_model(spec: ModelSpec, mode: str, depth: int | None, mesh: Any) -> tuple[Any, list[str]]:
  """The model of ``spec`` as ShapeDtypeStructs, set up for ``mode`` as ``compile`` would set it up."""
  import jax.numpy as jnp
  from flax import nnx

  from easytunix.layers.attention import set_attention_implementation
  from easytunix.sft.lora import apply_lora

  config = spec.config()
  if depth is not None:
    config = with_depth(config, depth)
  if mode == "full":  # bf16-mixed: float32 master weights, bf16 compute
    config = config.replace(dtype=jnp.float32, param_dtype=jnp.float32)
  quantize = quantize_base_fn() if mode == "qlora" else None
  if mode == "qlora" and quantize is None:
    raise RuntimeError("quantize_base missing")
  cls = _model_class(spec.family)

  def build():
    model = cls(config, rngs=nnx.Rngs(0))
    if quantize is not None:
      quantize(model, method="nf4", block_size=64)
    if mode in ("lora", "qlora"):
      apply_lora(model, RANK, ALPHA)
    return model

  model = nnx.eval_shape(build)
  set_attention_implementation(model, "auto")
  model.set_remat("block")
  if mode == "full":
    model.set_compute_dtype(jnp.bfloat16)
  return model, place_abstract(model, mesh)


def _abstract_trainer_class():
  import jax
  import optax
  from jax.sharding import NamedSharding, PartitionSpec

  from easytunix.sft.peft_trainer import PeftTrainer

  class AbstractTrainer(PeftTrainer):
    """A PeftTrainer whose optimizer state is abstract, sharded as ``PeftTrainer`` shards it."""

    def _init_opt_state(self, trainable: Any) -> Any:
      abstract = jax.eval_shape(self.optimizer.init, trainable)
      mesh = self._mesh()
      if mesh is None:
        return abstract
      param_shardings = jax.tree.map(lambda x: x.sharding, trainable)
      shardings = optax.tree_map_params(
          self.optimizer, lambda _, sharding: sharding, abstract, param_shardings,
          transform_non_params=lambda _: NamedSharding(mesh, PartitionSpec()),
      )
      return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)

  return AbstractTrainer


def optimizer():
  """AdamW with an injected learning rate, as ``compile(optimizer="adamw")`` builds it."""
  import optax

  return optax.inject_hyperparams(optax.adamw)(learning_rate=LR)


def state_bytes(model: Any, trainer: Any) -> dict[str, int]:
  """The analytic estimate, per device: all weights, gradients (as the trainable weights), optimizer state."""
  import jax
  from flax import nnx

  from easytunix.sft.lora import trainable_filter

  _, trainable, rest = nnx.split(model, trainable_filter(model), ...)
  trainable = sum(device_bytes(x) for x in jax.tree.leaves(nnx.as_pure(trainable)))
  frozen = sum(device_bytes(x) for x in jax.tree.leaves(nnx.as_pure(rest)))
  opt = sum(device_bytes(x) for x in jax.tree.leaves(trainer.opt_state) if hasattr(x, "shape"))
  return dict(weights=trainable + frozen, grads=trainable, opt=opt)


def compile_step(spec: ModelSpec, mode: str, seq: int, devices: int, depth: int | None,
                 analytic: bool = False) -> dict[str, Any]:
  """Lowers and compiles the train step of one cell; returns its per-device memory figures (bytes)."""
  import jax
  import jax.numpy as jnp
  from flax import nnx
  from jax.sharding import NamedSharding, PartitionSpec

  from easytunix.sft.lora import trainable_filter
  from easytunix.sft.peft_trainer import TrainingConfig, TrainingInput

  mesh = make_mesh(devices)
  model, unsharded = abstract_model(spec, mode, depth, mesh)
  trainer = _abstract_trainer_class()(model, optimizer(), TrainingConfig(max_grad_norm=CLIP[0], show_progress_bar=False))
  out: dict[str, Any] = dict(unsharded=len(unsharded))
  if analytic:
    out.update(state_bytes(model, trainer))
    return out
  step, _ = trainer.jit_train_and_eval_step()
  _, trainable, frozen = nnx.split(model, trainable_filter(model), ...)
  batch_sharding = None if mesh is None else NamedSharding(mesh, PartitionSpec("fsdp", None))
  tokens = jax.ShapeDtypeStruct((devices, seq), jnp.int32, sharding=batch_sharding)
  mask = jax.ShapeDtypeStruct((devices, seq), jnp.bool_, sharding=batch_sharding)
  start = time.perf_counter()
  compiled = step.lower(nnx.as_pure(trainable), trainer.opt_state, nnx.as_pure(frozen),
                        TrainingInput(input_tokens=tokens, input_mask=mask)).compile()
  out["compile_s"] = time.perf_counter() - start
  stats = compiled.memory_analysis()
  out.update(args=stats.argument_size_in_bytes, out=stats.output_size_in_bytes,
             alias=stats.alias_size_in_bytes, temp=stats.temp_size_in_bytes)
  out["total"] = out["args"] + out["out"] - out["alias"] + out["temp"]
  return out


_FIELDS = ("args", "out", "alias", "temp", "total")


def extrapolate(points: dict[int, dict[str, Any]], layers: int) -> dict[str, Any]:
  """Each figure at ``layers`` from reduced-depth compiles: the median per-layer step, from the deepest one.

  XLA's scheduler sometimes changes its plan between two depths (a one-off jump in the temporaries);
  the median of three steps ignores one such jump, and anchoring at the deepest compile keeps a jump
  below it.
  """
  depths = sorted(points)
  deepest = depths[-1]
  out = {}
  for key in _FIELDS:
    steps = [points[b][key] - points[a][key] for a, b in zip(depths, depths[1:])]
    per_layer = statistics.median(steps)
    out[key] = points[deepest][key] + per_layer * (layers - deepest)
    out[key + "_per_layer"] = per_layer
  return out


def steps_agree(points: dict[int, dict[str, Any]]) -> bool:
  """Whether the per-layer steps of the total agree (within 10%, or 32 MiB)."""
  depths = sorted(points)
  steps = [points[b]["total"] - points[a]["total"] for a, b in zip(depths, depths[1:])]
  return max(steps) - min(steps) <= max(0.1 * max(abs(x) for x in steps), 32 * 2**20)


# ----------------------------------------------------------------------------- the grid


UNIT = ["GiB", GIB]  # --tiny reports MiB


def gib(n: float) -> str:
  """Bytes in the report's unit (GiB, or MiB with --tiny)."""
  return f"{n / UNIT[1]:.2f}"


def count_params(spec: ModelSpec) -> int:
  import jax
  from flax import nnx

  config = spec.config()
  model = nnx.eval_shape(lambda: _model_class(spec.family)(config, rngs=nnx.Rngs(0)))
  return sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.as_pure(nnx.state(model, nnx.Param))))


def run_cell(spec: ModelSpec, mode: str, seq: int, devices: int, depths: tuple[int, ...] | None,
             log: Callable[[str], None]) -> dict[str, Any]:
  """Compiled (or extrapolated) and analytic figures of one cell; ``{"error": ...}`` when it cannot be built."""
  if mode == "qlora" and quantize_base_fn() is None:
    return {"error": "n/a (quantize_base missing)"}
  layers = spec.config().num_layers
  try:
    result = compile_step(spec, mode, seq, devices, None, analytic=True)
    if depths is None or max(depths) >= layers:
      full = compile_step(spec, mode, seq, devices, None)
      result.update({k: full[k] for k in _FIELDS}, compile_s=full["compile_s"], depths=f"{layers} (full)")
    else:
      points = {d: compile_step(spec, mode, seq, devices, d) for d in depths}
      jump = len(points) > 2 and not steps_agree(points)
      if jump and max(points) + 1 < layers:  # a third step decides which of the two is the odd one
        points[max(points) + 1] = compile_step(spec, mode, seq, devices, max(points) + 1)
      result.update(extrapolate(points, layers))
      listed = ",".join(str(d) for d in sorted(points))
      result.update(compile_s=sum(p["compile_s"] for p in points.values()),
                    depths=f"{listed} -> {layers}" + (" (jump)" if jump else ""))
  except Exception as err:  # noqa: BLE001 - one failing cell must not end the plan
    message = f"{type(err).__name__}: {err}".splitlines()[0][:160]
    if mode == "qlora":
      message = f"n/a (QLoRA failed: {message})"
    return {"error": message}
  log(f"  {spec.label} {mode} {seq} tokens x{devices}: {gib(result['total'])} {UNIT[0]} "
      f"(compile {result['compile_s']:.1f}s)")
  return result


def fits_table(rows: list[dict[str, Any]], params: dict[str, int]) -> list[str]:
  """Markdown lines: per mode, length and device count, the largest model within each budget."""
  largest_tried = max(params.values())
  lines = ["| mode | tokens | devices | " + " | ".join(f"{b} GB" for b in BUDGETS_GB) + " |",
           "|" + "---|" * (3 + len(BUDGETS_GB))]
  keys = sorted({(r["mode"], r["seq"], r["devices"]) for r in rows}, key=lambda k: (MODES.index(k[0]), k[1], k[2]))
  for mode, seq, devices in keys:
    cells = [r for r in rows if (r["mode"], r["seq"], r["devices"]) == (mode, seq, devices)]
    if all("error" in r for r in cells):
      reason = cells[0]["error"]
      lines.append(f"| {mode} | {seq} | {devices} | " + " | ".join(reason for _ in BUDGETS_GB) + " |")
      continue
    out = []
    for budget in BUDGETS_GB:
      ok = [r for r in cells if "error" not in r and r["total"] <= budget * GIB]
      if not ok:
        out.append("none")
        continue
      best = max(ok, key=lambda r: params[r["model"]])
      out.append(best["label"] + ("*" if params[best["model"]] == largest_tried else ""))
    lines.append(f"| {mode} | {seq} | {devices} | " + " | ".join(out) + " |")
  return lines


def _cell_key(model: str, mode: str, seq: int, devices: int, setting: str) -> str:
  return f"{model}|{mode}|{seq}|{devices}|{setting}"


def load_results(path: str | None) -> dict[str, Any]:
  """Cells saved by an earlier (interrupted) run with the same settings, by key."""
  if not path or not os.path.exists(path):
    return {}
  with open(path) as f:
    return json.load(f)


def save_results(path: str | None, results: dict[str, Any]) -> None:
  """Writes the finished cells (atomically: a killed run leaves the previous file)."""
  if not path:
    return
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(results, f)
  os.replace(tmp, path)


MODES = ("lora", "qlora", "full")
DEFAULT_MODELS = ("llama3.2-1b", "qwen3-0.6b", "qwen3-1.7b", "qwen3-8b", "gemma3-1b", "gemma3-4b")


def _set_xla_flags(devices: int, plain: bool) -> bool:
  """Adds the device count (and CPU_FLAGS) to XLA_FLAGS; False when jax was imported before (too late)."""
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  flags = os.environ.get("XLA_FLAGS", "")
  wanted = [f"--xla_force_host_platform_device_count={devices}"] + ([] if plain else list(CPU_FLAGS))
  for flag in wanted:
    name = flag.split("=")[0]
    if name not in flags:
      flags = (flags + " " + flag).strip()
  os.environ["XLA_FLAGS"] = flags
  return "jax" not in sys.modules


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS), help=f"from {list(DEFAULT_MODELS)}")
  parser.add_argument("--seq", nargs="+", type=int, default=[2048, 8192, 32768], help="tokens per sequence")
  parser.add_argument("--modes", nargs="+", choices=MODES, help=f"default: all of {list(MODES)}")
  parser.add_argument("--devices", nargs="+", type=int, help="1 and/or an FSDP device count (default: 1 8)")
  parser.add_argument("--full-depth", action="store_true", help="compile every cell at full depth (slow)")
  parser.add_argument("--depths", nargs="+", type=int, default=[1, 2, 3],
                      help="consecutive reduced depths to extrapolate from (one more when their steps disagree)")
  parser.add_argument("--no-verify", action="store_true", help="skip the full-depth check of the extrapolation")
  parser.add_argument("--plain-xla", action="store_true", help="compile without CPU_FLAGS (XLA:CPU as it is)")
  parser.add_argument("--clip", type=float, help="clip gradients to this global norm in the compiled steps")
  parser.add_argument("--results", help="keep finished cells in this JSON file; a rerun skips them (resume)")
  parser.add_argument("--tiny", action="store_true",
                      help="one small cell (3-layer Qwen3, 256 tokens, LoRA, 1 device unless --modes/--devices)")
  args = parser.parse_args(argv)
  CLIP[0] = args.clip
  if args.tiny:
    args.models, args.seq, args.depths = ["tiny"], [256], [1, 2]  # one step: no disagreement check
    UNIT[:] = ["MiB", 2**20]
  args.modes = args.modes or (["lora"] if args.tiny else list(MODES))
  args.devices = args.devices or ([1] if args.tiny else [1, 8])
  fresh = _set_xla_flags(max(args.devices), args.plain_xla)

  import jax

  specs = _models()
  unknown = [m for m in args.models if m not in specs]
  if unknown:
    parser.error(f"unknown models {unknown}; choose from {sorted(specs)}")
  available = len(jax.devices())
  skipped = [d for d in args.devices if d > available]
  devices = [d for d in args.devices if d <= available]
  depths = None if args.full_depth else tuple(args.depths)
  log = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731 - progress on stderr

  start = time.perf_counter()
  params = {m: count_params(specs[m]) for m in args.models}
  setting = f"{'full' if depths is None else ','.join(map(str, depths))}|{'plain' if args.plain_xla else 'flags'}" \
            f"|jax {jax.__version__}" + (f"|clip {args.clip}" if args.clip else "|no clip")
  saved = load_results(args.results)
  rows, reused = [], 0
  for model in args.models:
    for mode in args.modes:
      for seq in args.seq:
        for n in devices:
          key = _cell_key(model, mode, seq, n, setting)
          if key in saved:
            result, reused = saved[key], reused + 1
          else:
            result = run_cell(specs[model], mode, seq, n, depths, log)
            if "error" not in result:
              saved[key] = result
              save_results(args.results, saved)
          rows.append(dict(model=model, label=specs[model].label, mode=mode, seq=seq, devices=n, **result))
  grid_s = time.perf_counter() - start

  check = None
  if depths is not None and not args.no_verify:
    candidates = [r for r in rows if "error" not in r and "->" in r["depths"]]
    if candidates:  # the hardest cell to extrapolate: most layers, longest sequence, one device, full FT first
      row = max(candidates, key=lambda r: (specs[r["model"]].config().num_layers, r["seq"], -r["devices"],
                                           r["mode"] == "full"))
      key = _cell_key(row["model"], row["mode"], row["seq"], row["devices"], setting + "|check")
      full = saved.get(key) or compile_step(specs[row["model"]], row["mode"], row["seq"], row["devices"], None)
      saved[key] = full
      save_results(args.results, saved)
      check = (row, full)

  print(f"\nMemory plan: the compiled train step's memory_analysis() per device, XLA:CPU "
        f"(jax {jax.__version__}{', plain XLA flags' if args.plain_xla else ', CPU_FLAGS: remat kept'}). "
        f"AdamW, block remat, attention='auto' (blockwise beyond 1024 keys); "
        f"LoRA/QLoRA rank {RANK} on q,k,v,o,gate,up,down with bf16 compute; full = bf16-mixed "
        "(float32 master weights, gradients and AdamW state, bf16 matmuls). One sequence per device "
        f"(the 8-device rows are FSDP over a batch of 8). Figures in {UNIT[0]} "
        f"(2^{20 if UNIT[0] == 'MiB' else 30} bytes).")
  if depths is not None:
    print(f"Reduced-depth compiles ({', '.join(map(str, depths))} decoder layers) extrapolated linearly to the "
          "full layer count: the decoder layers of these models are identical stacks, so each adds the same "
          "bytes (the median per-layer step, from the deepest compile; '(jump)': XLA's scheduler changed its "
          "plan between two depths, so one more depth was compiled). The weights / grads / opt state columns "
          "are the analytic estimate, exact from the full-depth abstract state; analytic = their sum, so "
          "compiled - analytic is activations, logits and scratch.")
  print(CLIP_NOTE if args.clip is None else f"Gradients clipped to global norm {args.clip} in the compiled steps.")
  if not fresh:
    print("NOTE: jax was imported before memory.py set XLA_FLAGS; the flags above may not apply.")
  print()
  columns = ["model", "params", "mode", "tokens", "devices", "weights", "grads", "opt state", "analytic",
             "compiled args", "temp", "compiled total", "layers compiled", "compile s"]
  print("| " + " | ".join(columns) + " |")
  print("|" + "---|" * len(columns))
  for r in rows:
    n = params[r["model"]]
    size = f"{n / 1e9:.2f}B" if n >= 1e8 else f"{n / 1e6:.2f}M"
    head = f"| {r['label']} | {size} | {r['mode']} | {r['seq']} | {r['devices']} |"
    if "error" in r:
      print(head + f" {r['error']} |" + " |" * (len(columns) - 6))
      continue
    analytic = r["weights"] + r["grads"] + r["opt"]
    print(head + f" {gib(r['weights'])} | {gib(r['grads'])} | {gib(r['opt'])} | {gib(analytic)} | "
          f"{gib(r['args'])} | {gib(r['temp'])} | **{gib(r['total'])}** | {r['depths']} | {r['compile_s']:.1f} |")
  print()
  print("Largest model that fits per device (compiled total <= budget in GiB; * = the largest model tried, "
        "larger ones may fit too). On GPUs JAX preallocates 75% of memory by default: set "
        "XLA_PYTHON_CLIENT_MEM_FRACTION=.95 (or XLA_PYTHON_CLIENT_PREALLOCATE=false) to use the budget.")
  print()
  print("\n".join(fits_table(rows, params)))
  print()
  compiles = [r for r in rows if "error" not in r]
  print(f"Timing: {len(compiles)} cells, {sum(r['compile_s'] for r in compiles):.0f} s of XLA compiles "
        f"({'full depth' if depths is None else 'reduced depths'}); this run {grid_s:.0f} s wall"
        + (f", {reused} cells read back from {args.results}." if reused else "."))
  if check is not None:
    row, full = check
    error = (row["total"] - full["total"]) / full["total"]
    print(f"Extrapolation check: {row['label']} {row['mode']} {row['seq']} tokens x{row['devices']} at full depth "
          f"({specs[row['model']].config().num_layers} layers): compiled {gib(full['total'])} {UNIT[0]} vs "
          f"extrapolated {gib(row['total'])} {UNIT[0]}, relative error {100 * error:+.1f}% "
          f"(temp {gib(full['temp'])} vs {gib(row['temp'])}); that full-depth compile took "
          f"{full['compile_s']:.0f} s against {row['compile_s']:.0f} s for its reduced ones.")
    if abs(error) > 0.1:
      print(f"WARNING: the extrapolation is off by {100 * error:+.0f}% in that cell. XLA:CPU's scheduler changes its "
            "plan with the depth, so the bytes per layer seen at 1-3 layers need not hold at full depth (other "
            "cells may be off too, either way): rerun with --full-depth for figures to rely on.")
    if depths is not None and row["compile_s"]:
      estimate = sum(r["compile_s"] for r in compiles) * full["compile_s"] / row["compile_s"]
      print(f"At full depth the {len(compiles)} cells would have compiled for about {estimate / 60:.1f} min "
            f"(scaled by that cell's ratio), against {sum(r['compile_s'] for r in compiles) / 60:.1f} min for the "
            "reduced-depth grid.")
  worse = [(r, one) for r in compiles if r["devices"] > 1
           for one in compiles if one["devices"] == 1 and one["model"] == r["model"] and one["mode"] == r["mode"]
           and one["seq"] == r["seq"] and r["total"] > 1.1 * one["total"]]
  if worse:  # the model pins its activations to the batch axes (ShardingConfig.act_btd), so this should not happen
    r, one = max(worse, key=lambda pair: pair[0]["total"] / pair[1]["total"])
    print(f"NOTE: in {len(worse)} cells FSDP needs over 10% more memory per device than one device with the same "
          f"per-device batch (worst: {r['label']} {r['mode']} {r['seq']} tokens, {gib(r['total'])} {UNIT[0]} "
          f"x{r['devices']} vs {gib(one['total'])} {UNIT[0]} x1): activations that do not stay split over the batch.")
  if skipped:
    print(f"Skipped device counts {skipped}: only {available} devices (run in a fresh process).")
  notes = sorted({r["mode"] for r in rows if r.get("unsharded")})
  for mode in notes:
    n = max(r["unsharded"] for r in rows if r["mode"] == mode)
    print(f"NOTE: {mode}: {n} variables could not be sharded as their partition metadata asks; kept replicated.")
  print("Caveats: XLA:CPU computes bf16 matmuls in float32 (float32 copies of bf16 weights and activations "
        "appear in its temporaries), so the temp column overstates a GPU's for the bf16 parts; the GPU "
        "compiler also schedules and fuses differently. Treat the figures as a plan, not a guarantee.")
  return 0


if __name__ == "__main__":
  sys.exit(main())
