"""harmtrace: trace harmful behaviour of machine-learning models back to training data."""

from harmtrace.errors import HarmtraceError

__version__ = "0.1.0"

__all__ = ["HarmtraceError", "__version__"]
