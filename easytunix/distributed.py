"""Multi-host training on JAX's own distributed runtime.

Run the same script once per host (one process per host, each driving its local
accelerators), and call :func:`initialize` at its top, before anything else
uses JAX::

    import easytunix.distributed

    easytunix.distributed.initialize()  # SLURM, Cloud TPU, Kubernetes, Open MPI: detected
    # or explicitly: initialize("10.0.0.1:1234", num_processes=2, process_id=0)

After that, ``jax.devices()`` lists the devices of every process, a mesh built
from them spans all hosts, and the facade's ``fit`` trains on it unchanged:
every process passes the same data, each feeds its devices' rows of every
global batch, Orbax checkpoints are written and restored by all processes
together, and the files easytunix writes itself (the run record, logs,
progress output) come from process 0 only. See ``guides/multi_host.md``.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import inspect
import logging
import os
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

logger = logging.getLogger(__name__)

# The jax option that picks the cross-process collectives of the CPU backend.
CPU_COLLECTIVES_OPTION = "jax_cpu_collectives_implementation"
CPU_COLLECTIVES = ("gloo", "mpi")

# Variables that tell jax.distributed.initialize() where it runs when it is called without arguments.
_SCHEDULER_VARIABLES = {
    "SLURM (srun)": ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID"),
    "Open MPI": ("OMPI_MCA_orte_hnp_uri",),
    "Kubernetes": ("KUBERNETES_SERVICE_HOST",),
}
_TPU_VARIABLES = ("TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES", "MEGASCALE_COORDINATOR_ADDRESS")


@dataclasses.dataclass(frozen=True)
class _Settings:
  """What the call that started the runtime asked for (None: left to detection)."""

  coordinator_address: str | None
  num_processes: int | None
  process_id: int | None
  local_device_ids: tuple[int, ...] | None
  cpu_collectives: str | None
  options: tuple[tuple[str, Any], ...]
  single: bool = False  # a one-process run: nothing was started


_started: _Settings | None = None


def _is_int(value: Any) -> bool:
  return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def detected_scheduler() -> str | None:
  """The cluster environment ``jax.distributed.initialize()`` can read its settings from, or None.

  Looks at environment variables (and TPU device files) only: it contacts nothing.
  """
  for name, variables in _SCHEDULER_VARIABLES.items():
    if all(v in os.environ for v in variables):
      return name
  if any(v in os.environ for v in _TPU_VARIABLES) or glob.glob("/dev/accel[0-9]*") or glob.glob("/dev/vfio/[0-9]*"):
    return "Cloud TPU"
  return None


def _check_arguments(coordinator_address: Any, num_processes: Any, process_id: Any, local_device_ids: Any,
                     cpu_collectives: Any, options: dict[str, Any]) -> tuple[int, ...] | None:
  """Raises a ValueError/TypeError for bad arguments; returns local_device_ids as a tuple (or None)."""
  if coordinator_address is not None:
    if not isinstance(coordinator_address, str):
      raise TypeError(f"coordinator_address must be a 'host:port' string, got {coordinator_address!r}.")
    host, _, port = coordinator_address.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
      raise ValueError(
          f"coordinator_address must be 'host:port' (process 0's address and a free port that every process "
          f"can reach, e.g. '10.0.0.1:1234'), got {coordinator_address!r}."
      )
  if num_processes is not None and (not _is_int(num_processes) or num_processes < 1):
    raise ValueError(f"num_processes must be a positive int (the number of processes in the job), got {num_processes!r}.")
  if process_id is not None and (not _is_int(process_id) or process_id < 0):
    raise ValueError(f"process_id must be an int >= 0 (this process's rank), got {process_id!r}.")
  if process_id is not None and num_processes is not None and process_id >= num_processes:
    raise ValueError(
        f"process_id={process_id} is out of range for num_processes={num_processes}: process ids run from 0 "
        f"to {num_processes - 1}, one per process."
    )
  ids = None
  if local_device_ids is not None:
    ids = (local_device_ids,) if _is_int(local_device_ids) else local_device_ids
    if isinstance(ids, (str, bytes)) or not isinstance(ids, Sequence) or not ids:
      raise TypeError(f"local_device_ids must be an int or a non-empty sequence of ints, got {local_device_ids!r}.")
    if not all(_is_int(i) and i >= 0 for i in ids) or len(set(ids)) != len(ids):
      raise ValueError(f"local_device_ids must be distinct ints >= 0, got {local_device_ids!r}.")
    ids = tuple(int(i) for i in ids)
  if cpu_collectives is not None and cpu_collectives not in CPU_COLLECTIVES:
    raise ValueError(f"cpu_collectives must be one of {CPU_COLLECTIVES} or None, got {cpu_collectives!r}.")
  known = set(inspect.signature(jax.distributed.initialize).parameters) - {
      "coordinator_address", "num_processes", "process_id", "local_device_ids"}
  unknown = sorted(set(options) - known)
  if unknown:
    raise TypeError(
        f"initialize() got unknown option(s) {unknown}; the extra keyword arguments go to "
        f"jax.distributed.initialize, which takes {sorted(known)}."
    )
  detection = options.get("cluster_detection_method") not in (None, "deactivate") or detected_scheduler()
  coordinator = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
  if num_processes is not None and num_processes > 1 and coordinator is None and not detection:
    raise ValueError(
        f"num_processes={num_processes} needs coordinator_address: the 'host:port' of process 0, the same on "
        "every process (or set JAX_COORDINATOR_ADDRESS). Under a scheduler JAX reads (SLURM srun, Cloud TPU, "
        "Kubernetes, Open MPI), call initialize() with no arguments instead; none was detected here."
    )
  if process_id is not None and num_processes is None and not detection:
    raise ValueError(
        f"process_id={process_id} was given without num_processes: pass both (and coordinator_address), or "
        "neither under a scheduler JAX detects."
    )
  return ids


def _current_cpu_collectives() -> str | None:
  try:
    return getattr(jax.config, CPU_COLLECTIVES_OPTION)
  except AttributeError:
    return None


def _select_cpu_collectives(cpu_collectives: str | None) -> None:
  """Cross-process collectives for the CPU backend (the CPU client only; accelerators keep theirs)."""
  try:
    current = getattr(jax.config, CPU_COLLECTIVES_OPTION)
  except AttributeError:
    if cpu_collectives is not None:
      raise ValueError(
          f"This jax ({jax.__version__}) has no {CPU_COLLECTIVES_OPTION!r} option, so cpu_collectives="
          f"{cpu_collectives!r} cannot be applied. Leave cpu_collectives=None."
      ) from None
    return
  wanted = cpu_collectives or current or "gloo"  # keep a choice made through jax's flag or environment
  if wanted != current:
    jax.config.update(CPU_COLLECTIVES_OPTION, wanted)


def _active_coordinator() -> str | None:
  # jax keeps the address it connected to on its (private) global state; None if that changes.
  try:
    from jax._src import distributed as jax_distributed

    return jax_distributed.global_state.coordinator_address
  except (ImportError, AttributeError):
    return None


def _differences(asked: _Settings) -> list[str]:
  """How ``asked`` differs from the running runtime (only what ``asked`` sets is compared)."""
  started = _started
  actual = {
      "coordinator_address": _active_coordinator() or (started and started.coordinator_address),
      "num_processes": jax.process_count(),
      "process_id": jax.process_index(),
      "local_device_ids": started.local_device_ids if started else None,
      "cpu_collectives": _current_cpu_collectives(),
  }
  out = []
  for name, value in actual.items():
    want = getattr(asked, name)
    if want is not None and value is not None and want != value:
      out.append(f"{name}={want!r} (running with {value!r})")
  if started is not None:
    before = dict(started.options)
    for key, value in asked.options:
      if before.get(key, value) != value:
        out.append(f"{key}={value!r} (running with {before[key]!r})")
  return out


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    local_device_ids: int | Sequence[int] | None = None,
    *,
    cpu_collectives: str | None = None,
    **kwargs: Any,
) -> None:
  """Starts JAX's distributed runtime for this process (call it first, on every process).

  With no arguments JAX reads the settings from the cluster environment
  (SLURM ``srun``, Cloud TPU pods, Kubernetes/GKE, Open MPI); where none is
  found (a laptop, a single host), or with ``num_processes=1``, it is a
  single-process run and nothing is started, so the same script runs anywhere.
  Otherwise give all three of ``coordinator_address``, ``num_processes`` and
  ``process_id``. A second call with the same settings does nothing.

  Args:
    coordinator_address: ``"host:port"`` of process 0, reachable from every process; the same everywhere.
    num_processes: processes in the job (usually one per host).
    process_id: this process's rank, ``0 <= process_id < num_processes``.
    local_device_ids: restrict this process to these local accelerators (default: JAX's choice).
    cpu_collectives: cross-process collectives of the CPU backend, "gloo" or "mpi"
      (None: keep the one set through JAX's flag, else "gloo").
    **kwargs: passed to ``jax.distributed.initialize`` (e.g. ``initialization_timeout``,
      ``cluster_detection_method``, ``coordinator_bind_address``).

  Raises:
    ValueError / TypeError: bad arguments (checked before anything starts).
    RuntimeError: already initialized with other settings, or JAX was used before this call.
  """
  global _started
  ids = _check_arguments(coordinator_address, num_processes, process_id, local_device_ids, cpu_collectives, kwargs)
  asked = _Settings(coordinator_address, num_processes, process_id, ids, cpu_collectives,
                    tuple(sorted(kwargs.items())))
  if _started is not None or jax.distributed.is_initialized():
    differences = _differences(asked)
    if differences:
      raise RuntimeError(
          "easytunix.distributed.initialize() was already called in this process with other settings; JAX's "
          f"distributed runtime starts once per process. This call asks for {', '.join(differences)}. "
          "Call it once, at the top of the script, with the same settings on every call."
      )
    return
  automatic = (coordinator_address is None and num_processes is None and process_id is None
               and not os.environ.get("JAX_COORDINATOR_ADDRESS")
               and kwargs.get("cluster_detection_method") in (None, "deactivate"))
  if num_processes == 1 or (automatic and detected_scheduler() is None):
    # One process needs no coordination; the same script then also runs on a laptop.
    logger.info("easytunix.distributed.initialize(): a single-process run (%s); nothing to start.",
                "num_processes=1" if num_processes == 1 else "no cluster environment detected")
    _started = dataclasses.replace(asked, single=True)
    return
  _select_cpu_collectives(cpu_collectives)
  try:
    jax.distributed.initialize(coordinator_address, num_processes, process_id, list(ids) if ids else None, **kwargs)
  except RuntimeError as err:
    raise RuntimeError(
        f"jax.distributed.initialize failed: {err} Call easytunix.distributed.initialize() at the top of the "
        "script, before anything uses JAX (building a model, jax.devices(), any computation)."
    ) from err
  except ValueError as err:
    raise ValueError(
        f"jax.distributed.initialize could not settle the job's settings ({err}). Under SLURM (srun), Cloud "
        "TPU, Kubernetes (with jax[k8s] installed) or Open MPI call initialize() with no arguments; elsewhere "
        "pass coordinator_address ('host:port' of process 0), num_processes and process_id on every process. "
        "For a one-process run, call initialize(num_processes=1) or do not call it."
    ) from err
  _started = asked


def is_initialized() -> bool:
  """Whether JAX's distributed runtime runs in this process."""
  return jax.distributed.is_initialized()


def process_index() -> int:
  """This process's rank (0 in a single-process run)."""
  return jax.process_index()


def process_count() -> int:
  """How many processes the job has (1 in a single-process run)."""
  return jax.process_count()


def is_main_process() -> bool:
  """Whether this is process 0, the one that writes logs, run records and exports."""
  return jax.process_index() == 0


def shutdown() -> None:
  """Stops the distributed runtime (nothing when it is not running).

  JAX cannot start it again in the same process: this is for the end of a script.
  """
  global _started
  jax.distributed.shutdown()
  _started = None


def barrier(name: str) -> None:
  """Waits until every process reached ``barrier(name)``; nothing in a single-process run.

  Every process must call it with the same ``name``, in the same order.
  """
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(name)


def check_same_on_all_processes(value: str, what: str) -> None:
  """Raises on every process when ``value`` differs between processes (a collective call; nothing on one process).

  Args:
    value: a description (e.g. a data fingerprint) that must be identical everywhere.
    what: what it describes, for the error message.

  Raises:
    ValueError: some process has another value.
  """
  if jax.process_count() <= 1:
    return
  from jax.experimental import multihost_utils

  digest = np.frombuffer(hashlib.sha256(value.encode()).digest(), dtype=np.uint8)
  gathered = np.asarray(multihost_utils.process_allgather(digest))
  differing = sorted(int(i) for i in np.nonzero((gathered != gathered[0]).any(axis=1))[0])
  if differing:
    raise ValueError(
        f"{what} differs between processes: processes {differing} disagree with process 0. Every process "
        "must pass the same data and settings (each one feeds its own devices' rows of every global batch); "
        "do not split the data per host yourself."
    )


__all__ = [
    "barrier",
    "check_same_on_all_processes",
    "detected_scheduler",
    "initialize",
    "is_initialized",
    "is_main_process",
    "process_count",
    "process_index",
    "shutdown",
]
