"""TEST STAND-IN. This is NOT Dify.

edgefit's test VMs cannot pull Dify's real images (langgenius/dify-api, dify-web,
dify-sandbox, dify-plugin-daemon). This one small program stands in for all of them so
that the stack edgefit renders can be started and checked end to end:

* it is a real CPython 3 process, started as ``python3 dify_standin.py`` WITHOUT ``-I`` or
  ``-S``, so a ``sitecustomize.py`` on ``PYTHONPATH`` (the stack mounts one at
  /opt/edgefit/python) runs at start-up exactly as it would in Dify's api and worker;
* it answers the health endpoints the upstream images answer, on the same ports;
* for the roles that talk to Postgres and Redis it reads Dify's own environment variables
  and reports, on its health endpoint, whether both really answer;
* it has debug endpoints so a test can read the GC thresholds of the serving process and
  push the container past its memory limit.

Roles (``STANDIN_ROLE``; for the api image Dify's ``MODE`` wins, as in Dify's entrypoint):

  role           listens on          health endpoint     checks DB and Redis
  api            0.0.0.0:5001        GET /health         yes (200 only when both answer)
  worker         127.0.0.1:5001      GET /health         yes (plus CELERY_BROKER_URL)
  beat           127.0.0.1:5001      GET /health         yes (plus CELERY_BROKER_URL)
  web            0.0.0.0:3000        GET /               no
  sandbox        0.0.0.0:8194        GET /health         no
  plugin_daemon  0.0.0.0:5002        GET /health/check   yes when DB_HOST is set

Every role also serves:
  GET /debug/gc                  -> {"pid", "threshold": gc.get_threshold(), ...}
  GET /debug/allocate?mib=N      -> allocates N MiB more, touching every page, and holds it
  GET /debug/release             -> drops everything allocated (and held DB connections)
  GET /debug/connect?n=N         -> opens and holds N Postgres connections (bounded by
                                    SQLALCHEMY_POOL_SIZE + SQLALCHEMY_MAX_OVERFLOW, as
                                    one Dify process's SQLAlchemy pool would be)
  GET /debug/model               -> the memory model's state (below)
  GET /debug/index?mb=N&hold=S   -> (worker) one economy-indexing task of an N MB document,
                                    running S seconds
Documents, as Dify takes them: ``POST /console/api/files/upload`` (api; the body is the document)
answers 413 ``file_too_large`` above UPLOAD_FILE_SIZE_LIMIT MB, else queues one indexing task on
the broker (CELERY_BROKER_URL, queue ``dataset``) and answers 201. The worker role takes tasks
from that queue, CELERY_WORKER_AMOUNT at a time, with late acks (a task taken by a worker that
stopped goes back to the queue at the next start), indexes each with the memory model below and
records its id in ``dataset:standin-done`` on the broker.
``ALLOCATE_MIB_AT_START=N`` allocates before serving (any role).

A memory model of Dify, not Dify: api, worker, beat and web hold the anonymous memory the real
processes were measured to hold (DIFY_MEMORY below, each figure citing its row of
../shared/notes/dify-memory.md): the baseline at start (per gunicorn worker for the api, per node
instance plus pm2 for the web), growth per request up to the measured peak (api; web, whose peak
depends on NODE_OPTIONS), the worker's growth per indexing task kept as a high-water mark (jieba
on the first), and the api's gunicorn recycling from GUNICORN_CMD_ARGS: a recycled worker serves
nothing for the measured reload time (14-37 s) times ``STANDIN_TIME_SCALE`` (default 1).
``STANDIN_MEMORY_MODEL=off`` turns the model off. SIGTERM is a warm shutdown: running indexing
tasks finish first (Celery's), and the worker role starts edgefit's memory watchdog from the
mounted sitecustomize as the real `celery worker` process does.
The api role follows Dify's rule for the first admin (api/controllers/console/init_validate.py
and setup.py): with INIT_PASSWORD set, ``POST /console/api/init {"password": ...}`` (at most 30
characters) answers 201 and marks the session (a cookie) validated, or 401 ``init_validate_failed``;
``POST /console/api/setup`` answers 401 ``not_init_validated`` for a session that is not validated,
403 ``already_setup`` once done, else 201. ``GET`` on both gives the status. The setup is kept in
memory only (Dify keeps it in Postgres).
Stand-in releases (``STANDIN_RELEASE``, set by the image's tag in tests/images/build.py), to prove
edgefit's upgrades: ``1`` (the default) migrates nothing; any other release makes the api role
migrate at start as Dify's api does (MIGRATION_ENABLED): it records the release in the table
``standin_schema`` and adds the column ``icon`` to ``standin_apps``, before it serves. A release
ending in ``-broken`` migrates the same way and then fails its health endpoint (503) for good.
``STANDIN_LISTEN`` / ``STANDIN_PORT`` override the address and port; ``STANDIN_CHECK_TIMEOUT``
(default 5 s) bounds each DB/Redis probe, and the probes run in parallel.

Only the standard library and Debian's python3-psycopg2, python3-redis and python3-psutil.
``python3 dify_standin.py check [URL]`` exits 0 when the local health endpoint says 200
(a healthcheck command for images without curl; the stand-in images do have curl).
"""

