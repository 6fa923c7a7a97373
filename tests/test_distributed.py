"""Multi-host training with JAX's distributed runtime: two processes on localhost train as one process does.

Two processes with 2 CPU devices each (gloo collectives) join through ``easytunix.distributed.initialize``
and fit a tiny preset with FSDP over all 4 devices through the facade; a third process trains the same
job alone on 4 devices. Their loss curves agree, the two processes resume from their checkpoint and
continue the single process's curve, and the files easytunix writes itself come from process 0 only.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from easytunix import distributed
from easytunix.presets import Qwen3

FIRST, TOTAL = 3, 5  # the two processes train FIRST steps, then resume to TOTAL; the single process runs TOTAL
TIMEOUT = 300  # seconds per phase: a hang (e.g. a process waiting for a peer that died) fails the test
# Different reduction orders across processes (gloo all-reduces vs one process's sums) change float32
# results in the last bits (~1e-7 relative per step, compounding over a few steps); a real mistake (a
# wrong batch split, a lost optimizer state on resume) changes the loss at the 1e-2 level.
RTOL = 1e-5

TEXTS = [f"the {c} {a} sat on the {m} mat." for c in ("red", "big", "old", "shy") for a in ("cat", "dog")
         for m in ("blue", "soft")]
CHILD = f"TEXTS, FIRST = {TEXTS!r}, {FIRST}\n" + textwrap.dedent("""
    import json, sys

    import easytunix

    distributed = easytunix.distributed  # the package's attribute imports the module

    num_processes, process_id, port, steps, root, tag = sys.argv[1:7]
    num_processes, process_id, steps, root = int(num_processes), int(process_id), int(steps), __import__("pathlib").Path(root)
    report = {}
    if num_processes > 1:
      address = f"localhost:{port}"
      distributed.initialize(address, num_processes, process_id)
      distributed.initialize(address, num_processes, process_id)  # the same settings again: nothing happens
      try:
        distributed.initialize(address, num_processes, 1 - process_id)
      except RuntimeError as err:
        report["reinitialize_error"] = str(err)
    import jax
    from jax.sharding import AxisType

    from easytunix import callbacks
    from easytunix.presets import Qwen3

    report.update(process_index=distributed.process_index(), process_count=distributed.process_count(),
                  is_initialized=distributed.is_initialized(), is_main=distributed.is_main_process(),
                  devices=jax.device_count(), local_devices=jax.local_device_count())
    mesh = jax.make_mesh((4,), ("fsdp",), axis_types=(AxisType.Auto,))
    model = Qwen3.from_preset("qwen3_tiny", num_layers=1, mesh=mesh)
    model.compile(trainer="sft", learning_rate=1e-2, max_length=24, checkpoint_dir=str(root / "ckpt"),
                  save_every_n_steps=100, log_dir=str(root / "tensorboard"))
    if num_processes > 1 and steps > FIRST:
      # Each process feeds its own rows of every global batch: different data on one process is an error.
      try:
        model.fit(TEXTS if process_id == 0 else TEXTS[::-1], steps=steps, batch_size=8, verbose=0)
      except ValueError as err:
        report["different_data_error"] = str(err)
    seen, epochs = [], []
    record = callbacks.LambdaCallback(
        on_train_batch_end=lambda batch, logs: seen.append((logs["step"], logs["loss"], logs["grad_norm"])),
        on_epoch_end=lambda epoch, logs: epochs.append((epoch, logs["val_loss"])))
    model.fit(TEXTS, steps=steps, batch_size=8, verbose=1, validation_data=TEXTS[:8],
              callbacks=[record, callbacks.CSVLogger(root / "epochs.csv", append=True)])
    report.update(steps=seen, epochs=epochs)
    (root / f"report-{tag}-{process_id}.json").write_text(json.dumps(report))
