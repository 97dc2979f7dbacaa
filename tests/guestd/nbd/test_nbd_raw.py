"""What libnbd will not send: bad magic, unknown flags and options, malformed option data,
unaligned and oversized requests, half a payload.  Each gets what ``doc/proto.md`` names (an
error reply, or the end of that session), and the export is unchanged and still served."""

from __future__ import annotations

import errno
import logging
import struct
import threading
from pathlib import Path

import pytest
from fakes.nbd_raw import IHAVEOPT, RawClient
from fakes.nbd_served import WAIT_S, Served, serve

from xentmem.clock import FakeClock
from xentmem.errors import BackendError
from xentmem.guest.backends.zcache import ZcacheBackend
from xentmem.guest.frontends import FileBacking, swapfile
from xentmem.guest.shim import Shim
from xentmem.guestd.nbd import proto
from xentmem.guestd.nbd.exports import ExportBusy
from xentmem.guestd.swap import SwapAreas
from xentmem.roots import Roots

PAGE = 4096
READ, WRITE, DISC, FLUSH, TRIM, CACHE, WRITE_ZEROES, BLOCK_STATUS = range(8)
ACK, SERVER, INFO = 1, 2, 3
ERR_UNSUP, ERR_INVALID, ERR_UNKNOWN = (1 << 31) + 1, (1 << 31) + 3, (1 << 31) + 6
EINVAL, ENOSPC, EIO = 22, 28, 5


@pytest.fixture
def export(served: Served) -> Served:
    """An export ``e`` of 8 pages, page i holding bytes of value i + 1."""
    served.exports.add(8, "file", name="e")
    client = RawClient(served.socket)
    client.connect("e")
    for i in range(8):
        client.request(WRITE, i * PAGE, PAGE, handle=i, payload=bytes([i + 1]) * PAGE)
        assert client.reply() == (0, i)
    client.request(DISC, 0, 0)
    assert client.closed_by_server()
    client.close()
    return served


def intact(served: Served) -> None:
    """A new connection reads every page as the fixture wrote it."""
    client = RawClient(served.socket)
    client.connect("e")
    client.request(READ, 0, 8 * PAGE, handle=77)
    assert client.reply() == (0, 77)
    data = client.recv_exact(8 * PAGE)
    assert data == b"".join(bytes([i + 1]) * PAGE for i in range(8))
    client.close()


def test_the_greeting_and_export_name(export: Served) -> None:
    client = RawClient(export.socket)
    assert client.greeting() == 3  # FIXED_NEWSTYLE | NO_ZEROES
    client.sock.sendall(struct.pack(">I", 1))  # fixed newstyle, but zeroes wanted
    client.option(1, b"e")  # NBD_OPT_EXPORT_NAME
    size, flags = struct.unpack(">QH", client.recv_exact(10))
    assert size == 8 * PAGE and flags == proto.TRANSMISSION_FLAGS
    assert client.recv_exact(124) == bytes(124)
    client.request(READ, PAGE, PAGE, handle=5)
    assert client.reply() == (0, 5)
    assert client.recv_exact(PAGE) == b"\2" * PAGE
    client.close()


def test_export_name_of_an_unknown_export_ends_the_session(export: Served) -> None:
    client = RawClient(export.socket)
    client.start()
    client.option(1, b"nosuch")
    assert client.closed_by_server()
    intact(export)


@pytest.mark.parametrize("option", [5, 8, 9, 10, 4, 99, 0xFFFFFFFF])
def test_unknown_options_are_unsupported_and_the_next_one_parses(export: Served,
                                                                 option: int) -> None:
    client = RawClient(export.socket)
    client.start()
    client.option(option, b"some data")
    reply = client.option_reply()
    assert reply[:2] == (option, ERR_UNSUP)
    final = client.go("e")[-1]
    assert final[1] == ACK
    client.close()


