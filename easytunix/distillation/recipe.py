"""The distillation recipe: how ``model.compile(trainer="distill", teacher=..., distill=...)`` drives
:class:`DistillationTrainer`."""

from __future__ import annotations

from easytunix.sft.recipe import SftRecipe, TrainingRun, register_recipe


class DistillationRecipe(SftRecipe):
  """A frozen teacher guides the student through a strategy; data as for SFT."""

  name = "distill"
  options = {"teacher": None, "distill": None}

  def check_options(self, options):
    options = super().check_options(options)
    missing = [n for n in ("teacher", "distill") if options[n] is None]
    if missing:
      raise ValueError(
          f"compile(trainer='distill') needs {' and '.join(missing)}: e.g. "
          "compile(trainer='distill', teacher=teacher_model, distill=LogitStrategy(temperature=2.0))."
      )
    return options

  def validate(self, model, settings):
    from easytunix.distillation.distillation_trainer import check_compatible

    teacher = settings.options["teacher"]
    student_tok, teacher_tok = getattr(model, "tokenizer", None), getattr(teacher, "tokenizer", None)
    if student_tok is not None and teacher_tok is not None:
      probe = "Distillation needs one tokenizer: 12+7=19, hello world."
      if student_tok.vocab_size != teacher_tok.vocab_size or student_tok.encode(probe) != teacher_tok.encode(probe):
        raise ValueError(
            f"The teacher's tokenizer ({teacher_tok.vocab_size} ids) differs from the student's "
            f"({student_tok.vocab_size} ids): distillation compares them token by token. Give the student "
            "the teacher's tokenizer (from_preset(..., tokenizer=teacher.tokenizer)) and vocabulary."
        )
    check_compatible(model, teacher, settings.options["distill"])

  def build(self, model, settings, config, state):
    from easytunix.distillation.distillation_trainer import build_distillation_trainer

    o = settings.options
    return TrainingRun(build_distillation_trainer(model, o["teacher"], o["distill"], settings.optimizer, **config))

  def after_fit(self, run):
    # Reverts what the strategy attached to the student (projections, capture wrappers).
    run.close()
    return None


register_recipe(DistillationRecipe())

__all__ = ["DistillationRecipe"]
