"""A swap area file as a failing disk and a careless hand leave it: a flipped byte, a file
cut short, an edited index or header.  A damaged page is reported damaged, offline
(:func:`read_swap_area`) and by a daemon that re-attaches the area, and never returned as
data; a write the disk refuses leaves the slot's previous page; an unusable swap directory
is a ``backend_error`` with the OS error, not ``internal``."""

from __future__ import annotations

import base64
import errno
import json
import os
import resource
from pathlib import Path
from typing import Any

import pytest

from xentmem.errors import BackendError
from xentmem.guest.frontends import FileBacking, Frontswap
from xentmem.guest.frontends import backing as backing_module
from xentmem.guest.frontends.swapfile import ENTRY, Layout, SwapAreaStale, SwapFileError
from xentmem.guestd.core import Daemon
from xentmem.guestd.handlers import handle_line
from xentmem.guestd.swap import SwapAreaDamaged, SwapAreas, boot_id, read_swap_area
from xentmem.roots import Roots

PAGES = 16


def page(n: int) -> bytes:
    return n.to_bytes(4, "little") * 1024


def call(daemon: Daemon, op: str, **args: Any) -> dict[str, Any]:
    line = json.dumps({"v": 1, "id": 1, "op": op, "args": args}).encode()
    return json.loads(handle_line(daemon, line))


def area_with_pages(tmp_path: Path, offsets: range = range(6)) -> Path:
    path = tmp_path / "type-0.swap"
    store = FileBacking(path, PAGES)
    for offset in offsets:
        store.write(offset, page(offset))
    store.close()
    return path


def flip(path: Path, position: int) -> None:
    with open(path, "r+b") as handle:
        handle.seek(position)
        byte = handle.read(1)
        handle.seek(position)
        handle.write(bytes([byte[0] ^ 0x01]))


def slot_of(path: Path, offset: int, pages: int = PAGES) -> int:
    """Where the page of ``offset`` is in the file (read from its index entry)."""
    layout = Layout(pages, 0)
    with open(path, "rb") as handle:
        handle.seek(layout.entry_at(offset))
        slot_plus1 = ENTRY.unpack(handle.read(ENTRY.size))[0]
    return layout.slot_at(slot_plus1 - 1)


def test_an_intact_area_reads_back_whole(tmp_path: Path) -> None:
    assert read_swap_area(area_with_pages(tmp_path)) == {o: page(o) for o in range(6)}


def test_a_flipped_byte_in_a_page_is_reported_never_returned(tmp_path: Path) -> None:
    path = area_with_pages(tmp_path)
    flip(path, slot_of(path, 3) + 100)
    with pytest.raises(SwapAreaDamaged, match="1 damaged page") as caught:
        read_swap_area(path)
    assert caught.value.damaged == {3: "page checksum mismatch"}
    assert caught.value.intact == {o: page(o) for o in (0, 1, 2, 4, 5)}


def test_an_edited_index_entry_is_reported(tmp_path: Path) -> None:
    """The old JSON map read ``true`` in its offsets list as slot 1; an entry is checked."""
    path = area_with_pages(tmp_path)
    layout = Layout(PAGES, 0)
    flip(path, layout.entry_at(2))  # the slot number: now names another page's slot
    flip(path, layout.entry_at(4) + 4)  # the page's checksum
    with open(path, "r+b") as handle:  # an empty slot given a made-up entry
        handle.seek(layout.entry_at(9))
        handle.write(ENTRY.pack(2, 0, 0, 0))
    with pytest.raises(SwapAreaDamaged) as caught:
        read_swap_area(path)
    assert set(caught.value.damaged) == {2, 4, 9}
    assert all("index entry checksum" in why for why in caught.value.damaged.values())
    assert set(caught.value.intact) == {0, 1, 3, 5}


def test_a_truncated_file_is_reported(tmp_path: Path) -> None:
    path = area_with_pages(tmp_path)
    cut = slot_of(path, 4)
    os.truncate(path, cut + 10)  # page 4 cut short; the slots after it gone
    with pytest.raises(SwapAreaDamaged) as caught:
        read_swap_area(path)
    assert set(caught.value.damaged) == {4, 5}
    assert caught.value.intact == {o: page(o) for o in range(4)}
    os.truncate(path, 100)  # into the header
    with pytest.raises(SwapFileError, match=r"too short|cut short"):
        read_swap_area(path)


@pytest.mark.parametrize(("where", "message"), [
    (0, "bad magic"),
    (20, "header checksum mismatch"),  # the page count
])
def test_a_damaged_header_refuses_the_whole_file(tmp_path: Path, where: int,
                                                 message: str) -> None:
    path = area_with_pages(tmp_path)
    flip(path, where)
    with pytest.raises(SwapFileError, match=message):
        read_swap_area(path)
    with pytest.raises(SwapFileError, match=message):
        FileBacking.attach(path)


