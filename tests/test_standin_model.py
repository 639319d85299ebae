"""The stand-in's memory model of Dify (tests/images/standin/dify_standin.py, DIFY_MEMORY).

The VM tests run this model, not Dify, so its figures must stay the measured ones
(../shared/notes/dify-memory.md) and its behaviour must be the measured behaviour: baselines per
role, growth up to the measured peaks, indexing memory kept under gevent, recycled gunicorn
workers that serve nothing while they reload. And on the test VMs' sizes, everything it
allocates must fit the plan's limits, or the VM tests would test the model's OOM kills.
"""

from __future__ import annotations

import importlib.util
import json
import random
import re
import sys
import threading
import time
from pathlib import Path

import pytest

from edgefit.plan import PRESETS, HostSize, make_plan
from edgefit.render import render_stack
from edgefit.secrets import Secrets

STANDIN = Path(__file__).resolve().parent / "images" / "standin" / "dify_standin.py"
_spec = importlib.util.spec_from_file_location("dify_standin_model_under_test", STANDIN)
standin = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(standin)

# The notes' figures, restated: a change to DIFY_MEMORY that does not come with a new
# measurement shows up here.
NOTES = {
    "api_idle_anon_one_worker": 336,  # figures table: api, 1 gunicorn worker, idle (anon)
    "api_peak_anon_one_worker": 572,  # api, 1 gunicorn worker, edgefit 2C4G, peak (anon)
    "api_peak_anon_three_workers": 1363,  # api, 3 gunicorn workers, edgefit 4C8G, peak (anon)
    "worker_idle_anon": 320,  # worker, gevent -c 2, idle (anon)
    "worker_idle_rss": 439,  # worker, gevent -c 2, idle RSS
    "worker_peak_rss_8mb": 774,  # worker, gevent -c 2, peak RSS (one 8 MB document)
    "worker_peak_rss_c8_1mb": 1320,  # worker, gevent -c 8, peak RSS (8 documents of 1 MB at once)
    "beat_anon": 314,
    "api_peak_anon_upstream": 658,  # api, 1 gunicorn worker, upstream, peak (anon)
    "worker_idle_anon_c1": 318,  # worker, gevent -c 1, upstream, idle (anon)
    "worker_peak_anon_upstream_8mb": 872,  # worker, gevent -c 1, upstream, peak (anon)  # beat, idle and peak (anon)
    "jieba": 220,  # "What was learned": jieba's dictionary on the first indexing task
    "reload_s": (14, 37),  # a recycled api worker's reload
    "web_node_peak_bounded": 291,  # web: node x1, old=128 + semi=16, peak RSS
    "web_node_peak_unbounded": 789,  # web: node x1, no flags, peak RSS
    "web_pm2_pss": 45,  # web: the pm2 manager
}


@pytest.fixture
def cheap(monkeypatch):
    """The model's bookkeeping without allocating the real hundreds of MiB."""
    monkeypatch.setattr(standin, "touched", lambda mib: None)


def model(role, **env):
    """A model under edgefit's settings (MALLOC_ARENA_MAX set, as the rendered compose does) unless
    the test says otherwise."""
    env = {"MALLOC_ARENA_MAX": "2", **env}
    return standin.MemoryModel(role, {k: str(v) for k, v in env.items() if v is not None}, rng=random.Random(9))


def test_upstreams_settings_grow_the_api_and_the_worker_as_measured(cheap):
    tuned, untuned = model("worker"), model("worker", MALLOC_ARENA_MAX=None)
    for worker in (tuned, untuned):
        worker.start()
        worker.index(8)
    assert untuned.state()["model_mib"] - tuned.state()["model_mib"] == (
        standin.index_task_mib(8, tuned=False) - standin.index_task_mib(8)) > 200
    assert model("api", MALLOC_ARENA_MAX=None).state()["peak_mib"] == NOTES["api_peak_anon_upstream"]


