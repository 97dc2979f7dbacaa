"""One tree of errors, so callers can catch exactly what they mean to handle.

Every error the project raises on purpose derives from :class:`XentmemError`; a bare
``except Exception`` is never needed to stay alive.
"""

from __future__ import annotations


class XentmemError(Exception):
    """Base of every error xentmem raises on purpose."""


class AbiError(XentmemError, ValueError):
    """A value does not fit the tmem ABI (bad oid word, flag word, page size...)."""


class ParamError(XentmemError, ValueError):
    """A module param or knob was refused; the message names it and what is accepted."""


class UnknownParam(ParamError):
    """No param of that name is declared (``not_found`` on the control socket)."""


class UnknownBackend(ParamError):
    """No installed backend has that name (``not_found`` on the control socket)."""


class BackendUnsupported(XentmemError):
    """A backend cannot run here (no hypervisor, no tmem host...); the registry skips it."""


class BackendError(XentmemError):
    """A backend failed in a way the caller should see (not an ordinary tmem miss)."""


class NoBackend(BackendError):
    """The operation needs a loaded backend and none is (``no_backend`` on the socket)."""


class DaemonStopping(XentmemError):
    """The daemon is stopping: a change that had not started when the stop began is refused
    and nothing changed (``shutting_down`` on the control socket)."""


class UnloadRefused(XentmemError):
    """Unloading the backend would lose data, so it was refused and nothing changed."""


class XenStoreError(XentmemError):
    """Talking to xenstore failed, timed out, or returned something we cannot trust."""


class ConfigError(XentmemError, ValueError):
    """A configuration file or command line was refused; nothing was applied."""


class ArenaError(XentmemError):
    """The page arena's file cannot be used (in use, unwritable, full); names the file."""


class ArenaDamaged(ArenaError):
    """The arena file is ours but damaged (version, size, header checksum): set aside or
    refused, never read as pages (``docs/page-arena.md``)."""


class ArenaRefused(ArenaError):
    """The arena file is not ours, or is a newer version's: never touched, always refused."""