@pytest.mark.parametrize(("option", "data", "reply"), [
    (7, b"\0\0\0\x09e\0\0", ERR_INVALID),  # GO: name longer than the data
    (6, b"\0\0", ERR_INVALID),  # INFO: too short
    (7, b"\0\0\0\x01e\0\x02\0\x03", ERR_INVALID),  # two requests announced, one sent
    (7, b"\0\0\0\x01x\0\0", ERR_UNKNOWN),  # no such export
    (7, b"\0\0\0\0\0\0", ERR_UNKNOWN),  # no default export
    (3, b"x", ERR_INVALID),  # LIST takes no data
])
def test_malformed_options_get_an_error_and_haggling_goes_on(export: Served, option: int,
                                                            data: bytes, reply: int) -> None:
    client = RawClient(export.socket)
    client.start()
    client.option(option, data)
    assert client.replies_until_final()[-1][:2] == (option, reply)
    client.option(3)  # LIST
    replies = client.replies_until_final()
    assert [r[1] for r in replies] == [SERVER, ACK]
    assert replies[0][2] == b"\0\0\0\x01e"
    client.option(2)  # ABORT: acknowledged, then the server closes
    assert client.option_reply()[:2] == (2, ACK)
    assert client.closed_by_server()


def test_go_answers_the_information_asked_for(export: Served) -> None:
    client = RawClient(export.socket)
    client.start()
    replies = client.go("e", requests=(1, 2, 3, 999))  # NAME, DESCRIPTION, BLOCK_SIZE, ?
    infos = {struct.unpack(">H", data[:2])[0]: data[2:] for _, kind, data in replies
             if kind == INFO}
    assert replies[-1][1] == ACK
    assert struct.unpack(">QH", infos[0]) == (8 * PAGE, proto.TRANSMISSION_FLAGS)
    assert struct.unpack(">III", infos[3]) == (PAGE, PAGE, proto.MAX_BLOCK)
    assert infos[1] == b"e" and b"swap type" in infos[2]
    client.close()


@pytest.mark.parametrize("send", [
    lambda c: c.sock.sendall(struct.pack(">I", 4)),  # an unknown client flag
    lambda c: (c.sock.sendall(struct.pack(">I", 3)), c.option(7, b"", magic=0x1234)),
    lambda c: (c.sock.sendall(struct.pack(">I", 3)), c.sock.sendall(
        struct.pack(">QII", 0x49484156454F5054, 7, proto.MAX_OPTION_DATA + 1))),
])
def test_handshake_violations_end_only_that_session(export: Served, send) -> None:
    client = RawClient(export.socket)
    client.greeting()
    send(client)
    assert client.closed_by_server()
    intact(export)


def test_the_handshake_limit_counts_from_its_start_not_per_receive(short_dir) -> None:
    """A client whose bytes each come well within the limit is cut once its handshake as a
    whole took longer (docs/nbd.md); the limit was once per receive, so a client trickling
    bytes held its connection, one of ``max_connections``, for good.  The server's clock
    is a FakeClock the test moves: nothing waits for time to pass."""
    clock = FakeClock()
    served = serve(short_dir, handshake_timeout_s=600.0, clock=clock)
    try:
        served.exports.add(8, "file", name="e")
        client = RawClient(served.socket)
        client.start()  # the greeting came: the handshake's deadline is set
        clock.advance(300.0)
        client.option(99)  # within the limit: answered, the handshake goes on
        assert client.option_reply()[1] == ERR_UNSUP
        client.sock.sendall(struct.pack(">Q", IHAVEOPT))  # half an option's header
        clock.advance(301.0)  # 601 s in all, though only 301 since the last byte
        client.sock.sendall(b"\0")
        assert client.closed_by_server()
        client.close()
        served.wait_connections(0)
    finally:
        assert served.server.stop(WAIT_S)
        served.swap.close()


