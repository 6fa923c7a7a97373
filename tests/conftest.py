"""Shared test setup: 8 CPU devices for sharding tests, and shared fixtures."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# 8 CPU devices for the sharding tests; XLA:CPU's memory-aware scheduler, without which remat saves no
# memory on CPU (see easytunix.models.base.warn_if_cpu_scheduler_defeats_remat; the remat test checks it).
# LLVM without its optimisation passes: XLA's HLO passes, hence every program, its buffers and its memory
# figures, are the same; only the machine code of the fused loops is less tuned. Most of the suite's time is
# compiling small programs: tests/test_grpo.py + test_facade.py took 112 -> 83 s (user 152 -> 99 s), and
# the real-weight tests, whose matmuls run in XLA's runtime library either way, 149 -> 144 s.
_FLAGS = (
    "--xla_force_host_platform_device_count=8",
    "--xla_cpu_enable_concurrency_optimized_scheduler=false",
    "--xla_backend_optimization_level=0",
    "--xla_llvm_disable_expensive_passes=true",
)
for _flag in _FLAGS:
  if _flag.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):  # a value set by the caller wins
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()

import shutil  # noqa: E402
import tempfile  # noqa: E402

import pytest  # noqa: E402

from tests import hf_reference  # noqa: E402

# One XLA compilation cache per test run, shared by the xdist workers (they inherit the controller's
# environment): many tests compile the same small programs (a tiny preset's train step, its sampler), and
# a hit skips XLA's compiler, not our tracing, so every test still runs our code. The cache starts empty in
# every run and is removed at its end: nothing carries over from an earlier run. Every program is cached, the
# small eager ones too: XLA compiles take half of the suite's worker time (3,981 compiles, 1,082 of 2,198 s).
_CACHE_ENV = "EASYTUNIX_TEST_COMPILATION_CACHE"


def pytest_configure(config):
  if not hasattr(config, "workerinput") and _CACHE_ENV not in os.environ:
    os.environ[_CACHE_ENV] = tempfile.mkdtemp(prefix="easytunix-test-xla-cache-")
    config._easytunix_cache_owner = True  # noqa: SLF001
  import jax

  jax.config.update("jax_compilation_cache_dir", os.environ[_CACHE_ENV])
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def pytest_unconfigure(config):
  if getattr(config, "_easytunix_cache_owner", False):
    shutil.rmtree(os.environ.pop(_CACHE_ENV), ignore_errors=True)


@pytest.fixture(scope="session")
def hf_tiny(tmp_path_factory):
  """Tiny random Hugging Face checkpoints of every architecture, saved once per session.

  Returns a callable ``name -> (folder, torch_model)`` that builds lazily.
  """
  root = tmp_path_factory.mktemp("hf_tiny")
  cache = {}

  def get(name):
    if name not in cache:
      cache[name] = hf_reference.build_tiny(name, root / name)
    return cache[name]

  return get


@pytest.fixture
def vllm_installed():
  """Skips a test when vLLM is not installed, except under CI (CI=true), which installs it
  (``easytunix setup-vllm``): there a missing vLLM fails the test."""
  from easytunix.generate.vllm_sampler import import_vllm

  try:
    import_vllm()
  except ImportError as err:
    if os.environ.get("CI"):
      raise
    pytest.skip(str(err))


# Rough cost in seconds of the slowest units of work (a test file, or a guide's class), from
# `pytest --durations`. `make test` runs `-n 2 --dist loadscope --no-loadscope-reorder`: xdist hands out
# units in collection order, one at a time, so the longest go first and the short ones fill the gaps at
# the end (longest-processing-time-first scheduling). Only the order changes; every test still runs.
_SLOW_UNITS = {  # measured in a quiet `-n 2` run (sum of the unit's test durations, seconds)
    "tests/test_vllm_sampler.py": 137,
    "tests/test_grpo_real.py": 108,
    "tests/test_grpo.py": 97,
    "tests/test_facade.py": 87,
    "tests/test_long_context.py": 77,
    "tests/test_sampler.py": 77,
    "tests/test_sft_trainer.py": 65,
    "tests/test_guides.py::TestGuide_real_weights": 62,
    "tests/test_sampler_real.py": 57,
    "tests/test_dpo_real.py": 56,
    "tests/test_sft_real.py": 54,
    "tests/test_distill_trainer.py": 53,
    "tests/test_trainer_harness.py": 53,
    "tests/test_guides.py::TestGuide_grpo": 51,
    "tests/test_dpo.py": 46,
    "tests/test_distill_real.py": 40,
    "tests/test_distributed.py": 40,
    "tests/test_models_real.py": 38,
    "tests/test_tunix_calling_convention.py": 37,
    "tests/test_guides.py::TestGuide_getting_started": 34,
    "tests/test_facade_resume.py": 33,
    "tests/test_distill_strategies.py": 32,
    "tests/test_dpo_learning.py": 30,
    "tests/test_guides.py::TestGuide_long_sequences": 30,
    "tests/test_guides.py::TestGuide_vllm": 29,
    "tests/test_cli.py": 28,
    "tests/test_qlora.py": 26,
    "tests/test_guides.py::TestGuide_distillation": 25,
    "tests/test_real_models_convert.py": 25,
}


def _unit(nodeid: str) -> str:
  parts = nodeid.split("::")
  return "::".join(parts[:2]) if len(parts) > 2 else parts[0]


def pytest_collection_modifyitems(config, items):
  import jax

  if jax.device_count() < 8:  # e.g. JAX_PLATFORMS=cuda on one GPU
    skip = pytest.mark.skip(reason=f"needs 8 devices, {jax.device_count()} here ({jax.default_backend()})")
    for item in items:
      if item.get_closest_marker("multi_device"):
        item.add_marker(skip)
  order = {id(item): i for i, item in enumerate(items)}
  items.sort(key=lambda item: (-_SLOW_UNITS.get(_unit(item.nodeid), 0), order[id(item)]))
