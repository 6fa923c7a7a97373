"""easytunix: post-training for LLMs in JAX."""

__version__ = "0.1.0"


def __getattr__(name: str):
  # ``easytunix.distributed`` without importing it (and jax) for every ``import easytunix``.
  if name == "distributed":
    import importlib

    return importlib.import_module("easytunix.distributed")
  raise AttributeError(f"module 'easytunix' has no attribute {name!r}")
