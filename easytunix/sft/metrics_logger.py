"""Tunix's module path ``tunix.sft.metrics_logger``: the metrics logger of :mod:`easytunix.sft.metrics`."""

from easytunix.sft.metrics import MetricsLogger, MetricsLoggerOptions, Mode

__all__ = ["MetricsLogger", "MetricsLoggerOptions", "Mode"]
