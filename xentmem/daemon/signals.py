"""Signals become flags the main loop reads: SIGTERM/SIGINT stop, SIGHUP reloads the config.

A handler only sets events (safe at any point of the main thread); the main loop waits on
``wake`` with a timeout and does the work itself, outside the handler.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType


class SignalFlags:
    """What the signals asked for since the main loop last looked."""

    def __init__(self) -> None:
        self.wake = threading.Event()
        self.terminate = threading.Event()
        self.reload = threading.Event()
        self.received: list[str] = []

    def _on_terminate(self, signum: int, frame: FrameType | None) -> None:
        self.received.append(signal.Signals(signum).name)
        self.terminate.set()
        self.wake.set()

    def _on_reload(self, signum: int, frame: FrameType | None) -> None:
        self.received.append(signal.Signals(signum).name)
        self.reload.set()
        self.wake.set()

    def install(self) -> None:
        """Take SIGTERM, SIGINT and SIGHUP (main thread only)."""
        signal.signal(signal.SIGTERM, self._on_terminate)
        signal.signal(signal.SIGINT, self._on_terminate)
        signal.signal(signal.SIGHUP, self._on_reload)

    def take_reload(self) -> bool:
        """True once per reload request."""
        if self.reload.is_set():
            self.reload.clear()
            return True
        return False
