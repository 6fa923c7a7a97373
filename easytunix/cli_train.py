"""``easytunix sft|dpo|distill|grpo``: train a model on your own data file from the command line.

    easytunix sft --model qwen3_tiny --data train.jsonl --steps 100 --out my_model
    easytunix dpo --model smollm2_135m_instruct --data prefs.jsonl --lora-rank 16 --epochs 1 --out tuned
    easytunix grpo --model qwen3_0.6b --data prompts.jsonl --reward rewards.py:correct --steps 200
    easytunix distill --model qwen3_0.6b --teacher qwen3_4b --data texts.jsonl --epochs 2
    easytunix sft --config run.yaml --steps 500      # the file's keys, flags override them

The run writes a preset folder at ``--out`` (``easytunix generate --preset OUT`` and
``from_preset(OUT)`` read it), TensorBoard logs at ``--log-dir`` (default ``OUT/logs``)
and Orbax checkpoints at ``--checkpoint-dir`` (default ``OUT/checkpoints``), so running
the same command again resumes where the last run stopped.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.util
import json
import sys
from pathlib import Path
from typing import Any, Callable

TRAINERS = ("sft", "dpo", "distill", "grpo")


class UsageError(Exception):
  """A mistake in the command, its config file or its data: reported in one line, exit status 2."""


@dataclasses.dataclass(frozen=True)
class Key:
  """One setting, the same in a config file (``learning_rate``) and on the command line (``--learning-rate``)."""

  name: str
  type: Callable[[Any], Any]
  help: str
  default: Any = None
  trainers: tuple[str, ...] = TRAINERS
  repeat: bool = False

  @property
  def flag(self) -> str:
    return "--" + self.name.replace("_", "-")


def _bool(value: Any) -> bool:
  if isinstance(value, bool):
    return value
  text = str(value).strip().lower()
  if text in ("true", "yes", "1", "on"):
    return True
  if text in ("false", "no", "0", "off"):
    return False
  raise ValueError(f"not a boolean: {value!r}")


def _int(value: Any) -> int:
  if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
    raise ValueError(f"not an int: {value!r}")
  return int(value)


def _float(value: Any) -> float:
  if isinstance(value, bool):
    raise ValueError(f"not a number: {value!r}")
  return float(value)  # also "1e-3", which YAML 1.1 reads as a string


KEYS: tuple[Key, ...] = (
    Key("model", str, "a preset name (easytunix presets) or a model folder"),
    Key("data", str, "training data: a .jsonl, .json, .csv or .parquet file of records"),
    Key("eval_data", str, "validation data, scored at the end of every epoch"),
    Key("out", str, "the preset folder to write (default: easytunix_<trainer>)"),
    Key("log_dir", str, "TensorBoard folder (default: OUT/logs)"),
    Key("checkpoint_dir", str, "checkpoint folder; a rerun resumes from it (default: OUT/checkpoints)"),
    Key("epochs", _int, "passes over the data (default 1; not with --steps)"),
    Key("steps", _int, "optimizer steps in all, counting those of earlier runs (not with --epochs)"),
    Key("learning_rate", _float, "peak learning rate", 1e-4),
    Key("batch_size", _int, "examples per batch", 8),
    Key("max_length", _int, "tokens per training row (longer examples are truncated)", 256),
    Key("lora_rank", _int, "train LoRA adapters of this rank instead of all weights"),
    Key("gradient_accumulation_steps", _int, "micro-batches per optimizer step", 1),
    Key("warmup_steps", _int, "learning-rate warm-up steps", 0),
    Key("save_every", _int, "save a checkpoint every this many steps (the last step is always saved)", 100),
    Key("seed", _int, "data order and random-weight initialisation seed", 0),
    Key("dtype", str, "parameter dtype: float32 or bfloat16 (default: the model's)"),
    Key("chat_template", _bool, "render records through the tokenizer's chat template", False),
    Key("beta", _float, "DPO: preference temperature (0.1); GRPO: KL weight (0.04)", None, ("dpo", "grpo")),
    Key("teacher", str, "the teacher preset or folder", None, ("distill",)),
    Key("distill_temperature", _float, "softening temperature of the logit distillation", 2.0, ("distill",)),
    Key("distill_alpha", _float, "weight of the task loss against the distillation loss", 0.5, ("distill",)),
    Key("reward", str, "a reward function as module:function or file.py:function, or the name of one in "
        "easytunix.rl.grpo.rewards (repeatable)", None, ("grpo",), repeat=True),
    Key("num_generations", _int, "completions per prompt", 4, ("grpo",)),
    Key("max_new_tokens", _int, "tokens per completion", 32, ("grpo",)),
)
KEYS_BY_NAME = {k.name: k for k in KEYS}
_METAVARS: dict[Any, str] = {_int: "N", _float: "X", "model": "PRESET_OR_FOLDER", "teacher": "PRESET_OR_FOLDER",
                             "data": "FILE", "eval_data": "FILE", "out": "FOLDER", "log_dir": "DIR",
                             "checkpoint_dir": "DIR", "reward": "MODULE:FUNCTION", "dtype": "DTYPE"}


def add_parsers(sub: argparse._SubParsersAction) -> None:
  """Adds one sub-command per trainer to the ``easytunix`` parser."""
  helps = {"sft": "supervised fine-tuning on text, prompt/completion or messages records",
           "dpo": "preference tuning on prompt/chosen/rejected records",
           "distill": "distil a teacher into the model on text, prompt/completion or messages records",
           "grpo": "reinforcement learning on prompt records with reward functions"}
  for trainer in TRAINERS:
    p = sub.add_parser(trainer, help=helps[trainer], description=helps[trainer] + ". Writes a preset folder at "
                       "--out; rerunning the command resumes from OUT/checkpoints.")
    p.add_argument("--config", default=None, metavar="FILE",
                   help="a YAML (with PyYAML) or JSON file holding these settings; flags override it")
    for key in KEYS:
      if trainer not in key.trainers:
        continue
      shown = f" (default {key.default})" if key.default not in (None, False) else ""
      if key.type is _bool:
        p.add_argument(key.flag, dest=key.name, action=argparse.BooleanOptionalAction, default=None, help=key.help)
      else:
        p.add_argument(key.flag, dest=key.name, default=None, action="append" if key.repeat else "store",
                       metavar=_METAVARS.get(key.name) or _METAVARS.get(key.type, key.name.upper()),
                       help=key.help + shown)


# ------------------------------------------------------------------ settings


def read_config_file(path: str) -> dict[str, Any]:
  """The settings in a YAML or JSON file (YAML needs PyYAML; JSON is YAML too)."""
  file = Path(path).expanduser()
  if not file.is_file():
    raise UsageError(f"--config: no file at {str(file)!r}.")
  text = file.read_text(encoding="utf-8")
  try:
    import yaml
  except ImportError:
    yaml = None
  try:
    values = yaml.safe_load(text) if yaml is not None else json.loads(text)
  except Exception as e:  # yaml.YAMLError / json.JSONDecodeError
    kind = "YAML" if yaml is not None else "JSON (install PyYAML for YAML)"
    raise UsageError(f"--config {file} is not valid {kind}: {' '.join(str(e).split())}") from None
  if values is None:
    return {}
  if not isinstance(values, dict):
    raise UsageError(f"--config {file} must hold a mapping of settings, got a {type(values).__name__}.")
  return values


def resolve_settings(trainer: str, args: argparse.Namespace) -> dict[str, Any]:
  """Defaults, then the config file, then the command line: one checked dict of settings."""
  from_file: dict[str, Any] = {}
  if args.config:
    for raw_name, value in read_config_file(args.config).items():
      name = str(raw_name).replace("-", "_")
      key = KEYS_BY_NAME.get(name)
      if key is None:
        import difflib

        close = difflib.get_close_matches(name, list(KEYS_BY_NAME), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise UsageError(f"--config {args.config}: unknown key {raw_name!r}.{hint} "
                         f"Known keys: {', '.join(KEYS_BY_NAME)}.")
      if trainer not in key.trainers:
        raise UsageError(f"--config {args.config}: {name!r} is a setting of {'/'.join(key.trainers)}, not {trainer}.")
      if key.repeat and not isinstance(value, list):
        value = [value]
      from_file[name] = value
  given = {k.name: getattr(args, k.name) for k in KEYS if getattr(args, k.name, None) is not None}
  if "epochs" in given and "steps" in given:
    raise UsageError("--epochs and --steps are alternatives: give one (steps counts optimizer steps in all).")
  for one, other in (("epochs", "steps"), ("steps", "epochs")):
    if one in given:
      from_file.pop(other, None)  # the command line chose how long to train
  if "epochs" in from_file and "steps" in from_file:
    raise UsageError(f"--config {args.config}: 'epochs' and 'steps' are alternatives: keep one.")
  settings = {k.name: k.default for k in KEYS if trainer in k.trainers}
  settings.update(from_file)
  settings.update(given)
  for name, value in settings.items():
    key = KEYS_BY_NAME[name]
    if value is None:
      continue
    try:
      settings[name] = [key.type(v) for v in value] if key.repeat else key.type(value)
    except (TypeError, ValueError):
      raise UsageError(f"{key.flag} must be {key.type.__name__.strip('_')}, got {value!r}.") from None
  for name in ("epochs", "steps", "batch_size", "max_length", "lora_rank", "gradient_accumulation_steps",
               "save_every", "num_generations", "max_new_tokens"):
    value = settings.get(name)
    if value is not None and value <= 0:
      raise UsageError(f"{KEYS_BY_NAME[name].flag} must be a positive int, got {value}.")
  for name in ("model", "data"):
    if not settings.get(name):
      raise UsageError(f"{KEYS_BY_NAME[name].flag} is required (on the command line or in --config).")
  if trainer == "distill" and not settings.get("teacher"):
    raise UsageError("distill needs --teacher PRESET_OR_FOLDER.")
  if trainer == "grpo" and not settings.get("reward"):
    raise UsageError("grpo needs at least one --reward module:function (e.g. --reward exact_match).")
  if settings["epochs"] is None and settings["steps"] is None:
    settings["epochs"] = 1
  settings["out"] = settings["out"] or f"easytunix_{trainer}"
  return settings


# ------------------------------------------------------------------ pieces


def load_reward(spec: str) -> Callable[..., Any]:
  """A reward function from ``module:function``, ``path/to/file.py:function`` or a name in ``rl.grpo.rewards``."""
  from easytunix.rl.grpo import rewards

  if ":" not in spec:
    fn = getattr(rewards, spec, None)
    if callable(fn) and not spec.startswith("_"):
      return fn
    raise UsageError(f"--reward {spec!r}: expected module:function or file.py:function "
                     f"(or a reward of easytunix.rl.grpo.rewards such as exact_match).")
  module_name, _, attr = spec.rpartition(":")
  if not module_name or not attr:
    raise UsageError(f"--reward {spec!r}: expected module:function or file.py:function.")
  try:
    if module_name.endswith(".py"):
      path = Path(module_name).expanduser()
      if not path.is_file():
        raise UsageError(f"--reward {spec!r}: no file at {str(path)!r}.")
      loader = importlib.util.spec_from_file_location(path.stem, path)
      module = importlib.util.module_from_spec(loader)
      loader.loader.exec_module(module)
    else:
      if str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))  # as `python -m` would: modules beside the data files import
      module = importlib.import_module(module_name)
  except UsageError:
    raise
  except Exception as e:
    raise UsageError(f"--reward {spec!r}: importing {module_name!r} failed: {type(e).__name__}: "
                     f"{' '.join(str(e).split())}") from None
  fn = getattr(module, attr, None)
  if not callable(fn):
    raise UsageError(f"--reward {spec!r}: {module_name!r} has no function {attr!r}.")
  return fn


def load_data(path: str, flag: str) -> list[dict[str, Any]]:
  """The records of a data file, with the flag that named it in every error."""
  from easytunix.presets import data_formats

  file = Path(path).expanduser()
  if not file.is_file():
    raise UsageError(f"{flag}: no file at {str(file)!r}.")
  try:
    records = data_formats.as_records(file, what=f"{flag} {file}")
  except (ValueError, TypeError, ImportError) as e:
    raise UsageError(str(e)) from None
  if not records:
    raise UsageError(f"{flag} {file} holds no records.")
  return records


def latest_checkpoint_step(folder: Path) -> int | None:
  """The newest step folder under a checkpoint directory (what the trainer resumes from), or None."""
  if not folder.is_dir():
    return None
  steps = [int(p.name) for p in folder.iterdir() if p.is_dir() and p.name.isdigit()]
  return max(steps) if steps else None


_RUN_FOLDERS = ("checkpoints", "logs")


def check_out_folder(out: Path) -> None:
  """Refuses an ``--out`` that holds anything but an earlier run's preset, checkpoints and logs."""
  from easytunix.presets.task import PRESET_FILE

  if out.exists() and not out.is_dir():
    raise UsageError(f"--out {out} is a file; give a folder.")
  if not out.is_dir() or (out / PRESET_FILE).exists():
    return
  others = sorted(p.name for p in out.iterdir() if p.name not in _RUN_FOLDERS)
  if others:
    raise UsageError(f"--out {out} already holds files that are not an easytunix run ({', '.join(others[:3])}"
                     f"{', ...' if len(others) > 3 else ''}); choose a new or empty folder.")


