"""RAMster's keys and values in the cluster: the one place that knows their format.

A key names the node (or, for a cluster-wide shared pool, the pool's UUID), the pool, the
object and the page index.  The hash tag ``{...}`` covers node, pool and object, so one
object's pages share a slot and a flush of the object is one slot's work.  A value carries the
compressed page as stored locally, behind a header that repeats its own key and a CRC32 of key
and data: a value that came back from the wrong key, or damaged, is refused,
never served (``docs/ramster.md``, "Keys and values").
"""

from __future__ import annotations

import re
import struct
import zlib
from dataclasses import dataclass

from xentmem.errors import BackendError
from xentmem.tmem.abi import Oid

#: Every key starts so; an ACL user of a node is granted ``~<PREFIX>:<node id>:*``.
PREFIX = "xentmem"
#: The shared pools' part of the key space (``~<PREFIX>:shared:<uuid>:*`` per grant).
SHARED = "shared"
#: A node id: what a Redis ACL key pattern can hold without escaping.
NODE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")

MAGIC = b"XTRM"
VERSION = 1
#: magic, version, flags, key length, data length, crc32(key + data)
_HEADER = struct.Struct("<4sBBHII")
FLAG_PERSISTENT = 1
#: A value longer than this is not one of ours (a compressed page is at most a page).
MAX_DATA = 4096 + 64


class RecordError(BackendError):
    """A value from the cluster that is not the page asked for: damaged, foreign or truncated."""


def check_node_id(untrusted: str) -> str:
    if not NODE_ID.match(untrusted):
        raise ValueError(f"{untrusted!r} is not a node id (letters, digits, '.', '_', '-'; "
                         "at most 64, starting with a letter or digit)")
    if untrusted == SHARED:  # its keys would be every shared pool's, its ACL grant too
        raise ValueError(f"{SHARED!r} is not a node id: it names the shared pools' keys")
    return untrusted


@dataclass(frozen=True)
class RemoteKey:
    """Where one remote page lives: ``owner`` is the node id, or ``shared:<uuid>``."""

    owner: str
    pool: int
    oid: Oid
    index: int

    def object_tag(self) -> str:
        return object_tag(self.owner, self.pool, self.oid)

    def name(self) -> str:
        return page_name(self.object_tag(), self.index)


def object_tag(owner: str, pool: int, oid: Oid) -> str:
    """The key prefix of one object's pages: ``xentmem:{owner:pool:oid}``."""
    return f"{PREFIX}:{{{owner}:{pool:x}:{oid[0]:x}.{oid[1]:x}.{oid[2]:x}}}"


def object_mark(tag: str) -> str:
    """How a flush of a whole object that has yet to be done is kept among the pending
    deletes of key names (``ramster.deletes``): the object's tag and ``:*``, its keys' SCAN
    pattern, which no key name ends with (an index is hex)."""
    return f"{tag}:*"


def marked_object(name: str) -> str | None:
    """The tag of the object an :func:`object_mark` names; None for anything else (a key
    name, or a mark whose tag is not one this module writes)."""
    if not name.endswith(":*"):
        return None
    tag = name[:-2]
    try:
        parse_name(page_name(tag, 0))
    except ValueError:
        return None
    return tag


def page_name(tag: str, index: int) -> str:
    """The key of page ``index`` of the object whose :func:`object_tag` is ``tag`` (a batch
    computes the tag once per object)."""
    return f"{tag}:{index:x}"


def owner_of_node(node_id: str) -> str:
    """A node's own namespace: its node id (checked: it becomes part of an ACL pattern)."""
    return check_node_id(node_id)


def owner_of_shared(uuid_hex: str) -> str:
    """A shared pool's namespace: every node that opened the same UUID uses it."""
    if not re.fullmatch(r"[0-9a-f]{32}", uuid_hex):
        raise ValueError(f"{uuid_hex!r} is not a pool UUID as 32 hex digits")
    return f"{SHARED}:{uuid_hex}"


_NAME = re.compile(r"xentmem:\{(?P<owner>[A-Za-z0-9][A-Za-z0-9._-]{0,63}|shared:[0-9a-f]{32})"
                   r":(?P<pool>[0-9a-f]{1,8}):(?P<w0>[0-9a-f]{1,16})\.(?P<w1>[0-9a-f]{1,16})"
                   r"\.(?P<w2>[0-9a-f]{1,16})\}:(?P<index>[0-9a-f]{1,8})\Z")


def parse_name(untrusted_name: str) -> RemoteKey:
    """The :class:`RemoteKey` a key name stands for (a listing of the cluster's keys after a
    restart); ValueError for a name that is not exactly one of ours."""
    found = _NAME.match(untrusted_name)
    if found is None:
        raise ValueError(f"{untrusted_name[:120]!r} is not a xentmem page key")
    key = RemoteKey(found["owner"], int(found["pool"], 16),
                    Oid(int(found["w0"], 16), int(found["w1"], 16), int(found["w2"], 16)),
                    int(found["index"], 16))
    if key.name() != untrusted_name:  # leading zeros: not a name this module writes
        raise ValueError(f"{untrusted_name[:120]!r} is not a xentmem page key")
    return key


def key_pattern(owner: str) -> str:
    """The ACL key pattern that covers every page of ``owner``."""
    return f"{PREFIX}:{{{owner}:*"


def encode(key: RemoteKey, data: bytes, *, persistent: bool) -> bytes:
    return encode_named(key.name().encode(), data, persistent=persistent)


def encode_named(name: bytes, data: bytes, *, persistent: bool) -> bytes:
    """The value of the page whose key is ``name`` (a batch names each page once)."""
    if len(data) > MAX_DATA:
        raise ValueError(f"a remote page holds at most {MAX_DATA} bytes, not {len(data)}")
    crc = zlib.crc32(data, zlib.crc32(name))
    flags = FLAG_PERSISTENT if persistent else 0
    return b"".join((_HEADER.pack(MAGIC, VERSION, flags, len(name), len(data), crc), name, data))


def decode(key: RemoteKey, untrusted_value: bytes) -> bytes:
    """The page data of ``untrusted_value`` if it is exactly ``key``'s record; else RecordError."""
    return decode_named(key.name().encode(), untrusted_value)


def decode_named(name: bytes, untrusted_value: bytes) -> bytes:
    """As :func:`decode`, for the page whose key is ``name``."""
    size = len(untrusted_value)
    if size < _HEADER.size:
        raise RecordError(f"{name.decode()}: {size} bytes, shorter than a header")
    magic, version, _flags, name_len, data_len, crc = _HEADER.unpack_from(untrusted_value)
    if magic != MAGIC or version != VERSION:
        raise RecordError(f"{name.decode()}: not a xentmem record (magic {magic!r}, "
                          f"version {version})")
    if _HEADER.size + name_len + data_len != size or data_len > MAX_DATA:
        raise RecordError(f"{name.decode()}: lengths {name_len}+{data_len} do not match "
                          f"{size} bytes")
    start = _HEADER.size + name_len
    stored_name = untrusted_value[_HEADER.size:start]
    if stored_name != name:
        raise RecordError(f"{name.decode()}: the value is {stored_name[:80]!r}'s")
    data = untrusted_value[start:]
    if zlib.crc32(data, zlib.crc32(name)) != crc:
        raise RecordError(f"{name.decode()}: checksum mismatch")
    return data
