"""Logical sharding of parameters and activations onto a device mesh.

Every parameter carries a ``partition`` metadata tuple of mesh-axis names (or
None) chosen from a :class:`ShardingConfig`; :func:`shard_model` and the
checkpoint loader turn those into ``NamedSharding``s for a concrete mesh.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

Axes = tuple[Any, ...]


@dataclasses.dataclass(frozen=True)
class ShardingConfig:
  """Partition specs (mesh-axis names per array dimension) for each kind of array.

  The default uses two mesh axes: ``fsdp`` (parameters and batch sharded, fully
  sharded data parallel) and ``tp`` (tensor parallel: heads and MLP width).
  Axis names that a given mesh lacks are treated as replicated. An entry may
  also name several mesh axes, as a tuple: the activations' batch dimension
  (``act_btd``, ``act_bt``) is split over ``("data", "fsdp")``, the axes a
  trainer splits its batches over (``TrainingConfig.data_sharding_axis``), so
  the activations stay where the batch is instead of following the weights'
  sharding (with which every device would compute the whole global batch).
  """

  embed_vd: Axes = ("tp", "fsdp")
  lm_head_dv: Axes = ("fsdp", "tp")
  attn_in: Axes = ("fsdp", "tp")
  attn_out: Axes = ("tp", "fsdp")
  ffw_in: Axes = ("fsdp", "tp")
  ffw_out: Axes = ("tp", "fsdp")
  norm: Axes = (None,)
  router: Axes = ("fsdp", None)
  expert_in: Axes = (None, "fsdp", "tp")
  expert_out: Axes = (None, "tp", "fsdp")
  act_btd: Axes = (("data", "fsdp"), None, None)
  act_bt: Axes = (("data", "fsdp"), None)

  def __post_init__(self):
    # JSON gives lists: entries become names, None, or tuples of names (hashable, as a static config must be).
    for f in dataclasses.fields(self):
      spec = getattr(self, f.name)
      object.__setattr__(self, f.name, tuple(tuple(a) if isinstance(a, list) else a for a in spec))

  @classmethod
  def default(cls, fsdp: str | None = "fsdp", tp: str | None = "tp") -> "ShardingConfig":
    """FSDP x tensor-parallel specs, with the mesh axis names given."""
    rename = {"fsdp": fsdp, "tp": tp}

    def renamed(a):
      if isinstance(a, tuple):
        names = tuple(n for n in (renamed(x) for x in a) if n is not None)
        return names or None
      return rename.get(a, a) if a is not None else None

    return cls(**{f.name: tuple(renamed(a) for a in f.default) for f in dataclasses.fields(cls)})

  @classmethod
  def none(cls) -> "ShardingConfig":
    """Everything replicated."""
    return cls(**{f.name: (None,) * len(f.default) for f in dataclasses.fields(cls)})

  def get_default_sharding(self, is_sampling: bool = False) -> "ShardingConfig":
    """Seed-compatible alias: the default FSDP x TP layout."""
    del is_sampling
    return ShardingConfig.default()


def as_mesh(mesh: Mesh | None) -> Mesh | None:
  """``mesh``, or None for no mesh: None or an empty mesh (e.g. the ambient one outside any ``with mesh:``).

  An empty mesh has no devices; everything placed "on" it goes to the default device, unsharded.
  """
  if mesh is None or getattr(mesh, "empty", False) or getattr(mesh, "size", 1) == 0:
    return None
  return mesh


def _on_mesh(axis: Any, names: set[str]) -> Any:
  """One spec entry restricted to the mesh's axis names (a tuple keeps the names the mesh has)."""
  if isinstance(axis, tuple):
    kept = tuple(a for a in axis if a in names)
    return kept[0] if len(kept) == 1 else (kept or None)
  return axis if axis in names else None


def _spec_for_mesh(axes: Axes, mesh: Mesh | None) -> PartitionSpec:
  mesh = as_mesh(mesh)
  if mesh is None:
    return PartitionSpec()
  names = set(mesh.axis_names)
  return PartitionSpec(*(_on_mesh(a, names) for a in axes))


def _axis_size(mesh: Any, axis: Any) -> int:
  return int(np.prod([mesh.shape[a] for a in (axis if isinstance(axis, tuple) else (axis,))]))


def mesh_context(mesh: Mesh | None):
  """A context for tracing a program that runs on ``mesh`` (a no-op without a real mesh).

  Inside it (``jax.sharding.use_abstract_mesh``, usable inside ``jax.jit``), the models'
  activation constraints (:func:`constrain`) apply. Trainers enter it in their traced steps.
  """
  import contextlib

  mesh = as_mesh(mesh)
  return contextlib.nullcontext() if mesh is None else jax.sharding.use_abstract_mesh(mesh.abstract_mesh)


