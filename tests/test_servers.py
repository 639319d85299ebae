"""The rendered configs, run by the real servers (issue 2, "How it is proven").

redis-server, postgres and pgbouncer from the Debian packages (Redis 7.0, PostgreSQL 15,
PgBouncer 1.18) are started with the files `render_stack` writes for each preset, and asked
what they are running with. The files are written for containers; `relocate` changes only the
lines that place a server on this machine (ports, listen addresses, the `db` host name, data
and auth-file paths), asserts each of those lines was there, and keeps every tuned line as
rendered. Expected values come from the plan object, never from literals here.

Servers listen on 127.0.0.1 only, on free ports, in temporary directories, and are stopped by
their PIDs in the fixtures' teardown, also when a test fails.
"""

from __future__ import annotations

import re
import resource
import signal
import subprocess
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from edgefit.plan import PRESETS, Plan, RedisPlan
from edgefit.secrets import Secrets
from servers_helpers import (
    PGBENCH_MODES,
    Server,
    base_env,
    free_port,
    parse_env,
    pg_size_kib,
    pgbench_numbers,
    postgres_programs,
    preset_plan,
    relocate,
    render_files,
    require_executable,
    require_module,
    run_checked,
    server_dir,
    service_user,
    url_password,
    write_file,
)

pytestmark = pytest.mark.servers

START_TIMEOUT_S = 30  # every server here is up in well under a second; CI hosts are slow
PGBENCH_SECONDS = 2
# Through PgBouncer: transactions per client (about 2 s each on this machine), not a duration. With
# -T 2 on a loaded machine the 143 clients' SCRAM logins took the whole 2 s and 0 were processed.
PGBENCH_TRANSACTIONS = {"select-only": 300, "tpc-b": 15}
SMALLEST = min(PRESETS, key=lambda name: PRESETS[name][1])


# =============================================================================================
# Redis: the cache and the broker instance

REDIS_INSTANCES = {  # role -> (rendered file, the plan's field)
    "cache": ("conf/redis/redis.conf", "redis"),
    "broker": ("conf/redis-broker/redis.conf", "redis_broker"),
}


@dataclass
class RedisUnderTest:
    preset: str
    role: str
    planned: RedisPlan
    port: int
    client_password: str  # what Dify's clients are given in the rendered .env
    server: Server

    def client(self, **kwargs):
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry
        # No retries: redis-py counts an authentication error as a connection error and would
        # retry it with backoff, which only slows down the refusals tested below.
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5,
                           retry=Retry(NoBackoff(), 0), **kwargs)

    def authed(self):
        return self.client(password=self.client_password)


def redis_client_password(env: dict[str, str], role: str) -> str:
    """The password Dify's clients use: REDIS_PASSWORD for the cache (REDIS_HOST), the one in
    CELERY_BROKER_URL for the broker."""
    if role == "cache":
        return env["REDIS_PASSWORD"]
    return url_password(env["CELERY_BROKER_URL"])


@contextmanager
def running_redis(preset: str, role: str):
    """redis-server running the rendered file of `role` for `preset`."""
    require_module("redis", "redis")
    binary = require_executable("redis-server", "redis-server")
    plan = preset_plan(preset)
    files = render_files(plan, Secrets.generate())
    path, field = REDIS_INSTANCES[role]
    password = redis_client_password(parse_env(files[".env"].content), role)
    port = free_port()
    with server_dir(f"redis-{role}", None) as tmp:
        conf = relocate(files[path].content, path, {
            "bind 0.0.0.0": "bind 127.0.0.1",
            "port 6379": f"port {port}",
            "dir /data": f"dir {tmp}",
        })
        conf_path = write_file(tmp / "redis.conf", conf, files[path].mode, None)
        server = Server(f"redis-{role}", [binary, str(conf_path)], workdir=tmp, env=base_env(tmp))
        under_test = RedisUnderTest(preset, role, getattr(plan, field), port, password, server)
        with server.running(lambda: under_test.authed().ping(), timeout=START_TIMEOUT_S,
                            what=f"redis {role} on port {port}"):
            yield under_test


@pytest.fixture(scope="module", params=[(p, r) for p in PRESETS for r in REDIS_INSTANCES],
                ids=lambda param: f"{param[0]}-{param[1]}")
