"""A signal storm while the daemon stops: once the stop is clean, the exit status is 0
whatever arrives (the interpreter's finalisation must not hand a late SIGTERM back to the
default action and die by it)."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import pytest

STORM = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


@pytest.mark.parametrize("round_", range(3))
def test_a_signal_storm_during_the_stop_still_exits_0(round_: int, fake_root: Path,
                                                      start_daemon: Any) -> None:
    daemon = start_daemon(fake_root)
    sent = 0
    while daemon.proc.poll() is None and sent < 200_000:
        try:
            daemon.send(STORM[sent % len(STORM)])
        except ProcessLookupError:
            break
        sent += 1
    assert daemon.stop(None) == 0, daemon.log()
    assert "xentmemd stopped" in daemon.log()
