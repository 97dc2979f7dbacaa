"""``xentmem-hostd``'s op table and handlers, without xenstore: what is refused before
anything changes, and that the docs describe every op."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from xentmem.control import protocol
from xentmem.hostd.control import MAX_CAP_MB, MAX_WEIGHT, OPS
from xentmem.hostd.handlers import HostControl
from xentmem.hostd.store import HostStore

DOC = Path(__file__).resolve().parents[2] / "docs" / "control-protocol.md"


def line(op: str, **args: Any) -> bytes:
    return json.dumps({"v": 1, "id": 1, "op": op, "args": args}).encode()


@pytest.fixture
def control() -> HostControl:
    service = SimpleNamespace(store=HostStore(64 << 20), devices={})
    return HostControl(service)  # type: ignore[arg-type]


def ask(control: HostControl, op: str, **args: Any) -> dict[str, Any]:
    return json.loads(control.handle_line(line(op, **args)))


def code(control: HostControl, op: str, **args: Any) -> str | None:
    return ask(control, op, **args).get("error", {}).get("code")


def test_every_op_is_documented_on_the_one_envelope() -> None:
    section = DOC.read_text().split("## xentmem-hostd ops", 1)[1].split("\n## ", 1)[0]
    for spec in OPS.values():
        assert spec.doc and spec.returns, spec.name
        assert f"| `{spec.name}` |" in section, spec.name


@pytest.mark.parametrize(("op", "args"), [
    ("freeze", {"domid": -1}), ("freeze", {"domid": protocol.MAX_DOMID + 1}),
    ("freeze", {"domid": True}), ("freeze", {"domid": "5"}), ("freeze", {}),
    ("freeze", {"domid": 5, "extra": 1}), ("set", {"domid": 5, "compress": 2}),
    ("set", {"domid": 5, "weight": -1}), ("set", {"domid": 5, "weight": MAX_WEIGHT + 1}),
    ("set", {"domid": 5, "cap_mb": -1}), ("set", {"domid": 5, "cap_mb": MAX_CAP_MB + 1}),
    ("set", {"domid": 5}), ("shared-auth", {"domid": 5, "auth": True}),
    ("shared-auth", {"domid": 5, "auth": True, "uuid": "x"}),
    ("shared-auth", {"domid": 5, "auth": "yes", "uuid": "x"}),
])
def test_bad_arguments_are_refused_and_change_nothing(control: HostControl, op: str,
                                                      args: dict[str, Any]) -> None:
    before = ask(control, "list")
    assert code(control, op, **args) == protocol.BAD_ARGS
    assert ask(control, "list") == before


def test_ops_reach_the_store(control: HostControl) -> None:
    store = control.service.store
    assert code(control, "list", domid=5) == protocol.NOT_FOUND
    assert code(control, "set", domid=5, weight=3) == protocol.NOT_FOUND  # no such guest
    assert code(control, "shared-auth", domid=5, auth=1,  # a typo makes no client
                uuid="12345678-9abc-def0-1122-334455667788") == protocol.NOT_FOUND
    assert 5 not in store.clients
    store.client(5)  # a guest's first pool makes its client
    assert ask(control, "set", domid=5, weight=3, compress=0)["result"] == {
        "domids": [5], "weight": 3, "cap_mb": None, "compress": False}
    assert ask(control, "set", domid=5, cap_mb=64)["result"]["cap_mb"] == 64
    assert ask(control, "list", domid=5)["result"]["clients"][0]["cap_bytes"] == 64 << 20
    frozen = ask(control, "freeze", domid="all")["result"]
    assert (frozen["domids"], frozen["frozen"], frozen["clients"][0]["frozen"]) == (
        [5], True, True)
    # A uuid that is not one is refused for every domain too (xc_tmem_auth parsed it first).
    assert code(control, "shared-auth", domid="all", auth=0, uuid="not-a-uuid") == (
        protocol.BAD_ARGS)
    assert store.shared_auth is True
    assert ask(control, "shared-auth", domid="all", auth=0)["result"] == {"shared_auth": False}
    assert store.shared_auth is False
    hello = ask(control, "hello")["result"]
    assert hello["service"] == "xentmem-hostd" and set(hello["ops"]) == set(OPS)
    assert ask(control, "freeable")["result"] == {"freeable_mb": store.freeable_mb()}


def test_a_deeply_nested_line_is_a_bad_request(control: HostControl) -> None:
    # Regression: RecursionError escaped handle_line and cost the client its connection.
    deep = b"[" * 1_000 + b"]" * 1_000
    answer = json.loads(control.handle_line(deep))
    assert answer["error"]["code"] == protocol.BAD_REQUEST


def test_the_idle_timeout_is_an_option_of_the_service(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from xentmem.control.server import DEFAULT_IDLE_TIMEOUT_S
    from xentmem.hostd.cli import cli
    from xentmem.hostd.service import HostService

    service = HostService(xenstore=tmp_path / "none", store=HostStore(1 << 20),
                          control_path=tmp_path / "c.sock", control_idle_timeout_s=2)
    assert service.control is not None and service.control.idle_timeout_s == 2
    default = HostService(xenstore=tmp_path / "none", store=HostStore(1 << 20),
                          control_path=tmp_path / "c.sock")
    assert default.control is not None
    assert default.control.idle_timeout_s == DEFAULT_IDLE_TIMEOUT_S
    assert "--control-idle-timeout" in CliRunner().invoke(cli, ["run", "--help"]).output
    service.close()
    default.close()
