"""A backend from a distribution that is not xentmem is found through the entry point."""

from __future__ import annotations

import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from xentmem.errors import BackendError, ParamError
from xentmem.guest import registry
from xentmem.guest.cmdline import BootParams
from xentmem.guest.frontends import MemoryBacking
from xentmem.guest.shim import Shim
from xentmem.roots import Roots

PLUGIN_SOURCE = '''
"""A third-party tmem backend: a dict, nothing more."""
import errno
from xentmem.guest.backend import Backend
from xentmem.params import Param, ParamSet


class DictStore(Backend):
    name = "dictstore"
    params = ParamSet(Param("greeting", str, "hello", "a param of the plugin's own"))

    def __init__(self, values, **kw):
        super().__init__(values, **kw)
        self.pools = {}

    def new_pool(self, uuid, flags):
        pool_id = len(self.pools)
        self.pools[pool_id] = {}
        return pool_id

    def destroy_pool(self, pool_id):
        return 1 if self.pools.pop(pool_id, None) is not None else 0

    def put_page(self, pool_id, oid, index, page):
        self.pools[pool_id][(oid, index)] = page
        return 1

    def get_page(self, pool_id, oid, index):
        page = self.pools.get(pool_id, {}).get((oid, index))
        return (1, page) if page is not None else (0, None)

    def flush_page(self, pool_id, oid, index):
        return 1 if self.pools[pool_id].pop((oid, index), None) is not None else 0

    def flush_object(self, pool_id, oid):
        return 0


class NotABackend:
    pass
'''


def install_fake_distribution(site: Path, entry_points: str) -> None:
    """Lay out a distribution the way pip would: a module plus a .dist-info with metadata."""
    (site / "xentmem_dictstore.py").write_text(PLUGIN_SOURCE)
    info = site / "xentmem_dictstore-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: xentmem-dictstore\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(textwrap.dedent(entry_points))


@pytest.fixture
def plugin_site(tmp_path: Path) -> Iterator[Path]:
    site = tmp_path / "site"
    site.mkdir()
    sys.path.insert(0, str(site))
    yield site
    sys.path.remove(str(site))
    sys.modules.pop("xentmem_dictstore", None)


def test_third_party_backend_is_discovered_and_loaded(plugin_site: Path, tmp_path: Path) -> None:
    install_fake_distribution(plugin_site, """
        [xentmem.backends]
        dictstore = xentmem_dictstore:DictStore
    """)
    assert "dictstore" in registry.available()
    assert {"zcache", "xen"} <= set(registry.available())

    shim = Shim(roots=Roots(root=tmp_path), boot=BootParams())
    shim.frontswap.init(0, MemoryBacking(8))
    backend = shim.load("dictstore", {"greeting": "hi"})
    assert type(backend).__module__ == "xentmem_dictstore"
    assert backend.values["greeting"] == "hi"
    assert shim.frontswap.store(0, 3, b"x" * 4096) == 0
    assert shim.frontswap.load(0, 3) == b"x" * 4096
    with pytest.raises(ParamError, match="unknown param 'capacity' for dictstore"):
        Shim(roots=Roots(root=tmp_path), boot=BootParams()).load("dictstore", {"capacity": "1"})


def test_entry_point_to_something_else_is_refused(plugin_site: Path) -> None:
    install_fake_distribution(plugin_site, """
        [xentmem.backends]
        bogus = xentmem_dictstore:NotABackend
        broken = xentmem_dictstore_missing:Whatever
    """)
    with pytest.raises(BackendError, match="is not a xentmem Backend"):
        registry.backend_class("bogus")
    with pytest.raises(BackendError, match="failed to import"):
        registry.backend_class("broken")
