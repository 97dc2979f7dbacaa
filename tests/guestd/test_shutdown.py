"""Shutdown: every step runs even when one before it fails, every failure is recorded
(``clean`` false, a non-zero exit), a refused unload does not restart the loops, and a change
counted in before the stop but reaching the daemon after it is refused."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest

from xentmem.clock import FakeClock
from xentmem.console import EXIT_FAILURE
from xentmem.control import protocol
from xentmem.guestd import core
from xentmem.guestd.app import Application
from xentmem.guestd.handlers import handle_line
from xentmem.guestd.signals import SignalFlags
from xentmem.notify import Notifier
from xentmem.roots import Roots

PAGE = b"\x5a" * 4096


class ClosingNotifier(Notifier):
    def __init__(self) -> None:
        super().__init__(None)
        self.sent: list[tuple[str, ...]] = []
        self.closed = False

    def send(self, *lines: str) -> bool:
        self.sent.append(lines)
        return True

    def close(self) -> None:
        self.closed = True


def flushing(store: Any, swap_type: int, broken: int, flushed: list[int]) -> Any:
    """The area's sync, noting its type; ``broken``'s file cannot be flushed (EBADF)."""
    real_sync = store.sync

    def sync() -> None:
        if swap_type == broken:
            store.close()
        else:
            flushed.append(swap_type)
        real_sync()

    return sync


def test_a_failing_step_is_recorded_and_the_rest_still_runs(
        tmp_path: Path, fake_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "xentmem.conf"
    config.write_text("options tmem selfballooning_at_load=0 selfshrinking=0\n")
    notifier = ClosingNotifier()
    app = Application(roots=Roots(root=fake_root, run_dir=tmp_path / "run"), config_path=config,
                      config_missing_ok=False, clock=FakeClock(0.0), notifier=notifier,
                      signals=SignalFlags())
    app.start()
    assert app.daemon is not None and app.server is not None
    daemon = app.daemon
    broken = daemon.swap.create(8, "file")["type"]
    kept = daemon.swap.create(8, "file")["type"]
    for swap_type in (broken, kept):
        assert daemon.shim.frontswap.store(swap_type, 3, PAGE) == 0
    flushed: list[int] = []
    for swap_type, store in daemon.swap._stores.items():
        monkeypatch.setattr(store, "sync", flushing(store, swap_type, broken, flushed))

    assert app.shutdown() == EXIT_FAILURE

    record = json.loads((app.state_dir / "shutdown.json").read_text())
    assert record["clean"] is False and record["state"] == "stopped"
    assert record["repatriated"] == 2  # the unload itself went through
    assert any(e.startswith(f"swap area {broken}: swap file ") and "fsync failed" in e
               for e in record["errors"])
    assert record["lost_pages"] == 1  # the unflushed area's page may not be on disk
    assert flushed == [kept]  # the next area was still flushed
    assert not app.server.path.exists()  # the socket still went
    assert notifier.closed and notifier.sent[-1][0] == "STOPPING=1"
    app.signals.close()


def test_a_refused_unload_at_shutdown_does_not_restart_the_loops(make_daemon: Any) -> None:
    daemon = make_daemon(None)  # the real balloon service, flags on
    daemon.load("recording")
    assert daemon.balloon.status()["running"] is True
    swap_type = daemon.swap.create(8)["type"]
    assert daemon.shim.frontswap.store(swap_type, 1, PAGE) == 0
    assert daemon.shim.backend is not None
    daemon.shim.backend.fail_gets = True  # the page cannot come back: unload refused

    summary = daemon.shutdown()

    assert summary["clean"] is False
    assert any(e.startswith("unload: ") for e in summary["errors"])
    assert summary["frontswap_curr_pages"] == 1
    status = daemon.balloon.status()
    assert status["running"] is False, "the refused unload restarted the balloon loop"


@pytest.mark.parametrize(("op", "args"), [
    ("backend.load", {"name": "recording"}),
    ("backend.unload", {}),
    ("params.set", {"name": "selfballoon_interval", "value": 9}),
    ("frontswap.init", {"pages": 8, "backing": "file"}),
    ("config.reload", {}),
])
def test_a_change_counted_in_before_the_stop_does_not_run_after_it(
        make_daemon: Any, monkeypatch: pytest.MonkeyPatch, op: str, args: dict[str, Any]
) -> None:
    """A request counted in before the stop began (so the drain waited for it) but held up
    until the stop was done (the drain timed out; it waited behind the unload) is refused
    ``shutting_down`` and changes nothing: no backend loaded into a stopped daemon, no knob
    set, no swap area made after the areas were flushed."""
    daemon = make_daemon(None, balloon_loops=False)
    if op == "backend.unload":
        daemon.load("recording")
    counted, go = threading.Event(), threading.Event()
    begin = daemon.begin

    def begin_then_wait(mutates: bool) -> bool:  # the request thread, scheduled late
        admitted = begin(mutates)
        counted.set()
        assert go.wait(10.0)
        return admitted

    monkeypatch.setattr(daemon, "begin", begin_then_wait)
    monkeypatch.setattr(core, "DRAIN_TIMEOUT_S", 0.0)  # it is still in flight: do not wait
    line = json.dumps({"v": 1, "id": 1, "op": op, "args": args}).encode()
    replies: list[bytes] = []
    request = threading.Thread(target=lambda: replies.append(handle_line(daemon, line)))
    request.start()
    assert counted.wait(10.0)
    interval = daemon.balloon.knobs.get("selfballoon_interval")

    summary = daemon.shutdown()
    go.set()
    request.join(10.0)

    assert not request.is_alive()
    reply = json.loads(replies[0])
    assert reply.get("error", {}).get("code") == protocol.SHUTTING_DOWN, reply
    assert daemon.state == "stopped" and summary["state"] == "stopped"
    assert daemon.shim.backend is None
    assert daemon.balloon.knobs.get("selfballoon_interval") == interval
    assert daemon.shim.frontswap.swap_types() == []
    assert not (daemon.state_dir / "swap" / "type-0.swap").exists()
