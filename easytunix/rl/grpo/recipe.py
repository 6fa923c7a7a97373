"""The GRPO recipe: how ``model.compile(trainer="grpo", reward_fns=[...])`` / ``fit`` drive :class:`GrpoLearner`."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from easytunix.sft.recipe import Recipe, RecipeSettings, TrainingRun, register_recipe


class GrpoRun(TrainingRun):
  """A :class:`GrpoLearner` as a training run: the actor's loop consumes the learner's rollout stream."""

  def __init__(self, learner: Any):
    super().__init__(learner.trainer)
    self.learner = learner

  def train(self, train_ds: Iterable[Any], eval_ds: Iterable[Any] | None = None) -> None:
    self.trainer.train(self.learner.rollout_stream(train_ds, eval_ds))

  def evaluate(self, eval_ds: Iterable[Any]) -> dict[str, float]:
    # Mean rewards of one greedy completion per prompt: GRPO has no fixed target to score a loss against.
    return self.learner.evaluate(eval_ds)

  def close(self) -> None:
    self.learner.close()


def tokenize_prompts(records: list[dict[str, Any]], tokenizer: Any, max_prompt_length: int, *,
                     use_chat_template: bool, name: str) -> list[dict[str, Any]]:
  """Adds each record's prompt token ids (``PROMPT_IDS``), chat-rendered when asked or when the prompt is messages.

  ``prompt`` stays what reward functions see, as TRL passes it: the text, or the list of messages
  of a conversational prompt.
  """
  from easytunix.rl.grpo.grpo_learner import PROMPT_IDS

  prepared = []
  for index, record in enumerate(records):
    prompt = record["prompt"]
    if isinstance(prompt, str) and not use_chat_template:
      ids = tokenizer.encode(prompt)
    else:
      messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
      ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if not ids:
      raise ValueError(f"{name}: record {index} has an empty prompt.")
    if len(ids) > max_prompt_length:
      raise ValueError(
          f"{name}: record {index}'s prompt has {len(ids)} tokens, more than max_length - max_new_tokens = "
          f"{max_prompt_length}. Raise compile(max_length=...) or shorten the prompt."
      )
    prepared.append({**record, PROMPT_IDS: list(ids)})
  return prepared


class GrpoRecipe(Recipe):
  """Group-relative policy optimization on ``{"prompt", ...}`` records, scored by reward functions."""

  name = "grpo"
  options = {"reward_fns": None, "reward_weights": None, "num_generations": 4, "num_iterations": 1, "beta": 0.04,
             "epsilon": 0.2, "loss_algo": "grpo", "max_new_tokens": 32, "temperature": 0.9, "top_p": 1.0,
             "top_k": None, "async_rollout": True, "use_chat_template": False, "ref_model": None,
             "rollout_engine": "vanilla"}
  main_metric = "reward"

  @staticmethod
  def learner_settings(settings: RecipeSettings) -> dict[str, Any]:
    """``build_grpo_learner`` keyword arguments from the compile options."""
    o = settings.options
    fns = o["reward_fns"]
    return dict(
        reward_fns=list(fns) if isinstance(fns, (list, tuple)) else fns,
        num_generations=o["num_generations"], num_iterations=o["num_iterations"], beta=o["beta"],
        epsilon=o["epsilon"], loss_algo=o["loss_algo"], reward_weights=o["reward_weights"],
        async_rollout=o["async_rollout"], max_new_tokens=o["max_new_tokens"], temperature=o["temperature"],
        top_p=o["top_p"], top_k=o["top_k"], max_prompt_length=settings.max_length - o["max_new_tokens"],
        rollout_engine=o["rollout_engine"],
    )

  def validate(self, model, settings):
    from easytunix.rl.grpo.grpo_learner import GrpoConfig
    from easytunix.rl.rl_cluster import ROLLOUT_ENGINES, RolloutConfig

    o = self.learner_settings(settings)
    fns = o["reward_fns"]
    if fns is None or (isinstance(fns, list) and not fns):
      raise ValueError(
          "compile(trainer='grpo') needs reward_fns: functions called with keywords as TRL calls them, "
          "fn(prompts=..., completions=..., completion_ids=..., **columns) -> list[float], e.g. "
          "def reward_len(completions, **kwargs): return [-abs(20 - len(c)) for c in completions], "
          "or reward_fns=[easytunix.rl.grpo.rewards.exact_match]."
      )
    for fn in fns if isinstance(fns, list) else [fns]:
      if not callable(fn):
        raise TypeError(f"reward_fns must be callables, got {fn!r}.")
    if model.tokenizer is None:
      raise ValueError("trainer='grpo' needs a tokenizer: reward functions read the completions as text.")
    if o["max_prompt_length"] < 1:
      raise ValueError(
          f"max_new_tokens={o['max_new_tokens']} leaves no room for a prompt in max_length={settings.max_length}; "
          "raise max_length (prompt plus completion tokens)."
      )
    if not o["temperature"]:
      raise ValueError("GRPO samples several different completions per prompt: temperature must be > 0 (e.g. 0.9).")
    count = len(fns) if isinstance(fns, list) else 1
    weights = o["reward_weights"]
    if weights is not None and len(weights) != count:
      raise ValueError(f"reward_weights has {len(weights)} entries for {count} reward function(s).")
    if o["rollout_engine"] not in ROLLOUT_ENGINES:
      raise ValueError(f"rollout_engine must be one of {list(ROLLOUT_ENGINES)}, got {o['rollout_engine']!r}.")
    if o["rollout_engine"] == "vllm":
      from easytunix.generate.vllm_sampler import import_vllm

      import_vllm()
    GrpoConfig(num_generations=o["num_generations"], num_iterations=o["num_iterations"], beta=o["beta"],
               epsilon=o["epsilon"], loss_algo=o["loss_algo"])
    RolloutConfig(max_tokens_to_generate=o["max_new_tokens"], temperature=o["temperature"], top_p=o["top_p"],
                  top_k=o["top_k"], max_prompt_length=o["max_prompt_length"])

  def batches(self, model, settings, records, batch_size, *, shuffle, seed, name):
    from easytunix.rl.grpo.grpo_learner import prompt_batches

    g = settings.options["num_generations"]
    if batch_size % g:
      raise ValueError(
          f"batch_size={batch_size} is not a multiple of num_generations={g}: a GRPO batch holds num_generations "
          f"completions of each of batch_size / num_generations prompts. Use batch_size={max(g, batch_size // g * g)} "
          f"or {(batch_size // g + 1) * g}."
      )
    prepared = tokenize_prompts(records, model.tokenizer, settings.max_length - settings.options["max_new_tokens"],
                                use_chat_template=settings.options["use_chat_template"], name=name)
    per_batch = batch_size // g
    # Training drops a last partial batch (another shape would compile the update again); evaluation keeps every prompt.
    drop = name == "training data" and len(prepared) >= per_batch
    return prompt_batches(prepared, per_batch, shuffle=shuffle, seed=seed, drop_remainder=drop)

  def eval_batch_size(self, settings, batch_size):
    g = settings.options["num_generations"]
    return batch_size // g * g or g

  def steps_per_epoch(self, settings, num_batches):
    # A trailing part-group is dropped; each group of rollouts is trained on num_iterations times.
    return num_batches // settings.gradient_accumulation_steps * settings.options["num_iterations"]

  def build(self, model, settings, config, state):
    from easytunix.rl.grpo.grpo_learner import build_grpo_learner
    from easytunix.rl.reference import choose_reference

    learner_settings = self.learner_settings(settings)
    reward_fns = learner_settings.pop("reward_fns")
    if state.get("reference") is None:
      # Chosen once per compile: with full fine-tuning the KL reference is the weights as they were at the
      # first fit, kept across fit() calls (a snapshot sharing their arrays: training works on copies).
      state["reference"] = choose_reference(model, settings.options["ref_model"], name="ref_model")
    reference = state["reference"]
    return GrpoRun(build_grpo_learner(model, settings.optimizer, reward_fns, tokenizer=model.tokenizer,
                                      reference=reference.model, **learner_settings, **config))


register_recipe(GrpoRecipe())

__all__ = ["GrpoRecipe", "GrpoRun", "tokenize_prompts"]