def redis_server(request):
    preset, role = request.param
    with running_redis(preset, role) as under_test:
        yield under_test


def test_redis_runs_the_planned_maxmemory_and_policy(redis_server):
    client = redis_server.authed()
    planned = redis_server.planned
    assert int(client.config_get("maxmemory")["maxmemory"]) == planned.maxmemory_mib * 1024 * 1024
    assert client.config_get("maxmemory-policy")["maxmemory-policy"] == planned.maxmemory_policy
    assert client.config_get("appendonly")["appendonly"] == ("yes" if planned.appendonly else "no")
    # The two instances differ where the notes say they must (measured: allkeys-lru loses
    # Celery's queue and binding keys).
    expected_policy = "allkeys-lru" if redis_server.role == "cache" else "noeviction"
    assert planned.maxmemory_policy == expected_policy


def test_redis_requires_the_rendered_password(redis_server):
    import redis
    assert redis_server.authed().ping() is True
    with pytest.raises(redis.AuthenticationError):
        redis_server.client().ping()  # no AUTH: NOAUTH
    with pytest.raises(redis.AuthenticationError):
        redis_server.client(password=redis_server.client_password + "x").ping()
    # Listening on loopback only, as relocated; the rendered bind line was the only change.
    assert redis_server.authed().config_get("bind")["bind"] == "127.0.0.1"


@pytest.mark.parametrize("role", list(REDIS_INSTANCES))
def test_redis_policy_holds_when_full(role):
    """Write well past maxmemory on the smallest preset: the cache evicts and keeps taking
    writes; the broker refuses writes with OOM and loses none of its queue."""
    import redis
    with running_redis(SMALLEST, role) as under_test:
        client = under_test.authed()
        limit = under_test.planned.maxmemory_mib * 1024 * 1024
        value = b"x" * (64 * 1024)
        accepted = refused = 0
        first_refusal = None
        deadline = time.monotonic() + 60
        while accepted * len(value) < 2 * limit and not refused and time.monotonic() < deadline:
            pipe = client.pipeline(transaction=False)
            for index in range(64):
                if role == "cache":
                    pipe.set(f"cache:{accepted + index}", value)
                else:  # a Celery queue: a list without TTL, as kombu keeps it
                    pipe.lpush("celery", value)
            for reply in pipe.execute(raise_on_error=False):
                if isinstance(reply, Exception):
                    refused += 1
                    first_refusal = first_refusal or reply
                else:
                    accepted += 1
        info = client.info()
        if role == "cache":
            assert refused == 0, f"the cache refused a write: {first_refusal}"
            assert accepted * len(value) >= 2 * limit, "did not get to write twice maxmemory in time"
            assert info["evicted_keys"] > 0
            assert client.dbsize() < accepted
            assert info["used_memory"] <= limit * 1.1
        else:
            assert refused, "the broker took twice its maxmemory without refusing a write"
            # Redis's "OOM command not allowed when used memory > 'maxmemory'"
            assert "used memory > 'maxmemory'" in str(first_refusal), first_refusal
            assert info["used_memory"] >= limit * 0.9, "refused before it was full"
            assert info["evicted_keys"] == 0
            assert client.llen("celery") == accepted, "an accepted task message was lost"


# =============================================================================================
# PostgreSQL with PgBouncer in front

@dataclass
class PgStack:
    preset: str
    plan: Plan
    env: dict[str, str]  # rendered .env: what Dify's clients are given
    workdir: Path
    pg_port: int
    bouncer_port: int
    admin_password: str
    postgres: Server
    pgbouncer: Server
    config_file: Path
    hba_file: Path
    tool_env: dict[str, str]
    pgbench: str
    superuser_password: str  # conf/postgres/superuser.env: the db container's alone

    superuser = "postgres"

    def as_superuser(self, **kwargs):
        """A direct connection as the superuser (verify's sampler and the admin log in so)."""
        return self.direct(user=self.superuser, password=self.superuser_password, **kwargs)

    @property
    def db_user(self) -> str:
        return self.env["DB_USERNAME"]

    @property
    def db_password(self) -> str:
        return self.env["DB_PASSWORD"]

    def connect(self, port: int, dbname: str | None = None, user: str | None = None,
                password: str | None = None, **kwargs):
        import psycopg
        return psycopg.connect(host="127.0.0.1", port=port, dbname=dbname or self.env["DB_DATABASE"],
                               user=user or self.db_user,
                               password=self.db_password if password is None else password,
                               connect_timeout=5, autocommit=True, **kwargs)

    def direct(self, **kwargs):
        return self.connect(self.pg_port, **kwargs)

    def bounced(self, **kwargs):
        # Transaction pooling: no server-side prepared statements (PgBouncer 1.18 cannot track them).
        return self.connect(self.bouncer_port, prepare_threshold=None, **kwargs)

    def run_pgbench(self, port: int, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        argv = [self.pgbench, "-h", "127.0.0.1", "-p", str(port), "-U", self.db_user, *args,
                self.env["DB_DATABASE"]]
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                              env={**self.tool_env, "PGPASSWORD": self.db_password})


