"""Wire error codes follow the error's type, never its message text: rewording a message
must not change what a program branching on the code sees."""

from __future__ import annotations

import pytest

from xentmem.control import protocol
from xentmem.errors import (
    AbiError,
    BackendError,
    ConfigError,
    NoBackend,
    ParamError,
    UnknownBackend,
    UnknownParam,
    UnloadRefused,
)
from xentmem.guest import registry
from xentmem.guestd.handlers import error_for
from xentmem.params import Param, ParamSet


@pytest.mark.parametrize(("error", "code"), [
    (UnknownBackend("no such store here"), protocol.NOT_FOUND),
    (UnknownParam("that knob is not declared"), protocol.NOT_FOUND),
    (NoBackend("nothing loaded right now"), protocol.NO_BACKEND),
    # The old message texts, raised as the general types, are no longer special:
    (ParamError("unknown backend 'x'"), protocol.BAD_VALUE),
    (ParamError("unknown param 'x'"), protocol.BAD_VALUE),
    (BackendError("no backend is loaded"), protocol.BACKEND_ERROR),
    (ConfigError("x.toml:1: bad"), protocol.BAD_VALUE),
    (AbiError("page of 12 bytes"), protocol.BAD_VALUE),
    (UnloadRefused("a page could not come back"), protocol.UNLOAD_REFUSED),
])
def test_codes_follow_the_type(error: Exception, code: str) -> None:
    assert error_for(error, "op").code == code
    assert error_for(error, "op").message == str(error)


def test_the_sources_raise_the_typed_errors_with_their_messages() -> None:
    with pytest.raises(UnknownBackend, match=r"^unknown backend 'surely-not-installed'; "):
        registry.backend_class("surely-not-installed")
    with pytest.raises(UnknownParam, match=r"^unknown param 'b' for x; known params: a$"):
        ParamSet(Param("a", int, 1, "a number")).lookup("b", owner="x")
    assert issubclass(UnknownBackend, ParamError) and issubclass(UnknownParam, ParamError)
    assert issubclass(NoBackend, BackendError)


def test_unload_without_a_backend_is_no_backend_on_the_wire(make_daemon) -> None:
    daemon = make_daemon(balloon_loops=False)
    import json

    from xentmem.guestd.handlers import handle_line
    reply = json.loads(handle_line(daemon, b'{"v": 1, "id": 1, "op": "backend.unload"}'))
    assert reply["error"] == {"code": "no_backend", "message": "no backend is loaded"}
    reply = json.loads(handle_line(
        daemon, b'{"v": 1, "id": 2, "op": "backend.load", "args": {"name": "nosuch"}}'))
    assert reply["error"]["code"] == "not_found"
    assert reply["error"]["message"].startswith("unknown backend 'nosuch'")
