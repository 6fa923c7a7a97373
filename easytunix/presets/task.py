"""``from_preset`` and friends: what turns a core model class into a friendly one.

:class:`CausalLMTask` is mixed into each family's core model class (see
``easytunix.presets.models``), so what users get back is still the plain
``nnx.Module`` the core trainers take, plus ``.config``, ``.tokenizer``,
``.sharding``, ``.mesh`` and the Keras-style methods.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import shutil
import uuid
import weakref
from pathlib import Path
from typing import Any

import numpy as np
from flax import nnx
from jax.sharding import Mesh

from easytunix.generate.tokenizer_adapter import TokenizerAdapter
from easytunix.layers.attention import set_attention_implementation
from easytunix.layers.blockwise_attention import IMPLEMENTATIONS
from easytunix.layers.sharding import ShardingConfig, shard_model
from easytunix.models import family_for_model_type
from easytunix.models.base import REMAT_POLICIES, DecoderConfig, to_dtype
from easytunix.models.hf import load_hf_model, parse_hf_config, read_hf_config, save_hf_folder
from easytunix.presets.registry import ASSETS, find_weights, get_preset

PRESET_FILE = "easytunix_preset.json"
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "generation_config.json",
)

# Facade-only state (compiled trainer, history...) lives beside the module, not in
# its graph, so nnx.split/jit never see it.
_STATE: "weakref.WeakKeyDictionary[nnx.Module, dict[str, Any]]" = weakref.WeakKeyDictionary()


def facade_state(model: nnx.Module) -> dict[str, Any]:
  """The facade's side-state of ``model`` (created empty on first use)."""
  return _STATE.setdefault(model, {})


_FACADE_ATTRS = frozenset({"tokenizer", "mesh", "preset", "stop_training"})