@pytest.fixture(scope="module", params=list(PRESETS))
def pg_stack(request):
    """Postgres on a fresh data directory with the rendered postgresql.conf/pg_hba.conf, the
    image entrypoint's bootstrap (POSTGRES_DB, initdb scripts), pgbench tables, and PgBouncer
    with the rendered pgbouncer.ini/userlist.txt in front of it."""
    initdb, postgres, pgbench, psql, pgbouncer = postgres_programs()
    owner = service_user()

    preset = request.param
    plan = preset_plan(preset)
    secrets = Secrets.generate()
    files = render_files(plan, secrets)
    env = parse_env(files[".env"].content)
    pg_port, bouncer_port = free_port(), free_port()
    while bouncer_port == pg_port:
        bouncer_port = free_port()

    with server_dir(f"pg-{preset}", owner) as tmp:
        tool_env = base_env(tmp)
        # The image's entrypoint: initdb as POSTGRES_USER (postgres) with POSTGRES_PASSWORD, which
        # the db container alone gets from conf/postgres/superuser.env.
        superuser_password = parse_env(files["conf/postgres/superuser.env"].content)["POSTGRES_PASSWORD"]
        pwfile = write_file(tmp / "pwfile", superuser_password + "\n", 0o600, owner)
        run_checked([initdb, "-D", str(tmp / "data"), "-U", "postgres", f"--pwfile={pwfile}",
                     "-E", "UTF8", "--no-locale", "--no-sync"],
                    what="initdb", timeout=120, owner=owner, env=tool_env, cwd=tmp)
        pwfile.unlink()

        pg_conf_path = "conf/postgres/postgresql.conf"
        config_file = write_file(tmp / "postgresql.conf", relocate(files[pg_conf_path].content, pg_conf_path, {
            "listen_addresses = '*'": "listen_addresses = '127.0.0.1'",
            "port = 5432": f"port = {pg_port}",
        }), 0o644, owner)
        hba_file = write_file(tmp / "pg_hba.conf", files["conf/postgres/pg_hba.conf"].content, 0o644, owner)
        pg_server = Server("postgres", [
            postgres, "-D", str(tmp / "data"),
            "-c", f"config_file={config_file}", "-c", f"hba_file={hba_file}",  # as the compose command
            # Locating only: the socket in our directory instead of the image's /var/run/postgresql.
            "-c", f"unix_socket_directories={tmp}",
        ], workdir=tmp, env=tool_env, run_as=owner, stop_signal=signal.SIGINT)  # SIGINT: fast shutdown

        bouncer_ini_path = "conf/pgbouncer/pgbouncer.ini"
        userlist = files["conf/pgbouncer/userlist.txt"]
        userlist_file = write_file(tmp / "userlist.txt", userlist.content, userlist.mode, owner)
        bouncer_ini = write_file(tmp / "pgbouncer.ini", relocate(files[bouncer_ini_path].content, bouncer_ini_path, {
            "dify = host=db port=5432 dbname=dify": f"dify = host=127.0.0.1 port={pg_port} dbname=dify",
            "listen_addr = 0.0.0.0": "listen_addr = 127.0.0.1",
            "listen_port = 6432": f"listen_port = {bouncer_port}",
            "auth_file = /etc/pgbouncer/userlist.txt": f"auth_file = {userlist_file}",
        }), 0o644, owner)
        bouncer = Server("pgbouncer", [pgbouncer, str(bouncer_ini)], workdir=tmp, env=tool_env, run_as=owner,
                         nofile=plan.pgbouncer.nofile_limit)  # compose: ulimits nofile

        stack = PgStack(preset, plan, env, tmp, pg_port, bouncer_port, secrets.pgbouncer_admin_password,
                        pg_server, bouncer, config_file, hba_file, tool_env, pgbench, superuser_password)

        def postgres_ready():
            with stack.as_superuser(dbname="postgres") as conn:
                return conn.execute("SELECT 1").fetchone() == (1,)

        with pg_server.running(postgres_ready, timeout=START_TIMEOUT_S, what=f"postgres on port {pg_port}"):
            psql_env = {**tool_env, "PGPASSWORD": superuser_password}
            base = [psql, "-v", "ON_ERROR_STOP=1", "-X", "-q", "-h", "127.0.0.1", "-p", str(pg_port), "-U", "postgres"]
            run_checked([*base, "-d", "postgres", "-c", f'CREATE DATABASE "{env["DB_DATABASE"]}"'],
                        what="CREATE DATABASE (POSTGRES_DB)", timeout=60, env=psql_env)
            initdb_sql = files["conf/postgres/initdb/10-edgefit.sql"]
            sql_file = write_file(tmp / "10-edgefit.sql", initdb_sql.content, 0o644, owner)
            run_checked([*base, "-d", env["DB_DATABASE"], "-f", str(sql_file)],
                        what="the rendered initdb script", timeout=60, env=psql_env)
            # What the deploy runs once the cluster is up: Dify's and the plugin daemon's roles,
            # their passwords from the environment (the deploy passes the host's secrets by name).
            roles_sql = write_file(tmp / "roles.sql", files["conf/postgres/roles.sql"].content, 0o644, owner)
            run_checked([*base, "-d", "postgres", "-f", str(roles_sql)], what="the rendered roles.sql", timeout=60,
                        env={**psql_env, "DB_APP_PASSWORD": secrets.db_app_password,
                             "DB_PLUGIN_PASSWORD": secrets.db_plugin_password})
            init = stack.run_pgbench(pg_port, "-i", "-q", "-s", "1")
            assert init.returncode == 0, f"pgbench -i failed:\n{init.stderr}"

            def bouncer_ready():
                with stack.bounced() as conn:
                    return conn.execute("SELECT 1").fetchone() == (1,)

            with bouncer.running(bouncer_ready, timeout=START_TIMEOUT_S,
                                 what=f"pgbouncer on port {bouncer_port}"):
                yield stack


