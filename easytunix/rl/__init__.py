"""Reinforcement learning and preference tuning on the shared training loop.

* :mod:`easytunix.rl.dpo`: DPO and its variants (IPO, hinge, robust DPO, ORPO).
* :mod:`easytunix.rl.rl_cluster`: the models of an RL run in their roles and on their meshes.
* :mod:`easytunix.rl.grpo`: GRPO and GSPO-token.
"""
