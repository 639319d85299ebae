"""Golden files: every file `render` writes for each preset (and a few service sets), rendered
with fixed fake secrets and compared byte for byte with tests/golden/<case>/.

A template or plan change shows up here as a reviewable diff. When the change is intended:

    EDGEFIT_UPDATE_GOLDEN=1 .venv/bin/pytest tests/test_golden.py
    git diff tests/golden        # review, then commit with the change

Below the golden cases, the rendered files are checked against the plan for many host sizes:
whatever the templates look like, they must carry the plan's numbers.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgefit.plan import PRESETS, VECTOR_STORES, HostSize, Options, make_plan, minimum_host_mib, plan_services
from edgefit.render import render_stack, write_stack
from edgefit.secrets import Secrets

GOLDEN = Path(__file__).resolve().parent / "golden"
UPDATE = os.environ.get("EDGEFIT_UPDATE_GOLDEN") == "1"
HOW_TO_UPDATE = ("If the change is intended, rewrite the golden copies with\n"
                 "    EDGEFIT_UPDATE_GOLDEN=1 .venv/bin/pytest tests/test_golden.py\n"
                 "and review `git diff tests/golden` before committing them.")

# Obviously fake, fixed values: the golden .env/userlist/redis confs must never hold real ones.
TEST_SECRETS = Secrets(**{
    field.name: f"test-{field.name.replace('_', '-')}-000000000000000000"
    for field in dataclasses.fields(Secrets)
})

LEAN = frozenset({"worker_beat", "web", "sandbox", "plugin_daemon", "ssrf_proxy"})
CASES: dict[str, tuple[HostSize, Options]] = {
    **{name: (HostSize(cores, memory), Options()) for name, (cores, memory) in PRESETS.items()},
    "2C4G-lean": (HostSize(2, 4096), Options(without=LEAN)),
    "4C8G-weaviate-disk40": (HostSize(4, 8192, 40), Options(vector_store="weaviate")),
    "8C16G-qdrant-without-plugin_daemon": (HostSize(8, 16384),
                                           Options(vector_store="qdrant", without=frozenset({"plugin_daemon"}))),
}


def render_to(out: Path, size: HostSize, options: Options) -> dict[str, bytes]:
    """Render as `edgefit render` does (write_stack, real files) and read the bytes back."""
    write_stack(render_stack(make_plan(size, options), TEST_SECRETS), out)
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def golden_tree(case: str) -> dict[str, bytes]:
    root = GOLDEN / case
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def write_golden(case: str, files: dict[str, bytes]) -> None:
    root = GOLDEN / case
    shutil.rmtree(root, ignore_errors=True)
    for relative, content in files.items():
        target = root / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(content)


def describe_differences(case: str, got: dict[str, bytes], want: dict[str, bytes]) -> str:
    report = []
    for relative in sorted(set(want) - set(got)):
        report.append(f"{relative}: in tests/golden/{case} but no longer rendered")
    for relative in sorted(set(got) - set(want)):
        report.append(f"{relative}: rendered but has no golden copy")
    for relative in sorted(set(got) & set(want)):
        if got[relative] != want[relative]:
            diff = list(difflib.unified_diff(
                want[relative].decode(errors="replace").splitlines(),
                got[relative].decode(errors="replace").splitlines(),
                f"golden/{case}/{relative}", f"rendered/{relative}", lineterm="", n=1))
            shown = diff[:40] + ([f"... {len(diff) - 40} more diff lines"] if len(diff) > 40 else [])
            report.append("\n".join(shown) if shown else f"{relative}: differs (whitespace or encoding)")
    return "\n".join(report)


@pytest.mark.parametrize("case", sorted(CASES))
def test_rendered_files_match_golden(case, tmp_path):
    size, options = CASES[case]
    got = render_to(tmp_path, size, options)
    if UPDATE:
        write_golden(case, got)
    want = golden_tree(case)
    assert want, f"tests/golden/{case}/ is missing.\n{HOW_TO_UPDATE}"
    if got != want:
        pytest.fail(f"rendered files for {case} differ from tests/golden/{case}:\n"
                    f"{describe_differences(case, got, want)}\n\n{HOW_TO_UPDATE}", pytrace=False)


def test_no_stale_golden_cases():
    present = {p.name for p in GOLDEN.iterdir() if p.is_dir()} if GOLDEN.exists() else set()
    stale = present - set(CASES)
    if UPDATE:
        for name in stale:
            shutil.rmtree(GOLDEN / name)
        stale = set()
    assert not stale, f"tests/golden holds cases no test renders: {sorted(stale)}.\n{HOW_TO_UPDATE}"


def test_golden_files_hold_only_the_fake_secrets():
    """The golden copies are committed: they must carry the fixed test values and nothing that
    looks like a generated secret (token_urlsafe(32) is 43 characters)."""
    fake = {getattr(TEST_SECRETS, f.name) for f in dataclasses.fields(Secrets)}
    for case in CASES:
        env = (GOLDEN / case / ".env").read_text()
        keys = dict(line.split("=", 1) for line in env.splitlines() if re.match(r"^[A-Z_]+=", line))
        assert keys["SECRET_KEY"] == TEST_SECRETS.secret_key
        for key in ("SECRET_KEY", "DB_PASSWORD", "REDIS_PASSWORD", "PLUGIN_DAEMON_KEY", "SANDBOX_API_KEY"):
            assert keys[key] in fake, f"{case}/.env {key} is not a test value"
        for path in (GOLDEN / case).rglob("*"):
            if path.is_file():
                assert not re.search(r"(?<![\w-])[A-Za-z0-9_-]{43}(?![\w-])", path.read_text()), \
                    f"{path} holds something shaped like a generated secret"


# ---------------------------------------------------------------------------------------------
# The rendered files carry the plan's numbers, for any host size


@st.composite
def hosts(draw):
    options = Options(vector_store=draw(st.sampled_from(VECTOR_STORES)),
                      without=draw(st.sampled_from([frozenset(), LEAN, frozenset({"plugin_daemon"}),
                                                    frozenset({"web", "worker_beat"})])))
    minimum = minimum_host_mib(plan_services(options))
    memory = draw(st.one_of(st.integers(minimum, minimum + 8192), st.integers(minimum, 256 * 1024)))
    disk = draw(st.none() | st.integers(20, 2000))
    return HostSize(draw(st.integers(1, 64)), memory, disk), options


def setting(text: str, key: str, sep: str = r"\s*=\s*") -> str:
    match = re.search(rf"^{re.escape(key)}{sep}(.*?)\s*$", text, re.M)
    assert match, f"{key} not set"
    return match.group(1)


def compose_blocks(compose: str) -> dict[str, str]:
    body = compose.split("\nservices:\n", 1)[1].split("\nnetworks:", 1)[0]
    blocks = {}
    for block in re.split(r"\n(?=  [a-z_]+:\n)", "\n" + body):
        head = re.match(r"\n?  ([a-z_]+):\n", block)
        if head:
            blocks[head.group(1)] = block
    return blocks


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(hosts())
def test_rendered_files_carry_the_plan(case):
    size, options = case
    plan = make_plan(size, options)
    files = {f.path: f.content for f in render_stack(plan, TEST_SECRETS)}

    blocks = compose_blocks(files["docker-compose.yml"])
    assert set(blocks) == set(plan.services)
    for name, service in plan.services.items():
        block = blocks[name]
        assert setting(block, "    mem_limit", ": ") == f"{service.mem_limit_mib}m"
        assert setting(block, "    memswap_limit", ": ") == f"{service.mem_limit_mib}m", "no swap past the limit"
        assert float(setting(block, "    cpus", ": ")) == service.cpus
        assert f"image: {service.image}\n" in block
    assert f"nofile: {{soft: {plan.pgbouncer.nofile_limit}, hard: {plan.pgbouncer.nofile_limit}}}" in blocks["pgbouncer"]
    for role in ("api", "worker"):
        pool = plan.dify.pools[role]
        assert f'SQLALCHEMY_POOL_SIZE: "{pool.pool_size}"' in blocks[role]
        assert f'SQLALCHEMY_MAX_OVERFLOW: "{pool.max_overflow}"' in blocks[role]
    # the watchdog's threshold reaches the worker, and only the worker
    assert setting(blocks["worker"], "      EDGEFIT_WORKER_RESTART_ANON_MIB", ": ") == f'"{plan.dify.worker_restart_anon_mib}"'
    assert "EDGEFIT_WORKER_RESTART_ANON_MIB" not in blocks["api"]
    if "web" in blocks:
        assert setting(blocks["web"], "      NODE_OPTIONS", ": ") == f'"{plan.dify.web_node_options}"'
        assert setting(blocks["web"], "      PM2_INSTANCES", ": ") == f'"{plan.dify.web_pm2_instances}"'

    for path, redis in (("conf/redis/redis.conf", plan.redis), ("conf/redis-broker/redis.conf", plan.redis_broker)):
        conf = files[path]
        assert setting(conf, "maxmemory", " ") == f"{redis.maxmemory_mib}mb"
        assert setting(conf, "maxmemory-policy", " ") == redis.maxmemory_policy
    assert setting(files["conf/redis-broker/redis.conf"], "maxmemory-policy", " ") == "noeviction"

    ini = files["conf/pgbouncer/pgbouncer.ini"]
    assert setting(ini, "pool_mode") == "transaction"
    for key in ("max_client_conn", "default_pool_size", "reserve_pool_size", "max_db_connections"):
        assert setting(ini, key) == str(getattr(plan.pgbouncer, key))

    pg = files["conf/postgres/postgresql.conf"]
    assert setting(pg, "max_connections") == str(plan.postgres.max_connections)
    assert setting(pg, "shared_buffers") == f"{plan.postgres.shared_buffers_mib}MB"
    assert setting(pg, "effective_cache_size") == f"{plan.postgres.effective_cache_size_mib}MB"
    assert setting(pg, "work_mem") == f"{plan.postgres.work_mem_mib}MB"
    assert setting(pg, "maintenance_work_mem") == f"{plan.postgres.maintenance_work_mem_mib}MB"
    assert setting(pg, "huge_pages") == plan.postgres.huge_pages
    assert setting(pg, "max_parallel_workers_per_gather") == str(plan.postgres.max_parallel_workers_per_gather)

    env = files[".env"]
    assert setting(env, "SERVER_WORKER_AMOUNT", "=") == str(plan.dify.server_worker_amount)
    assert setting(env, "CELERY_WORKER_AMOUNT", "=") == str(plan.dify.celery_worker_amount)
    assert setting(env, "GRAPH_ENGINE_MAX_WORKERS", "=") == str(plan.dify.graph_engine_max_workers)
    assert setting(env, "UPLOAD_FILE_SIZE_LIMIT", "=") == str(plan.dify.upload_file_size_limit_mb)
    if plan.dify.gunicorn_cmd_args:
        assert setting(env, "GUNICORN_CMD_ARGS", "=") == plan.dify.gunicorn_cmd_args
    else:
        assert not re.search(r"^GUNICORN_CMD_ARGS", env, re.M), "no recycling: gunicorn gets no such line"
    assert setting(env, "VECTOR_STORE", "=") == plan.vector_store
    assert setting(env, "REDIS_HOST", "=") == "redis"
    assert "@redis_broker:" in setting(env, "CELERY_BROKER_URL", "="), "the broker is its own instance"
    assert setting(env, "DB_HOST", "=") == "pgbouncer"
    if plan.vector_store == "pgvector":
        assert setting(env, "PGVECTOR_MAX_CONNECTION", "=") == str(plan.dify.pgvector_max_connection)
