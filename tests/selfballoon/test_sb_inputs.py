"""Parsers of the guest's files: exact values, clear refusals, and fuzzing."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sb_fakes import MAX_PFN, TOTALRESERVE, ZONEINFO, GuestTree, meminfo_text

from xentmem.roots import Roots
from xentmem_selfballoon.inputs import (
    InputError,
    is_control_domain,
    parse_control_domain,
    parse_kb,
    parse_meminfo,
    parse_psi,
    parse_zoneinfo,
    read_guest,
    read_meminfo,
    read_pressure,
)

# -- meminfo -----------------------------------------------------------------------------------


def test_meminfo_values_and_pages() -> None:
    info = parse_meminfo(meminfo_text(2030676, 1048576))
    assert (info.mem_total_kb, info.committed_as_kb) == (2030676, 1048576)
    assert (info.totalram_pages, info.committed_pages) == (507669, 262144)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("MemTotal: 100 kB\n", "missing Committed_AS"),
        ("Committed_AS: 1 kB\n", "missing MemTotal"),
        ("MemTotal: 100 kB\nMemTotal: 100 kB\nCommitted_AS: 1 kB\n", "twice"),
        ("MemTotal: -5 kB\nCommitted_AS: 1 kB\n", "non-negative integer"),
        ("MemTotal: 5 MB\nCommitted_AS: 1 kB\n", "'<n> kB'"),
        ("MemTotal:\nCommitted_AS: 1 kB\n", "'<n> kB'"),
        ("MemTotal: 0 kB\nCommitted_AS: 1 kB\n", "MemTotal is 0"),
        ("MemTotal: 99999999999999999999 kB\nCommitted_AS: 1 kB\n", "implausibly large"),
        ("", "missing"),
    ],
)
def test_meminfo_refusals(text: str, message: str) -> None:
    with pytest.raises(InputError, match=message):
        parse_meminfo(text)


# -- zoneinfo ----------------------------------------------------------------------------------


def test_zoneinfo_reserve_and_max_pfn_worked_by_hand() -> None:
    summary = parse_zoneinfo(ZONEINFO)
    assert [z.name for z in summary.zones] == ["DMA", "DMA32", "Normal", "Movable"]
    dma = summary.zones[0]
    # the pagesets' "high:  9999" is not the watermark
    assert (dma.high, dma.managed, dma.protection) == (49, 1500, (0, 1872, 1872, 1872))
    assert dma.reserve_pages == 1500  # capped at managed: 49 + 1872 = 1921 > 1500
    assert summary.zones[1].reserve_pages == 2900
    assert summary.totalreserve_pages == TOTALRESERVE
    assert summary.max_pfn == MAX_PFN


def test_zoneinfo_without_start_pfn_sums_spans() -> None:
    old = "\n".join(line for line in ZONEINFO.splitlines() if "start_pfn" not in line)
    assert parse_zoneinfo(old).max_pfn == 4095 + 520192


def test_zoneinfo_with_several_nodes() -> None:
    text = ZONEINFO + ZONEINFO.replace("Node 0,", "Node 1,")
    summary = parse_zoneinfo(text)
    assert len(summary.zones) == 8 and summary.zones[4].node == 1
    assert summary.totalreserve_pages == 2 * TOTALRESERVE


@pytest.mark.parametrize(
    ("mangle", "message"),
    [
        (lambda t: t.replace("        managed  1500\n", ""), "no 'managed'"),
        (lambda t: t.replace("        high     49\n", ""), "no 'high'"),
        (lambda t: t.replace("protection: (0, 1872, 1872, 1872)", "protection: 0, 1"),
         "protection should be"),
        (lambda t: t.replace("protection: (0, 1872,", "protection: (0, x,"),
         "non-negative integer"),
        (lambda t: t.replace("        high     49\n", "        high     49\n        high 3\n"),
         "twice"),
        (lambda t: t.replace("Node 0, zone      DMA", "Node 0, zona DMA"), "bad zone header"),
        (lambda t: "garbage\n" + t, "before the first zone"),
        (lambda t: "", "no zones"),
    ],
)
def test_zoneinfo_refusals(mangle, message: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(InputError, match=message):
        parse_zoneinfo(mangle(ZONEINFO))


# -- psi -----------------------------------------------------------------------------------------


def test_psi_by_key_not_position() -> None:
    p = parse_psi("some total=1234 avg300=0.00 avg10=1.50 avg60=0.10\n"
                  "full avg10=0.00 avg60=0.00 avg300=0.00 total=99\n")
    assert (p.some_total_us, p.full_total_us, p.some_avg10) == (1234, 99, 1.5)
    # "full" is optional (a cgroup v1 era file or a CPU-only kernel interface)
    assert parse_psi("some avg10=0.00 avg60=0.00 avg300=0.00 total=7\n").full_total_us is None


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("full avg10=0.00 total=1\n", "no 'some'"),
        ("some avg10=0.00\n", "no total="),
        ("some avg10=0.00 total=-1\n", "non-negative"),
        ("some avg10=abc total=1\n", "not a number"),
        ("some avg10=120.0 total=1\n", "percentage"),
        ("some avg10 total=1\n", "key=value"),
        ("half total=1\n", "unexpected line"),
    ],
)
def test_psi_refusals(text: str, message: str) -> None:
    with pytest.raises(InputError, match=message):
        parse_psi(text)


# -- small files -----------------------------------------------------------------------------------


def test_kb_and_capabilities() -> None:
    assert parse_kb("2097152\n", "current_kb") == 2097152
    with pytest.raises(InputError, match="current_kb"):
        parse_kb("12 kB", "current_kb")
    assert parse_control_domain("control_d\n")
    assert parse_control_domain("control_d,foo")
    assert not parse_control_domain("")
    assert not parse_control_domain("not_control_d\n")


def test_reading_under_a_root(tmp_path: Path) -> None:
    tree = GuestTree(tmp_path)
    tree.write(mem_total_kb=2030676, committed_kb=1048576, current_kb=2097152, psi_total_us=42)
    tree.set_target_kb(2097152)
    reading = read_guest(tree.roots)
    assert reading.balloon_current_kb == 2097152
    inputs = reading.balloon_inputs(frontswap_pages=3)
    assert (inputs.totalram_pages, inputs.committed_pages, inputs.totalreserve_pages,
            inputs.max_pfn, inputs.balloon_current_pages, inputs.frontswap_pages) == (
        507669, 262144, TOTALRESERVE, MAX_PFN, 524288, 3)
    assert read_pressure(tree.roots).some_total_us == 42
    assert not is_control_domain(tree.roots)


def test_no_balloon_driver_reads_as_none(tmp_path: Path) -> None:
    tree = GuestTree(tmp_path, balloon=False)
    tree.write(mem_total_kb=2030676, committed_kb=1048576)
    assert read_guest(tree.roots).balloon_current_kb is None


def test_missing_and_binary_files_name_the_path(tmp_path: Path) -> None:
    roots = Roots(root=tmp_path)
    with pytest.raises(InputError, match="meminfo: missing"):
        read_meminfo(roots)
    (tmp_path / "proc").mkdir()
    (tmp_path / "proc" / "meminfo").write_bytes(b"MemTotal: \xff\xfe kB\n")
    with pytest.raises(InputError, match="not ASCII"):
        read_meminfo(roots)


def test_dom0_detection(tmp_path: Path) -> None:
    assert is_control_domain(GuestTree(tmp_path / "a", dom0=True).roots)
    assert not is_control_domain(Roots(root=tmp_path / "nothing"))  # no xenfs: not dom0


# -- fuzzing -------------------------------------------------------------------------------------

_ANY_TEXT = st.text(
    alphabet=st.sampled_from(list("0123456789 \n:,()=-+.kBabcdefghilmnoprstuvxyzMNTACDSQ_")),
    max_size=400,
)


@settings(max_examples=300, deadline=None)
@given(_ANY_TEXT)
def test_parsers_only_ever_raise_input_error(text: str) -> None:
    for parse in (parse_meminfo, parse_zoneinfo, parse_psi,
                  lambda t: parse_kb(t, "current_kb")):
        with contextlib.suppress(InputError):
            parse(text)


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 2**40), st.integers(0, 2**40),
       st.lists(st.tuples(st.sampled_from(["Cached", "Shmem", "SwapFree"]),
                          st.integers(0, 2**40)), max_size=5))
def test_meminfo_round_trip(total: int, committed: int, extra: list[tuple[str, int]]) -> None:
    lines = [f"{k}: {v} kB" for k, v in extra]
    lines.insert(len(lines) // 2, f"MemTotal:  {total} kB")
    lines.append(f"Committed_AS:   {committed} kB")
    info = parse_meminfo("\n".join(lines) + "\n")
    assert (info.mem_total_kb, info.committed_as_kb) == (total, committed)


_ZONE = st.tuples(
    st.integers(0, 2**30), st.integers(0, 2**30), st.integers(0, 2**30),
    st.lists(st.integers(0, 2**30), min_size=1, max_size=5), st.integers(0, 2**30),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(_ZONE, min_size=1, max_size=6))
def test_zoneinfo_round_trip(zones: list[tuple[int, int, int, list[int], int]]) -> None:
    text = ""
    for i, (high, managed, spanned, prot, start) in enumerate(zones):
        text += (f"Node 0, zone Z{i}\n  pages free 0\n        high {high}\n"
                 f"        spanned {spanned}\n        managed {managed}\n"
                 f"        protection: ({', '.join(map(str, prot))})\n"
                 f"  pagesets\n              high:  77\n  start_pfn: {start}\n")
    summary = parse_zoneinfo(text)
    assert summary.totalreserve_pages == sum(min(m, h + max(p)) for h, m, _, p, _ in zones)
    assert summary.max_pfn == max(s + sp for _, _, sp, _, s in zones)


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 2**47), st.integers(0, 2**47),
       st.floats(0, 100, allow_nan=False).map(lambda f: round(f, 2)))
def test_psi_round_trip(some: int, full: int, avg: float) -> None:
    p = parse_psi(f"some avg10={avg:.2f} avg60=0.00 avg300=0.00 total={some}\n"
                  f"full avg10=0.00 avg60=0.00 avg300=0.00 total={full}\n")
    assert (p.some_total_us, p.full_total_us) == (some, full)


def test_a_balloon_moving_during_the_reading_is_read_again(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """current_kb and MemTotal must describe the same balloon (their difference is the offset
    into balloon terms): a reading during which current_kb moved is taken again."""
    from xentmem_selfballoon import inputs

    tree = GuestTree(tmp_path)
    tree.write(mem_total_kb=1_000_000, committed_kb=500_000, current_kb=1_050_000)
    tree.set_target_kb(1_050_000)
    currents = iter([1_060_000, 1_050_000, 1_050_000, 1_050_000, -1])
    monkeypatch.setattr(inputs, "read_balloon_current_kb", lambda roots: next(currents))
    reading = read_guest(tree.roots)
    assert reading.balloon_current_kb == 1_050_000
    assert next(currents) == -1  # one retry: the second pair agreed


def test_a_balloon_that_never_holds_still_is_read_a_bounded_number_of_times(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from xentmem_selfballoon import inputs

    tree = GuestTree(tmp_path)
    tree.write(mem_total_kb=1_000_000, committed_kb=500_000, current_kb=1_050_000)
    tree.set_target_kb(1_050_000)
    reads = iter(range(1_000_000, 0, -1000))
    monkeypatch.setattr(inputs, "read_balloon_current_kb", lambda roots: next(reads))
    last = 1_000_000 - (2 * inputs.STILL_READS - 1) * 1000  # the last of the bounded tries
    assert read_guest(tree.roots).balloon_current_kb == last
