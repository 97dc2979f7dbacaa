"""``xentmem balloon record``: the live loop's decisions as JSON lines, and reading them back.

The daemon keeps the last tick records (``balloon`` op, its ``history``); a recording polls
that and writes each record once, in order, as the daemon sent it, so a recording holds the
loop's decisions and the inputs they were made from (committed memory, current size,
frontswap pages, the pressure reading).  Between them go a few lines of our own, told apart
by ``kind``: the knobs in force (first, and again whenever one changes), and a ``gap`` when
the daemon dropped records before they were polled.  Format and use: docs/selfballoon.md.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Callable

from xentmem.clock import Clock
from xentmem.console import to_json

#: Our own lines; every other ``kind`` is one of the loop's (tick, guard, idle).
KIND_KNOBS = "knobs"
KIND_GAP = "gap"
OWN_KINDS = (KIND_KNOBS, KIND_GAP)

#: How often the daemon is asked for new records (the loop ticks every 5 s by default).
DEFAULT_POLL_S = 1.0

#: Returns the daemon's ``balloon`` answer: the recorder's only way to the daemon.
Fetch = Callable[[], dict[str, Any]]
Write = Callable[[str], None]


@dataclass
class RecordingSummary:
    """What a recording wrote: for the closing note on stderr."""

    decisions: int = 0
    missed: int = 0
    restarts: int = 0


class Recorder:
    """Poll the daemon's history, write each new record once; stop at a count or a duration.

    ``count`` counts the loop's records, not our own lines.  ``fetch`` returns the daemon's
    ``balloon`` answer (all the records it keeps); ``clock`` paces the polls, so tests run a
    long recording at once.
    """

    def __init__(
        self,
        fetch: Fetch,
        write: Write,
        clock: Clock,
        *,
        count: int | None,
        duration_s: float | None,
        poll_s: float = DEFAULT_POLL_S,
        backlog: bool = False,
    ) -> None:
        if count is None and duration_s is None:
            raise ValueError("a recording needs a count or a duration")
        self._fetch = fetch
        self._write = write
        self._clock = clock
        self._count = count
        self._duration_s = duration_s
        self._poll_s = poll_s
        self._backlog = backlog
        #: (time, seq) of the last record written: the daemon's clock is monotonic across
        #: loop restarts, its numbering is not.
        self._last: tuple[float, int] | None = None
        self._knobs: Any = None
        self.summary = RecordingSummary()

    def _done(self) -> bool:
        return self._count is not None and self.summary.decisions >= self._count

    def run(self, stop: threading.Event, first: dict[str, Any] | None = None) -> RecordingSummary:
        """Record until the count is reached, the duration is over or ``stop`` is set.

        ``first`` is an answer already fetched (the command asks once before it opens the
        output, so an unreachable daemon leaves no empty file behind).
        """
        start = self._clock.monotonic()
        self._take(first if first is not None else self._fetch(), initial=True)
        while not self._done():
            step = self._poll_s
            if self._duration_s is not None:
                left = start + self._duration_s - self._clock.monotonic()
                if left <= 0:
                    break
                step = min(step, left)
            if self._clock.wait(stop, step):
                break
            self._take(self._fetch(), initial=False)
        return self.summary

    def _take(self, answer: dict[str, Any], *, initial: bool) -> None:
        knobs = answer.get("knobs")
        if initial or knobs != self._knobs:
            self._knobs = knobs
            self._emit({"kind": KIND_KNOBS, "knobs": knobs, "running": answer.get("running"),
                        "report_only": answer.get("report_only")})
        history = [r for r in answer.get("history") or ()
                   if isinstance(r.get("seq"), int) and isinstance(r.get("time"), (int, float))]
        if initial and not self._backlog:
            # No record yet: the loop's first will be number 1, so a later gap still shows.
            self._last = _key(history[-1]) if history else (float("-inf"), 0)
            return
        new = [r for r in history if self._last is None or _key(r) > self._last]
        if new and self._last is not None:
            last_seq = self._last[1]
            if new[0]["seq"] <= last_seq:
                # The loop was started again (a backend reload): its numbering starts over.
                self.summary.restarts += 1
            elif new[0]["seq"] > last_seq + 1:
                missed = new[0]["seq"] - last_seq - 1
                self.summary.missed += missed
                self._emit({"kind": KIND_GAP, "missed": missed, "after_seq": last_seq})
        for record in new:
            if self._done():
                break
            self._emit(record)
            self.summary.decisions += 1
            self._last = _key(record)

    def _emit(self, line: dict[str, Any]) -> None:
        self._write(to_json(line) + "\n")


def _key(record: dict[str, Any]) -> tuple[float, int]:
    return (float(record["time"]), int(record["seq"]))


# -- reading a recording ---------------------------------------------------------------------------


class RecordingError(ValueError):
    """A recording that cannot be read: the message names the line."""


@dataclass
class Recording:
    """A recording read back: the knobs first in force and the loop's records, in order."""

    name: str
    knobs: dict[str, Any] = field(default_factory=dict)
    records: list[dict[str, Any]] = field(default_factory=list)

    def decisions(self) -> list[dict[str, Any]]:
        """The records with a balloon decision (not idle, not failed)."""
        return [r for r in self.records if isinstance(r.get("balloon"), dict)]


def parse_recording(lines: Iterable[str], name: str) -> Recording:
    """The lines of a recording; a line that is not one JSON object is refused by number."""
    recording = Recording(name)
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except ValueError as exc:
            raise RecordingError(f"{name}:{number}: not JSON ({exc.msg})") from None
        if not isinstance(item, dict) or not isinstance(item.get("kind"), str):
            raise RecordingError(f"{name}:{number}: not a record (an object with a 'kind')")
        if item["kind"] == KIND_KNOBS:
            if not recording.knobs and isinstance(item.get("knobs"), dict):
                recording.knobs = dict(item["knobs"])
        elif item["kind"] not in OWN_KINDS:
            if not isinstance(item.get("time"), (int, float)):
                raise RecordingError(f"{name}:{number}: a record without a numeric 'time'")
            recording.records.append(item)
    return recording


def knob_values(shown: dict[str, Any]) -> dict[str, str]:
    """Knobs as ``xentmem balloon`` shows them -> values a knob store takes.

    ``auto (204)`` (the automatic value and the figure in force) becomes ``auto``.
    """
    return {name: str(text).split(" ", 1)[0] for name, text in shown.items()
            if text is not None}


def series_of(records: Sequence[dict[str, Any]], path: tuple[str, ...]) -> list[Any]:
    """One field of every record (``None`` where a record lacks it)."""
    out = []
    for record in records:
        value: Any = record
        for key in path:
            value = value.get(key) if isinstance(value, dict) else None
        out.append(value)
    return out