def test_a_restarted_daemon_reports_damaged_pages_and_serves_the_others(
        make_daemon: Any) -> None:
    first = make_daemon(None, balloon_loops=False)
    first.begin_run()
    first.load("recording")
    area = first.swap.create(PAGES, "file")["type"]
    for offset in range(4):
        first.shim.frontswap.store(area, offset, page(offset))
    first.shutdown()
    path = first.swap.path_of(area)
    flip(path, slot_of(path, 1) + 7)

    second = make_daemon(None, balloon_loops=False)
    found = second.begin_run()
    assert [(a["type"], a["used"], a["damaged"]) for a in found] == [(area, 3, 1)]
    second.load("recording")
    reply = call(second, "frontswap.load", type=area, offset=1)
    assert reply["error"]["code"] == "backend_error"
    assert "slot 1 is damaged (page checksum mismatch)" in reply["error"]["message"]
    for offset in (0, 2, 3):
        reply = call(second, "frontswap.load", type=area, offset=offset)
        assert base64.b64decode(reply["result"]["data"]) == page(offset)
    assert second.record.facts()["reattached"][0]["damaged_offsets"] == [1]
    summary = second.shutdown()
    assert summary["lost_pages"] == 1 and summary["clean"] is False  # never readable again
    # Storing over the damaged slot (or freeing it) makes the area whole again.
    third = make_daemon(None, balloon_loops=False)
    third.begin_run()
    third.shim.frontswap.store(area, 1, page(11))
    assert third.shutdown()["lost_pages"] == 0
    assert read_swap_area(path) == {0: page(0), 1: page(11), 2: page(2), 3: page(3)}


def test_a_byte_flipped_under_a_running_daemon_is_an_error_not_data(tmp_path: Path) -> None:
    path = tmp_path / "live.swap"
    store = FileBacking(path, PAGES)
    store.write(5, page(5))
    flip(path, slot_of(path, 5))
    with pytest.raises(BackendError, match="slot 5 is damaged"):
        store.read(5)
    with pytest.raises(BackendError, match="slot 5 is damaged"):
        store.read(5)
    store.write(5, page(6))
    assert store.read(5) == page(6)
    store.close()


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EIO])
@pytest.mark.parametrize("which", ["page", "index"])
def test_a_write_the_disk_refuses_leaves_the_previous_page(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, err: int, which: str) -> None:
    path = tmp_path / "type-0.swap"
    store = FileBacking(path, PAGES)
    store.write(2, page(1))
    real_pwrite = os.pwrite
    failed: list[int] = []

    def pwrite(fd: int, data: bytes, position: int) -> int:
        """The new page's write, or the first index entry's write, fails."""
        target = data == page(2) if which == "page" else len(data) == ENTRY.size
        if target and not failed:
            failed.append(position)
            raise OSError(err, os.strerror(err))
        return real_pwrite(fd, data, position)

    monkeypatch.setattr(backing_module.os, "pwrite", pwrite)
    with pytest.raises(BackendError, match=os.strerror(err)):
        store.write(2, page(2))
    monkeypatch.undo()
    assert store.read(2) == page(1) and store.used() == 1
    store.close()
    assert read_swap_area(path) == {2: page(1)}
    store = FileBacking.attach(path)
    store.write(3, page(3))  # the slot the refused write took is free again
    assert store.read(2) == page(1) and store.read(3) == page(3)
    store.close()


