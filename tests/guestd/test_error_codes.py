"""The error code the daemon answers for each kind of failure, end to end: a request line goes
through :func:`~xentmem.guestd.handlers.handle_line` into a real daemon core, the failure is
raised where it really happens (registry, params, shim, backend, config file), and the reply
carries the code ``docs/control-protocol.md`` promises.  Codes follow the error's type, never
its message text: rewording a message must not change what a program branching on it sees.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any, ClassVar

import pytest
from fakes.recording_backend import RecordingBackend

from xentmem.control import protocol
from xentmem.errors import (
    AbiError,
    BackendError,
    BackendUnsupported,
    ConfigError,
    NoBackend,
    ParamError,
    UnknownBackend,
    UnknownParam,
    UnloadRefused,
)
from xentmem.guestd.core import Daemon
from xentmem.guestd.handlers import error_for, handle_line
from xentmem.roots import Roots

PAGE = 4096
NO_LOOPS = {"selfballooning_at_load": 0, "selfshrinking": 0}


class Unrunnable(RecordingBackend):
    """A backend whose probe says it cannot run on this machine."""

    name: ClassVar[str] = "unrunnable"

    @classmethod
    def probe(cls, roots: Roots) -> None:
        raise BackendUnsupported("not a Xen guest (test)")


class Broken(RecordingBackend):
    """A backend with a bug: its counters raise something no layer expects."""

    name: ClassVar[str] = "broken"

    def stats(self) -> dict[str, int]:
        raise ZeroDivisionError("a bug in the backend")


BACKENDS = {"recording": RecordingBackend, "unrunnable": Unrunnable, "broken": Broken}


def call(daemon: Daemon, op: str, **args: Any) -> dict[str, Any]:
    """One request through the daemon's whole request path; the decoded reply."""
    line = json.dumps({"v": 1, "id": 7, "op": op, "args": args}).encode()
    reply = json.loads(handle_line(daemon, line))
    assert reply["id"] == 7
    return reply


def code_of(daemon: Daemon, op: str, **args: Any) -> str:
    reply = call(daemon, op, **args)
    assert "error" in reply, f"{op} succeeded: {reply}"
    assert reply["error"]["message"], "every error says what went wrong"
    return reply["error"]["code"]


def page(byte: int) -> str:
    return base64.b64encode(bytes([byte]) * PAGE).decode()


@pytest.fixture
def daemon(make_daemon) -> Daemon:
    """A daemon core with no backend loaded, a config file, and the test backends."""
    return make_daemon("[selfballoon]\nselfballoon_interval = 5\n", backends=BACKENDS)


@pytest.fixture
def loaded(daemon: Daemon) -> Daemon:
    assert "result" in call(daemon, "backend.load", name="recording", params=NO_LOOPS)
    return daemon


# -- not_found --------------------------------------------------------------------------------

def test_an_unknown_backend_is_not_found(daemon: Daemon) -> None:
    reply = call(daemon, "backend.load", name="nosuch")
    assert reply["error"]["code"] == protocol.NOT_FOUND
    assert reply["error"]["message"].startswith("unknown backend 'nosuch'")
    assert call(daemon, "status")["result"]["backend"] is None


def test_an_unknown_param_is_not_found(loaded: Daemon) -> None:
    assert code_of(loaded, "params.set", name="no_such_param", value=1) == protocol.NOT_FOUND
    assert code_of(loaded, "params.get", name="no_such_param") == protocol.NOT_FOUND


def test_an_unknown_pool_or_swap_type_is_not_found(loaded: Daemon) -> None:
    assert code_of(loaded, "cleancache.put_page", pool_id=99, key=1, index=0,
                   data=page(1)) == protocol.NOT_FOUND
    assert code_of(loaded, "frontswap.store", type=5, offset=0,
                   data=page(1)) == protocol.NOT_FOUND


# -- bad_value --------------------------------------------------------------------------------

def test_a_param_value_out_of_range_is_bad_value_and_changes_nothing(loaded: Daemon) -> None:
    before = call(loaded, "params.get", name="selfballoon_interval")["result"]["value"]
    assert code_of(loaded, "params.set", name="selfballoon_interval",
                   value=0) == protocol.BAD_VALUE
    assert call(loaded, "params.get", name="selfballoon_interval")["result"]["value"] == before