def test_the_figures_are_the_measured_ones():
    figures = standin.DIFY_MEMORY
    assert figures["api_idle_anon_per_gunicorn_worker"] == NOTES["api_idle_anon_one_worker"]
    assert figures["api_peak_anon_one_worker"] == NOTES["api_peak_anon_one_worker"]
    assert figures["worker_idle_anon"] == NOTES["worker_idle_anon"]
    assert figures["beat_idle_anon"] == NOTES["beat_anon"]
    assert figures["jieba_first_index"] == NOTES["jieba"]
    assert tuple(figures["api_reload_seconds"]) == NOTES["reload_s"]
    assert figures["web_pm2_manager"] == NOTES["web_pm2_pss"]
    # derived figures land on the measured ones (within rounding of one run's numbers)
    env3 = {"SERVER_WORKER_AMOUNT": "3", "MALLOC_ARENA_MAX": "2"}
    assert abs(standin.peak_anon_mib("api", env3) - NOTES["api_peak_anon_three_workers"]) <= 3
    eight_mb = NOTES["worker_peak_rss_8mb"] - NOTES["worker_idle_rss"] - NOTES["jieba"]
    assert abs(standin.index_task_mib(8) - eight_mb) <= 3
    one_mb = (NOTES["worker_peak_rss_c8_1mb"] - NOTES["worker_idle_rss"] - NOTES["jieba"]) / 8
    assert abs(standin.index_task_mib(1) - one_mb) <= 3
    # upstream's settings: the api's and the worker's measured peaks (figures table, upstream rows)
    assert standin.peak_anon_mib("api", {}) == NOTES["api_peak_anon_upstream"]
    assert abs(NOTES["worker_idle_anon_c1"] + NOTES["jieba"] + standin.index_task_mib(8, tuned=False)
               - NOTES["worker_peak_anon_upstream_8mb"]) <= 3
    one_node = {"PM2_INSTANCES": "1"}
    assert abs(standin.peak_anon_mib("web", {**one_node, "NODE_OPTIONS": "--max-old-space-size=128 "
                                             "--max-semi-space-size=16"}) - NOTES["web_pm2_pss"]
               - NOTES["web_node_peak_bounded"]) <= 3
    assert abs(standin.peak_anon_mib("web", one_node) - NOTES["web_pm2_pss"] - NOTES["web_node_peak_unbounded"]) <= 3


@pytest.mark.parametrize("workers", [1, 2, 3, 8])
def test_the_api_starts_at_its_baseline_per_gunicorn_worker_and_grows_to_its_peak(cheap, workers):
    api = model("api", SERVER_WORKER_AMOUNT=workers)
    api.start()
    assert api.state()["model_mib"] == NOTES["api_idle_anon_one_worker"] * workers
    for _ in range(3000):
        api.request()
    peak = standin.peak_anon_mib("api", {"SERVER_WORKER_AMOUNT": str(workers), "MALLOC_ARENA_MAX": "2"})
    assert api.state()["model_mib"] == peak, "grows per request up to the measured peak, then flat"
    assert api.state()["recycles"] == 0, "no GUNICORN_CMD_ARGS: no recycling"


@pytest.mark.parametrize("role,anon", [("worker", NOTES["worker_idle_anon"]), ("beat", NOTES["beat_anon"]),
                                       ("sandbox", 0), ("plugin_daemon", 0)])
def test_other_roles_start_at_their_baseline_and_requests_do_not_grow_them(cheap, role, anon):
    m = model(role)
    m.start()
    for _ in range(50):
        m.request()
    assert m.state()["model_mib"] == anon


def test_the_model_can_be_turned_off(cheap):
    api = model("api", STANDIN_MEMORY_MODEL="off")
    api.start()
    api.request()
    assert api.state()["model_mib"] == 0 and not api.state()["enabled"]


