"""The control protocol of ``xentmemd`` and ``xentmem-hostd``: versioned JSON lines over a
Unix stream socket, one request and one answer per line, in order (``docs/control-protocol.md``).

Both daemons speak this one envelope; each declares its own op table (``xentmemd``'s is
:data:`OPS` below, ``xentmem-hostd``'s :data:`xentmem.hostd.control.OPS`).  A daemon checks a
request against its table before anything runs, so a refused request changed nothing; the
client learns from it which ops may be resent.  This module does no I/O: it encodes, decodes
and checks, so both ends share one definition.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from xentmem.errors import XentmemError

#: Bumped when an op changes meaning or an argument changes type; adding ops does not bump it.
PROTOCOL_VERSION = 1
#: The longest request line the daemon reads (a page is ~5.5 KiB of base64; params are small).
MAX_REQUEST_BYTES = 64 * 1024
#: The deepest nesting of arrays and objects a request may have (the deepest op needs 4:
#: ``{"args": {"key": {"oid": [...]}}}``).  Checked before parsing: a parser recurses.
MAX_REQUEST_DEPTH = 32
#: The longest response line a client reads (metrics and pools can be long).
MAX_RESPONSE_BYTES = 16 * 1024 * 1024
#: The socket's file name inside the daemon's run directory.
SOCKET_NAME = "control.sock"
DEFAULT_SOCKET_PATH = "/run/xentmem/" + SOCKET_NAME
#: The backing stores of a swap area (``frontswap.init``, ``nbd.add``): a file the daemon
#: names, or its memory; a file at a chosen path is ``"file"`` with a ``path``.
SWAP_BACKINGS = ("file", "memory")
#: The most pages a swap area may have (``frontswap.init``, ``nbd.add``): 4 GiB of slots.
#: The one bound, which the daemon enforces and ``xentmem swap add --size`` checks first.
MAX_AREA_PAGES = 1 << 20
#: The content type of the ``metrics`` op's text (Prometheus text exposition format 0.0.4).
METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# -- error codes: stable strings a program can branch on ------------------------------------

#: The line is not a JSON object with an ``op``, is too long, or is not UTF-8.
BAD_REQUEST = "bad_request"
#: ``v`` names a protocol version this daemon does not speak.
UNSUPPORTED_VERSION = "unsupported_version"
#: No such op.
UNKNOWN_OP = "unknown_op"
#: An argument is unknown, missing, or of the wrong JSON type.
BAD_ARGS = "bad_args"
#: A value was refused (a param out of range, a page of the wrong size, a bad pool id...).
BAD_VALUE = "bad_value"
#: A param, backend, pool or swap type of that name does not exist.
NOT_FOUND = "not_found"
#: The op needs a loaded backend and none is.
NO_BACKEND = "no_backend"
#: The backend failed or cannot run here (load refused, probe failed, I/O error).
BACKEND_ERROR = "backend_error"
#: Unloading would lose pages, so the backend stays loaded.
UNLOAD_REFUSED = "unload_refused"
#: The daemon has too many connections open.
BUSY = "busy"
#: The daemon is stopping and takes no new work.
SHUTTING_DOWN = "shutting_down"
#: An unexpected failure inside the daemon (logged there with its traceback).
INTERNAL = "internal"
# Raised by the client only, never sent by the daemon:
#: The socket could not be reached (no daemon, wrong path, no permission).
UNAVAILABLE = "unavailable"
#: No answer within the client's timeout.
TIMEOUT = "timeout"
#: The daemon's answer could not be understood (not JSON, wrong version, wrong id).
PROTOCOL = "protocol"

ERROR_CODES = (
    BAD_REQUEST, UNSUPPORTED_VERSION, UNKNOWN_OP, BAD_ARGS, BAD_VALUE, NOT_FOUND, NO_BACKEND,
    BACKEND_ERROR, UNLOAD_REFUSED, BUSY, SHUTTING_DOWN, INTERNAL, UNAVAILABLE, TIMEOUT, PROTOCOL,
)


class ControlError(XentmemError):
    """An error reply (or a client-side failure), with a stable ``code`` and a message."""

    def __init__(self, code: str, message: str, *, connection: bool = False) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        #: The daemon said it about the connection (``"id": null``), not about a request.
        self.connection = connection

    def __repr__(self) -> str:
        return f"ControlError({self.code!r}, {self.message!r})"

    def to_wire(self) -> dict[str, str]:
        return {"code": self.code, "message": self.message}

    @property
    def unreachable(self) -> bool:
        """True when there was no daemon to ask (not running, no answer), not a refusal."""
        return self.code in (UNAVAILABLE, TIMEOUT)


# -- argument kinds -------------------------------------------------------------------------

#: Names of the JSON shapes an argument may take.  ``page`` and ``bytes`` are base64 text;
#: ``key`` is a cleancache file key (see :func:`decode_file_key`); ``any`` is a JSON scalar;
#: ``domid`` a guest's domain id or ``"all"`` (xl's ``-a``); ``flag`` true/false or 0/1.
ARG_KINDS = ("str", "int", "uint", "bool", "any", "object", "bytes", "page", "key", "domid",
             "flag")
#: The highest domain id a guest can have (DOMID_FIRST_RESERVED - 1 in Xen's public headers).
MAX_DOMID = 0x7FEF


@dataclass(frozen=True)
class Arg:
    name: str
    kind: str
    doc: str
    required: bool = True


@dataclass(frozen=True)
class OpSpec:
    """One op: its name, its arguments, and what it answers (for the docs)."""

    name: str
    doc: str
    args: tuple[Arg, ...] = ()
    returns: str = ""
    #: True when the op changes daemon state (load, set, put...): refused while shutting down.
    mutates: bool = False
    arg_names: frozenset[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for arg in self.args:
            if arg.kind not in ARG_KINDS:  # pragma: no cover - a declaration bug
                raise ValueError(f"op {self.name}: arg {arg.name} has unknown kind {arg.kind}")
        object.__setattr__(self, "arg_names", frozenset(a.name for a in self.args))


def _op(name: str, doc: str, *args: Arg, returns: str = "", mutates: bool = False) -> OpSpec:
    return OpSpec(name, doc, tuple(args), returns, mutates)


_POOL = Arg("pool_id", "int", "the cleancache pool id init_fs returned")
_KEY = Arg("key", "key",
           "the file: an inode number, {\"handle\": base64}, or {\"oid\": [w0, w1, w2]}")
_INDEX = Arg("index", "uint", "the page index within the file")
_TYPE = Arg("type", "uint", "the swap type frontswap.init returned")
_OFFSET = Arg("offset", "uint", "the page slot within the swap area")

OPS: dict[str, OpSpec] = {
    spec.name: spec
    for spec in (
        _op("hello", "protocol version, daemon version and the ops this daemon serves",
            returns="{protocol, daemon_version, ops}"),
        _op("status", "the daemon at a glance: backend, why it was chosen, flags, frontends, "
            "balloon loop state",
            returns="{pid, uptime_s, config, backend, backend_choice, flags, cleancache, "
                    "frontswap, balloon}"),
        _op("params.list", "every param: the shim's flags (read-only), the backend's params "
            "and the selfballoon knobs, with value, default, writable and accepted values",
            returns="[{name, section, value, default, writable, type, accepted, unit, doc}]"),
        _op("params.get", "one param", Arg("name", "str", "the param's name"),
            returns="{name, section, value, ...} as in params.list"),
        _op("params.set", "change a run-time-writable backend param or a selfballoon knob",
            Arg("name", "str", "the param's name"),
            Arg("value", "any", "the new value: typed JSON or the string a sysfs write takes"),
            returns="{name, section, value, previous}", mutates=True),
        _op("backends", "the backends installed (entry points), their summaries and params",
            returns="[{name, summary, loaded, params: [...]}]"),
        _op("backend.load", "load a backend with module params (the shim's flags included)",
            Arg("name", "str", "a backend name, or \"auto\""),
            Arg("params", "object", "module params, name -> value", required=False),
            returns="{backend, params, choice}", mutates=True),
        _op("backend.unload", "stop the loops, repatriate swap pages, drop ephemeral pools",
            returns="{backend, repatriated, pools_dropped}", mutates=True),
        _op("pools", "the pools behind each frontend, with their counters",
            returns="{backend, cleancache: [...], frontswap: {...}, backend_pools: [...]}"),
        _op("stats", "frontend counters, the backend's required and detailed counters",
            returns="{cleancache, frontswap, backend, backend_detailed}"),
        _op("balloon", "the self-balloon figures and the last decisions",
            Arg("limit", "uint", "how many decisions, newest last (default 20)", required=False),
            returns="{running, available, figures, history}"),
        _op("metrics", "counters and balloon figures in Prometheus text format",
            returns="{content_type, text}"),
        _op("config.reload", "re-read the config file and apply what may change at run time "
            "(as SIGHUP does)", returns="{applied, needs_reload, config}", mutates=True),
        # -- the page API: cleancache --------------------------------------------------------
        _op("cleancache.init_fs", "a filesystem was mounted: a private ephemeral pool",
            returns="{pool_id}", mutates=True),
        _op("cleancache.init_shared_fs", "a clustered filesystem was mounted: a shared pool",
            Arg("uuid", "str", "the filesystem's uuid (36-character text form)"),
            returns="{pool_id}", mutates=True),
        _op("cleancache.put_page", "offer a clean page", _POOL, _KEY, _INDEX,
            Arg("data", "page", "the page, 4096 bytes, base64"),
            returns="{stored: bool}", mutates=True),
        _op("cleancache.get_page", "read a clean page back (a miss is null)", _POOL, _KEY, _INDEX,
            returns="{data: base64 | null}", mutates=True),
        _op("cleancache.invalidate_page", "the page changed: drop the cached copy",
            _POOL, _KEY, _INDEX, returns="{}", mutates=True),
        _op("cleancache.invalidate_inode", "the file went away: drop all its pages",
            _POOL, _KEY, returns="{}", mutates=True),
        _op("cleancache.invalidate_fs", "the filesystem was unmounted: drop its pool",
            _POOL, returns="{}", mutates=True),
        # -- the page API: frontswap ---------------------------------------------------------
        _op("frontswap.init", "create a swap area (swapon) backed by memory or a file in the "
            "run directory",
            Arg("pages", "uint", "the area's size in 4 KiB pages"),
            Arg("backing", "str", "\"memory\" (default) or \"file\"", required=False),
            Arg("type", "uint", "the swap type to use (default: the lowest free)",
                required=False),
            returns="{type, backing: {kind, pages, used, path?}}", mutates=True),
        _op("frontswap.store", "store a swap page", _TYPE, _OFFSET,
            Arg("data", "page", "the page, 4096 bytes, base64"),
            returns="{rc: 0 | -1, in_tmem: bool}", mutates=True),
        _op("frontswap.load", "read a swap page back, from tmem or the backing store",
            _TYPE, _OFFSET, returns="{data: base64 | null}", mutates=True),
        _op("frontswap.invalidate_page", "the swap entry was freed", _TYPE, _OFFSET,
            returns="{}", mutates=True),
        _op("frontswap.invalidate_area", "swapoff: forget the area and its pages", _TYPE,
            returns="{}", mutates=True),
        _op("frontswap.shrink", "move pages from tmem to their backing stores",
            Arg("target_pages", "uint", "how many pages tmem may keep"),
            returns="{moved}", mutates=True),
        _op("frontswap.curr_pages", "how many swap pages tmem holds", returns="{pages}"),
        # -- NBD exports: swap areas as block devices (docs/nbd.md) --------------------------
        _op("nbd.add", "create a swap area and export it over NBD",
            Arg("pages", "uint", "the export's size in 4 KiB pages"),
            Arg("backing", "str", "\"file\" (default) or \"memory\": where pages tmem "
                "refuses go", required=False),
            Arg("name", "str", "the export's name (default: swapN, N its swap type)",
                required=False),
            Arg("device", "str", "the /dev/nbdN the caller attaches it to (shown by nbd.list)",
                required=False),
            Arg("path", "str", "with backing \"file\": the file to create, a new absolute path "
                "in a directory only the daemon's user can write (default: "
                "<state_dir>/swap/type-N.swap)", required=False),
            returns="{name, type, pages, size, tmem_pages, backing, connections, socket}",
            mutates=True),
        _op("nbd.remove", "end an export's connections, then turn its swap area off",
            Arg("name", "str", "the export's name"),
            returns="{name, type, pages, ...}", mutates=True),
        _op("nbd.list", "the NBD server's sockets and every export with its counters",
            returns="{listening, connections, exports: [...], swap_at_start_mib, "
            "swap_at_start_backing}"),
    )
}


# -- values ---------------------------------------------------------------------------------

def encode_bytes(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def decode_bytes(text: str, *, what: str = "data") -> bytes:
    """Strict base64 (no stray characters), or a BAD_ARGS error naming ``what``."""
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        raise ControlError(BAD_ARGS, f"{what}: not base64 text") from None


def encode_file_key(key: int | bytes | tuple[int, int, int]) -> Any:
    """A cleancache key for the wire: an inode stays an int, a handle or an oid an object."""
    if isinstance(key, bool):
        raise TypeError("a file key is an inode number, a handle or an oid, not a bool")
    if isinstance(key, int):
        return key
    if isinstance(key, (bytes, bytearray)):
        return {"handle": encode_bytes(bytes(key))}
    if isinstance(key, tuple) and len(key) == 3:
        return {"oid": [int(w) for w in key]}
    raise TypeError(f"a file key is an inode number, a handle or an oid, not {key!r}")


def decode_file_key(untrusted_key: Any) -> int | bytes | tuple[int, int, int]:
    """The wire form of a key back to ``int`` / ``bytes`` / a 3-tuple; ranges are the shim's."""
    if isinstance(untrusted_key, int) and not isinstance(untrusted_key, bool):
        return untrusted_key
    if isinstance(untrusted_key, dict) and len(untrusted_key) == 1:
        if "handle" in untrusted_key and isinstance(untrusted_key["handle"], str):
            return decode_bytes(untrusted_key["handle"], what="key.handle")
        words = untrusted_key.get("oid")
        if (isinstance(words, list) and len(words) == 3
                and all(isinstance(w, int) and not isinstance(w, bool) for w in words)):
            return (words[0], words[1], words[2])
    raise ControlError(BAD_ARGS, "key: an inode number, {\"handle\": base64} or "
                                 "{\"oid\": [w0, w1, w2]}")