class CausalLMTask:
  """Keras-style entry points shared by every family's preset class."""


  # Facade attributes live in side-state, so the module's graph (and every jit
  # cache keyed on it) stays the same when a callback sets ``stop_training``.
  def __setattr__(self, name: str, value: Any) -> None:
    if name in _FACADE_ATTRS:
      facade_state(self)[name] = value
    else:
      super().__setattr__(name, value)

  def __getattr__(self, name: str) -> Any:
    if name in _FACADE_ATTRS:
      return facade_state(self).get(name)
    raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

  # ---------------------------------------------------------------- loading
  @classmethod
  def from_preset(
      cls,
      preset: str | Path,
      *,
      dtype: Any = None,
      mesh: Mesh | None = None,
      seed: int = 0,
      sharding: ShardingConfig | None = None,
      tokenizer: TokenizerAdapter | str | Path | None = None,
      **config_overrides: Any,
  ):
    """Builds a model from a registered preset name or a local folder.

    Args:
      preset: a name from ``easytunix.presets.list_presets()`` or a folder (a
        Hugging Face model folder or one written by ``save_to_preset``).
      dtype: compute and parameter dtype ("float32", "bfloat16"); default: the preset's.
      mesh: place parameters on this mesh following the config's ShardingConfig.
      seed: initialisation seed of random-weight (tiny) presets.
      sharding: replace the config's ShardingConfig.
      tokenizer: a TokenizerAdapter or folder, instead of the preset's own.
      **config_overrides: change config fields of random-weight presets (e.g. num_layers=4).
    """
    check_mesh(mesh)
    path = Path(preset).expanduser()
    if path.is_dir():
      return cls._from_folder(path, dtype=dtype, mesh=mesh, sharding=sharding, tokenizer=tokenizer)
    spec = get_preset(str(preset), family=_family(cls) or None)
    target = cls if _family(cls) else _class_for_family(spec.family)
    if not spec.is_random:
      if config_overrides:
        raise ValueError(f"Preset {spec.name!r} has real weights; its config cannot be overridden ({sorted(config_overrides)}).")
      return target._from_folder(find_weights(spec), dtype=dtype, mesh=mesh, sharding=sharding, tokenizer=tokenizer)
    config = spec.config().replace(**config_overrides) if config_overrides else spec.config()
    config = _with(config, dtype=dtype, sharding=sharding)
    model = target(config, rngs=nnx.Rngs(seed))
    shard_model(model, mesh)
    tok = tokenizer if tokenizer is not None else ASSETS / spec.tokenizer_asset
    return model._attach(tok, mesh, preset=spec.name)

  @classmethod
  def from_safetensors(
      cls,
      folder: str | Path,
      *,
      dtype: Any = None,
      mesh: Mesh | None = None,
      sharding: ShardingConfig | None = None,
      tokenizer: TokenizerAdapter | str | Path | None = None,
  ):
    """Loads a Hugging Face folder (config.json, *.safetensors, tokenizer files)."""
    check_mesh(mesh)
    folder = Path(folder).expanduser()
    if not folder.is_dir():
      raise FileNotFoundError(f"Model folder {folder} does not exist or is not a directory.")
    return cls._from_folder(folder, dtype=dtype, mesh=mesh, sharding=sharding, tokenizer=tokenizer)

  @classmethod
  def _from_folder(cls, folder: Path, *, dtype, mesh, sharding, tokenizer):
    ours = folder / PRESET_FILE
    if ours.exists():
      try:
        meta = json.loads(ours.read_text())
        meta["family"], meta["config"]
      except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{ours} is damaged ({e!r}); save the model again with save_to_preset.") from e
      target = cls if _family(cls) else _class_for_family(meta["family"])
      _check_family(target, meta["family"], folder)
      config = _with(target.config_class.from_dict(meta["config"]), dtype=dtype, sharding=sharding)
      _, params = family_for_model_type(config.to_hf_config()["model_type"])
      model = load_hf_model(target, params.name_rules(config), folder, config, mesh=mesh)
      from easytunix.presets import lora_io

      if meta.get("quantized"):
        lora_io.requantize(model, meta["quantized"])
      if meta.get("lora"):
        lora_io.load_adapters(model, folder, meta["lora"])
    else:
      hf = read_hf_config(folder)
      model_cls, params = family_for_model_type(hf.get("model_type"))
      target = cls if _family(cls) else _class_for_family(model_cls.family)
      _check_family(target, model_cls.family, folder)
      config = _with(parse_hf_config(target.config_class, hf, folder), dtype=dtype, sharding=sharding)
      model = load_hf_model(target, params.name_rules(config), folder, config, mesh=mesh)
    tok = tokenizer if tokenizer is not None else folder
    return model._attach(tok, mesh, preset=str(folder))

  def _attach(self, tokenizer, mesh: Mesh | None, preset: str):
    if tokenizer is not None and not isinstance(tokenizer, TokenizerAdapter):
      try:
        tokenizer = TokenizerAdapter.from_pretrained(tokenizer)
      except FileNotFoundError:
        tokenizer = None
    if tokenizer is not None and tokenizer.vocab_size > self.config.vocab_size:
      raise ValueError(
          f"The tokenizer has {tokenizer.vocab_size} ids but the model's vocabulary is {self.config.vocab_size}."
      )
    self.tokenizer = tokenizer
    self.mesh = mesh
    self.preset = preset
    return self

  @property
  def sharding(self) -> ShardingConfig:
    """The logical ShardingConfig of this model's parameters."""
    return self.config.sharding

  # ---------------------------------------------------------------- training
  def compile(
      self,
      optimizer: Any = "adamw",
      learning_rate: Any = 1e-3,
      *,
      trainer: str = "sft",
      lora_rank: int | None = None,
      lora_alpha: float | None = None,
      lora_targets: Any = None,
      quantize_base: str | None = None,
      max_length: int = 256,
      gradient_accumulation_steps: int = 1,
      checkpoint_dir: str | Path | None = None,
      weight_decay: float | None = None,
      warmup_steps: int = 0,
      schedule: str = "constant",
      decay_steps: int | None = None,
      max_grad_norm: float | None = 1.0,
      eval_every_n_steps: int | None = None,
      log_dir: str | Path | None = None,
      save_every_n_steps: int = 100,
      keep_checkpoints: int | None = 3,
      attention: str = "auto",
      remat: str = "none",
      precision: str | None = None,
      distill: Any = None,
      teacher: Any = None,
      **trainer_options: Any,
  ):
    """Chooses how ``fit`` trains: trainer, optimizer, LoRA, lengths, checkpoints.

    Args:
      optimizer: "adamw", "adam", "sgd", "adafactor", "lion" or an optax transformation.
      learning_rate: a float or an optax schedule.
      trainer: a registered recipe: "sft", "dpo", "distill" or "grpo" (see ``easytunix.sft.recipe``).
      lora_rank: add LoRA adapters of this rank (then only they train); None: full fine-tuning.
      lora_alpha: LoRA scale numerator (default: the rank, a scale of 1).
      lora_targets: projection names or path regexes (default: every attention and MLP projection).
      quantize_base: QLoRA: store the frozen base projections (every attention and MLP projection) in
        "nf4" (QLoRA's NormalFloat-4), "int4" or "int8", blockwise with one float32 scale per 64 input
        rows: 0.5625 bytes per weight for the 4-bit methods, 1.0625 for int8. Needs ``lora_rank`` (a
        quantized base cannot be fully fine-tuned); the adapters train in full precision on the
        dequantized base. It happens in place and is not undone by a later compile (compiling again with
        the same method keeps the codes as they are); ``merge_lora``, ``export_safetensors`` and
        ``save_to_preset`` write full-precision weights. Other block sizes or targets:
        ``easytunix.sft.lora.quantize_base`` before compile.
      max_length: tokens per training row (longer examples are truncated, with a warning).
      gradient_accumulation_steps: micro-batches per optimizer step (exact, token-weighted).
      checkpoint_dir: save checkpoints here and resume from the newest one.
      weight_decay: AdamW weight decay.
      warmup_steps / schedule / decay_steps: learning-rate warm-up and "constant", "cosine" or "linear" decay.
      max_grad_norm: clip gradients to this global norm (None: no clipping).
      eval_every_n_steps: also evaluate ``validation_data`` every this many steps.
      log_dir: TensorBoard folder for the trainer's own metrics.
      save_every_n_steps: with ``checkpoint_dir``, save every this many optimizer steps (the last step
        is always saved, and committed before ``fit`` returns).
      keep_checkpoints: how many recent checkpoints to keep (None: all).
      attention: "auto" (dense scores for short sequences, blockwise attention whose memory is
        linear in the sequence for long ones, cuDNN on NVIDIA GPUs where it applies), or force
        "xla" (dense), "blockwise" or "cudnn".
      remat: "none", "dots" or "block": recompute decoder blocks in the backward pass to save
        activation memory (see ``CausalLM.set_remat``).
      precision: None keeps the model's dtypes; "bf16-mixed" computes in bfloat16 on float32
        weights and optimizer state; "float32" computes in float32.
      distill / teacher: the strategy and teacher model of ``trainer="distill"``.
      **trainer_options: the chosen trainer's options (e.g. ``beta`` for DPO).

    Returns:
      The model, so ``Qwen3.from_preset(...).compile(...)`` chains.
    """
    from easytunix.presets import training, validation

    validation.check_compile_args(
        self, learning_rate=learning_rate, weight_decay=weight_decay, warmup_steps=warmup_steps,
        decay_steps=decay_steps, schedule=schedule, max_grad_norm=max_grad_norm, max_length=max_length,
        gradient_accumulation_steps=gradient_accumulation_steps, eval_every_n_steps=eval_every_n_steps,
        lora_rank=lora_rank, lora_alpha=lora_alpha, distill=distill)
    validation.check_quantize_base(self, quantize_base, lora_rank)
    given = {name: value for name, value in (("teacher", teacher), ("distill", distill)) if value is not None}
    check_mesh(self.mesh)
    options = training.resolve_options(trainer, {**trainer_options, **given}, common=_COMPILE_OPTIONS)
    opt = training.build_optimizer(optimizer, learning_rate, weight_decay, warmup_steps, decay_steps, schedule)
    config = training.training_config(
        gradient_accumulation_steps=gradient_accumulation_steps,
        checkpoint_dir=str(checkpoint_dir) if checkpoint_dir else None, log_dir=str(log_dir) if log_dir else None,
        max_grad_norm=max_grad_norm, eval_every_n_steps=eval_every_n_steps,
        save_every_n_steps=save_every_n_steps, keep_checkpoints=keep_checkpoints,
    )
    compute_dtype = training.compute_dtype_for(precision, self)
    training.check_choice("attention", attention, IMPLEMENTATIONS)
    training.check_choice("remat", remat, sorted(REMAT_POLICIES))
    set_attention_implementation(self, attention)
    self.set_remat(remat)
    if compute_dtype is not None:
      self.set_compute_dtype(compute_dtype)
    if lora_rank is not None:
      self.enable_lora(lora_rank, alpha=lora_alpha, targets=lora_targets)
    elif lora_alpha is not None or lora_targets is not None:
      raise ValueError("lora_alpha and lora_targets need lora_rank.")
    if quantize_base is not None:
      from easytunix.sft import lora

      if lora.quantization_method(self) is None:  # already quantized (same method, checked above): kept as it is
        lora.quantize_base(self, quantize_base)
        facade_state(self).pop("sampler", None)  # a cached sampler would keep the full-precision kernels alive
    spec = training.compile_spec(self, trainer, training.RecipeSettings(
        optimizer=opt, max_length=max_length, options=options, training_config=config))
    state = facade_state(self)
    training.close_run(state)
    state["compiled"] = spec
    describe = validation.describe_value
    state["run_settings"] = {
        "trainer": trainer, "optimizer": describe(optimizer), "learning_rate": describe(learning_rate),
        "weight_decay": weight_decay, "schedule": schedule, "warmup_steps": warmup_steps,
        "decay_steps": decay_steps, "max_length": max_length, "lora_rank": lora_rank,
        "quantize_base": quantize_base,
        "gradient_accumulation_steps": gradient_accumulation_steps,
    }
    state["recipe_state"] = {}  # e.g. GRPO's reference: a new compile anchors its KL to the weights as they are now
    return self

  def _compiled(self, what: str):
    spec = facade_state(self).get("compiled")
    if spec is None:
      raise RuntimeError(
          f"Call compile() before {what}(): e.g. model.compile(trainer='sft', learning_rate=1e-3, lora_rank=8)."
      )
    return spec

  def fit(self, data: Any, epochs: int = 1, steps: int | None = None, batch_size: int = 8,
          validation_data: Any = None, callbacks: list | None = None, shuffle: bool = True, seed: int = 0,
          verbose: int = 1, validation_split: float = 0.0):
    """Trains on ``data`` and returns a ``History`` (``history.history["loss"]``: one value per epoch).

    Args:
      data: a list of strings; a list of dicts (``text``; ``prompt``+``completion``; ``messages``;
        DPO's ``prompt``+``chosen``+``rejected``; GRPO's ``prompt``); a .jsonl/.json/.csv/.parquet
        path; a ``datasets.Dataset``; or an iterable of ``TrainingInput`` batches.
      epochs: passes over the data.
      steps: stop after this many optimizer steps instead (epochs are extended as needed).
        With ``checkpoint_dir``, the first ``fit`` after ``compile`` counts ``steps``/``epochs`` from the
        job's start: rerunning a killed script resumes and trains only what is missing, and rerunning a
        finished one warns and trains nothing. Later ``fit`` calls continue for more, as in Keras.
      batch_size: examples per micro-batch.
      validation_data: evaluated at the end of every epoch (``val_loss`` in the logs).
      validation_split: hold out this last fraction of ``data`` (before shuffling) as validation
        data, as Keras does; not together with ``validation_data``.
      callbacks: ``easytunix.callbacks.Callback`` instances.
      shuffle: reshuffle every epoch (deterministically from ``seed``).
      seed: data order seed.
      verbose: 0 is silent; 1 prints a start banner (devices, parameters, data, batch, truncation,
        compile time) and a progress bar (one line per epoch when the output is not a terminal);
        2 prints one line per epoch.

    Returns:
      A ``History``: ``history.history[name]`` holds each metric's epoch means (training and
      ``val_*``), ``history.steps`` one dict per optimizer step.
    """
    from easytunix.presets import training

    spec = self._compiled("fit")
    return training.fit(self, spec, facade_state(self), data, epochs=epochs, steps=steps, batch_size=batch_size,
                        validation_data=validation_data, callbacks=callbacks, shuffle=shuffle, seed=seed,
                        verbose=verbose, validation_split=validation_split)

  def evaluate(self, data: Any, batch_size: int = 8) -> dict[str, float]:
    """The compiled trainer's loss (and its metrics, e.g. perplexity) on ``data``."""
    from easytunix.presets import training

    return training.evaluate(self, self._compiled("evaluate"), facade_state(self), data, batch_size)

  def generate(self, prompts: str | list[str], max_length: int | None = None, sampler: str = "greedy", *,
               max_new_tokens: int | None = None, temperature: float | None = None, top_p: float | None = None,
               top_k: int | None = None, beam_size: int | None = None, seed: int | None = None,
               stream: bool = False, strip_prompt: bool = True, chat: bool = False):
    """Continues each prompt; a string gives a string, a list gives a list.

    Args:
      prompts: a string or a list of strings.
      max_length: how many new tokens to generate at most, not counting the prompt (unlike
        keras-hub's ``max_length``, which counts the prompt too). Default 64.
      sampler: "greedy", "top_p", "top_k", "random" or "beam".
      max_new_tokens: the same limit under transformers' name; give it or ``max_length``, not both.
      temperature / top_p / top_k / beam_size / seed: sampling settings.
      stream: return an iterator of the new text per step.
      strip_prompt: True (default) returns only the new text; False returns the prompt followed by it.
      chat: wrap each prompt as a user turn of the tokenizer's chat template.
    """
    from easytunix.presets import generation, validation

    if max_length is not None and max_new_tokens is not None:
      raise ValueError(
          f"generate got max_length={max_length} and max_new_tokens={max_new_tokens}; both count new tokens "
          "only (not the prompt), so give one of them."
      )
    max_length = max_new_tokens if max_new_tokens is not None else 64 if max_length is None else max_length

    validation.check_generate_args(prompts, max_length=max_length, temperature=temperature, top_p=top_p,
                                   top_k=top_k, beam_size=beam_size, seed=seed)
    return generation.generate(self, facade_state(self), prompts, max_length=max_length, sampler=sampler,
                               temperature=temperature, top_p=top_p, top_k=top_k, beam_size=beam_size, seed=seed,
                               stream=stream, strip_prompt=strip_prompt, chat=chat)

  def enable_lora(self, rank: int, alpha: float | None = None, targets: Any = None, seed: int = 0):
    """Adds LoRA adapters (only they train from then on); returns the model."""
    from easytunix.presets import lora_io
    from easytunix.sft.lora import DEFAULT_TARGETS, apply_lora

    if lora_io.has_adapters(self):
      raise ValueError("This model already has LoRA adapters; merge them (merge_lora) before adding new ones.")
    apply_lora(self, rank, alpha, targets if targets is not None else DEFAULT_TARGETS, seed=seed)
    return self

  def merge_lora(self):
    """Folds the LoRA adapters into the base weights (then all parameters train again); returns the model."""
    from easytunix.sft.lora import merge_lora

    merge_lora(self)
    return self

  # ---------------------------------------------------------------- saving
  def save_to_preset(self, folder: str | Path, overwrite: bool = False) -> Path:
    """Writes a folder that ``from_preset(folder)`` restores exactly (LoRA adapters included).

    Args:
      folder: destination; it must be empty or missing unless ``overwrite``.
      overwrite: replace a non-empty folder. The new folder is written beside it and swapped in
        only when complete, so an interrupted save leaves the old one intact.
    """
    with _atomic_folder(Path(folder), overwrite, "save_to_preset") as staging:
      self._write_preset(staging)
    return Path(folder)

  def _write_preset(self, folder: Path) -> None:
    _, params = family_for_model_type(self.config.to_hf_config()["model_type"])
    save_hf_folder(self, folder, params.name_rules(self.config), self.config.to_hf_config())
    meta = {"family": self.family, "config": self.config.to_dict(), "format_version": 1}
    from easytunix.presets import lora_io

    lora = lora_io.save_adapters(self, folder)
    if lora:
      meta["lora"] = lora
    quantized = lora_io.quantization_description(self)
    if quantized:
      meta["quantized"] = quantized
    (folder / PRESET_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    self._save_tokenizer(folder)

  def export_safetensors(self, folder: str | Path, merge_lora: bool = True, overwrite: bool = False) -> Path:
    """Writes a Hugging Face folder that transformers' ``from_pretrained`` loads.

    Args:
      folder: destination.
      merge_lora: fold LoRA adapters into the exported weights (the model itself is unchanged).
        With False, adapters are an error: transformers would silently drop them.
      overwrite: replace a non-empty folder (written beside it, swapped in when complete).
    """
    from easytunix.presets import lora_io

    if lora_io.has_adapters(self) and not merge_lora:
      raise ValueError(
          "This model has LoRA adapters; export_safetensors(merge_lora=False) would drop them. "
          "Use merge_lora=True, or save_to_preset to keep the adapters separate."
      )
    _, params = family_for_model_type(self.config.to_hf_config()["model_type"])
    with _atomic_folder(Path(folder), overwrite, "export_safetensors") as staging:
      # The adapters are folded in tensor by tensor as they are written: no copy of the model.
      save_hf_folder(self, staging, params.name_rules(self.config), self.config.to_hf_config(), merge_lora=True)
      self._save_tokenizer(staging)
    return Path(folder)

  def _save_tokenizer(self, folder: Path) -> None:
    tok = getattr(self, "tokenizer", None)
    source = Path(tok.name_or_path) if tok is not None and tok.name_or_path else None
    if source is None or not source.exists():
      return
    source = source if source.is_dir() else source.parent
    for name in _TOKENIZER_FILES:
      if (source / name).exists() and (source / name).resolve() != (folder / name).resolve():
        shutil.copy(source / name, folder / name)

  # ---------------------------------------------------------------- inspection
  def summary(self, print_fn=print) -> str:
    """Parameters per block, trainable vs frozen, LoRA adapters; printed and returned.

    Runs of identical decoder layers are one row ("layers.0-29 x30", their parameters summed).
    Quantized kernels (QLoRA) count as the weights they stand for, frozen.
    """
    from easytunix.layers.quantization import QuantizedKernel
    from easytunix.presets import lora_io

    rows: dict[str, list[int]] = {}
    lora_on = lora_io.has_adapters(self)
    quantized = []
    for path, var in nnx.iter_graph(self):
      if isinstance(var, QuantizedKernel):
        quantized.append(var)
      elif not isinstance(var, nnx.Param):
        continue
      parts = [str(p) for p in path]
      block = ".".join(parts[:2]) if parts[0] == "layers" else parts[0]
      n = var.size if isinstance(var, QuantizedKernel) else int(np.prod(var.get_value().shape))
      row = rows.setdefault(block, [0, 0, 0])
      if isinstance(var, nnx.LoRAParam):
        row[2] += n
      else:
        row[0] += n
    total_base = sum(r[0] for r in rows.values())
    total_lora = sum(r[2] for r in rows.values())
    trainable = total_lora if lora_on else total_base
    c = self.config
    lines = [
        f'{type(self).__name__} "{getattr(self, "preset", "")}": {c.num_layers} layers, width {c.hidden_size}, '
        f"{c.num_heads} heads ({c.num_kv_heads} KV), vocab {c.vocab_size}, dtype {np.dtype(c.param_dtype).name}"
        + (f", MoE {c.num_experts}x top-{c.num_experts_per_tok}" if c.num_experts else ""),
        f"{'block':<22}{'parameters':>14}{'LoRA':>12}",
    ]
    for block, base, lora in _collapse_layers(rows):
      lines.append(f"{block:<22}{base:>14,}{lora:>12,}")
    lines.append(f"{'total':<22}{total_base:>14,}{total_lora:>12,}")
    lines.append(
        f"trainable: {trainable:,}   frozen: {total_base + total_lora - trainable:,}"
        + ("   (LoRA: only adapters train)" if lora_on else "   (full fine-tuning)")
    )
    if quantized:
      weights = sum(k.size for k in quantized)
      stored = sum(k.nbytes for k in quantized)
      lines.append(
          f"quantized base: {len(quantized)} kernels in {quantized[0].method} ({weights:,} weights, "
          f"{stored / 2**20:,.2f} MiB, {stored / weights:.4f} bytes per weight)"
      )
    text = "\n".join(lines)
    if print_fn is not None:
      print_fn(text)
    return text


@contextlib.contextmanager
def _atomic_folder(folder: Path, overwrite: bool, what: str):
  """Yields a sibling staging folder; on success it replaces ``folder`` (files of an older save go with it)."""
  from easytunix.models.safetensors_io import current_umask
  from easytunix.presets import validation

  folder = folder.expanduser()
  validation.check_output_folder(folder, overwrite, what)
  folder.parent.mkdir(parents=True, exist_ok=True)
  tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
  staging = folder.with_name(f".{folder.name}.tmp-{tag}")
  staging.mkdir(mode=0o777 & ~current_umask())
  try:
    yield staging
    old = folder.with_name(f".{folder.name}.old-{tag}")
    if folder.exists():
      folder.rename(old)
    staging.rename(folder)
    shutil.rmtree(old, ignore_errors=True)
  finally:
    shutil.rmtree(staging, ignore_errors=True)


def _collapse_layers(rows: dict[str, list[int]]) -> list[tuple[str, int, int]]:
  """``(name, parameters, LoRA)`` rows with consecutive same-sized ``layers.i`` rows merged into one."""
  out: list[tuple[str, int, int]] = []
  run: list[tuple[int, int, int]] = []  # (layer index, base, lora) of the current run

  def flush():
    if run:
      first, last = run[0][0], run[-1][0]
      name = f"layers.{first}" if len(run) == 1 else f"layers.{first}-{last} x{len(run)}"
      out.append((name, sum(r[1] for r in run), sum(r[2] for r in run)))
      run.clear()

  for block, (base, _, lora) in rows.items():
    index = block.split(".", 1)[1] if block.startswith("layers.") else None
    if index is not None and index.isdigit():
      if run and (run[-1][1:] != (base, lora) or int(index) != run[-1][0] + 1):
        flush()
      run.append((int(index), base, lora))
    else:
      flush()
      out.append((block, base, lora))
  flush()
  return out


# compile's own arguments: the options every trainer takes (the trainer's own come from its recipe).
_COMPILE_OPTIONS = tuple(
    name for name in inspect.signature(CausalLMTask.compile).parameters
    if name not in ("self", "trainer_options", "teacher", "distill")
)


def check_mesh(mesh: Mesh | None) -> None:
  """Raises when ``mesh`` has Explicit axes (``jax.make_mesh``'s default): the model shards with Auto axes.

  Explicit sharding would make every operation declare its output sharding; the model's layers
  place parameters and let XLA propagate, which needs ``AxisType.Auto``.
  """
  if mesh is None:
    return
  axis_types = getattr(mesh, "axis_types", None) or ()
  explicit = [name for name, kind in zip(mesh.axis_names, axis_types) if "Explicit" in str(kind)]
  if explicit:
    n = len(mesh.axis_names)
    raise ValueError(
        f"The mesh's axes {explicit} are Explicit (recent jax.make_mesh's default); easytunix shards "
        f"with Auto axes. Build the mesh as jax.make_mesh({tuple(mesh.devices.shape)}, {tuple(mesh.axis_names)}, "
        f"axis_types=(jax.sharding.AxisType.Auto,) * {n})."
    )


def _with(config: DecoderConfig, *, dtype=None, sharding=None) -> DecoderConfig:
  changes = {}
  if dtype is not None:
    changes.update(dtype=to_dtype(dtype), param_dtype=to_dtype(dtype))
  if sharding is not None:
    changes["sharding"] = sharding
  return config.replace(**changes) if changes else config


def _family(cls) -> str:
  """The family a preset class is bound to ("" for the family-agnostic ``CausalLM`` loader)."""
  return getattr(cls, "family", "")


def _class_for_family(family: str):
  from easytunix.presets import models

  return models.BY_FAMILY[family]


def _check_family(cls, family: str, folder: Path) -> None:
  if _family(cls) and cls.family != family:
    right = _class_for_family(family).__name__
    raise ValueError(
        f"{folder} holds a {family} model; load it with easytunix.presets.{right} "
        f"(or easytunix.presets.CausalLM, which picks the family), not {cls.__name__}."
    )
