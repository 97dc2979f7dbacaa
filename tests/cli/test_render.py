"""The text renderings: exact output for known dicts (no daemon needed)."""

from __future__ import annotations

from xentmem_cli import render
from xentmem_cli.balloon import balloon_text
from xentmem_cli.params import list_table, set_line
from xentmem_cli.status import status_text


def test_scalar_spells_each_kind() -> None:
    assert render.scalar(None) == "-"
    assert render.scalar(True) == "yes"
    assert render.scalar(False) == "no"
    assert render.scalar(0.25) == "0.25"
    assert render.scalar(12) == "12"
    assert render.scalar(["a", "b"]) == "a, b"
    assert render.scalar([]) == "(none)"
    assert render.scalar([{"a": 1}]) == '[{"a":1}]'
    assert render.scalar({"b": 2, "a": 1}) == '{"a":1,"b":2}'
    assert render.scalar("two\nlines") == "two lines"


def test_table_aligns_columns_under_an_upper_case_header() -> None:
    rows = [{"name": "capacity", "value": "64M"}, {"name": "max_pools", "value": 1024}]
    assert render.table(rows) == (
        "NAME       VALUE\n"
        "capacity   64M\n"
        "max_pools  1024"
    )
    assert render.table([], ("name",)) == "(none)"
    assert render.table(rows, ("value",), indent="  ") == "  VALUE\n  64M\n  1024"


def test_tree_puts_plain_values_first_then_sections() -> None:
    data = {
        "backend": {"name": "zcache", "pages": 3},
        "state": "running",
        "pools": [{"id": 0, "shared": False}],
        "empty": {},
        "pid": 42,
    }
    assert render.tree(data) == (
        "state  running\n"
        "pid    42\n"
        "backend:\n"
        "  name   zcache\n"
        "  pages  3\n"
        "pools:\n"
        "  ID  SHARED\n"
        "  0   no\n"
        "empty:\n"
        "  (none)"
    )


def test_params_table_shows_values_as_sysfs_does() -> None:
    records = [
        {"name": "frontswap", "section": "tmem", "value": True, "default": True,
         "writable": False, "unit": "", "from": "kernel command line"},
        {"name": "selfballoon_reserved_mb", "section": "selfballoon", "value": None,
         "shown": "auto (204)", "default": None, "writable": True, "unit": "MiB",
         "from": "auto"},
    ]
    assert list_table(records) == (
        "NAME                     SECTION      VALUE       DEFAULT  WRITABLE  UNIT  FROM\n"
        "frontswap                tmem         1           1        ro              kernel "
        "command line\n"
        "selfballoon_reserved_mb  selfballoon  auto (204)  -        rw        MiB   auto"
    )
    assert set_line({"name": "pressure_guard", "value": True, "previous": False}) == (
        "pressure_guard = 1 (was 0)"
    )


def test_status_text_leaves_the_decision_log_to_the_balloon_command() -> None:
    data = {"state": "running", "balloon": {"running": True, "history": [{"seq": 1}],
                                            "last": {"seq": 1}}}
    assert status_text(data) == (
        "state  running\n"
        "balloon:\n"
        "  running    yes\n"
        "  decisions  see `xentmem balloon`"
    )


def test_balloon_text_is_figures_then_one_history_table() -> None:
    decision = {
        "seq": 3, "time": 15.5, "kind": "tick", "target_kb": 1000, "written": False,
        "balloon": {"cur_pages": 500, "goal_pages": 250, "floor_pages": 100},
        "shrink": {"reason": "empty"}, "error": None,
    }
    data = {"running": True, "figures": {"goal_pages": 250}, "history": [decision],
            "last": decision}
    assert balloon_text(data) == (
        "running  yes\n"
        "figures:\n"
        "  goal_pages  250\n"
        "history (oldest first):\n"
        "  SEQ  TIME  KIND  CUR_PAGES  GOAL_PAGES  FLOOR_PAGES  TARGET_KB  WRITTEN  SHRINK  ERROR\n"
        "  3    15.5  tick  500        250         100          1000       no       empty   -"
    )