from __future__ import annotations

import gc
import json
import os
import signal
import sys
import threading
import time
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

PAGE = 4096
MIB = 1024 * 1024

# role -> (default listen address, port, health path, checks backing services)
ROLES = {
    "api": ("0.0.0.0", 5001, "/health", True),
    "worker": ("127.0.0.1", 5001, "/health", True),
    "beat": ("127.0.0.1", 5001, "/health", True),
    "web": ("0.0.0.0", 3000, "/", False),
    "sandbox": ("0.0.0.0", 8194, "/health", False),
    "plugin_daemon": ("0.0.0.0", 5002, "/health/check", True),
}

_held_memory: list[bytearray] = []
_held_connections: list = []
_held_lock = threading.Lock()
_started_at = time.time()


def resolve_role(env: dict[str, str]) -> str:
    role = env.get("STANDIN_ROLE", "api").strip().lower().replace("-", "_")
    # Dify's api image picks api/worker/beat from MODE; keep that contract for the api stand-in.
    if role == "api" and env.get("MODE", "").strip().lower() in ("api", "worker", "beat"):
        role = env["MODE"].strip().lower()
    if role not in ROLES:
        raise SystemExit(f"dify_standin: unknown role {role!r}; one of {sorted(ROLES)}")
    return role


def rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def touched(mib: int) -> bytearray:
    """mib MiB with one byte written in every page, so the kernel really backs it."""
    buf = bytearray(mib * MIB)
    # bytearray() may come from calloc'd zero pages that cost nothing until written.
    buf[::PAGE] = b"\x01" * len(range(0, len(buf), PAGE))
    return buf


def allocate(mib: int) -> int:
    """Allocate mib MiB, every page touched, and hold it."""
    buf = touched(mib)
    with _held_lock:
        _held_memory.append(buf)
        return sum(len(b) for b in _held_memory) // MIB


def release() -> None:
    with _held_lock:
        _held_memory.clear()
        conns = list(_held_connections)
        _held_connections.clear()
    for conn in conns:
        try:
            conn.close()
        except Exception:
            pass
    gc.collect()


# ---- the memory model: the real Dify's measured memory, in ONE place ----------------------
#
# Every figure the stand-in reproduces, with the row of ../shared/notes/dify-memory.md it comes
# from (Dify 1.12.1, gunicorn gevent, celery -P gevent, edgefit 2C4G/4C8G settings; MiB). The
# stand-in is a memory MODEL of Dify, not Dify: it allocates and touches this much anonymous
# memory at the moments the real processes did; it runs none of Dify's code.
DIFY_MEMORY = {
    # anonymous memory at start ("idle ... (anon)" column of the figures table)
    "api_idle_anon_per_gunicorn_worker": 336,  # api, 1 gunicorn worker: 336 (upstream and 2C4G)
    "worker_idle_anon": 320,  # worker, gevent -c 2: 320 (318 at -c 1: concurrency costs nothing idle)
    "beat_idle_anon": 314,  # beat: 314 idle and at peak
    # api growth under requests, up to the measured peak anon, then flat
    "api_peak_anon_one_worker": 572,  # api, 1 gunicorn worker, edgefit 2C4G: peak anon 572
    "api_peak_anon_per_extra_worker": 396,  # 3 workers, 4C8G: peak anon 1363 = 572 + 2 x ~396
    "api_peak_anon_one_worker_untuned": 658,  # api, 1 gunicorn worker, upstream: peak anon 658
    "api_growth_per_request": 1,  # cgroup notes: rss 318 -> 544 in 3 s after a recycle, 30 clients
    # a recycled gunicorn worker serves nothing while the app reloads
    "api_reload_seconds": (14, 37),  # "each of the 7 recycles ... left no worker serving for 14-37 s"
    # worker growth per indexing task, never given back under gevent (the high-water mark stays)
    "jieba_first_index": 220,  # "The first keyword-indexing task loads jieba's dictionary: +220, kept"
    "index_task_base": 78,  # fit through two documents: 1 MB -> ~83 ((1320-439-220)/8, -c 8 row)
    "index_task_per_mb": 4.6,  # ... and 8 MB -> ~115 (774 peak - 439 idle - 220 jieba, -c 2 row)
    # upstream's settings (no GC thresholds, no MALLOC_ARENA_MAX): the same 8 MB document took
    # 872 - 318 - 220 = 334 anon (worker, gevent -c 1, upstream row), 2.9x the tuned ~115
    "index_task_untuned_factor": 334 / 115,
    # web: pm2 manager + node instances (web table, PSS)
    "web_pm2_manager": 45,  # "The pm2 manager itself costs ~79 RSS / 45 PSS"
    "web_idle_per_instance": 111,  # node x1, old=128 + semi=16: idle 113 / 111
    "web_peak_per_instance_bounded": 290,  # node x1, old=128 + semi=16: peak 291 / 290
    "web_peak_per_instance_unbounded": 786,  # node x1, no flags: peak 789 / 786
    "web_growth_per_request": 1,  # not measured per request; reaches the peak within the wrk run
}


