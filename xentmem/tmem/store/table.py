"""A store's tables on disk: the JSON a restart needs beside the page arena, checksummed.

Both tmem hosts keep what their arena's pages mean (the pool table, and for the host its
clients and sessions) in a small file in their run directory, rewritten atomically (a
temporary file renamed over it) whenever it changes, so a ``kill -9`` leaves either the old
file or the new one, never a torn one.  The format is written once, here: a magic line
naming what the file is, the xxh3-64 of the body in hex, then the body (compact JSON).
``docs/zcache.md`` ("Restart") and ``docs/page-arena.md`` say what each host keeps in it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import xxhash

from xentmem.files import write_atomically


class TableFile:
    """One checksummed JSON file: ``magic`` says whose it is (``"xentmem-zcache-pools 1"``)."""

    def __init__(self, path: Path, magic: str) -> None:
        self.path = path
        self.magic = magic

    def read(self) -> Any:
        """The body, checked: FileNotFoundError when missing, else ValueError naming the file
        and what is wrong (its magic, checksum or JSON)."""
        raw = self.path.read_bytes()
        head, _, rest = raw.partition(b"\n")
        digest, _, body = rest.partition(b"\n")
        if head.decode("ascii", "replace") != self.magic:
            raise ValueError(f"{self.path}: not a {self.magic.rsplit(' ', 1)[0]} file "
                             f"(no {self.magic!r} line)")
        if xxhash.xxh3_64_hexdigest(body) != digest.decode("ascii", "replace"):
            raise ValueError(f"{self.path}: checksum mismatch")
        try:
            return json.loads(body)
        except ValueError as exc:
            raise ValueError(f"{self.path}: {exc}") from None

    def write(self, body: Any) -> None:
        """Replace the file atomically, mode 0600 (OSError when it cannot be written)."""
        data = json.dumps(body, separators=(",", ":")).encode()
        write_atomically(self.path,
                         f"{self.magic}\n{xxhash.xxh3_64_hexdigest(data)}\n".encode() + data,
                         0o600)

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


__all__ = ["TableFile"]
