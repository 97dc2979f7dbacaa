"""The swap server stays resident: memory locked before the first export (or the export is
refused, nothing made), each serving thread an I/O flusher (or a warning, once), and the real
system calls behave as ``resident.py`` expects of them."""

from __future__ import annotations

import errno
import logging
import threading
from pathlib import Path

import pytest
from fakes.libc import RecordingLibc
from fakes.nbd_raw import RawClient
from fakes.nbd_served import serve

from xentmem.errors import AbiError, BackendError, DaemonStopping
from xentmem.guestd.nbd.fanout import WORKERS
from xentmem.guestd.nbd.resident import (
    MCL_CURRENT,
    MCL_FUTURE,
    MCL_ONFAULT,
    PR_GET_IO_FLUSHER,
    PR_SET_IO_FLUSHER,
    THREAD_STACK_BYTES,
    RealLibc,
    Residency,
    SwapUnsafe,
    io_flusher_for_every_thread,
)
from xentmem.guestd.swap import MAX_SWAP_TYPES

PAGE = 4096
WRITE, DISC = 1, 2


def test_memory_is_locked_once_at_the_first_export(short_dir: Path) -> None:
    served = serve(short_dir)
    try:
        assert served.libc.named("mlockall") == []  # a server with no export locks nothing
        served.exports.add(4, "file", name="a")
        served.exports.add(4, "file", name="b")
        assert served.libc.named("mlockall") == [(MCL_CURRENT | MCL_FUTURE | MCL_ONFAULT,)]
        assert served.libc.named("stack_size") == [(THREAD_STACK_BYTES,)]
        assert served.server.describe()["memory_locked"] is True
    finally:
        served.server.stop()
        served.swap.close()


@pytest.mark.parametrize("code", [errno.ENOMEM, errno.EPERM])
def test_an_export_is_refused_when_memory_cannot_be_locked(
        short_dir: Path, code: int, caplog: pytest.LogCaptureFixture) -> None:
    libc = RecordingLibc(fail={"mlockall": code})
    served = serve(short_dir, libc=libc)
    try:
        areas = served.shim.frontswap.describe()["swap_types"]
        with caplog.at_level(logging.ERROR), pytest.raises(SwapUnsafe) as refused:
            served.exports.add(4, "file", name="a")
        assert "RLIMIT_MEMLOCK" in str(refused.value) and "CAP_IPC_LOCK" in str(refused.value)
        assert "cannot lock xentmemd in memory" in caplog.text
        # Refused means unchanged: no export, no swap area, the thread stacks as they were.
        assert served.exports.names() == []
        assert served.shim.frontswap.describe()["swap_types"] == areas
        assert not any((short_dir / "swap").glob("*"))
        assert libc.named("stack_size") == []
        assert served.server.describe()["memory_locked"] is False
        del libc.fail["mlockall"]  # the limit raised: the next add locks and serves
        served.exports.add(4, "file", name="a")
        assert served.exports.names() == ["a"]
    finally:
        served.server.stop()
        served.swap.close()


def test_an_add_refused_for_its_swap_type_locks_nothing(short_dir: Path) -> None:
    """Fails before: the memory was locked before the swap area was made, so an add
    refused for its swap type (taken, or none free) or because the daemon is stopping
    left the whole daemon pinned in memory while it served no swap."""
    served = serve(short_dir)
    try:
        served.swap.create(1, "memory", swap_type=1)  # a frontswap client's area
        with pytest.raises(AbiError, match="swap type 1 is already initialised"):
            served.exports.add(4, "memory", swap_type=1)
        for swap_type in set(range(MAX_SWAP_TYPES)) - {1}:
            served.swap.create(1, "memory", swap_type=swap_type)
        with pytest.raises(AbiError, match="all 32 swap types are in use"):
            served.exports.add(4, "memory", name="late")
        served.swap.refuse_new("the daemon is stopping")
        with pytest.raises(DaemonStopping):
            served.exports.add(4, "memory", name="later")
        assert served.libc.named("mlockall") == [] and served.exports.names() == []
        assert served.server.describe()["memory_locked"] is False
    finally:
        served.server.stop()
        served.swap.close()


def test_an_add_that_fails_after_the_lock_undoes_it(short_dir: Path, monkeypatch) -> None:
    """Fails before: an area that could not be made (a disk error, only trying tells) left
    the memory locked; this add locked it, so it unlocks it, and the thread stacks are as
    they were.  An add after an export exists never unlocks (that export needs the lock)."""
    served = serve(short_dir)
    try:
        real_create = served.swap.create

        def failing(*args, **kwargs):
            raise BackendError("swap directory: No space left on device")
        monkeypatch.setattr(served.swap, "create", failing)
        with pytest.raises(BackendError):
            served.exports.add(4, "file", name="a")
        assert served.libc.named("mlockall") == [(MCL_CURRENT | MCL_FUTURE | MCL_ONFAULT,)]
        assert served.libc.named("munlockall") == [()]
        assert served.libc.named("stack_size") == [(THREAD_STACK_BYTES,), (0,)]
        assert served.server.describe()["memory_locked"] is False
        monkeypatch.setattr(served.swap, "create", real_create)
        served.exports.add(4, "file", name="a")
        monkeypatch.setattr(served.swap, "create", failing)
        with pytest.raises(BackendError):
            served.exports.add(4, "file", name="b")
        assert served.libc.named("munlockall") == [()]  # only the first time
        assert served.server.describe()["memory_locked"] is True
    finally:
        served.server.stop()
        served.swap.close()


