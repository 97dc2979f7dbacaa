"""The NBD protocol's numbers and records, as the NBD project's ``doc/proto.md`` defines them.

Only what this server speaks: the fixed newstyle handshake, ``NBD_OPT_EXPORT_NAME``,
``_ABORT``, ``_LIST``, ``_INFO``, ``_GO``, simple replies, and the commands of
:data:`TRANSMISSION_FLAGS`.  No I/O here: the server reads and writes these records.
All integers are big-endian (network byte order).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

# -- handshake ---------------------------------------------------------------------------------

NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC", the INIT_PASSWD
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT": newstyle, and every option's magic
REPLY_MAGIC = 0x3E889045565A9  # every option reply

FLAG_FIXED_NEWSTYLE = 1 << 0  # handshake flags
FLAG_NO_ZEROES = 1 << 1
HANDSHAKE_FLAGS = FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES
FLAG_C_FIXED_NEWSTYLE = 1 << 0  # client flags
FLAG_C_NO_ZEROES = 1 << 1
CLIENT_FLAGS_KNOWN = FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES

OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_STARTTLS = 5
OPT_INFO = 6
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8
OPT_LIST_META_CONTEXT = 9
OPT_SET_META_CONTEXT = 10

REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_ERR_UNSUP = (1 << 31) + 1
REP_ERR_POLICY = (1 << 31) + 2
REP_ERR_INVALID = (1 << 31) + 3
REP_ERR_UNKNOWN = (1 << 31) + 6
REP_ERR_SHUTDOWN = (1 << 31) + 7
REP_ERR_TOO_BIG = (1 << 31) + 9

INFO_EXPORT = 0
INFO_NAME = 1
INFO_DESCRIPTION = 2
INFO_BLOCK_SIZE = 3

# -- transmission ------------------------------------------------------------------------------

FLAG_HAS_FLAGS = 1 << 0  # transmission flags
FLAG_READ_ONLY = 1 << 1
FLAG_SEND_FLUSH = 1 << 2
FLAG_SEND_FUA = 1 << 3
FLAG_ROTATIONAL = 1 << 4
FLAG_SEND_TRIM = 1 << 5
FLAG_SEND_WRITE_ZEROES = 1 << 6
FLAG_SEND_DF = 1 << 7
FLAG_CAN_MULTI_CONN = 1 << 8
FLAG_SEND_CACHE = 1 << 10
FLAG_SEND_FAST_ZERO = 1 << 11
#: What every export of ours offers: flush and FUA (the backing file is synced), trim and
#: write-zeroes (pages invalidated), and several connections (no per-connection cache).
TRANSMISSION_FLAGS = (FLAG_HAS_FLAGS | FLAG_SEND_FLUSH | FLAG_SEND_FUA | FLAG_SEND_TRIM
                      | FLAG_SEND_WRITE_ZEROES | FLAG_CAN_MULTI_CONN)

REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698

CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4
CMD_CACHE = 5
CMD_WRITE_ZEROES = 6
CMD_BLOCK_STATUS = 7

CMD_FLAG_FUA = 1 << 0
CMD_FLAG_NO_HOLE = 1 << 1
CMD_FLAG_DF = 1 << 2
CMD_FLAG_REQ_ONE = 1 << 3
CMD_FLAG_FAST_ZERO = 1 << 4
#: The command flags each command we serve accepts.  FUA is valid on every command once
#: ``NBD_FLAG_SEND_FUA`` is advertised ("the server MUST accept all commands with this bit
#: set"); NO_HOLE only on write-zeroes.  DF, REQ_ONE and FAST_ZERO belong to features we do
#: not advertise: EINVAL.
CMD_FLAGS_ALLOWED = {
    CMD_READ: CMD_FLAG_FUA,
    CMD_WRITE: CMD_FLAG_FUA,
    CMD_FLUSH: CMD_FLAG_FUA,
    CMD_TRIM: CMD_FLAG_FUA,
    CMD_WRITE_ZEROES: CMD_FLAG_FUA | CMD_FLAG_NO_HOLE,
}

# Error values ("Error values": the only ones a reply may carry).
EPERM = 1
EIO = 5
ENOMEM = 12
EINVAL = 22
ENOSPC = 28
EOVERFLOW = 75
ENOTSUP = 95
ESHUTDOWN = 108

# -- sizes -------------------------------------------------------------------------------------

#: One swap page: the smallest addressable unit and the alignment of every request.
MIN_BLOCK = 4096
PREFERRED_BLOCK = 4096
#: The longest read, write or write-zeroes we take (the per-connection buffer's size).  The
#: kernel's block layer caps a request at ``max_sectors`` (1.25 MiB by default); a 2 MiB folio
#: of swap fits too.
MAX_BLOCK = 2 * 1024 * 1024
#: A write payload this long is a denial of service: a hard disconnect, not a drained
#: EINVAL ("any length less than 2^25 SHOULD NOT be considered a denial of service").
DOS_PAYLOAD = 1 << 25
#: The longest option data read (a name is at most 4096 bytes; an INFO/GO request list at
#: most 2 x 65535): a longer option is a denial of service.
MAX_OPTION_DATA = 4 + 4096 + 2 + 2 * 65535
#: The longest string we send (export names, descriptions, error messages).
MAX_STRING = 4096

# -- records -----------------------------------------------------------------------------------

GREETING = struct.Struct(">QQH")  # NBDMAGIC, IHAVEOPT, handshake flags
CLIENT_FLAGS = struct.Struct(">I")
OPTION = struct.Struct(">QII")  # IHAVEOPT, option, length
OPTION_REPLY = struct.Struct(">QIII")  # REPLY_MAGIC, option, reply type, length
EXPORT_NAME_REPLY = struct.Struct(">QH")  # size, transmission flags (+124 zeroes)
INFO_EXPORT_BODY = struct.Struct(">HQH")
INFO_BLOCK_SIZE_BODY = struct.Struct(">HIII")
REQUEST = struct.Struct(">IHHQQI")  # magic, flags, type, handle, offset, length
SIMPLE_REPLY = struct.Struct(">IIQ")  # magic, error, handle
ZEROES_124 = bytes(124)


class OptionInvalid(ValueError):
    """Option data that does not parse: NBD_REP_ERR_INVALID."""


@dataclass(frozen=True)
class InfoRequest:
    """The data of an ``NBD_OPT_INFO`` or ``NBD_OPT_GO``."""

    name: str
    requests: tuple[int, ...]


def parse_info_request(data: bytes) -> InfoRequest:
    """Name length, name, count, count x u16; every length must add up to the option's."""
    if len(data) < 6:
        raise OptionInvalid(f"{len(data)} bytes of option data, at least 6 needed")
    (name_len,) = struct.unpack_from(">I", data)
    if name_len > len(data) - 6:
        raise OptionInvalid(f"name length {name_len} exceeds the option data")
    raw_name = data[4:4 + name_len]
    (count,) = struct.unpack_from(">H", data, 4 + name_len)
    if len(data) != 4 + name_len + 2 + 2 * count:
        raise OptionInvalid(f"{count} information requests do not fill the option data")
    requests = struct.unpack_from(f">{count}H", data, 6 + name_len)
    return InfoRequest(decode_string(raw_name), tuple(requests))