def test_postgres_runs_the_planned_settings(pg_stack):
    planned = pg_stack.plan.postgres
    with pg_stack.as_superuser() as conn:
        def show(name: str) -> str:
            return conn.execute(f"SHOW {name}").fetchone()[0]

        # The four the issue names, as SHOW prints them, against the plan.
        assert pg_size_kib(show("shared_buffers")) == planned.shared_buffers_mib * 1024
        assert int(show("max_connections")) == planned.max_connections
        assert pg_size_kib(show("work_mem")) == planned.work_mem_mib * 1024
        assert pg_size_kib(show("effective_cache_size")) == planned.effective_cache_size_mib * 1024
        # The rest of the tuned lines.
        assert pg_size_kib(show("maintenance_work_mem")) == planned.maintenance_work_mem_mib * 1024
        assert pg_size_kib(show("min_wal_size")) == planned.min_wal_size_mib * 1024
        assert pg_size_kib(show("max_wal_size")) == planned.max_wal_size_mib * 1024
        assert pg_size_kib(show("wal_buffers")) == planned.wal_buffers_kib
        assert int(show("superuser_reserved_connections")) == planned.superuser_reserved_connections
        assert int(show("max_worker_processes")) == planned.max_worker_processes
        assert int(show("max_parallel_workers")) == planned.max_parallel_workers
        assert int(show("max_parallel_workers_per_gather")) == planned.max_parallel_workers_per_gather
        assert int(show("max_parallel_maintenance_workers")) == planned.max_parallel_maintenance_workers
        assert show("huge_pages") == planned.huge_pages
        assert show("idle_in_transaction_session_timeout") in (
            f"{planned.idle_in_transaction_session_timeout_s}s",
            f"{planned.idle_in_transaction_session_timeout_s // 60}min")
        assert show("password_encryption") == "scram-sha-256"
        assert show("TimeZone") == "UTC"

        # ... and they came from the rendered file, not from defaults or the command line.
        assert show("config_file") == str(pg_stack.config_file)
        assert show("hba_file") == str(pg_stack.hba_file)
        sources = dict(conn.execute(
            "SELECT name, sourcefile FROM pg_settings WHERE name = ANY(%s)",
            (["shared_buffers", "max_connections", "work_mem", "effective_cache_size"],)).fetchall())
        assert sources == dict.fromkeys(sources, str(pg_stack.config_file)) and len(sources) == 4


