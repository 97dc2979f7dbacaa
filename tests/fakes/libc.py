"""A C library for ``xentmem/guestd/nbd/resident.py`` that records its calls and fails the
ones a test asks it to (no test locks the test process's memory)."""

from __future__ import annotations

import threading


class RecordingLibc:
    """``mlockall``, ``munlockall`` and ``prctl`` recorded as ``(name, args, thread
    name)``; a call named in ``fail`` raises OSError with that errno instead."""

    def __init__(self, fail: dict[str, int] | None = None) -> None:
        self.fail = dict(fail or {})
        self.calls: list[tuple[str, tuple[int, ...], str]] = []
        self._lock = threading.Lock()

    def _call(self, name: str, *args: int) -> None:
        with self._lock:
            self.calls.append((name, args, threading.current_thread().name))
        if name in self.fail:
            raise OSError(self.fail[name], f"{name}: refused by the test")

    def mlockall(self, flags: int) -> None:
        self._call("mlockall", flags)

    def munlockall(self) -> None:
        self._call("munlockall")

    def prctl(self, option: int, arg2: int) -> int:
        self._call("prctl", option, arg2)
        return 0

    def stack_size(self, size: int) -> None:
        """Stands for ``threading.stack_size``: recorded, the test process keeps its own."""
        self._call("stack_size", size)

    def named(self, name: str) -> list[tuple[int, ...]]:
        with self._lock:
            return [args for call, args, _ in self.calls if call == name]