def decode_string(raw: bytes) -> str:
    """A protocol string: UTF-8, no NUL, at most 4096 bytes."""
    if len(raw) > MAX_STRING:
        raise OptionInvalid(f"a string of {len(raw)} bytes (at most {MAX_STRING})")
    if b"\0" in raw:
        raise OptionInvalid("a string with a NUL")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise OptionInvalid(f"a string that is not UTF-8: {exc}") from None


def option_reply(option: int, reply: int, data: bytes = b"") -> bytes:
    return OPTION_REPLY.pack(REPLY_MAGIC, option, reply, len(data)) + data


def error_message(text: str) -> bytes:
    """An error reply's message, cut to the protocol's string limit."""
    return text.encode("utf-8")[:MAX_STRING].decode("utf-8", "ignore").encode("utf-8")


def info_export(size: int, flags: int) -> bytes:
    return INFO_EXPORT_BODY.pack(INFO_EXPORT, size, flags)


def info_block_size() -> bytes:
    return INFO_BLOCK_SIZE_BODY.pack(INFO_BLOCK_SIZE, MIN_BLOCK, PREFERRED_BLOCK, MAX_BLOCK)


def info_string(kind: int, text: str) -> bytes:
    return struct.pack(">H", kind) + error_message(text)


def server_entry(name: str) -> bytes:
    """An ``NBD_REP_SERVER`` body: name length, name."""
    raw = name.encode("utf-8")
    return struct.pack(">I", len(raw)) + raw