def test_postgres_scram_login_with_the_rendered_password(pg_stack):
    import psycopg
    scram_only = {}
    if psycopg.pq.version() >= 160000:  # libpq 16+: refuse any method but SCRAM client-side
        scram_only = {"require_auth": "scram-sha-256"}
    with pg_stack.direct(**scram_only) as conn:  # Dify's own role, with the rendered .env's password
        user, superuser = conn.execute("SELECT current_user, rolsuper FROM pg_roles WHERE rolname = current_user").fetchone()
        assert user == pg_stack.db_user and not superuser
    with pg_stack.as_superuser(**scram_only) as conn:
        stored = dict(conn.execute("SELECT rolname, rolpassword FROM pg_authid WHERE rolname = ANY(%s)",
                                   ([pg_stack.db_user, "postgres"],)).fetchall())
        assert len(stored) == 2 and all(value.startswith("SCRAM-SHA-256$") for value in stored.values()), \
            "a password is not stored as a SCRAM secret"
        rules = conn.execute("SELECT type, address, auth_method FROM pg_hba_file_rules "
                             "WHERE type = 'host' AND error IS NULL").fetchall()
        assert rules and {rule[2] for rule in rules} == {"scram-sha-256"}, rules
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        pg_stack.direct(password=pg_stack.db_password + "x").close()


def test_the_samplers_own_postgres_client_reads_the_settings_psql_reads(pg_stack):
    """issue 12: verify and the deploy's one read ask Postgres directly (SCRAM over its own
    protocol) instead of a docker exec of psql; the same rows as libpq's, a wrong password refused."""
    from edgefit import sampler
    names = ",".join(f"'{name}'" for name in sampler.POSTGRES_SETTINGS)
    sql = f"SELECT name, setting, coalesce(unit, '') FROM pg_settings WHERE name IN ({names})"
    rows = sampler.postgres_query("127.0.0.1", pg_stack.pg_port, pg_stack.superuser_password, sql, 20)
    with pg_stack.as_superuser() as conn:
        expected = [list(row) for row in conn.execute(sql).fetchall()]
    assert sorted(rows) == sorted(expected) and len(rows) == len(sampler.POSTGRES_SETTINGS)
    assert sampler.postgres_query("127.0.0.1", pg_stack.pg_port, pg_stack.superuser_password, "SELECT NULL, 'x'",
                                  20) == [[None, "x"]]
    with pytest.raises(ValueError, match="password authentication failed"):
        sampler.postgres_query("127.0.0.1", pg_stack.pg_port, pg_stack.superuser_password + "x", sql, 20)
    # Dify's own role logs in the same way (the sampler's client is not tied to the superuser)
    assert sampler.postgres_query("127.0.0.1", pg_stack.pg_port, pg_stack.db_password, "SELECT current_user", 20,
                                  user=pg_stack.db_user, database="dify") == [[pg_stack.db_user]]


def pgbouncer_show(stack: PgStack, what: str) -> list[dict]:
    """The admin console (simple query protocol only), as admin_users' edgefit_admin."""
    import psycopg
    with psycopg.connect(host="127.0.0.1", port=stack.bouncer_port, dbname="pgbouncer",
                         user="edgefit_admin", password=stack.admin_password, connect_timeout=5,
                         autocommit=True, cursor_factory=psycopg.ClientCursor) as conn:
        cursor = conn.execute(f"SHOW {what}")
        names = [column.name for column in cursor.description]
        return [dict(zip(names, row)) for row in cursor.fetchall()]


