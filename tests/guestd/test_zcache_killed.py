"""A real xentmemd with zcache is SIGKILLed while its swap pages are in tmem (not in the
area's file): restarted on the same run and state directories, it re-attaches the area,
zcache reopens its arena, frontswap takes the pages back, and every acknowledged page reads
back exactly.  A clean stop then repatriates them all and removes the arena."""

from __future__ import annotations

import json
import random
import signal
from pathlib import Path
from typing import Any

from xentmem.control import ControlClient
from xentmem.guest.backends.zcache import ARENA_FILE, POOLS_FILE
from xentmem.tmem.abi import PAGE_SIZE, ZERO_PAGE

PAGES = 256
ARGS = ("-o", "tmem.selfballooning_at_load=0", "-o", "tmem.selfshrinking=0",
        "-o", "backend=zcache")


def page(rng: random.Random, seq: int) -> bytes:
    kind = seq % 4
    if kind == 0:
        return ZERO_PAGE
    if kind == 1:
        return rng.randbytes(PAGE_SIZE)  # incompressible: kept raw
    return ((seq.to_bytes(8, "little") + b"swap page text " * 4) * 64)[:PAGE_SIZE]


def killed_with_pages_in_tmem(tmp_path: Path, fake_root: Path, start_daemon: Any,
                              args: tuple[str, ...]) -> dict[int, bytes]:
    """A daemon with zcache, its swap pages in tmem (not in the area's file), SIGKILLed;
    the pages it acknowledged, by offset."""
    run = tmp_path / "run"
    rng = random.Random(20261203)
    acked: dict[int, bytes] = {}
    daemon = start_daemon(fake_root, None, *args, base=tmp_path / "first")
    with ControlClient(run / "control.sock", timeout=10) as client:
        assert client.frontswap.init(PAGES, "file") == 0
        for seq in range(3 * PAGES):
            offset = rng.randrange(PAGES)
            if rng.random() < 0.1:
                client.frontswap.invalidate_page(0, offset)
                acked.pop(offset, None)
                continue
            data = page(rng, seq)
            assert client.frontswap.store(0, offset, data) == 0  # tmem took it
            acked[offset] = data
    daemon.send(signal.SIGKILL)
    assert daemon.stop(None) == -signal.SIGKILL
    assert (run / ARENA_FILE).exists() and (run / POOLS_FILE).exists()
    return acked


def test_sigkill_keeps_every_acknowledged_tmem_page(tmp_path: Path, fake_root: Path,
                                                    start_daemon: Any) -> None:
    run, state = tmp_path / "run", tmp_path / "state"
    args = (*ARGS, "--run-dir", str(run), "--state-dir", str(state))
    acked = killed_with_pages_in_tmem(tmp_path, fake_root, start_daemon, args)

    daemon = start_daemon(fake_root, None, *args, base=tmp_path / "second")
    with ControlClient(run / "control.sock", timeout=10) as client:
        loaded = {o: client.frontswap.load(0, o) for o in range(PAGES)}
    assert {o: p for o, p in loaded.items() if p is not None} == acked
    assert "taken back" in daemon.log()
    assert daemon.stop(signal.SIGTERM) == 0, daemon.log()
    record = json.loads((state / "shutdown.json").read_text())
    assert record["clean"] is True and record["lost_pages"] == 0, record
    assert record["repatriated"] == len(acked)
    assert not (run / ARENA_FILE).exists()  # a clean stop leaves no arena behind


def test_a_restart_with_frontswap_off_gives_the_kept_pages_back_to_their_area(
        tmp_path: Path, fake_root: Path, start_daemon: Any) -> None:
    """``tmem.frontswap=0`` (or ``nofrontswap``) at the restart: zcache would never claim
    its restored pool and a clean stop would delete the arena with the pages; they are
    given back to the area first, so each one reads back and the stop is truly clean."""
    run, state = tmp_path / "run", tmp_path / "state"
    args = (*ARGS, "--run-dir", str(run), "--state-dir", str(state))
    acked = killed_with_pages_in_tmem(tmp_path, fake_root, start_daemon, args)

    daemon = start_daemon(fake_root, None, *args, "-o", "tmem.frontswap=0",
                          base=tmp_path / "second")
    with ControlClient(run / "control.sock", timeout=10) as client:
        assert client.status()["flags"]["frontswap"] is False
        loaded = {o: client.frontswap.load(0, o) for o in range(PAGES)}
    assert {o: p for o, p in loaded.items() if p is not None} == acked
    assert daemon.stop(signal.SIGTERM) == 0, daemon.log()
    record = json.loads((state / "shutdown.json").read_text())
    assert record["clean"] is True and record["lost_pages"] == 0, record
    assert record["kept_pages_given_back"] == {"backend": "zcache", "repatriated": len(acked)}
    assert record["areas"][0]["used"] == len(acked)


def test_a_foreign_file_at_the_arena_path_refuses_the_start_naming_it(
        tmp_path: Path, fake_root: Path, start_daemon: Any) -> None:
    run = tmp_path / "run"
    run.mkdir()
    foreign = run / ARENA_FILE
    foreign.write_bytes(b"not an arena\n" * 1000)
    daemon = start_daemon(fake_root, None, *ARGS, "--run-dir", str(run), "--state-dir",
                          str(tmp_path / "state"), wait=False)
    assert daemon.stop(None) == 1
    assert str(foreign) in daemon.log() and "not a xentmem page arena" in daemon.log()
    assert foreign.read_bytes() == b"not an arena\n" * 1000  # never touched
