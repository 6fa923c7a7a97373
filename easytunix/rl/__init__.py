"""Reinforcement learning and preference tuning on the shared training loop (DPO, ORPO, ...)."""