def test_a_client_trickling_its_handshake_gives_its_slot_back(short_dir) -> None:
    """The same on the real clock: a limit of 0.5 s, one connection allowed, a client that
    sends its flags, an option's header, then a byte of the option's data whenever 50 ms
    pass without an answer (at most 600 bytes, 30 s); it is cut, and its slot taken by
    the next client (greeted, not refused)."""
    served = serve(short_dir, handshake_timeout_s=0.5, max_connections=1)
    try:
        slow = RawClient(served.socket)
        slow.greeting()
        slow.sock.settimeout(0.05)
        trickle = [struct.pack(">IQII", 3, IHAVEOPT, 6, 4000)] + [b"x"] * 600  # INFO
        closed = False
        for chunk in trickle:
            try:
                slow.sock.sendall(chunk)
                closed = slow.sock.recv(1) == b""
            except TimeoutError:
                continue
            except (BrokenPipeError, ConnectionResetError):
                closed = True
            break
        assert closed
        slow.close()
        served.wait_connections(0)
        client = RawClient(served.socket)
        client.greeting()
        client.close()
    finally:
        assert served.server.stop(WAIT_S)
        served.swap.close()


def test_a_bad_request_magic_ends_the_session(export: Served) -> None:
    client = RawClient(export.socket)
    client.connect("e")
    client.request(WRITE, 0, PAGE, payload=b"\xff" * PAGE, magic=0x25609514)
    assert client.closed_by_server()
    intact(export)


@pytest.mark.parametrize(("cmd", "offset", "length", "flags", "payload", "error"), [
    (WRITE, 512, PAGE, 0, b"\xee" * PAGE, EINVAL),  # unaligned: payload dropped
    (WRITE, 0, proto.MAX_BLOCK + PAGE, 0, b"\xee" * (proto.MAX_BLOCK + PAGE), EINVAL),
    (WRITE, 7 * PAGE, 2 * PAGE, 0, b"\xee" * 2 * PAGE, ENOSPC),
    (WRITE, 0, PAGE, 4, b"\xee" * PAGE, EINVAL),  # DF on a write
    (READ, 0, proto.MAX_BLOCK + PAGE, 0, b"", EINVAL),  # oversized
    (READ, 0, PAGE, 8, b"", EINVAL),  # REQ_ONE on a read
    (TRIM, 4 * PAGE, 2 * PAGE + 1, 0, b"", EINVAL),
    (WRITE_ZEROES, 0, proto.MAX_BLOCK + PAGE, 0, b"", EINVAL),
    (WRITE_ZEROES, 0, PAGE, 16, b"", EINVAL),  # FAST_ZERO: not offered
    (FLUSH, 0, PAGE, 0, b"", EINVAL),  # a flush's offset and length are zero
    (CACHE, 0, PAGE, 0, b"", EINVAL),  # not offered
    (BLOCK_STATUS, 0, PAGE, 0, b"", EINVAL),  # no meta context
    (9, 0, PAGE, 0, b"", EINVAL),  # unknown command
])
def test_refused_requests_change_nothing(export: Served, cmd: int, offset: int, length: int,
                                         flags: int, payload: bytes, error: int) -> None:
    client = RawClient(export.socket)
    client.connect("e")
    client.request(cmd, offset, length, handle=9, flags=flags, payload=payload)
    assert client.reply() == (error, 9)
    client.request(READ, 0, PAGE, handle=10)  # the stream is still in step
    assert client.reply() == (0, 10)
    assert client.recv_exact(PAGE) == b"\1" * PAGE
    client.close()
    intact(export)


def test_a_denial_of_service_write_ends_the_session(export: Served) -> None:
    client = RawClient(export.socket)
    client.connect("e")
    client.request(WRITE, 0, proto.DOS_PAYLOAD)  # no payload follows: not read at all
    assert client.closed_by_server()
    intact(export)


def test_zero_length_requests_succeed_and_change_nothing(export: Served) -> None:
    client = RawClient(export.socket)
    client.connect("e")
    for handle, cmd in enumerate((READ, WRITE, TRIM, WRITE_ZEROES), 1):
        client.request(cmd, PAGE, 0, handle=handle)
        assert client.reply() == (0, handle)
    client.close()
    intact(export)


def test_a_client_that_vanishes_mid_write_changes_nothing(export: Served) -> None:
    client = RawClient(export.socket)
    client.connect("e")
    client.request(WRITE, 0, 3 * PAGE, handle=1)
    client.sock.sendall(b"\xaa" * (2 * PAGE + 100))  # two pages and a bit, then gone
    client.close()
    export.wait_connections(0)
    intact(export)


