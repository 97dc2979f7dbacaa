"""Helpers for check scripts that run inside the real-Xen test bed (dom0 or a domU).

A check script prints lines ``XENTMEM-CHECK <name> PASS|FAIL|SKIP <detail>``; the bed's
runner puts the scope (``dom0``, ``domu1``, ``domu2``) in front of the name, so the same
script can run in both domUs.  This module only formats those lines and offers the few
waits that cross domain boundaries; it is on ``PYTHONPATH`` inside both images.

Every wait in a check ends at the bed's deadline (:func:`time_left`), never after a fixed
number of seconds: the emulated CPU's speed depends on the host's load, so a figure that
fits an idle host fails a busy one.  The runner exports the deadline of each phase as
``XENTMEM_DEADLINE`` (wall-clock seconds; the guests' clocks come from Xen, which reads
the host's) and kills a script that is still running then.  A wait gives up
``REPORT_MARGIN_S`` earlier, so its check still prints a FAIL line that says what it
waited for.

Typical use::

    report = CheckReport()
    with report.check("python-env.imports") as step:
        import xentmem
        step.detail = f"xentmem {xentmem.__version__}"
    sys.exit(report.exit_code())
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TextIO

PASS, FAIL, SKIP = "PASS", "FAIL", "SKIP"
STATE_DIR = Path(os.environ.get("XENTMEM_STATE_DIR", "/run/xentmem-bed"))
CONSOLE_LOGS = Path(os.environ.get("XENTMEM_DOMU_LOGS", "/var/log/xen/console"))
MAX_DETAIL = 400
#: How long before the runner's kill a wait gives up, to print its own FAIL line.
REPORT_MARGIN_S = 20.0
#: Outside the bed (a script tried by hand) without XENTMEM_DEADLINE: an hour.
UNSET_DEADLINE_S = 3600.0


def _deadline_from_env() -> float:
    """The deadline as a ``time.monotonic()`` value (the wall clock is read once, here)."""
    untrusted_value = os.environ.get("XENTMEM_DEADLINE", "")
    try:
        left = float(untrusted_value) - time.time()
    except ValueError:
        left = UNSET_DEADLINE_S
    return time.monotonic() + left - REPORT_MARGIN_S


_DEADLINE = _deadline_from_env()


def time_left() -> float:
    """Seconds until a wait must give up (0 once the deadline passed): every wait's bound."""
    return max(0.0, _DEADLINE - time.monotonic())


class SkipCheck(Exception):
    """Raised inside :meth:`CheckReport.check` to report SKIP with a reason."""


class Step:
    """What a ``with report.check(...)`` block may set: the detail printed with PASS."""

    def __init__(self) -> None:
        self.detail = ""

    def skip(self, reason: str) -> None:
        raise SkipCheck(reason)


class CheckReport:
    """Prints check lines and remembers whether any failed (for the exit code)."""

    def __init__(self, out: TextIO | None = None) -> None:
        self._out = out if out is not None else sys.stdout
        self.failures = 0

    def record(self, name: str, status: str, detail: str = "") -> None:
        if status not in (PASS, FAIL, SKIP):
            raise ValueError(f"unknown check status {status!r}")
        if not name or any(c.isspace() for c in name):
            raise ValueError(f"check name must be one word, got {name!r}")
        if status == FAIL:
            self.failures += 1
        one_line = " ".join(detail.split())[:MAX_DETAIL]
        print(f"XENTMEM-CHECK {name} {status} {one_line}".rstrip(), file=self._out, flush=True)

    def passed(self, name: str, detail: str = "") -> None:
        self.record(name, PASS, detail)

    def failed(self, name: str, detail: str = "") -> None:
        self.record(name, FAIL, detail)

    def skipped(self, name: str, detail: str = "") -> None:
        self.record(name, SKIP, detail)

    def expect(self, name: str, ok: bool, detail: str = "") -> bool:
        self.record(name, PASS if ok else FAIL, detail)
        return ok

    @contextmanager
    def check(self, name: str) -> Iterator[Step]:
        """PASS when the block ends, FAIL with the exception if it raises, SKIP on skip()."""
        step = Step()
        try:
            yield step
        except SkipCheck as skip:
            self.skipped(name, str(skip))
        except Exception as exc:  # a check reports every failure, whatever its type
            self.failed(name, f"{type(exc).__name__}: {exc}")
        else:
            self.passed(name, step.detail)

    def exit_code(self) -> int:
        return 1 if self.failures else 0


def role() -> str:
    """``dom0`` or ``domu``."""
    return os.environ.get("XENTMEM_ROLE", "unknown")


def domu() -> str:
    """``first`` or ``second`` inside a domU (also in ``/etc/xentmem-role``); "" in dom0."""
    return os.environ.get("XENTMEM_DOMU", "")


def first_domid() -> int | None:
    """The first domU's domid, as dom0 told the second domU on its command line."""
    untrusted_value = os.environ.get("XENTMEM_FIRST_DOMID", "")
    return int(untrusted_value) if untrusted_value.isdigit() else None


def read_text(path: str) -> str:
    return Path(path).read_text().strip()


def run(argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
    """Run a command, capturing text output; never raises on its exit code.

    Raises ``subprocess.TimeoutExpired`` if it is still running at the deadline.
    """
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=time_left(),
                          check=False)


def send_signal(word: str) -> None:
    """Tell every domain ``word`` happened (dom0 relays it; see tests/xen/README.md).

    Written to the console directly: the runner shows a script's stdout only after the
    script ends, and dom0 must see the signal while this domU is still running.
    """
    if not word.replace("-", "").replace("_", "").replace(".", "").isalnum():
        raise ValueError(f"signal words are [A-Za-z0-9_.-]+, got {word!r}")
    with open("/dev/console", "w") as console:
        console.write(f"XENTMEM-SIGNAL {word}\n")


def wait_signal(word: str) -> str:
    """Wait until some domain sent ``word`` (or the deadline); returns the sender (``domu1``...)."""
    while True:
        if role() == "dom0":
            marker = STATE_DIR / "signals" / word
            if marker.exists():
                return marker.read_text().strip()
        else:
            result = run(["xenstore-read", f"data/xentmem-bed/signal/{word}"])
            if result.returncode == 0:
                return result.stdout.strip()
        if time_left() <= 0:
            raise TimeoutError(f"no signal {word!r} by the bed's deadline")
        time.sleep(0.5)


def wait_for_console(domu_name: str, text: str) -> str:
    """dom0 only: wait until a domU's console log has a line containing ``text``."""
    log = CONSOLE_LOGS / f"guest-{domu_name}.log"
    while True:
        if log.exists():
            for line in log.read_text(errors="replace").splitlines():
                if text in line:
                    return line.strip()
        if time_left() <= 0:
            raise TimeoutError(f"{text!r} did not appear in {log} by the bed's deadline")
        time.sleep(0.5)


def domids() -> dict[str, int]:
    """dom0 only: ``{"domu1": 1, ...}`` for the domUs the bed created so far."""
    found: dict[str, int] = {}
    path = STATE_DIR / "domids"
    if path.exists():
        for line in path.read_text().splitlines():
            name, _, untrusted_id = line.partition(" ")
            if untrusted_id.strip().isdigit():
                found[name] = int(untrusted_id)
    return found
