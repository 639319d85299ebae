"""The worker's memory watchdog with a real Celery worker (issue 9, item 3).

tests/test_worker_watchdog.py proves the rendered sitecustomize.py hook against a stand-in
script. Here the same rendered hook (2C4G plan) is on the PYTHONPATH of a real
`celery -A celery_entrypoint.celery worker -P gevent` (Celery 5.5.3, Dify 1.12.1's; gevent's
monkey patching by Celery itself), started with the arguments Dify's entrypoint passes, against
the rendered broker Redis (redis-server from Debian, 2C4G's conf/redis-broker/redis.conf and
its password, on loopback) as broker and result backend, as Dify's CELERY_BACKEND=redis uses it.
The cgroup v2 files the hook reads are a fake directory whose memory.stat the test moves across
the plan's threshold.

Proven: below the threshold the worker runs and completes tasks; once anonymous memory passes
it while a task runs, Celery logs its warm shutdown, the task finishes (its marker file and its
result in the backend) and the process exits 0, which `restart: always` turns into a fresh
worker; without the EDGEFIT_WORKER_* variables no watchdog starts. Every process is stopped by
its PID in teardown, also when a test fails; every wait is bounded.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import pytest

from edgefit.plan import HostSize, make_plan
from edgefit.render import render_stack, write_stack
from edgefit.secrets import Secrets
from servers_helpers import Server, base_env, require_module, wait_until
from test_servers import RedisUnderTest, running_redis
from test_worker_watchdog import fake_cgroup

pytestmark = pytest.mark.servers

PLAN = make_plan(HostSize(2, 4096))
THRESHOLD_MIB = PLAN.dify.worker_restart_anon_mib
LIMIT_MIB = PLAN.services["worker"].mem_limit_mib
INTERVAL_S = 0.2
START_TIMEOUT_S = 60  # a worker is ready in about 2 s (1 s of it mingle); shared machines are slow
EXIT_TIMEOUT_S = 30  # from the watchdog's threshold to the process's exit, task included
QUEUE = "dataset"  # one of the queues Dify's entrypoint passes with -Q

# The Celery app, as Dify's celery_entrypoint.celery: broker and result backend from the
# environment. The task writes a marker when it starts and one when it finishes.
APP = """\
import os
import time

from celery import Celery

URL = os.environ["WATCHDOG_TEST_REDIS_URL"]
MARKERS = os.environ["WATCHDOG_TEST_MARKERS"]
celery = Celery("celery_entrypoint", broker=URL, backend=URL)
celery.conf.update(task_default_queue="dataset", broker_connection_retry_on_startup=True)


@celery.task(name="edgefit_test.index")
def index(name, seconds):
    open(os.path.join(MARKERS, name + ".started"), "w").close()
    time.sleep(seconds)  # gevent's sleep: Celery patched time before the task module ran
    with open(os.path.join(MARKERS, name + ".done"), "w") as marker:
        marker.write("done\\n")
    return name
"""

# The console script, as the entrypoint runs it (`exec celery ...`), and `python -m celery`.
LAUNCHERS = {
    "celery": [str(Path(sys.executable).parent / "celery")],
    "python-m-celery": [sys.executable, "-m", "celery"],
}
# Dify's api/docker/entrypoint.sh, MODE=worker: `celery -A celery_entrypoint.celery worker -P
# gevent -c N --max-tasks-per-child 50 --loglevel INFO -Q <queues> --prefetch-multiplier=1`,
# here with two greenlets (-c 2) and three of its queues.
WORKER_ARGS = ["-A", "celery_entrypoint.celery", "worker", "-P", "gevent", "-c", "2",
               "--max-tasks-per-child", "50", "--loglevel", "INFO",
               "-Q", f"{QUEUE},workflow,mail", "--prefetch-multiplier=1"]

WATCHDOG_LINE = "edgefit watchdog: anonymous memory"
WARM_SHUTDOWN = "worker: Warm shutdown (MainProcess)"


@pytest.fixture(scope="module")
def hook_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("stack")
    write_stack(render_stack(PLAN, Secrets.generate()), out)
    return out / "conf" / "python"


@dataclass
class Broker:
    redis: RedisUnderTest
    url: str  # as the rendered CELERY_BROKER_URL, at 127.0.0.1 and the free port


@pytest.fixture(scope="module")
def broker():
    """The rendered 2C4G broker Redis, with its rendered password."""
    require_module("celery", "celery[redis]")
    with running_redis("2C4G", "broker") as under_test:
        yield Broker(under_test, f"redis://:{quote(under_test.client_password, safe='')}"
                                 f"@127.0.0.1:{under_test.port}/1")


@pytest.fixture
def client(broker):
    """The sending side (this process, no gevent), on a broker emptied of earlier tests' keys."""
    from celery import Celery
    broker.redis.authed().flushall()
    app = Celery("edgefit_test_client", broker=broker.url, backend=broker.url)
    app.conf.update(broker_connection_retry_on_startup=True)
    yield app
    app.close()


