"""The heap trim after XLA compilations (easytunix.host_memory)."""

import jax
import jax.numpy as jnp
import pytest

from easytunix import host_memory


def test_trims_after_each_compilation_not_after_cached_calls(monkeypatch):
  assert host_memory.release_memory_after_compiles() is True  # glibc (the CI machine)
  seven, nine = jax.block_until_ready((jnp.ones((7,)), jnp.ones((9,))))
  monkeypatch.setattr(host_memory, "MIN_COMPILE_SECONDS", 0.0)  # these programs compile in milliseconds
  calls = []
  monkeypatch.setattr(host_memory, "_trim", lambda pad: calls.append(pad) or 1)
  f = jax.jit(lambda x: jnp.sin(x) * 3.0 + 0.25)  # a new program: compiled on its first call
  f(seven).block_until_ready()
  assert calls == [0]
  f(seven).block_until_ready()  # cached: no compilation, no trim
  assert calls == [0]
  f(nine).block_until_ready()  # a new shape compiles again
  assert calls == [0, 0]


def test_installs_one_listener_however_often_it_is_called(monkeypatch):
  registered = []
  monkeypatch.setattr(host_memory, "_installed", False)
  monkeypatch.setattr(host_memory, "_trim", None)
  monkeypatch.setattr(jax.monitoring, "register_event_duration_secs_listener", registered.append)
  assert host_memory.release_memory_after_compiles() is True
  assert host_memory.release_memory_after_compiles() is True
  assert registered == [host_memory._after_event]
  host_memory._after_event("/jax/some/other_event", 1.0)  # only compilations trim
  calls = []
  monkeypatch.setattr(host_memory, "_trim", lambda pad: calls.append(pad) or 1)
  host_memory._after_event("/jax/some/other_event", 1.0)
  host_memory._after_event(host_memory.COMPILE_EVENT, 1.0, fun_name="f")
  assert calls == [0]
  host_memory._after_event(host_memory.COMPILE_EVENT, host_memory.MIN_COMPILE_SECONDS / 2, fun_name="g")
  assert calls == [0]  # a short compilation leaves too little behind to be worth a trim


def test_sampler_and_trainer_turn_it_on(monkeypatch):
  import optax
  from flax import nnx

  from easytunix.generate import CacheConfig, Sampler
  from easytunix.generate import sampler as sampler_lib
  from easytunix.models.llama3.model import Llama3, ModelConfig
  from easytunix.sft import peft_trainer
  from easytunix.sft.peft_trainer import PeftTrainer, TrainingConfig

  installs = []
  record = lambda: installs.append(1) or True  # noqa: E731
  monkeypatch.setattr(sampler_lib, "release_memory_after_compiles", record)
  monkeypatch.setattr(peft_trainer, "release_memory_after_compiles", record)
  model = Llama3(ModelConfig.tiny(), rngs=nnx.Rngs(0))
  Sampler(model, None, CacheConfig.for_model(model, cache_size=16))
  assert installs == [1]
  PeftTrainer(model, optax.sgd(0.1), TrainingConfig(max_steps=1))
  assert installs == [1, 1]


@pytest.mark.parametrize("value", ["0", "off"])
def test_environment_turns_it_off(monkeypatch, value):
  monkeypatch.setenv(host_memory.ENV_DISABLE, value)
  monkeypatch.setattr(host_memory, "_installed", False)
  monkeypatch.setattr(host_memory, "_trim", None)
  registered = []
  monkeypatch.setattr(jax.monitoring, "register_event_duration_secs_listener", registered.append)
  assert host_memory.release_memory_after_compiles() is False
  assert registered == []
  calls = []
  monkeypatch.setattr(host_memory, "_malloc_trim", lambda: calls.append(1))
  assert host_memory.release_memory_after_compiles() is False  # decided once
  assert calls == []
