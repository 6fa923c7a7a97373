"""Knowledge distillation: a frozen teacher's logits, hidden states or attention maps guide a student.

    from easytunix.distillation import DistillationTrainer, LogitStrategy, TrainingConfig
    trainer = DistillationTrainer(student, teacher, LogitStrategy(temperature=2.0), optax.adamw(1e-3),
                                  TrainingConfig(max_steps=100))
    trainer.train(batches)
    trainer.close()  # reverts the strategy's changes to the student

See ``guides/distillation.md``.
"""

from easytunix.distillation.distillation_trainer import (
    DistillationTrainer,
    TrainingConfig,
    TrainingInput,
    build_distillation_trainer,
    check_compatible,
    init_student_from_teacher,
)
from easytunix.distillation.strategies import (
    AttentionProjectionStrategy,
    AttentionTransferStrategy,
    BaseStrategy,
    FeaturePoolingStrategy,
    FeatureProjectionStrategy,
    LogitStrategy,
    ModelForwardCallable,
    TokenLabels,
    default_functions,
)
from easytunix.distillation.recipe import DistillationRecipe

__all__ = [
    "AttentionProjectionStrategy",
    "AttentionTransferStrategy",
    "BaseStrategy",
    "DistillationRecipe",
    "DistillationTrainer",
    "FeaturePoolingStrategy",
    "FeatureProjectionStrategy",
    "LogitStrategy",
    "ModelForwardCallable",
    "TokenLabels",
    "TrainingConfig",
    "TrainingInput",
    "build_distillation_trainer",
    "check_compatible",
    "default_functions",
    "init_student_from_teacher",
]