def test_pipelined_requests_are_answered_in_full(export: Served) -> None:
    """Many requests sent before any answer is read (fio's iodepth): one answer each."""
    client = RawClient(export.socket)
    client.connect("e")
    burst = b"".join(struct.pack(">IHHQQI", 0x25609513, 0, READ, h, (h % 8) * PAGE, PAGE)
                     for h in range(64))
    client.sock.sendall(burst)
    for h in range(64):
        assert client.reply() == (0, h)
        assert client.recv_exact(PAGE) == bytes([h % 8 + 1]) * PAGE
    client.close()


def test_reads_and_writes_are_counted_page_by_page(export: Served) -> None:
    """The export's counters (``nbd.list``) after the fixture's 8 one-page writes, a
    two-page write and one read of every page."""
    client = RawClient(export.socket)
    client.connect("e")
    client.request(WRITE, 2 * PAGE, 2 * PAGE, handle=9, payload=b"\3" * PAGE + b"\4" * PAGE)
    assert client.reply() == (0, 9)
    client.close()
    intact(export)
    counts = export.exports.get("e").describe()["counts"]
    assert counts["writes"] == 9 and counts["reads"] == 1
    assert counts["pages_to_tmem"] + counts["pages_to_backing"] == 10


@pytest.mark.parametrize("backend", [None, "zcache"])
def test_a_full_backing_store_is_enospc_and_keeps_the_old_page(
        short_dir, caplog: pytest.LogCaptureFixture, backend: str | None) -> None:
    """tmem refuses (no backend, or zcache refusing its puts) and the disk is full: the
    kernel's page gets an I/O error, counted and logged, and the slot's old page stays
    (docs/nbd.md); with zcache, whose pages outlive it, it once went before the put."""
    served = serve(short_dir, backend=backend)  # every page goes to the backing file
    try:
        ops = served.shim.frontswap.ops
        if ops is not None:
            ops.put_page = lambda *args: -errno.ENOMEM  # type: ignore[method-assign]
        served.exports.add(4, "file", name="e")
        client = RawClient(served.socket)
        client.connect("e")
        client.request(WRITE, 0, PAGE, handle=1, payload=b"\1" * PAGE)
        assert client.reply() == (0, 1)
        backing = served.swap.store_of(0)

        def full(offset: int, data: bytes) -> None:
            raise BackendError("swap file: write refused") from OSError(errno.ENOSPC, "full")
        backing.write = full  # type: ignore[method-assign]
        with caplog.at_level(logging.ERROR):
            client.request(WRITE, 0, PAGE, handle=2, payload=b"\2" * PAGE)
            assert client.reply() == (ENOSPC, 2)
        assert served.exports.get("e").describe()["counts"]["write_errors"] == 1
        assert "page 0 not stored" in caplog.text
        client.request(READ, 0, PAGE, handle=3)
        assert client.reply() == (0, 3)
        assert client.recv_exact(PAGE) == b"\1" * PAGE
        client.close()
    finally:
        served.server.stop()
        served.swap.close()


def fail_index_writes(store: FileBacking, monkeypatch: pytest.MonkeyPatch, *,
                      clears_only: bool) -> None:
    """Writes of the area file's index fail with EIO (only those that clear an entry when
    ``clears_only``): a disk that takes the pages but not their index."""
    real_pwrite = store._pwrite
    index = range(store.layout.index_start, store.layout.data_start)

    def index_eio(data: bytes, position: int) -> None:
        if (data == swapfile.EMPTY_ENTRY) if clears_only else (position in index):
            raise OSError(errno.EIO, "injected")
        real_pwrite(data, position)
    monkeypatch.setattr(store, "_pwrite", index_eio)


