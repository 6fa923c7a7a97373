"""The DPO recipe: how ``model.compile(trainer="dpo")`` / ``fit`` drive :class:`DpoTrainer`."""

from __future__ import annotations

from easytunix.sft.recipe import Recipe, TrainingRun, register_recipe


class DpoRecipe(Recipe):
  """Preference tuning on ``{"prompt", "chosen", "rejected"}`` records (see :func:`build_dpo_trainer`)."""

  name = "dpo"
  options = {"beta": 0.1, "loss_type": "sigmoid", "label_smoothing": 0.0, "max_prompt_length": None,
             "use_chat_template": False, "ref_model": None}
  main_metric = "rewards/accuracies"

  def batches(self, model, settings, records, batch_size, *, shuffle, seed, name):
    from easytunix.rl.dpo.data import dpo_batches

    if records and not isinstance(records[0], dict):
      return records
    o = settings.options
    return dpo_batches(records, model.tokenizer, batch_size, settings.max_length, shuffle, seed,
                       max_prompt_length=o["max_prompt_length"], drop_remainder=False,
                       use_chat_template=o["use_chat_template"], name=name)

  def build(self, model, settings, config, state):
    from easytunix.rl.dpo.dpo_trainer import build_dpo_trainer

    o = settings.options
    return TrainingRun(build_dpo_trainer(
        model, settings.optimizer, ref_model=o["ref_model"], beta=o["beta"], loss_type=o["loss_type"],
        label_smoothing=o["label_smoothing"], max_length=settings.max_length,
        max_prompt_length=o["max_prompt_length"], **config,
    ))


register_recipe(DpoRecipe())

__all__ = ["DpoRecipe"]
