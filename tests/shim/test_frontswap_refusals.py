"""A frontswap store that the backing store refuses changes nothing: the slot's previous page
stays readable, wherever it was (tmem or the backing store), in every mode."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
from fakes.recording_backend import RecordingBackend

from xentmem.errors import BackendError
from xentmem.guest.cmdline import BootParams
from xentmem.guest.frontends import MemoryBacking
from xentmem.guest.shim import Shim
from xentmem.roots import Roots

REFUSALS = (errno.ENOSPC, errno.EFBIG, errno.EIO)


def page(n: int) -> bytes:
    return n.to_bytes(4, "little") * 1024


class RefusingBacking(MemoryBacking):
    """A memory backing store whose writes fail with ``refuse`` (an errno) while it is set."""

    def __init__(self, pages: int) -> None:
        super().__init__(pages)
        self.refuse: int | None = None

    def write(self, offset: int, page: bytes) -> None:
        if self.refuse is not None:
            err = OSError(self.refuse, os.strerror(self.refuse))
            raise BackendError(f"write of slot {offset} failed: {err}") from err
        super().write(offset, page)


def loaded(tmp_path: Path, **params: str) -> tuple[Shim, RecordingBackend, RefusingBacking]:
    shim = Shim(roots=Roots(root=tmp_path), boot=BootParams())
    backing = RefusingBacking(64)
    shim.frontswap.init(0, backing)
    backend = shim.load(RecordingBackend, params)
    return shim, backend, backing


@pytest.mark.parametrize("err", REFUSALS)
@pytest.mark.parametrize("tmem_full", [True, False])
def test_a_refused_store_over_a_page_in_tmem_keeps_it(tmp_path: Path, err: int,
                                                      tmem_full: bool) -> None:
    shim, backend, backing = loaded(tmp_path)
    assert shim.frontswap.store(0, 5, page(1)) == 0
    backend.fail_puts = tmem_full
    backing.refuse = err
    with pytest.raises(BackendError, match=os.strerror(err)):
        shim.frontswap.store(0, 5, page(2))
    backing.refuse = None
    backend.fail_puts = False
    assert shim.frontswap.load(0, 5) == page(1)
    assert shim.frontswap.curr_pages() == 1


@pytest.mark.parametrize("err", REFUSALS)
def test_a_refused_store_over_a_page_in_the_backing_store_keeps_it(tmp_path: Path,
                                                                   err: int) -> None:
    shim, backend, backing = loaded(tmp_path)
    backend.fail_puts = True
    assert shim.frontswap.store(0, 7, page(1)) == -1  # in the backing store
    backing.refuse = err
    with pytest.raises(BackendError):
        shim.frontswap.store(0, 7, page(2))
    assert shim.frontswap.load(0, 7) == page(1)


@pytest.mark.parametrize("params", [{}, {"frontswap_writethrough": "1"}])
def test_a_refused_store_changes_nothing_in_writethrough_or_without_a_backend(
        tmp_path: Path, params: dict[str, str]) -> None:
    shim, _backend, backing = loaded(tmp_path, **params)
    shim.frontswap.store(0, 3, page(1))
    backing.refuse = errno.EIO
    with pytest.raises(BackendError):
        shim.frontswap.store(0, 3, page(2))
    assert shim.frontswap.load(0, 3) == page(1)
    backing.refuse = None
    shim.unload()  # the page goes to the backing store
    backing.refuse = errno.ENOSPC
    with pytest.raises(BackendError):
        shim.frontswap.store(0, 3, page(3))
    assert shim.frontswap.load(0, 3) == page(1)


def test_a_duplicate_that_tmem_takes_replaces_the_page_and_leaves_no_second_copy(
        tmp_path: Path) -> None:
    shim, _backend, backing = loaded(tmp_path)
    assert shim.frontswap.store(0, 5, page(1)) == 0
    assert shim.frontswap.store(0, 5, page(2)) == 0
    assert shim.frontswap.load(0, 5) == page(2)
    assert backing.used() == 0 and shim.frontswap.curr_pages() == 1


def test_an_exclusive_get_whose_backing_write_fails_keeps_the_page_in_tmem(
        tmp_path: Path) -> None:
    shim, _backend, backing = loaded(tmp_path, frontswap_exclusive_gets="1")
    assert shim.frontswap.store(0, 2, page(2)) == 0
    backing.refuse = errno.ENOSPC
    assert shim.frontswap.load(0, 2) == page(2)
    assert shim.frontswap.curr_pages() == 1
    backing.refuse = None
    assert shim.frontswap.load(0, 2) == page(2)
    assert shim.frontswap.curr_pages() == 0 and backing.read(2) == page(2)
