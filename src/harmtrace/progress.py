"""Progress reporting: the library calls a reporter; the command line shows it."""

from __future__ import annotations

from typing import Protocol

from harmtrace._logging import get_logger

__all__ = ["Reporter", "LogReporter"]

log = get_logger("harmtrace.progress")


class Reporter(Protocol):
    def stage(self, name: str, message: str) -> None: ...

    def step(self, label: str, done: int, total: int) -> None: ...

    def note(self, message: str) -> None: ...


class LogReporter:
    """Sends progress to the ``harmtrace`` logger (silent unless logging is configured)."""

    def stage(self, name: str, message: str) -> None:
        log.info("[%s] %s", name, message)

    def step(self, label: str, done: int, total: int) -> None:
        if done == total or done % max(1, total // 10) == 0:
            log.info("%s: %d/%d", label, done, total)

    def note(self, message: str) -> None:
        log.info("%s", message)
