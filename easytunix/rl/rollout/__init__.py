"""Tunix's ``tunix.rl.rollout`` package: the rollout configuration and interface (see ``base_rollout``)."""
