"""One checkpoint loader for every family: name tables as data, per-tensor placement.

A family describes its checkpoint with :class:`NameRule` rows such as
``NameRule("model.layers.{layer}.self_attn.q_proj.weight", "layers.{layer}.attn.q_proj.kernel", transpose=True)``.
A checkpoint name holding ``{expert}`` whose parameter does not is stacked
along the parameter's first axis. The model is built abstractly
(``nnx.eval_shape``) and each tensor is converted and placed straight onto its
sharding, so host memory stays near one copy of the weights.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from easytunix.layers.linear import Linear
from easytunix.layers.sharding import path_str, variable_sharding
from easytunix.layers.sharding import place as place_on_sharding
from easytunix.models.safetensors_io import SafetensorsReader, checkpoint_files

logger = logging.getLogger(__name__)

# Prefixes of multimodal checkpoints whose text model we load.
_PREFIXES = (("model.language_model.", "model."), ("language_model.model.", "model."), ("language_model.", ""))
_IGNORED = (re.compile(r".*rotary_emb\.inv_freq$"), re.compile(r"^(model\.)?(vision_tower|multi_modal_projector|vision_model)\."))


@dataclasses.dataclass(frozen=True)
class NameRule:
  """Maps one checkpoint tensor name pattern to one model parameter path.

  Attributes:
    checkpoint: e.g. "model.layers.{layer}.mlp.experts.{expert}.up_proj.weight".
    param: e.g. "layers.{layer}.mlp.up_proj".
    transpose: checkpoint stores [out, in] (torch Linear); the model stores [in, out].
  """

  checkpoint: str
  param: str
  transpose: bool = False

  @property
  def stacked(self) -> bool:
    return "{expert}" in self.checkpoint and "{expert}" not in self.param

  def _regex(self, template: str) -> re.Pattern:
    pattern = re.escape(template).replace(r"\{layer\}", r"(?P<layer>\d+)").replace(r"\{expert\}", r"(?P<expert>\d+)")
    return re.compile(f"^{pattern}$")

  def match_checkpoint(self, name: str) -> dict[str, str] | None:
    m = self._regex(self.checkpoint).match(name)
    return m.groupdict() if m else None

  def match_param(self, path: str) -> dict[str, str] | None:
    m = self._regex(self.param).match(path)
    return m.groupdict() if m else None


def normalize_name(name: str) -> str:
  for prefix, replacement in _PREFIXES:
    if name.startswith(prefix):
      return replacement + name[len(prefix) :]
  return name


def _to_model_layout(array: np.ndarray, rule: NameRule) -> np.ndarray:
  return array.T if rule.transpose and array.ndim == 2 else array


def load_weights(
    abstract_model: nnx.Module,
    folder: str | Path,
    rules: Iterable[NameRule],
    *,
    mesh: Mesh | None = None,
    skip: Callable[[str], bool] | None = None,
) -> nnx.Module:
  """Fills an abstract model (from ``nnx.eval_shape``) with a safetensors checkpoint.

  Args:
    abstract_model: the model, built abstractly; its parameters are replaced in place.
    folder: Hugging Face model folder with ``*.safetensors`` (sharded or not).
    rules: the family's name table.
    mesh: place every parameter with its ShardingConfig on this mesh.
    skip: checkpoint names (normalised) to ignore, e.g. ``lm_head.weight`` of a tied model.

  Returns:
    The same model object, now concrete.

  Raises:
    FileNotFoundError: the folder or its safetensors files are missing.
    ValueError: a tensor's shape disagrees with the config, or tensors are missing.
  """
  rules = list(rules)
  variables: dict[str, nnx.Variable] = {
      path_str(p): v for p, v in nnx.iter_graph(abstract_model) if isinstance(v, nnx.Variable)
  }
  filled: set[str] = set()
  stacked_buffers: dict[str, tuple[np.ndarray, set[int]]] = {}
  unexpected: list[str] = []

  def place(path: str, var: nnx.Variable, host: np.ndarray) -> None:
    sharding = variable_sharding(path, host.shape, var.get_metadata().get("partition"), mesh)
    value = place_on_sharding(host, sharding) if sharding is not None else jax.device_put(host)
    var.set_value(value)
    filled.add(path)

  for file in checkpoint_files(folder):
    with SafetensorsReader(file) as reader:
      for raw_name in reader.keys():
        name = normalize_name(raw_name)
        if any(p.match(name) for p in _IGNORED) or (skip is not None and skip(name)):
          continue
        for rule in rules:
          groups = rule.match_checkpoint(name)
          if groups is not None:
            break
        else:
          unexpected.append(raw_name)
          continue
        path = rule.param.format(**groups)
        var = variables.get(path)
        if var is None:
          raise ValueError(
              f"Checkpoint tensor {raw_name} in {file} maps to parameter {path}, which this model "
              "does not have. Does the config (e.g. attention_bias, num_layers, tie_embeddings) match "
              "the checkpoint's config.json?"
          )
        target = var.get_value()
        dtype = target.dtype
        array = _to_model_layout(reader.get(raw_name), rule)
        expected = target.shape[1:] if rule.stacked else target.shape
        if tuple(array.shape) != tuple(expected):
          raise ValueError(
              f"Tensor {raw_name} in {file} has shape {tuple(reader.shape(raw_name))}"
              f"{' (transposed: ' + str(tuple(array.shape)) + ')' if rule.transpose else ''}, "
              f"but parameter {path} expects {tuple(expected)} from the config. "
              "The config does not match these weights."
          )
        if rule.stacked:
          buffer, seen = stacked_buffers.setdefault(path, (np.empty(target.shape, dtype), set()))
          expert = int(groups["expert"])
          if expert >= target.shape[0]:
            raise ValueError(
                f"Tensor {raw_name} in {file} is expert {expert}, but the config has {target.shape[0]} experts."
            )
          buffer[expert] = array
          seen.add(expert)
          if len(seen) == target.shape[0]:
            place(path, var, buffer)
            del stacked_buffers[path]
        else:
          place(path, var, np.ascontiguousarray(array.astype(dtype, copy=False)))
        del array
        reader.release(raw_name)

  if unexpected:
    logger.warning("Ignored %d checkpoint tensors with no parameter: %s", len(unexpected), unexpected[:10])
  missing = [p for p in variables if p not in filled]
  if missing:
    details = []
    for path in missing[:20]:
      expected_name = _checkpoint_name_for(path, rules)
      extra = ""
      if path in stacked_buffers:
        got = sorted(stacked_buffers[path][1])
        extra = f" (only experts {got} found)"
      details.append(f"{expected_name or '?'} -> {path}{extra}")
    raise ValueError(
        f"The checkpoint in {folder} lacks {len(missing)} tensor(s) the model needs: "
        + "; ".join(details)
        + (" ..." if len(missing) > 20 else "")
    )
  return abstract_model


def _checkpoint_name_for(path: str, rules: Iterable[NameRule]) -> str | None:
  for rule in rules:
    groups = rule.match_param(path)
    if groups is not None:
      name = rule.checkpoint.format(layer=groups.get("layer", "{layer}"), expert="{expert}")
      return name
  return None


def model_params(model: nnx.Module, merge_lora: bool = True) -> Iterator[tuple[str, jax.Array]]:
  """Every base parameter of ``model`` as (dotted path, array); LoRA adapters folded into their kernels.

  The model is not changed. With ``merge_lora=False`` an adapted kernel is yielded as it is.
  A quantized kernel (QLoRA) is yielded dequantized, in its dtype from before quantization
  (with ``merge_lora``, plus its adapters' update): every export is full precision.
  """
  adapted, quantized = {}, {}
  for p, module in nnx.iter_graph(model):
    if isinstance(module, Linear) and (module.quantized or (merge_lora and module.lora_a is not None)):
      (quantized if module.quantized else adapted)[path_str(p) + ".kernel"] = module
  for p, var in nnx.iter_graph(model):
    path = path_str(p)
    if path in quantized:  # the QuantizedKernel node; its codes and scales are not nnx.Param
      module = quantized[path]
      yield path, (module.merged_kernel() if merge_lora else module.kernel.dequantize())
      continue
    if not isinstance(var, nnx.Param) or isinstance(var, nnx.LoRAParam):
      continue
    module = adapted.get(path)
    yield path, (module.merged_kernel() if module is not None else var.get_value())


def checkpoint_items(params: Iterable[tuple[str, Any]], rules: Iterable[NameRule]) -> Iterator[tuple[str, Any, bool]]:
  """Parameters as checkpoint tensors: (checkpoint name, value, transpose) per tensor.

  ``value`` keeps the model's layout (and array type): a caller transposes it
  when ``transpose`` is set. Stacked experts come out one expert at a time.

  Raises:
    ValueError: a parameter has no row in ``rules``.
  """
  rules = list(rules)
  for path, value in params:
    for rule in rules:
      groups = rule.match_param(path)
      if groups is not None:
        break
    else:
      raise ValueError(f"No checkpoint name for parameter {path}.")
    if rule.stacked:
      for e in range(value.shape[0]):
        yield rule.checkpoint.format(layer=groups.get("layer"), expert=e), value[e], rule.transpose
    else:
      yield rule.checkpoint.format(**groups), value, rule.transpose and value.ndim == 2


def checkpoint_tensors(model: nnx.Module, rules: Iterable[NameRule], merge_lora: bool = False) -> dict[str, np.ndarray]:
  """The inverse mapping: every parameter as checkpoint-named host arrays (experts split; with
  ``merge_lora``, LoRA adapters folded into their kernels)."""
  out: dict[str, np.ndarray] = {}
  params = ((path, np.asarray(jax.device_get(v))) for path, v in model_params(model, merge_lora=merge_lora))
  for name, value, transpose in checkpoint_items(params, rules):
    out[name] = np.ascontiguousarray(value.T if transpose else value)
  return out


def create_model(
    model_cls: type,
    config: Any,
    folder: str | Path,
    rules: Iterable[NameRule],
    *,
    mesh: Mesh | None = None,
) -> nnx.Module:
  """Builds ``model_cls(config)`` abstractly and loads ``folder`` into it."""
  abstract = nnx.eval_shape(lambda: model_cls(config, rngs=nnx.Rngs(0)))
  tied = getattr(config, "tie_embeddings", False)
  skip = (lambda n: n == "lm_head.weight") if tied else None
  return load_weights(abstract, folder, rules, mesh=mesh, skip=skip)


def llama_style_rules(*, qk_norm: bool = False, bias: bool = False, sandwich: bool = False, moe: bool = False) -> tuple[NameRule, ...]:
  """The Hugging Face naming shared by Llama, Qwen, Gemma and Gemma 3 checkpoints."""
  L = "model.layers.{layer}."
  P = "layers.{layer}."
  rules = [
      NameRule("model.embed_tokens.weight", "embedder.embedding"),
      NameRule("model.norm.weight", "final_norm.scale"),
      NameRule("lm_head.weight", "lm_head.kernel", transpose=True),
      NameRule(L + "input_layernorm.weight", P + "input_norm.scale"),
  ]
  for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
    rules.append(NameRule(L + f"self_attn.{proj}.weight", P + f"attn.{proj}.kernel", transpose=True))
  if bias:
    for proj in ("q_proj", "k_proj", "v_proj"):
      rules.append(NameRule(L + f"self_attn.{proj}.bias", P + f"attn.{proj}.bias"))
  if qk_norm:
    rules += [
        NameRule(L + "self_attn.q_norm.weight", P + "attn.q_norm.scale"),
        NameRule(L + "self_attn.k_norm.weight", P + "attn.k_norm.scale"),
    ]
  if sandwich:
    rules += [
        NameRule(L + "post_attention_layernorm.weight", P + "post_attn_norm.scale"),
        NameRule(L + "pre_feedforward_layernorm.weight", P + "pre_ffw_norm.scale"),
        NameRule(L + "post_feedforward_layernorm.weight", P + "post_ffw_norm.scale"),
    ]
  else:
    rules.append(NameRule(L + "post_attention_layernorm.weight", P + "pre_ffw_norm.scale"))
  for proj in ("gate_proj", "up_proj", "down_proj"):
    rules.append(NameRule(L + f"mlp.{proj}.weight", P + f"mlp.{proj}.kernel", transpose=True))
  if moe:
    rules.append(NameRule(L + "mlp.gate.weight", P + "mlp.router.kernel", transpose=True))
    for proj in ("gate_proj", "up_proj", "down_proj"):
      rules.append(NameRule(L + "mlp.experts.{expert}." + f"{proj}.weight", P + f"mlp.{proj}", transpose=True))
  return tuple(rules)