def save_preset(model, out: Path) -> Path:
  """Writes the preset files into ``out``, replacing an earlier save but keeping the run's checkpoints and logs.

  ``save_to_preset`` swaps in a whole folder; the run's checkpoints live in the same
  folder, so the preset is written to a hidden folder inside ``out`` and its files moved up.
  """
  import shutil

  out.mkdir(parents=True, exist_ok=True)
  staging = out / ".preset-new"
  shutil.rmtree(staging, ignore_errors=True)
  model.save_to_preset(staging)
  written = {p.name for p in staging.iterdir()}
  for old in out.iterdir():  # files of an earlier save that this one does not write (an old shard index, adapters)
    if old.is_file() and old.name not in written:
      old.unlink()
  for new in staging.iterdir():
    target = out / new.name
    if target.is_dir() and not target.is_symlink():
      shutil.rmtree(target)
    new.replace(target)
  staging.rmdir()
  return out


def _load_model(name: str, dtype: str | None, seed: int, flag: str):
  from easytunix.presets import CausalLM

  try:
    return CausalLM.from_preset(name, dtype=dtype, seed=seed)
  except (ValueError, FileNotFoundError, TypeError) as e:
    raise UsageError(f"{flag} {name}: {e}") from None


def _compile_options(trainer: str, s: dict[str, Any], out: Path, reward_fns: list | None) -> dict[str, Any]:
  options: dict[str, Any] = dict(
      trainer=trainer, learning_rate=s["learning_rate"], lora_rank=s["lora_rank"], max_length=s["max_length"],
      gradient_accumulation_steps=s["gradient_accumulation_steps"], warmup_steps=s["warmup_steps"],
      checkpoint_dir=s["checkpoint_dir"] or out / "checkpoints", log_dir=s["log_dir"] or out / "logs",
      save_every_n_steps=s["save_every"], use_chat_template=s["chat_template"],
  )
  if s.get("beta") is not None:
    options["beta"] = s["beta"]
  if trainer == "distill":
    from easytunix.distillation import LogitStrategy

    options["teacher"] = _load_model(s["teacher"], s["dtype"], s["seed"], "--teacher")
    options["distill"] = LogitStrategy(temperature=s["distill_temperature"], alpha=s["distill_alpha"])
    del options["use_chat_template"]  # distillation reads records as SFT does, without the option
  if trainer == "grpo":
    options.update(reward_fns=reward_fns, num_generations=s["num_generations"],
                   max_new_tokens=s["max_new_tokens"])
  return options


