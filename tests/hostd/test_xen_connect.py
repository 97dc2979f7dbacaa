"""The ``xen`` backend's load on a slow host: the handshake and the probe wait
``connect_timeout_ms`` (a loaded dom0 takes seconds per step), not the ops' ``timeout_ms``."""

from __future__ import annotations

import contextlib
import queue
import threading
from typing import Any

import pytest
from xenhost import WAIT_S, TmemHost

from xentmem.guest.backends import xen
from xentmem.guest.backends.xen import XenBackend
from xentmem.tmem.abi import XenbusState

FRONTEND = "/local/domain/5/device/tmem/0"


def wait_for_value(host: TmemHost, path: str, wanted: bytes, done: threading.Event) -> bytes:
    """Block (on a watch, bounded) until ``path`` reads ``wanted`` or ``done`` is set."""
    client = host.xs.dom0
    monitor = client.monitor()
    token = b"xen-connect-wait"
    monitor.watch(path.encode(), token)
    try:
        for _ in range(200):
            value = client.read(path.encode()) if client.exists(path.encode()) else b""
            if value == wanted or done.is_set():
                return value
            with contextlib.suppress(queue.Empty):  # read once more, then give up
                monitor.events.get(timeout=WAIT_S)
        return value
    finally:
        monitor.unwatch(path.encode(), token)


def test_a_host_slower_than_the_op_timeout_still_completes_the_handshake(
        tmem_host: TmemHost) -> None:
    """Fails before connect_timeout_ms: the 10 ms op timeout bounded every handshake step."""
    roots = tmem_host.guest(5)
    tmem_host.halt()  # the host makes no step until it is resumed: as slow as it gets
    backend = XenBackend({"timeout_ms": 10}, roots=roots)
    errors: list[BaseException] = []
    done = threading.Event()

    def load() -> None:
        try:
            backend.connect()
        except BaseException as exc:  # reported by the assertion below
            errors.append(exc)
        finally:
            done.set()

    thread = threading.Thread(target=load, name="load")
    thread.start()
    try:
        # The guest went as far as it can alone (Initialised), and waits for Connected.
        state = wait_for_value(tmem_host, f"{FRONTEND}/state",
                               b"%d" % XenbusState.INITIALISED, done)
        assert not errors, f"the load gave up on a slow host: {errors[0]}"
        assert state == b"%d" % XenbusState.INITIALISED
        tmem_host.resume()
        thread.join(WAIT_S * 3)
        assert not thread.is_alive()
        assert not errors, f"the load gave up on a slow host: {errors[0]}"
        info = backend.describe()
        assert (info["state"], info["otherend_state"]) == ("Connected", "Connected")
        assert backend._front is not None and backend._front.timeout == 0.01  # ops: timeout_ms
    finally:
        if tmem_host.thread is None:
            tmem_host.resume()
        thread.join(WAIT_S * 3)
        backend.remove()


def test_the_probe_waits_for_xenstore_as_long_as_a_handshake(
        tmem_host: TmemHost, monkeypatch: pytest.MonkeyPatch) -> None:
    """Fails before: the probe gave xenstore 2 s, so a loaded dom0 made ``auto`` pick zcache."""
    roots = tmem_host.guest(5)
    timeouts: list[float] = []
    real = xen.XsSession

    def spy(*args: Any, **kwargs: Any) -> Any:
        timeouts.append(kwargs["timeout"])
        return real(*args, **kwargs)

    monkeypatch.setattr(xen, "XsSession", spy)
    XenBackend.probe(roots)
    assert timeouts == [XenBackend.params["connect_timeout_ms"].default / 1000.0]
    assert timeouts[0] >= 30.0
