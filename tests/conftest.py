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
    fresh edge-small), then the other VM tests on the same hosts, and last the destroy of every
    host the session booted (a boot and a teardown fewer than destroying the smoke host first)."""
    def tier(item):
        if not item.get_closest_marker("vm"):
            return 0
        if item.path.name == "test_vm_smoke.py":
            return 3 if item.name == "test_destroy_leaves_nothing_behind" else 1
        return 2

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


# ---- a busy machine on purpose (issue 14) -------------------------------------------------------
# `--cpu-hog N` runs N busy processes beside the whole session, as another CPU-heavy job on the
# same machine would: the proof that the suite (and the product's time bounds) hold on a slow
# host. Each hog ends itself after --cpu-hog-max-s whatever happens; the session stops them by PID.
HOG = "import sys, time\nend = time.monotonic() + float(sys.argv[1])\nwhile time.monotonic() < end:\n    pass\n"


def pytest_addoption(parser):
    parser.addoption("--cpu-hog", type=int, default=0, metavar="N",
                     help="run N busy processes beside the tests (a loaded machine), stopped at the end")
    parser.addoption("--cpu-hog-max-s", type=float, default=3 * 3600, metavar="S",
                     help="each busy process ends itself after this many seconds (default 3 h)")


@pytest.fixture(scope="session", autouse=True)
def cpu_hog(request):
    import subprocess  # noqa: PLC0415

    count, max_s = request.config.getoption("--cpu-hog"), request.config.getoption("--cpu-hog-max-s")
    hogs = [subprocess.Popen([sys.executable, "-c", HOG, str(max_s)], stdin=subprocess.DEVNULL)
            for _ in range(max(0, count))]
    if hogs:
        print(f"\n[cpu-hog] {len(hogs)} busy process(es) beside the tests: pids {[h.pid for h in hogs]}, "
              f"each ends by itself within {max_s:.0f}s", flush=True)
    yield [h.pid for h in hogs]
    for hog in hogs:
        hog.kill()
        hog.wait(timeout=10)
