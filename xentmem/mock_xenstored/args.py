"""A request's untrusted arguments turned into checked paths, permissions and numbers.

Each parser either returns a value the store may trust or raises ``EINVAL`` (a
:class:`~xentmem.mock_xenstored.store.StoreError`), as C xenstored does.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from xentmem.mock_xenstored.perms import LETTER_ACCESS, Caller, PermEntry, Perms
from xentmem.mock_xenstored.store import Limits, StoreError, home_path
from xentmem.mock_xenstored.wire import XENSTORE_ABS_PATH_MAX

#: Domain ids are 16 bits in Xen; DOMID_FIRST_RESERVED (0x7FF0) and above are not domains.
DOMID_FIRST_RESERVED = 0x7FF0

#: The bytes a node name may hold; deleting them from a path (``bytes.translate``, one pass
#: in C, several times faster than a regular expression over a 2 KiB path) leaves the rest.
_VALID_PATH_BYTES = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-/_@"
_LOCAL_DOMAIN_PREFIX = re.compile(r"/local/domain/[0-9]{1,5}/")
_UNSIGNED = re.compile(r"^[0-9]{1,10}$")


def _ascii(untrusted: bytes, what: str) -> str:
    try:
        return untrusted.decode("ascii")
    except UnicodeDecodeError:
        raise StoreError("EINVAL", f"{what} is not ASCII") from None


def canonical_path(untrusted_path: bytes, caller: Caller, limits: Limits) -> str:
    """Resolve a relative path under the caller's home and check it; ``EINVAL`` if bad.

    Paths starting with ``@`` are returned unchanged: only WATCH, UNWATCH and SET_PERMS
    accept them, and they check for themselves.
    """
    path = _ascii(untrusted_path, "path")
    if path.startswith("@"):
        return path
    if not path.startswith("/"):
        path = f"{home_path(caller.domid)}/{path}"
    check_path(path, limits)
    return path


def check_path(path: str, limits: Limits) -> None:
    """C xenstored's ``is_valid_nodename`` with its length rules."""
    if not path.startswith("/"):
        raise StoreError("EINVAL", f"{path!r} is not absolute")
    if path != "/" and path.endswith("/"):
        raise StoreError("EINVAL", f"{path!r} ends in /")
    if "//" in path:
        raise StoreError("EINVAL", f"{path!r} holds //")
    if not path.isascii() or path.encode("ascii").translate(None, _VALID_PATH_BYTES):
        raise StoreError("EINVAL", f"{path!r} holds a character xenstore refuses")
    if len(path) > XENSTORE_ABS_PATH_MAX:
        raise StoreError("EINVAL", f"path longer than {XENSTORE_ABS_PATH_MAX}")
    local = _LOCAL_DOMAIN_PREFIX.match(path)
    below_home = len(path) - (local.end() if local else 0)
    if below_home > limits.max_path_bytes:
        raise StoreError("EINVAL", f"path longer than {limits.max_path_bytes} below the home")


def parse_perm(untrusted_entry: bytes) -> PermEntry:
    """``b"r5"`` -> ``PermEntry(5, READ)``; anything else is ``EINVAL``."""
    text = _ascii(untrusted_entry, f"permission {untrusted_entry!r}")
    letter, digits = text[:1], text[1:]
    if letter not in LETTER_ACCESS or not _UNSIGNED.match(digits):
        raise StoreError("EINVAL", f"bad permission {text!r}")
    domid = int(digits)
    if domid >= 1 << 32:
        raise StoreError("EINVAL", f"domid {domid} out of range")
    return PermEntry(domid, LETTER_ACCESS[letter])


def parse_perms(untrusted_entries: Sequence[bytes]) -> Perms:
    """A whole list; at least one entry."""
    if not untrusted_entries:
        raise StoreError("EINVAL", "no permissions given")
    return Perms(tuple(parse_perm(e) for e in untrusted_entries))


def parse_domid(untrusted: bytes) -> int:
    """A domain id argument: decimal digits below DOMID_FIRST_RESERVED, else ``EINVAL``."""
    text = _ascii(untrusted, "domid")
    if not _UNSIGNED.match(text) or int(text) >= DOMID_FIRST_RESERVED:
        raise StoreError("EINVAL", f"bad domid {text!r}")
    return int(text)


def parse_unsigned(untrusted: bytes) -> int:
    """An unsigned decimal argument (mfn, event channel, offset), else ``EINVAL``."""
    text = _ascii(untrusted, "number")
    if not _UNSIGNED.match(text):
        raise StoreError("EINVAL", f"bad number {text!r}")
    return int(text)