""")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _env(devices: int, cache: Path) -> dict[str, str]:
  env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_"))}
  env.update(
      JAX_PLATFORMS="cpu",
      XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
      # One compilation cache for the three processes and both phases: the resumed run reuses the
      # compiled train step (a cache hit skips XLA's compiler, not any of our code).
      JAX_COMPILATION_CACHE_DIR=str(cache),
      JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
      JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
      PYTHONPATH=str(Path(__file__).resolve().parent.parent),
  )
  return env


def _run(jobs: list[tuple[list[str], dict[str, str], str]], logs: Path) -> list[str]:
  """Runs the commands concurrently; returns their stdouts. Kills all and fails when one fails or hangs.

  Output goes to files (not pipes, which a process could fill while we wait on another one).
  """
  started = []
  for cmd, env, name in jobs:
    out, err = logs / f"{name}.out", logs / f"{name}.err"
    with out.open("w") as stdout, err.open("w") as stderr:
      started.append((subprocess.Popen(cmd, env=env, stdout=stdout, stderr=stderr, text=True), name, out, err))
  deadline = time.monotonic() + TIMEOUT
  failed = []
  try:
    for proc, name, _, err in started:
      try:
        proc.wait(timeout=max(deadline - time.monotonic(), 1))
      except subprocess.TimeoutExpired:
        failed.append(f"{name} did not finish within {TIMEOUT}s; its stderr:\n{err.read_text()[-4000:]}")
        break
      if proc.returncode != 0:
        failed.append(f"{name} exited with {proc.returncode}; its stderr:\n{err.read_text()[-4000:]}")
        break
  finally:
    for proc, name, _, err in started:
      if proc.poll() is None:
        proc.kill()
        proc.wait()
        failed.append(f"{name} was stopped; its stderr:\n{err.read_text()[-4000:]}")
  assert not failed, "\n\n".join(failed)
  return [out.read_text() for _, _, out, _ in started]


def _pair(script: Path, root: Path, steps: int, tag: str, cache: Path) -> list[tuple[list[str], dict, str]]:
  port = str(_free_port())
  return [([sys.executable, str(script), "2", str(i), port, str(steps), str(root), tag], _env(2, cache),
           f"{tag}-process-{i}-of-2") for i in range(2)]


def _report(root: Path, tag: str, process: int) -> dict:
  return json.loads((root / f"report-{tag}-{process}.json").read_text())


def _losses(report: dict) -> list[float]:
  return [loss for _, loss, _ in report["steps"]]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """Phase 1: two processes train FIRST steps while one process trains TOTAL; phase 2: the two resume."""
  tmp = tmp_path_factory.mktemp("distributed")
  script, cache, pair, single = tmp / "child.py", tmp / "xla_cache", tmp / "pair", tmp / "single"
  script.write_text(CHILD)
  pair.mkdir()
  single.mkdir()
  start = time.perf_counter()
  first_out = _run(_pair(script, pair, FIRST, "first", cache)
                   + [([sys.executable, str(script), "1", "0", "0", str(TOTAL), str(single), "single"],
                       _env(4, cache), "single-process")], tmp)
  first_seconds = time.perf_counter() - start
  resumed_out = _run(_pair(script, pair, TOTAL, "resumed", cache), tmp)
  print(f"two processes + single process: {first_seconds:.1f}s; resumed pair: "
        f"{time.perf_counter() - start - first_seconds:.1f}s")
  return dict(pair=pair, single=single, first_out=first_out, resumed_out=resumed_out)


def test_two_processes_form_one_job(runs):
  for tag in ("first", "resumed"):
    for i in range(2):
      report = _report(runs["pair"], tag, i)
      assert report["process_index"] == i and report["process_count"] == 2 and report["is_initialized"]
      assert report["is_main"] == (i == 0)
      assert (report["devices"], report["local_devices"]) == (4, 2)
      assert "already called" in report["reinitialize_error"], report
  single = _report(runs["single"], "single", 0)
  assert (single["process_count"], single["is_initialized"], single["devices"]) == (1, False, 4)


def test_same_loss_curve_as_one_process(runs):
  first = [_report(runs["pair"], "first", i) for i in range(2)]
  single = _report(runs["single"], "single", 0)
  assert [s for s, _, _ in first[0]["steps"]] == list(range(1, FIRST + 1))
  assert first[0]["steps"] == first[1]["steps"]  # the processes see the same replicated metrics
  reference = single["steps"][:FIRST]
  assert _losses(first[0]) == pytest.approx([loss for _, loss, _ in reference], rel=RTOL)
  assert [g for _, _, g in first[0]["steps"]] == pytest.approx([g for _, _, g in reference], rel=RTOL)
  assert _losses(single)[-1] < _losses(single)[0] - 0.5  # it learns: the comparison is not between constants
  # Evaluation across processes too: the validation loss after epoch 0 (step 2).
  assert tuple(first[0]["epochs"][0]) == (0, pytest.approx(single["epochs"][0][1], rel=RTOL))


def test_resume_continues_the_single_process_curve(runs):
  resumed = [_report(runs["pair"], "resumed", i) for i in range(2)]
  single = _report(runs["single"], "single", 0)
  # They restored step FIRST from the checkpoint and trained only the steps after it.
  assert [s for s, _, _ in resumed[0]["steps"]] == list(range(FIRST + 1, TOTAL + 1))
  assert resumed[0]["steps"] == resumed[1]["steps"]
  assert _losses(resumed[0]) == pytest.approx(_losses(single)[FIRST:], rel=RTOL)
  # The resumed run goes on in epoch 1 (it ends at step 4) and ends epoch 2 at step 5, as the single one.
  assert [e for e, _ in resumed[0]["epochs"]] == [e for e, _ in single["epochs"][1:]] == [1, 2]
  assert [v for _, v in resumed[0]["epochs"]] == pytest.approx([v for _, v in single["epochs"][1:]], rel=RTOL)
  assert sorted(int(p.name) for p in (runs["pair"] / "ckpt").iterdir() if p.name.isdigit()) == [FIRST, TOTAL]


def test_different_data_on_one_process_is_an_error_on_both(runs):
  for i in range(2):
    message = _report(runs["pair"], "resumed", i)["different_data_error"]
    assert "differs between processes" in message and "[1]" in message, message


_GLOO_WORDS = frozenset("Rank is connected to peer ranks. Expected number of ranks :".split())


def test_only_process_0_writes_files_and_output(runs):
  pair = runs["pair"]
  assert json.loads((pair / "ckpt" / "easytunix_run.json").read_text())["data"]["count"] == 16
  events = [p for p in (pair / "tensorboard").rglob("*") if p.is_file()]
  assert len(events) == 2, events  # one event file per run (first, resumed), not one per process
  # One row per epoch each run ended (2 batches an epoch: the first run ends epochs 0 and 1, the resumed
  # run goes on in epoch 1 and ends it and epoch 2), not one per process.
  rows = (pair / "epochs.csv").read_text().splitlines()
  assert rows[0].startswith("epoch,") and [r.split(",")[0] for r in rows[1:]] == ["0", "1", "1", "2"], rows
  for out in (runs["first_out"], runs["resumed_out"]):
    assert "effective batch" in out[0] and "Epoch" in out[0], out[0]  # the banner and epoch lines
    # Process 1 prints nothing of ours. gloo's C++ library announces its connections on every process, from
    # several threads at once, so its messages can interleave mid-line ("[Gloo] Rank 2[Gloo] Rank 3 is ...");
    # every word left must be one of theirs.
    leftover = [w for w in out[1].replace("[Gloo]", " ").split() if w not in _GLOO_WORDS and not w.isdigit()]
    assert leftover == [], out[1]


def test_initialize_checks_its_arguments_before_starting(monkeypatch):
  monkeypatch.setattr(distributed, "_started", None)
  for variable in ("JAX_COORDINATOR_ADDRESS", "SLURM_JOB_ID", "OMPI_MCA_orte_hnp_uri", "KUBERNETES_SERVICE_HOST",
                   "TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES", "MEGASCALE_COORDINATOR_ADDRESS"):
    monkeypatch.delenv(variable, raising=False)
  cases = [
      (dict(coordinator_address="localhost:1234", num_processes=2, process_id=2), ValueError, "out of range"),
      (dict(coordinator_address="localhost:1234", num_processes=2, process_id=-1), ValueError, "process_id"),
      (dict(coordinator_address="localhost:1234", num_processes=0, process_id=0), ValueError, "num_processes"),
      (dict(coordinator_address="localhost:1234", num_processes=2.0, process_id=0), ValueError, "num_processes"),
      (dict(num_processes=2, process_id=0), ValueError, "needs coordinator_address"),
      (dict(process_id=1), ValueError, "without num_processes"),
      (dict(coordinator_address="localhost", num_processes=2, process_id=0), ValueError, "'host:port'"),
      (dict(coordinator_address="localhost:99999", num_processes=2, process_id=0), ValueError, "'host:port'"),
      (dict(coordinator_address=1234, num_processes=2, process_id=0), TypeError, "'host:port'"),
      (dict(local_device_ids=[0, 0]), ValueError, "distinct"),
      (dict(local_device_ids="0"), TypeError, "local_device_ids"),
      (dict(cpu_collectives="nccl"), ValueError, "cpu_collectives"),
      (dict(initialisation_timeout=5), TypeError, "unknown option"),
  ]
  for kwargs, error, words in cases:
    with pytest.raises(error, match=words):
      distributed.initialize(**kwargs)
  assert distributed._started is None and not distributed.is_initialized()


def test_one_process_starts_nothing(monkeypatch):
  """With no cluster around (or num_processes=1) initialize() is a no-op, so one script runs anywhere."""
  monkeypatch.setattr(distributed, "_started", None)
  for variable in ("JAX_COORDINATOR_ADDRESS", "SLURM_JOB_ID", "OMPI_MCA_orte_hnp_uri", "KUBERNETES_SERVICE_HOST",
                   "TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES", "MEGASCALE_COORDINATOR_ADDRESS"):
    monkeypatch.delenv(variable, raising=False)
  if distributed.detected_scheduler() is not None:  # e.g. TPU device files on a TPU VM
    monkeypatch.setattr(distributed, "detected_scheduler", lambda: None)
  distributed.initialize()
  distributed.initialize(num_processes=1)
  assert not distributed.is_initialized() and distributed.process_count() == 1 and distributed.is_main_process()
  with pytest.raises(RuntimeError, match="already called"):
    distributed.initialize("localhost:1234", num_processes=2, process_id=0)
  distributed.barrier("single-process")  # a no-op with one process
  distributed.check_same_on_all_processes("anything", "nothing")


def test_one_process_restores_the_job_and_its_weights_match(runs):
  """The export path of the guide: one process (no mesh) restores what the two processes saved."""

  def restored(root: Path) -> list[np.ndarray]:
    model = Qwen3.from_preset("qwen3_tiny", num_layers=1)
    model.compile(trainer="sft", learning_rate=1e-2, max_length=24, checkpoint_dir=str(root / "ckpt"),
                  save_every_n_steps=100)
    with pytest.warns(UserWarning, match="already finished"):
      model.fit(TEXTS, steps=TOTAL, batch_size=8, verbose=0)
    return [np.asarray(x) for x in jax.tree.leaves(nnx.state(model, nnx.Param))]

  pair, single = restored(runs["pair"]), restored(runs["single"])
  fresh = [np.asarray(x) for x in jax.tree.leaves(nnx.state(Qwen3.from_preset("qwen3_tiny", num_layers=1), nnx.Param))]
  assert max(float(np.abs(a - b).max()) for a, b in zip(pair, fresh)) > 1e-2  # trained weights were restored
  # Round-off only (see RTOL), with one twist: Adam divides each update by sqrt(v) + eps, so where a
  # gradient is almost zero the round-off of the gradient shows up in the update several orders larger
  # (a few of 32k elements differ by ~5e-6). Training moved the weights by more than 1e-2.
  assert max(float(np.abs(a - b).max()) for a, b in zip(pair, single)) < 1e-4