def test_a_refused_munlockall_leaves_the_daemon_locked(short_dir: Path) -> None:
    libc = RecordingLibc(fail={"munlockall": errno.EPERM})
    residency = Residency(libc, set_stack_size=libc.stack_size)
    assert residency.lock_memory() is True and residency.lock_memory() is False
    residency.unlock_memory()
    assert residency.locked and libc.named("stack_size") == [(THREAD_STACK_BYTES,)]


def _serve_one_connection(served, handle: int) -> None:
    client = RawClient(served.socket)
    client.connect("e")
    client.request(WRITE, 0, PAGE, handle=handle, payload=b"\7" * PAGE)
    assert client.reply() == (0, handle)
    client.request(DISC, 0, 0)
    assert client.closed_by_server()
    client.close()


def test_each_connection_thread_is_marked_an_io_flusher(short_dir: Path) -> None:
    served = serve(short_dir)
    try:
        served.exports.add(4, "file", name="e")
        _serve_one_connection(served, 1)
        _serve_one_connection(served, 2)
        served.wait_connections(0)
        marks = [(args, thread) for name, args, thread in served.libc.calls
                 if name == "prctl"]
        assert [args for args, _ in marks] == [(PR_SET_IO_FLUSHER, 1)] * (3 + WORKERS)
        threads = [thread for _, thread in marks]
        assert threads[0] == "nbd-accept"  # it allocates each connection's buffers
        # The page threads are made (and marked) by the first connection, once.
        assert sorted(t for t in threads if t.startswith("nbd-conn-")) == [
            "nbd-conn-1", "nbd-conn-2"]
        assert sorted(t for t in threads if t.startswith("nbd-page-")) == sorted(
            f"nbd-page-{n}" for n in range(WORKERS))
        assert served.server.describe()["io_flushers"] == 3 + WORKERS
    finally:
        served.server.stop()
        served.swap.close()


@pytest.mark.parametrize("code, why", [(errno.EPERM, "CAP_SYS_RESOURCE"),
                                       (errno.EINVAL, "older than 5.6")])
def test_without_io_flusher_the_threads_serve_on_and_it_is_said_once(
        short_dir: Path, code: int, why: str, caplog: pytest.LogCaptureFixture) -> None:
    served = serve(short_dir, libc=RecordingLibc(fail={"prctl": code}))
    try:
        served.exports.add(4, "file", name="e")
        with caplog.at_level(logging.WARNING):
            _serve_one_connection(served, 1)
            _serve_one_connection(served, 2)
            served.wait_connections(0)
        warnings = [r for r in caplog.records if "PR_SET_IO_FLUSHER" in r.getMessage()]
        assert len(warnings) == 1 and why in warnings[0].getMessage()
        described = served.server.describe()
        assert described["io_flusher_refused"] == 3 + WORKERS
        assert described["io_flushers"] == 0
    finally:
        served.server.stop()
        served.swap.close()


def test_the_real_prctl_marks_a_thread_an_io_flusher() -> None:
    """As root on Linux >= 5.6: set on a thread of its own, read back on that thread."""
    libc = RealLibc()
    seen: dict[str, object] = {}

    def mark() -> None:
        try:
            seen["before"] = libc.prctl(PR_GET_IO_FLUSHER, 0)
            libc.prctl(PR_SET_IO_FLUSHER, 1)
            seen["after"] = libc.prctl(PR_GET_IO_FLUSHER, 0)
        except OSError as exc:
            seen["error"] = exc

    thread = threading.Thread(target=mark, name="io-flusher-probe")
    thread.start()
    thread.join(60)
    error = seen.get("error")
    if isinstance(error, OSError) and error.errno == errno.EINVAL:
        pytest.skip(f"this kernel has no PR_SET_IO_FLUSHER (Linux < 5.6): {error}")
    if isinstance(error, OSError) and error.errno == errno.EPERM:
        pytest.skip(f"PR_SET_IO_FLUSHER needs CAP_SYS_RESOURCE, which this process lacks "
                    f"(not root, or a container that drops it): {error}")
    assert error is None, error
    assert seen == {"before": 0, "after": 1}
    assert libc.prctl(PR_GET_IO_FLUSHER, 0) == 0  # per thread: this one is not marked


def test_the_real_mlockall_reports_its_errno() -> None:
    """Flags the kernel refuses (none): an OSError with EINVAL, and nothing locked."""
    with pytest.raises(OSError) as refused:
        RealLibc().mlockall(0)
    assert refused.value.errno == errno.EINVAL


def test_the_refusal_reaches_a_control_client_as_backend_error() -> None:
    """What ``xentmem swap add`` shows (docs/nbd.md names the code)."""
    from xentmem.control import protocol
    from xentmem.guestd.handlers import error_for

    error = error_for(SwapUnsafe("cannot lock xentmemd in memory"), "nbd.add")
    assert error.code == protocol.BACKEND_ERROR and "cannot lock" in str(error)


def test_the_whole_daemon_is_an_io_flusher_or_says_why_not(
        caplog: pytest.LogCaptureFixture) -> None:
    libc = RecordingLibc()
    assert io_flusher_for_every_thread(libc) is True
    assert libc.named("prctl") == [(PR_SET_IO_FLUSHER, 1)]
    refused = RecordingLibc(fail={"prctl": errno.EPERM})
    with caplog.at_level(logging.WARNING):
        assert io_flusher_for_every_thread(refused) is False
    assert "only the NBD threads will be marked" in caplog.text
