"""Remediation: act on what an investigation found, and check that a new model is not worse.

:func:`monitor_models` is the release gate behind ``harmtrace monitor``: it compares a
candidate model version with a baseline on harm rate, held-out perplexity and drift of the
probe outputs (see :mod:`harmtrace.remediate.monitor`).
"""

from harmtrace.remediate.monitor import (
    ModelMeasurement,
    MonitorCheck,
    MonitorPolicy,
    MonitorResult,
    compare_measurements,
    load_policy,
    measure_model,
    monitor_models,
    render_monitor,
)

__all__ = [
    "ModelMeasurement",
    "MonitorCheck",
    "MonitorPolicy",
    "MonitorResult",
    "compare_measurements",
    "load_policy",
    "measure_model",
    "monitor_models",
    "render_monitor",
]