def _check_arg(arg: Arg, untrusted: Any) -> Any:
    kind = arg.kind
    if kind == "str":
        ok = isinstance(untrusted, str)
    elif kind in ("int", "uint"):
        ok = isinstance(untrusted, int) and not isinstance(untrusted, bool)
        if ok and kind == "uint" and untrusted < 0:
            raise ControlError(BAD_ARGS, f"{arg.name}: must be >= 0, got {untrusted}")
    elif kind == "bool":
        ok = isinstance(untrusted, bool)
    elif kind == "any":
        ok = untrusted is None or isinstance(untrusted, (str, int, float, bool))
    elif kind == "object":
        ok = isinstance(untrusted, dict)
    elif kind == "domid":
        if untrusted == "all":
            return untrusted
        ok = (isinstance(untrusted, int) and not isinstance(untrusted, bool)
              and 0 <= untrusted <= MAX_DOMID)
        if not ok:
            raise ControlError(BAD_ARGS, f'{arg.name}: a domain id 0..{MAX_DOMID} or "all", '
                                         f"got {untrusted!r}")
    elif kind == "flag":
        if untrusted in (0, 1) and not isinstance(untrusted, float):
            return bool(untrusted)
        raise ControlError(BAD_ARGS, f"{arg.name}: true/false or 0/1, got {untrusted!r}")
    elif kind in ("bytes", "page"):
        if not isinstance(untrusted, str):
            raise ControlError(BAD_ARGS, f"{arg.name}: expected base64 text")
        return decode_bytes(untrusted, what=arg.name)
    else:  # key
        return decode_file_key(untrusted)
    if not ok:
        raise ControlError(BAD_ARGS, f"{arg.name}: expected {kind}, got "
                                     f"{type(untrusted).__name__}")
    return untrusted


