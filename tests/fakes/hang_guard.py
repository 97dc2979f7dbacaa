"""A hang guard: a test that hangs (pyxs has calls that can block forever: a dead router
thread, ``Monitor.wait()``) ends the run with every thread's traceback instead of stalling it.

The limit is for hangs, not for slowness: a busy CI machine runs a test several times slower
than an idle one (the hostd flood test takes 80 s idle and went past a 120 s guard beside
``stress-ng``, which ended the whole run with nothing on the terminal).  The traceback goes
to the terminal's stderr, not to pytest's capture of fd 2, which the exit would lose.
"""

from __future__ import annotations

import faulthandler
from collections.abc import Iterator

import pytest

HANG_GUARD_S = 900


def _terminal_stderr(config: pytest.Config) -> int:
    """The descriptor of the stderr pytest started with (fd 2 is its capture file)."""
    capman = config.pluginmanager.getplugin("capturemanager")
    saved = getattr(getattr(getattr(capman, "_global_capturing", None), "err", None),
                    "targetfd_save", None)
    return saved if isinstance(saved, int) else 2


@pytest.fixture(autouse=True)
def hang_guard(request: pytest.FixtureRequest) -> Iterator[None]:
    faulthandler.dump_traceback_later(HANG_GUARD_S, exit=True,
                                      file=_terminal_stderr(request.config))
    yield
    faulthandler.cancel_dump_traceback_later()