def index_task_mib(document_mb: float, tuned: bool = True) -> int:
    """Anonymous memory one economy-indexing task of this document takes beyond jieba."""
    tuned_mib = DIFY_MEMORY["index_task_base"] + DIFY_MEMORY["index_task_per_mb"] * document_mb
    return round(tuned_mib if tuned else tuned_mib * DIFY_MEMORY["index_task_untuned_factor"])


def tuned(env: dict[str, str]) -> bool:
    """True under edgefit's settings (MALLOC_ARENA_MAX and the GC sitecustomize come together in
    the rendered compose): the measured peaks differ from upstream's only in the api's and the
    worker's growth; the idle figures were the same."""
    return bool(env.get("MALLOC_ARENA_MAX"))


def web_bounded(env: dict[str, str]) -> bool:
    """True when NODE_OPTIONS bounds V8's heaps as measured (both flags are needed: old space
    alone did not hold memory down)."""
    options = env.get("NODE_OPTIONS", "")
    return "--max-old-space-size" in options and "--max-semi-space-size" in options


def gunicorn_workers(env: dict[str, str]) -> int:
    return max(1, int(env.get("SERVER_WORKER_AMOUNT", "1") or 1))


def pm2_instances(env: dict[str, str]) -> int:
    return max(1, int(env.get("PM2_INSTANCES", "2") or 2))  # the image's default is 2


def baseline_anon_mib(role: str, env: dict[str, str]) -> int:
    """Anonymous memory a role holds once started, as the real process did."""
    if role == "api":
        return DIFY_MEMORY["api_idle_anon_per_gunicorn_worker"] * gunicorn_workers(env)
    if role == "worker":
        return DIFY_MEMORY["worker_idle_anon"]
    if role == "beat":
        return DIFY_MEMORY["beat_idle_anon"]
    if role == "web":
        return DIFY_MEMORY["web_pm2_manager"] + DIFY_MEMORY["web_idle_per_instance"] * pm2_instances(env)
    return 0


def peak_anon_mib(role: str, env: dict[str, str]) -> int:
    """Where growth under requests stops (the measured peak); baseline for roles that do not grow."""
    if role == "api":
        extra = gunicorn_workers(env) - 1
        one = DIFY_MEMORY["api_peak_anon_one_worker" if tuned(env) else "api_peak_anon_one_worker_untuned"]
        return one + DIFY_MEMORY["api_peak_anon_per_extra_worker"] * extra
    if role == "web":
        per = DIFY_MEMORY["web_peak_per_instance_bounded" if web_bounded(env) else "web_peak_per_instance_unbounded"]
        return DIFY_MEMORY["web_pm2_manager"] + per * pm2_instances(env)
    return baseline_anon_mib(role, env)


def growth_per_request_mib(role: str) -> int:
    return {"api": DIFY_MEMORY["api_growth_per_request"], "web": DIFY_MEMORY["web_growth_per_request"]}.get(role, 0)


def recycling(env: dict[str, str]) -> tuple[int, int] | None:
    """(max_requests, jitter) from GUNICORN_CMD_ARGS as gunicorn reads them; None: no recycling."""
    args = env.get("GUNICORN_CMD_ARGS", "").split()
    values = {}
    for flag in ("--max-requests", "--max-requests-jitter"):
        for index, arg in enumerate(args):
            if arg == flag and index + 1 < len(args):
                values[flag] = int(args[index + 1])
            elif arg.startswith(flag + "="):
                values[flag] = int(arg.split("=", 1)[1])
    max_requests = values.get("--max-requests", 0)
    if max_requests <= 0:  # gunicorn: 0 disables recycling
        return None
    return max_requests, max(0, values.get("--max-requests-jitter", 0))


def reload_seconds(env: dict[str, str], rng) -> float:
    """How long a recycled api worker serves nothing: the measured 14-37 s times
    STANDIN_TIME_SCALE (default 1: the real figure; tests shrink it)."""
    low, high = DIFY_MEMORY["api_reload_seconds"]
    return rng.uniform(low, high) * float(env.get("STANDIN_TIME_SCALE", "1") or 1)


def model_enabled(env: dict[str, str]) -> bool:
    return env.get("STANDIN_MEMORY_MODEL", "dify").strip().lower() not in ("off", "0", "no", "false")


