"""The one exception tree of harmtrace.

::

    HarmtraceError
    ├── ConfigError(HarmtraceError, ValueError)        a config file or argument is wrong
    ├── InputDataError(HarmtraceError, ValueError)     a data file, row or field is wrong
    ├── ArtifactError(HarmtraceError, RuntimeError)    a stage's artifact is missing or stale
    ├── NumericalError(HarmtraceError, FloatingPointError)  non-finite values in a computation
    ├── LedgerError(HarmtraceError, RuntimeError)      the ledger does not verify
    └── MissingExtraError(HarmtraceError, ImportError) an optional dependency is not installed

Every message names the file, field or argument at fault, the value received when it helps,
and what to do about it. The command line prints ``ErrorType: message`` and exits non-zero.
"""

from __future__ import annotations

__all__ = [
    "ArtifactError",
    "ConfigError",
    "HarmtraceError",
    "InputDataError",
    "LedgerError",
    "MissingExtraError",
    "NumericalError",
]


class HarmtraceError(Exception):
    """Root of every error harmtrace raises on purpose."""


class ConfigError(HarmtraceError, ValueError):
    """A config file, key or argument has a wrong value."""


class InputDataError(HarmtraceError, ValueError):
    """A data file, one of its rows or one of its fields is malformed."""


class ArtifactError(HarmtraceError, RuntimeError):
    """A stage's input artifact is missing, half-written or made with other settings."""


class NumericalError(HarmtraceError, FloatingPointError):
    """A computation produced NaN or infinite values."""


class LedgerError(HarmtraceError, RuntimeError):
    """The ledger failed verification or cannot be appended to."""


class MissingExtraError(HarmtraceError, ImportError):
    """An optional dependency is needed; the message gives the install command."""
