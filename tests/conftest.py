"""Shared pytest setup: the VM fixtures, and the rule that VM tests never skip in CI."""
import os
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

# Property tests share the machine with software-emulated VMs in CI: no per-example deadline.
settings.register_profile("edgefit", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("edgefit")

# `tests.vm...` must import however pytest was started (.venv/bin/pytest does not put the
# repository on sys.path; tests/ has no __init__.py).
_REPO = str(Path(__file__).resolve().parents[1])
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)

pytest_plugins = ["tests.vm.fixtures", "tests.vm_deploy"]  # vm_deploy: deployed_stack, one deploy per session


def pytest_collection_modifyitems(items):
    """Fast tests first, then the VM smoke test (does the harness work at all? It starts from a
    fresh edge-small and ends by destroying it), then the other VM tests."""
    def tier(item):
        if not item.get_closest_marker("vm"):
            return 0
        return 1 if item.path.name == "test_vm_smoke.py" else 2

    items.sort(key=tier)  # stable: the order within each tier stays as collected


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """With CI=true a skipped @pytest.mark.vm test is a failure: CI must run the VM tier."""
    outcome = yield
    report = outcome.get_result()
    ci = os.environ.get("CI", "").lower() in ("1", "true", "yes")
    if ci and report.skipped and item.get_closest_marker("vm") and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"CI=true: VM tests must not skip ({reason})"
