"""Supervised fine-tuning: the training loop (``PeftTrainer``), LoRA, data helpers and checkpoints.

``PeftTrainer`` is the one training loop of easytunix; the distillation and
RL trainers extend it through its loss function, input function and
``_prepare_inputs`` hook (see its docstring).
"""

from easytunix.sft.checkpoint import CheckpointingOptions, CheckpointManager
from easytunix.sft.hooks import DataHooks, TrainingHooks
from easytunix.sft.lora import apply_lora, lora_disabled, merge_lora, quantize_base
from easytunix.sft.metrics import MetricsLogger, MetricsLoggerOptions
from easytunix.sft.peft_trainer import (
    PeftTrainer,
    ProfilerOptions,
    TrainingConfig,
    TrainingInput,
    default_loss_fn,
    is_lora_enabled,
    time_measure,
)

__all__ = [
    "CheckpointManager",
    "CheckpointingOptions",
    "DataHooks",
    "MetricsLogger",
    "MetricsLoggerOptions",
    "PeftTrainer",
    "ProfilerOptions",
    "TrainingConfig",
    "TrainingHooks",
    "TrainingInput",
    "apply_lora",
    "default_loss_fn",
    "is_lora_enabled",
    "lora_disabled",
    "merge_lora",
    "quantize_base",
    "time_measure",
]
