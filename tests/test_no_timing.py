"""The suite's rule that no test depends on timing, where a library would add one."""

from __future__ import annotations

from hypothesis import HealthCheck, settings


def test_hypothesis_has_no_deadline_and_no_slowness_check() -> None:
    """Fails before: property tests without their own settings had a 200 ms per-example
    deadline, which a loaded machine exceeds (Hypothesis then reports a flaky failure)."""
    assert settings.default.deadline is None
    assert HealthCheck.too_slow in settings.default.suppress_health_check
