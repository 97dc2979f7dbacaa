"""Read commands against one real daemon (zcache on a fake 2 GiB guest, nothing stored yet).

Each command's --json is the daemon's answer, unchanged, on one line; the text form renders
the same data.
"""

from __future__ import annotations

from typing import Any

from xentmem.control import ControlClient
from xentmem.guest.backends.ramster.params import RAMSTER_PARAMS

ZERO_CLEANCACHE = {"succ_gets": 0, "failed_gets": 0, "puts": 0, "invalidates": 0,
                   "failed_puts": 0, "backend_errors": 0}
ZERO_FRONTSWAP = {"loads": 0, "succ_stores": 0, "failed_stores": 0, "invalidates": 0,
                  "failed_loads": 0, "repatriated": 0, "backing_writes": 0, "curr_pages": 0,
                  "backend_errors": 0}


def daemon_answer(socket_path: Any, op: str, **args: Any) -> Any:
    with ControlClient(socket_path, timeout=10.0) as client:
        return client.call(op, **args)


def test_status_json_names_the_backend_and_why(reader: Any, shared_daemon: Any) -> None:
    data = reader.json("status")
    assert data["state"] == "running"
    assert data["pid"] == shared_daemon.proc.pid
    assert data["run_dir"] == str(shared_daemon.run_dir)
    assert data["backend"]["name"] == "zcache"
    assert data["backend_choice"]["requested"] == "auto"
    assert data["backend_choice"]["chosen"] == "zcache"
    assert data["backend_choice"]["reason"]
    assert data["flags"] == {"cleancache": True, "frontswap": True,
                             "selfballooning_at_load": True,
                             "selfshrinking": True, "frontswap_writethrough": False,
                             "frontswap_exclusive_gets": False}
    direct = daemon_answer(shared_daemon.socket, "status")
    for volatile in ("uptime_s", "balloon"):
        data.pop(volatile)
        direct.pop(volatile)
    assert data == direct


def test_status_text_shows_backend_reason_and_flags(reader: Any) -> None:
    result = reader("status")
    assert result.exit_code == 0, result.output
    assert result.stderr == ""
    lines = result.stdout.splitlines()
    assert "state     running" in lines
    assert "backend_choice:" in lines
    assert "  chosen     zcache" in lines
    assert "  requested  auto" in lines
    assert "flags:" in lines
    assert "  cleancache                yes" in lines


def test_stats_json_is_exact_on_a_fresh_daemon(reader: Any) -> None:
    data = reader.json("stats")
    capacity = data["backend"].pop("capacity_bytes")  # 10% of the machine's RAM
    assert isinstance(capacity, int) and capacity > 0
    arena = {k: data["backend"].pop(k) for k in list(data["backend"])
             if k.startswith("arena_") or k == "memory_bytes"}  # zcache's arena: its tables
    assert arena["arena_pages"] == 0 and arena["memory_bytes"] >= 0
    assert data == {
        "cleancache": ZERO_CLEANCACHE,
        "frontswap": ZERO_FRONTSWAP,
        "backend": {"pools": 0, "pages": 0, "eph_pages": 0, "pers_pages": 0, "zbytes": 0,
                    "eph_zbytes": 0, "pers_zbytes": 0, "zero_pages": 0, "evictions": 0,
                    "failed_puts": 0, "failed_eph_puts": 0, "failed_pers_puts": 0,
                    "used_bytes": 0},
        "backend_detailed": {},
    }


def test_stats_required_drops_only_the_detailed_counters(reader: Any) -> None:
    full = reader.json("stats")
    required = reader.json("stats", "--required")
    del full["backend_detailed"]
    assert required == full
    text = reader("stats", "--required")
    assert text.exit_code == 0 and "backend_detailed" not in text.stdout
    assert "backend_detailed:" in reader("stats").stdout


def test_pools_json_is_exact_with_nothing_stored(reader: Any) -> None:
    assert reader.json("pools") == {
        "backend": "zcache",
        "cleancache": [],
        "frontswap": {"pool_id": -1, "registered": True, "pending_init": [],
                      "writethrough": False, "exclusive_gets": False, "draining": False,
                      "swap_types": []},
        "backend_pools": [],
    }


