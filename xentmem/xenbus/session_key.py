"""A session's secret, and what both ends derive from it: directory names and message MACs.

Another guest may probe node names it cannot read (oxenstored answers ``ENOENT`` for a
missing node and ``EACCES`` for an existing one), and a message's name spells its body.  So
every name a message creates sits in a directory whose name only the two ends can compute,
``HMAC-SHA256(key, direction, seq, part)``, and each message carries a MAC over its whole
text, which also makes a message written by anyone without the key (another domain the
guest let write its area, at any moment) fail to authenticate.  The host makes a fresh key
for every session and writes it where only the guest and dom0 can read it
(``docs/protocol.md``, The handshake and What another guest can learn).
"""

from __future__ import annotations

import binascii
import hashlib
import hmac
import re
import secrets
import struct

from xentmem.xenbus.body import WireError

#: Bytes of key (written as 64 lowercase hex digits).
KEY_BYTES = 32
#: Characters of a derived directory name, and of a MAC in a message's name: 12 bytes of
#: HMAC-SHA256 as base64url (96 bits: a guess is confirmed once in 2^96 probes).
TAG_CHARS = 16
TAG_RE = r"[A-Za-z0-9_-]{16}"
_KEY_RE = re.compile(rb"[0-9a-f]{64}")
_DERIVED = struct.Struct("<4sQB")  # purpose, seq or index, part
_URL_SAFE = bytes.maketrans(b"+/", b"-_")
_SHA256_BLOCK = 64
_IPAD = bytes.maketrans(bytes(range(256)), bytes(b ^ 0x36 for b in range(256)))
_OPAD = bytes.maketrans(bytes(range(256)), bytes(b ^ 0x5C for b in range(256)))


class SessionKey:
    """One session's key: the names and MACs both ends derive from it."""

    def __init__(self, key: bytes) -> None:
        if len(key) != KEY_BYTES:
            raise WireError(f"a session key is {KEY_BYTES} bytes, got {len(key)}")
        self._key = key
        # HMAC-SHA256 (RFC 2104) with the key's two padded blocks hashed once: each tag then
        # costs two copies of a hash state, not a key schedule (``hmac.digest`` in OpenSSL 3
        # looks the digest up and hashes both pads on every call, two to three times dearer).
        block = key.ljust(_SHA256_BLOCK, b"\0")
        self._inner = hashlib.sha256(block.translate(_IPAD))
        self._outer = hashlib.sha256(block.translate(_OPAD))
        self._chunks: dict[tuple[bool, int], str] = {}

    @classmethod
    def new(cls) -> SessionKey:
        return cls(secrets.token_bytes(KEY_BYTES))

    @classmethod
    def parse(cls, untrusted: bytes) -> SessionKey:
        """The key as the host wrote it (64 lowercase hex digits), or WireError."""
        text = untrusted.rstrip(b"\x00")
        if not _KEY_RE.fullmatch(text):
            raise WireError("session key is not 64 lowercase hex digits")
        return cls(bytes.fromhex(text.decode("ascii")))

    def encode(self) -> bytes:
        return self._key.hex().encode("ascii")

    def _tag(self, data: bytes) -> str:
        inner = self._inner.copy()
        inner.update(data)
        outer = self._outer.copy()
        outer.update(inner.digest())
        digest = outer.digest()[:12]  # 12 bytes: 16 characters
        return binascii.b2a_base64(digest, newline=False).translate(_URL_SAFE).decode()

    def slot(self, seq: int, part: int = 0, *, reply: bool) -> str:
        """The directory of message ``seq`` (or of its name part ``part``): one per name."""
        return self._tag(_DERIVED.pack(b"rsp/" if reply else b"req/", seq, part))

    def chunk(self, i: int, *, reply: bool) -> str:
        """The name of spill chunk ``i`` (``data/<name>``, ``rsp-data/<name>``)."""
        name = self._chunks.get((reply, i))
        if name is None:
            name = self._chunks[reply, i] = self._tag(
                _DERIVED.pack(b"rsd/" if reply else b"dat/", i, 0))
        return name

    def mac(self, seq: int, shape: str, text: bytes, *, reply: bool) -> str:
        """The MAC of message ``seq``: its direction, shape and whole text."""
        head = _DERIVED.pack(b"rsp!" if reply else b"req!", seq, 0) + shape.encode() + b"@"
        return self._tag(head + text)

    def check_mac(self, untrusted_mac: str, seq: int, shape: str, text: bytes, *,
                  reply: bool) -> bool:
        return hmac.compare_digest(untrusted_mac, self.mac(seq, shape, text, reply=reply))

    def state_mac(self, state: int) -> str:
        """The guest's signature on a state that ends the session (``state-mac``)."""
        return self._tag(_DERIVED.pack(b"sta!", state, 0))

    def check_state_mac(self, untrusted: bytes, state: int) -> bool:
        return hmac.compare_digest(untrusted.rstrip(b"\x00"), self.state_mac(state).encode())

    def __repr__(self) -> str:  # never the key itself (logs, tracebacks)
        return "SessionKey(...)"
