"""An NBD export's swap area is its client's alone: the socket's page API (``frontswap.*``)
cannot store into it, read it or turn it off, and ``nbd.remove`` turns off the export's own
area and never another's (docs/nbd.md, "Exports and swap areas")."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest

from xentmem.errors import AbiError
from xentmem.guestd.core import Daemon
from xentmem.guestd.handlers import handle_line
from xentmem.guestd.nbd.resident import NotResident

PAGE = b"B" * 4096


def call(daemon: Daemon, op: str, **args: Any) -> dict[str, Any]:
    line = json.dumps({"v": 1, "id": 1, "op": op, "args": args}).encode()
    return json.loads(handle_line(daemon, line))


@pytest.fixture
def daemon(make_daemon) -> Daemon:
    made = make_daemon(balloon_loops=False)
    made.nbd.residency = NotResident()  # the test process is never locked in memory
    return made


def test_the_page_api_cannot_touch_an_exports_area(daemon: Daemon) -> None:
    """Fails before: ``frontswap.invalidate_area`` of an export's type deleted its backing
    file while the export stayed listed; the next ``frontswap.init`` took the type, the
    export then served that client's area, and ``nbd.remove`` turned it off."""
    added = call(daemon, "nbd.add", pages=4, name="exp")["result"]
    swap_type, path = added["type"], Path(added["backing"]["path"])
    data = base64.b64encode(PAGE).decode()
    for op, args in [("frontswap.invalidate_area", {}),
                     ("frontswap.store", {"offset": 1, "data": data}),
                     ("frontswap.load", {"offset": 1}),
                     ("frontswap.invalidate_page", {"offset": 1})]:
        error = call(daemon, op, type=swap_type, **args)["error"]
        assert error["code"] == "bad_value", (op, error)
        assert error["message"] == (f"swap type {swap_type} belongs to NBD export 'exp'; "
                                    "use nbd.remove"), op
    assert path.exists() and swap_type in daemon.shim.frontswap.swap_types()
    assert daemon.swap.store_of(swap_type).offsets() == []  # the store was refused

    other = call(daemon, "frontswap.init", pages=8, backing="memory")["result"]["type"]
    assert other != swap_type
    assert call(daemon, "frontswap.store", type=other, offset=7, data=data)["result"] \
        is not None
    assert call(daemon, "nbd.remove", name="exp")["result"]["name"] == "exp"
    assert not path.exists() and swap_type not in daemon.shim.frontswap.swap_types()
    assert other in daemon.shim.frontswap.swap_types()
    # Once the export is gone its type is an ordinary one again.
    again = call(daemon, "frontswap.init", pages=8, type=swap_type)
    assert again["result"]["type"] == swap_type
    for area in (swap_type, other):
        assert "result" in call(daemon, "frontswap.invalidate_area", type=area)


def test_remove_never_turns_off_an_area_that_is_not_the_exports_own(daemon: Daemon) -> None:
    """Should the export's area be gone and its type taken by a frontswap client's area
    (nothing above lets that happen now), ``nbd.remove`` drops the export and leaves that
    area on; an export's owner is also checked by the areas themselves."""
    swap_type = daemon.nbd_add(4, "memory", name="exp")["type"]
    with pytest.raises(AbiError, match="belongs to NBD export 'exp'"):
        daemon.swap.forget(swap_type)
    with pytest.raises(AbiError, match="not NBD export 'other'"):
        daemon.swap.forget(swap_type, owner="other")
    daemon.swap.forget(swap_type, owner="exp")  # as if behind the export's back
    assert daemon.frontswap_init(8, "memory")["type"] == swap_type  # someone else's now
    daemon.frontswap_store(swap_type, 3, PAGE)
    assert daemon.nbd_remove("exp")["name"] == "exp"
    assert daemon.nbd.names() == []
    assert swap_type in daemon.shim.frontswap.swap_types()
    assert daemon.frontswap_load(swap_type, 3) == PAGE
    daemon.frontswap_invalidate_area(swap_type)