class MemoryModel:
    """The role's modelled memory: a baseline at start, growth per request up to the measured
    peak (api, web), the worker's indexing growth kept as a high-water mark (gevent never gives
    memory back), and the api's gunicorn workers, recycled after --max-requests (+ jitter) and
    serving nothing while they reload."""

    def __init__(self, role: str, env: dict[str, str], rng=None):
        import random
        self.role, self.env = role, env
        self.rng = rng or random.Random()
        self.enabled = model_enabled(env)
        self.lock = threading.Condition()
        self.chunks: list[bytearray] = []
        self.mib = 0
        self.jieba_loaded = False
        self.index_kept = 0  # high-water of indexing memory above baseline and jieba
        self.index_in_flight = 0
        self.tasks_running = 0
        self.indexed = 0
        self.workers = gunicorn_workers(env) if role == "api" else 1
        self.recycle = recycling(env) if role == "api" else None
        self.served = [0] * self.workers
        self.limit = [self._next_limit() for _ in range(self.workers)]
        self.back_at = [0.0] * self.workers
        self.grown = [0] * self.workers  # request growth held per gunicorn worker
        self.recycles = 0

    def _next_limit(self) -> int | None:
        if self.recycle is None:
            return None
        max_requests, jitter = self.recycle
        return max_requests + self.rng.randint(0, jitter)

    def _grow(self, mib: int) -> None:
        # 1 MiB pieces (glibc mmaps each), so a recycled worker's growth really goes back
        self.chunks.extend(touched(1) for _ in range(max(0, mib)))
        self.mib += max(0, mib)

    def _shrink_to(self, mib: int) -> None:
        while self.mib > max(0, mib):
            self.chunks.pop()
            self.mib -= 1

    def start(self) -> None:
        if self.enabled:
            with self.lock:
                self._grow(baseline_anon_mib(self.role, self.env))

    def request(self) -> None:
        """One request: wait for a serving gunicorn worker (the listen backlog), count it, grow."""
        if not self.enabled:
            return
        with self.lock:
            while True:
                now = time.monotonic()
                ready = [i for i in range(self.workers) if self.back_at[i] <= now]
                if ready:
                    break
                self.lock.wait(timeout=max(0.01, min(self.back_at) - now))
            slot = min(ready, key=lambda i: self.served[i])
            self.served[slot] += 1
            room = peak_anon_mib(self.role, self.env) - self.mib
            step = min(growth_per_request_mib(self.role), max(0, room))
            self._grow(step)
            self.grown[slot] += step
            if self.limit[slot] is not None and self.served[slot] >= self.limit[slot]:
                # recycled: its growth is gone, and it serves nothing until the app has reloaded
                self._shrink_to(self.mib - self.grown[slot])
                self.grown[slot] = 0
                self.served[slot] = 0
                self.limit[slot] = self._next_limit()
                self.back_at[slot] = time.monotonic() + reload_seconds(self.env, self.rng)
                self.recycles += 1

    def index(self, document_mb: float, hold_s: float = 0.0) -> dict:
        """One economy-indexing task in the worker: jieba on the first, then the document's own
        growth on top of the tasks in flight; memory is kept at its high-water mark."""
        growth = index_task_mib(document_mb, tuned(self.env))
        with self.lock:
            self.tasks_running += 1
            if self.enabled and not self.jieba_loaded:
                self._grow(DIFY_MEMORY["jieba_first_index"])
                self.jieba_loaded = True
            self.index_in_flight += growth
            if self.enabled and self.index_in_flight > self.index_kept:
                self._grow(self.index_in_flight - self.index_kept)
                self.index_kept = self.index_in_flight
        try:
            if hold_s > 0:
                time.sleep(hold_s)
        finally:
            with self.lock:
                self.index_in_flight -= growth
                self.tasks_running -= 1
                self.indexed += 1
                self.lock.notify_all()
        return {"document_mb": document_mb, "growth_mib": growth, "model_mib": self.mib}

    def wait_for_tasks(self, timeout_s: float) -> bool:
        """Celery's warm shutdown: running tasks finish before the process exits."""
        deadline = time.monotonic() + timeout_s
        with self.lock:
            while self.tasks_running:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self.lock.wait(timeout=left)
        return True

    def state(self) -> dict:
        with self.lock:
            return {"enabled": self.enabled, "model_mib": self.mib,
                    "baseline_mib": baseline_anon_mib(self.role, self.env) if self.enabled else 0,
                    "peak_mib": peak_anon_mib(self.role, self.env), "jieba_loaded": self.jieba_loaded,
                    "index_kept_mib": self.index_kept, "tasks_running": self.tasks_running,
                    "indexed": self.indexed,
                    "gunicorn_workers": self.workers, "recycles": self.recycles,
                    "serving": sum(1 for t in self.back_at if t <= time.monotonic())}


# ---- backing services, configured the way Dify reads them -------------------------------

def db_params(env: dict[str, str]) -> dict:
    return {
        "host": env.get("DB_HOST", "localhost"),
        "port": int(env.get("DB_PORT", "5432")),
        "user": env.get("DB_USERNAME", "postgres"),
        "password": env.get("DB_PASSWORD", ""),
        "dbname": env.get("DB_DATABASE", "dify"),
        "connect_timeout": int(env.get("STANDIN_CHECK_TIMEOUT", "5")),
        "application_name": "dify-standin",
    }


def pool_limit(env: dict[str, str]) -> int:
    return int(env.get("SQLALCHEMY_POOL_SIZE", "30")) + int(env.get("SQLALCHEMY_MAX_OVERFLOW", "10"))


def pg_connect(env: dict[str, str]):
    try:
        import psycopg2 as driver  # what Dify's api uses; Debian's python3-psycopg2 in the image
    except ImportError:  # running outside the image (unit tests in the project's venv)
        import psycopg as driver
    return driver.connect(**db_params(env))


