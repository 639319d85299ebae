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
``ALLOCATE_MIB_AT_START=N`` allocates before serving (any role).
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


def allocate(mib: int) -> int:
    """Allocate mib MiB and write one byte in every page so the kernel really backs it."""
    buf = bytearray(mib * MIB)
    # bytearray() may come from calloc'd zero pages that cost nothing until written.
    buf[::PAGE] = b"\x01" * len(range(0, len(buf), PAGE))
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
    url = env.get("CELERY_BROKER_URL", "")
    if not url.startswith(("redis://", "rediss://")):
        return None
    try:
        import redis
    except ImportError as exc:
        return {"ok": False, "error": f"ImportError: {exc}"}

    timeout = float(env.get("STANDIN_CHECK_TIMEOUT", "5"))
    return _redis_ping(redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout))


def health(role: str, env: dict[str, str]) -> tuple[int, dict]:
    body: dict = {"status": "ok", "role": role, "standin": True, "pid": os.getpid()}
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

def make_handler(role: str, env: dict[str, str]):
    health_path = ROLES[role][2]

    class Handler(BaseHTTPRequestHandler):
        server_version = "dify-standin/1"

        def log_message(self, fmt, *args):  # one line per request on stderr, like a server log
            sys.stderr.write(f"[{role}] {self.address_string()} {fmt % args}\n")

        def _send(self, code: int, body, content_type="application/json"):
            data = body if isinstance(body, bytes) else (json.dumps(body) + "\n").encode()
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

        def do_HEAD(self):
            self.do_GET()

        def do_GET(self):
            url = urllib.parse.urlsplit(self.path)
            query = urllib.parse.parse_qs(url.query)
            path = url.path
            if path == health_path or (path == "/health" and role != "web"):
                if role == "web" and path == "/":
                    return self._send(200, b"<!doctype html><title>dify-web stand-in (NOT Dify)</title>\n",
                                      "text/html; charset=utf-8")
                code, body = health(role, env)
                if role == "plugin_daemon":
                    body = {"code": 0 if code == 200 else -1, "message": body["status"], "data": body}
                return self._send(code, body)
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
    httpd = ThreadingHTTPServer((listen, port), make_handler(role, env))
    httpd.daemon_threads = True

    def stop(signum, frame):
        # shutdown() blocks until serve_forever returns: call it from another thread.
        threading.Thread(target=httpd.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print(f"dify-standin (NOT Dify) role={role} pid={os.getpid()} listening on {listen}:{port} "
          f"health={health_path} gc_threshold={gc.get_threshold()}", file=sys.stderr, flush=True)
    try:
        httpd.serve_forever(poll_interval=0.5)
    finally:
        httpd.server_close()


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
