"""The real-daemon peer helper says why it cannot run, so the peer tests skip cleanly."""

from __future__ import annotations

from pathlib import Path

import pytest
from fakes import xs_peer


def test_missing_shim_is_a_skip_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(xs_peer, "SHIM_SOURCE", Path("/nonexistent/fakexen.c"))
    reason = xs_peer.unavailable_reason("c-xenstored")
    assert reason is not None and "fakexen.c" in reason


def test_missing_binary_is_a_skip_reason(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(xs_peer, "BINARIES", {"oxenstored": tmp_path / "none"})
    reason = xs_peer.unavailable_reason("oxenstored")
    assert reason is not None and "xen-utils-4.17" in reason


def test_unknown_kind() -> None:
    assert "unknown" in (xs_peer.unavailable_reason("qemu") or "")
