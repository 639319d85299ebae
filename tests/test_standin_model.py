"""The stand-in's memory model of Dify (tests/images/standin/dify_standin.py, DIFY_MEMORY).

The VM tests run this model, not Dify, so its figures must stay the measured ones
(../shared/notes/dify-memory.md) and its behaviour must be the measured behaviour: baselines per
role, growth up to the measured peaks, indexing memory kept under gevent, recycled gunicorn
workers that serve nothing while they reload. And on the test VMs' sizes, everything it
allocates must fit the plan's limits, or the VM tests would test the model's OOM kills.
"""

from __future__ import annotations

import importlib.util
import random
import re
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
    "beat_anon": 314,  # beat, idle and peak (anon)
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
    return standin.MemoryModel(role, {k: str(v) for k, v in env.items()}, rng=random.Random(9))


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
    env3 = {"SERVER_WORKER_AMOUNT": "3"}
    assert abs(standin.peak_anon_mib("api", env3) - NOTES["api_peak_anon_three_workers"]) <= 3
    eight_mb = NOTES["worker_peak_rss_8mb"] - NOTES["worker_idle_rss"] - NOTES["jieba"]
    assert abs(standin.index_task_mib(8) - eight_mb) <= 3
    one_mb = (NOTES["worker_peak_rss_c8_1mb"] - NOTES["worker_idle_rss"] - NOTES["jieba"]) / 8
    assert abs(standin.index_task_mib(1) - one_mb) <= 3
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
    peak = standin.peak_anon_mib("api", {"SERVER_WORKER_AMOUNT": str(workers)})
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