# -- requests -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Request:
    """A checked request: a known op and its arguments, decoded (pages as bytes)."""

    op: str
    args: Mapping[str, Any]
    id: Any = None


def encode_request(op: str, args: Mapping[str, Any] | None = None, request_id: Any = None) -> bytes:
    """One request line.  Arguments must already be JSON-ready (pages as base64 text)."""
    message: dict[str, Any] = {"v": PROTOCOL_VERSION, "op": op, "args": dict(args or {})}
    if request_id is not None:
        message["id"] = request_id
    return json.dumps(message, separators=(",", ":")).encode("utf-8") + b"\n"


#: A JSON string, escapes included; an unterminated one runs to the end of the line.  The
#: closing quote is optional so that no match ever fails: the scan stays linear in the length.
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"?', re.DOTALL)
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")


def too_deep(untrusted_line: bytes, limit: int = MAX_REQUEST_DEPTH) -> bool:
    """True if the line nests arrays and objects deeper than ``limit`` (strings not counted).

    Counted on the raw bytes, before any parser sees them: ``json`` recurses once per level
    and a line of 64 KiB of ``[`` would end in RecursionError.  An unterminated string hides
    the brackets after it, in a line the parser refuses anyway.
    """
    brackets = _JSON_STRING.sub(b"", untrusted_line).translate(None, _NOT_BRACKETS)
    depth = 0
    for byte in brackets:
        depth += 1 if byte in b"[{" else -1
        if depth > limit:
            return True
    return False


