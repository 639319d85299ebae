"""The worker's memory watchdog in the rendered sitecustomize.py (issue 9, item 3).

The real Celery worker's gevent pool never gives memory back, so the hook asks it for a warm
shutdown (SIGTERM) once the container's anonymous memory passes the plan's threshold. Here the
rendered hook runs in real Python processes named like the entrypoint's `celery ... worker`,
under gevent's monkey patching as Celery's gevent pool does, against a fake cgroup v2 directory
whose memory.stat the test moves across the threshold.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edgefit.plan import HostSize, make_plan
from edgefit.render import render_stack, write_stack
from edgefit.secrets import Secrets

MIB = 1024 * 1024
PLAN = make_plan(HostSize(2, 4096))

# Stands in for `celery -A app.celery worker -P gevent`: gevent patches everything after the
# hook ran, then the main greenlet waits; SIGTERM is Celery's warm shutdown.
FAKE_CELERY = """\
import signal, sys, time
from gevent import monkey
monkey.patch_all()
import gevent

def warm_shutdown(signum, frame):
    print("warm shutdown: running tasks finish", flush=True)
    sys.exit(0)

signal.signal(signal.SIGTERM, warm_shutdown)
print("ready", flush=True)
for _ in range(600):
    gevent.sleep(0.05)
print("never stopped", flush=True)
sys.exit(3)
"""


@pytest.fixture(scope="module")
def hook_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("stack")
    write_stack(render_stack(PLAN, Secrets.generate()), out)
    return out / "conf" / "python"


@pytest.fixture(scope="module")
def hook(hook_dir):
    spec = importlib.util.spec_from_file_location("edgefit_rendered_sitecustomize", hook_dir / "sitecustomize.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # pytest is no celery worker: no watchdog starts here
    return module


def fake_cgroup(directory: Path, anon_mib: int, limit_mib: int | None) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "memory.stat").write_text(f"anon {anon_mib * MIB}\nfile {40 * MIB}\nkernel 1000\n")
    (directory / "memory.current").write_text(f"{(anon_mib + 60) * MIB}\n")
    (directory / "memory.max").write_text("max\n" if limit_mib is None else f"{limit_mib * MIB}\n")
    return directory


def test_reads_anon_current_and_max(hook, tmp_path):
    cgroup = fake_cgroup(tmp_path / "cg", 321, 832)
    assert hook.read_cgroup_memory(str(cgroup)) == (321 * MIB, 381 * MIB, 832 * MIB)
    fake_cgroup(cgroup, 5, None)
    assert hook.read_cgroup_memory(str(cgroup))[2] is None
    (cgroup / "memory.stat").write_text("file 1\n")
    with pytest.raises(ValueError):
        hook.read_cgroup_memory(str(cgroup))


@pytest.mark.parametrize("argv,expected", [
    (["/app/api/.venv/bin/celery", "-A", "app.celery", "worker", "-P", "gevent", "-c", "1"], True),
    (["celery", "worker"], True),
    (["/app/api/.venv/bin/celery", "-A", "app.celery", "beat"], False),
    (["/app/api/.venv/bin/celery", "-A", "app.celery", "inspect", "ping"], False),
    (["/app/api/.venv/bin/gunicorn", "--workers", "1", "app:app"], False),
    (["-c"], False),
    ([], False),
])
def test_only_the_celery_worker_is_watched(hook, argv, expected):
    assert hook.is_celery_worker(argv) is expected


def test_the_rendered_worker_gets_the_plans_threshold(hook_dir):
    compose = (hook_dir.parent.parent / "docker-compose.yml").read_text()
    worker = compose.split("\n  worker:\n", 1)[1].split("\n\n", 1)[0]
    assert f'EDGEFIT_WORKER_RESTART_ANON_MIB: "{PLAN.dify.worker_restart_anon_mib}"' in worker
    assert PLAN.dify.worker_restart_anon_mib < PLAN.services["worker"].mem_limit_mib


def start(tmp_path: Path, hook_dir: Path, cgroup: Path, *args: str) -> subprocess.Popen:
    script = tmp_path / "bin" / "celery"
    script.parent.mkdir(exist_ok=True)
    script.write_text(FAKE_CELERY)
    env = {**os.environ, "PYTHONPATH": str(hook_dir), "EDGEFIT_CGROUP_DIR": str(cgroup),
           "EDGEFIT_WORKER_RESTART_ANON_MIB": str(PLAN.dify.worker_restart_anon_mib),
           "EDGEFIT_WORKER_WATCHDOG_INTERVAL_S": "0.2", "MODE": "worker"}
    process = subprocess.Popen([sys.executable, str(script), *args], env=env, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert process.stdout.readline().strip() == "ready"
    return process


def test_the_worker_gets_a_warm_shutdown_once_anon_passes_the_threshold(tmp_path, hook_dir):
    threshold = PLAN.dify.worker_restart_anon_mib
    limit = PLAN.services["worker"].mem_limit_mib
    cgroup = fake_cgroup(tmp_path / "cg", threshold - 50, limit)
    process = start(tmp_path, hook_dir, cgroup, "-A", "app.celery", "worker", "-P", "gevent")
    try:
        time.sleep(1.0)  # five intervals below the threshold: nothing happens
        assert process.poll() is None, process.communicate()
        fake_cgroup(cgroup, threshold + 1, limit)
        out, err = process.communicate(timeout=10)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0
    assert "warm shutdown" in out and "never stopped" not in out
    assert f"anonymous memory {threshold + 1} MiB passed {threshold} MiB" in err
    assert f"limit {limit} MiB" in err


def test_other_celery_commands_are_left_alone(tmp_path, hook_dir):
    cgroup = fake_cgroup(tmp_path / "cg", PLAN.dify.worker_restart_anon_mib + 100, None)
    process = start(tmp_path, hook_dir, cgroup, "-A", "app.celery", "inspect", "ping")
    time.sleep(1.0)
    still_running = process.poll() is None
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=10)
    assert still_running, err
    assert "edgefit watchdog" not in err


def test_an_unreadable_cgroup_stops_the_watchdog_not_the_worker(tmp_path, hook_dir):
    process = start(tmp_path, hook_dir, tmp_path / "no-such-cgroup", "worker")
    time.sleep(1.0)
    still_running = process.poll() is None
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=10)
    assert still_running, err
    assert "edgefit watchdog: stopped, cannot read" in err
