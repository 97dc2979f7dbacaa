"""Where the tmem device lives in xenstore: its two areas, their nodes, the request slots.

The host service creates both areas, as a toolstack does when it attaches a PV device: the
frontend area belongs to the guest (dom0 may read), the backend area to the host (the guest
may read).  Node names follow Linux's split drivers; ``docs/protocol.md`` (The two areas)
has the table.
"""

from __future__ import annotations

import re

from xentmem.xenbus.body import WireError

#: Device type and instance in both paths.
DEVICE = "tmem"
DEVINST = "0"
#: Message directories (``state`` and ``error`` are every xenbus device's: see
#: :mod:`xentmem.xenbus.device`), watched by the other end, and their spill chunks.
REQ_DIR = "req"
REQ_DATA_DIR = "data"
#: Where a guest tries, once per connect, how long a request name its xenstore takes: a path
#: as long as a request's directory (``req/<slot>/``, :data:`SLOT_CHARS`), outside the
#: watched ``req/``.
PROBE_DIR = "probe/" + "0" * 16
RSP_DIR = "rsp"
RSP_DATA_DIR = "rsp-data"
#: Each request name goes to a directory of its own, ``req/<slot>/<name>``, named from the
#: session key (:meth:`~xentmem.xenbus.session_key.SessionKey.slot`): C xenstored counts a
#: directory's child names against the 2048-byte record quota when a guest adds a child, so
#: long names are spread over directories (one each), and the host clears ``req/`` in bulk
#: before it could hold more than ``REQ_NAMES`` directories (64 names of 16 characters: 1128
#: bytes of the 2048-byte record; 128 of the 1000 nodes a guest may own).  It counts names,
#: not messages: messages of one or two names (a get, a text put) need the removal, and the
#: permission read after it, a half or a quarter as often as the longest ones.
REQ_NAMES = 64
#: Frontend nodes the host writes at set-up (pointers to the other end, as libxl writes).
FE_BACKEND = "backend"
FE_BACKEND_ID = "backend-id"
#: Frontend nodes the guest writes during the handshake.  ``state-mac`` signs a state that
#: ends the host's session (Initialising, Closing, Closed) with the session key.
FE_VERSION = "version"
FE_STATE_MAC = "state-mac"
#: Backend nodes the host writes.  ``session-key`` is the session's secret (readable by the
#: guest and dom0 only: the backend area is the host's).
BE_SESSION_KEY = "session-key"
BE_FRONTEND = "frontend"
BE_FRONTEND_ID = "frontend-id"
BE_VERSIONS = "versions"
BE_MAX_OPS = "max-ops"
BE_MAX_CHUNKS = "max-chunks"
BE_CHUNK_BYTES = "chunk-bytes"
BE_INLINE_BYTES = "inline-bytes"
BE_REPLY_INLINE_BYTES = "reply-inline-bytes"
BE_REPLY_CHUNK_BYTES = "reply-chunk-bytes"
BE_MAX_PARTS = "max-parts"
BE_FEATURE_LZ4 = "feature-lz4"

#: Highest domid a guest may have (DOMID_FIRST_RESERVED - 1).
MAX_DOMID = 0x7FEF
_DOMID_RE = re.compile(r"0|[1-9][0-9]{0,4}")
_UINT_RE = re.compile(r"[0-9]{1,10}")


def frontend_path(domid: int) -> str:
    return f"/local/domain/{domid}/device/{DEVICE}/{DEVINST}"


def backend_path(backend_domid: int, domid: int) -> str:
    return f"/local/domain/{backend_domid}/backend/{DEVICE}/{domid}/{DEVINST}"


def parse_domid(untrusted_text: str) -> int:
    """A domid written as decimal text, 0..0x7FEF, or WireError (which shows the text as
    ``ascii()`` does: its message may end up in an ``error`` node, printable ASCII only)."""
    text = untrusted_text.strip("\x00")
    if not _DOMID_RE.fullmatch(text) or int(text) > MAX_DOMID:
        raise WireError(f"{untrusted_text[:20]!a} is not a domid")
    return int(text)


def parse_uint(untrusted_text: str, *, low: int, high: int, what: str) -> int:
    """A bounded decimal from a node, or WireError naming the node (the text shown as
    ``ascii()`` does, as in :func:`parse_domid`)."""
    text = untrusted_text.strip("\x00")
    if not _UINT_RE.fullmatch(text) or not low <= int(text) <= high:
        raise WireError(f"{what}: {untrusted_text[:20]!a} is not an integer in {low}..{high}")
    return int(text)