def test_a_write_zeroes_whose_index_entry_stays_is_eio_a_trim_is_not(
        short_dir, monkeypatch) -> None:
    """Every page in the area's file (no backend), and clearing an index entry fails: a
    WRITE_ZEROES is EIO and leaves the page as the file has it (it was acknowledged, a
    flush after it too, and a restart read the old page back).  A TRIM may leave old data:
    it is answered done, and a WRITE_ZEROES of its page after it is EIO as well.  Once the
    index can be written, a WRITE_ZEROES of both pages succeeds and the file, attached
    again, names neither."""
    served = serve(short_dir, backend=None)
    try:
        served.exports.add(4, "file", name="e")
        store = served.swap.store_of(served.exports.get("e").swap_type)
        client = RawClient(served.socket)
        client.connect("e")
        client.request(WRITE, 0, 2 * PAGE, handle=1, payload=b"A" * PAGE + b"B" * PAGE)
        assert client.reply() == (0, 1)
        fail_index_writes(store, monkeypatch, clears_only=True)
        client.request(WRITE_ZEROES, 0, PAGE, handle=2)
        assert client.reply() == (EIO, 2)
        client.request(READ, 0, PAGE, handle=3)  # refused: the page stays as the file has it
        assert client.reply() == (0, 3)
        assert client.recv_exact(PAGE) == b"A" * PAGE
        client.request(TRIM, PAGE, PAGE, handle=4)
        assert client.reply() == (0, 4)
        client.request(WRITE_ZEROES, PAGE, PAGE, handle=5)
        assert client.reply() == (EIO, 5)
        monkeypatch.undo()
        client.request(WRITE_ZEROES, 0, 2 * PAGE, handle=6, flags=1)  # FUA
        assert client.reply() == (0, 6)
        client.close()
        assert served.server.stop(WAIT_S)
    finally:
        served.server.stop(WAIT_S)
        served.swap.close()
    again = FileBacking.attach(store.path)
    try:
        assert again.offsets() == [] and not again.damaged
    finally:
        again.close()


def kill_and_restart(served: Served, short_dir: Path) -> tuple[Shim, SwapAreas]:
    """What a kill -9 and the next daemon do (``DaemonCore.begin_run``, then the load): the
    area files and zcache's arena stay as they are; the areas are re-attached, then zcache
    loads and frontswap takes back the pages it kept that the files do not have."""
    backend = served.shim.backend
    assert isinstance(backend, ZcacheBackend) and backend._arena is not None
    served.server.stop(WAIT_S)
    served.swap.close()  # no sync, no "stopped" mark: killed
    backend._arena.close()
    shim = Shim(roots=Roots(run_dir=short_dir / "run"))
    areas = SwapAreas(shim.frontswap, short_dir / "swap")
    assert [a.get("error") for a in areas.reattach()] == [None]
    shim.load("zcache")
    return shim, areas


def read_back(shim: Shim, swap_type: int, offsets: range) -> dict[int, bytes | str]:
    found: dict[int, bytes | str] = {}
    for offset in offsets:
        try:
            found[offset] = shim.frontswap.load(swap_type, offset) or bytes(PAGE)
        except BackendError as exc:
            found[offset] = f"error: {exc}"
    return found


def test_a_write_tmem_takes_whose_older_file_copy_stays_named_reads_back_after_a_kill(
        short_dir, monkeypatch) -> None:
    """Pages 0 and 1 are in the area's file (written before zcache loaded), then WRITEs of
    them go to tmem while clearing an index entry fails: both are answered done, and a
    flush too, so after a kill -9 and a restart on zcache's arena each must read back as
    written.  They did not: the file still named the older pages, and a restart takes the
    file's copy over tmem's, so page 0 read back its older contents; page 1's old slot,
    freed while its entry still named it, went to page 2 (a page tmem refused), so page 1
    read back damaged (EIO)."""
    served = serve(short_dir, backend=None)
    try:
        served.exports.add(4, "file", name="e")
        swap_type = served.exports.get("e").swap_type
        store = served.swap.store_of(swap_type)
        client = RawClient(served.socket)
        client.connect("e")
        client.request(WRITE, 0, 2 * PAGE, handle=1, payload=b"A" * PAGE + b"B" * PAGE)
        assert client.reply() == (0, 1)
        served.shim.load("zcache")
        fail_index_writes(store, monkeypatch, clears_only=True)
        for handle, (offset, data) in enumerate([(0, b"a"), (1, b"b")], start=2):
            client.request(WRITE, offset * PAGE, PAGE, handle=handle, payload=data * PAGE)
            assert client.reply() == (0, handle)
        ops = served.shim.frontswap.ops
        assert ops is not None
        monkeypatch.setattr(ops, "put_page", lambda *args: -errno.ENOMEM)  # to the file
        client.request(WRITE, 2 * PAGE, PAGE, handle=4, payload=b"c" * PAGE)
        assert client.reply() == (0, 4)
        client.request(FLUSH, 0, 0, handle=5)
        assert client.reply() == (0, 5)
        client.close()
        shim, areas = kill_and_restart(served, short_dir)
    finally:
        served.server.stop(WAIT_S)
        served.swap.close()
    try:
        assert read_back(shim, swap_type, range(4)) == {
            0: b"a" * PAGE, 1: b"b" * PAGE, 2: b"c" * PAGE, 3: bytes(PAGE)}
    finally:
        shim.unload()
        areas.close()


