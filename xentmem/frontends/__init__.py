"""The two tmem frontends: cleancache (ephemeral, clean file pages) and frontswap (persistent)."""

from xentmem.frontends.backing import BackingStore, FileBacking, MemoryBacking
from xentmem.frontends.cleancache import Cleancache
from xentmem.frontends.frontswap import Frontswap

__all__ = ["BackingStore", "Cleancache", "FileBacking", "Frontswap", "MemoryBacking"]
