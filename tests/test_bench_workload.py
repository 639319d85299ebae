"""bench/workload.py's upstream-like stack, made from a rendered edgefit stack by the real Compose v2
binary (no engine needed for `config`): what it changes is what Dify's own compose does."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from servers_helpers import base_env, compose_binary

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench.workload import UPSTREAM_LIKE  # noqa: E402


def test_the_upstream_like_stack_has_no_limits_30_10_pools_straight_to_postgres_and_one_redis(tmp_path):
    stack = tmp_path / "stack"
    rendered = subprocess.run([sys.executable, "-m", "edgefit", "render", "--preset", "2C4G", "--out", str(stack)],
                              capture_output=True, text=True, timeout=60, cwd=REPO)
    assert rendered.returncode == 0, rendered.stderr
    compose = compose_binary()
    out = stack / "docker-compose.upstream.json"
    made = subprocess.run([sys.executable, "-c", UPSTREAM_LIKE, str(stack), str(out), compose],
                          capture_output=True, text=True, timeout=120, env=base_env(stack))
    assert made.returncode == 0, made.stderr
    assert oct(out.stat().st_mode & 0o777) == "0o600"
    resolved = subprocess.run([compose, "--project-directory", str(stack), "-f", str(out), "config", "--format", "json"],
                              capture_output=True, text=True, timeout=60, env=base_env(stack))
    assert resolved.returncode == 0, resolved.stderr
    services = json.loads(resolved.stdout)["services"]
    assert "pgbouncer" not in services and "redis_broker" not in services
    assert not any(key in service for service in services.values() for key in ("mem_limit", "memswap_limit", "cpus"))
    for name in ("api", "worker"):
        env = services[name]["environment"]
        assert (env["SQLALCHEMY_POOL_SIZE"], env["SQLALCHEMY_MAX_OVERFLOW"], env["DB_HOST"], env["DB_PORT"]) == \
            ("30", "10", "db", "5432")
        assert env["CELERY_BROKER_URL"].startswith("redis://:") and env["CELERY_BROKER_URL"].endswith("@redis:6379/1")
        assert not env["MALLOC_ARENA_MAX"] and not env["PYTHONPATH"] and not env["GUNICORN_CMD_ARGS"]
        assert "pgbouncer" not in services[name].get("depends_on", {}) and "db" in services[name]["depends_on"]
    assert not any("maxmemory" in part or part.endswith(".conf") for part in services["redis"]["command"])
    assert "max_connections=100" in services["db"]["command"]