def test_balloon_shows_goal_target_floor_and_history(reader: Any) -> None:
    data = reader.json("balloon", "--history", "5")
    assert data["available"] is True
    assert data["running"] is True
    assert data["report_only"] is True  # the fake root has no balloon driver
    assert len(data["history"]) <= 5
    text = reader("balloon")
    assert text.exit_code == 0, text.output
    assert "figures:" in text.stdout and "knobs:" in text.stdout
    none = reader.json("balloon", "-n", "0")
    assert none["history"] == []


def test_params_list_covers_flags_backend_params_and_every_knob(reader: Any) -> None:
    records = reader.json("params", "list")
    by_section: dict[str, list[str]] = {}
    for record in records:
        by_section.setdefault(record["section"], []).append(record["name"])
    assert by_section["tmem"] == ["cleancache", "frontswap", "selfballooning_at_load",
                                  "selfshrinking",
                                  "frontswap_writethrough", "frontswap_exclusive_gets"]
    assert by_section["backend"] == ["capacity", "detailed_stats", "max_pools", "allocator",
                                     *RAMSTER_PARAMS]
    ramster = {r["name"]: r for r in records if r["name"].startswith("ramster")}
    assert "ramster_password_file" in ramster and not any(  # a file's name, never a password
        "password" in name and name != "ramster_password_file" for name in ramster)
    assert by_section["selfballoon"][:9] == [
        "selfballooning", "selfballoon_interval", "selfballoon_downhysteresis",
        "selfballoon_uphysteresis", "selfballoon_min_usable_mb", "selfballoon_reserved_mb",
        "frontswap_selfshrinking", "frontswap_hysteresis", "frontswap_inertia"]
    assert all(not r["writable"] for r in records if r["section"] == "tmem")
    assert records == daemon_answer(reader.socket_path, "params.list")


def test_params_list_filters_by_section_and_writable(reader: Any) -> None:
    tmem = reader.json("params", "list", "--section", "tmem")
    assert {r["section"] for r in tmem} == {"tmem"} and len(tmem) == 6
    writable = reader.json("params", "list", "--writable")
    assert writable and all(r["writable"] for r in writable)
    assert "cleancache" not in {r["name"] for r in writable}
    text = reader("params", "list", "--section", "backend")
    assert text.stdout.splitlines()[0].split() == ["NAME", "SECTION", "VALUE", "DEFAULT",
                                                   "WRITABLE", "UNIT", "FROM"]
    assert text.stdout.splitlines()[1].split() == ["capacity", "backend", "10%", "10%", "rw",
                                                   "default"]


def test_params_get_json_is_the_daemons_record(reader: Any) -> None:
    assert reader.json("params", "get", "selfballoon_interval") == {
        "name": "selfballoon_interval", "section": "selfballoon", "type": "int", "default": 5,
        "value": 5, "shown": "5", "writable": True, "unit": "s",
        "accepted": "an integer >= 1 and <= 4294967295",
        "doc": "seconds between two ticks of the worker", "from": "default",
    }
    flag = reader.json("params", "get", "tmem.selfballooning_at_load")
    assert (flag["section"], flag["writable"], flag["value"]) == ("tmem", False, True)
    text = reader("params", "get", "selfballoon_downhysteresis")
    assert "value     8" in text.stdout.splitlines()


def test_backends_lists_zcache_as_loaded(reader: Any) -> None:
    records = reader.json("backends")
    loaded = {r["name"]: r["loaded"] for r in records}
    assert loaded["zcache"] is True
    assert [n for n, is_loaded in loaded.items() if is_loaded] == ["zcache"]


def test_metrics_prints_the_prometheus_text(reader: Any) -> None:
    result = reader("metrics")
    assert result.exit_code == 0, result.output
    assert '\nxentmem_backend_loaded{backend="zcache"} 1\n' in "\n" + result.stdout
    assert "# TYPE xentmem_backend_loaded gauge" in result.stdout
    data = reader.json("metrics")
    assert data["content_type"].startswith("text/plain; version=0.0.4")
    assert series(data["text"]) == series(result.stdout)


def series(text: str) -> list[str]:
    """The sample names with labels, in order (values such as the uptime move on)."""
    return [line.rsplit(" ", 1)[0] for line in text.splitlines()
            if line and not line.startswith("#")]