def test_pgbouncer_runs_the_planned_pools(pg_stack):
    config = {row["key"]: row["value"] for row in pgbouncer_show(pg_stack, "CONFIG")}
    planned = pg_stack.plan.pgbouncer
    assert config["pool_mode"] == planned.pool_mode
    assert int(config["max_client_conn"]) == planned.max_client_conn
    assert int(config["default_pool_size"]) == planned.default_pool_size
    assert int(config["reserve_pool_size"]) == planned.reserve_pool_size
    assert int(config["max_db_connections"]) == planned.max_db_connections
    assert config["auth_type"] == "scram-sha-256"
    assert config["listen_addr"] == "127.0.0.1"
    # PgBouncer runs with the descriptor limit compose gives it (ulimits nofile), and that
    # covers what PgBouncer itself expects to use for the planned pools.
    limits = Path(f"/proc/{pg_stack.pgbouncer.pid}/limits").read_text()
    soft = int(re.search(r"^Max open files\s+(\d+)", limits, re.M).group(1))
    hard_here = resource.getrlimit(resource.RLIMIT_NOFILE)[1]  # a non-root run cannot go past it
    assert soft == (planned.nofile_limit if hard_here == resource.RLIM_INFINITY
                    else min(planned.nofile_limit, hard_here))
    expected_use = re.search(r"max expected fd use: (\d+)", pg_stack.pgbouncer.log())
    assert expected_use, pg_stack.pgbouncer.log_tail()
    assert int(expected_use.group(1)) <= planned.nofile_limit
    # The server pool can never ask Postgres for more than it has for non-superusers.
    assert planned.max_db_connections < pg_stack.plan.postgres.max_connections


def test_query_through_pgbouncer(pg_stack):
    import psycopg
    with pg_stack.bounced() as conn:
        database, server_port, user = conn.execute(
            "SELECT current_database(), inet_server_port(), current_user").fetchone()
    assert database == pg_stack.env["DB_DATABASE"]
    assert server_port == pg_stack.pg_port  # answered by the Postgres behind it
    assert user == pg_stack.db_user
    # Dify's SQLAlchemy engine sends `options=-c timezone=UTC`; PgBouncer 1.18 refuses unknown
    # startup parameters unless ignore_startup_parameters lists them (rendered line).
    with pg_stack.bounced(options="-c timezone=UTC") as conn:
        assert conn.execute("SHOW TimeZone").fetchone() == ("UTC",)
    with pytest.raises(psycopg.OperationalError, match="SASL authentication failed"):  # PgBouncer's words
        pg_stack.bounced(password=pg_stack.db_password + "x").close()


def over_max_connections(plan: Plan) -> int:
    """More clients than Postgres accepts, but within PgBouncer's max_client_conn (leaving two
    for pgbench's own set-up connection and the sampler)."""
    clients = min(plan.postgres.max_connections + 30, plan.pgbouncer.max_client_conn - 2)
    assert clients > plan.postgres.max_connections, (
        f"max_client_conn {plan.pgbouncer.max_client_conn} does not exceed max_connections "
        f"{plan.postgres.max_connections}: PgBouncer could not absorb more clients than Postgres")
    return clients


class PeakServerConnections:
    """Samples, on a direct connection, how many backends serve the Dify database."""

    def __init__(self, stack: PgStack):
        self.stack = stack
        self.peak = 0
        self.samples = 0
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        try:
            with self.stack.direct(dbname="postgres") as conn:
                while not self._stop.is_set():
                    count = conn.execute(
                        "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend' "
                        "AND datname = %s", (self.stack.env["DB_DATABASE"],)).fetchone()[0]
                    self.peak = max(self.peak, count)
                    self.samples += 1
                    self._stop.wait(0.05)
        except BaseException as error:  # noqa: BLE001 - reported by the test
            self.error = error

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=10)




