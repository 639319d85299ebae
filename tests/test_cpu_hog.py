"""The --cpu-hog option (tests/conftest.py): busy processes beside the session, bounded."""

import subprocess
import sys
import time

from tests.conftest import HOG


def test_a_hog_is_busy_and_ends_by_itself():
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-c", HOG, "0.5"], timeout=30)
    assert done.returncode == 0 and 0.5 <= time.monotonic() - started < 20


def test_the_session_fixture_runs_none_unless_asked(cpu_hog, request):
    assert len(cpu_hog) == request.config.getoption("--cpu-hog")
