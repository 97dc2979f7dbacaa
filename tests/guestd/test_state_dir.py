"""File-backed swap areas live in the state directory (systemd keeps it across a stop, unlike
the run directory), they are flushed at exit, and pages that die with the daemon
(memory-backed areas) make the shutdown unclean."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from xentmem.guest.frontends import FileBacking
from xentmem.guestd.app import application_from_args, parse_args
from xentmem.guestd.swap import read_swap_area

PAGE = b"\xa5" * 4096


def test_swap_files_go_to_the_state_dir_and_survive_the_run_dir(make_daemon: Any,
                                                                  fake_root: Path) -> None:
    daemon = make_daemon(None, balloon_loops=False)
    daemon.load("recording")
    file_area = daemon.swap.create(16, "file")["type"]
    assert daemon.shim.frontswap.store(file_area, 2, PAGE) == 0
    summary = daemon.shutdown()
    assert summary["clean"] is True and summary["lost_pages"] == 0
    swap_file = daemon.swap.path_of(file_area)
    assert swap_file.parent == fake_root / "var/lib/xentmem/swap"
    assert daemon.roots.run not in swap_file.parents
    shutil.rmtree(daemon.roots.run, ignore_errors=True)  # systemd does that at stop
    assert read_swap_area(swap_file) == {2: PAGE}


def test_area_files_are_flushed_at_exit(make_daemon: Any,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    daemon = make_daemon(None, balloon_loops=False)
    daemon.load("recording")
    area = daemon.swap.create(16, "file")["type"]
    assert daemon.shim.frontswap.store(area, 0, PAGE) == 0
    synced: list[tuple[Path, int]] = []
    real_sync = FileBacking.sync

    def sync(store: FileBacking) -> None:
        synced.append((store.path, store.used()))
        real_sync(store)

    monkeypatch.setattr(FileBacking, "sync", sync)
    daemon.shutdown()
    # Once, after the unload put the page back into the file.
    assert synced == [(daemon.swap.path_of(area), 1)]
    assert read_swap_area(daemon.swap.path_of(area)) == {0: PAGE}


def test_pages_in_a_memory_area_are_lost_and_counted(make_daemon: Any) -> None:
    daemon = make_daemon(None, balloon_loops=False)
    daemon.load("recording")
    empty = daemon.swap.create(8)["type"]
    full = daemon.swap.create(8)["type"]
    for offset in range(3):
        assert daemon.shim.frontswap.store(full, offset, PAGE) == 0
    summary = daemon.shutdown()
    assert summary["repatriated"] == 3  # into the memory area, which then goes
    assert summary["lost_pages"] == 3 and summary["clean"] is False
    record = json.loads((daemon.state_dir / "shutdown.json").read_text())
    assert record["lost_pages"] == 3 and record["clean"] is False
    assert {a["type"]: a["used"] for a in record["areas"]} == {empty: 0, full: 3}


@pytest.mark.parametrize(("argv", "env", "expected"), [
    (["--state-dir", "/srv/xt"], {"STATE_DIRECTORY": "/var/lib/other"}, "/srv/xt"),
    ([], {"STATE_DIRECTORY": "/var/lib/xentmem:/var/lib/more"}, "/var/lib/xentmem"),
    (["--root", "/guest"], {}, "/guest/var/lib/xentmem"),
])
def test_the_state_dir_comes_from_the_flag_then_systemd_then_the_root(
        argv: list[str], env: dict[str, str], expected: str) -> None:
    app = application_from_args(parse_args(argv), env)
    assert app.state_dir == Path(expected)