def test_a_page_of_the_wrong_size_is_bad_value(loaded: Daemon) -> None:
    area = call(loaded, "frontswap.init", pages=8)["result"]["type"]
    short = base64.b64encode(b"x" * 12).decode()
    assert code_of(loaded, "frontswap.store", type=area, offset=0,
                   data=short) == protocol.BAD_VALUE
    assert call(loaded, "frontswap.curr_pages")["result"]["pages"] == 0


def test_a_config_file_that_went_bad_is_bad_value_and_the_old_one_stays(
        daemon: Daemon, tmp_path: Path) -> None:
    (tmp_path / "xentmem.toml").write_text("[selfballoon]\nselfballoon_interval = -1\n")
    reply = call(daemon, "config.reload")
    assert reply["error"]["code"] == protocol.BAD_VALUE
    assert "selfballoon_interval" in reply["error"]["message"]
    assert call(daemon, "params.get", name="selfballoon_interval")["result"]["value"] == 5


# -- no_backend, backend_error, unload_refused, internal --------------------------------------

def test_unloading_with_no_backend_is_no_backend(daemon: Daemon) -> None:
    reply = call(daemon, "backend.unload")
    assert reply["error"] == {"code": protocol.NO_BACKEND, "message": "no backend is loaded"}


def test_a_backend_that_cannot_run_here_is_backend_error(daemon: Daemon) -> None:
    reply = call(daemon, "backend.load", name="unrunnable", params=NO_LOOPS)
    assert reply["error"]["code"] == protocol.BACKEND_ERROR
    assert "not a Xen guest" in reply["error"]["message"]
    assert call(daemon, "status")["result"]["backend"] is None


def test_loading_over_a_loaded_backend_is_backend_error(loaded: Daemon) -> None:
    assert code_of(loaded, "backend.load", name="recording",
                   params=NO_LOOPS) == protocol.BACKEND_ERROR


def test_an_unload_that_would_lose_swap_pages_is_refused_and_the_backend_stays(
        loaded: Daemon) -> None:
    area = call(loaded, "frontswap.init", pages=8)["result"]["type"]
    assert call(loaded, "frontswap.store", type=area, offset=0, data=page(3))["result"]["in_tmem"]
    loaded.shim.backend.fail_gets = True  # the page can no longer come back
    assert code_of(loaded, "backend.unload") == protocol.UNLOAD_REFUSED
    assert call(loaded, "status")["result"]["backend"] is not None
    loaded.shim.backend.fail_gets = False
    assert "result" in call(loaded, "backend.unload")


def test_an_unexpected_failure_is_internal_and_names_the_op(daemon: Daemon) -> None:
    assert "result" in call(daemon, "backend.load", name="broken", params=NO_LOOPS)
    reply = call(daemon, "stats")
    assert reply["error"]["code"] == protocol.INTERNAL
    assert reply["error"]["message"].startswith("stats: internal error: ZeroDivisionError")


# -- shutting_down ----------------------------------------------------------------------------

def test_a_stopping_daemon_refuses_changes_but_still_answers_reads(loaded: Daemon) -> None:
    loaded.shutdown()
    assert code_of(loaded, "frontswap.init", pages=8) == protocol.SHUTTING_DOWN
    assert "result" in call(loaded, "hello")


# -- the mapping itself -----------------------------------------------------------------------

@pytest.mark.parametrize(("error", "code"), [
    (UnknownBackend("no such store here"), protocol.NOT_FOUND),
    (UnknownParam("that knob is not declared"), protocol.NOT_FOUND),
    (NoBackend("nothing loaded right now"), protocol.NO_BACKEND),
    # The old message texts, raised as the general types, are no longer special:
    (ParamError("unknown backend 'x'"), protocol.BAD_VALUE),
    (ParamError("unknown param 'x'"), protocol.BAD_VALUE),
    (BackendError("no backend is loaded"), protocol.BACKEND_ERROR),
    (BackendUnsupported("not a Xen guest"), protocol.BACKEND_ERROR),
    (ConfigError("x.toml:1: bad"), protocol.BAD_VALUE),
    (AbiError("page of 12 bytes"), protocol.BAD_VALUE),
    (UnloadRefused("a page could not come back"), protocol.UNLOAD_REFUSED),
])
def test_codes_follow_the_type_not_the_message(error: Exception, code: str) -> None:
    reply = error_for(error, "op")
    assert (reply.code, reply.message) == (code, str(error))