def test_a_write_whose_older_file_copy_cannot_go_at_all_is_eio_and_keeps_it(
        short_dir, monkeypatch) -> None:
    """Page 0 is in the area's file; zcache takes a WRITE of it while no index entry can be
    written: the file can neither forget its older copy nor take the new page, so the WRITE
    is EIO, and page 0 reads back its older contents, before and after a kill -9 and a
    restart on zcache's arena alike (it was answered done: the restart read the old page,
    the running daemon the new one)."""
    served = serve(short_dir, backend=None)
    try:
        served.exports.add(4, "file", name="e")
        swap_type = served.exports.get("e").swap_type
        store = served.swap.store_of(swap_type)
        client = RawClient(served.socket)
        client.connect("e")
        client.request(WRITE, 0, PAGE, handle=1, payload=b"A" * PAGE)
        assert client.reply() == (0, 1)
        served.shim.load("zcache")
        fail_index_writes(store, monkeypatch, clears_only=False)
        client.request(WRITE, 0, PAGE, handle=2, payload=b"a" * PAGE)
        assert client.reply() == (EIO, 2)
        client.request(READ, 0, PAGE, handle=3)
        assert client.reply() == (0, 3)
        assert client.recv_exact(PAGE) == b"A" * PAGE
        client.request(FLUSH, 0, 0, handle=4)
        assert client.reply() == (0, 4)
        client.close()
        shim, areas = kill_and_restart(served, short_dir)
    finally:
        served.server.stop(WAIT_S)
        served.swap.close()
    try:
        assert read_back(shim, swap_type, range(1)) == {0: b"A" * PAGE}
    finally:
        shim.unload()
        areas.close()


def test_removing_an_export_ends_its_connections(export: Served) -> None:
    client = RawClient(export.socket)
    client.connect("e")
    export.wait_connections(1)
    summary = export.exports.remove("e")
    assert summary["name"] == "e"
    assert client.closed_by_server()
    export.wait_connections(0)
    assert export.shim.frontswap.swap_types() == []
    late = RawClient(export.socket)
    late.start()
    assert late.go("e")[-1][1] == ERR_UNKNOWN
    late.close()


def test_a_second_remove_while_the_first_waits_is_refused(export: Served,
                                                          monkeypatch) -> None:
    """Two removes of one export (control clients are served on threads of their own): the
    second, while the first waits for the connections to end, is refused and leaves the
    first's mark.  It once went through; the first then turned off the swap type that an
    export added meanwhile had reused, deleting that export's area and file."""
    real_detach = export.server.detach
    waiting, go_on = threading.Event(), threading.Event()

    def slow_detach(found, timeout_s):
        if not waiting.is_set():  # the first remove's connections take a while
            waiting.set()
            assert go_on.wait(WAIT_S)
        return real_detach(found, timeout_s)
    monkeypatch.setattr(export.server, "detach", slow_detach)
    removed: list[dict] = []
    first = threading.Thread(target=lambda: removed.append(export.exports.remove("e")))
    first.start()
    assert waiting.wait(WAIT_S)
    try:
        with pytest.raises(ExportBusy, match="already being removed"):
            export.exports.remove("e")
        assert export.exports.get("e").closing
        new = export.exports.add(8, "file", name="new")
    finally:
        go_on.set()
        first.join(WAIT_S)
    assert [r["name"] for r in removed] == ["e"]
    assert export.exports.names() == ["new"]
    assert export.shim.frontswap.swap_types() == [new["type"]]
    client = RawClient(export.socket)
    client.connect("new")
    client.request(WRITE, 0, PAGE, handle=1, payload=b"N" * PAGE)
    assert client.reply() == (0, 1)
    client.request(READ, 0, PAGE, handle=2)
    assert client.reply() == (0, 2)
    assert client.recv_exact(PAGE) == b"N" * PAGE
    client.close()