def constrain(x: jax.Array, axes: Axes) -> jax.Array:
  """Pins activation ``x`` to the partition ``axes`` on the mesh being traced under (:func:`mesh_context`).

  Without a mesh, ``x`` as it is. Mesh axes the mesh lacks, or that do not divide
  their dimension (a batch of 1 on 8 devices), are left out (replicated there).
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or mesh.empty or not mesh.axis_names:
    return x
  names = set(mesh.axis_names)
  axes = (tuple(axes) + (None,) * x.ndim)[: x.ndim]
  spec = []
  for dim, axis in zip(x.shape, axes):
    axis = _on_mesh(axis, names)
    spec.append(axis if axis is not None and dim % _axis_size(mesh, axis) == 0 else None)
  if all(a is None for a in spec):
    return x
  return jax.lax.with_sharding_constraint(x, PartitionSpec(*spec))


def variable_sharding(
    path: str, shape: tuple[int, ...], axes: Axes | None, mesh: Mesh | None
) -> jax.sharding.Sharding | None:
  """The NamedSharding for one variable, checking that its dims divide the mesh (None without a mesh)."""
  mesh = as_mesh(mesh)
  if mesh is None:
    return None
  axes = tuple(axes or ())
  if len(axes) < len(shape):
    axes = axes + (None,) * (len(shape) - len(axes))
  spec = _spec_for_mesh(axes[: len(shape)], mesh)
  for dim, axis in zip(shape, spec):
    if axis is None:
      continue
    size = _axis_size(mesh, axis)
    if dim % size:
      raise ValueError(
          f"Cannot shard parameter {path} of shape {shape} with spec {tuple(spec)}: "
          f"dimension {dim} is not divisible by mesh axis {axis!r} of size {size}. "
          "Use a mesh whose axis sizes divide the model dimensions, or a ShardingConfig "
          "that replicates this dimension."
      )
  return NamedSharding(mesh, spec)


def divisible_axes(shape: tuple[int, ...], axes: Axes | None, mesh: Mesh | None) -> Axes:
  """``axes`` (padded to the rank of ``shape``), each mesh axis that does not divide its dimension set to None.

  For arrays derived from a sharded one but smaller along a dimension (the codes and
  scales of a quantized kernel): they keep the kernel's layout where it fits and are
  replicated along the other dimensions. Without a mesh, ``axes`` as they are.
  """
  axes = tuple(axes or ())
  axes = (axes + (None,) * len(shape))[: len(shape)]
  mesh = as_mesh(mesh)
  if mesh is None:
    return axes
  spec = _spec_for_mesh(axes, mesh)
  out = []
  for dim, axis, placed in zip(shape, axes, spec):
    if placed is not None:
      if dim % _axis_size(mesh, placed):
        axis = None
    out.append(axis)
  return tuple(out)


def variable_placement(path: str, var: nnx.Variable, mesh: Mesh | None) -> jax.sharding.Sharding | None:
  """The NamedSharding of variable ``var`` on ``mesh`` from its ``partition`` metadata (None without a mesh).

  A variable whose metadata sets ``replicate_indivisible`` (quantized codes and scales)
  is replicated along axes that do not divide it; any other raises, as
  :func:`variable_sharding` does.
  """
  value = var[...]
  meta = var.get_metadata()
  axes = meta.get("partition")
  if meta.get("replicate_indivisible"):
    axes = divisible_axes(tuple(value.shape), axes, mesh)
  return variable_sharding(path, tuple(value.shape), axes, mesh)


def path_str(path: tuple) -> str:
  """'layers.0.attn.q_proj.kernel' for an nnx state path."""
  return ".".join(str(p) for p in path)


def partition_specs(model: nnx.Module, mesh: Mesh | None = None) -> dict[str, PartitionSpec]:
  """Maps every variable path of ``model`` to its PartitionSpec on ``mesh``."""
  out = {}
  for path, var in nnx.iter_graph(model):
    if isinstance(var, nnx.Variable):
      meta = var.get_metadata()
      axes = meta.get("partition")
      if axes is not None:
        if meta.get("replicate_indivisible"):
          axes = divisible_axes(tuple(var.get_value().shape), axes, mesh)
        out[path_str(path)] = _spec_for_mesh(tuple(axes), mesh)
  return out


def place(value: Any, sharding: jax.sharding.Sharding) -> jax.Array:
  """``jax.device_put(value, sharding)``, also for a sharding whose devices span several processes.

  Across processes every process passes the same whole ``value`` (a host array or a process-local
  one) and each keeps only its own devices' slices of it, without the cross-process equality check
  (an all-gather of the whole array) that ``device_put`` runs there. A global array is resharded.
  """
  if sharding.is_fully_addressable or (isinstance(value, jax.Array) and not value.is_fully_addressable):
    return jax.device_put(value, sharding)
  host = np.asarray(value)
  return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def shard_model(model: nnx.Module, mesh: Mesh | None) -> nnx.Module:
  """Places every variable of ``model`` on ``mesh`` following its partition metadata (None / empty: as it is)."""
  mesh = as_mesh(mesh)
  if mesh is None:
    return model
  for path, var in nnx.iter_graph(model):
    if isinstance(var, nnx.Variable) and hasattr(var[...], "shape"):
      value = var[...]
      var.set_value(place(value, variable_placement(path_str(path), var, mesh)))
  return model


def commit_model(model: nnx.Module) -> nnx.Module:
  """Pins every array of ``model`` to where it already is, in place (no copy, no move).

  JAX compiles a program once per placement of its inputs, and "not pinned" (a freshly initialized
  array) is another placement than "pinned to device 0" (what a jitted step returns). Trainers and
  samplers pin their model first, so the programs they compile before a training step are the ones
  they use after it (a GRPO rollout, a DPO reference pass, ``generate`` after ``fit``).
  """
  for _, var in nnx.iter_graph(model):
    if isinstance(var, nnx.Variable):
      value = var.get_value()
      if isinstance(value, jax.Array) and not isinstance(value, jax.core.Tracer) and not value.committed:
        var.set_value(jax.device_put(value, value.sharding))
  return model


def module_mesh(module: nnx.Module | None) -> Mesh | None:
  """The mesh ``module``'s parameters live on (None: no module, or not placed on a mesh).

  The one place that answers "which mesh is this model on" for trainers, the RL
  cluster and the facade.
  """
  if module is None:
    return None
  for leaf in jax.tree.leaves(nnx.state(module, nnx.Param)):
    sharding = getattr(leaf, "sharding", None)
    if isinstance(sharding, NamedSharding):
      return sharding.mesh
  return None
