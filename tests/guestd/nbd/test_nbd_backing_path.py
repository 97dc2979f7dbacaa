"""An export's backing file at a path its administrator chose (``swap add --backing FILE``).

The daemon runs as root and takes the path from its socket, so a path is refused, with
nothing made, unless it names a new file in a directory only the daemon's user can change;
a restart after a kill finds the file again through the exports table, checked the same way
(and never follows a symlink put there meanwhile).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fakes.libc import RecordingLibc

from xentmem.errors import AbiError
from xentmem.guest.frontends import Frontswap
from xentmem.guest.shim import Shim
from xentmem.guestd.nbd.exports import TABLE, Exports, recorded_files
from xentmem.guestd.nbd.resident import Residency
from xentmem.guestd.swap import SwapAreas
from xentmem.roots import Roots

PAGES = 16


def page(n: int) -> bytes:
    return (f"chosen {n:04d} ".encode() * 400)[:4096]


@dataclass
class Guest:
    """One daemon's worth of swap: frontswap without a backend (every page goes to the
    area's file), its areas and its exports; a second one over the same state is the
    daemon restarted after a kill."""

    swap: SwapAreas
    exports: Exports
    libc: RecordingLibc

    @property
    def frontswap(self) -> Frontswap:
        return self.exports.frontswap


def guest(state: Path) -> Guest:
    shim = Shim(roots=Roots(run_dir=state / "run"))
    libc = RecordingLibc()
    swap = SwapAreas(shim.frontswap, state / "swap")
    exports = Exports(shim.frontswap, swap, Residency(libc, set_stack_size=libc.stack_size),
                      table=state / "swap" / TABLE)
    return Guest(swap, exports, libc)


def restarted(state: Path) -> tuple[Guest, list[dict], list[str]]:
    """A new daemon over ``state``, as the daemon's start does it."""
    again = guest(state)
    rows = again.exports.read_table()
    found = again.swap.reattach(recorded_files(rows))
    return again, found, again.exports.restore(rows)


@pytest.fixture
def state(tmp_path: Path) -> Path:
    path = tmp_path / "state"
    path.mkdir(mode=0o700)
    return path


@pytest.fixture
def disk(tmp_path: Path) -> Path:
    """A directory only this user can write, as an administrator's swap directory is."""
    path = tmp_path / "disk"
    path.mkdir(mode=0o700)
    return path


