"""Whether a missing test resource skips or fails: CI must not pass by skipping.

Under CI (``CI=true``) every test that needs a real peer (Debian's xenstored, the real-Xen bed)
must run; a developer's machine may lack them and skips, saying why.  ``XENTMEM_REQUIRE_<WHAT>``
(``1`` or ``0``) overrides either way.
"""

from __future__ import annotations

import os
from typing import NoReturn

import pytest


def is_required(what: str) -> bool:
    """``what`` is e.g. ``"PEERS"`` or ``"REALXEN"`` (the env var's suffix)."""
    explicit = os.environ.get(f"XENTMEM_REQUIRE_{what}")
    if explicit is not None:
        return explicit == "1"
    return os.environ.get("CI", "").lower() == "true"


def unavailable(what: str, description: str, reason: str) -> NoReturn:
    """Skip for ``reason``, or fail when ``what`` is required here."""
    if is_required(what):
        pytest.fail(f"{description} is required here (CI=true or XENTMEM_REQUIRE_{what}=1) "
                    f"but {reason}")
    pytest.skip(reason)
