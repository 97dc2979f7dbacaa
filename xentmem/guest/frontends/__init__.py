"""The two tmem frontends: cleancache (ephemeral, clean file pages) and frontswap (persistent)."""

from xentmem.guest.frontends.backing import BackingStore, FileBacking, MemoryBacking
from xentmem.guest.frontends.cleancache import Cleancache
from xentmem.guest.frontends.frontswap import Frontswap

__all__ = ["BackingStore", "Cleancache", "FileBacking", "Frontswap", "MemoryBacking"]