def test_the_file_is_made_at_the_path_and_found_again_after_a_kill(state: Path,
                                                                     disk: Path) -> None:
    first = guest(state)
    chosen = disk / "xtm0.swap"
    added = first.exports.add(PAGES, name="chosen", path=str(chosen), device="/dev/nbd2")
    assert added["backing"]["path"] == str(chosen)
    assert (chosen.stat().st_mode & 0o777) == 0o600
    assert list((state / "swap").glob("type-*.swap")) == []  # nothing in the own directory
    swap_type = added["type"]
    for n in range(0, PAGES, 2):
        assert first.frontswap.store(swap_type, n, page(n)) == -1  # no tmem: to the file
    assert json.loads((state / "swap" / TABLE).read_text()) == [
        {"name": "chosen", "type": swap_type, "pages": PAGES, "device": "/dev/nbd2",
         "path": str(chosen)}]

    again, found, restored = restarted(state)  # the first one was killed: nothing closed
    assert [(f["type"], f["path"], f["used"]) for f in found] == [
        (swap_type, str(chosen), PAGES // 2)]
    assert restored == ["chosen"]
    for n in range(PAGES):
        assert again.frontswap.load(swap_type, n) == (page(n) if n % 2 == 0 else None), n

    again.exports.remove("chosen")
    assert not chosen.exists()  # made by the daemon, removed by it (as the own files)
    assert json.loads((state / "swap" / TABLE).read_text()) == []
    assert again.exports.add(PAGES, path=str(chosen))["backing"]["path"] == str(chosen)


def test_own_and_chosen_files_come_back_together(state: Path, disk: Path) -> None:
    first = guest(state)
    own = first.exports.add(PAGES, name="own")
    chosen = first.exports.add(PAGES, name="chosen", path=str(disk / "a.swap"))
    first.frontswap.store(own["type"], 1, page(1))
    first.frontswap.store(chosen["type"], 3, page(3))
    again, found, restored = restarted(state)
    assert sorted(f["path"] for f in found) == sorted(
        [str(state / "swap" / f"type-{own['type']}.swap"), str(disk / "a.swap")])
    assert sorted(restored) == ["chosen", "own"]
    assert again.frontswap.load(own["type"], 1) == page(1)
    assert again.frontswap.load(chosen["type"], 3) == page(3)


def refusals(tmp_path: Path, disk: Path, state: Path) -> dict[str, tuple[str, str]]:
    """Name -> (path, what the error says), each set up on disk."""
    (disk / "taken.swap").write_bytes(b"an administrator's file")
    (tmp_path / "open").mkdir(mode=0o700)
    os.chmod(tmp_path / "open", 0o770)  # the group could move the file away
    (tmp_path / "link").symlink_to(disk)
    (disk / "plain").write_text("not a directory")
    (state / "swap").mkdir(mode=0o700)
    return {
        "relative": ("disk/x.swap", "absolute"),
        "dot-dot": (f"{disk}/../disk/x.swap", "plainly written"),
        "double slash": (f"/{disk}/x.swap", "plainly written"),
        "trailing slash": (f"{disk}/x.swap/", "plainly written"),
        "NUL": (f"{disk}/x\0.swap", "without NUL"),
        "lone surrogate": (f"{disk}/x\ud800.swap", "is text"),
        "root": ("/", "names a file"),
        "exists": (str(disk / "taken.swap"), "exists"),
        "group-writable directory": (str(tmp_path / "open" / "x.swap"), "writable by no one"),
        "symlink in the directory's path": (str(tmp_path / "link" / "x.swap"), "symlink"),
        "no directory": (str(disk / "absent" / "x.swap"), "No such file"),
        "a file as directory": (str(disk / "plain" / "x.swap"), "is not a directory"),
        "the daemon's own directory": (str(state / "swap" / "type-9.swap"), "own area files"),
    }


@pytest.mark.parametrize("case", [
    "relative", "dot-dot", "double slash", "trailing slash", "NUL", "lone surrogate", "root",
    "exists",
    "group-writable directory", "symlink in the directory's path", "no directory",
    "a file as directory", "the daemon's own directory"])
def test_a_path_that_is_not_safe_to_create_is_refused_and_nothing_is_made(
        tmp_path: Path, state: Path, disk: Path, case: str) -> None:
    path, says = refusals(tmp_path, disk, state)[case]
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    g = guest(state)
    with pytest.raises(AbiError, match=says):
        g.exports.add(PAGES, name="x", path=path)
    assert g.exports.names() == [] and list(g.frontswap.swap_types()) == []
    assert g.libc.named("mlockall") == []  # refused before the daemon locks its memory
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before
    assert (disk / "taken.swap").read_bytes() == b"an administrator's file"


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")
def test_a_directory_of_another_user_is_refused(tmp_path: Path, state: Path) -> None:
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o700)
    os.chown(theirs, 65534, 65534)
    with pytest.raises(AbiError, match="must belong to the daemon's user"):
        guest(state).exports.add(PAGES, path=str(theirs / "x.swap"))
    assert list(theirs.iterdir()) == []


def test_a_path_goes_with_a_file_backing_only(state: Path, disk: Path) -> None:
    g = guest(state)
    with pytest.raises(AbiError, match="backing \"file\" only"):
        g.exports.add(PAGES, backing="memory", path=str(disk / "x.swap"))
    assert list(disk.iterdir()) == [] and g.exports.names() == []
    assert g.libc.named("mlockall") == []


@pytest.mark.parametrize("args", [{"pages": 0}, {"pages": 1 << 30},
                                  {"pages": PAGES, "backing": "tape"}])
def test_an_export_refused_for_its_size_or_backing_locks_nothing(
        state: Path, args: dict[str, Any]) -> None:
    """Checked before the daemon locks itself in memory (it pins the whole daemon)."""
    g = guest(state)
    with pytest.raises(AbiError):
        g.exports.add(**args)
    assert g.libc.named("mlockall") == [] and g.exports.names() == []


def test_at_restart_a_recorded_path_is_checked_again(tmp_path: Path, state: Path,
                                                     disk: Path) -> None:
    """A file swapped for a symlink, a directory opened to others, a row edited to name
    some other file: not re-attached, not exported, and the file it names is untouched."""
    first = guest(state)
    for name in ("swapped", "opened", "edited"):
        where = disk / name
        where.mkdir(mode=0o700)
        first.exports.add(PAGES, name=name, path=str(where / "area.swap"))
    secret = disk / "edited" / "secret"
    secret.write_bytes(b"x" * 8192)
    table = state / "swap" / TABLE
    rows = json.loads(table.read_text())
    for row in rows:
        if row["name"] == "edited":
            row["path"] = str(secret)
    table.write_text(json.dumps(rows))
    swapped = disk / "swapped" / "area.swap"
    swapped.rename(disk / "swapped" / "moved.swap")
    swapped.symlink_to(disk / "swapped" / "moved.swap")
    os.chmod(disk / "opened", 0o777)

    again, found, restored = restarted(state)
    errors = {Path(f["path"]).parent.name: f["error"] for f in found}
    assert set(errors) == {"swapped", "opened", "edited"}
    assert "not a regular file" in errors["swapped"]
    assert "writable by no one" in errors["opened"]
    assert "not a xentmem swap area" in errors["edited"]
    assert restored == [] and list(again.frontswap.swap_types()) == []
    assert secret.read_bytes() == b"x" * 8192
