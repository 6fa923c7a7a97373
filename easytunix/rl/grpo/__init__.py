"""GRPO and GSPO-token: group-relative policy optimization on the shared training loop.

``GrpoLearner(RLCluster(...), reward_fns, GrpoConfig(...)).train(prompt_batches)``;
see :mod:`easytunix.rl.grpo.grpo_learner`.
"""

from easytunix.rl.grpo.grpo_learner import (
    LOSS_ALGOS,
    GrpoConfig,
    GrpoLearner,
    RepeatIterable,
    RewardFn,
    TrainExample,
    build_grpo_learner,
    compute_advantages,
    compute_rewards,
    grpo_loss_fn,
    grpo_objective,
    prompt_batches,
)
from easytunix.rl.grpo.recipe import GrpoRecipe

__all__ = [
    "LOSS_ALGOS",
    "GrpoConfig",
    "GrpoLearner",
    "GrpoRecipe",
    "RepeatIterable",
    "RewardFn",
    "TrainExample",
    "build_grpo_learner",
    "compute_advantages",
    "compute_rewards",
    "grpo_loss_fn",
    "grpo_objective",
    "prompt_batches",
]
