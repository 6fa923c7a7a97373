"""Shared test setup: 8 CPU devices for sharding tests, and shared fixtures."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flag = "--xla_force_host_platform_device_count=8"
if _flag not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()

import pytest  # noqa: E402

from tests import hf_reference  # noqa: E402


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