def check_db(env: dict[str, str]) -> dict:
    try:
        conn = pg_connect(env)
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT 1")
                cur.fetchone()
        finally:
            conn.close()
        return {"ok": True}
    except Exception as exc:  # report, never crash the health endpoint
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}".strip()[:300]}


def _redis_ping(client) -> dict:
    try:
        client.ping()
        return {"ok": True}
    except Exception as exc:
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}".strip()[:300]}
    finally:
        try:
            client.close()
        except Exception:
            pass


def check_redis(env: dict[str, str]) -> dict:
    try:
        import redis
    except ImportError as exc:
        return {"ok": False, "error": f"ImportError: {exc}"}
    timeout = float(env.get("STANDIN_CHECK_TIMEOUT", "5"))
    client = redis.Redis(
        host=env.get("REDIS_HOST", "localhost"),
        port=int(env.get("REDIS_PORT", "6379")),
        username=env.get("REDIS_USERNAME") or None,
        password=env.get("REDIS_PASSWORD") or None,
        db=int(env.get("REDIS_DB", "0")),
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
    )
    return _redis_ping(client)


def check_broker(env: dict[str, str]) -> dict | None:
    if not env_has_broker(env):
        return None
    url = env["CELERY_BROKER_URL"]
    try:
        import redis
    except ImportError as exc:
        return {"ok": False, "error": f"ImportError: {exc}"}

    timeout = float(env.get("STANDIN_CHECK_TIMEOUT", "5"))
    return _redis_ping(redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout))


# ---- documents: uploaded to the api, indexed by the worker through the broker --------------
# Dify's api stores an uploaded document and queues its indexing on the Celery queue "dataset";
# the worker runs it. Here a task is a JSON line on a Redis list of the broker, taken with late
# acks: moved to INDEX_RUNNING while it runs and removed from there when done, so a worker stopped
# mid-task (a recycle, an OOM kill) leaves it to be queued again, as Celery's acks_late does.
INDEX_QUEUE = "dataset"
INDEX_RUNNING = "dataset:standin-running"
INDEX_DONE = "dataset:standin-done"
# NOT measured (the notes time no single task): seconds an indexing task holds its memory,
# 1 + 0.5 per MB times STANDIN_TIME_SCALE, so concurrent uploads overlap in the worker as they did.
INDEX_SECONDS_BASE, INDEX_SECONDS_PER_MB = 1.0, 0.5
UPLOAD_LIMIT_MB_DEFAULT = 15  # Dify's .env.example UPLOAD_FILE_SIZE_LIMIT


def upload_limit_mb(env: dict[str, str]) -> float:
    return float(env.get("UPLOAD_FILE_SIZE_LIMIT") or UPLOAD_LIMIT_MB_DEFAULT)


def index_seconds(env: dict[str, str], document_mb: float) -> float:
    scale = float(env.get("STANDIN_TIME_SCALE", "1") or 1)
    return (INDEX_SECONDS_BASE + INDEX_SECONDS_PER_MB * document_mb) * scale


def broker_client(env: dict[str, str], timeout: float | None = None):
    import redis
    timeout = timeout if timeout is not None else float(env.get("STANDIN_CHECK_TIMEOUT", "5"))
    return redis.Redis.from_url(env["CELERY_BROKER_URL"], socket_timeout=timeout, socket_connect_timeout=timeout)


def queue_document(env: dict[str, str], size_bytes: int) -> dict:
    """The api's half: one indexing task for a stored document, on the broker."""
    task = {"id": os.urandom(8).hex(), "mb": round(size_bytes / MIB, 3)}
    client = broker_client(env)
    try:
        client.lpush(INDEX_QUEUE, json.dumps(task))
    finally:
        client.close()
    return task