def test_indexing_memory_is_kept_at_its_high_water_mark(cheap):
    worker = model("worker")
    worker.start()
    base = NOTES["worker_idle_anon"]
    worker.index(8)
    after_one = worker.state()["model_mib"]
    assert after_one == base + NOTES["jieba"] + standin.index_task_mib(8), "jieba once, then the document"
    worker.index(8)
    worker.index(1)
    assert worker.state()["model_mib"] == after_one, "gevent: reused, never given back, not added up"
    # two documents at once: both in flight
    threads = [threading.Thread(target=worker.index, args=(8, 0.3)) for _ in range(2)]
    for t in threads:
        t.start()
    time.sleep(0.1)
    assert worker.state()["tasks_running"] == 2
    assert not worker.wait_for_tasks(0.05), "warm shutdown waits while tasks run"
    assert worker.wait_for_tasks(5)
    for t in threads:
        t.join()
    assert worker.state()["model_mib"] == base + NOTES["jieba"] + 2 * standin.index_task_mib(8)


@pytest.mark.parametrize("args,expected", [
    ("", None),
    ("--max-requests 500 --max-requests-jitter 50", (500, 50)),
    ("--timeout 360 --max-requests=300 --max-requests-jitter=200", (300, 200)),
    ("--max-requests 1000", (1000, 0)),
    ("--max-requests 0 --max-requests-jitter 10", None),
])
def test_gunicorn_recycling_is_read_as_gunicorn_reads_it(args, expected):
    assert standin.recycling({"GUNICORN_CMD_ARGS": args}) == expected


def test_a_lone_recycled_worker_leaves_nothing_serving_for_its_reload(cheap):
    scale = 0.002  # 14-37 s -> 28-74 ms
    api = model("api", GUNICORN_CMD_ARGS="--max-requests 5", STANDIN_TIME_SCALE=scale)
    api.start()
    for _ in range(5):
        api.request()
    state = api.state()
    assert state["recycles"] == 1 and state["serving"] == 0
    assert state["model_mib"] == NOTES["api_idle_anon_one_worker"], "the new worker starts at the baseline"
    started = time.monotonic()
    api.request()  # waits in the backlog until the app has reloaded
    waited = time.monotonic() - started
    low, high = NOTES["reload_s"]
    assert low * scale * 0.9 <= waited <= high * scale + 0.5


def test_reload_time_is_the_measured_one_unless_scaled():
    rng = random.Random(1)
    samples = [standin.reload_seconds({}, rng) for _ in range(200)]
    low, high = NOTES["reload_s"]
    assert low <= min(samples) and max(samples) <= high
    assert max(standin.reload_seconds({"STANDIN_TIME_SCALE": "0.01"}, rng) for _ in range(50)) <= high * 0.01


def test_several_workers_keep_serving_while_one_reloads(cheap):
    api = model("api", SERVER_WORKER_AMOUNT=3, GUNICORN_CMD_ARGS="--max-requests 4 --max-requests-jitter 4",
                STANDIN_TIME_SCALE=100)  # reloads far longer than the test
    api.start()
    for _ in range(4):
        api.request()
    started = time.monotonic()
    while api.state()["recycles"] == 0:
        api.request()
    assert api.state()["serving"] >= 1
    assert time.monotonic() - started < 1


# ---------------------------------------------------------------------------------------------
# On the test VMs' sizes the model fits the plan's limits

INTERPRETER_MIB = 30  # CPython + the stand-in's modules, beside the model's allocations (measured below)


