"""Under CI a missing peer fails the run instead of skipping it."""

from __future__ import annotations

import pytest
from fakes.required import is_required, unavailable


@pytest.mark.parametrize(
    ("env", "required"),
    [
        ({}, False),
        ({"CI": "true"}, True),
        ({"CI": "true", "XENTMEM_REQUIRE_PEERS": "0"}, False),
        ({"XENTMEM_REQUIRE_PEERS": "1"}, True),
        ({"CI": "false"}, False),
    ],
)
def test_required_follows_ci_and_the_override(monkeypatch: pytest.MonkeyPatch,
                                              env: dict[str, str], required: bool) -> None:
    for name in ("CI", "XENTMEM_REQUIRE_PEERS"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert is_required("PEERS") is required


def test_unavailable_fails_under_ci_and_skips_elsewhere(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("XENTMEM_REQUIRE_PEERS", raising=False)
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match=r"required here .* but no gcc"):
        unavailable("PEERS", "Debian's c-xenstored", "no gcc")
    monkeypatch.setenv("CI", "false")
    with pytest.raises(pytest.skip.Exception, match="no gcc"):
        unavailable("PEERS", "Debian's c-xenstored", "no gcc")
