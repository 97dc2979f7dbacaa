"""Remote copies whose delete failed (the cluster was down), kept in a file beside the arena.

A flush must hold across a crash: a remote copy whose ``DEL`` failed is only named here, and
a restart's SCAN would otherwise find the key and adopt the flushed page again, which a load
would then serve.  The file is rewritten (atomically) only when the set changes, which is only
when the cluster fails a delete or a retry succeeds: nothing on the data path while it is up.

Beside key names it keeps the flushes of whole objects of shared pools whose SCAN or DEL
failed (:func:`.record.object_mark`: the object's tag and ``:*``), since other nodes put
that object's keys and this node cannot name them: every key of such an object is a miss
until its SCAN and DEL are done again.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path

from xentmem.files import write_atomically

log = logging.getLogger(__name__)

#: At most this many names are kept in the file (each well under 200 bytes); the others are
#: still retried from memory, but a crash may let SCAN find them (said once, when it happens).
MAX_KEPT = 65536


class PendingDeletes:
    """A set of key names (and object marks), mirrored to ``path`` (None: in memory only).

    Thread-safe: the ops of several callers change it at once, and each change and the
    save of the set it left are one step, so the file always holds the latest set (two
    saves at once could write their snapshots in the other order)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._warned = False
        self._lock = threading.Lock()
        self._names: set[str] = set()
        if path is not None:
            self._names = _read(path)

    def __contains__(self, name: object) -> bool:
        return name in self._names

    def __len__(self) -> int:
        return len(self._names)

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._names))

    def update(self, names: Iterable[str]) -> None:
        names = list(names)
        with self._lock:
            before = len(self._names)
            self._names.update(names)
            if len(self._names) != before:
                self._save()

    def discard(self, name: str) -> None:
        if name not in self._names:  # the data path's common case: no lock taken
            return
        with self._lock:
            if name in self._names:
                self._names.discard(name)
                self._save()

    def difference_update(self, names: Iterable[str]) -> None:
        names = list(names)
        with self._lock:
            before = len(self._names)
            self._names.difference_update(names)
            if len(self._names) != before:
                self._save()

    def _save(self) -> None:
        """The set to ``path`` (the lock is held)."""
        if self.path is None:
            return
        kept = sorted(self._names)[:MAX_KEPT]
        if len(self._names) > MAX_KEPT and not self._warned:
            self._warned = True
            log.warning("ramster: %d pending deletes, %d kept in %s: a crash now may let "
                        "the restart find the others again", len(self._names), MAX_KEPT,
                        self.path)
        try:
            write_atomically(self.path, "".join(f"{name}\n" for name in kept).encode("ascii"),
                             0o600)
        except (OSError, UnicodeEncodeError) as exc:  # still retried: only a crash misses them
            log.error("ramster: pending deletes not saved to %s: %s", self.path, exc)


def _read(path: Path) -> set[str]:
    """The names a previous run left; a file that cannot be read is logged and counts as
    none (the pages it named may then come back with SCAN, as before it existed)."""
    try:
        text = path.read_text(encoding="ascii")
    except FileNotFoundError:
        return set()
    except (OSError, UnicodeDecodeError) as exc:
        log.error("ramster: pending deletes in %s not read: %s", path, exc)
        return set()
    return {line for line in text.splitlines() if line}


__all__ = ["MAX_KEPT", "PendingDeletes"]
