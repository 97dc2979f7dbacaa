"""Every filesystem path the daemon touches, built once and passed down.

Nothing reads ``/proc`` or ``/sys`` at import; tests build a :class:`Roots` over a temporary
tree and the code under test never notices the difference.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_RUN_DIR = "/run/xentmem"
BALLOON_SYSFS = "devices/system/xen_memory/xen_memory0"


@dataclass(frozen=True)
class Roots:
    """Where the guest's system files live.  ``root`` is ``/`` on a real system."""

    root: Path = Path("/")
    run_dir: Path | None = None
    #: A xenstored Unix socket; when unset a guest uses ``xenbus_dev``.
    xenstore_socket: Path | None = None
    extra: dict = field(default_factory=dict, compare=False, hash=False)

    @classmethod
    def from_env(cls, root: str | os.PathLike[str] | None = None, **kw: object) -> Roots:
        """Roots from ``XENTMEM_ROOT`` / ``XENSTORED_PATH`` unless given explicitly."""
        base = Path(root or os.environ.get("XENTMEM_ROOT") or "/")
        sock = kw.pop("xenstore_socket", None) or os.environ.get("XENSTORED_PATH")
        return cls(root=base, xenstore_socket=Path(sock) if sock else None, **kw)  # type: ignore[arg-type]

    def under(self, absolute: str) -> Path:
        """Map an absolute system path (``/proc/meminfo``) into this root."""
        return self.root / absolute.lstrip("/")

    @property
    def proc(self) -> Path:
        return self.under("/proc")

    @property
    def sys(self) -> Path:
        return self.under("/sys")

    @property
    def cmdline(self) -> Path:
        return self.under("/proc/cmdline")

    @property
    def balloon(self) -> Path:
        """The balloon driver's sysfs directory (``target_kb``, ``info/current_kb``)."""
        return self.sys / BALLOON_SYSFS

    @property
    def xenbus_dev(self) -> Path:
        return self.under("/dev/xen/xenbus")

    @property
    def run(self) -> Path:
        """The daemon's run directory (control socket, pid); ``/run/xentmem`` by default."""
        return self.run_dir if self.run_dir is not None else self.under(DEFAULT_RUN_DIR)
