"""The daemon publishes the balloon loop's view to the guest's own xenstore area
(``data/selfballoon/``), against our xenstored; a failing xenstore never fails a tick."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

from xentmem.clock import FakeClock
from xentmem.errors import XenStoreError
from xentmem.guestd.balloon import make_balloon
from xentmem.guestd.config import Config
from xentmem.guestd.core import Daemon
from xentmem.guestd.publish import XenstorePublisher, xenstore_publisher
from xentmem.mock_xenstored.server import XsServer
from xentmem.roots import Roots

REAL_WAIT_S = 10.0
HOME = "/local/domain/5"
PUBLISHED = ("goal_kb", "target_kb", "committed_kb", "frontswap_pages", "mode")


class ParkedClock(FakeClock):
    """The balloon worker never ticks on its own (its wait ends with its stop, bounded):
    the test ticks the loop itself, once, and knows when it is done."""

    def wait(self, stop: threading.Event, timeout: float) -> bool:
        return stop.wait(REAL_WAIT_S)


def daemon_with_xenstore(tmp_path: Path, fake_root: Path, socket: Path) -> Daemon:
    roots = Roots(root=fake_root, run_dir=tmp_path / "run", xenstore_socket=socket)
    clock = ParkedClock(1000.0)
    daemon = Daemon(roots=roots, clock=clock, config=Config(),
                    balloon=make_balloon(roots, clock, {}), state_dir=tmp_path / "state")
    daemon.load("zcache")
    return daemon


def test_the_guests_view_lands_in_its_own_data_area(xs_server: XsServer, tmp_path: Path,
                                                    fake_root: Path) -> None:
    guest_socket = xs_server.prepare_domain(5)
    before = xs_server.snapshot()
    daemon = daemon_with_xenstore(tmp_path, fake_root, guest_socket)
    try:
        loop: Any = daemon.balloon.loop
        record = loop.tick()
        assert record.error is None and record.report_only  # no balloon driver in fake_root
        nodes = xs_server.snapshot()
        values = {key: nodes[f"{HOME}/data/selfballoon/{key}"][0] for key in PUBLISHED}
        assert values["mode"] == b"report-only"
        assert values["target_kb"] == str(record.target_kb).encode()
        assert values["goal_kb"] == str(record.balloon.goal_kb).encode()
        assert values["frontswap_pages"] == b"0"
        # Only data/selfballoon/ changed: nothing under memory/ or anywhere else.
        changed = {path for path in nodes if before.get(path) != nodes[path]}
        assert changed == {f"{HOME}/data/selfballoon"} | {
            f"{HOME}/data/selfballoon/{key}" for key in PUBLISHED}
        assert nodes[f"{HOME}/data/selfballoon/mode"][1].startswith("n5")  # the guest's own
        assert loop.counters()["publish_errors"] == 0
    finally:
        summary = daemon.shutdown()
    assert summary["clean"] is True


def test_a_xenstore_that_is_not_there_never_fails_a_tick(tmp_path: Path,
                                                         fake_root: Path) -> None:
    daemon = daemon_with_xenstore(tmp_path, fake_root, tmp_path / "no-xenstored.sock")
    try:
        loop: Any = daemon.balloon.loop
        first, second = loop.tick(), loop.tick()
        assert first.error is None and second.error is None
        assert first.target_kb is not None and second.target_kb == first.target_kb
        assert loop.counters()["publish_errors"] == 2  # the second failed fast (no retry yet)
        assert loop.counters()["errors"] == 0
    finally:
        daemon.shutdown()


def test_a_publisher_reconnects_after_xenstore_comes_back(xs_server: XsServer) -> None:
    clock = FakeClock(0.0)
    missing = xs_server.guest_socket(7)  # not introduced yet: nobody listens
    publisher = XenstorePublisher({"socket_path": missing}, clock=clock, retry_after_s=30.0)
    try:
        with pytest.raises(XenStoreError, match="cannot connect"):
            publisher.write("data/selfballoon/mode", "active")
        with pytest.raises(XenStoreError, match="unreachable; next try in 30s"):
            publisher.write("data/selfballoon/mode", "active")  # fails fast, no connect
        xs_server.prepare_domain(7)
        clock.advance(31.0)
        publisher.write("data/selfballoon/mode", "active")
        assert xs_server.snapshot()["/local/domain/7/data/selfballoon/mode"][0] == b"active"
    finally:
        publisher.close()


def test_a_publisher_only_where_there_is_a_xenstore(tmp_path: Path, fake_root: Path) -> None:
    assert xenstore_publisher(Roots(root=fake_root)) is None  # no Xen, no socket
    configured = xenstore_publisher(Roots(root=fake_root, xenstore_socket=tmp_path / "xs"))
    assert configured is not None and configured.where == str(tmp_path / "xs")
    (fake_root / "sys/hypervisor").mkdir(parents=True)
    (fake_root / "sys/hypervisor/type").write_text("xen\n")
    assert xenstore_publisher(Roots(root=fake_root)) is None  # a Xen guest without xenbus
    (fake_root / "dev/xen").mkdir(parents=True)
    (fake_root / "dev/xen/xenbus").write_text("")
    guest = xenstore_publisher(Roots(root=fake_root))
    assert guest is not None and guest.where == str(fake_root / "dev/xen/xenbus")


def test_a_slow_xenstore_still_gets_the_view(xs_server: XsServer) -> None:
    """Fails before: a write gave xenstore 1 s, so a loaded dom0 lost every tick's view."""
    socket = xs_server.prepare_domain(7)
    xs_server.faults.delay(7, 1.5)  # a loaded dom0's xenstored: slow, but it answers
    publisher = XenstorePublisher({"socket_path": socket}, clock=FakeClock(0.0))
    try:
        publisher.write("data/selfballoon/mode", "active")
        assert xs_server.snapshot()["/local/domain/7/data/selfballoon/mode"][0] == b"active"
    finally:
        xs_server.faults.delay(7, 0)
        publisher.close()


def test_an_unanswered_write_costs_one_wait_and_keeps_the_session(xs_server: XsServer) -> None:
    """Fails before: each write after a timeout opened a new session and waited again, so a
    hung xenstore cost a tick one wait per published value."""
    clock = FakeClock(0.0)
    socket = xs_server.prepare_domain(7)
    publisher = XenstorePublisher({"socket_path": socket}, clock=clock, retry_after_s=30.0)
    try:
        publisher.write("data/selfballoon/mode", "report-only")  # the session is open
        session = publisher._session
        assert session is not None
        xs_server.faults.mute(7)  # hung: requests are swallowed
        session.timeout = 0.05  # short only while nobody answers
        with pytest.raises(XenStoreError, match="no answer"):
            publisher.write("data/selfballoon/mode", "active")
        with pytest.raises(XenStoreError, match="did not answer; next try in 30s"):
            publisher.write("data/selfballoon/goal_kb", "1")  # at once, nothing sent
        xs_server.faults.unmute(7)
        session.timeout = REAL_WAIT_S
        clock.advance(31.0)
        publisher.write("data/selfballoon/mode", "active")
        assert publisher._session is session and session.alive
        assert xs_server.snapshot()["/local/domain/7/data/selfballoon/mode"][0] == b"active"
        assert "/local/domain/7/data/selfballoon/goal_kb" not in xs_server.snapshot()
    finally:
        publisher.close()