def test_an_index_entry_a_refused_write_left_unknown_goes_at_the_next_discard(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The new page's index entry reached the file though its write said EIO, and putting
    the previous (empty) entry back failed: the file names the refused page.  The next
    discard of the offset (frontswap's, once tmem took a newer page of it) must clear that
    entry, or a restart takes the refused page over tmem's newer one."""
    path = tmp_path / "type-0.swap"
    store = FileBacking(path, PAGES)
    real_pwrite = os.pwrite
    entries: list[bytes] = []

    def pwrite(fd: int, data: bytes, position: int) -> int:
        if len(data) != ENTRY.size:
            return real_pwrite(fd, data, position)
        entries.append(data)
        if len(entries) == 1:  # the new entry lands, then the error
            real_pwrite(fd, data, position)
        raise OSError(errno.EIO, "injected")

    monkeypatch.setattr(backing_module.os, "pwrite", pwrite)
    with pytest.raises(BackendError, match="injected"):
        store.write(2, page(2))
    monkeypatch.undo()
    assert len(entries) == 2 and store.read(2) is None
    store.discard(2, durable=True)
    store.close()
    assert read_swap_area(path) == {}


def test_a_write_past_the_file_size_limit_is_efbig_and_changes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "type-0.swap"
    store = FileBacking(path, PAGES)
    store.write(0, page(1))  # slot 0
    limit = Layout(PAGES, 0).slot_at(1)  # slot 1 and after are past the limit
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        with pytest.raises(BackendError, match="File too large"):
            store.write(0, page(2))
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert store.read(0) == page(1)
    store.close()


@pytest.mark.parametrize("obstacle", ["swap dir is a file", "area file is a directory"])
def test_an_unusable_swap_directory_is_a_backend_error(make_daemon: Any,
                                                       obstacle: str) -> None:
    daemon = make_daemon(None, balloon_loops=False)
    swap_dir = daemon.state_dir / "swap"
    if obstacle == "swap dir is a file":
        daemon.state_dir.mkdir(parents=True, exist_ok=True)
        swap_dir.write_text("")
    else:
        (swap_dir / "type-0.swap").mkdir(parents=True)
    reply = call(daemon, "frontswap.init", pages=8, backing="file")
    assert reply["error"]["code"] == "backend_error", reply
    assert "Errno" in reply["error"]["message"] and str(swap_dir) in reply["error"]["message"]
    assert daemon.shim.frontswap.swap_types() == []  # refused: nothing initialised


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only directory")
def test_a_read_only_swap_directory_is_a_backend_error(make_daemon: Any) -> None:
    daemon = make_daemon(None, balloon_loops=False)
    swap_dir = daemon.state_dir / "swap"
    swap_dir.mkdir(parents=True)
    swap_dir.chmod(0o500)
    try:
        reply = call(daemon, "frontswap.init", pages=8, backing="file")
    finally:
        swap_dir.chmod(0o700)
    assert reply["error"]["code"] == "backend_error", reply
    assert "Permission denied" in reply["error"]["message"]


BOOT_A, BOOT_B = b"A" * 16, b"B" * 16


def test_an_area_in_use_when_the_system_went_down_is_not_trusted(tmp_path: Path) -> None:
    """A power cut may keep an older page where the index had not reached the disk; the
    checksums cannot tell, so an area not stopped cleanly is not re-attached after a
    reboot.  After a kill (the same boot) it is: the kernel kept every write."""
    path = tmp_path / "type-0.swap"
    store = FileBacking(path, PAGES, 0, BOOT_A)
    store.write(1, page(1))
    store.close()  # no clean stop
    with pytest.raises(SwapAreaStale, match="in use when the system went down"):
        FileBacking.attach(path, BOOT_B)
    with pytest.raises(SwapAreaStale):
        read_swap_area(path, BOOT_B)
    assert read_swap_area(path, BOOT_A) == {1: page(1)}  # killed, same boot: trusted
    store = FileBacking.attach(path, BOOT_A)
    store.sync()
    store.mark_stopped()
    store.close()
    store = FileBacking.attach(path, BOOT_B)  # stopped cleanly: any later boot may use it
    assert store.read(1) == page(1)
    store.close()  # and now it is in use by boot B
    with pytest.raises(SwapAreaStale):
        FileBacking.attach(path, BOOT_A)


def test_a_stale_area_is_reported_at_reattach_and_left_in_place(tmp_path: Path) -> None:
    path = tmp_path / "swap" / "type-3.swap"
    path.parent.mkdir()
    FileBacking(path, PAGES, 3, BOOT_A).close()
    areas = SwapAreas(Frontswap(), tmp_path / "swap", BOOT_B)
    found = areas.reattach()
    assert found[0]["type"] == 3 and "in use when the system went down" in found[0]["error"]
    assert path.exists()


def test_the_boot_id_comes_from_the_root(tmp_path: Path) -> None:
    boot = tmp_path / "proc/sys/kernel/random/boot_id"
    assert boot_id(Roots(root=tmp_path)) is None
    boot.parent.mkdir(parents=True)
    boot.write_text("1331c4a9-a306-4e77-80cc-dcccb6c0e08c\n")
    assert boot_id(Roots(root=tmp_path)) == bytes.fromhex("1331c4a9a3064e7780ccdcccb6c0e08c")


def test_a_full_area_with_pages_found_damaged_still_takes_every_store(tmp_path: Path) -> None:
    store = FileBacking(tmp_path / "full.swap", 4)
    for offset in range(4):
        store.write(offset, page(offset))
    flip(tmp_path / "full.swap", slot_of(tmp_path / "full.swap", 2, pages=4))
    with pytest.raises(BackendError, match="damaged"):
        store.read(2)
    for round_ in range(3):  # every slot is reused, none leaks
        for offset in range(4):
            store.write(offset, page(10 * round_ + offset))
    assert [store.read(o) for o in range(4)] == [page(20 + o) for o in range(4)]
    store.close()

