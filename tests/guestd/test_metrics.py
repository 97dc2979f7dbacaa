"""The Prometheus text: names, types, labels, escaping, and the atomic textfile."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

from xentmem.guestd.metrics import Family, collect, render, write_textfile

STATS = {
    "cleancache": {"succ_gets": 3, "failed_gets": 1, "puts": 5, "invalidates": 0,
                   "failed_puts": 0},
    "frontswap": {"loads": 2, "succ_stores": 7, "failed_stores": 1, "invalidates": 0,
                  "failed_loads": 0, "repatriated": 4, "backing_writes": 1, "curr_pages": 3},
    "backend": {"pages": 4, "zbytes": 900},
    "backend_detailed": {},
}
BALLOON = {"running": True, "report_only": True, "cur_pages": 512000, "goal_pages": 140000,
           "floor_pages": 60000, "committed_pages": 128000, "target_pages": 400000,
           "target_kb": 1600000, "counters": {"ticks": 12, "errors": 1}}


def test_render_exact_text() -> None:
    family = Family("xentmem_x", "gauge", 'help with \\ and\nnewline')
    family.add(1, a='q"uote', b="back\\slash\n").add(2.5)
    assert render([family, Family("xentmem_empty", "counter", "no samples")]) == (
        '# HELP xentmem_x help with \\\\ and\\nnewline\n'
        "# TYPE xentmem_x gauge\n"
        'xentmem_x{a="q\\"uote",b="back\\\\slash\\n"} 1\n'
        "xentmem_x 2.5\n"
    )


def test_collect_counters_and_balloon_figures() -> None:
    text = render(collect(backend="zcache", stats=STATS, balloon=BALLOON,
                          swap_areas=[{"type": 0, "kind": "FileBacking", "pages": 64,
                                       "used": 2, "tmem_pages": 3}], uptime_s=5.0))
    lines = set(text.splitlines())
    for expected in (
        "# TYPE xentmem_frontend_events_total counter",
        'xentmem_frontend_events_total{frontend="cleancache",event="succ_gets"} 3',
        'xentmem_frontend_events_total{frontend="frontswap",event="repatriated"} 4',
        'xentmem_frontswap_tmem_pages{backend="zcache"} 3',
        'xentmem_backend_loaded{backend="zcache"} 1',
        "# TYPE xentmem_backend_stat untyped",
        'xentmem_backend_stat{backend="zcache",stat="zbytes"} 900',
        'xentmem_swap_area_used_pages{type="0",backing="FileBacking"} 2',
        "xentmem_balloon_running 1",
        "xentmem_balloon_report_only 1",
        f"xentmem_balloon_goal_bytes {140000 * 4096}",
        f"xentmem_balloon_floor_bytes {60000 * 4096}",
        f"xentmem_balloon_driver_target_bytes {1600000 * 1024}",
        'xentmem_balloon_loop_events_total{event="ticks"} 12',
        "xentmem_daemon_uptime_seconds 5.0",
    ):
        assert expected in lines, expected
    assert "xentmem_backend_stat_detailed" not in text  # empty: left out
    for line in text.splitlines():
        assert line.startswith(("# HELP xentmem_", "# TYPE xentmem_", "xentmem_")), line
    # every family announces HELP then TYPE before its samples
    seen_type = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            seen_type.add(line.split()[2])
        elif not line.startswith("#"):
            assert line.split("{")[0].split(" ")[0] in seen_type, line


def test_nbd_export_counters_and_its_io_errors() -> None:
    """A page neither tmem nor a full disk took is an I/O error for the kernel: counted."""
    text = render(collect(backend="zcache", stats=STATS, balloon=BALLOON, nbd_exports=[
        {"name": "swap0", "counts": {"writes": 9, "write_errors": 2, "refused_EINVAL": 1}}]))
    lines = set(text.splitlines())
    assert "# TYPE xentmem_nbd_events_total counter" in lines
    assert 'xentmem_nbd_events_total{export="swap0",event="write_errors"} 2' in lines
    assert 'xentmem_nbd_events_total{export="swap0",event="refused_EINVAL"} 1' in lines


def test_no_backend_and_no_balloon() -> None:
    text = render(collect(backend=None, stats={"cleancache": {}, "frontswap": {}},
                          balloon={"running": False}))
    assert 'xentmem_backend_loaded{backend="none"} 0' in text
    assert "xentmem_balloon_running 0" in text
    assert "xentmem_balloon_goal_bytes" not in text


def test_textfile_is_replaced_atomically(tmp_path: Path) -> None:
    target = tmp_path / "xentmem.prom"
    target.write_text("old\n")
    inode = os.stat(target).st_ino
    write_textfile(target, "new\n")
    assert target.read_text() == "new\n"
    assert os.stat(target).st_ino != inode  # renamed over, never rewritten in place
    assert [p.name for p in tmp_path.iterdir()] == ["xentmem.prom"]


def test_page_size_and_file_helper_have_one_home() -> None:
    """PAGE_SIZE comes from the ABI module, and the atomic write lives in xentmem.files
    (metrics and shutdown.json use that one)."""
    from xentmem import files
    from xentmem.guestd import metrics, record
    from xentmem.tmem import abi

    assert metrics.PAGE_SIZE is abi.PAGE_SIZE
    assert not hasattr(metrics, "write_atomically") or \
        metrics.write_atomically is files.write_atomically
    assert record.write_atomically is files.write_atomically


def test_write_atomically_replaces_and_cleans_up(tmp_path: Path) -> None:
    from xentmem.files import fsync_path, write_atomically

    target = tmp_path / "state.json"
    target.write_bytes(b"old")
    write_atomically(target, b"new", 0o600)
    assert target.read_bytes() == b"new"
    assert target.stat().st_mode & 0o777 == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]
    fsync_path(target)
    fsync_path(tmp_path, directory=True)
    missing = tmp_path / "no-such-dir" / "x"
    try:
        write_atomically(missing, b"x")
    except FileNotFoundError:
        pass
    else:  # pragma: no cover
        raise AssertionError("a missing directory must fail")


def test_the_temporary_file_never_follows_a_planted_symlink(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The textfile's directory may be another account's (node_exporter's): a symlink it
    plants where the temporary file goes (the old ``.<name>.<pid>.tmp``, or whatever name
    the writer draws) is never written through; the target gets the new text anyway."""
    collector = tmp_path / "collector"
    collector.mkdir()
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    target = collector / "xentmem.prom"
    planted = [collector / f".{target.name}.{os.getpid()}.tmp",
               collector / f".{target.name}.planted.tmp"]
    for link in planted:
        link.symlink_to(victim)
    # The writer's first draw is the planted name: it must be refused (O_EXCL), not followed.
    monkeypatch.setattr(tempfile, "_get_candidate_names", lambda: iter(["planted", "fresh"]))
    write_textfile(target, "xentmem_backend_loaded 1\n")
    assert victim.read_text() == "precious\n"
    assert target.read_text() == "xentmem_backend_loaded 1\n" and not target.is_symlink()
    assert all(link.is_symlink() for link in planted)  # left alone
    assert target.stat().st_mode & 0o777 == 0o644