@pytest.mark.parametrize("mode", list(PGBENCH_MODES))
def test_pgbench_through_pgbouncer_with_more_clients_than_max_connections(pg_stack, mode, record_property):
    plan = pg_stack.plan
    clients = over_max_connections(plan)
    with PeakServerConnections(pg_stack) as sampler:
        result = pg_stack.run_pgbench(pg_stack.bouncer_port, *PGBENCH_MODES[mode], "-n",
                                      "-c", str(clients), "-j", "2", "-t", str(PGBENCH_TRANSACTIONS[mode]),
                                      timeout=180)
    output = result.stdout + result.stderr
    numbers = pgbench_numbers(result.stdout)
    print(f"\n[measure] {pg_stack.preset} {mode} via PgBouncer: clients {clients} "
          f"(max_connections {plan.postgres.max_connections}), exit {result.returncode}, "
          f"tps {numbers.get('tps')}, transactions {numbers.get('processed')}, failed {numbers.get('failed')}, "
          f"peak server connections {sampler.peak}")
    record_property(f"pgbench_{mode}_pgbouncer_tps", numbers.get("tps"))
    assert result.returncode == 0, f"pgbench through PgBouncer failed:\n{output}"
    assert "too many clients" not in output and "no more connections allowed" not in output, output
    assert "error" not in result.stderr.lower(), output
    assert numbers.get("clients") == clients
    assert numbers.get("failed") == 0, output
    assert numbers.get("processed") == clients * PGBENCH_TRANSACTIONS[mode], output  # every client served
    # PgBouncer kept Postgres within its server pool while all clients were connected.
    assert sampler.error is None, sampler.error
    assert sampler.samples > 0
    assert 0 < sampler.peak <= plan.pgbouncer.max_db_connections


def test_same_clients_straight_at_postgres_are_refused(pg_stack, record_property):
    """The contrast: without PgBouncer the same client count hits max_connections."""
    clients = over_max_connections(pg_stack.plan)
    # A few clients straight at Postgres are fine: what fails below is the count alone.
    control = pg_stack.run_pgbench(pg_stack.pg_port, "-S", "-n", "-c", "4", "-j", "2", "-t", "50")
    assert control.returncode == 0, control.stdout + control.stderr
    result = pg_stack.run_pgbench(pg_stack.pg_port, "-S", "-n", "-c", str(clients), "-j", "2",
                                  "-T", str(PGBENCH_SECONDS))
    output = result.stdout + result.stderr
    # Dify's role is no superuser: the superuser_reserved_connections slots stay for the admin,
    # so it is refused before max_connections, with Postgres' message for that
    refusals = ("sorry, too many clients already", "remaining connection slots are reserved")
    refused = any(refusal in output for refusal in refusals)
    print(f"\n[measure] {pg_stack.preset} select-only direct: clients {clients}, exit {result.returncode}, "
          f"{'too many clients' if refused else 'no refusal'}")
    record_property("pgbench_direct_exit", result.returncode)
    assert result.returncode != 0, f"{clients} clients straight at Postgres were accepted:\n{output}"
    assert refused, output


def test_the_samplers_direct_redis_check_reads_what_redis_cli_would(redis_server):
    """verify and the deploy ask Redis over TCP (edgefit/sampler.py redis_direct) instead of a
    docker exec of redis-cli: the same settings, from the real server with its rendered file."""
    from edgefit import judge, sampler

    endpoint = ("127.0.0.1", redis_server.port, redis_server.client_password)
    got = sampler.ServiceChecks.redis_direct(endpoint, True, 10.0)
    planned = redis_server.planned
    assert got["config"]["maxmemory"] == str(planned.maxmemory_mib * 1024 * 1024)
    assert got["config"]["maxmemory-policy"] == planned.maxmemory_policy
    assert got["info"]["maxmemory_policy"] == planned.maxmemory_policy and got["info"]["used_memory"] > 0
    want = {"maxmemory_bytes": planned.maxmemory_mib * 1024 * 1024, "policy": planned.maxmemory_policy}
    assert judge.redis_drift("redis", want, got["config"], got["info"]) == []
    redis_server.authed().config_set("maxmemory", 0)  # a hand change: seen at once
    try:
        drifted = sampler.ServiceChecks.redis_direct(endpoint, True, 10.0)
        assert [kind for kind, _ in judge.redis_drift("redis", want, drifted["config"], drifted["info"])]
    finally:
        redis_server.authed().config_set("maxmemory", planned.maxmemory_mib * 1024 * 1024)
    wrong = sampler.ServiceChecks.redis_direct(("127.0.0.1", redis_server.port, "not-the-password"), True, 10.0)
    assert "WRONGPASS" in wrong["error"] and "not-the-password" not in wrong["error"]
