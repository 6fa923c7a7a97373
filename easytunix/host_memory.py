"""Host memory: gives the heap that XLA's compiler frees back to the operating system.

Compiling a program (a train step, a prefill) allocates hundreds of megabytes of
small compiler objects on the C heap. glibc keeps the freed pages for reuse,
but the program then runs out of large, separately mapped buffers that cannot
reuse them: on a CPU the compiler's leftovers and the step's working memory add
up (SmolLM2-135M full fine-tuning: +0.4 GB of peak resident memory). Trimming
the heap right after each compilation, before the program first runs, returns
them. glibc only (``malloc_trim``); elsewhere this does nothing.
"""

from __future__ import annotations

import ctypes
import os
import threading
from typing import Any, Callable

import jax

# The event jax records when a backend compilation has finished (jax._src.dispatch.BACKEND_COMPILE_EVENT).
COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
ENV_DISABLE = "EASYTUNIX_MALLOC_TRIM"  # "0" turns the trimming off
# Compilations shorter than this leave little behind, and a trim costs ~10 ms: a test suite compiles
# thousands of tiny programs (trimming after each cost ~2.5% of its time).
MIN_COMPILE_SECONDS = 0.5

_lock = threading.Lock()
_installed = False
_trim: Callable[[int], int] | None = None


def _malloc_trim() -> Callable[[int], int] | None:
  try:
    fn = ctypes.CDLL(None).malloc_trim  # the process's C library; absent outside glibc
  except (OSError, AttributeError):
    return None
  fn.argtypes = [ctypes.c_size_t]
  fn.restype = ctypes.c_int
  return fn


def _after_event(event: str, duration: float, *args: Any, **kwargs: Any) -> None:
  del args, kwargs
  if event == COMPILE_EVENT and duration >= MIN_COMPILE_SECONDS and _trim is not None:
    _trim(0)


def release_memory_after_compiles() -> bool:
  """Returns the freed C heap to the OS after every XLA compilation (of ``MIN_COMPILE_SECONDS`` or more).

  Idempotent; the trainers and the sampler call it. Off when the environment sets
  ``EASYTUNIX_MALLOC_TRIM=0``.

  Returns:
    Whether trimming is on (False without glibc's ``malloc_trim`` or when turned off).
  """
  global _installed, _trim
  with _lock:
    if _installed:
      return _trim is not None
    _installed = True
    if os.environ.get(ENV_DISABLE, "1").strip().lower() in ("0", "false", "no", "off"):
      return False
    _trim = _malloc_trim()
    if _trim is None:
      return False
    jax.monitoring.register_event_duration_secs_listener(_after_event)
    return True


__all__ = ["COMPILE_EVENT", "MIN_COMPILE_SECONDS", "release_memory_after_compiles"]