class IndexConsumer:
    """The worker's half: CELERY_WORKER_AMOUNT threads take tasks from the broker, late-acked."""

    def __init__(self, env: dict[str, str], model: MemoryModel):
        self.env, self.model = env, model
        self.stopping = threading.Event()
        self.threads = [threading.Thread(target=self._consume, daemon=True, name=f"index-{i}")
                        for i in range(max(1, int(env.get("CELERY_WORKER_AMOUNT", "1") or 1)))]

    def start(self) -> None:
        if not env_has_broker(self.env):
            return
        try:  # tasks a stopped worker had taken: back to the queue (bounded by the list's length)
            client = broker_client(self.env)
            for _ in range(client.llen(INDEX_RUNNING)):
                if client.rpoplpush(INDEX_RUNNING, INDEX_QUEUE) is None:
                    break
            client.close()
        except Exception as exc:
            print(f"dify-standin: could not requeue unacked tasks: {exc}", file=sys.stderr, flush=True)
        for thread in self.threads:
            thread.start()

    def stop(self) -> None:
        self.stopping.set()

    def join(self, timeout_s: float) -> None:
        """After the running tasks: their acks reach the broker before the process ends."""
        deadline = time.monotonic() + timeout_s
        for thread in self.threads:
            if thread.is_alive():
                thread.join(timeout=max(0.0, deadline - time.monotonic()))

    def _consume(self) -> None:
        client = None
        while not self.stopping.is_set():
            try:
                client = client or broker_client(self.env, timeout=10)
                raw = client.brpoplpush(INDEX_QUEUE, INDEX_RUNNING, timeout=1)
                if raw is None:
                    continue
                task = json.loads(raw)
                self.model.index(float(task["mb"]), index_seconds(self.env, float(task["mb"])))
                client.sadd(INDEX_DONE, task["id"])
                client.lrem(INDEX_RUNNING, 1, raw)
            except Exception as exc:  # the broker restarting: try again after a pause
                print(f"dify-standin: indexing: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
                client = None
                self.stopping.wait(2)


def env_has_broker(env: dict[str, str]) -> bool:
    return env.get("CELERY_BROKER_URL", "").startswith(("redis://", "rediss://"))


def standin_release(env: dict[str, str]) -> str:
    return env.get("STANDIN_RELEASE", "1").strip() or "1"


def migration_statements(name: str) -> list[str]:
    """The schema a stand-in release leaves, as Dify's migrations would: nothing for release 1."""
    if name == "1":
        return []
    version = int(name.split("-", 1)[0])
    return ["create table if not exists standin_schema (version integer not null)",
            "create table if not exists standin_apps (name text not null)",
            "alter table standin_apps add column if not exists icon text",
            "delete from standin_schema",
            f"insert into standin_schema values ({version})"]


def migrate(env: dict[str, str], attempts: int = 60) -> None:
    """Run this release's migration before serving (bounded: the database may still be starting)."""
    statements = migration_statements(standin_release(env))
    for attempt in range(attempts if statements else 0):
        try:
            conn = pg_connect(env)
            try:
                conn.autocommit = True
                with conn.cursor() as cursor:
                    for statement in statements:
                        cursor.execute(statement)
            finally:
                conn.close()
            print(f"dify-standin: migrated the schema to release {standin_release(env)}", file=sys.stderr, flush=True)
            return
        except Exception as exc:  # the database not up yet: try again, bounded
            if attempt == attempts - 1:
                print(f"dify-standin: migration failed: {exc}", file=sys.stderr, flush=True)
            time.sleep(2)


def health(role: str, env: dict[str, str]) -> tuple[int, dict]:
    body: dict = {"status": "ok", "role": role, "standin": True, "pid": os.getpid(), "release": standin_release(env)}
    if role == "api" and standin_release(env).endswith("-broken"):
        print("dify-standin: this release fails after its migration (a broken stand-in release)",
              file=sys.stderr, flush=True)
        return 503, {**body, "status": "unhealthy", "error": "broken release"}
    checks_services = ROLES[role][3]
    if role == "plugin_daemon" and not env.get("DB_HOST"):
        checks_services = False
    if not checks_services:
        return 200, body
    probes = {"db": check_db, "redis": check_redis}
    if role in ("api", "worker", "beat"):
        probes["broker"] = check_broker
    # In parallel: the slowest probe, not their sum, must fit a healthcheck's timeout.
    results: dict = {}
    threads = [threading.Thread(target=lambda n=n, f=f: results.__setitem__(n, f(env)), daemon=True)
               for n, f in probes.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=float(env.get("STANDIN_CHECK_TIMEOUT", "5")) + 2)
    checks = {n: results.get(n, {"ok": False, "error": "no answer in time"}) for n in probes}
    checks = {n: c for n, c in checks.items() if c is not None}  # no broker URL: no broker check
    body["checks"] = checks
    if all(c["ok"] for c in checks.values()):
        return 200, body
    body["status"] = "unhealthy"
    return 503, body


def connect_many(env: dict[str, str], n: int) -> dict:
    limit = pool_limit(env)
    opened, error = 0, None
    with _held_lock:
        want = min(n, max(0, limit - len(_held_connections)))
    for _ in range(want):
        try:
            conn = pg_connect(env)
            with conn.cursor() as cur:
                cur.execute("SELECT 1")
            with _held_lock:
                _held_connections.append(conn)
            opened += 1
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}".strip()[:300]
            break
    with _held_lock:
        held = len(_held_connections)
    return {"requested": n, "opened": opened, "held": held, "pool_limit": limit, "error": error}


# ---- HTTP ---------------------------------------------------------------------------------

INIT_PASSWORD_MAX_LENGTH = 30  # Dify's InitValidatePayload: password max_length=30


