"""Logging to stderr in the form journald reads best.

Under systemd (``$JOURNAL_STREAM`` or ``$INVOCATION_ID`` set) each line starts with the
syslog priority in angle brackets (``<3>`` error ... ``<7>`` debug), which journald turns into
the entry's priority, and carries no timestamp (the journal adds its own).  In a terminal the
lines carry a timestamp and the level name instead.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping
from typing import TextIO

#: logging level -> syslog priority (sd-daemon(3)).
SYSLOG_PRIORITY = {
    logging.CRITICAL: 2,
    logging.ERROR: 3,
    logging.WARNING: 4,
    logging.INFO: 6,
    logging.DEBUG: 7,
}


def under_systemd(env: Mapping[str, str] | None = None) -> bool:
    env = os.environ if env is None else env
    return bool(env.get("JOURNAL_STREAM") or env.get("INVOCATION_ID"))


class JournalFormatter(logging.Formatter):
    """``<N>logger: message``; tracebacks are folded onto continuation lines with the prefix."""

    def format(self, record: logging.LogRecord) -> str:
        priority = SYSLOG_PRIORITY.get(record.levelno, 6)
        if record.levelno >= logging.CRITICAL:
            priority = 2
        text = super().format(record)
        return "\n".join(f"<{priority}>{line}" for line in text.splitlines() or [""])


def level_of(name: str) -> int:
    level = logging.getLevelName(name.upper())
    if not isinstance(level, int):
        raise ValueError(f"unknown log level {name!r}")
    return level


def setup_logging(level: str = "info", *, stream: TextIO | None = None,
                  env: Mapping[str, str] | None = None) -> logging.Handler:
    """Route the ``xentmem*`` loggers (and warnings from others) to ``stream``."""
    handler = logging.StreamHandler(stream or sys.stderr)
    if under_systemd(env):
        handler.setFormatter(JournalFormatter("%(name)s: %(message)s"))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level_of(level))
    return handler


def set_level(level: str) -> None:
    logging.getLogger().setLevel(level_of(level))