def step_counter():
  """A callback recording the optimizer steps a ``fit`` ran: ``first`` and ``last`` step numbers, ``loss``.

  Built on call, so that ``easytunix --help`` and ``setup-vllm`` do not import JAX.
  """
  from easytunix.callbacks import Callback

  class StepCounter(Callback):
    def __init__(self):
      super().__init__()
      self.first: int | None = None
      self.last: int | None = None
      self.loss: float | None = None

    def on_train_batch_end(self, batch, logs=None):
      logs = logs or {}
      if logs.get("step") is not None:
        self.first = int(logs["step"]) if self.first is None else self.first
        self.last = int(logs["step"])
      self.loss = logs.get("loss", self.loss)

  return StepCounter()


def train(trainer: str, args: argparse.Namespace) -> int:
  """Runs ``easytunix <trainer>``: load, compile, fit (resuming), save the preset folder."""
  s = resolve_settings(trainer, args)
  reward_fns = [load_reward(r) for r in s["reward"]] if trainer == "grpo" else None
  data = load_data(s["data"], "--data")
  eval_data = load_data(s["eval_data"], "--eval-data") if s["eval_data"] else None
  out = Path(s["out"]).expanduser()
  check_out_folder(out)
  checkpoints = Path(s["checkpoint_dir"]).expanduser() if s["checkpoint_dir"] else out / "checkpoints"
  model = _load_model(s["model"], s["dtype"], s["seed"], "--model")
  try:
    model.compile(**_compile_options(trainer, s, out, reward_fns))
  except (ValueError, TypeError) as e:
    raise UsageError(str(e)) from None
  start = latest_checkpoint_step(checkpoints)
  length = f"{s['steps']} steps in all" if s["steps"] is not None else f"{s['epochs']} epoch(s)"
  where = f"resuming from step {start} in {checkpoints}" if start is not None else "starting at step 0"
  print(f"{trainer}: {s['model']} on {len(data)} records of {s['data']}, {length}; {where}.", flush=True)
  counter = step_counter()
  try:
    model.fit(data, epochs=s["epochs"] or 1, steps=s["steps"], batch_size=s["batch_size"],
              validation_data=eval_data, callbacks=[counter], seed=s["seed"])
  except (ValueError, TypeError, FileNotFoundError) as e:
    raise UsageError(str(e)) from None
  if counter.first is None:
    print(f"Trained 0 steps: the checkpoint at step {start or 0} already completes this run ({length}). "
          "Ask for more --steps or --epochs to continue, or use a new --out (or --checkpoint-dir) to start over.")
  else:
    shown = f", last loss {counter.loss:.4f}" if isinstance(counter.loss, float) else ""
    print(f"Trained {counter.last - counter.first + 1} steps (steps {counter.first}-{counter.last}){shown}.")
  folder = save_preset(model, out)
  print(f"Saved the preset to {folder} (try: easytunix generate --preset {folder} \"...\"); "
        f"TensorBoard logs in {s['log_dir'] or out / 'logs'}.")
  return 0


def run(trainer: str, args: argparse.Namespace) -> int:
  """``train`` with user mistakes reported in one line on stderr (exit status 2), warnings in one line each."""
  import warnings

  def show(message, category, filename, lineno, file=None, line=None):
    print(f"easytunix {trainer}: warning: {' '.join(str(message).split())}", file=sys.stderr)

  with warnings.catch_warnings():
    warnings.showwarning = show
    warnings.filterwarnings("ignore", message="This job is already finished")  # train() says so itself
    try:
      return train(trainer, args)
    except UsageError as e:
      print(f"easytunix {trainer}: error: {' '.join(str(e).split())}", file=sys.stderr)
      return 2
