"""e2e harness rules: with NODEMESH_REQUIRE_E2E=1 (CI) a skipped e2e test fails the run.

A skip looks like a pass in a summary; CI runs as root on a machine that has everything, so an
e2e test that cannot run there is a broken test or a broken machine, and either must be red.
"""

from __future__ import annotations

import os
from collections.abc import Generator

import pytest

REQUIRE_E2E = os.environ.get("NODEMESH_REQUIRE_E2E") == "1"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, None, None]:
    outcome = yield
    report = outcome.get_result()
    if REQUIRE_E2E and report.skipped:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"NODEMESH_REQUIRE_E2E=1 and this e2e test skipped: {reason}"