def test_the_interpreter_beside_the_model_is_small(tmp_path):
    """The stand-in's own RSS with the model off: what the limits must hold beside the model."""
    import os
    import socket
    import subprocess
    import sys
    import urllib.request

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "STANDIN_ROLE": "web", "STANDIN_LISTEN": "127.0.0.1", "STANDIN_PORT": str(port),
           "STANDIN_MEMORY_MODEL": "off"}
    env.pop("PYTHONPATH", None)
    process = subprocess.Popen([sys.executable, str(STANDIN)], env=env, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/debug/model", timeout=2) as answer:
                    body = answer.read().decode()
                break
            except OSError:
                assert time.monotonic() < deadline and process.poll() is None, "the stand-in did not start"
                time.sleep(0.1)
    finally:
        process.terminate()
        process.wait(timeout=10)
    rss_mib = int(re.search(r'"rss_bytes": (\d+)', body).group(1)) / 2**20
    assert rss_mib <= INTERPRETER_MIB, f"the stand-in itself takes {rss_mib:.0f} MiB"


def rendered_env(plan) -> dict[str, dict[str, str]]:
    files = {f.path: f.content for f in render_stack(plan, Secrets.generate())}
    env = dict(re.findall(r"^([A-Z_0-9]+)=(.*)$", files[".env"], re.M))
    compose = files["docker-compose.yml"]
    web = {}
    if "\n  web:\n" in compose:
        block = compose.split("\n  web:\n", 1)[1].split("\n\n", 1)[0]
        web = dict(re.findall(r'^      ([A-Z_0-9]+): "(.*)"$', block, re.M))
    return {"api": env, "worker": env, "beat": env, "web": web}


@pytest.mark.parametrize("size", [HostSize(2, 3900), HostSize(2, 4096), HostSize(4, 7900), HostSize(4, 8192),
                                  *(HostSize(*PRESETS[name]) for name in ("8C16G", "16C32G"))],
                         ids=lambda s: f"{s.cpus}C{s.memory_mib}M")
def test_the_models_peaks_fit_the_plans_limits(size):
    plan = make_plan(size)
    env = rendered_env(plan)
    limits = {name: s.mem_limit_mib for name, s in plan.services.items()}
    assert standin.peak_anon_mib("api", env["api"]) + INTERPRETER_MIB <= limits["api"]
    if "web" in limits:
        assert standin.web_bounded(env["web"]), "the rendered NODE_OPTIONS bound V8 as measured"
        assert standin.peak_anon_mib("web", env["web"]) + INTERPRETER_MIB <= limits["web"]
    if "worker_beat" in limits:
        assert standin.baseline_anon_mib("beat", env["beat"]) + INTERPRETER_MIB <= limits["worker_beat"]
    # the worker at its concurrency, every task indexing a document of the upload cap
    cap = int(env["worker"]["UPLOAD_FILE_SIZE_LIMIT"])
    concurrency = int(env["worker"]["CELERY_WORKER_AMOUNT"])
    worker_peak = (standin.baseline_anon_mib("worker", env["worker"]) + NOTES["jieba"]
                   + concurrency * standin.index_task_mib(cap))
    assert worker_peak + INTERPRETER_MIB <= limits["worker"]


# ---- documents through the broker: what the VM workload drives (issue 9, item 6) -------------

@pytest.fixture
def broker(tmp_path):
    """A real redis-server on 127.0.0.1 as the Celery broker, stopped by PID."""
    import subprocess

    import redis

    from tests.servers_helpers import free_port, require_executable
    port = free_port()
    server = subprocess.Popen([require_executable("redis-server", "redis-server"), "--port", str(port), "--bind",
                               "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(tmp_path)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/1"
    client = redis.Redis.from_url(url)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                assert time.monotonic() < deadline, "redis-server did not answer in 10 s"
                time.sleep(0.05)
        yield url, client
    finally:
        server.terminate()
        server.wait(timeout=10)


def _standin(role, broker_url, tmp_path, **env):
    import os
    import subprocess

    from tests.servers_helpers import free_port
    port = free_port()
    full = {**os.environ, "STANDIN_ROLE": role, "STANDIN_LISTEN": "127.0.0.1", "STANDIN_PORT": str(port),
            "CELERY_BROKER_URL": broker_url, "STANDIN_MEMORY_MODEL": "off", "STANDIN_TIME_SCALE": "0.01",
            **{k: str(v) for k, v in env.items()}}
    log = open(tmp_path / f"{role}-{port}.log", "w")
    process = subprocess.Popen([sys.executable, str(STANDIN)], env=full, stdout=log, stderr=log)
    deadline = time.monotonic() + 20
    while standin.check(f"http://127.0.0.1:{port}/debug/gc", timeout=1) != 0:
        assert process.poll() is None and time.monotonic() < deadline, (tmp_path / f"{role}-{port}.log").read_text()
        time.sleep(0.1)
    return process, port


def _post(port, path, body: bytes):
    import http.client
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("POST", path, body=body)
    response = conn.getresponse()
    return response.status, json.loads(response.read())


def _wait(probe, timeout_s=20):
    deadline = time.monotonic() + timeout_s
    while not probe():
        assert time.monotonic() < deadline, "not within the bound"
        time.sleep(0.05)


def test_an_upload_is_queued_on_the_broker_and_indexed_by_the_worker_and_too_large_is_413(broker, tmp_path):
    url, client = broker
    api, api_port = _standin("api", url, tmp_path, UPLOAD_FILE_SIZE_LIMIT=1)
    worker, _ = _standin("worker", url, tmp_path, CELERY_WORKER_AMOUNT=2)
    try:
        code, body = _post(api_port, "/console/api/files/upload", b"x" * (512 * 1024))
        assert code == 201 and body["size"] == 512 * 1024, body
        code, too_large = _post(api_port, "/console/api/files/upload", b"x" * (1024 * 1024 + 1))
        assert code == 413 and too_large["code"] == "file_too_large", too_large
        _wait(lambda: client.smembers(standin.INDEX_DONE) == {body["id"].encode()})
        assert client.llen(standin.INDEX_QUEUE) == 0 and client.llen(standin.INDEX_RUNNING) == 0
    finally:
        for process in (api, worker):
            process.terminate()
            process.wait(timeout=20)


def test_a_task_a_stopped_worker_had_taken_is_indexed_after_its_restart(broker, tmp_path):
    url, client = broker
    client.lpush(standin.INDEX_RUNNING, json.dumps({"id": "taken-before-a-kill", "mb": 1}))
    worker, _ = _standin("worker", url, tmp_path)
    try:
        _wait(lambda: client.sismember(standin.INDEX_DONE, "taken-before-a-kill"))
        assert client.llen(standin.INDEX_RUNNING) == 0
    finally:
        worker.terminate()
        worker.wait(timeout=20)


def test_a_warm_shutdown_finishes_the_running_task_and_acks_it(broker, tmp_path):
    url, client = broker
    worker, _ = _standin("worker", url, tmp_path, STANDIN_TIME_SCALE=1)  # 8 MB: 5 s of indexing
    client.lpush(standin.INDEX_QUEUE, json.dumps({"id": "running-at-sigterm", "mb": 8}))
    _wait(lambda: client.llen(standin.INDEX_RUNNING) == 1)
    worker.terminate()
    assert worker.wait(timeout=30) == 0
    assert client.sismember(standin.INDEX_DONE, "running-at-sigterm") and client.llen(standin.INDEX_RUNNING) == 0


def test_the_workload_drives_uploads_gets_and_a_burst_and_counts_what_failed(broker, tmp_path):
    """tests/workload.py against a local stand-in api (plain HTTP) and worker: every upload is
    accepted and indexed, the one above the cap is refused with 413, and the GETs the stand-in does
    not serve (the web's "/" on the api) are counted as failures with their path."""
    from tests import workload
    url, client = broker
    api, api_port = _standin("api", url, tmp_path, UPLOAD_FILE_SIZE_LIMIT=1)
    worker, _ = _standin("worker", url, tmp_path, CELERY_WORKER_AMOUNT=2)
    try:
        result = workload.run({"port": api_port, "tls": False, "seconds": 3, "clients": 2, "burst_clients": 4,
                               "burst_requests": 2, "upload_mb": [0.1, 0.5, 2], "upload_limit_mb": 1,
                               "timeout_s": 10})
        assert result["too_large_refused"] and result["uploads_accepted"] >= 2, result
        assert result["by_kind"]["upload"]["failed"] == 0 and result["by_kind"]["burst"]["requests"] == 8
        assert result["failed"] > 0 and {f["path"] for f in result["failures"]} == {"/"}, result["failures"]
        _wait(lambda: client.scard(standin.INDEX_DONE) == result["uploads_accepted"])
    finally:
        for process in (api, worker):
            process.terminate()
            process.wait(timeout=20)