def request_id_of(untrusted_line: bytes) -> Any:
    """Best effort: the ``id`` of a line that failed to parse, so the error reply carries it."""
    if len(untrusted_line) > MAX_REQUEST_BYTES or too_deep(untrusted_line):
        return None
    try:
        untrusted = json.loads(untrusted_line)
    except (ValueError, UnicodeDecodeError):
        return None
    if isinstance(untrusted, dict):
        untrusted_id = untrusted.get("id")
        if untrusted_id is None or isinstance(untrusted_id, (int, str)):
            return untrusted_id
    return None


def decode_request(untrusted_line: bytes, ops: Mapping[str, OpSpec] | None = None) -> Request:
    """Parse and check one request line against an op table (``xentmemd``'s :data:`OPS` by
    default); ControlError if it is refused."""
    ops = OPS if ops is None else ops
    if len(untrusted_line) > MAX_REQUEST_BYTES:
        raise ControlError(BAD_REQUEST, f"request longer than {MAX_REQUEST_BYTES} bytes")
    if too_deep(untrusted_line):
        raise ControlError(BAD_REQUEST, f"request nested deeper than {MAX_REQUEST_DEPTH} levels")
    try:
        untrusted = json.loads(untrusted_line.decode("utf-8"))
    except UnicodeDecodeError:
        raise ControlError(BAD_REQUEST, "request is not UTF-8") from None
    except ValueError as exc:
        raise ControlError(BAD_REQUEST, f"request is not JSON: {exc}") from None
    if not isinstance(untrusted, dict):
        raise ControlError(BAD_REQUEST, "request must be a JSON object")
    unknown_fields = set(untrusted) - {"v", "id", "op", "args"}
    if unknown_fields:
        raise ControlError(BAD_REQUEST, "unknown request field(s): "
                                        + ", ".join(sorted(unknown_fields)))
    untrusted_id = untrusted.get("id")
    if untrusted_id is not None and type(untrusted_id) not in (int, str):  # true is no id
        raise ControlError(BAD_REQUEST, "id must be an integer or a string")
    version = untrusted.get("v")
    if type(version) is not int or version != PROTOCOL_VERSION:  # not true, not 1.0
        raise ControlError(UNSUPPORTED_VERSION, f"protocol version {version!r} is not "
                                                f"supported; this daemon speaks {PROTOCOL_VERSION}")
    op = untrusted.get("op")
    if not isinstance(op, str):
        raise ControlError(BAD_REQUEST, "op must be a string")
    spec = ops.get(op)
    if spec is None:
        raise ControlError(UNKNOWN_OP, f"unknown op {op!r}; see the 'hello' op for the list")
    untrusted_args = untrusted.get("args", {})
    if not isinstance(untrusted_args, dict):
        raise ControlError(BAD_ARGS, "args must be a JSON object")
    unknown_args = set(untrusted_args) - spec.arg_names
    if unknown_args:
        known = ", ".join(sorted(spec.arg_names)) or "none"
        raise ControlError(BAD_ARGS, f"{op}: unknown argument(s) "
                                     f"{', '.join(sorted(unknown_args))}; accepted: {known}")
    args: dict[str, Any] = {}
    for arg in spec.args:
        if arg.name not in untrusted_args:
            if arg.required:
                raise ControlError(BAD_ARGS, f"{op}: missing argument {arg.name!r}")
            continue
        args[arg.name] = _check_arg(arg, untrusted_args[arg.name])
    return Request(op=op, args=args, id=untrusted_id)