class SetupState:
    """Dify's first-admin gate, as the api answers it (in memory; Dify keeps it in Postgres)."""

    def __init__(self, init_password: str | None):
        self.init_password = init_password or None
        self.validated_sessions: set[str] = set()
        self.setup_at: float | None = None
        self.lock = threading.Lock()

    @staticmethod
    def _error(code: int, error_code: str, message: str) -> tuple[int, dict, str | None]:
        return code, {"code": error_code, "message": message, "status": code}, None

    def init_status(self, session: str | None) -> dict:
        done = self.init_password is None or self.setup_at is not None or session in self.validated_sessions
        return {"status": "finished" if done else "not_started"}

    def validate(self, payload: dict) -> tuple[int, dict, str | None]:
        """POST /console/api/init -> (status, body, new session cookie or None)."""
        if self.setup_at is not None:
            return self._error(403, "already_setup", "Dify has been successfully installed.")
        password = payload.get("password")
        if not isinstance(password, str) or len(password) > INIT_PASSWORD_MAX_LENGTH:
            return self._error(400, "invalid_param", "password: at most 30 characters")
        if password != self.init_password:  # Dify: compared with os.environ["INIT_PASSWORD"]
            return self._error(401, "init_validate_failed",
                               "Init validation failed. Please check the password and try again.")
        session = os.urandom(16).hex()
        with self.lock:
            self.validated_sessions.add(session)
        return 201, {"result": "success"}, session

    def setup(self, session: str | None, payload: dict) -> tuple[int, dict, str | None]:
        """POST /console/api/setup: only for a validated session while no admin exists."""
        with self.lock:
            if self.setup_at is not None:
                return self._error(403, "already_setup", "Dify has been successfully installed.")
            if self.init_password and session not in self.validated_sessions:
                return self._error(401, "not_init_validated",
                                   "Init validation has not been completed yet. "
                                   "Please proceed with the init validation process first.")
            if not all(isinstance(payload.get(key), str) and payload[key] for key in ("email", "name", "password")):
                return self._error(400, "invalid_param", "email, name and password are required")
            self.setup_at = time.time()
        return 201, {"result": "success"}, None

    def setup_status(self) -> dict:
        if self.setup_at is None:
            return {"step": "not_started"}
        return {"step": "finished", "setup_at": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(self.setup_at))}


def make_handler(role: str, env: dict[str, str], model: MemoryModel | None = None):
    health_path = ROLES[role][2]
    model = model or MemoryModel(role, {**env, "STANDIN_MEMORY_MODEL": "off"})
    gate = SetupState(env.get("INIT_PASSWORD"))

    class Handler(BaseHTTPRequestHandler):
        server_version = "dify-standin/1"

        def log_message(self, fmt, *args):  # one line per request on stderr, like a server log
            sys.stderr.write(f"[{role}] {self.address_string()} {fmt % args}\n")

        def _send(self, code: int, body, content_type="application/json", cookie: str | None = None):
            data = body if isinstance(body, bytes) else (json.dumps(body) + "\n").encode()
            self.send_response(code)
            if cookie:
                self.send_header("Set-Cookie", f"session={cookie}; Path=/; HttpOnly; SameSite=Lax")
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

        def do_HEAD(self):
            self.do_GET()

        def _session(self) -> str | None:
            for part in (self.headers.get("Cookie") or "").split(";"):
                key, _, value = part.strip().partition("=")
                if key == "session" and value:
                    return value
            return None

        def _upload(self):
            """Dify's document upload: the body is the document; too large -> 413."""
            model.request()
            length = int(self.headers.get("Content-Length") or 0)
            left = length
            while left > 0:  # read it all (nginx has already buffered it), keep nothing
                chunk = self.rfile.read(min(left, 1 << 20))
                if not chunk:
                    break
                left -= len(chunk)
            if length > upload_limit_mb(env) * MIB:
                return self._send(413, {"code": "file_too_large", "status": 413,
                                        "message": f"File size exceeded. {length} > {upload_limit_mb(env):g} MB"})
            if length <= 0 or left > 0:
                return self._send(400, {"code": "no_file_uploaded", "status": 400, "message": "empty or cut short"})
            try:
                task = queue_document(env, length)
            except Exception as exc:
                return self._send(503, {"code": "broker_unavailable", "status": 503, "message": str(exc)[:200]})
            return self._send(201, {"id": task["id"], "size": length, "indexing": "queued"})

        def do_POST(self):
            path = urllib.parse.urlsplit(self.path).path
            if role == "api" and path == "/console/api/files/upload":
                return self._upload()
            if role != "api" or path not in ("/console/api/init", "/console/api/setup"):
                return self._send(404, {"error": "not found", "path": path, "standin": True})
            length = min(int(self.headers.get("Content-Length") or 0), 65536)
            try:
                payload = json.loads(self.rfile.read(length) or b"{}")
            except ValueError:
                payload = None
            if not isinstance(payload, dict):
                return self._send(400, {"code": "invalid_param", "message": "a JSON object is expected", "status": 400})
            if path == "/console/api/init":
                code, body, cookie = gate.validate(payload)
            else:
                code, body, cookie = gate.setup(self._session(), payload)
            return self._send(code, body, cookie=cookie)

        def do_GET(self):
            url = urllib.parse.urlsplit(self.path)
            query = urllib.parse.parse_qs(url.query)
            path = url.path
            if not path.startswith("/debug/"):  # Dify's traffic, not the tests' instruments
                model.request()
            if path == health_path or (path == "/health" and role != "web"):
                if role == "web" and path == "/":
                    return self._send(200, b"<!doctype html><title>dify-web stand-in (NOT Dify)</title>\n",
                                      "text/html; charset=utf-8")
                code, body = health(role, env)
                if role == "plugin_daemon":
                    body = {"code": 0 if code == 200 else -1, "message": body["status"], "data": body}
                return self._send(code, body)
            if role == "api" and path == "/console/api/init":
                return self._send(200, gate.init_status(self._session()))
            if role == "api" and path == "/console/api/setup":
                return self._send(200, gate.setup_status())
            if path == "/debug/gc":
                site = sys.modules.get("sitecustomize")
                return self._send(200, {
                    "pid": os.getpid(),
                    "role": role,
                    "threshold": list(gc.get_threshold()),
                    "sitecustomize": getattr(site, "__file__", None),
                    "python": sys.version.split()[0],
                    "flags": {"isolated": sys.flags.isolated, "no_site": sys.flags.no_site},
                    "rss_bytes": rss_bytes(),
                })
            if path == "/debug/allocate":
                try:
                    mib = int(query.get("mib", ["0"])[0])
                except ValueError:
                    return self._send(400, {"error": "mib must be an integer"})
                if mib < 0 or mib > 65536:
                    return self._send(400, {"error": "mib out of range 0..65536"})
                held = allocate(mib) if mib else sum(len(b) for b in _held_memory) // MIB
                return self._send(200, {"pid": os.getpid(), "held_mib": held, "rss_bytes": rss_bytes()})
            if path == "/debug/model":
                return self._send(200, {"pid": os.getpid(), "role": role, **model.state(),
                                        "rss_bytes": rss_bytes()})
            if path == "/debug/index" and role == "worker":
                try:
                    mb = float(query.get("mb", ["1"])[0])
                    hold = float(query.get("hold", ["0"])[0])
                except ValueError:
                    return self._send(400, {"error": "mb and hold must be numbers"})
                if not 0 < mb <= 1024 or not 0 <= hold <= 3600:
                    return self._send(400, {"error": "mb out of range (0, 1024] or hold out of [0, 3600]"})
                return self._send(200, {"pid": os.getpid(), **model.index(mb, hold)})
            if path == "/debug/release":
                release()
                return self._send(200, {"pid": os.getpid(), "held_mib": 0, "rss_bytes": rss_bytes()})
            if path == "/debug/connect":
                try:
                    n = int(query.get("n", ["1"])[0])
                except ValueError:
                    return self._send(400, {"error": "n must be an integer"})
                return self._send(200, connect_many(env, max(0, n)))
            return self._send(404, {"error": "not found", "path": path, "standin": True})

    return Handler