def test_the_stop_removes_every_unheld_export_past_one_being_removed(export: Served,
                                                                     monkeypatch) -> None:
    """At a clean stop, an export a control client is still removing (its remove waits for
    its connections) is passed over, logged; the exports after it are removed all the same
    (the refusal once ended the stop's loop)."""
    export.exports.add(8, "file", name="later")
    real_detach = export.server.detach
    waiting, go_on = threading.Event(), threading.Event()

    def slow_detach(found, timeout_s):
        if found.name == "e" and not waiting.is_set():
            waiting.set()
            assert go_on.wait(WAIT_S)
        return real_detach(found, timeout_s)
    monkeypatch.setattr(export.server, "detach", slow_detach)
    first = threading.Thread(target=lambda: export.exports.remove("e"))
    first.start()
    assert waiting.wait(WAIT_S)
    try:
        assert export.exports.remove_unheld(set()) == ["later"]
    finally:
        go_on.set()
        first.join(WAIT_S)
    assert export.exports.names() == []


def test_a_remove_spares_an_export_that_took_the_name_meanwhile(export: Served,
                                                              monkeypatch) -> None:
    """While the connections end the lock is not held: if the export went meanwhile (by a
    path other than remove, simulated on the table itself) and a new one took its name and
    its swap type, the remove turns nothing off and says the export is gone."""
    exports = export.exports
    real_detach = export.server.detach

    def replaced_meanwhile(found, timeout_s):
        ended = real_detach(found, timeout_s)
        with exports._lock:
            del exports._exports["e"]
            export.swap.forget(found.swap_type, owner="e")
        exports.add(8, "file", name="e")  # the lowest free swap type: the one just freed
        return ended
    monkeypatch.setattr(export.server, "detach", replaced_meanwhile)
    with pytest.raises(KeyError):
        exports.remove("e")
    assert exports.names() == ["e"] and not exports.get("e").closing
    assert export.shim.frontswap.swap_types() == [exports.get("e").swap_type]
    assert Path(exports.describe_one(exports.get("e"))["backing"]["path"]).exists()


def test_a_stop_ends_connections_and_options_then_is_idempotent(export: Served) -> None:
    transmitting = RawClient(export.socket)
    transmitting.connect("e")
    haggling = RawClient(export.socket)
    haggling.start()
    export.wait_connections(2)
    assert export.server.stop()
    assert transmitting.closed_by_server()
    assert haggling.closed_by_server()
    assert not export.socket.exists()
    assert export.server.stop()  # again: nothing left to do (the fixture stops it once more)


def test_an_export_removed_during_go_is_never_acknowledged(export: Served,
                                                          monkeypatch) -> None:
    """The export goes between GO's lookup and the attach: the client must not hear an ACK
    (it once did, from the last flush before the close)."""
    real_attach = export.server.attach

    def removed_meanwhile(conn, found) -> None:
        found.closing = True
        real_attach(conn, found)
    monkeypatch.setattr(export.server, "attach", removed_meanwhile)
    client = RawClient(export.socket)
    client.start()
    client.option(7, b"\0\0\0\x01e\0\0")  # GO "e", no information requests
    received = b""
    while chunk := client.sock.recv(4096):
        received += chunk
    replies = []
    while received:  # every option reply that came before the close
        _magic, _option, reply, length = struct.unpack(">QIII", received[:20])
        replies.append(reply)
        received = received[20 + length:]
    assert ACK not in replies
    export.exports.get("e").closing = False
    monkeypatch.undo()
    intact(export)
