"""A killed ``xentmemd``'s successor exports its file areas again under their names, so the
kernel's NBD device can reconnect (``xentmem swap start``) and read every page it wrote.

Before the exports table, the restarted daemon re-attached the area but exported nothing:
the device had no export to reconnect to, and the kernel failed its queued swap I/O.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

from fakes.libnbd_peer import LibNbd

from xentmem.control import ControlClient
from xentmem.guestd.nbd.exports import TABLE

PAGE = 4096
ARGS = ("-o", "tmem.selfballooning_at_load=0", "-o", "tmem.selfshrinking=0",
        "-o", "backend=zcache")


def page(n: int) -> bytes:
    return (f"page {n:05d} ".encode() * 410)[:PAGE]


def test_sigkill_then_restart_exports_the_file_area_again(
        tmp_path: Path, fake_root: Path, start_daemon: Any, libnbd: LibNbd) -> None:
    run, state = tmp_path / "run", tmp_path / "state"
    args = (*ARGS, "--run-dir", str(run), "--state-dir", str(state))
    daemon = start_daemon(fake_root, None, *args, base=tmp_path / "first")
    with ControlClient(run / "control.sock", timeout=30) as client:
        kept = client.call("nbd.add", pages=64, name="kept", device="/dev/nbd3")
        client.call("nbd.add", pages=8, name="gone", backing="memory")
    writer = libnbd.handle()
    writer.connect_uri(f"nbd+unix:///kept?socket={run / 'nbd.sock'}")
    for n in range(0, 64, 3):
        writer.pwrite(page(n), n * PAGE)
    writer.close()
    table = json.loads((state / "swap" / TABLE).read_text())
    assert table == [{"name": "kept", "type": kept["type"], "pages": 64, "device": "/dev/nbd3",
                      "path": str(state / "swap" / f"type-{kept['type']}.swap")}]
    daemon.send(signal.SIGKILL)
    assert daemon.stop(None) == -signal.SIGKILL

    daemon = start_daemon(fake_root, None, *args, base=tmp_path / "second")
    with ControlClient(run / "control.sock", timeout=30) as client:
        exports = client.call("nbd.list")["exports"]
    assert [(e["name"], e["type"], e["device"], e["pages"]) for e in exports] == [
        ("kept", kept["type"], "/dev/nbd3", 64)]  # the memory area died with the daemon
    reader = libnbd.handle()
    reader.connect_uri(f"nbd+unix:///kept?socket={run / 'nbd.sock'}")
    for n in range(64):
        assert reader.pread(PAGE, n * PAGE) == (page(n) if n % 3 == 0 else bytes(PAGE)), n
    reader.close()
    assert "nbd export kept restored" in daemon.log()


def test_rows_that_do_not_fit_an_area_are_dropped_not_exported(
        tmp_path: Path, fake_root: Path, start_daemon: Any) -> None:
    run, state = tmp_path / "run", tmp_path / "state"
    args = (*ARGS, "--run-dir", str(run), "--state-dir", str(state))
    daemon = start_daemon(fake_root, None, *args, base=tmp_path / "first")
    with ControlClient(run / "control.sock", timeout=30) as client:
        swap_type = client.call("nbd.add", pages=16, name="real")["type"]
    daemon.send(signal.SIGKILL)
    daemon.stop(None)
    rows = [{"name": "real", "type": swap_type, "pages": 16, "device": None,
             "path": str(state / "swap" / f"type-{swap_type}.swap")},
            {"name": "wrong-size", "type": swap_type, "pages": 99, "device": None},
            {"name": "no-area", "type": 7, "pages": 16, "device": None},
            {"name": "../evil", "type": swap_type, "pages": 16, "device": None},
            {"name": "dev", "type": swap_type, "pages": 16, "device": "/etc/passwd"},
            {"name": "extra", "type": swap_type, "pages": 16, "device": None, "x": 1},
            {"name": "elsewhere", "type": swap_type, "pages": 16, "device": None,
             "path": str(tmp_path / "other.swap")},
            "not a row"]
    (state / "swap" / TABLE).write_text(json.dumps(rows))
    daemon = start_daemon(fake_root, None, *args, base=tmp_path / "second")
    with ControlClient(run / "control.sock", timeout=30) as client:
        assert [e["name"] for e in client.call("nbd.list")["exports"]] == ["real"]
    assert json.loads((state / "swap" / TABLE).read_text()) == rows[:1]
    assert daemon.log().count("nbd export not restored") == 7


def test_sigkill_then_restart_finds_a_file_at_a_chosen_path(
        tmp_path: Path, fake_root: Path, start_daemon: Any, libnbd: LibNbd) -> None:
    """``swap add --backing FILE``: the table says where the file is."""
    run, state, disk = tmp_path / "run", tmp_path / "state", tmp_path / "disk"
    disk.mkdir(mode=0o700)
    args = (*ARGS, "--run-dir", str(run), "--state-dir", str(state))
    daemon = start_daemon(fake_root, None, *args, base=tmp_path / "first")
    with ControlClient(run / "control.sock", timeout=30) as client:
        added = client.call("nbd.add", pages=32, name="chosen", path=str(disk / "xtm.swap"))
    assert added["backing"]["path"] == str(disk / "xtm.swap")
    writer = libnbd.handle()
    writer.connect_uri(f"nbd+unix:///chosen?socket={run / 'nbd.sock'}")
    for n in range(0, 32, 5):
        writer.pwrite(page(n), n * PAGE)
    writer.close()
    daemon.send(signal.SIGKILL)
    daemon.stop(None)

    daemon = start_daemon(fake_root, None, *args, base=tmp_path / "second")
    with ControlClient(run / "control.sock", timeout=30) as client:
        [export] = client.call("nbd.list")["exports"]
        assert (export["name"], export["backing"]["path"]) == ("chosen", str(disk / "xtm.swap"))
        reader = libnbd.handle()
        reader.connect_uri(f"nbd+unix:///chosen?socket={run / 'nbd.sock'}")
        for n in range(32):
            assert reader.pread(PAGE, n * PAGE) == (page(n) if n % 5 == 0 else bytes(PAGE)), n
        reader.close()
        client.call("nbd.remove", name="chosen")
    assert list(disk.iterdir()) == []


def test_a_clean_stop_keeps_only_the_exports_a_device_holds(
        tmp_path: Path, fake_root: Path, start_daemon: Any, libnbd: LibNbd) -> None:
    """After ``swap stop`` detached a device, its export is removed at the stop (swapoff read
    its pages back); one still connected (its swap still on) stays for the next daemon."""
    run, state = tmp_path / "run", tmp_path / "state"
    args = (*ARGS, "--run-dir", str(run), "--state-dir", str(state))
    daemon = start_daemon(fake_root, None, *args, base=tmp_path / "first")
    with ControlClient(run / "control.sock", timeout=30) as client:
        held = client.call("nbd.add", pages=16, name="held", device="/dev/nbd1")
        detached = client.call("nbd.add", pages=16, name="detached", device="/dev/nbd2")
    device = libnbd.handle()
    device.connect_uri(f"nbd+unix:///held?socket={run / 'nbd.sock'}")
    device.pwrite(page(1), PAGE)
    assert daemon.stop() == 0
    device.close()
    record = json.loads((state / "shutdown.json").read_text())
    assert record["nbd_removed"] == ["detached"]
    assert not Path(detached["backing"]["path"]).exists()
    assert [r["name"] for r in json.loads((state / "swap" / TABLE).read_text())] == ["held"]

    start_daemon(fake_root, None, *args, base=tmp_path / "second")
    with ControlClient(run / "control.sock", timeout=30) as client:
        exports = client.call("nbd.list")["exports"]
    assert [(e["name"], e["type"]) for e in exports] == [("held", held["type"])]
    reader = libnbd.handle()
    reader.connect_uri(f"nbd+unix:///held?socket={run / 'nbd.sock'}")
    assert reader.pread(PAGE, PAGE) == page(1)
    reader.close()