class Worker:
    def __init__(self, tmp_path: Path, hook_dir: Path, broker, launcher: str, watchdog: bool):
        self.app_dir = tmp_path / "app"
        self.markers = tmp_path / "markers"
        self.cgroup = fake_cgroup(tmp_path / "cgroup", THRESHOLD_MIB - 100, LIMIT_MIB)
        self.app_dir.mkdir()
        self.markers.mkdir()
        (self.app_dir / "celery_entrypoint.py").write_text(APP)
        env = {**base_env(tmp_path), "PYTHONPATH": f"{hook_dir}:{self.app_dir}",
               "PYTHON_GC_THRESHOLD": ",".join(map(str, PLAN.dify.gc_threshold)),
               "EDGEFIT_CGROUP_DIR": str(self.cgroup),
               "WATCHDOG_TEST_REDIS_URL": broker.url, "WATCHDOG_TEST_MARKERS": str(self.markers)}
        if watchdog:
            env["EDGEFIT_WORKER_RESTART_ANON_MIB"] = str(THRESHOLD_MIB)
            env["EDGEFIT_WORKER_WATCHDOG_INTERVAL_S"] = str(INTERVAL_S)
        self.server = Server("celery-worker", [*LAUNCHERS[launcher], *WORKER_ARGS],
                             workdir=self.app_dir, env=env)

    def set_anon(self, mib: int) -> None:
        fake_cgroup(self.cgroup, mib, LIMIT_MIB)

    def marker(self, name: str, state: str) -> Path:
        return self.markers / f"{name}.{state}"

    def wait_for(self, probe, what: str, timeout: float = EXIT_TIMEOUT_S):
        return wait_until(probe, timeout=timeout, what=what, server=self.server)

    def wait_exit(self, timeout: float = EXIT_TIMEOUT_S) -> int:
        wait_until(self.server.exited, timeout=timeout, what="the worker's exit")
        return self.server.proc.returncode


@pytest.fixture
def start_worker(tmp_path, hook_dir, broker):
    """Start a worker and wait for Celery's `ready.`; stopped by its PID in teardown."""
    started = []

    def start(launcher: str = "celery", watchdog: bool = True) -> Worker:
        worker = Worker(tmp_path, hook_dir, broker, launcher, watchdog)
        started.append(worker)
        worker.server.start()
        wait_until(lambda: " ready." in worker.server.log(), timeout=START_TIMEOUT_S,
                   what="the Celery worker's `ready.`", server=worker.server)
        return worker

    yield start
    for worker in started:
        worker.server.stop()


def send(client, name: str, seconds: float):
    return client.send_task("edgefit_test.index", args=(name, seconds), queue=QUEUE)


def test_below_the_threshold_the_worker_runs_and_completes_tasks(client, start_worker):
    worker = start_worker("python-m-celery")  # the hook finds `celery` in sys.orig_argv here
    worker.set_anon(THRESHOLD_MIB - 1)  # as close as a MiB below
    results = [send(client, f"below-{index}", 0.5) for index in range(4)]
    assert [result.get(timeout=EXIT_TIMEOUT_S) for result in results] == [f"below-{i}" for i in range(4)]
    assert all(worker.marker(f"below-{index}", "done").is_file() for index in range(4))
    time.sleep(10 * INTERVAL_S)  # ten more reads below the threshold
    log = worker.server.log()
    assert not worker.server.exited(), log
    assert "edgefit watchdog" not in log and "Warm shutdown" not in log, log
    # The watchdog was watching all along: one MiB more and the idle worker leaves.
    worker.set_anon(THRESHOLD_MIB + 1)
    assert worker.wait_exit() == 0, worker.server.log()
    assert WARM_SHUTDOWN in worker.server.log()


def test_past_the_threshold_the_running_task_finishes_and_the_worker_exits_0(client, start_worker):
    worker = start_worker("celery")  # the console script, as the entrypoint's `exec celery`
    result = send(client, "indexing", 3)
    worker.wait_for(lambda: worker.marker("indexing", "started").is_file(), "the task to start")
    assert not worker.marker("indexing", "done").exists()

    worker.set_anon(THRESHOLD_MIB + 1)
    worker.wait_for(lambda: WARM_SHUTDOWN in worker.server.log(), "Celery's warm shutdown",
                    timeout=10 * INTERVAL_S + 5)
    code = worker.wait_exit()  # bounded: EXIT_TIMEOUT_S from here, the task's 3 s included
    log = worker.server.log()
    assert code == 0, log

    assert f"{WATCHDOG_LINE} {THRESHOLD_MIB + 1} MiB passed {THRESHOLD_MIB} MiB" in log, log
    assert f"limit {LIMIT_MIB} MiB" in log
    assert log.count(WATCHDOG_LINE) == 1
    # In this order: the watchdog, Celery's warm shutdown, and only then the task's success.
    assert log.find(WATCHDOG_LINE) < log.find(WARM_SHUTDOWN) < log.find("] succeeded in "), log
    assert worker.marker("indexing", "done").read_text() == "done\n"
    assert result.get(timeout=10) == "indexing"  # the result reached the backend
    assert result.state == "SUCCESS"


def test_without_the_edgefit_variables_no_watchdog_starts(client, start_worker):
    worker = start_worker("celery", watchdog=False)
    worker.set_anon(THRESHOLD_MIB * 100)  # far past any threshold, in the cgroup it would read
    assert send(client, "unwatched", 0.5).get(timeout=EXIT_TIMEOUT_S) == "unwatched"
    time.sleep(1.0)  # a watchdog, had one started, would have read the cgroup at once
    log = worker.server.log()
    assert not worker.server.exited(), log
    assert "edgefit watchdog" not in log and "Warm shutdown" not in log, log
    # Our own SIGTERM (what `docker stop` sends) is the same warm shutdown, exit code 0.
    worker.server.stop()
    assert worker.server.proc.returncode == 0, worker.server.log()
    assert WARM_SHUTDOWN in worker.server.log()
