"""Preference tuning: DPO and its variants (IPO, hinge, robust DPO, ORPO) on ``PeftTrainer``.

``dpo_batches`` turns ``{"prompt", "chosen", "rejected"}`` records into batches;
``DpoTrainer`` (or ``build_dpo_trainer``) trains on them.
"""

from easytunix.rl.dpo.data import DpoDataset, TrainingInput, dpo_batches, process_dpo_record, tokenize_preference
from easytunix.rl.dpo.dpo_trainer import (
    LOSS_TYPES,
    DpoTrainer,
    DpoTrainingConfig,
    TrainExample,
    build_dpo_trainer,
    compute_logps,
    dpo_loss_fn,
    preference_loss,
)
from easytunix.rl.dpo.recipe import DpoRecipe

__all__ = [
    "LOSS_TYPES",
    "DpoDataset",
    "DpoRecipe",
    "DpoTrainer",
    "DpoTrainingConfig",
    "TrainExample",
    "TrainingInput",
    "build_dpo_trainer",
    "compute_logps",
    "dpo_batches",
    "dpo_loss_fn",
    "preference_loss",
    "process_dpo_record",
    "tokenize_preference",
]