def check(url: str, timeout: float = 5.0) -> int:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return 0 if resp.status == 200 else 1
    except Exception as exc:
        print(f"unhealthy: {exc}", file=sys.stderr)
        return 1


def serve(env: dict[str, str]) -> None:
    role = resolve_role(env)
    listen, port, health_path, _ = ROLES[role]
    listen = env.get("STANDIN_LISTEN", listen)
    port = int(env.get("STANDIN_PORT", port))
    if int(env.get("ALLOCATE_MIB_AT_START", "0") or 0) > 0:
        allocate(int(env["ALLOCATE_MIB_AT_START"]))
    if role == "api":
        migrate(env)
    model = MemoryModel(role, env)
    model.start()  # the anonymous memory the real process holds once started
    if role == "worker":
        # Stands in for `celery worker`: edgefit's sitecustomize starts its memory watchdog in
        # that process only, so the stand-in asks for it the same way.
        site = sys.modules.get("sitecustomize")
        if hasattr(site, "start_worker_watchdog"):
            site.start_worker_watchdog()
    consumer = IndexConsumer(env, model) if role == "worker" else None
    if consumer:
        consumer.start()
    httpd = ThreadingHTTPServer((listen, port), make_handler(role, env, model))
    httpd.daemon_threads = True

    def stop(signum, frame):
        if consumer:  # take no new task; the running ones finish below (warm shutdown)
            consumer.stop()
        # shutdown() blocks until serve_forever returns: call it from another thread.
        threading.Thread(target=httpd.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print(f"dify-standin (NOT Dify) role={role} pid={os.getpid()} listening on {listen}:{port} "
          f"health={health_path} gc_threshold={gc.get_threshold()} memory model "
          f"{model.state()['model_mib']} MiB", file=sys.stderr, flush=True)
    try:
        httpd.serve_forever(poll_interval=0.5)
    finally:
        httpd.server_close()
        # Celery's warm shutdown: running (indexing) tasks finish before the process exits.
        if not model.wait_for_tasks(float(env.get("STANDIN_WARM_SHUTDOWN_S", "600"))):
            print("dify-standin: warm shutdown timed out with tasks running", file=sys.stderr, flush=True)
        if consumer:
            consumer.join(15)


def main(argv: list[str]) -> int:
    env = dict(os.environ)
    if argv[1:2] == ["check"]:
        role = resolve_role(env)
        _, port, health_path, _ = ROLES[role]
        port = int(env.get("STANDIN_PORT", port))
        return check(argv[2] if len(argv) > 2 else f"http://127.0.0.1:{port}{health_path}")
    serve(env)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
