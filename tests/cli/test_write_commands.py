"""Commands that change the daemon: params set, load, unload, reload.  A fresh daemon each."""

from __future__ import annotations

import os
from typing import Any

from xentmem.control import ControlClient
from xentmem.guest.backends.ramster.params import RAMSTER_PARAMS

PAGE = bytes(range(256)) * 16


def knob_records(xentmem: Any) -> list[dict[str, Any]]:
    return [r for r in xentmem.json("params", "list") if r["section"] == "selfballoon"]


def another_value(record: dict[str, Any]) -> tuple[str, Any]:
    """A valid value different from the current one: (as typed, as stored)."""
    value = record["value"]
    if record["type"] == "bool":
        return ("0", False) if value else ("1", True)
    if value is None:  # an automatic _mb knob
        return "64", 64
    return str(value + 1), value + 1


def test_every_selfballoon_knob_can_be_set(xentmem: Any) -> None:
    records = knob_records(xentmem)
    assert len(records) >= 9
    for record in records:
        name = f"selfballoon.{record['name']}"  # qualified, as a user may write it
        typed, stored = another_value(record)
        result = xentmem.json("params", "set", name, typed)
        assert {k: result[k] for k in ("name", "section", "value", "previous")} == {
            "name": record["name"], "section": "selfballoon", "value": stored,
            "previous": record["value"]}
        assert result["previous_shown"] == record["shown"]
        assert xentmem.json("params", "get", name)["value"] == stored


def test_set_prints_the_new_and_the_old_value(xentmem: Any) -> None:
    result = xentmem("params", "set", "selfballoon_interval", "10")
    assert result.exit_code == 0, result.output
    assert result.stdout == "selfballoon_interval = 10 (was 5)\n"
    assert result.stderr == ""


def test_auto_knob_can_be_set_and_reset(xentmem: Any) -> None:
    assert xentmem.json("params", "set", "selfballoon_min_usable_mb", "128")["value"] == 128
    back = xentmem.json("params", "set", "selfballoon_min_usable_mb", "auto")
    assert back == {"name": "selfballoon_min_usable_mb", "section": "selfballoon",
                    "value": None, "previous": 128, "shown": "auto", "previous_shown": "128"}


def test_backend_param_set_at_run_time(xentmem: Any) -> None:
    assert xentmem.json("params", "set", "capacity", "64M") == {
        "name": "capacity", "section": "backend", "value": "64M", "previous": "10%"}
    assert xentmem.json("stats")["backend"]["capacity_bytes"] == 64 * 1024 * 1024


def test_refused_value_exits_1_with_the_daemons_message_and_changes_nothing(
    xentmem: Any, assert_error: Any,
) -> None:
    for name, value, fragment in (
        ("selfballoon_interval", "0", "selfballoon_interval: 0 is out of range"),
        ("frontswap_inertia", "three", "frontswap_inertia"),
        ("selfballooning", "2", "0 or 1"),
        ("capacity", "lots", "capacity: 'lots' is not a base-10 integer"),
    ):
        before = xentmem.json("params", "get", name)
        result = xentmem("params", "set", name, value)
        message = assert_error(result, 1, fragment, "accepted", "[bad_value]")
        assert message.count("\n") == 0
        assert xentmem.json("params", "get", name) == before


def test_read_only_and_unknown_params_are_refused(xentmem: Any, assert_error: Any) -> None:
    assert_error(xentmem("params", "set", "tmem.cleancache", "0"), 1, "read-only")
    assert_error(xentmem("params", "set", "max_pools", "8"), 1, "max_pools", "read-only")
    assert_error(xentmem("params", "get", "no_such_knob"), 1, "unknown param",
                 "[not_found]")
    assert_error(xentmem("params", "set", "no_such_knob", "1"), 1, "unknown param")


def test_unload_then_load_with_module_params(xentmem: Any, assert_error: Any) -> None:
    assert xentmem.json("unload") == {"backend": "zcache", "repatriated": 0,
                                      "pools_dropped": 0}
    assert xentmem.json("status")["backend"] is None
    assert_error(xentmem("unload"), 1, "no backend")
    loaded = xentmem.json("load", "zcache", "capacity=32M", "frontswap=0")
    assert loaded == {
        "backend": "zcache",
        "params": {"cleancache": True, "frontswap": False, "selfballooning_at_load": False,
                   "selfshrinking": False, "frontswap_writethrough": False,
                   "frontswap_exclusive_gets": False, "capacity": "32M",
                   "detailed_stats": False, "max_pools": 1024, "allocator": "zsmalloc",
                   **RAMSTER_PARAMS.defaults()},
        "choice": {"requested": "zcache", "chosen": "zcache",
                   "reason": "named in the load request", "from": "load request"},
    }
    status = xentmem.json("status")
    assert status["flags"]["frontswap"] is False
    assert status["balloon"]["running"] is False  # no point ballooning without frontswap
    assert_error(xentmem("load", "zcache"), 1, "already loaded")


def test_refused_load_leaves_nothing_loaded(xentmem: Any, assert_error: Any) -> None:
    xentmem.json("unload")
    assert_error(xentmem("load", "nosuch"), 1, "unknown backend 'nosuch'")
    assert_error(xentmem("load", "zcache", "capacity=lots"), 1, "capacity")
    assert_error(xentmem("load", "zcache", "nosuch=1"), 1, "nosuch")
    assert_error(xentmem("load", "zcache", "ramster=1"), 1, "ramster_nodes")
    # nothing listens on port 1: the load fails naming the node, and nothing is loaded
    assert_error(xentmem("load", "zcache", "ramster=1", "ramster_nodes=127.0.0.1:1",
                         "ramster_node_id=dom5", "ramster_timeout_ms=300"), 1,
                 "ramster node dom5", "127.0.0.1:1")
    assert xentmem.json("status")["backend"] is None
    assert xentmem.json("load", "auto")["choice"]["chosen"] == "zcache"


def test_pages_stored_through_the_socket_show_up_and_are_repatriated(
    xentmem: Any, daemon: Any,
) -> None:
    with ControlClient(daemon.socket, timeout=10.0) as client:
        swap = client.frontswap.init(pages=64, backing="file")
        for offset in range(10):
            assert client.frontswap.store(swap, offset, PAGE) == 0
    stats = xentmem.json("stats")
    assert stats["frontswap"]["succ_stores"] == 10
    assert stats["frontswap"]["curr_pages"] == 10
    area = xentmem.json("pools")["frontswap"]["swap_types"]
    assert [(a["type"], a["tmem_pages"]) for a in area] == [(swap, 10)]
    assert xentmem.json("unload") == {"backend": "zcache", "repatriated": 10,
                                      "pools_dropped": 0}
    with ControlClient(daemon.socket, timeout=10.0) as client:
        assert [client.frontswap.load(swap, offset) for offset in range(10)] == [PAGE] * 10


def test_reload_rereads_the_config(xentmem: Any, daemon: Any) -> None:
    result = xentmem.json("reload")
    assert set(result) >= {"applied", "needs_reload", "config"}
    assert daemon.proc.poll() is None and os.path.exists(daemon.socket)
