"""Swap pages zcache kept across a kill (its arena in the run directory) when the restart does
not load zcache with frontswap: ``auto`` now finds the Xen tmem host, or frontswap is off.
The daemon gives them back to their swap areas first (zcache loaded with frontswap alone,
then unloaded), so every acknowledged page reads back and the next stop is truthfully clean;
if they cannot be given back, the chosen backend is not loaded and nothing is dropped.

The kill is what it leaves (as in tests/backends/test_zcache_restart.py): zcache's arena and
the area's file closed as they are, nothing of the process; the daemon killed for real:
tests/guestd/test_zcache_killed.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import pytest
from fakes.recording_backend import RecordingBackend

from xentmem.errors import BackendError, BackendUnsupported
from xentmem.guest.backends.zcache import ARENA_FILE, POOLS_FILE, ZcacheBackend
from xentmem.guest.frontends import FileBacking
from xentmem.guestd.core import Daemon
from xentmem.roots import Roots
from xentmem.tmem.abi import PAGE_SIZE

PAGES = 8


class UpXen(RecordingBackend):
    """``xen`` whose tmem host is reachable now (it was not at the first start)."""

    name: ClassVar[str] = "xen"

    @classmethod
    def probe(cls, roots: Roots) -> None:
        return None


class DownXen(UpXen):
    @classmethod
    def probe(cls, roots: Roots) -> None:
        raise BackendUnsupported("no tmem host (test)")


def page(offset: int) -> bytes:
    return bytes([offset + 1]) * PAGE_SIZE


def killed_with_pages_in_zcache(make_daemon: Any) -> Path:
    """A daemon on ``auto`` that found no Xen host (zcache), with PAGES swap pages in tmem
    only (not in the area's file), then killed; the run directory."""
    first: Daemon = make_daemon(None, overrides=("backend=auto",), balloon_loops=False,
                                backends={"xen": DownXen})
    first.begin_run()
    assert first.load()["backend"] == "zcache"
    assert first.frontswap_init(64, "file")["type"] == 0
    for offset in range(PAGES):
        assert first.frontswap_store(0, offset, page(offset)) == 0  # acknowledged: in tmem
    backend = first.shim.backend
    assert isinstance(backend, ZcacheBackend) and backend._arena is not None
    backend._arena.close()  # the kill: the files stay as they are
    first.swap.close()
    first.state = "stopped"  # nothing more of it runs
    run = first.roots.run
    assert (run / ARENA_FILE).exists() and (run / POOLS_FILE).exists()
    return run


def restarted(daemon: Daemon, backend: str) -> None:
    """The second start: re-attach, load; every acknowledged page reads back."""
    daemon.begin_run()
    assert daemon.load()["backend"] == backend
    assert [daemon.frontswap_load(0, offset) for offset in range(PAGES)] == \
        [page(offset) for offset in range(PAGES)]


@pytest.mark.parametrize(("overrides", "backend", "frontswap"), [
    (("backend=auto",), "xen", True),  # the tmem host came up meanwhile
    (("backend=zcache", "tmem.frontswap=0"), "zcache", False),  # nofrontswap, tmem.frontswap=0
])
def test_pages_zcache_kept_go_back_to_their_areas_when_the_restart_loads_something_else(
        make_daemon: Any, overrides: tuple[str, ...], backend: str, frontswap: bool) -> None:
    run = killed_with_pages_in_zcache(make_daemon)
    second: Daemon = make_daemon(None, overrides=overrides, balloon_loops=False,
                                 backends={"xen": UpXen})
    restarted(second, backend)
    assert second.shim.flags["frontswap"] is frontswap
    if backend == "xen":  # the arena is gone, not left in /run for good
        assert not (run / ARENA_FILE).exists() and not (run / POOLS_FILE).exists()
    summary = second.shutdown()
    assert summary["clean"] is True and summary["lost_pages"] == 0, summary
    assert summary["kept_pages_given_back"] == {"backend": "zcache", "repatriated": PAGES}
    assert summary["areas"][0]["used"] == PAGES  # in the area's file, for the next start
    assert not (run / ARENA_FILE).exists()


def test_zcache_with_frontswap_takes_its_pages_back_itself(make_daemon: Any) -> None:
    """The usual restart is untouched: no give-back, the pages stay in tmem."""
    killed_with_pages_in_zcache(make_daemon)
    second: Daemon = make_daemon(None, overrides=("backend=auto",), balloon_loops=False,
                                 backends={"xen": DownXen})
    restarted(second, "zcache")
    assert second.shim.frontswap.curr_pages() == PAGES
    summary = second.shutdown()
    assert "kept_pages_given_back" not in summary
    assert summary["clean"] is True and summary["repatriated"] == PAGES


def test_pages_that_cannot_be_given_back_keep_the_chosen_backend_out_and_are_never_dropped(
        make_daemon: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The area's file refuses every write: the repatriation is refused, zcache stays loaded
    holding the pages, the load of xen fails naming why, and the stop is not clean."""
    run = killed_with_pages_in_zcache(make_daemon)

    def refuse(self: FileBacking, offset: int, data: bytes) -> None:
        raise BackendError(f"swap file {self.path}: write of slot {offset} refused (test)")

    monkeypatch.setattr(FileBacking, "write", refuse)
    second: Daemon = make_daemon(None, overrides=("backend=auto",), balloon_loops=False,
                                 backends={"xen": UpXen})
    second.begin_run()
    with pytest.raises(BackendError, match=r"could not be given back.*xen is not loaded"):
        second.load()
    assert second.shim.backend is not None and second.shim.backend.name == "zcache"
    assert second.shim.frontswap.curr_pages() == PAGES
    assert [second.frontswap_load(0, offset) for offset in range(PAGES)] == \
        [page(offset) for offset in range(PAGES)]  # still served
    summary = second.shutdown()
    assert summary["clean"] is False and summary["lost_pages"] == PAGES
    assert (run / ARENA_FILE).exists()  # the arena keeps them for the next start
