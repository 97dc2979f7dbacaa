"""``shutdown.json``: what each run of the daemon did with the pages it held, kept truthful.

A start marks the record ``running`` (``clean`` false) before it takes anything over, so a
daemon that is killed leaves a record that says so; the stop replaces that with what it
did.  Earlier runs are never erased: the record found at a start moves, whole, to the head
of ``previous`` (a ``running`` one becomes ``crashed``), so a failed start adds its facts
on top of an unclean stop instead of hiding it.  The fields: ``docs/swap-areas.md``.
"""

from __future__ import annotations

import json
import logging
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from xentmem.files import write_atomically

log = logging.getLogger(__name__)

SHUTDOWN_FILE = "shutdown.json"
#: How many earlier runs ``previous`` keeps (newest first).
HISTORY_KEPT = 8
RUNNING, STOPPED, START_FAILED, CRASHED = "running", "stopped", "start_failed", "crashed"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class RunRecord:
    """This run's entry in ``<state_dir>/shutdown.json`` and the history under it."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / SHUTDOWN_FILE
        self._facts: dict[str, Any] | None = None

    def _history(self) -> list[dict[str, Any]]:
        """The runs before this one, newest first, as found on disk."""
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return []
        except OSError as exc:
            return [{"state": "unreadable", "error": f"{self.path}: {exc}"}]
        try:
            untrusted = json.loads(text)
        except ValueError as exc:
            return [{"state": "unreadable", "error": f"{self.path}: {exc}"}]
        if not isinstance(untrusted, dict):
            return [{"state": "unreadable", "error": f"{self.path}: not a JSON object"}]
        earlier = untrusted.pop("previous", [])
        if untrusted.get("state") == RUNNING:
            # Nothing else can be running on this state directory (its lock is ours): that
            # run was killed or crashed, and its pages in tmem or in memory went with it.
            untrusted["state"] = CRASHED
            untrusted["found_at"] = _now()
        if "state" not in untrusted:  # a record of a daemon from before the history
            untrusted["state"] = STOPPED
        if not isinstance(earlier, list):
            earlier = []
        return [untrusted, *(e for e in earlier if isinstance(e, dict))][:HISTORY_KEPT]

    def _ensure(self) -> dict[str, Any]:
        if self._facts is None:
            self._facts = {"state": RUNNING, "clean": False, "pid": os.getpid(),
                           "started": _now(), "previous": self._history()}
        return self._facts

    @property
    def previous(self) -> list[dict[str, Any]]:
        return list(self._ensure()["previous"])

    def begin(self, **facts: Any) -> None:
        """Mark this run ``running`` on disk; an error is logged (the daemon still starts).

        If the mark cannot be written, the older record stays and would not show a crash
        of this run: the log says so.
        """
        record = self._ensure()
        record.update(facts)
        try:
            self._write(record)
        except OSError as exc:
            log.error("cannot mark %s as running (%s): if this daemon is killed, that file "
                      "will not show it", self.path, exc)

    def add(self, **facts: Any) -> None:
        """More facts of this run (re-attached areas), written at once if begun."""
        self.begin(**facts)

    def finish(self, summary: dict[str, Any], state: str = STOPPED) -> dict[str, Any]:
        """The stop's facts replace ``running``: the record :meth:`save` will write."""
        record = self._ensure()
        record.update(summary)
        record.update(state=state, stopped=_now())
        # The history last, so the file reads top-down: this run, then the earlier ones.
        record["previous"] = record.pop("previous")
        return record

    def save(self) -> None:
        """Write the record as it stands; OSError if it cannot be written."""
        self._write(self._ensure())

    def facts(self) -> dict[str, Any]:
        return dict(self._ensure())

    def _write(self, record: dict[str, Any]) -> None:
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        write_atomically(self.path, json.dumps(record, indent=2).encode("utf-8"), 0o600)
