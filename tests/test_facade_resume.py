"""Rerunning a killed facade ``fit`` finishes the same job: the same final weights, at most one save lost.

One chain of child processes trains ``fit(steps=TOTAL, checkpoint_dir=...)``; each is SIGKILLed (by itself,
from a callback or from inside a checkpoint save) and the next reruns the very same command. The test
process then reruns it once more to finish, and compares with an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from easytunix import callbacks
from easytunix.presets import Qwen3
from easytunix.presets.task import facade_state
from easytunix.sft.peft_trainer import _find_hyperparam

TOTAL, SAVE_EVERY = 12, 2
TEXTS = [f"the {w} cat sat on the {v} mat" for w in ("red", "big", "old", "shy") for v in ("blue", "soft")]
# (how the child dies, at which step): after the step's callback, or inside the save of that step.
KILLS = [("callback", 3), ("callback", 6), ("save", 8), ("callback", 11)]

CHILD = textwrap.dedent("""
    import os, signal, sys
    from easytunix import callbacks
    from easytunix.presets import Qwen3
    from easytunix.presets.task import facade_state
    from easytunix.sft import checkpoint

    ckpt, log, how, kill_at = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    texts = {texts!r}

    def record(batch, logs):
      with open(log, "a") as f:
        f.write(f"{{os.getpid()}} {{logs['step']}}\\n")
      if how == "callback" and logs["step"] == kill_at:
        # Real steps outlast a checkpoint write; these take milliseconds, so let the last save land first.
        facade_state(model)["run"].trainer.checkpoint_manager.wait_until_finished()
        os.kill(os.getpid(), signal.SIGKILL)

    original = checkpoint.CheckpointManager.save

    def save(self, step, *args, **kwargs):
      saved = original(self, step, *args, **kwargs)
      if how == "save" and step == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)  # the asynchronous write is still in flight
      return saved

    checkpoint.CheckpointManager.save = save
    model = Qwen3.from_preset("qwen3_tiny", num_layers=1)
    model.compile(trainer="sft", learning_rate=1e-2, max_length=24, checkpoint_dir=ckpt,
                  save_every_n_steps={save_every}, keep_checkpoints=2)
    model.fit(texts, steps={total}, batch_size=4, verbose=0,
              callbacks=[callbacks.LambdaCallback(on_train_batch_end=record)])
""").format(texts=TEXTS, save_every=SAVE_EVERY, total=TOTAL)


def _job(checkpoint_dir: Path, learning_rate: float = 1e-2):
  model = Qwen3.from_preset("qwen3_tiny", num_layers=1)
  model.compile(trainer="sft", learning_rate=learning_rate, max_length=24, checkpoint_dir=str(checkpoint_dir),
                save_every_n_steps=SAVE_EVERY, keep_checkpoints=2)
  return model


def _params(model) -> list[np.ndarray]:
  return [np.asarray(x) for x in jax.tree.leaves(nnx.state(model, nnx.Param))]


def _max_diff(a, b) -> float:
  return max(float(np.max(np.abs(x - y))) for x, y in zip(a, b))


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
  """Runs the killed children one after another on one checkpoint folder; returns the steps each one took."""
  root = tmp_path_factory.mktemp("resume")
  script, log, ckpt = root / "child.py", root / "steps.log", root / "ckpt"
  script.write_text(CHILD)
  env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(root / "jax_cache"),
         "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "PYTHONPATH": str(Path(__file__).parent.parent)}
  runs = []
  for how, step in KILLS:
    before = log.read_text().splitlines() if log.exists() else []
    proc = subprocess.run([sys.executable, str(script), str(ckpt), str(log), how, str(step)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-3000:]  # SIGKILLed where it was told to die
    taken = [int(line.split()[1]) for line in log.read_text().splitlines()[len(before):]]
    runs.append((how, step, taken))
  return ckpt, runs


def test_kill_and_rerun_ends_with_the_uninterrupted_weights(chain, tmp_path):
  ckpt, runs = chain
  reference = _job(tmp_path / "reference")
  reference.fit(TEXTS, steps=TOTAL, batch_size=4, verbose=0)

  finishing = _job(ckpt)
  seen = []
  finishing.fit(TEXTS, steps=TOTAL, batch_size=4, verbose=0,
                callbacks=[callbacks.LambdaCallback(on_train_batch_end=lambda batch, logs: seen.append(logs["step"]))])
  starts = [taken[0] - 1 for _, _, taken in runs[1:]] + [seen[0] - 1]
  table = []
  for (how, killed, taken), resumed in zip(runs, starts):
    # It died where it was told to: after step `killed`'s callback, or while saving step `killed` (whose
    # callback comes after the save).
    assert taken[-1] == (killed - 1 if how == "save" else killed), runs
    lost = killed - resumed
    table.append((how, killed, resumed, lost))
    assert 0 <= lost <= SAVE_EVERY, table  # at most one save interval is trained again
  assert runs[0][2][0] == 1 and seen[-1] == TOTAL  # nothing trained past the total
  diff = _max_diff(_params(reference), _params(finishing))
  print("kill/resume table (how, killed at, resumed from, steps lost):", table, "final max diff:", diff)
  assert diff <= 1e-6, (table, diff)

  # Rerunning the finished job trains nothing and says so.
  again = _job(ckpt)
  with pytest.warns(UserWarning, match=rf"already finished.*step {TOTAL}"):
    history = again.fit(TEXTS, steps=TOTAL, batch_size=4, verbose=0)
  assert history.history == {}
  assert _max_diff(_params(again), _params(finishing)) == 0.0  # restored, not trained

  # The same finished job resumed with another learning rate and other data: both changes are named, and
  # the new learning rate is the one the restored optimizer state carries.
  again.compile(trainer="sft", learning_rate=2e-2, max_length=24, checkpoint_dir=str(ckpt),
                save_every_n_steps=SAVE_EVERY, keep_checkpoints=2)
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    again.fit(TEXTS[::-1] + ["a new line."], steps=TOTAL, batch_size=4, verbose=0)
  said = " ".join(str(w.message) for w in caught)
  assert "learning_rate was 0.01" in said and "is 0.02 now" in said, said
  assert "training data differs" in said and "now 9 records" in said, said
  trainer = facade_state(again)["run"].trainer
  assert float(_find_hyperparam(trainer.opt_state, "learning_rate")) == pytest.approx(2e-2)
  run = json.loads((ckpt / "easytunix_run.json").read_text())
  assert run["learning_rate"] == 2e-2 and run["data"]["count"] == 9