# -- responses ------------------------------------------------------------------------------

def encode_result(request_id: Any, result: Any) -> bytes:
    message = {"v": PROTOCOL_VERSION, "id": request_id, "ok": True, "result": result}
    return json.dumps(message, separators=(",", ":"), default=str).encode("utf-8") + b"\n"


def encode_error(request_id: Any, error: ControlError) -> bytes:
    message = {"v": PROTOCOL_VERSION, "id": request_id, "ok": False, "error": error.to_wire()}
    return json.dumps(message, separators=(",", ":")).encode("utf-8") + b"\n"


def decode_response(untrusted_line: bytes, expected_id: Any = None) -> Any:
    """The ``result`` of a response line, or raise the ControlError it carries."""
    try:
        untrusted = json.loads(untrusted_line.decode("utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise ControlError(PROTOCOL, f"daemon sent a line that is not JSON: {exc}") from None
    if not isinstance(untrusted, dict) or untrusted.get("v") != PROTOCOL_VERSION:
        raise ControlError(PROTOCOL, "daemon answered in another protocol version")
    # An error with no id is about the connection (busy, a line it could not read): it is
    # the answer to whatever was asked.
    connection_error = untrusted.get("id") is None and untrusted.get("ok") is False
    if expected_id is not None and untrusted.get("id") != expected_id and not connection_error:
        raise ControlError(PROTOCOL, f"answer to request {untrusted.get('id')!r} while waiting "
                                     f"for {expected_id!r}")
    if untrusted.get("ok") is True:
        return untrusted.get("result")
    untrusted_error = untrusted.get("error")
    if (isinstance(untrusted_error, dict) and isinstance(untrusted_error.get("code"), str)
            and isinstance(untrusted_error.get("message"), str)):
        raise ControlError(untrusted_error["code"], untrusted_error["message"],
                           connection=connection_error)
    raise ControlError(PROTOCOL, "daemon sent an answer with neither a result nor an error")
